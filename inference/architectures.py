"""What the decode loop serves of a model's architecture: the text config, rope regimes, sliding-window caches.

The decode loop (inference/decode.py) batches rows of different lengths in one forward. Three things in a
model's config make "a row computes what it would alone" need more than per-row positions and a padding mask:

    text config      multimodal configs (Gemma 3 4B+: Gemma3Config) nest the language model's fields under
                     text_config; every field the loop reads (vocab, window, rope) is read through text_config()
    rope regime      `longrope` (Phi-3 128k, Phi-3.5, Phi-4-mini: short factors up to
                     original_max_position_embeddings, long beyond) and `dynamic` NTK choose rope frequencies
                     from the largest position of the forward: transformers takes it over the whole batch, so a
                     short row batched beside a long one gets the long row's rope. PerRowRope groups the rows of
                     each forward by regime and runs the model's own rotary code once per group.
                     transformers' Phi-3 `generate` drops the cache once when a sequence crosses the switch (all
                     keys recomputed with long factors); the loop does the same for the rows that cross
                     (`longrope_switch`), and a prefix-cache entry is reused only within its regime (`regime`).
    sliding window   layers with a window (Gemma 3's local layers, Mistral) keep only the last window - 1
                     keys/values, as transformers' DynamicCache(config=...) does in `generate`: `new_cache`.

Refused at load with the reason (`servable_reason`, also called by `convo train` before training): rope types
other than SERVED_ROPE, and layer kinds other than full and sliding attention (chunked attention, KV sharing,
linear-attention layers). Heavy module (torch, transformers).
"""

from __future__ import annotations

import torch

from errors import ConvoError

# Static rope types compute the same frequencies at every length; longrope and dynamic depend on it (PerRowRope).
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
PER_ROW_ROPE = ("longrope", "dynamic")
SERVED_ROPE = STATIC_ROPE + PER_ROW_ROPE
SERVED_LAYERS = ("full_attention", "sliding_attention")


class UnsupportedArchitecture(ConvoError):
    """A base model the decode loop cannot serve exactly (an unknown rope type or attention layer kind)."""


def text_config(config):
    """The language model's config: `text_config` of a multimodal config, else the config itself."""
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if getter is not None else config


def rope_types(config) -> dict[str | None, dict]:
    """{layer type or None: rope parameters} of a (text) config; {} when the model has no rope (GPT-2)."""
    config = text_config(config)
    params = getattr(config, "rope_parameters", None)
    if not params:
        return {}
    if isinstance(params, dict) and all(isinstance(v, dict) for v in params.values()):  # per layer type
        return {k: v for k, v in params.items() if v}
    return {None: params}


def position_limit(config) -> int | None:
    """Positions a model with learned absolute position embeddings has (GPT-2's n_positions: the decode loop cuts
    prompts to fit them); None for rope models, whose positions have no hard end."""
    config = text_config(config)
    if rope_types(config):
        return None
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return int(limit) if limit else None


def servable_reason(config) -> str | None:
    """Why the decode loop cannot serve a model with this config (one line), or None when it can."""
    config = text_config(config)
    for layer, params in rope_types(config).items():
        kind = params.get("rope_type", "default")
        if kind not in SERVED_ROPE:
            where = f" ({layer} layers)" if layer else ""
            return (f"rope type {kind!r}{where} is not served by the decode loop (served: {', '.join(SERVED_ROPE)})")
    layer_types = getattr(config, "layer_types", None) or []
    odd = sorted(set(layer_types) - set(SERVED_LAYERS))
    if odd:
        return f"attention layers of kind {', '.join(odd)} are not served by the decode loop"
    if getattr(config, "kv_sharing_modes", None) or getattr(config, "num_kv_shared_layers", 0):
        return "layers sharing keys/values across layers are not served by the decode loop"
    return None


def check_servable(model_or_config, where: str = "base model") -> None:
    """UnsupportedArchitecture (one line) when the decode loop cannot serve this model."""
    config = getattr(model_or_config, "config", model_or_config)
    reason = servable_reason(config)
    if reason is not None:
        raise UnsupportedArchitecture(f"{where} ({getattr(config, 'model_type', '?')}): {reason}")


