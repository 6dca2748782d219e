"""The decode loop on the tiny base: rows join and leave mid-generation, stops on token ids, prefix cache, sampling."""

from __future__ import annotations

import random
import threading

import pytest

from tests.conftest import make_persona_adapters, torch_threads
from tests.test_worker_batching import HIST_LONG, HIST_SHORT, make_backend
from tests.test_worker_batching import make_item as item


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture
def backend(tiny_base, adapters_dir):
    with torch_threads(1):
        backend = make_backend(tiny_base, adapters_dir)
    yield backend
    backend.close()


def test_short_request_joining_mid_generation_finishes_before_long_ones(backend):
    backend.newline_ids, backend.eos_ids = frozenset(), frozenset()  # no stops: rows run to max_new_tokens
    started = threading.Event()
    long_items = [item(backend, p, HIST_LONG, temperature=0, max_new_tokens=120, stream=True)
                  for p in ("alice", "bob", "__base__", "alice")]
    longs = [backend.submit(i, on_partial=lambda rid, text: started.set()) for i in long_items]
    assert started.wait(60), "the long requests never started generating"
    short = item(backend, "bob", HIST_SHORT, temperature=0, max_new_tokens=3)
    result = backend.submit(short).result(timeout=60)
    assert not any(f.done() for f in longs)  # answered while all four long rows still generate
    assert result.new_tokens == 3
    long_results = [f.result(timeout=120) for f in longs]
    assert all(r.new_tokens == 120 for r in long_results)
    # Joining and leaving changed nothing: each equals its request run alone.
    assert result.candidates == backend.generate([short])[0].candidates
    assert long_results[1].candidates == backend.generate([long_items[1]])[0].candidates


def test_samples_rows_and_raw_texts(backend):
    from dataclasses import replace

    one = item(backend, "alice", HIST_SHORT, n=1, temperature=1.2, max_new_tokens=12)
    result = backend.generate([replace(one, samples=4)])[0]
    assert len(result.candidates) == len(result.raw) == 4
    assert backend.stats()["rows_active"] == 0 and backend.tokens_total > 0


def tokens_of(tokenizer, rng) -> list[int]:
    """A random completion-like text's token ids: tags, partial tags, words, emoji and newlines mixed."""
    pieces = [" hi", " ok", "\n", "\n[ALICE] yes", "[ALICE]", "[BOB]", "[AL", "[", "]", "x", " 😂", "\n\n", "END]",
              "\\n", "A", "_"]
    text = "".join(rng.choice(pieces) for _ in range(rng.randint(3, 14)))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("which", ["tiny", "smollm2-135m", "gemma3-270m"])
def test_stop_on_token_ids_equals_the_text_rule(tiny_base, which):
    from pathlib import Path

    from transformers import AutoTokenizer

    from inference.decode import StopScanner, newline_token_ids
    from inference.prompt_format import completion_finished

    path = tiny_base if which == "tiny" else Path(__file__).parents[1] / "models" / which
    for elsewhere in (Path("/work/main/models") / which, Path("/work/models") / which):
        if not path.is_dir():
            path = elsewhere
    if not path.is_dir():
        pytest.skip(f"no {which} tokenizer here")
    tok = AutoTokenizer.from_pretrained(str(path))
    newline = newline_token_ids(tok)

    def decode(ids):
        return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    rng = random.Random(0)
    stops = 0
    for _ in range(300):
        ids = tokens_of(tok, rng)
        scanner = StopScanner(decode, newline, "ALICE")
        for k in range(1, len(ids) + 1):
            expected = completion_finished(decode(ids[:k]), "ALICE")
            assert scanner.feed(ids[:k]) == expected, (decode(ids[:k]), k)
            if expected:
                stops += 1
                break
    assert stops > 50  # the samples exercise both outcomes


def test_prefix_cache_hit_gives_identical_greedy_output(backend):
    history = HIST_LONG + [{"speaker": "Alice", "text": "haha same"}, {"speaker": "riya", "text": "coffee?"}]
    first, second = (item(backend, "alice", h, temperature=0, max_new_tokens=16) for h in (HIST_LONG, history))
    cache, backend.prefix_cache = backend.prefix_cache, None
    without = backend.generate([second])[0]
    backend.prefix_cache = cache
    backend.generate([first])
    saved = backend.prefill_tokens_saved
    with_cache = backend.generate([second])[0]
    assert backend.prefill_tokens_saved - saved >= 20  # the previous turn's prompt was reused
    assert with_cache.candidates == without.candidates


