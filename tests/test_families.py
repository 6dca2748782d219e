"""The decode loop on tiny random models of every family users deploy equals transformers' `generate`.

Per family (tests/tiny_families.py: Llama, Llama-3 rope, Qwen2, Qwen3 + YaRN, Mistral and Gemma 3 with windows
shorter than the prompts, multimodal Gemma 3, Phi-3 fused, Phi-3 LongRoPE switching at 40 positions, Llama with
dynamic NTK, GPT-2): greedy token ids, stops off, alone, in a mixed batch of adapters and lengths, joining mid-way,
through the prefix cache and with a repetition penalty, each against `generate` through PEFT; for the windowed,
multimodal and LongRoPE families `generate` is also checked against a full recompute without a KV cache.
"""

from __future__ import annotations

import threading

import pytest

from tests.conftest import torch_threads
from tests.test_worker_batching import make_backend
from tests.tiny_families import FAMILIES, build

# Also checked against a full recompute (where the cache itself is what differs; dynamic NTK is left out: its keys
# keep the frequencies of the length they were computed at, in `generate` too).
RECOMPUTED = ("mistral_window", "gemma3_window", "gemma3_multimodal", "phi3_longrope")
NEW = 16  # new tokens per row
NEW_LONG = 40  # for LongRoPE and dynamic NTK: short prompts cross the switch / the limit while generating
SHORT = [{"speaker": "Riya", "text": "omw"}]
LONG = [{"speaker": "RIYA", "text": "hey are we still going tonight?"},
        {"speaker": "Alice", "text": "yeah! want to meet at 7?"},
        {"speaker": "riya", "text": "sounds perfect"}]


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


class Family:
    """One family's model dir and adapters, its backend (recording each row's token ids) and references."""

    def __init__(self, name: str, root, tokenizer_dir):
        from inference.adapter_meta import base_model_ref
        from inference.adapters import random_adapter
        from inference.versions import set_current

        self.name = name
        self.new = NEW_LONG if name in ("phi3_longrope", "llama_dynamic") else NEW
        self.dir = build(name, tokenizer_dir, root / "model")
        ref = base_model_ref(self.dir)
        random_adapter(self.dir, root / "adapters" / "alice" / "v1", "Alice", seed=1, me="Riya", base_model=ref,
                       b_scale=0.5)
        set_current(root / "adapters" / "alice", "v1")
        random_adapter(self.dir, root / "adapters" / "bob", "Bob", seed=2, me="Riya", base_model=ref, b_scale=0.5)
        self.adapters = root / "adapters"
        self.backend = self.new_backend()
        self._refs: dict = {}
        self._models: dict = {}

    def new_backend(self, **options):
        backend = make_backend(self.dir, self.adapters, **options)
        backend.newline_ids, backend.eos_ids = frozenset(), frozenset()  # stops off: every row runs self.new tokens
        backend.ids = {}  # request id -> generated token ids of its first row
        finish = backend._finish

        def record(job):
            backend.ids[job.item.request.id] = min(job.rows, key=lambda r: r.index).ids
            finish(job)

        backend._finish = record
        return backend

    def item(self, persona: str, history, backend=None, new: int | None = None, **fields):
        from tests.test_worker_batching import make_item

        return make_item(backend or self.backend, persona, history, temperature=0,
                         max_new_tokens=new or self.new, **fields)

    def run(self, items, backend=None):
        backend = backend or self.backend
        backend.generate(items)
        return [backend.ids[i.request.id] for i in items]

    def model(self, persona: str):
        """The base with `persona`'s adapter through PEFT (the bare base for __base__)."""
        if persona not in self._models:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(self.dir))
            if persona != "__base__":
                path = {"alice": self.adapters / "alice" / "v1", "bob": self.adapters / "bob"}[persona]
                model = PeftModel.from_pretrained(model, str(path))
            self._models[persona] = model.eval()
        return self._models[persona]

    def reference(self, persona: str, item, penalty: float = 1.0) -> list[int]:
        """Greedy ids of `generate` through PEFT; without a penalty also checked against a full recompute."""
        import torch
        from transformers import LogitsProcessorList

        from inference.engine import encode
        from inference.repetition import BurstRepetition

        new = item.request.max_new_tokens
        key = (persona, item.prompt, penalty, new)
        if key not in self._refs:
            model = self.model(persona)
            ids = torch.tensor([encode(self.backend.tokenizer, item.prompt)])
            reset_rope(model)
            processors = LogitsProcessorList(
                [BurstRepetition(self.backend.tokenizer, ids.shape[1], penalty=penalty)] if penalty != 1.0 else [])
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=new,
                                     min_new_tokens=0, eos_token_id=None, logits_processor=processors,
                                     pad_token_id=self.backend.tokenizer.pad_token_id)
            got = out[0, ids.shape[1]:].tolist()
            if penalty == 1.0 and self.name in RECOMPUTED:
                assert got == recompute(model, ids[0].tolist(), new), f"{self.name}: generate != recompute"
            self._refs[key] = got
        return self._refs[key]


