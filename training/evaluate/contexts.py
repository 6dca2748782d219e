"""What each method puts before the prompt, every context-adding method filling the same token budget.

A context is a block of conversation lines in the prompt format, each session or exchange closed by an `[END]`
line (the end-of-session marker the model saw in training), followed by the sample's own prompt:

    [BOB] ...            <- in-context session or retrieved exchange
    [ALICE] ...
    [END]
    [BOB] the conversation being continued
    [ALICE]

`incontext` fills the budget with whole training sessions of the persona in a fixed seeded order, then the end
of the next session to use what is left; `retrieval` the same way with the BM25-ranked exchanges (the best one
last, nearest the prompt). Budgets are counted with the base model's tokenizer and filled to a line boundary,
so every method's context is within one line of the same `--context-budget` and never over it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from inference.prompt_format import END_TAG, Turn, render_line
from training.evaluate.data import Exchange
from training.evaluate.retrieval import ExchangeIndex

CountFn = Callable[[str], int]
END_LINE = f"[{END_TAG}]"


@dataclass(frozen=True, slots=True)
class Context:
    """The text put before a prompt ("" or lines ending in a newline) and its length in tokens."""

    text: str
    tokens: int


EMPTY = Context("", 0)


def unit_lines(turns: Sequence[Turn]) -> list[str]:
    """A session or exchange as prompt lines, closed by `[END]`."""
    return [render_line(t) for t in turns] + [END_LINE]


def _block(lines: Sequence[str]) -> str:
    return "".join(line + "\n" for line in lines)


def fill_budget(
    units: Iterable[Sequence[str]], count: CountFn, budget_tokens: int, *, best_last: bool = False
) -> Context:
    """Pack whole units (lists of lines) in order into `budget_tokens`, then as many last lines of the next.

    The unit that no longer fits contributes its end (for a session its close, for an exchange the persona's
    reply), so every method's block stops within one line of the budget. `best_last` reverses the chosen
    units so the first-ranked ends nearest the prompt. The final block is recounted whole and trimmed from the
    front until it fits (tokens can merge differently across line joins).
    """
    if budget_tokens <= 0:
        return EMPTY
    chosen: list[list[str]] = []
    used = 0
    for unit in units:
        cost = count(_block(unit))
        if used + cost <= budget_tokens:
            chosen.append(list(unit))
            used += cost
            continue
        part: list[str] = []
        for line in reversed(unit):
            c = count(line + "\n")
            if used + c > budget_tokens:
                break
            part.insert(0, line)
            used += c
        if part:
            chosen.append(part)
        break
    if best_last:
        chosen.reverse()
    lines = [line for unit in chosen for line in unit]
    n = count(_block(lines))
    while lines and n > budget_tokens:
        lines.pop(0)
        n = count(_block(lines))
    return Context(_block(lines), n) if lines else EMPTY


def incontext_context(
    sessions: Sequence[Sequence[Turn]], persona_tag: str, count: CountFn, budget_tokens: int, seed: int
) -> Context:
    """Whole training sessions in which the persona speaks, in a `seed`-fixed random order, filling the budget."""
    mine = [s for s in sessions if any(t.speaker == persona_tag for t in s)]
    random.Random(seed).shuffle(mine)
    return fill_budget((unit_lines(s) for s in mine), count, budget_tokens)


def retrieval_context(
    index: ExchangeIndex, history: Sequence[Turn], count: CountFn, budget_tokens: int
) -> Context:
    """The exchanges most similar to `history` (BM25) filling the budget, the most similar last.

    When fewer exchanges match than the budget holds, the rest is filled with unmatched ones in corpus order,
    so the budget stays the same as the other methods'.
    """
    ranked: list[Exchange] = index.rank(history, include_unmatched=True)
    return fill_budget((unit_lines(ex.turns()) for ex in ranked), count, budget_tokens, best_last=True)


def fit_prompt(prompt: str, count: CountFn, max_tokens: int) -> str:
    """Drop the oldest history lines of `prompt` (never its final `[TAG]`) until it fits `max_tokens`."""
    lines = prompt.split("\n")
    while len(lines) > 1 and count("\n".join(lines)) > max_tokens:
        lines.pop(0)
    return "\n".join(lines)


def token_counter(tokenizer) -> CountFn:
    """Count tokens of a text with a HF tokenizer (no special tokens), memoised per text."""
    cache: dict[str, int] = {}

    def count(text: str) -> int:
        n = cache.get(text)
        if n is None:
            n = len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
            if len(cache) < 200_000:
                cache[text] = n
        return n

    return count
