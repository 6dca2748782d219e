"""Batched LoRA: every loaded adapter stacked per layer, one gathered low-rank product for all rows of a batch.

PEFT's mixed-adapter forward (`adapter_names=`) splits the batch by adapter in every LoRA layer: a Python loop of
small matmuls per adapter per layer per step, which made mixing 4 adapters cost 3.4x one adapter on a GPU. Here
(the idea of Punica's BGMV and S-LoRA, in plain torch) each targeted linear layer keeps

    A: (slots, in, r_max)    B: (slots, r_max, out)    (B already multiplied by the adapter's scaling)

and one forward hook adds, for the batch x: (rows, T, in), each row's x @ A[slot] @ B[slot], in one of two ways:

    "gather": bmm(bmm(x, A[row_slots]), B[row_slots])             each row's own A, B gathered: least arithmetic
    "dense":  (x @ A_used  * onehot(row)) @ B_used                 A_used: (in, U*r), the U adapters in the batch,
                                                                 read once per step whatever the number of rows

"gather" copies r*(in+out) weights per row, "dense" reads U*r*(in+out) once and does U times the arithmetic: the
first suits a compute-bound CPU, the second a memory-bound GPU with many rows (the default per device; the GPU
figure is not measured yet, bench/gpu/run.py measures both). Slot 0 is the bare base (all zeros, skipped when
every row uses it); all rows on one slot is a plain matmul.
Adapters of different ranks are zero-padded to the largest rank (the padding adds exact zeros). Slots are never
moved while rows use them: loading a new version takes a free slot, and removing an adapter frees its slot only
once no running row uses it (`release`), so a hot reload never changes what a generating row computes.
Supported: PEFT LoRA on linear layers (any rank, alpha, rsLoRA); DoRA, biases, `modules_to_save` and embedding
LoRA are refused with the reason (AdapterLoadError). Heavy module (torch, safetensors).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from errors import ConvoError

BASE_SLOT = 0


class AdapterLoadError(ConvoError):
    """An adapter dir the bank cannot serve (missing files, an unsupported PEFT feature, no matching layer)."""


def read_lora(path: Path | str) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, bool]:
    """({module name: (A (r, in), B (out, r))}, lora_alpha, use_rslora) of a PEFT LoRA dir; AdapterLoadError else."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise AdapterLoadError(f"{path}: no readable adapter_config.json ({e})") from e
    unsupported = {
        "use_dora": config.get("use_dora"), "bias": config.get("bias") not in (None, "none"),
        "modules_to_save": bool(config.get("modules_to_save")), "alpha_pattern": bool(config.get("alpha_pattern")),
        "fan_in_fan_out": config.get("fan_in_fan_out"),
    }
    bad = [k for k, v in unsupported.items() if v]
    if config.get("peft_type", "LORA") != "LORA" or bad:
        raise AdapterLoadError(f"{path}: unsupported by the batched LoRA backend: {', '.join(bad) or 'not LoRA'}")
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise AdapterLoadError(f"{path}: no adapter_model.safetensors")
    tensors = load_file(str(weights_file))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                module = key.split(marker)[0].removeprefix("base_model.model.")
                pairs.setdefault(module, {})[part] = value
                break
        else:
            raise AdapterLoadError(f"{path}: unsupported tensor {key} (only LoRA on linear layers is served)")
    if not pairs or any(len(p) != 2 for p in pairs.values()):
        raise AdapterLoadError(f"{path}: LoRA tensors missing or unpaired")
    return ({m: (p["lora_A"], p["lora_B"]) for m, p in pairs.items()}, float(config.get("lora_alpha", 8)),
            bool(config.get("use_rslora")))


def peft_lora(model) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
    """({module name: (A (r, in), B (out, r))}, {module name: scaling}) of a PeftModel's active LoRA adapter.

    The weights as they are now (detached, not copied: `LoraBank.put` copies them), so a model under training is
    read afresh each time; module names are the base model's (`model.get_base_model()`). The same features as
    `read_lora` are refused (AdapterLoadError).
    """
    name = model.active_adapter
    if isinstance(name, list):
        if len(name) != 1:
            raise AdapterLoadError(f"the batched LoRA backend serves one active adapter, not {len(name)}")
        name = name[0]
    config = model.peft_config[name]
    unsupported = {
        "use_dora": getattr(config, "use_dora", False), "bias": getattr(config, "bias", "none") not in (None, "none"),
        "modules_to_save": bool(getattr(config, "modules_to_save", None)),
        "fan_in_fan_out": getattr(config, "fan_in_fan_out", False),
    }
    bad = [k for k, v in unsupported.items() if v]
    if str(getattr(config, "peft_type", "LORA")).rsplit(".", 1)[-1] != "LORA" or bad:
        raise AdapterLoadError(f"adapter {name}: unsupported by the batched LoRA backend: {', '.join(bad) or 'not LoRA'}")
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    scalings: dict[str, float] = {}
    for module_name, module in model.get_base_model().named_modules():
        if name in getattr(module, "lora_embedding_A", {}):
            raise AdapterLoadError(f"adapter {name}: LoRA on embedding layer {module_name} is not served")
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or name not in lora_a:
            continue
        weights[module_name] = (lora_a[name].weight.detach(), module.lora_B[name].weight.detach())
        scalings[module_name] = float(module.scaling[name])
    if not weights:
        raise AdapterLoadError(f"adapter {name}: no LoRA layer found")
    return weights, scalings