def reset_rope(model) -> None:
    """Put dynamic NTK rope state back to its start (transformers keeps the largest length seen across calls)."""
    for module in model.modules():
        if getattr(module, "rope_type", None) == "dynamic" and hasattr(module, "original_inv_freq"):
            module.inv_freq = module.original_inv_freq.clone()
            module.max_seq_len_cached = module.original_max_seq_len


def recompute(model, ids: list[int], n: int) -> list[int]:
    """Greedy ids from a forward over the whole sequence at every step: no KV cache at all."""
    import torch

    out = []
    with torch.no_grad():
        for _ in range(n):
            x = torch.tensor([ids + out])
            out.append(int(model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].argmax()))
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, tiny_base, tmp_path_factory):
    with torch_threads(1):
        family = Family(request.param, tmp_path_factory.mktemp(request.param), tiny_base)
    yield family
    family.backend.close()


def test_alone_and_in_a_mixed_batch(fam):
    items = [fam.item("alice", SHORT), fam.item("bob", LONG), fam.item("__base__", SHORT),
             fam.item("alice", LONG * 2), fam.item("bob", SHORT, mode="self")]
    personas = ["alice", "bob", "__base__", "alice", "bob"]
    expected = [fam.reference(p, i) for p, i in zip(personas, items, strict=True)]
    assert fam.run(items[:1]) == expected[:1]  # alone
    assert fam.run(items) == expected  # mixed adapters, short rows beside long ones
    assert len({tuple(e) for e in expected}) == len(expected)  # outputs depend on adapter and context


def test_joining_mid_generation(fam):
    backend = fam.backend
    started = threading.Event()
    long_item = fam.item("bob", LONG * 2, new=NEW_LONG, stream=True)  # still generating when the other joins
    future = backend.submit(long_item, on_partial=lambda rid, text: started.set())
    assert started.wait(60)
    short_item = fam.item("alice", SHORT)
    backend.generate([short_item])
    future.result(timeout=60)
    assert backend.ids[short_item.request.id] == fam.reference("alice", short_item)
    assert backend.ids[long_item.request.id] == fam.reference("bob", long_item)


def test_prefix_cache(fam):
    backend = fam.backend
    more = [{"speaker": "Alice", "text": "haha same"}, {"speaker": "riya", "text": "coffee?"}]
    # Turn 2 starts with turn 1's whole prompt; turn 3 diverges in turn 2's last tokens (Riya writes, not Alice).
    turns = [LONG, LONG + more, LONG + more + [{"speaker": "riya", "text": "did you see the game?"}]]
    backend.prefix_cache._entries.clear()
    saved = []
    for history in turns:
        item = fam.item("alice", history)
        before = backend.prefill_tokens_saved
        assert fam.run([item])[0] == fam.reference("alice", item), history
        saved.append(backend.prefill_tokens_saved - before)
    if fam.name == "phi3_longrope":
        assert saved[1] == 0 < saved[2]  # short-factor keys are not reused for a prompt past the switch
    elif fam.name == "llama_dynamic":
        assert saved[1] == saved[2] == 0  # every length past the limit has its own frequencies
    else:
        assert saved[1] > 20 and saved[2] > 40  # sliding windows: entries keep a margin past the window


def test_repetition_penalty(fam):
    backend = fam.new_backend(repetition_penalty=1.3)
    try:
        items = [fam.item("alice", LONG, backend=backend), fam.item("bob", SHORT, backend=backend)]
        got = fam.run(items, backend=backend)
        assert got == [fam.reference("alice", items[0], 1.3), fam.reference("bob", items[1], 1.3)]
    finally:
        backend.close()


