"""Batched mixed-adapter generation on the tiny base: a row in a mixed batch equals the same request run alone."""

from __future__ import annotations

import pytest

from inference.protocol import GenerateRequest
from tests.conftest import torch_threads


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def make_backend(base, adapters_dir, quantize="none", **options):
    """A DecodeBackend on `base` with its registry (as backend.registry) over `adapters_dir`."""
    from inference.adapters import AdapterRegistry
    from inference.decode import load_backend

    backend = load_backend(base, quantize=quantize, device="cpu", partial_interval_ms=0, **options)
    backend.registry = AdapterRegistry(backend.bank, adapters_dir, base, max_loaded=4)
    backend.registry.scan()
    return backend


@pytest.fixture(scope="module")
def backend(tiny_base, adapters_dir):
    with torch_threads(1):
        backend = make_backend(tiny_base, adapters_dir)
    yield backend
    backend.close()


def make_item(backend, persona, history, **fields):
    from inference.adapters import BASE_ADAPTER
    from inference.batching import BatchItem, build_prompt

    request = GenerateRequest.build(persona=persona, history=history, **fields)
    if persona == "__base__":
        adapter, meta = BASE_ADAPTER, None
    else:
        loaded = backend.registry.acquire(persona)
        adapter, meta = loaded.name, loaded.info.meta
    prompt, target = build_prompt(request, meta)
    return BatchItem(request, prompt, target, adapter)


HIST_SHORT = [{"speaker": "Riya", "text": "omw"}]
HIST_LONG = [{"speaker": "RIYA", "text": "hey are we still going tonight?"},
             {"speaker": "Alice", "text": "yeah! want to meet at 7?"},
             {"speaker": "riya", "text": "sounds perfect"}]


def test_mixed_batch_row_equals_the_request_alone(backend):
    greedy = dict(temperature=0, max_new_tokens=24)
    items = [
        make_item(backend, "alice", HIST_LONG, **greedy),
        make_item(backend, "bob", HIST_SHORT, **greedy),
        make_item(backend, "__base__", HIST_SHORT, **greedy),
        make_item(backend, "alice", HIST_SHORT, **greedy),
        make_item(backend, "bob", HIST_LONG, mode="self", **greedy),
    ]
    batched = backend.generate(items)
    alone = [backend.generate([item])[0] for item in items]
    assert [r.candidates for r in batched] == [r.candidates for r in alone]
    assert all(r.new_tokens > 0 for r in batched)
    # Each persona's own adapter answered: same history, three different models, three different outputs.
    same_history = [batched[1].candidates, batched[2].candidates, batched[3].candidates]
    assert len({repr(c) for c in same_history}) == 3, same_history


def test_n_candidates_and_per_row_sampling(backend):
    items = [
        make_item(backend, "alice", HIST_SHORT, n=3, temperature=1.5, top_p=1.0, max_new_tokens=16),
        make_item(backend, "bob", HIST_SHORT, n=1, temperature=0, max_new_tokens=16),
    ]
    results = backend.generate(items)
    assert len(results[0].candidates) == 3 and len(results[1].candidates) == 1
    # The greedy row is unaffected by sampling rows beside it.
    assert results[1].candidates == backend.generate([items[1]])[0].candidates


def test_partials_are_prefixes_of_the_final_text(backend):
    from inference.batching import final_text

    got: list[tuple[str, str]] = []
    item = make_item(backend, "alice", HIST_LONG, temperature=1.0, max_new_tokens=48, stream=True)
    other = make_item(backend, "bob", HIST_SHORT, temperature=1.0, max_new_tokens=48, stream=False)
    results = backend.generate([item, other], on_partial=lambda rid, text: got.append((rid, text)))
    final = final_text(results[0].candidates[0])
    assert got and {rid for rid, _ in got} == {item.request.id}  # only the stream request gets partials
    texts = [t for _, t in got]
    for a, b in zip(texts, texts[1:], strict=False):
        assert b.startswith(a)
    assert all(final.startswith(t) for t in texts), (texts, final)


