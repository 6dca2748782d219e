"""The worker's adapter registry: one base model, every persona's LoRA adapter on it (discover, check, LRU, hot swap).

    adapters/alice/current -> v2      persona "alice", version "v2"
    adapters/bob/                     persona "bob", unversioned

Every persona dir under `--adapters` is checked against the loaded base (same weights hash or hub id, same prompt
format) when the worker starts or first sees it; a mismatched one is skipped with one log line and requests for it
get `unknown_persona` with the reason. At most `max_loaded` adapters stay on the model (least recently used are
deleted); the others load on first use. Adapters live on an inference.lora_batch.LoraBank (stacked per layer, one
slot each). Each loaded adapter has a name unique to its version, so a reload loads the new version *beside* the
old one and switches the persona to it for new requests; rows already generating finish on the old one.

Heavy module (torch), imported only by the worker.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from errors import AdapterMismatch, ConvoError
from inference.adapter_meta import AdapterMeta, check_compatible, local_model_sha256, read_adapter_meta
from inference.batching import BASE_ADAPTER  # noqa: F401 - re-exported: the registry names rows with it
from inference.versions import discover, resolve

logger = logging.getLogger("convo.worker.adapters")



@dataclass(frozen=True, slots=True)
class AdapterInfo:
    """A persona's adapter as found on disk: where, which version, its metadata."""

    persona: str
    path: Path
    version: str | None
    meta: AdapterMeta


@dataclass(frozen=True, slots=True)
class LoadedAdapter:
    """An adapter on the bank: its name (unique per load) and what it was loaded from."""

    name: str
    info: AdapterInfo


class UnknownPersona(ConvoError):
    """A request names a persona with no usable adapter (the message says why)."""


def recorded_base(adapters_dir: Path | str) -> str | None:
    """The base model the first readable adapter under `adapters_dir` was trained on (for a worker without --base)."""
    for persona_dir in discover(adapters_dir).values():
        try:
            path, _ = resolve(persona_dir)
            return read_adapter_meta(path).base_model.id
        except ConvoError:
            continue
    return None


