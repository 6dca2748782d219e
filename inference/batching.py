"""Requests in, responses and live partial text out: the one seam between the queue and the model.

The worker turns each request into a `BatchItem` (prompt, target tag, adapter name, rows to sample) and never
touches tensors. A backend answers items in one of two ways:

* `submit(item, on_partial) -> Future[BatchResult]` (a continuously batching backend): the item joins the running
  batch at the next decode step and its Future resolves as soon as its own rows stop, so the worker replies to
  each request on its own; `generate(items)` submits all and waits (simulate, eval, tests);
* `generate(items, on_partial) -> list[BatchResult]` only (EchoBackend): the whole batch in one call.

`DecodeBackend` (inference/decode.py) is the model backend: each request becomes `samples` rows (default `n`),
each row through its own LoRA adapter (`__base__`: the bare base), with its own temperature/top-p (temperature 0
is greedy), stopping at the first line tagged by anyone but its target, so a greedy row's output equals the same
request run alone. While generating, candidate 1 of each `stream` request is handed to `on_partial` at most every
`partial_interval_ms` (called from the generating thread). `score(pairs)` gives the log-probability of given
completions under an item's adapter and under the bare base.

A vLLM multi-LoRA backend would implement the same methods for large deployments. This module is import-light
(no torch).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from inference.adapter_meta import AdapterMeta
from inference.prompt_format import (
    ROLE_FRIEND,
    ROLE_ME,
    PromptFormatError,
    Turn,
    check_tag,
    escape_text,
    make_tag,
    render_prompt,
    split_completion,
    trim_burst,
)
from inference.protocol import GenerateRequest

PartialSink = Callable[[str, str], None]  # (request id, text of candidate 1 so far)
BASE_ADAPTER = "__base__"  # the adapter name of "no adapter on this row"


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One request ready for the model: its prompt (ending in `[TARGET]`), target tag and adapter name."""

    request: GenerateRequest
    prompt: str
    target: str
    adapter: str  # the loaded adapter's name, or "__base__" for the bare base
    samples: int = 0  # rows to sample for the item; 0 means request.n
    seed: int | None = None  # sampled rows draw from their own stream seeded so (simulate, eval); None: global RNG

    def __post_init__(self):
        if self.samples <= 0:
            object.__setattr__(self, "samples", self.request.n)


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What one item got: a candidate per row (each a list of messages), the tokens generated for them, the
    prompt's length in tokens (counted once per request) and each row's raw completion (trimmed at the end of the
    burst) for inference.candidates to clean, and (from the decode loop) each row's generated token ids."""

    candidates: list[list[str]]
    new_tokens: int
    prompt_tokens: int = 0
    raw: list[str] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)  # each row's generated ids (the decode loop; tests)


class Backend(Protocol):
    """What the worker needs from a model: a batch of items in, one result per item out (same order).

    `blocking` tells the worker to call `generate` in a thread (a model) or inline (no real work). A backend that
    also has `submit` (see ContinuousBackend) is fed request by request instead.
    """

    blocking: bool

    def generate(self, items: Sequence[BatchItem], on_partial: PartialSink | None = None) -> list[BatchResult]:
        """Generate for every item in one go (`item.samples` rows each); `on_partial(id, text)` gets live text."""
        ...

    def score(self, pairs: Sequence[tuple[BatchItem, str]]) -> list[tuple[float, float, int]]:
        """Per (item, completion text): summed log-prob of the completion under the item's adapter, under the bare
        base, and its token count (one batched forward pass)."""
        ...


class ContinuousBackend(Backend, Protocol):
    """A backend that batches continuously: items join between decode steps, each resolves on its own."""

    def submit(self, item: BatchItem, on_partial: PartialSink | None = None) -> Future:
        """Queue one item; the Future gets its BatchResult as soon as its rows stop."""
        ...

    def score(self, pairs: Sequence[tuple[BatchItem, str]]) -> list[tuple[float, float, int]]:
        """Per (item, completion): (summed log-prob under the item's adapter, under the bare base, token count)."""
        ...

    def stats(self) -> dict:
        """Rows running, row capacity, recent tokens/s, prompt tokens run and cached (for the heartbeat)."""
        ...


