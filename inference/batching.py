"""Requests in, responses and live partial text out: one padded, mixed-adapter `generate` per batch.

This is the one seam between the queue and the model. The worker turns each request into a `BatchItem` (prompt,
target tag, adapter name) and calls `Backend.generate(items, on_partial)`; it never touches tensors. `PeftBackend`
is the only backend built: a base model with every loaded LoRA adapter, one `generate` call for the whole batch:

* each request becomes `n` rows, left-padded to one width, so every row's completion starts at the same column and
  is cut from the token ids at that column (inference.completion);
* each row runs through its own adapter via PEFT's `adapter_names` (`__base__`: the bare base);
* each row has its own temperature/top-p (a logits processor; temperature 0 is greedy) and stops at the first
  line tagged by anyone but its own target, so a greedy row's output equals the same request run alone;
* while generating, candidate 1 of each `stream` request is handed to `on_partial` at most every
  `partial_interval_ms` (called from the generating thread).

A vLLM multi-LoRA backend would implement the same `generate` for large deployments.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import LogitsProcessor, StoppingCriteria

from inference.adapter_meta import AdapterMeta
from inference.engine import encode, trim_completion
from inference.prompt_format import (
    ROLE_FRIEND,
    ROLE_ME,
    PromptFormatError,
    Turn,
    check_tag,
    completion_finished,
    make_tag,
    render_prompt,
    split_completion,
)
from inference.protocol import GenerateRequest

PartialSink = Callable[[str, str], None]  # (request id, text of candidate 1 so far)


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One request ready for the model: its prompt (ending in `[TARGET]`), target tag and adapter name."""

    request: GenerateRequest
    prompt: str
    target: str
    adapter: str  # PEFT adapter name, or "__base__" for the bare base


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What one request got: `n` candidates (each a list of messages) and the tokens generated for them."""

    candidates: list[list[str]]
    new_tokens: int


class Backend(Protocol):
    """What the worker needs from a model: a batch of items in, one result per item out (same order)."""

    def generate(self, items: Sequence[BatchItem], on_partial: PartialSink | None = None) -> list[BatchResult]:
        """Generate for every item in one go; `on_partial(id, text)` gets live text of stream requests."""
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
    text = trim_completion(raw, target)
    text = text.rstrip("\ufffd")
    tail = text.rfind("\\")
    if tail != -1 and len(text) - tail <= 6 and text[tail + 1 : tail + 2] in ("", "u"):
        text = text[:tail]
    return "\n".join(split_completion(text, target))


def final_text(candidate: Sequence[str]) -> str:
    """The text of a finished candidate as partials show it (messages one per line)."""
    return "\n".join(candidate)


class PeftBackend:
    """A base model + LoRA adapters (PEFT) answering a whole batch with one `generate`."""

    def __init__(self, registry, tokenizer, device: str, partial_interval_ms: float = 250.0):
        self.registry = registry  # inference.adapters.AdapterRegistry; its `model` changes when the first adapter loads
        self.tokenizer = tokenizer
        self.device = device
        self.partial_interval_s = partial_interval_ms / 1000

    def generate(self, items: Sequence[BatchItem], on_partial: PartialSink | None = None) -> list[BatchResult]:
        """One left-padded generate for all rows (n per item), each row through its own adapter."""
        from peft import PeftModel
        from transformers import LogitsProcessorList, StoppingCriteriaList

        if not items:
            return []
        tok = self.tokenizer
        pad = tok.pad_token_id
        rows = [(i, item) for i, item in enumerate(items) for _ in range(item.request.n)]
        encoded = {i: encode(tok, item.prompt) for i, item in enumerate(items)}
        width = max(len(ids) for ids in encoded.values())
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (rows, width), left-padded
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (i, _) in enumerate(rows):
            ids = encoded[i]
            input_ids[r, width - len(ids) :] = torch.tensor(ids)
            attention[r, width - len(ids) :] = 1
        temps = [item.request.temperature for _, item in rows]
        top_ps = [item.request.top_p for _, item in rows]
        sampling = any(t > 0 for t in temps)
        first_rows = {i: r for r, (i, _) in reversed(list(enumerate(rows)))}  # item -> its candidate-1 row
        watch = {first_rows[i]: item.request.id for i, item in enumerate(items) if item.request.stream and on_partial}
        stop = _RowStop(tok, width, [item.target for _, item in rows], watch, on_partial, self.partial_interval_s)
        kwargs = dict(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            max_new_tokens=max(item.request.max_new_tokens for item in items),
            stopping_criteria=StoppingCriteriaList([stop]),
            pad_token_id=pad,
            do_sample=sampling,
        )
        if sampling:  # per-row temperature and top-p; the library's own warpers stay off
            kwargs.update(temperature=1.0, top_p=1.0, top_k=0,
                          logits_processor=LogitsProcessorList([_RowSampling(temps, top_ps)]))
        stop.max_new = [item.request.max_new_tokens for _, item in rows]
        model = self.registry.model
        if isinstance(model, PeftModel):
            kwargs["adapter_names"] = [item.adapter for _, item in rows]
        elif any(item.adapter != "__base__" for item in items):
            raise RuntimeError("rows name adapters but no adapter is loaded")
        with torch.no_grad():
            out = model.generate(**kwargs)  # (rows, width + new)
        out = out.cpu()
        results: list[BatchResult] = []
        for i, item in enumerate(items):
            candidates, new_tokens = [], 0
            for r in (r for r, (j, _) in enumerate(rows) if j == i):
                gen = out[r, width : width + item.request.max_new_tokens].tolist()
                while gen and gen[-1] == pad:
                    gen.pop()
                new_tokens += len(gen)
                raw = tok.decode(gen, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                candidates.append(split_completion(trim_completion(raw, item.target), item.target))
            results.append(BatchResult(candidates, new_tokens))
        return results


class _RowStop(StoppingCriteria):
    """Stopping criterion: row r is done at its own other-speaker tag or its own max_new_tokens; also emits partials."""

    def __init__(self, tokenizer, width: int, targets: list[str], watch: dict[int, str],
                 on_partial: PartialSink | None, interval_s: float):
        self.tokenizer, self.width, self.targets = tokenizer, width, targets
        self.watch, self.on_partial, self.interval_s = watch, on_partial, interval_s
        self.done = torch.zeros(len(targets), dtype=torch.bool)
        self.max_new: list[int] = [1 << 30] * len(targets)
        self.sent: dict[int, str] = {}
        self.last_s = 0.0

    def __call__(self, input_ids, scores, **kwargs):

        new = input_ids.shape[1] - self.width
        texts: dict[int, str] = {}
        for r in range(input_ids.shape[0]):
            if self.done[r]:
                continue
            texts[r] = self.tokenizer.decode(input_ids[r, self.width :].tolist(), skip_special_tokens=True,
                                             clean_up_tokenization_spaces=False)
            if new >= self.max_new[r] or completion_finished(texts[r], self.targets[r]):
                self.done[r] = True
        now = time.monotonic()
        if self.watch and now - self.last_s >= self.interval_s:
            self.last_s = now
            for r, request_id in self.watch.items():
                if r in texts:
                    text = partial_text(texts[r], self.targets[r])
                    if text and text != self.sent.get(r):
                        self.sent[r] = text
                        self.on_partial(request_id, text)
        return self.done.to(input_ids.device).clone()


class _RowSampling(LogitsProcessor):
    """Logits processor: each row's own temperature and top-p; temperature 0 keeps only the argmax (greedy)."""

    def __init__(self, temperatures: list[float], top_ps: list[float]):
        self.temps = torch.tensor([t if t > 0 else 1.0 for t in temperatures]).unsqueeze(1)  # (rows, 1)
        self.greedy = torch.tensor([t <= 0 for t in temperatures])
        self.top_p = torch.tensor(top_ps).unsqueeze(1)

    def __call__(self, input_ids, scores):
        temps, greedy, top_p = (x.to(scores.device) for x in (self.temps, self.greedy, self.top_p))
        scores = scores / temps
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - top_p)
        drop_sorted[..., -1:] = False  # always keep the most likely token
        drop = drop_sorted.scatter(1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
        best = scores.argmax(dim=-1, keepdim=True)
        one_hot = torch.full_like(scores, float("-inf")).scatter(1, best, 0.0)
        return torch.where(greedy.unsqueeze(1), one_hot, scores)


class EchoBackend:
    """No model: answers every request with its last message's text (queue benchmarks and tests of the loop)."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s

    def generate(self, items: Sequence[BatchItem], on_partial: PartialSink | None = None) -> list[BatchResult]:
        """Echo the last history message (or "...") `n` times."""
        if self.delay_s:
            time.sleep(self.delay_s)  # stands in for model time; not synchronisation
        out = []
        for item in items:
            last = item.request.history[-1].text if item.request.history else "..."
            if item.request.stream and on_partial is not None:
                on_partial(item.request.id, last[: max(1, len(last) // 2)])
            out.append(BatchResult([[last]] * item.request.n, item.request.n))
        return out
