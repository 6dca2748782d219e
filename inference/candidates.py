"""Raw generations -> the candidates a user is shown: the one place this is done (worker, simulate, eval).

A raw completion is what the model wrote after `[TARGET]`, trimmed at the end of the burst. Cleaning it
(`clean`) keeps what a friend could have sent:

* its messages (prompt_format.split_completion), with a leading `[TARGET]` the model repeated removed and each
  message cut at the first `[TAG]` marker inside it (the model starting someone's turn mid-line) or at a
  half-written tag the token limit cut off; a message left empty, or that was only a tag, is dropped;
* a message that loops (a word 3-gram three times: "I'm so tired too I'm so tired too ...") is cut before the
  loop's second round; a message the burst already holds (same normalised text) is dropped;
* nothing left: the sample is rejected. A sample in the voice of an assistant ("How can I assist you?", "as an
  AI", `assistant_voice`) is usable but second choice: it is only shown when rounds run out.

`sample_candidates` is the orchestration, backend-agnostic: it asks `generate_fn(items, samples_per_item)` for
K = max(n, rerank_k) raw completions per item, cleans them, drops duplicates (normalised text), re-samples the
items short of n distinct good candidates (at most `max_resample_rounds` more calls, each for the missing
ones only), and with `rerank_k > 0` keeps the n that `score_fn` ranks highest. The score the backends give is
the adapter's per-token log-likelihood ratio to the bare base, (lp_adapter - lp_base) / tokens: what makes a
reply *theirs* rather than generic. Exactly n candidates come back when the model gives n distinct usable
ones within the rounds; fewer otherwise, never an empty one.

Pure Python, no torch: bots, the queue and tests import it freely.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from inference.prompt_format import render_completion, split_completion, trim_burst

T = TypeVar("T")
# (items, samples per item) -> raw completions per item, each trimmed at the end of its burst.
GenerateFn = Callable[[list[T], list[int]], list[list[str]]]
# (item, completion text) pairs -> one rerank score per pair, higher is better.
ScoreFn = Callable[[list[tuple[T, str]]], list[float]]

FLAWS = ("empty", "tag", "repeat", "loop", "assistant")  # what a raw sample can show (see `flaws`)

_TAG_MARK_RE = re.compile(r"\[[A-Z0-9_]+\]")
_HALF_TAG_RE = re.compile(r"\s*\[[A-Z0-9_]*\Z")  # "see you [RI" cut by the token limit
_WORD_RE = re.compile(r"\w+", re.UNICODE)
_NORM_RE = re.compile(r"[\W_]+", re.UNICODE)

# Phrases a chat model uses and a friend texting does not. Lower-cased text with straight apostrophes is
# matched; each pattern is specific enough not to fire on ordinary chat ("I can help you move on Sunday").
_ASSISTANT_PATTERNS = (
    r"\bas an ai\b",
    r"\bas a (?:large )?language model\b",
    r"\bi(?:'m| am) (?:just )?an? (?:ai|artificial intelligence|language model|virtual assistant|chatbot)\b",
    r"\bhow (?:can|may|could) i (?:help|assist)(?: you)?(?: today| with (?:that|this|anything))?\s*\?",
    r"\b(?:can|may) i (?:help|assist) you with\b",
    r"\bassist you\b",
    r"\bi can help you with (?:that|this|anything)\b",
    r"\bi(?:'d| would) be (?:happy|glad|delighted) to (?:help|assist)\b",
    r"\bhappy to assist\b",
    r"\bi(?:'m| am) here to (?:help|assist)\b",
    r"\bfeel free to (?:ask|reach out|let me know)\b",
    r"\bi(?:'m| am) not sure what you(?:'re| are) (?:asking|referring to|looking for)\b",
    r"\bif you have any (?:other |more |further )?questions\b",
    r"\bis there anything else (?:i can|you need)\b",
    r"\bi hope (?:this|that) helps\b",
    r"\bi apologi[sz]e for (?:the|any) (?:confusion|inconvenience)\b",
    r"\bi(?:'m| am) sorry,? but i (?:can't|cannot|am unable|'m unable)\b",
    r"\bi(?:'m| am) (?:unable|not able) to (?:assist|provide|browse|access)\b",
    r"\bi (?:don't|do not) have (?:personal (?:opinions|experiences|feelings)|feelings|emotions|access to)\b",
    r"\bcould you (?:please )?(?:provide|clarify|specify)\b",
    r"\bplease provide (?:more|additional) (?:details|information|context)\b",
)
_ASSISTANT_RE = re.compile("|".join(_ASSISTANT_PATTERNS))


def assistant_voice(text: str) -> bool:
    """True when `text` sounds like a chat assistant (offers of help, "as an AI", "I'm not sure what you're asking")."""
    return _ASSISTANT_RE.search(text.lower().replace("\u2019", "'")) is not None


def normalise(text: str) -> str:
    """Text compared for duplicates: case-folded, punctuation and whitespace runs collapsed to one space."""
    return _NORM_RE.sub(" ", text.casefold()).strip()


def loop_start(message: str) -> int | None:
    """Character offset where a message starts looping (a word 3-gram's second of 3+ rounds), else None."""
    spans = [(m.start(), m.group(0)) for m in _WORD_RE.finditer(message.lower())]
    grams = Counter(tuple(w for _, w in spans[i : i + 3]) for i in range(len(spans) - 2))
    looping = {g for g, c in grams.items() if c >= 3}
    if not looping:
        return None
    seen: set[tuple[str, ...]] = set()
    for i in range(len(spans) - 2):
        gram = tuple(w for _, w in spans[i : i + 3])
        if gram in looping:
            if gram in seen:
                return spans[i][0]
            seen.add(gram)
    return None  # pragma: no cover - a gram counted three times is always seen twice


def loops(message: str) -> bool:
    """True when one word 3-gram occurs three or more times in the message (it repeats itself)."""
    return loop_start(message) is not None


def _cut_tags(message: str, target: str) -> str:
    """The message without a leading `[TARGET]`, cut at the first other `[TAG]` marker or half-written tag."""
    text = message.strip()
    own = f"[{target}]"
    while text.startswith(own):
        text = text[len(own) :].lstrip()
    mark = _TAG_MARK_RE.search(text)
    if mark is not None:
        text = text[: mark.start()]
    return _HALF_TAG_RE.sub("", text).strip()


def flaws(raw: str, target: str) -> frozenset[str]:
    """What is wrong with a raw completion before cleaning (names from FLAWS); empty set for a clean one."""
    messages = split_completion(trim_burst(raw, target), target)
    found: set[str] = set()
    if not messages:
        found.add("empty")
    if any(_TAG_MARK_RE.search(m) or _HALF_TAG_RE.search(m) for m in messages):
        found.add("tag")
    if len({normalise(m) for m in messages}) < len(messages):
        found.add("repeat")
    if any(loops(m) for m in messages):
        found.add("loop")
    if any(assistant_voice(m) for m in messages):
        found.add("assistant")
    return frozenset(found)


def clean(raw: str, target: str) -> list[str]:
    """The messages worth showing from one raw completion ([] when nothing usable is left: reject the sample)."""
    kept: list[str] = []
    seen: set[str] = set()
    for message in split_completion(trim_burst(raw, target), target):
        text = _cut_tags(message, target)
        cut = loop_start(text)
        if cut is not None:
            text = text[:cut].rstrip()
        key = normalise(text)
        if not text or key in seen:
            continue
        seen.add(key)
        kept.append(text)
    return kept


def completion_text(messages: Sequence[str], target: str) -> str:
    """A candidate as the model would have written it after `[TARGET]` (no closing tag): what rerank scores."""
    return render_completion(target, messages, None).rsplit("\n", 1)[0]


def distinct(candidates: Sequence[Sequence[str]], n: int) -> list[list[str]]:
    """The first `n` candidates whose normalised texts differ (empty candidates skipped)."""
    out: list[list[str]] = []
    seen: set[str] = set()
    for candidate in candidates:
        key = normalise("\n".join(candidate))
        if candidate and key not in seen:
            seen.add(key)
            out.append(list(candidate))
            if len(out) == n:
                break
    return out


@dataclass
class Outcome:
    """What one item got: its candidates (best first), and counts of what it took."""

    candidates: list[list[str]]
    n: int = 0  # candidates asked for
    samples: int = 0  # raw completions drawn
    rounds: int = 0  # generate calls that included this item
    scored: int = 0  # candidates scored by rerank
    flaws: Counter = field(default_factory=Counter)  # raw completions per flaw (FLAWS)
    rejected: int = 0  # raw completions with nothing usable
    raw: list[str] = field(default_factory=list)  # every raw completion, in order drawn


@dataclass
class _Pool(Generic[T]):
    item: T
    target: str
    n: int
    good: list[list[str]] = field(default_factory=list)  # distinct usable, in order drawn
    fallback: list[list[str]] = field(default_factory=list)  # distinct, usable but in assistant voice
    keys: set[str] = field(default_factory=set)

    def add(self, messages: list[str]) -> None:
        key = normalise("\n".join(messages))
        if not messages or key in self.keys:
            return
        self.keys.add(key)
        (self.fallback if any(assistant_voice(m) for m in messages) else self.good).append(messages)


def sample_candidates(
    items: Sequence[T],
    targets: Sequence[str],
    ns: Sequence[int],
    generate_fn: GenerateFn,
    score_fn: ScoreFn | None = None,
    *,
    rerank_k: int | Sequence[int] = 0,
    max_resample_rounds: int = 2,
) -> list[Outcome]:
    """Clean, distinct (and with `rerank_k` reranked) candidates for every item: n each when the model allows.

    Round 0 draws K = max(n, rerank_k) per item; each later round (at most `max_resample_rounds`) draws, for the
    items still short of n good candidates, as many as are missing (at least 2). Items are passed to
    `generate_fn` as given; `score_fn` is called once, on every good candidate of the items reranked.
    `rerank_k` may be given per item (0: that item is not reranked).
    """
    ks = [rerank_k] * len(items) if isinstance(rerank_k, int) else list(rerank_k)
    if score_fn is None:
        ks = [0] * len(items)
    pools = [_Pool(item, target, n) for item, target, n in zip(items, targets, ns, strict=True)]
    outcomes = [Outcome([], p.n) for p in pools]
    want = [max(p.n, k) for p, k in zip(pools, ks, strict=True)]
    todo = list(range(len(pools)))
    for round_ in range(max_resample_rounds + 1):
        if not todo:
            break
        samples = want if round_ == 0 else [max(pools[i].n - len(pools[i].good), 2) for i in range(len(pools))]
        raws = generate_fn([pools[i].item for i in todo], [samples[i] for i in todo])
        for i, texts in zip(todo, raws, strict=True):
            out, pool = outcomes[i], pools[i]
            out.rounds += 1
            for raw in texts:
                out.samples += 1
                out.raw.append(raw)
                out.flaws.update(flaws(raw, pool.target))
                messages = clean(raw, pool.target)
                out.rejected += not messages
                pool.add(messages)
        todo = [i for i in todo if len(pools[i].good) < pools[i].n]
    if any(ks):
        reranked = [(p, out) for p, out, k in zip(pools, outcomes, ks, strict=True) if k > 0]
        pairs = [(p.item, completion_text(c, p.target)) for p, _ in reranked for c in p.good]
        scores = iter(score_fn(pairs) if pairs else [])
        for p, out in reranked:
            ranked = sorted(((next(scores), k) for k in range(len(p.good))), key=lambda sk: (-sk[0], sk[1]))
            out.scored = len(ranked)
            p.good = [p.good[k] for _, k in ranked]
    for p, out in zip(pools, outcomes, strict=True):
        out.candidates = (p.good + p.fallback)[: p.n]
    return outcomes


def greedy_split(samples: int, first_round: bool) -> tuple[int, int]:
    """(greedy rows, sampled rows) for a greedy request: one greedy row in the first round, the rest sampled.

    n greedy rows are n copies of one text, so the extra and re-drawn samples use a resample temperature.
    """
    greedy = 1 if first_round and samples > 0 else 0
    return greedy, samples - greedy


def rerank_score(lp_adapter: float, lp_base: float, tokens: int) -> float:
    """The rerank score of a completion: its log-likelihood ratio adapter/base per token (0 for no tokens)."""
    return (lp_adapter - lp_base) / tokens if tokens else 0.0