def test_build_prompt_maps_names_to_tags():
    from inference.adapter_meta import AdapterMeta, BaseModelRef, Speaker
    from inference.batching import PromptError, build_prompt

    meta = AdapterMeta(persona=Speaker(name="Alice Smith", speaker_id="u1", tag="ALICE"),
                       me=Speaker(name="Riya", tag="RIYA"), base_model=BaseModelRef(id="x"), format_version=1)
    history = [{"speaker": "riya", "text": "you coming?"}, {"speaker": "Alice Smith", "text": "yes\nomw"},
               {"speaker": "u1", "text": "5 min"}, {"speaker": "Zoë", "text": "me too"}, {"speaker": "me", "text": "ok"}]
    prompt, target = build_prompt(GenerateRequest.build(persona="alice", history=history), meta)
    assert target == "ALICE"
    assert prompt == "[RIYA] you coming?\n[ALICE] yes\\nomw\n[ALICE] 5 min\n[ZOE] me too\n[RIYA] ok\n[ALICE]"
    _, target = build_prompt(GenerateRequest.build(persona="alice", mode="self", history=history), meta)
    assert target == "RIYA"
    no_me = meta.model_copy(update={"me": None})
    with pytest.raises(PromptError, match="mode self"):
        build_prompt(GenerateRequest.build(persona="alice", mode="self"), no_me)


def test_partial_text_holds_back_unfinished_pieces():
    from inference.batching import partial_text

    assert partial_text(" hi\n[ALICE] there", "ALICE") == "hi\nthere"
    assert partial_text(" hi\n[ALI", "ALICE") == "hi"
    assert partial_text(" a\\", "ALICE") == "a"  # half an escape
    assert partial_text(" ok \ufffd", "ALICE") == "ok"  # half a UTF-8 sequence


@pytest.fixture(scope="module")
def base_192(tmp_path_factory):
    """A tiny base whose linear widths are multiples of bitsandbytes' 64-value block (hidden 192, MLP 512)."""
    import random

    from tests.conftest import _TINY_LINES
    from training.tiny_base import build_tiny_base, render_conversation

    rng = random.Random(0)
    texts = [render_conversation([(str(i % 2), rng.choice(_TINY_LINES)) for i in range(rng.randint(2, 6))], rng)
             for _ in range(100)]
    out = tmp_path_factory.mktemp("base192") / "model"
    with torch_threads(1):
        build_tiny_base(out, texts, vocab_size=300, hidden_size=192, num_layers=2, num_heads=2, max_steps=5,
                        max_minutes=1.0, seed=0, seq_len=32, batch_size=4)
    return out


@pytest.mark.slow
def test_4bit_quantized_base_serves_mixed_adapters(base_192, tmp_path):
    """--quantize 4bit on the CPU: NF4 linear layers, per-row adapters, batch rows equal to rows run alone."""
    import bitsandbytes as bnb

    from inference.adapter_meta import base_model_ref
    from inference.adapters import random_adapter

    ref = base_model_ref(base_192)
    random_adapter(base_192, tmp_path / "alice", "Alice", seed=1, me="Riya", base_model=ref)
    random_adapter(base_192, tmp_path / "bob", "Bob", seed=2, me="Riya", base_model=ref)
    backend = make_backend(base_192, tmp_path, quantize="4bit")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in backend.model.modules())
    greedy = dict(temperature=0, max_new_tokens=12)
    items = [make_item(backend, "alice", HIST_LONG, **greedy), make_item(backend, "bob", HIST_SHORT, **greedy),
             make_item(backend, "__base__", HIST_SHORT, **greedy), make_item(backend, "alice", HIST_SHORT, **greedy)]
    batched = backend.generate(items)
    assert [r.candidates for r in batched] == [backend.generate([i])[0].candidates for i in items]
    assert len({repr(r.candidates) for r in batched[1:]}) == 3