class AdapterRegistry:
    """Persona -> adapter on one base model: checked on discovery, loaded on first use, LRU-evicted, hot-swapped."""

    def __init__(self, bank, adapters_dir: Path | str, base: str | Path, max_loaded: int = 8):
        self.bank = bank  # inference.lora_batch.LoraBank on the base model
        self.adapters_dir = Path(adapters_dir)
        self.base = str(base)
        self.max_loaded = max_loaded
        self.available: dict[str, AdapterInfo] = {}
        self.rejected: dict[str, str] = {}  # persona -> why it cannot be served
        self.current: dict[str, LoadedAdapter] = {}  # persona -> the adapter new requests use
        self._lru: OrderedDict[str, LoadedAdapter] = OrderedDict()  # PEFT name -> adapter, oldest first
        self._loads = 0
        self._base_sha256: str | None = None

    # ------------------------------------------------------------ discovery

    def scan(self) -> None:
        """Find every persona dir, check its metadata against the base; log one line per newly rejected one."""
        found = discover(self.adapters_dir)
        for persona, persona_dir in found.items():
            self._check(persona, persona_dir)
        for gone in set(self.available) - set(found):
            self.available.pop(gone, None)

    def _check(self, persona: str, persona_dir: Path) -> AdapterInfo | None:
        try:
            path, version = resolve(persona_dir)
            meta = read_adapter_meta(path)
            self._check_base(meta)
        except ConvoError as e:
            if self.rejected.get(persona) != str(e):
                logger.warning("adapter skipped persona=%s: %s", persona, e)
            self.rejected[persona] = str(e)
            self.available.pop(persona, None)
            return None
        self.rejected.pop(persona, None)
        info = AdapterInfo(persona, path, version, meta)
        self.available[persona] = info
        return info

    def _check_base(self, meta: AdapterMeta) -> None:
        """check_compatible, with the local base's weights hashed once (not once per persona)."""
        if meta.base_model.local_path_sha256 is None or not Path(self.base).is_dir():
            check_compatible(meta, self.base)
            return
        check_compatible(meta, None)  # the prompt format
        if self._base_sha256 is None:
            self._base_sha256 = local_model_sha256(self.base)
        if meta.base_model.local_path_sha256 != self._base_sha256:
            raise AdapterMismatch(
                f"trained on a different base than {self.base} (weights hash differs from the one recorded for "
                f"{meta.base_model.id}): serve it with that base, or retrain it on this one"
            )

    @property
    def loaded_names(self) -> list[str]:
        """`persona@version` of every adapter on the model, oldest use first."""
        return [f"{a.info.persona}@{a.info.version or '-'}" for a in self._lru.values()]

    # ------------------------------------------------------------ loading

    def acquire(self, persona: str, pinned: set[str] | frozenset[str] = frozenset()) -> LoadedAdapter:
        """The adapter for `persona`, loading it if needed; UnknownPersona (with the reason) when there is none.

        `pinned` names the adapters the batch being built already uses: eviction never drops them.
        """
        loaded = self.current.get(persona)
        if loaded is not None:
            self._lru.move_to_end(loaded.name)
            return loaded
        info = self.available.get(persona)
        if info is None:
            persona_dir = self.adapters_dir / persona
            if persona_dir.is_dir() and not persona.startswith("."):
                info = self._check(persona, persona_dir)
            if info is None:
                reason = self.rejected.get(persona) or f"no adapter dir {persona_dir}"
                raise UnknownPersona(f"persona {persona!r}: {reason}")
        return self._load(info, pinned)

    def _load(self, info: AdapterInfo, pinned: set[str] | frozenset[str] = frozenset()) -> LoadedAdapter:
        from inference.lora_batch import AdapterLoadError

        self._loads += 1
        name = f"a{self._loads}_" + re.sub(r"[^A-Za-z0-9_]", "_", f"{info.persona}_{info.version or 'dir'}")
        try:
            self.bank.load(name, info.path)
        except AdapterLoadError as e:
            logger.warning("adapter skipped persona=%s: %s", info.persona, e)
            self.rejected[info.persona] = str(e)
            self.available.pop(info.persona, None)
            raise UnknownPersona(f"persona {info.persona!r}: {e}") from e
        loaded = LoadedAdapter(name, info)
        previous = self.current.get(info.persona)
        self.current[info.persona] = loaded
        self._lru[name] = loaded
        if previous is not None:  # a reload: the old version is no longer used by new batches
            self._unload(previous)
        self._evict(pinned | {name})
        logger.info("adapter loaded persona=%s version=%s name=%s", info.persona, info.version, name)
        return loaded

    def _unload(self, adapter: LoadedAdapter) -> None:
        self._lru.pop(adapter.name, None)
        if self.current.get(adapter.info.persona) is adapter:
            del self.current[adapter.info.persona]
        self.bank.remove(adapter.name)  # rows still generating on it keep its slot until they finish

    def _evict(self, pinned: set[str] | frozenset[str]) -> None:
        # A batch using more personas than max_loaded keeps them all until it is done (pinned).
        for oldest in [a for a in self._lru.values() if a.name not in pinned]:
            if len(self._lru) <= self.max_loaded:
                break
            self._unload(oldest)
            logger.info("adapter evicted persona=%s version=%s", oldest.info.persona, oldest.info.version)

    # ------------------------------------------------------------ reload

    def reload(self, persona: str | None = None) -> list[str]:
        """Load the version on disk of `persona` (every loaded persona with None) where it differs; returns who changed.

        Rows already generating keep the adapter they started with (its slot is freed when they finish).
        """
        self.scan()
        personas = [persona] if persona is not None else list(self.current)
        changed = []
        for p in personas:
            info = self._check(p, self.adapters_dir / p) if (self.adapters_dir / p).is_dir() else None
            loaded = self.current.get(p)
            if info is None:
                if loaded is not None:  # the adapter is gone or broken now: stop serving it
                    self._unload(loaded)
                    changed.append(p)
                continue
            if loaded is None:
                continue  # not loaded: the next request loads the new version anyway
            if loaded.info.path != info.path or persona is not None and info.version is None:
                self._load(info)
                changed.append(p)
        return changed

    def changed_on_disk(self) -> list[str]:
        """Loaded personas whose `current` link now points elsewhere (the disk watch)."""
        out = []
        for p, loaded in self.current.items():
            try:
                path, _ = resolve(self.adapters_dir / p)
            except ConvoError:
                out.append(p)
                continue
            if path != loaded.info.path:
                out.append(p)
        return out


def random_adapter(base: str | Path, out_dir: Path | str, persona: str, *, seed: int = 0, r: int = 4,
                   me: str | None = "Me", base_model=None, b_scale: float = 1.0) -> Path:
    """An untrained LoRA adapter with random A and B (so it changes outputs), saved with its convo_adapter.json.

    For benchmarks and tests: it lets a worker serve distinct personas with nothing but a base model dir.
    `base_model` is the BaseModelRef to record (computed from `base` when None; pass it to save re-hashing).
    `b_scale` multiplies B: 0.1 changes a real base's outputs without turning its text to noise.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from inference.adapter_meta import Speaker, base_model_ref, write_adapter_meta
    from inference.architectures import language_model_targets
    from inference.prompt_format import FORMAT_VERSION, make_tag

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    plain = AutoModelForCausalLM.from_pretrained(str(base))
    targets = language_model_targets(plain) or "all-linear"  # a multimodal base: its language model only
    model = get_peft_model(plain, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False))
    if b_scale != 1.0:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(b_scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(out_dir))
    persona_tag = make_tag(persona)
    write_adapter_meta(out_dir, AdapterMeta(
        persona=Speaker(name=persona, tag=persona_tag),
        me=Speaker(name=me, tag=make_tag(me, [persona_tag])) if me else None,
        base_model=base_model or base_model_ref(base),
        format_version=FORMAT_VERSION,
    ))
    return out_dir
