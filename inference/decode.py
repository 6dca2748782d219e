"""The decode loop: continuous batching over the model's forward and KV cache, with per-row adapters.

`DecodeBackend` implements inference.batching.Backend. A thread runs this loop while there is work:

    logits_old = step(running rows)              one token per row: (rows, 1) ids, per-row positions, KV cache
    logits_new = prefill(each waiting request)   its prompt (minus a cached prefix, inference.prefix_cache),
                                                 then its KV repeated for its `samples` rows, merged in
    tokens = sample(cat(logits_old, logits_new)) per-row temperature/top-p on the device; greedy rows: argmax
    for each row: stop check on the new token only; finished rows leave the cache; an item whose rows are all
                  done resolves its Future at once

So requests join the running batch between steps and leave when they stop: a short request that arrives while
long ones generate is answered without waiting for them. The cache is a transformers DynamicCache whose per-layer
tensors (rows, kv_heads, width, head_dim) are cut (leave) and left-padded then concatenated (join) here; a 2-D
attention mask marks each row's padding and `position_ids` carry each row's own positions, so a row computes what
it would alone. Every row runs through its own LoRA adapter in the same forward (inference.lora_batch).
What a model's config adds to that (inference.architectures): sliding-window layers keep only the last window - 1
keys/values; longrope and dynamic NTK rope choose each row's frequencies from its own positions, and a longrope
row that crosses the short/long switch gets its keys/values recomputed once, as transformers' `generate` does;
rope types and layer kinds it cannot serve are refused at construction.

Stops (prompt_format.completion_finished: a new line that starts with anyone's tag but the target's) are found
on token ids: only a token holding a newline, or the few tokens of a line not yet known to be the target's, are
decoded (`StopScanner`). Streaming rows keep an incremental detokenizer (`IncrementalText`), so no step decodes a
row's whole text. Heavy module (torch, transformers).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from inference import architectures as arch
from inference.batching import BatchItem, BatchResult, PartialSink, partial_text
from inference.engine import encode, tokenize_pair
from inference.lora_batch import LoraBank
from inference.prefix_cache import PrefixCache
from inference.prompt_format import could_become_tag, line_speaker, split_completion, trim_burst

logger = logging.getLogger("convo.worker.decode")


# ---------------------------------------------------------------- stops and text, on token ids


_NEWLINE_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (vocab size, ids)


def newline_token_ids(tokenizer) -> frozenset[int]:
    """Ids of every token whose text holds a newline (the only tokens that can start a line).

    Kept per tokenizer (decoding a whole vocabulary takes a while): simulate and eval build a backend per call."""
    known = _NEWLINE_IDS.get(tokenizer)
    if known is not None and known[0] == len(tokenizer):
        return known[1]
    pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
    ids = frozenset(i for i, piece in enumerate(pieces) if "\n" in piece)
    _NEWLINE_IDS[tokenizer] = (len(tokenizer), ids)
    return ids


def _line_verdict(line: str, target: str) -> str:
    """'stop' (another speaker's tag, or not a turn), 'ok' (the target's tag) or 'open' (could still be either)."""
    tag = line_speaker(line)
    if tag is not None:
        return "ok" if tag == target else "stop"
    return "open" if could_become_tag(line) else "stop"


class StopScanner:
    """completion_finished(decode(ids), target), kept up to date one new token at a time.

    A line's verdict is fixed once it has a complete tag or a character no tag has, so only tokens of a line
    still open (a few), and tokens holding a newline, are ever decoded.
    """

    def __init__(self, decode: Callable[[list[int]], str], newline_ids: frozenset[int], target: str):
        self.decode, self.newline_ids, self.target = decode, newline_ids, target
        self.line_tok: int | None = None  # token holding the newline that opened the line being checked
        self.open = False  # that line's verdict is not known yet

    def feed(self, ids: list[int]) -> bool:
        """`ids`: every token generated so far (the last one new); True once the burst is finished."""
        last = len(ids) - 1
        if ids[last] in self.newline_ids:
            if self.line_tok is None or not self.open:
                self.line_tok = last
            self.open = True
        elif not self.open:
            return False
        lines = self.decode(ids[self.line_tok :]).split("\n")[1:]  # [0]: the end of an already checked line
        for i, line in enumerate(lines):
            verdict = _line_verdict(line, self.target)
            if verdict == "stop":
                return True
            if i == len(lines) - 1:
                self.open = verdict == "open"
        return False


class IncrementalText:
    """A row's text grown token by token (decoding a few tokens per step); holds back a half UTF-8 character."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.text = ""
        self._prefix = 0
        self._read = 0

    def add(self, ids: list[int]) -> str:
        """`ids`: every token so far (the last one new); the text so far."""
        before = self.decode(ids[self._prefix : self._read])
        now = self.decode(ids[self._prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before) :]
            self._prefix, self._read = self._read, len(ids)
        return self.text