def longrope_switch(config) -> int | None:
    """original_max_position_embeddings of a longrope model (short factors while a sequence has at most this many
    positions, long beyond), else None."""
    for params in rope_types(config).values():
        if params.get("rope_type") == "longrope":
            return int(params.get("original_max_position_embeddings")
                       or text_config(config).original_max_position_embeddings)
    return None


def regime(config, length: int) -> str:
    """The rope regime a prompt of `length` tokens is prefilled in ("" when every length gives the same rope):
    prefix-cache entries are reused only within one regime."""
    tags = []
    for params in rope_types(config).values():
        kind = params.get("rope_type")
        if kind == "longrope":
            tags.append("long" if length > longrope_switch(config) else "short")
        elif kind == "dynamic":
            limit = text_config(config).max_position_embeddings
            tags.append("" if length <= limit else f"ntk{length}")
    return ",".join(t for t in tags if t)


# ---------------------------------------------------------------- per-row rope


class PerRowRope:
    """A rotary-embedding module's forward with each row's frequencies chosen from that row's own positions.

    Rows of one forward are grouped by regime (longrope: short/long; dynamic: the row's own length); each group
    runs the module's own (undecorated) forward with that regime's inverse frequencies set on it, and the groups'
    cos/sin are put back in row order. One group (the common case) is one call, as before.
    """

    def __init__(self, module):
        self.module = module
        self.raw = type(module).forward.__wrapped__  # the forward without transformers' dynamic_rope_update
        self.config = module.config
        self._freqs: dict[tuple, tuple[torch.Tensor, float]] = {}

    @staticmethod
    def wants(module) -> bool:
        """True for a transformers rotary module using a length-dependent rope type."""
        kinds = getattr(module, "rope_type", None)
        kinds = kinds.values() if isinstance(kinds, dict) else [kinds]
        return (any(k in PER_ROW_ROPE for k in kinds) and hasattr(type(module).forward, "__wrapped__")
                and hasattr(module, "config"))

    def _key(self, kind: str, length: int, layer_type) -> int:
        if kind == "longrope":
            return int(length > self._switch(layer_type))
        return max(length, self.config.max_position_embeddings)  # dynamic: frequencies of this length

    def _set(self, kind: str, key: int, layer_type, device) -> None:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        cached = self._freqs.get((layer_type, key))
        if cached is None:
            extra = {"layer_type": layer_type} if layer_type else {}
            seq_len = (self._switch(layer_type) + 1 if key else None) if kind == "longrope" else key
            inv, scaling = ROPE_INIT_FUNCTIONS[kind](self.config, device, seq_len=seq_len, **extra)
            cached = self._freqs[(layer_type, key)] = (inv.to(device), scaling)
        prefix = f"{layer_type}_" if layer_type else ""
        getattr(self.module, f"{prefix}inv_freq").copy_(cached[0])
        setattr(self.module, f"{prefix}attention_scaling", cached[1])

    def _switch(self, layer_type) -> int:
        params = self.config.rope_parameters[layer_type] if layer_type else self.config.rope_parameters
        return int(params.get("original_max_position_embeddings") or self.config.original_max_position_embeddings)

    def __call__(self, x, position_ids, layer_type=None):
        kinds = self.module.rope_type
        kind = kinds[layer_type] if isinstance(kinds, dict) else kinds
        extra = {"layer_type": layer_type} if layer_type is not None else {}
        if kind not in PER_ROW_ROPE:
            return self.raw(self.module, x, position_ids, **extra)
        if position_ids.shape[0] != x.shape[0]:
            position_ids = position_ids.expand(x.shape[0], -1)
        keys = [self._key(kind, n, layer_type) for n in (position_ids.max(dim=1).values + 1).tolist()]
        groups: dict[int, list[int]] = {}
        for r, key in enumerate(keys):
            groups.setdefault(key, []).append(r)
        if len(groups) == 1:
            self._set(kind, keys[0], layer_type, x.device)
            return self.raw(self.module, x, position_ids, **extra)
        cos = sin = None
        for key, rows in groups.items():
            self._set(kind, key, layer_type, x.device)
            index = torch.tensor(rows, device=x.device)
            c, s = self.raw(self.module, x[index], position_ids[index], **extra)
            if cos is None:
                cos, sin = c.new_empty((x.shape[0], *c.shape[1:])), s.new_empty((x.shape[0], *s.shape[1:]))
            cos[index], sin[index] = c, s
        return cos, sin