class _Stack:
    """One layer's stacked adapters: A (slots, in, r), B (slots, r, out), on the layer's device and dtype."""

    def __init__(self, in_features: int, out_features: int, slots: int, rank: int, device, dtype):
        self.a = torch.zeros(slots, in_features, rank, device=device, dtype=dtype)
        self.b = torch.zeros(slots, rank, out_features, device=device, dtype=dtype)

    def grow(self, slots: int, rank: int) -> None:
        """Make room for `slots` slots of rank `rank` (zero-padded; existing slots keep their place)."""
        s, i, r = self.a.shape
        o = self.b.shape[2]
        if slots <= s and rank <= r:
            return
        a = self.a.new_zeros(max(s, slots), i, max(r, rank))
        b = self.b.new_zeros(max(s, slots), max(r, rank), o)
        a[:s, :, :r], b[:s, :r, :] = self.a, self.b
        self.a, self.b = a, b


class LoraBank:
    """Adapters stacked on one base model; `rows(slots)` sets which slot each row of the next forwards uses."""

    def __init__(self, model, dtype: torch.dtype | None = None, mixed: str | None = None):
        self.model = model
        self.dtype = dtype
        on_cuda = any(p.is_cuda for p in model.parameters())
        self.mixed = mixed or ("dense" if on_cuda else "gather")  # how a batch of several adapters is computed
        self.lock = threading.RLock()  # held around each forward and around each change of the stacked tensors
        self._book = threading.Lock()  # slots, in_use, retired, free: quick bookkeeping, never held over a forward
        self.slots: dict[str, int] = {}  # adapter name -> slot
        self.retired: set[int] = set()  # removed, but a running row still uses them
        self.in_use: dict[int, int] = {}  # slot -> running rows
        self._free: list[int] = []
        self._capacity = 1  # slot 0: the bare base
        self._stacks: dict[str, _Stack] = {}
        self._hooks = []
        self._row_slots: torch.Tensor | None = None  # (rows,) slot of each row, on the model's device
        self._one_slot: int | None = BASE_SLOT  # every row on this slot (None: mixed)
        self._modules = dict(model.named_modules())
        self.on_remove: list = []  # callables(name) told when an adapter is removed (the prefix cache drops it)

    # ------------------------------------------------------------ adapters

    @property
    def names(self) -> list[str]:
        """Adapters on the bank."""
        return list(self.slots)

    def load(self, name: str, path: Path | str) -> int:
        """Read the adapter at `path` into a free slot under `name`; its slot. AdapterLoadError if unusable."""
        weights, alpha, rslora = read_lora(path)  # file reading outside the lock: the decode loop keeps running
        return self.put(name, weights, alpha, rslora, where=str(path))

    def put(self, name: str, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float,
            rslora: bool = False, where: str = "adapter", scalings: dict[str, float] | None = None) -> int:
        """Add an adapter given as {module name: (A (r, in), B (out, r))} under `name`; its slot.

        `scalings` (module -> factor on B), when given, replaces alpha / r (e.g. PEFT's own per-layer scaling)."""
        for module in weights:
            if module not in self._modules or not hasattr(self._modules[module], "in_features"):
                raise AdapterLoadError(f"{where}: layer {module} is not a linear layer of this base")
        with self._book:
            slot = self._free.pop() if self._free else self._capacity
            self._capacity = max(self._capacity, slot + 1)
        with self.lock:
            for stack in self._stacks.values():
                stack.grow(self._capacity, 1)
            for module, (a, b) in weights.items():
                rank = a.shape[0]
                scaling = scalings[module] if scalings is not None else alpha / (math.sqrt(rank) if rslora else rank)
                stack = self._stack(module, rank)
                stack.a[slot].zero_()
                stack.b[slot].zero_()
                stack.a[slot, :, :rank] = a.t().to(stack.a.dtype)
                stack.b[slot, :rank, :] = (b.t() * scaling).to(stack.b.dtype)
            for module, stack in self._stacks.items():  # layers this adapter leaves alone
                if module not in weights:
                    stack.a[slot].zero_()
                    stack.b[slot].zero_()
        with self._book:
            self.slots[name] = slot
        return slot

    def remove(self, name: str) -> None:
        """Drop an adapter; its slot is reused once no running row uses it."""
        with self._book:
            slot = self.slots.pop(name, None)
            if slot is None:
                return
            if self.in_use.get(slot):
                self.retired.add(slot)
            else:
                self._free.append(slot)
        for listener in self.on_remove:
            listener(name)

    def slot(self, name: str) -> int:
        """The slot of adapter `name` (BASE_SLOT for the bare base); KeyError if not loaded."""
        from inference.batching import BASE_ADAPTER

        with self._book:
            return BASE_SLOT if name == BASE_ADAPTER else self.slots[name]

    def hold(self, name: str, rows: int) -> int:
        """`rows` new rows will use adapter `name`: its slot, kept until they release it; KeyError if not loaded."""
        from inference.batching import BASE_ADAPTER

        with self._book:
            slot = BASE_SLOT if name == BASE_ADAPTER else self.slots[name]
            self.in_use[slot] = self.in_use.get(slot, 0) + rows
            return slot

    def release(self, slot: int) -> None:
        """A running row stopped using `slot`; a retired slot with no rows left becomes free."""
        with self._book:
            self.in_use[slot] -= 1
            if not self.in_use[slot] and slot in self.retired:
                self.retired.discard(slot)
                self._free.append(slot)

    def _stack(self, module: str, rank: int) -> _Stack:
        stack = self._stacks.get(module)
        if stack is None:
            layer = self._modules[module]
            weight = getattr(layer, "weight", None)
            device = weight.device if weight is not None else "cpu"
            dtype = self.dtype or (weight.dtype if weight is not None and weight.is_floating_point() else torch.float32)
            stack = self._stacks[module] = _Stack(layer.in_features, layer.out_features, self._capacity, rank,
                                                  device, dtype)
            self._hooks.append(layer.register_forward_hook(self._hook(stack)))
        stack.grow(self._capacity, rank)
        return stack

    # ------------------------------------------------------------ forward

    @contextmanager
    def rows(self, slots: list[int]) -> Iterator[None]:
        """Forwards inside this block run row r through adapter slot `slots[r]` (the lock is held)."""
        with self.lock:
            distinct = set(slots)
            self._one_slot = slots[0] if len(distinct) == 1 else None
            device = next(iter(self._stacks.values())).a.device if self._stacks else "cpu"
            self._row_slots = None if self._one_slot is not None else torch.tensor(slots, device=device)
            if self._one_slot is None and self.mixed == "dense":
                used = sorted(distinct - {BASE_SLOT})
                self._used = torch.tensor(used, device=device)  # (U,)
                local = {s: i for i, s in enumerate(used)}
                onehot = torch.zeros(len(slots), len(used), device=device)
                for r, s in enumerate(slots):
                    if s != BASE_SLOT:
                        onehot[r, local[s]] = 1.0
                self._onehot = onehot  # (rows, U): which used adapter each row takes (none: the base)
            try:
                yield
            finally:
                self._row_slots, self._one_slot = None, BASE_SLOT

    def _hook(self, stack: _Stack):
        def add_lora(module, args, output):
            one = self._one_slot
            if one == BASE_SLOT or (one is None and self._row_slots is None):
                return output
            x = args[0]
            if one is not None:  # every row on one adapter: two plain matmuls
                delta = (x.to(stack.a.dtype) @ stack.a[one]) @ stack.b[one]
            elif self.mixed == "dense":  # every used adapter at once, each row masked to its own
                a = stack.a[self._used]  # (U, in, r)
                u, i, r = a.shape
                h = x.to(a.dtype) @ a.permute(1, 0, 2).reshape(i, u * r)  # (rows, T, U*r)
                h = (h.view(*h.shape[:-1], u, r) * self._onehot.to(h.dtype)[:, None, :, None]).view(h.shape)
                delta = h @ stack.b[self._used].reshape(u * r, -1)  # (rows, T, out)
            else:  # gather each row's A and B, batched matmuls; (rows, T, in) -> (rows, T, out)
                idx = self._row_slots
                delta = torch.bmm(torch.bmm(x.to(stack.a.dtype), stack.a[idx]), stack.b[idx])
            return output + delta.to(output.dtype)

        return add_lora

    def close(self) -> None:
        """Take the hooks off the model."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