# ---------------------------------------------------------------- sampling, vectorised over rows


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
           generator: torch.Generator | None = None,
           generators: Sequence[torch.Generator | None] | None = None) -> torch.Tensor:
    """Next token per row of `logits` (rows, vocab): temperature 0 -> argmax, else nucleus sampling at `top_p`.

    `generators` (one per row, None: `generator`) gives seeded rows their own random stream: a seeded request
    draws the same tokens whatever else shares the batch.
    """
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    sampling = (temperature > 0).nonzero().squeeze(1)
    if sampling.numel():  # only rows that sample pay for the sort
        scaled = logits[sampling] / temperature[sampling].unsqueeze(1)
        ordered, order = scaled.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # Drop a token when the mass of the more likely ones already reaches top_p (the first is always kept).
        drop = (probs.cumsum(dim=-1) - probs) >= top_p[sampling].unsqueeze(1)
        probs = probs.masked_fill(drop, 0.0)
        if generators is None:
            pick = torch.multinomial(probs, 1, generator=generator)  # (sampling rows, 1), renormalised by multinomial
        else:  # one draw per random stream, over its own rows (in row order)
            pick = torch.empty(len(sampling), 1, dtype=torch.long, device=probs.device)
            streams: dict[int, tuple[torch.Generator | None, list[int]]] = {}
            for k, r in enumerate(sampling.tolist()):
                g = generators[r] if generators[r] is not None else generator
                streams.setdefault(id(g), (g, []))[1].append(k)
            for g, at in streams.values():
                idx = torch.tensor(at, device=probs.device)
                pick[idx] = torch.multinomial(probs[idx], 1, generator=g)
        tokens[sampling] = order.gather(1, pick).squeeze(1)
    return tokens