def test_prefix_cache_lru_bound_and_drop():
    import torch

    from inference.prefix_cache import PrefixCache

    def kv(n):  # one layer, (1, heads 2, n tokens, dim 4) float32: 32 bytes per token for keys and values each
        return [(torch.zeros(1, 2, n, 4), torch.zeros(1, 2, n, 4))]

    cache = PrefixCache(max_bytes=64 * 30, min_tokens=2)  # room for 30 tokens
    cache.put("a", list(range(10)), kv(10))
    cache.put("a", [7] * 10, kv(10))
    assert cache.lookup("a", list(range(10)) + [99])[0] == 10  # a hit makes it the most recent
    cache.put("b", [5] * 12, kv(12))  # over the bound: the least recently used ([7]*10) goes
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes
    assert cache.lookup("a", [7] * 11) == (0, None)
    assert cache.lookup("b", list(range(10)) + [1]) == (0, None)  # another adapter's entries never match
    n, got = cache.lookup("a", list(range(5)))
    assert n == 4 and got[0][0].shape[2] == 4  # the last prompt token is always run
    cache.put("a", list(range(12)), kv(12))  # a longer turn of the same chat replaces its older turn
    assert len(cache) == 2
    cache.drop("a")
    assert len(cache) == 1 and cache.lookup("a", list(range(12)))[0] == 0


def test_hot_reload_drops_the_old_versions_cache_entries(tiny_base, tmp_path):
    import shutil

    from inference.adapter_meta import read_adapter_meta
    from inference.adapters import random_adapter
    from inference.versions import set_current

    root = make_persona_adapters(tiny_base, tmp_path / "a")
    backend = make_backend(tiny_base, root)
    try:
        request = item(backend, "alice", HIST_LONG, temperature=0, max_new_tokens=8)
        before = backend.generate([request])[0]
        old = backend.registry.current["alice"].name
        assert any(e.adapter == old for e in backend.prefix_cache._entries.values())
        ref = read_adapter_meta(root / "alice" / "v1").base_model
        random_adapter(tiny_base, root / "alice" / "v2", "Alice", seed=9, me="Riya", base_model=ref)
        set_current(root / "alice", "v2")
        assert backend.registry.reload("alice") == ["alice"]
        assert not any(e.adapter == old for e in backend.prefix_cache._entries.values())
        after = backend.generate([item(backend, "alice", HIST_LONG, temperature=0, max_new_tokens=8)])[0]
        assert after.candidates != before.candidates
        shutil.rmtree(root)
    finally:
        backend.close()


def test_repetition_penalty_and_no_repeat_ngram_match_the_burst_rule(tiny_base, adapters_dir):
    """The decode loop applies inference.repetition's burst-only rule, as simulate and eval do through generate."""
    import torch
    from transformers import LogitsProcessorList

    from inference.engine import encode
    from inference.repetition import BurstRepetition

    backend = make_backend(tiny_base, adapters_dir, repetition_penalty=1.3, no_repeat_ngram_size=3)
    try:
        backend.newline_ids = frozenset()  # no stop at a tag: both run to EOS or 24 tokens
        request = item(backend, "__base__", HIST_LONG, temperature=0, max_new_tokens=24)
        ours = backend.generate([request])[0].raw[0]
        ids = torch.tensor([encode(backend.tokenizer, request.prompt)])
        rule = BurstRepetition(backend.tokenizer, ids.shape[1], penalty=1.3, ngram=3)
        with torch.no_grad():
            theirs = backend.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                            max_new_tokens=24, logits_processor=LogitsProcessorList([rule]),
                                            pad_token_id=backend.tokenizer.pad_token_id)
        text = backend.tokenizer.decode(theirs[0, ids.shape[1]:], skip_special_tokens=True,
                                        clean_up_tokenization_spaces=False)
        from inference.prompt_format import trim_burst

        assert ours == trim_burst(text, request.target)
    finally:
        backend.close()


def test_sampling_is_per_row_and_greedy_rows_exact():
    import torch

    from inference.decode import sample

    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    temperature = torch.tensor([0.0, 1.0, 0.0, 1.0])
    top_p = torch.tensor([1.0, 1e-6, 1.0, 1.0])
    got = sample(logits, temperature, top_p)
    best = logits.argmax(dim=-1)
    assert got[0] == best[0] and got[2] == best[2]
    assert got[1] == best[1]  # top_p tiny: only the most likely token is left
    draws = {int(sample(logits, temperature, top_p)[3]) for _ in range(50)}
    assert len(draws) > 5  # row 3 really samples