def test_gpt2_adapters_are_conv1d_fan_in_fan_out(fam):
    """GPT-2's adapters (PEFT on Conv1D sets fan_in_fan_out) are served, not refused (the tests above use them)."""
    import json

    config = json.loads((fam.adapters / "bob" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (fam.name == "gpt2")
    if fam.name == "gemma3_multimodal":  # LoRA on the language model only: nothing on the vision tower
        from inference.lora_batch import read_lora

        modules = read_lora(fam.adapters / "bob")[0]
        assert modules and all("language_model" in m for m in modules)


def test_prompts_past_learned_positions_are_cut(fam):
    """GPT-2's learned positions end at n_positions: a longer prompt is cut from the oldest end so prompt and new
    tokens fit (as `generate` on the cut prompt gives), instead of an index error mid-batch. Rope families have no
    such end: their long prompts are served whole (the test above with LONG * 2)."""
    import torch

    from inference import architectures as arch
    from inference.engine import encode

    limit = arch.position_limit(fam.backend.model.config)
    if fam.name != "gpt2":
        assert limit is None
        return
    assert limit == 512
    history = [{"speaker": ("RIYA", "Alice")[i % 2],
                "text": f"message {i} about the plans for tonight and the rest of this long week"} for i in range(60)]
    item = fam.item("alice", history, new=8)
    full = encode(fam.backend.tokenizer, item.prompt)
    assert len(full) > limit
    ids = torch.tensor([full[-(limit - 8):]])
    with torch.no_grad():
        ref = fam.model("alice").generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=8, min_new_tokens=0, eos_token_id=None,
                                          pad_token_id=fam.backend.tokenizer.pad_token_id)
    got = fam.run([item, fam.item("bob", SHORT, new=8)])
    assert got[0] == ref[0, ids.shape[1]:].tolist()  # a long row beside a short one of another adapter
    # the most new tokens the protocol allows: the prompt keeps limit - 256 tokens, the row runs to the last position
    assert len(fam.run([fam.item("alice", history, new=256)])[0]) == 256


def test_unsupported_rope_type_refused_at_load_and_before_training(tiny_base, tmp_path):
    import json
    import shutil

    from errors import ConvoError, TrainError
    from inference.architectures import servable_reason
    from inference.decode import DecodeBackend
    from inference.engine import load_base
    from inference.lora_batch import LoraBank
    from training.train import check_servable_base

    base = build("llama", tiny_base, tmp_path / "llama")
    model, tokenizer, _ = load_base(base)
    model.config.rope_parameters = {**model.config.rope_parameters, "rope_type": "proportional"}
    with pytest.raises(ConvoError) as refused:
        DecodeBackend(model, tokenizer, LoraBank(model), "cpu")
    assert "rope type 'proportional'" in str(refused.value) and "\n" not in str(refused.value)
    odd = tmp_path / "odd"
    shutil.copytree(base, odd)
    config = json.loads((odd / "config.json").read_text())
    config["layer_types"] = ["chunked_attention", "full_attention"]
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(TrainError, match="cannot serve adapters of this base: attention layers of kind chunked"):
        check_servable_base(str(odd))
    check_servable_base(str(base))  # a served architecture passes
    assert servable_reason(model.config.__class__(layer_types=["sliding_attention"] * 2, num_hidden_layers=2)) is None


def test_training_samples_cut_to_max_length(tiny_base):
    from transformers import AutoTokenizer

    from inference.engine import encode
    from training.train import fit_prompt

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    prompt = "\n".join(f"[RIYA] message number {i} is here" for i in range(40)) + "\n[ALICE]"
    cut = fit_prompt(tok, prompt, 50)
    assert len(encode(tok, cut)) <= 50 < len(encode(tok, prompt))
    assert prompt.endswith(cut) and cut.endswith("\n[ALICE]")  # the oldest lines go, the turn to write stays


def test_prefix_entry_of_a_sliding_layer_serves_only_prefixes_within_its_margin():
    import torch

    from inference.prefix_cache import PrefixCache

    cache = PrefixCache(max_bytes=2**20, min_tokens=2)
    # Layer 0 full (20 tokens), layer 1 sliding: the last 10 kept (tokens 10..19), min_reuse 16.
    kv = [(torch.arange(20.0).view(1, 1, 20, 1),) * 2, (torch.arange(10.0, 20.0).view(1, 1, 10, 1),) * 2]
    cache.put("a", list(range(20)), kv, min_reuse=16)
    assert cache.lookup("a", list(range(15)) + [99])[0] == 0  # shares 15 < 16: the window's keys are gone
    n, got = cache.lookup("a", list(range(17)) + [99])
    assert n == 17 and got[0][0].shape[2] == 17
    assert got[1][0].flatten().tolist() == [10.0 + i for i in range(7)]  # tokens 10..16: the newest dropped
    assert cache.lookup("a", list(range(30)), regime="long")[0] == 0  # another rope regime never matches
