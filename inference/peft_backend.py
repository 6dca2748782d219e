"""`PeftBackend`: the worker's model, a base with every loaded LoRA adapter, one `generate` per batch.

Implements inference.batching.Backend. Rows are left-padded to one width, so every row's completion starts at the
same column and is cut from the token ids there; each row runs through its own adapter (PEFT `adapter_names`,
`__base__` for the bare base), with its own temperature/top-p (a logits processor; temperature 0 is greedy) and its
own stop at the first line tagged by anyone but its target. So a greedy row's output equals the request run alone.
Heavy module (torch, transformers, peft).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from transformers import LogitsProcessor, StoppingCriteria

from inference.batching import BASE_ADAPTER, BatchItem, BatchResult, PartialSink, partial_text, trim_burst
from inference.engine import completion_logprobs, encode, tokenize_pair
from inference.prompt_format import completion_finished, split_completion
from inference.repetition import BurstRepetition


class PeftBackend:
    """A base model + LoRA adapters (PEFT) answering a whole batch with one `generate`."""

    blocking = True

    def __init__(self, registry, tokenizer, device: str, partial_interval_ms: float = 250.0, *,
                 repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0):
        self.registry = registry  # inference.adapters.AdapterRegistry; its `model` changes when the first adapter loads
        self.tokenizer = tokenizer
        self.device = device
        self.partial_interval_s = partial_interval_ms / 1000
        self.repetition_penalty, self.no_repeat_ngram_size = repetition_penalty, no_repeat_ngram_size

    def generate(self, items: Sequence[BatchItem], on_partial: PartialSink | None = None) -> list[BatchResult]:
        """One left-padded generate for all rows (`item.samples` per item), each row through its own adapter."""
        from peft import PeftModel
        from transformers import LogitsProcessorList, StoppingCriteriaList

        if not items:
            return []
        tok = self.tokenizer
        pad = tok.pad_token_id
        rows = [(i, item) for i, item in enumerate(items) for _ in range(item.samples)]
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
        processors = LogitsProcessorList()
        repetition = BurstRepetition(tok, width, self.repetition_penalty, self.no_repeat_ngram_size)
        if repetition.active():  # before sampling: a banned token must not survive as a greedy row's argmax
            processors.append(repetition)
        if sampling:  # per-row temperature and top-p; the library's own warpers stay off
            kwargs.update(temperature=1.0, top_p=1.0, top_k=0)
            processors.append(_RowSampling(temps, top_ps))
        if processors:
            kwargs["logits_processor"] = processors
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
            candidates, raws, new_tokens = [], [], 0
            for r in (r for r, (j, _) in enumerate(rows) if j == i):
                gen = out[r, width : width + item.request.max_new_tokens].tolist()
                while gen and gen[-1] == pad:
                    gen.pop()
                new_tokens += len(gen)
                raw = trim_burst(tok.decode(gen, skip_special_tokens=True, clean_up_tokenization_spaces=False),
                                 item.target)
                raws.append(raw)
                candidates.append(split_completion(raw, item.target))
            results.append(BatchResult(candidates, new_tokens, raws))
        return results

    def score(self, pairs: Sequence[tuple[BatchItem, str]], batch_size: int = 16) -> list[tuple[float, float, int]]:
        """Per (item, completion): summed log-prob under the item's adapter and under the bare base, and tokens.

        Each chunk is one forward pass of 2 x rows: every pair once through its adapter, once as `__base__`.
        """
        from peft import PeftModel

        model = self.registry.model
        pad = self.tokenizer.pad_token_id
        out: list[tuple[float, float, int]] = []
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            encoded = [tokenize_pair(self.tokenizer, item.prompt, text) for item, text in chunk]
            kwargs = {}
            if isinstance(model, PeftModel):
                kwargs["adapter_names"] = [item.adapter for item, _ in chunk] + [BASE_ADAPTER] * len(chunk)
            elif any(item.adapter != BASE_ADAPTER for item, _ in chunk):
                raise RuntimeError("pairs name adapters but no adapter is loaded")
            lps = completion_logprobs(model, pad, encoded + encoded, self.device, **kwargs)
            out += [(a, b, n) for (a, n), (b, _) in zip(lps[: len(chunk)], lps[len(chunk) :], strict=True)]
        return out


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