class PromptError(ValueError):
    """A request that cannot become a prompt for this adapter (e.g. `self` mode without a known owner)."""


def speaker_tags(meta: AdapterMeta | None) -> dict[str, str]:
    """Lower-cased names, speaker ids and tags the adapter knows -> their prompt tag."""
    if meta is None:
        return {}
    known: dict[str, str] = {}
    people = [meta.persona, *([meta.me] if meta.me else [])]
    for person in people:
        for key in (person.name, person.speaker_id, person.tag):
            if key:
                known.setdefault(key.lower(), person.tag)
    for speaker_id, tag in meta.tags.items():
        known.setdefault(speaker_id.lower(), tag)
        known.setdefault(tag.lower(), tag)
    # Role words: "me" is the owner, "friend" the persona, unless the adapter uses them as real tags.
    if meta.me is not None:
        known.setdefault(ROLE_ME.lower(), meta.me.tag)
    known.setdefault(ROLE_FRIEND.lower(), meta.persona.tag)
    return known


def build_prompt(request: GenerateRequest, meta: AdapterMeta | None) -> tuple[str, str]:
    """(prompt, target tag) for a request: history speakers mapped to tags, ending with the target's tag.

    `friend` writes as the persona, `self` as the owner (the adapter's `me`). A speaker the adapter does not know
    keeps its own tag, or gets one made from its name. With no adapter (bare base) the roles are FRIEND and ME.
    """
    known = speaker_tags(meta)
    if meta is None:
        target = ROLE_FRIEND if request.mode == "friend" else ROLE_ME
    elif request.mode == "friend":
        target = meta.persona.tag
    elif meta.me is not None:
        target = meta.me.tag
    else:
        raise PromptError(f"mode self: the adapter of {request.persona!r} does not record the owner (`me`)")
    turns = []
    for message in request.history:
        tag = known.get(message.speaker.lower())
        if tag is None:
            try:
                tag = check_tag(message.speaker)
            except PromptFormatError:
                tag = make_tag(message.speaker)
        turns.append(Turn(tag, message.text))
    return render_prompt(turns, target), target


def partial_text(raw: str, target: str) -> str:
    """Live text of a completion still being generated: its messages so far, one per line.

    Holds back what a later token could still change (a half-written escape or UTF-8 sequence), so each partial is
    a prefix of the next and of the final text.
    """
    text = trim_burst(raw, target)
    text = text.rstrip("\ufffd")
    tail = text.rfind("\\")
    if tail != -1 and len(text) - tail <= 6 and text[tail + 1 : tail + 2] in ("", "u"):
        text = text[:tail]
    return "\n".join(split_completion(text, target))



def final_text(candidate: Sequence[str]) -> str:
    """The text of a finished candidate as partials show it (messages one per line)."""
    return "\n".join(candidate)


