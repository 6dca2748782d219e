"""The candidate step over real backends: PEFT on the tiny base (score, repetition, re-sampling) and the worker path."""

from __future__ import annotations

import pytest

from inference.batching import BatchItem, BatchResult, CandidateBackend, EchoBackend, build_prompt
from inference.candidates import normalise
from inference.protocol import GenerateRequest
from tests.conftest import make_persona_adapters, torch_threads
from tests.test_worker import ask_many, make_worker, running

HIST = [{"speaker": "RIYA", "text": "hey are we still going tonight?"},
        {"speaker": "Alice", "text": "yeah! want to meet at 7?"},
        {"speaker": "riya", "text": "sounds perfect"}]


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def adapters_dir(tiny_base, tmp_path_factory):
    return make_persona_adapters(tiny_base, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def peft(tiny_base, adapters_dir):
    """The worker's decode backend (stacked LoRA adapters) on the tiny base, with its registry."""
    from tests.test_worker_batching import make_backend

    with torch_threads(1):
        backend = make_backend(tiny_base, adapters_dir)
    yield backend
    backend.close()


def _item(backend, persona, history=HIST, **fields) -> BatchItem:
    request = GenerateRequest.build(persona=persona, history=history, **fields)
    loaded = backend.registry.acquire(persona)
    prompt, target = build_prompt(request, loaded.info.meta)
    return BatchItem(request, prompt, target, loaded.name)


def _assert_clean(candidates, target):
    keys = [normalise("\n".join(c)) for c in candidates]
    assert len(set(keys)) == len(keys), candidates  # no two identical candidates
    for c in candidates:
        assert c and all(m.strip() for m in c), candidates  # never an empty candidate or message
        assert not any("[" in m and "]" in m and m[m.index("[") + 1 : m.index("]")].isupper() for m in c)
        assert len({normalise(m) for m in c}) == len(c), c  # no repeated line in a burst


def test_score_equals_the_engines_adapter_and_base_likelihoods(peft, tiny_base, adapters_dir):
    from inference.engine import Engine

    item = _item(peft, "alice")
    completions = [" ok see you there", " yes\n[ALICE] at 7"]
    got = peft.score([(item, c) for c in completions])
    engine = Engine.load(base=str(tiny_base), adapter=adapters_dir / "alice" / "v1", device="cpu")
    want = engine.score([(item.prompt, c) for c in completions])
    for (a, b, n), (wa, wb, wn) in zip(got, want, strict=True):
        assert n == wn > 0
        assert a == pytest.approx(wa, abs=1e-4) and b == pytest.approx(wb, abs=1e-4)
    assert any(abs(a - b) > 1e-3 for a, b, _ in got)  # the adapter changes the likelihood


def test_samples_rows_and_raw_text(peft):
    item = _item(peft, "alice", n=1, temperature=1.0, max_new_tokens=12)
    [result] = peft.generate([BatchItem(item.request, item.prompt, item.target, item.adapter, samples=4)])
    assert len(result.candidates) == len(result.raw) == 4
    from inference.prompt_format import split_completion

    assert [split_completion(r, item.target) for r in result.raw] == result.candidates


def test_repetition_control_counts_only_the_burst_and_never_its_tags(peft):
    import torch

    from inference.repetition import BurstRepetition, exempt_ids

    tok = peft.tokenizer
    ex = exempt_ids(tok)
    nl, bracket = tok("\n", add_special_tokens=False)["input_ids"][0], tok("[", add_special_tokens=False)["input_ids"][0]
    words = [i for i in range(len(tok)) if not ex[i]][50:53]
    x, y, z = words
    assert ex[nl] and ex[bracket] and not ex[x]
    prompt = [y, z, nl, bracket]  # the prompt's tokens never count
    rows = torch.tensor([prompt + [x, y, nl, x]])
    scores = torch.ones((1, len(tok)))
    out = BurstRepetition(tok, len(prompt), penalty=2.0, ngram=2)(rows, scores.clone())
    assert out[0, y] == float("-inf")  # (x, y) was generated: y after x is banned
    assert out[0, x] == 0.5 and out[0, z] == 1.0  # x generated: penalised; z only in the prompt: untouched
    assert out[0, nl] == 1.0 and out[0, bracket] == 1.0  # newlines and tags may always repeat
    assert not BurstRepetition(tok, 0).active()


def test_candidate_backend_gives_n_clean_distinct_candidates(peft):
    backend = CandidateBackend(peft, rerank_k=0, max_resample_rounds=3)
    items = [_item(peft, "alice", n=3, temperature=1.0, max_new_tokens=16),
             _item(peft, "bob", n=2, temperature=1.0, max_new_tokens=16),
             _item(peft, "alice", n=1, temperature=0, max_new_tokens=16)]
    results = backend.generate(items)
    for item, result in zip(items, results, strict=True):
        assert 1 <= len(result.candidates) <= item.request.n
        _assert_clean(result.candidates, item.target)
    assert [len(r.candidates) for r in results[:2]] == [3, 2]
    # The greedy request keeps its greedy completion first when it is usable.
    from inference.candidates import clean

    greedy = peft.generate([items[2]])[0].raw[0]
    if clean(greedy, items[2].target):
        assert results[2].candidates[0] == clean(greedy, items[2].target)
    assert all(o.rounds <= 4 for o in backend.last)


def test_candidate_backend_reranks_by_the_adapters_likelihood_ratio(peft):
    backend = CandidateBackend(peft, rerank_k=6, max_resample_rounds=0)
    item = _item(peft, "alice", n=2, temperature=1.2, max_new_tokens=12)
    [result] = backend.generate([item])
    [outcome] = backend.last
    assert outcome.samples == 6 and outcome.scored >= len(result.candidates)
    from inference.candidates import clean, completion_text, distinct, rerank_score

    pool = distinct([clean(r, item.target) for r in outcome.raw], 6)
    scores = {repr(c): rerank_score(*s) for c, s in zip(
        pool, peft.score([(item, completion_text(c, item.target)) for c in pool]), strict=True)}
    best = sorted(scores.values(), reverse=True)[: len(result.candidates)]
    assert [scores[repr(c)] for c in result.candidates] == pytest.approx(best)


class DirtyBackend(EchoBackend):
    """A model stand-in whose rows are the broken samples seen on the real base, then usable ones."""

    ROWS = ["", " [ALICE]", " I'm free tomorrow.\n[ALICE] I'm free tomorrow.", " sure [RIYA] cool",
            " How can I assist you today?", " lol yes", " omw"]

    def __init__(self):
        super().__init__()
        self.drawn = 0

    def generate(self, items, on_partial=None):
        out = []
        for item in items:
            raws = [self.ROWS[(self.drawn + k) % len(self.ROWS)] for k in range(item.samples)]
            self.drawn += item.samples
            out.append(BatchResult([[r] for r in raws], item.samples, raw=raws))
        return out


def test_worker_serves_cleaned_candidates(redis_url):
    backend = CandidateBackend(DirtyBackend(), max_resample_rounds=3)
    worker = make_worker(redis_url, backend)
    requests = [GenerateRequest.build(persona="__base__", history=[{"speaker": "Riya", "text": "free?"}], n=3)]
    with running(worker):
        [response] = ask_many(redis_url, requests)
    assert response.ok
    assert response.candidates == [["I'm free tomorrow."], ["sure"], ["lol yes"]]


def test_simulate_serves_clean_distinct_reranked_candidates(tiny_base, adapters_dir):
    from inference.engine import Engine, SimulateOptions, parse_conversation, simulate

    engine = Engine.load(base=str(tiny_base), adapter=adapters_dir / "alice" / "v1", device="cpu")
    turns = parse_conversation("[RIYA] hey are we still going tonight?", "RIYA")
    opts = SimulateOptions(n=3, temperature=1.0, max_new_tokens=12, seed=3, rerank_k=6, max_resample_rounds=2)
    candidates = simulate(engine, turns, "ALICE", opts)
    assert len(candidates) == 3
    _assert_clean(candidates, "ALICE")
    outcome = engine.sample("[RIYA] hey are we still going tonight?\n[ALICE]", "ALICE", opts)
    assert outcome.candidates == candidates and outcome.samples >= 6 and outcome.scored >= 3  # seeded: same draw
    greedy = simulate(engine, turns, "ALICE", SimulateOptions(n=2, temperature=0, max_new_tokens=12, seed=3))
    from inference.candidates import clean

    raw = engine.generate_raw("[RIYA] hey are we still going tonight?\n[ALICE]", "ALICE", n=1, temperature=0,
                              max_new_tokens=12)[0]
    assert len(greedy) == 2 and (greedy[0] == clean(raw, "ALICE") or not clean(raw, "ALICE"))


def test_each_redraw_round_of_a_seeded_item_draws_from_a_new_stream():
    """A seeded item (simulate, eval) re-drawn with its first seed would repeat the same duplicates every round."""
    seen = []

    class SameReply:  # the inner backend answers every row alike, so every round is short of distinct candidates
        blocking = False

        def generate(self, items, on_partial=None):
            seen.append([item.seed for item in items])
            return [BatchResult([["same"]] * i.samples, i.samples, 1, [" same"] * i.samples) for i in items]

        def score(self, pairs):
            return [(0.0, 0.0, 1) for _ in pairs]

    request = GenerateRequest.build(persona="a", history=[{"speaker": "B", "text": "hi"}], n=3, temperature=1.0)
    step = CandidateBackend(SameReply(), max_resample_rounds=2)
    [result] = step.generate([BatchItem(request, "[B] hi\n[A]", "A", "__base__", seed=5)])
    assert seen == [[5], [5 + 7919], [5 + 2 * 7919]] and result.candidates == [["same"]]
    seen.clear()
    step.generate([BatchItem(request, "[B] hi\n[A]", "A", "__base__")])
    assert seen == [[None]] * 3  # queue requests carry no seed: the global stream, as before
