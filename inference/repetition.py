"""Repetition control that fits the chat format: only the generated burst counts, never the prompt or tags.

transformers' own `repetition_penalty` and `no_repeat_ngram_size` look at the whole sequence, prompt included:
in this format every line of the prompt starts with a speaker tag, so they penalise (or ban outright) the very
`\\n[NEXT]` tokens that end a burst, and every word the other person said. `BurstRepetition` applies the same
two rules to the tokens generated after column `width` only, and exempts tokens holding a newline or a bracket
(tags and line breaks may repeat: a burst is several `[TARGET] ...` lines):

* `penalty` > 1 divides the positive logits (multiplies the negative ones) of tokens the row already generated;
* `ngram` > 0 bans a token that would complete an n-gram the row already generated.

Heavy module (torch); the worker's backends and the engine add it to their logits processors.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

_EXEMPT_CACHE: dict[int, torch.Tensor] = {}


def exempt_ids(tokenizer) -> torch.Tensor:
    """Bool mask over the vocabulary: tokens that may always repeat (newlines, brackets, special tokens)."""
    key = id(tokenizer)
    mask = _EXEMPT_CACHE.get(key)
    if mask is None:
        size = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False)
        special = set(tokenizer.all_special_ids)
        mask = torch.tensor([i in special or any(c in t for c in "\n[]") for i, t in enumerate(texts)])
        _EXEMPT_CACHE[key] = mask
    return mask


class BurstRepetition(LogitsProcessor):
    """Repetition penalty and no-repeat n-grams over each row's generated tokens only (see the module docstring)."""

    def __init__(self, tokenizer, width: int, penalty: float = 1.0, ngram: int = 0):
        self.width, self.penalty, self.ngram = width, penalty, ngram
        self.exempt = exempt_ids(tokenizer)

    def active(self) -> bool:
        """False when both rules are off (the processor would change nothing)."""
        return self.penalty != 1.0 or self.ngram > 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        gen = input_ids[:, self.width :]  # (rows, generated so far)
        if gen.shape[1] == 0:
            return scores
        vocab = scores.shape[-1]
        exempt = torch.ones(vocab, dtype=torch.bool)
        exempt[: min(vocab, len(self.exempt))] = self.exempt[:vocab]
        exempt = exempt.to(scores.device)
        if self.penalty != 1.0:
            seen = torch.zeros_like(scores, dtype=torch.bool).scatter(1, gen.clamp(max=vocab - 1), True) & ~exempt
            penalised = torch.where(scores > 0, scores / self.penalty, scores * self.penalty)
            scores = torch.where(seen, penalised, scores)
        if self.ngram > 0 and gen.shape[1] >= self.ngram - 1:
            free = (~exempt).tolist()
            for r, row in enumerate(gen.tolist()):
                banned = _banned(row, self.ngram, free)
                if banned:
                    scores[r, banned] = float("-inf")
        return scores


def _banned(row: list[int], n: int, free: list[bool]) -> list[int]:
    """Tokens that would complete an n-gram already in `row` (n-grams touching an exempt token do not count)."""
    prefix = row[len(row) - (n - 1) :] if n > 1 else []
    if any(not free[t] for t in prefix if t < len(free)):
        return []
    out = []
    for i in range(len(row) - n + 1):
        gram = row[i : i + n]
        if gram[:-1] == prefix and all(t < len(free) and free[t] for t in gram):
            out.append(gram[-1])
    return out