class EchoBackend:
    """No model: answers every request with its last message's text (queue benchmarks and tests of the loop)."""

    blocking = False

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.blocking = delay_s > 0

    def generate(self, items: Sequence[BatchItem], on_partial: PartialSink | None = None) -> list[BatchResult]:
        """Echo the last history message (or "...") once per row."""
        if self.delay_s:  # with a delay it stands in for a model: the worker must run it in a thread
            time.sleep(self.delay_s)  # stands in for model time; not synchronisation
        out = []
        for item in items:
            last = item.request.history[-1].text if item.request.history else "..."
            if item.request.stream and on_partial is not None:
                on_partial(item.request.id, last[: max(1, len(last) // 2)])
            # Whitespace-separated words stand in for tokens: there is no tokenizer here.
            out.append(BatchResult([[last]] * item.samples, item.samples, len(item.prompt.split()),
                                   [" " + escape_text(last)] * item.samples))
        return out

    def score(self, pairs: Sequence[tuple[BatchItem, str]]) -> list[tuple[float, float, int]]:
        """No model: every completion scores zero."""
        return [(0.0, 0.0, 0) for _ in pairs]


class CandidateBackend:
    """Any backend, with inference.candidates on top: every request gets clean, distinct (reranked) candidates.

    Each `generate` is one `sample_candidates` run over the batch: round 0 draws K = max(n, rerank_k) rows per
    request in one inner `generate`, later rounds (at most `max_resample_rounds`) only the rows still missing, and
    rerank is one inner `score` call. A greedy request (temperature 0) keeps its greedy row as the first sample and
    is not reranked; its other rows are sampled at `resample_temperature` (n identical greedy rows would be one
    candidate). Live partials come from round 0's first row: cleaning or rerank may still replace that text, and
    the worker's final partial carries the candidate actually chosen.
    """

    def __init__(self, inner: Backend, *, rerank_k: int = 0, max_resample_rounds: int = 2,
                 resample_temperature: float = 0.8, max_in_flight: int = 32):
        self.inner = inner
        self.max_in_flight = max_in_flight
        self._pool = None  # threads running `submit`ted requests through the step
        self.blocking = getattr(inner, "blocking", True)
        self.rerank_k, self.max_resample_rounds = rerank_k, max_resample_rounds
        self.resample_temperature = resample_temperature
        self.last: list = []  # the Outcomes of the last generate (counts for metrics and benchmarks)

    def __getattr__(self, name: str):  # registry, tokenizer, ... of the inner backend
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def submit(self, item: BatchItem, on_partial: PartialSink | None = None) -> Future:
        """One request through the candidate step, on a thread of its own: its inner `generate` calls (draws,
        re-draws) join the inner backend's running batch, so requests still come and go between decode steps."""
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="candidates")
        return self._pool.submit(lambda: self.generate([item], on_partial)[0])

    def close(self) -> None:
        """Stop the step's threads and the inner backend."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if hasattr(self.inner, "close"):
            self.inner.close()

    def generate(self, items: Sequence[BatchItem], on_partial: PartialSink | None = None) -> list[BatchResult]:
        """Clean, distinct candidates for every item (see the class docstring)."""
        from dataclasses import replace

        from inference.candidates import greedy_split, rerank_score, sample_candidates

        tokens = [0] * len(items)
        prompt_tokens = [0] * len(items)  # counted once per request, as the inner backend does
        calls = 0

        def generate_fn(indices: list[int], samples: list[int]) -> list[list[str]]:
            nonlocal calls
            batch: list[BatchItem] = []
            owner: list[int] = []
            for i, k in zip(indices, samples, strict=True):
                item = items[i]
                if item.seed is not None and calls:  # a re-draw must not repeat the first round's draws
                    item = replace(item, seed=item.seed + 7919 * calls)
                if item.request.temperature > 0:
                    parts = [replace(item, samples=k)]
                else:  # greedy: the greedy row once (round 0), sampled rows for the rest
                    greedy, sampled = greedy_split(k, calls == 0)
                    warm = item.request.model_copy(update={"temperature": self.resample_temperature,
                                                           "stream": False})
                    parts = [replace(item, samples=greedy)] if greedy else []
                    if sampled:
                        parts.append(replace(item, request=warm, samples=sampled))
                batch += parts
                owner += [i] * len(parts)
            results = self.inner.generate(batch, on_partial if calls == 0 else None)
            calls += 1
            raw: dict[int, list[str]] = {i: [] for i in indices}
            for i, result in zip(owner, results, strict=True):
                tokens[i] += result.new_tokens
                prompt_tokens[i] = prompt_tokens[i] or result.prompt_tokens
                raw[i] += result.raw
            return [raw[i] for i in indices]

        def score_fn(pairs: list[tuple[int, str]]) -> list[float]:
            return [rerank_score(*s) for s in self.inner.score([(items[i], text) for i, text in pairs])]

        ks = [self.rerank_k if item.request.temperature > 0 else 0 for item in items]
        outcomes = sample_candidates(list(range(len(items))), [item.target for item in items],
                                     [item.request.n for item in items], generate_fn, score_fn, rerank_k=ks,
                                     max_resample_rounds=self.max_resample_rounds)
        self.last = outcomes
        return [BatchResult(o.candidates, tokens[i], prompt_tokens[i], o.raw) for i, o in enumerate(outcomes)]

    def score(self, pairs: Sequence[tuple[BatchItem, str]]) -> list[tuple[float, float, int]]:
        """The inner backend's scores."""
        return self.inner.score(pairs)