def install_per_row_rope(model) -> int:
    """Give every length-dependent rotary module of `model` a PerRowRope forward; how many were changed."""
    n = 0
    for module in model.modules():
        if PerRowRope.wants(module) and not isinstance(module.forward, PerRowRope):
            module.forward = PerRowRope(module)
            n += 1
    return n


# ---------------------------------------------------------------- KV caches with sliding-window layers


PREFIX_MARGIN = 64  # keys a prefix-cache entry keeps beyond a sliding window, so a prompt may diverge in its last few


def new_cache(model, kv=None, length: int = 0, capped: bool = True, keep_all: bool = False):
    """A DynamicCache for `model`'s layers (sliding-window layers capped at window - 1 keys, as in `generate`;
    `capped` False: every layer keeps every key, as before the cap), holding `kv` (per layer (keys, values),
    (rows, heads, cols, dim); a sliding layer's cols may be fewer) for rows `length` columns wide. `keep_all`:
    sliding layers keep every key until `trim_windows` (a prefill whose entry keeps a margin)."""
    from transformers import DynamicCache

    if not capped:
        return DynamicCache(ddp_cache_data=kv) if kv is not None else DynamicCache()
    cache = DynamicCache(config=model.config)
    if keep_all:
        for layer in cache.layers:
            if getattr(layer, "is_sliding", False):
                layer.activate_past_recording()  # transformers' own mode: attend to the window, keep the past
    if kv is not None:
        for layer, (k, v) in zip(cache.layers, kv, strict=True):
            layer.update(k, v)
        set_width(cache, length)
    return cache


def trim_windows(cache, length: int, margin: int) -> tuple[list, int]:
    """Cut each sliding layer of a one-row cache to its last window - 1 + `margin` keys (in place when `margin`
    is 0); (per layer (keys, values), the shortest prefix those keys can serve: length - margin, or 0 when no
    layer lost a key)."""
    kv, cut = [], False
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        if getattr(layer, "is_sliding", False):
            keep = layer.sliding_window - 1 + margin
            if k.shape[2] > keep:  # copies: a view would keep the whole prompt's storage alive
                k, v, cut = k[:, :, -keep:].clone(), v[:, :, -keep:].clone(), True
            if margin == 0:
                layer.keys, layer.values, layer.record_past = k, v, False
        kv.append((k, v))
    return kv, (max(0, length - margin) if cut else 0)


def set_width(cache, length: int) -> None:
    """Record that the cache's rows are `length` columns wide (what a sliding layer's mask offset is taken from)."""
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False):
            layer.cumulative_length = length


def kv_bytes(cache) -> int:
    """Bytes of keys and values a cache holds."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))


# ---------------------------------------------------------------- LoRA targets


def language_model_targets(model, names: list[str] | None = None) -> str | None:
    """PEFT `target_modules` kept to the language model of a multimodal model: a regex over the text decoder's
    linear layers (`names`, or all of them for "all-linear"; no vision tower, no projector). None for a text-only
    model, where PEFT's own "all-linear" and plain names are that already."""
    import re

    if text_config(model.config) is model.config:
        return None
    from inference.lora_batch import layer_features

    decoder = model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    leaves = names or sorted({name.rsplit(".", 1)[-1] for name, module in decoder.named_modules()
                              if name and layer_features(module) is not None})
    return rf"^{re.escape(prefix)}\..*\.({'|'.join(map(re.escape, leaves))})$"