def penalise(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Repetition penalty as transformers applies it: logits of seen tokens divided (or, if negative, multiplied)."""
    p = penalty.unsqueeze(1)
    return torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)


# ---------------------------------------------------------------- the loop


@dataclass(eq=False)
class _Job:
    """One submitted item: its rows, its Future, what its stream partials have shown."""

    item: BatchItem
    future: Future
    on_partial: PartialSink | None
    slot: int
    held: int = 0  # rows still holding the adapter slot
    ids: list[int] = field(default_factory=list)  # prompt token ids
    rows_left: int = 0
    rows: list = field(default_factory=list)  # finished rows in sample order
    generator: torch.Generator | None = None  # the item's own random stream (BatchItem.seed), else the global one


@dataclass(eq=False)
class _Row:
    """One sample row of a job in the running batch."""

    job: _Job
    index: int  # which sample of its job
    stop: StopScanner
    text: IncrementalText | None  # stream rows only (candidate 1 of a stream request)
    ids: list[int] = field(default_factory=list)  # generated so far
    ngrams: dict | None = None  # no_repeat_ngram_size: (n-1)-gram -> next tokens seen
    history: list[int] | None = None  # prompt + generated, for no_repeat_ngram_size
    last_partial_s: float = 0.0
    sent: str = ""
    done: bool = False


class DecodeBackend:
    """Base model + stacked LoRA adapters, decoding a continuously batched set of rows on one thread."""

    blocking = True

    def __init__(self, model, tokenizer, bank: LoraBank, device: str, *, max_rows: int = 64,
                 partial_interval_ms: float = 250.0, prefix_cache: PrefixCache | None = None,
                 repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0):
        self.model = model
        self.tokenizer = tokenizer
        self.bank = bank
        self.device = device
        self.max_rows = max_rows
        self.partial_interval_s = partial_interval_ms / 1000
        self.prefix_cache = prefix_cache
        self.repetition_penalty = repetition_penalty
        self.no_repeat_ngram_size = no_repeat_ngram_size
        arch.check_servable(model)  # one line naming the rope type or layer kind it cannot serve
        arch.install_per_row_rope(model)
        self._switch = arch.longrope_switch(model.config)  # a row fed this position recomputes its keys/values
        self.cap_windows = True  # sliding-window layers keep window - 1 keys (False: all; bench/sliding_window.py)
        self._positions = arch.position_limit(model.config)  # GPT-2: prompt + new tokens must fit n_positions
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = frozenset(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.newline_ids = newline_token_ids(tokenizer)
        from inference.repetition import exempt_ids

        # Repetition control counts the burst only, never the prompt, and tokens with a newline or bracket may
        # always repeat (inference/repetition.py: the same rule as simulate and eval).
        self._free = (~exempt_ids(tokenizer)).tolist()
        self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        # transformers >= 5.25 names the forward's KV cache argument `cache`; earlier 5.x `past_key_values`.
        import inspect

        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._waiting: list[_Job] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        # Running batch: rows, their KV cache, mask (rows, width), next position (rows,), last token (rows,).
        self._rows: list[_Row] = []
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None
        self._last: torch.Tensor | None = None
        self._slots: list[int] = []
        self._seen: torch.Tensor | None = None  # (rows, vocab) bool: tokens seen, with a repetition penalty
        # Figures for the heartbeat: recent tokens/s and rows in the running batch.
        self.tokens_total = 0
        self.prefill_tokens = 0
        self.prefill_tokens_saved = 0
        self._rate: list[tuple[float, int]] = []
        if prefix_cache is not None:
            bank.on_remove.append(prefix_cache.drop)

    # ------------------------------------------------------------ the seam

    def submit(self, item: BatchItem, on_partial: PartialSink | None = None) -> Future:
        """Queue `item` to join the running batch at the next step; the Future gets its BatchResult."""
        future: Future = Future()
        slot = self.bank.hold(item.adapter, item.samples)  # KeyError: not loaded (the worker acquires it first)
        job = _Job(item, future, on_partial if item.request.stream else None, slot, held=item.samples)
        with self._cond:
            if self._closed:
                raise RuntimeError("decode backend closed")
            self._waiting.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="decode", daemon=True)
                self._thread.start()
            self._cond.notify()
        return future

    def generate(self, items: Sequence[BatchItem], on_partial: PartialSink | None = None) -> list[BatchResult]:
        """Submit every item and wait for all (simulate, eval, tests)."""
        futures = [self.submit(item, on_partial) for item in items]
        return [f.result() for f in futures]

    def score(self, pairs: Sequence[tuple[BatchItem, str]], batch_size: int = 16) -> list[tuple[float, float, int]]:
        """Per (item, completion): (summed log-prob under the item's adapter, under the bare base, tokens)."""
        from inference.lora_batch import BASE_SLOT

        out: list[tuple[float, float, int]] = []
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            encoded = [tokenize_pair(self.tokenizer, item.prompt, completion) for item, completion in chunk]
            width = max(len(ids) for ids, _ in encoded)
            rows = 2 * len(chunk)  # each pair twice: its adapter, then the base
            ids = torch.full((rows, width), pad, dtype=torch.long)
            attn = torch.zeros((rows, width), dtype=torch.long)
            keep = torch.zeros((rows, width), dtype=torch.bool)
            for r, (seq, mask) in enumerate(encoded):
                for row in (2 * r, 2 * r + 1):
                    ids[row, : len(seq)] = torch.tensor(seq)
                    attn[row, : len(seq)] = 1
                    keep[row, : len(seq)] = torch.tensor(mask, dtype=torch.bool)
            slots = [s for item, _ in chunk for s in (self.bank.slot(item.adapter), BASE_SLOT)]
            with torch.no_grad(), self.bank.rows(slots):
                # Each row's own positions (right padding repeats its last): per-row rope sees its own length.
                pos = (attn.cumsum(dim=1) - 1).clamp(min=0).to(self.device)
                logits = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                                    position_ids=pos).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # token t predicted at t-1
            got = logp.gather(-1, ids[:, 1:].to(logp.device).unsqueeze(-1)).squeeze(-1)
            m = keep[:, 1:].to(got.device)
            sums, counts = (got * m).sum(dim=1).tolist(), m.sum(dim=1).tolist()
            out += [(sums[2 * r], sums[2 * r + 1], int(counts[2 * r])) for r in range(len(chunk))]
        return out

    def warm_up(self) -> None:
        """One short generation on the bare base, so the first request pays no first-call costs."""
        from inference.batching import BASE_ADAPTER
        from inference.protocol import GenerateRequest

        request = GenerateRequest.build(persona="warmup", history=[{"speaker": "A", "text": "hi"}], temperature=0.7,
                                        max_new_tokens=4)
        self.generate([BatchItem(request, "[A] hi\n[B]", "B", BASE_ADAPTER, samples=2)])

    def stats(self) -> dict:
        """Rows running, capacity, tokens/s over the last ~10 s, prompt tokens prefilled and taken from the prefix
        cache since start: what the heartbeat shows."""
        now = time.monotonic()
        recent = [(t, n) for t, n in self._rate if now - t <= 10.0]
        span = now - recent[0][0] if recent else 0.0
        return {"rows_active": len(self._rows), "rows_capacity": self.max_rows,
                "tokens_per_s": round(sum(n for _, n in recent) / span, 1) if span > 0.5 else 0.0,
                "prompt_tokens_run": self.prefill_tokens, "prompt_tokens_cached": self.prefill_tokens_saved}

    def close(self) -> None:
        """Stop the decode thread once the rows in hand are done."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(60)

    # ------------------------------------------------------------ the thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._rows and not self._closed:
                    self._cond.wait()
                if self._closed and not self._waiting and not self._rows:
                    self._thread = None
                    return
                free = self.max_rows - len(self._rows)
                joining = []
                while self._waiting and (free >= self._waiting[0].item.samples or not self._rows and not joining):
                    job = self._waiting.pop(0)
                    free -= job.item.samples
                    joining.append(job)
            try:
                with torch.no_grad():
                    self._iteration(joining)
            except Exception as e:  # a bug or the device failing: every row in hand learns of it, the loop goes on
                logger.exception("decode step failed")
                for job in {row.job for row in self._rows} | set(joining):
                    if not job.future.done():
                        job.future.set_exception(e)
                    self._release(job, job.item.samples - len(job.rows))
                self._rows, self._slots, self._cache, self._seen = [], [], None, None

    def _iteration(self, joining: list[_Job]) -> None:
        logits = [self._step()] if self._rows else []
        for job in joining:
            if job.future.set_running_or_notify_cancel():
                logits.append(self._prefill(job))
            else:  # cancelled before it started
                self._release(job, job.item.samples)
        if not logits:
            return
        logits = torch.cat(logits)  # (rows, vocab), in self._rows order
        tokens = self._sample(logits).tolist()
        now = time.monotonic()
        self._rate.append((now, len(tokens)))
        if len(self._rate) > 4096:
            self._rate = self._rate[-2048:]
        self.tokens_total += len(tokens)
        keep, finished = [], []
        for r, (row, token) in enumerate(zip(self._rows, tokens, strict=True)):
            if self._advance(row, token, now):
                finished.append(row.job)
            if not row.done:
                keep.append(r)
        self._last = torch.tensor(tokens, device=self._pos.device)
        if len(keep) < len(self._rows):
            self._leave(keep)
        for job in finished:  # after the rows left: a caller woken by its result sees the batch without them
            self._finish(job)

    def _step(self) -> torch.Tensor:
        """Feed each running row its last token; (rows, vocab) logits."""
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self._rows), 1)], dim=1)
        crossing = [] if self._switch is None else (self._pos == self._switch).nonzero().squeeze(1).tolist()
        with self.bank.rows(self._slots):
            out = self.model(input_ids=self._last.unsqueeze(1), attention_mask=self._mask,
                             position_ids=self._pos.unsqueeze(1), use_cache=True, logits_to_keep=1,
                             **{self._cache_arg: self._cache})
        self._pos = self._pos + 1
        logits = out.logits[:, -1]
        if crossing:
            logits = self._recompute(crossing, logits)
        return logits

    def _recompute(self, rows: list[int], logits: torch.Tensor) -> torch.Tensor:
        """Rows that just reached a longrope model's switch: their whole sequence again, under long factors.

        transformers' Phi-3 `generate` drops the cache once when a sequence first passes
        original_max_position_embeddings, so every key is recomputed with the long factors; the same here for these
        rows only (all the same length, one forward), their keys/values and logits replacing the step's."""
        ids = torch.tensor([self._rows[r].job.ids + self._rows[r].ids for r in rows], device=self._pos.device)
        cache = arch.new_cache(self.model, capped=self.cap_windows)
        with self.bank.rows([self._slots[r] for r in rows]):
            out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                             position_ids=torch.arange(ids.shape[1], device=ids.device).expand(len(rows), -1),
                             use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
        index = torch.tensor(rows, device=self._pos.device)
        for layer, fresh in zip(self._cache.layers, cache.layers, strict=True):
            layer.keys[index] = _pad_left(fresh.keys, layer.keys.shape[2])  # rows are right-aligned
            layer.values[index] = _pad_left(fresh.values, layer.values.shape[2])
        logits = logits.clone()
        logits[index] = out.logits[:, -1].to(logits.dtype)
        return logits

    def _prefill(self, job: _Job) -> torch.Tensor:
        """Run a job's prompt (after any cached prefix) and merge its `samples` rows into the batch; their logits."""
        item = job.item
        ids = encode(self.tokenizer, item.prompt)
        if self._positions is not None:  # learned positions end: the oldest context goes first, as in training
            ids = ids[-max(1, self._positions - item.request.max_new_tokens):]
        job.ids, job.rows_left = ids, item.samples
        if item.seed is not None and item.request.temperature > 0:
            job.generator = torch.Generator(device=self.device).manual_seed(item.seed)
        regime = arch.regime(self.model.config, len(ids))  # keys computed under other rope factors never mix
        cached, kv = (self.prefix_cache.lookup(item.adapter, ids, regime) if self.prefix_cache is not None
                      else (0, None))
        cache = arch.new_cache(self.model, kv, cached, self.cap_windows, keep_all=self.prefix_cache is not None)
        device = self.device
        with self.bank.rows([job.slot]):
            out = self.model(input_ids=torch.tensor([ids[cached:]], device=device),
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                             position_ids=torch.arange(cached, len(ids), device=device).unsqueeze(0),
                             use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
        self.prefill_tokens += len(ids) - cached
        self.prefill_tokens_saved += cached
        if self.prefix_cache is not None:  # sliding layers: a margin more than the window, then the window
            entry, min_reuse = arch.trim_windows(cache, len(ids), arch.PREFIX_MARGIN)
            self.prefix_cache.put(item.adapter, ids, entry, regime, min_reuse)
            arch.trim_windows(cache, len(ids), 0)
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        n = item.samples
        self._join(layers, len(ids), n)
        for i in range(n):
            stream = i == 0 and job.on_partial is not None
            row = _Row(job, i, StopScanner(self._decode, self.newline_ids, item.target),
                       IncrementalText(self._decode) if stream else None)
            if self.no_repeat_ngram_size > 0:
                row.ngrams, row.history = {}, []  # the burst's own n-grams only
            self._rows.append(row)
            self._slots.append(job.slot)
        if self.repetition_penalty != 1.0:  # nothing seen yet: the prompt does not count
            seen = torch.zeros(n, out.logits.shape[-1], dtype=torch.bool, device=device)  # the head's width
            self._seen = seen if self._seen is None else torch.cat([self._seen, seen])
        return out.logits[:, -1].expand(n, -1)

    def _join(self, layers, length: int, n: int) -> None:
        """Add `n` rows sharing one prompt's KV (each layer (1, heads, length, dim); a sliding-window layer's
        last window - 1 only) to the batch, left-padded."""
        device = layers[0][0].device
        mask = torch.ones(n, length, dtype=torch.long, device=device)
        pos = torch.full((n,), length, dtype=torch.long, device=device)
        if self._cache is None or not self._rows:
            self._cache = arch.new_cache(self.model, [(k.expand(n, -1, -1, -1).contiguous(),
                                                       v.expand(n, -1, -1, -1).contiguous()) for k, v in layers],
                                         length, self.cap_windows)
            self._mask, self._pos = mask, pos
            self._last = torch.zeros(0, dtype=torch.long, device=device)
            return
        width = max(self._mask.shape[1], length)
        for layer, (k, v) in zip(self._cache.layers, layers, strict=True):
            cols = max(layer.keys.shape[2], k.shape[2])  # width, or a sliding layer's min(width, window - 1)
            layer.keys = torch.cat([_pad_left(layer.keys, cols), _pad_left(k.expand(n, -1, -1, -1), cols)])
            layer.values = torch.cat([_pad_left(layer.values, cols), _pad_left(v.expand(n, -1, -1, -1), cols)])
        arch.set_width(self._cache, width)
        self._mask = torch.cat([_pad_left(self._mask, width), _pad_left(mask, width)])
        self._pos = torch.cat([self._pos, pos])

    def _leave(self, keep: list[int]) -> None:
        """Keep only rows `keep`; drop leading columns no remaining row uses."""
        if not keep:
            self._rows, self._slots, self._cache, self._seen = [], [], None, None
            return
        index = torch.tensor(keep, device=self._mask.device)
        mask = self._mask[index]
        first = int((mask.sum(dim=0) > 0).nonzero()[0])  # first column any remaining row attends to
        width = mask.shape[1] - first
        for layer in self._cache.layers:  # a sliding layer holds the last columns only: cut what lies before
            cut = max(0, layer.keys.shape[2] - width)
            layer.keys = layer.keys[index, :, cut:]
            layer.values = layer.values[index, :, cut:]
        arch.set_width(self._cache, width)
        self._mask, self._pos, self._last = mask[:, first:], self._pos[index], self._last[index]
        self._rows = [self._rows[r] for r in keep]
        self._slots = [self._slots[r] for r in keep]
        if self._seen is not None:
            self._seen = self._seen[index]

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        requests = [row.job.item.request for row in self._rows]
        device = logits.device
        if self._seen is not None:
            logits = penalise(logits.float(), self._seen,
                              torch.full((len(requests),), self.repetition_penalty, device=device))
        if self.no_repeat_ngram_size > 0:
            banned = [(r, t) for r, row in enumerate(self._rows)
                      for t in row.ngrams.get(tuple(row.history[len(row.history) - self.no_repeat_ngram_size + 1:]),
                                              ())]
            if banned:
                rows_idx, toks = zip(*banned, strict=True)
                logits = logits.float().index_put((torch.tensor(rows_idx, device=device),
                                                   torch.tensor(toks, device=device)),
                                                  torch.tensor(float("-inf"), device=device))
        temperature = torch.tensor([q.temperature for q in requests], device=device)
        top_p = torch.tensor([q.top_p for q in requests], device=device)
        generators = [row.job.generator for row in self._rows]
        tokens = sample(logits, temperature, top_p,
                        generators=generators if any(g is not None for g in generators) else None)
        if self._seen is not None:
            free = torch.tensor([t < len(self._free) and self._free[t] for t in tokens.tolist()], device=device)
            self._seen[torch.arange(len(requests), device=device)[free], tokens[free]] = True
        return tokens

    def _advance(self, row: _Row, token: int, now: float) -> bool:
        """Append `token` to a row; finish it at EOS, its max_new_tokens or the end of its burst. True: job done."""
        job, request = row.job, row.job.item.request
        if token in self.eos_ids:
            row.done = True
        else:
            row.ids.append(token)
            if row.history is not None:
                row.history.append(token)
                _record_ngrams(row.ngrams, row.history, self.no_repeat_ngram_size, start=len(row.history) - 1,
                               free=self._free)
            finished = row.stop.feed(row.ids)
            row.done = (finished or len(row.ids) >= request.max_new_tokens
                        or (self._positions is not None and len(job.ids) + len(row.ids) >= self._positions))
            if row.text is not None:
                row.text.add(row.ids)
                if not row.done and now - row.last_partial_s >= self.partial_interval_s:
                    row.last_partial_s = now
                    text = partial_text(row.text.text, job.item.target)
                    if text and text != row.sent:
                        row.sent = text
                        job.on_partial(request.id, text)
        if row.done:
            self._release(job, 1)
            job.rows.append(row)
            job.rows_left -= 1
            return job.rows_left == 0
        return False

    def _release(self, job: _Job, rows: int) -> None:
        """`rows` of a job's rows no longer use its adapter slot."""
        rows = min(rows, job.held)
        job.held -= rows
        for _ in range(rows):
            self.bank.release(job.slot)

    def _finish(self, job: _Job) -> None:
        rows = sorted(job.rows, key=lambda r: r.index)
        raw = [trim_burst(self._decode(r.ids), job.item.target) for r in rows]
        job.future.set_result(BatchResult([split_completion(t, job.item.target) for t in raw],
                                          sum(len(r.ids) for r in rows), len(job.ids), raw=raw,
                                          token_ids=[list(r.ids) for r in rows]))


def _record_ngrams(ngrams: dict, history: list[int], n: int, start: int, free: list[bool]) -> None:
    """Note every n-gram of `history` ending at index >= start: (its first n-1 tokens) -> its last token.

    An n-gram touching an exempt token (newline, bracket, special: `free` False) is not noted, as in
    inference.repetition: tags and line breaks may repeat."""
    for end in range(max(start, n - 1), len(history)):
        gram = history[end - n + 1 : end + 1]
        if all(t < len(free) and free[t] for t in gram):
            ngrams.setdefault(tuple(gram[:-1]), set()).add(gram[-1])


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad dim 2 (KV: (rows, heads, T, dim)) or dim 1 (mask: (rows, T)) on the left to `width`."""
    dim = 2 if t.dim() == 4 else 1
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def load_backend(base, *, quantize: str = "none", device: str | None = None, max_rows: int = 64,
                 partial_interval_ms: float = 250.0, prefix_cache_mb: float = 256.0,
                 repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0) -> DecodeBackend:
    """The base model (inference.engine.load_base), an empty LoraBank on it, and the decode loop around both."""
    from inference.engine import load_base

    model, tokenizer, device = load_base(base, quantize, device)
    bank = LoraBank(model, torch.bfloat16 if device.startswith("cuda") else torch.float32)
    cache = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None
    return DecodeBackend(model, tokenizer, bank, device, max_rows=max_rows, partial_interval_ms=partial_interval_ms,
                         prefix_cache=cache, repetition_penalty=repetition_penalty,
                         no_repeat_ngram_size=no_repeat_ngram_size)