def test_registry_lru_disk_watch_and_rejections(tiny_base, tmp_path):
    import json

    from inference.adapter_meta import base_model_ref
    from inference.adapters import AdapterRegistry, UnknownPersona, random_adapter
    from inference.engine import load_base
    from inference.lora_batch import LoraBank
    from inference.versions import set_current

    ref = base_model_ref(tiny_base)
    random_adapter(tiny_base, tmp_path / "alice" / "v1", "Alice", seed=1, base_model=ref)
    set_current(tmp_path / "alice", "v1")
    random_adapter(tiny_base, tmp_path / "bob", "Bob", seed=2, base_model=ref)
    random_adapter(tiny_base, tmp_path / "old", "Old", seed=3, base_model=ref)
    meta_path = tmp_path / "old" / "convo_adapter.json"
    meta_path.write_text(json.dumps(dict(json.loads(meta_path.read_text()), format_version=0)))
    model, _, _ = load_base(tiny_base, "none", "cpu")
    registry = AdapterRegistry(LoraBank(model), tmp_path, tiny_base, max_loaded=1)
    registry.scan()
    assert sorted(registry.available) == ["alice", "bob"] and "prompt format v0" in registry.rejected["old"]
    with pytest.raises(UnknownPersona, match="prompt format v0"):
        registry.acquire("old")
    with pytest.raises(UnknownPersona, match="no adapter dir"):
        registry.acquire("zed")
    registry.acquire("alice")
    registry.acquire("bob")  # max_loaded=1: alice is evicted
    assert registry.loaded_names == ["bob@-"] and registry.bank.names == [registry.current["bob"].name]
    # A batch using more personas than max_loaded keeps every one of them.
    first = registry.acquire("alice")
    registry.acquire("bob", pinned={first.name})
    assert sorted(registry.loaded_names) == ["alice@v1", "bob@-"]
    # A new `current` on disk is noticed and loaded beside, then the old version is dropped.
    random_adapter(tiny_base, tmp_path / "alice" / "v2", "Alice", seed=4, base_model=ref)
    set_current(tmp_path / "alice", "v2")
    assert registry.changed_on_disk() == ["alice"]
    assert registry.reload("alice") == ["alice"]
    assert "alice@v2" in registry.loaded_names and "alice@v1" not in registry.loaded_names
    assert registry.changed_on_disk() == []


def test_batched_lora_equals_peft_for_each_adapter(backend, tiny_base, adapters_dir):
    """Stacked adapters in one mixed forward give PEFT's logits for every row; greedy drafts equal PEFT's."""
    import warnings

    import torch
    from peft import PeftModel

    from inference.engine import Engine, encode, load_base

    items = [make_item(backend, p, HIST_LONG) for p in ("alice", "bob", "__base__")]
    ids = torch.tensor([encode(backend.tokenizer, items[0].prompt)] * 3)
    slots = [backend.bank.slot(i.adapter) for i in items]
    mixed = {}
    for mode in ("gather", "dense"):  # the CPU's and the GPU's way of mixing adapters in one forward
        backend.bank.mixed = mode
        with torch.no_grad(), backend.bank.rows(slots):
            mixed[mode] = backend.model(input_ids=ids).logits
    backend.bank.mixed = "gather"
    for row, path in ((0, adapters_dir / "alice" / "v1"), (1, adapters_dir / "bob"), (2, None)):
        model, tokenizer, _ = load_base(tiny_base, "none", "cpu")
        if path is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = PeftModel.from_pretrained(model, str(path)).eval()
        with torch.no_grad():
            theirs = model(input_ids=ids[:1]).logits[0]
        for ours in mixed.values():
            torch.testing.assert_close(ours[row], theirs, atol=1e-5, rtol=1e-5)
        engine = Engine(model, tokenizer)
        greedy = engine.generate(items[row].prompt, items[row].target, n=1, temperature=0, max_new_tokens=24)
        mine = backend.generate([make_item(backend, ["alice", "bob", "__base__"][row], HIST_LONG, temperature=0,
                                       max_new_tokens=24)])[0]
        assert mine.candidates == greedy


def test_score_gives_adapter_and_base_log_probs(backend, tiny_base, adapters_dir):
    import warnings

    from peft import PeftModel

    from inference.engine import Engine, load_base

    pairs = [(make_item(backend, "alice", HIST_LONG), " yeah see you\n[RIYA]"),
             (make_item(backend, "bob", HIST_SHORT), " ok")]
    scores = backend.score(pairs)
    model, tokenizer, _ = load_base(tiny_base, "none", "cpu")
    base_nll = Engine(model, tokenizer).completion_nll([(i.prompt, c) for i, c in pairs])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alice = Engine(PeftModel.from_pretrained(model, str(adapters_dir / "alice" / "v1")).eval(), tokenizer)
    alice_nll = alice.completion_nll([(pairs[0][0].prompt, pairs[0][1])])[0]
    assert [s[2] for s in scores] == [n for _, n in base_nll]
    for (_, base_lp, _), (nll, _) in zip(scores, base_nll, strict=True):
        assert abs(base_lp + nll) < 1e-3
    assert abs(scores[0][0] + alice_nll[0]) < 1e-3 and abs(scores[0][0] - scores[0][1]) > 1e-3
