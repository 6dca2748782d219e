"""Metrics comparing a method's replies with the person's real replies.

A *reply* is one turn: the list of messages (a burst) the person, or a method, sent after a prompt.

**Style distance** (0 = same style, 1 = as different as the measure allows) is the mean of six components,
each in [0, 1]:

* `length`: Kolmogorov-Smirnov statistic between the message lengths in words;
* `burst`: Kolmogorov-Smirnov statistic between messages per reply;
* `lowercase`: absolute difference of the share of messages written all in lowercase (those with letters);
* `punctuation`: relative difference |a-b|/max(a,b,0.02) of punctuation characters per character;
* `emoji`: relative difference |a-b|/max(a,b,0.1) of emoji per message (the floors keep a few stray
  characters against none from counting as the whole difference);
* `vocabulary`: 1 - weighted Jaccard overlap of the word frequency distributions (sum of min / sum of max).

**Distinguishability**: ROC AUC of a char n-gram (1-4, TF-IDF) logistic regression telling real replies from
generated ones, cross-validated with folds grouped by prompt (a prompt's real and generated replies are always
in the same fold, so identical sets score exactly 0.5 instead of the classifier learning duplicates backwards).

**Semantic similarity**: per prompt, the mean cosine between sentence embeddings (all-MiniLM-L6-v2) of each
generated reply and the real reply; higher is closer in meaning.

**Intervals**: percentile bootstrap over prompts (`bootstrap_interval`): each statistic is recomputed on prompts
drawn with replacement, so an interval shows how much the figure depends on which prompts were drawn.

**Degeneration**: share of replies that are empty, that repeat themselves (a message twice in one reply, or
one word 3-gram looping 3+ times), that sound like an assistant (inference.candidates.assistant_voice: offers of
help, "as an AI", "I'm not sure what you're asking"), and of messages of 4+ words that copy a training message
verbatim.
"""

from __future__ import annotations

import math
import re
import unicodedata
from bisect import bisect_right
from collections import Counter
from collections.abc import Sequence

from inference.candidates import assistant_voice, loops

Reply = Sequence[str]

STYLE_COMPONENTS = ("length", "burst", "lowercase", "punctuation", "emoji", "vocabulary")
COPY_MIN_WORDS = 4
PUNCT_FLOOR = 0.02  # punctuation characters per character
EMOJI_FLOOR = 0.1  # emoji per message
_WORD_RE = re.compile(r"\w+", re.UNICODE)


def is_emoji(ch: str) -> bool:
    """Pictographic characters (emoji, symbols), not letters or punctuation."""
    cp = ord(ch)
    return (
        0x1F000 <= cp <= 0x1FAFF
        or 0x2600 <= cp <= 0x27BF
        or 0x2B00 <= cp <= 0x2BFF
        or 0x1F1E6 <= cp <= 0x1F1FF
        or (unicodedata.category(ch) == "So" and cp > 0x2000)
    )


def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch).startswith("P")


def words(text: str) -> list[str]:
    """Words of a message, lower-cased."""
    return _WORD_RE.findall(text.lower())


def ks_statistic(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: largest gap between the empirical CDFs (0 when identical)."""
    if not a or not b:
        return 0.0 if not a and not b else 1.0
    sa, sb = sorted(a), sorted(b)
    gap = 0.0
    for x in set(sa) | set(sb):
        gap = max(gap, abs(bisect_right(sa, x) / len(sa) - bisect_right(sb, x) / len(sb)))
    return gap


def _rel_diff(a: float, b: float, floor: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), floor)


def style_features(replies: Sequence[Reply]) -> dict:
    """Raw style figures of a set of replies (what the distance compares; also shown in the report)."""
    msgs = [m for r in replies for m in r]
    lengths = [len(words(m)) for m in msgs]
    lettered = [m for m in msgs if any(c.isalpha() for c in m)]
    chars = sum(len(m) for m in msgs)
    vocab = Counter(w for m in msgs for w in words(m))
    return {
        "replies": len(replies),
        "messages": len(msgs),
        "lengths": lengths,
        "bursts": [len(r) for r in replies],
        "mean_words": sum(lengths) / len(lengths) if lengths else 0.0,
        "mean_messages_per_reply": sum(len(r) for r in replies) / len(replies) if replies else 0.0,
        "lowercase_share": sum(m == m.lower() for m in lettered) / len(lettered) if lettered else 0.0,
        "punctuation_per_char": sum(_is_punct(c) for m in msgs for c in m) / chars if chars else 0.0,
        "emoji_per_message": sum(is_emoji(c) for m in msgs for c in m) / len(msgs) if msgs else 0.0,
        "vocab": vocab,
    }


def style_distance(real: Sequence[Reply], generated: Sequence[Reply]) -> dict:
    """Per-component distances and their mean `combined` (see the module docstring)."""
    fr, fg = style_features(real), style_features(generated)
    keys = set(fr["vocab"]) | set(fg["vocab"])
    tr, tg = sum(fr["vocab"].values()) or 1, sum(fg["vocab"].values()) or 1
    lo = sum(min(fr["vocab"][k] / tr, fg["vocab"][k] / tg) for k in keys)
    hi = sum(max(fr["vocab"][k] / tr, fg["vocab"][k] / tg) for k in keys)
    parts = {
        "length": ks_statistic(fr["lengths"], fg["lengths"]),
        "burst": ks_statistic(fr["bursts"], fg["bursts"]),
        "lowercase": abs(fr["lowercase_share"] - fg["lowercase_share"]),
        "punctuation": _rel_diff(fr["punctuation_per_char"], fg["punctuation_per_char"], PUNCT_FLOOR),
        "emoji": _rel_diff(fr["emoji_per_message"], fg["emoji_per_message"], EMOJI_FLOOR),
        "vocabulary": 1.0 - (lo / hi if hi else 1.0),
    }
    parts["combined"] = sum(parts[k] for k in STYLE_COMPONENTS) / len(STYLE_COMPONENTS)
    return parts


def style_reference(
    real: Sequence[Reply], pool: Sequence[Reply], n: int, draws: int = 20, seed: int = 0
) -> dict:
    """What a perfect imitation would still score: mean style distance between `real` and `draws` random sets of
    `n` replies from `pool`, the same person's other (training) replies. Small samples make every component
    noisy (KS statistics on a few lengths, vocabulary overlap of a few dozen words), so this floor is far from 0.
    """
    import random

    if not pool or not real or n < 1:
        return {k: 0.0 for k in (*STYLE_COMPONENTS, "combined")}
    rng = random.Random(seed)
    totals = dict.fromkeys((*STYLE_COMPONENTS, "combined"), 0.0)
    for _ in range(draws):
        sample = rng.sample(list(pool), min(n, len(pool)))
        for k, v in style_distance(real, sample).items():
            totals[k] += v / draws
    return totals


def calibrated_style(parts: dict, reference: dict) -> dict:
    """Style distance relative to the person's own variability: each component's excess over `reference`,
    max(0, d - ref) / (1 - ref), so 0 = as close as another sample of the person's real replies and 1 = as far as
    the measure allows; `combined` is the mean over components whose reference leaves room to measure (ref < 0.9).
    """
    out = {}
    for k in STYLE_COMPONENTS:
        ref = reference.get(k, 0.0)
        out[k] = max(0.0, parts[k] - ref) / max(1.0 - ref, 1e-9)
    usable = [k for k in STYLE_COMPONENTS if reference.get(k, 0.0) < 0.9]
    out["combined"] = sum(out[k] for k in usable) / len(usable) if usable else 0.0
    return out


def summary(replies: Sequence[Reply]) -> dict:
    """Style figures without the raw lists (for metrics.json)."""
    f = style_features(replies)
    return {k: v for k, v in f.items() if k not in ("lengths", "bursts", "vocab")}


def _reply_text(reply: Reply) -> str:
    return "\n".join(reply)


def distinguishability_scores(
    real: Sequence[Reply], generated: Sequence[Reply], real_groups: Sequence[int], gen_groups: Sequence[int],
    seed: int = 0,
) -> list[float] | None:
    """Out-of-fold P(real) of a char n-gram classifier for real + generated replies; None with too little data.

    `*_groups` give each reply's prompt index: folds never split a prompt.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline

    texts = [_reply_text(r) for r in real] + [_reply_text(r) for r in generated]
    labels = [1] * len(real) + [0] * len(generated)
    groups = list(real_groups) + list(gen_groups)
    n_splits = min(5, len(set(groups)))
    if len(real) < 2 or len(generated) < 2 or n_splits < 2:
        return None
    scores = [0.0] * len(texts)
    for train_idx, test_idx in GroupKFold(n_splits=n_splits).split(texts, labels, groups):
        y = [labels[i] for i in train_idx]
        if len(set(y)) < 2:
            return None
        model = make_pipeline(
            TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), lowercase=False, min_df=1),
            LogisticRegression(max_iter=1000, C=1.0, random_state=seed),
        )
        model.fit([texts[i] for i in train_idx], y)
        for i, p in zip(test_idx, model.predict_proba([texts[i] for i in test_idx])[:, 1], strict=True):
            scores[i] = float(p)
    return scores


def distinguishability_auc(
    real: Sequence[Reply], generated: Sequence[Reply], real_groups: Sequence[int], gen_groups: Sequence[int],
    seed: int = 0,
) -> float | None:
    """Cross-validated ROC AUC of a char n-gram classifier, real (1) vs generated (0); None with too little data.

    `*_groups` give each reply's prompt index: folds never split a prompt.
    """
    from sklearn.metrics import roc_auc_score

    scores = distinguishability_scores(real, generated, real_groups, gen_groups, seed)
    if scores is None:
        return None
    return float(roc_auc_score([1] * len(real) + [0] * len(generated), scores))


def semantic_similarity(
    real: Sequence[Reply], generated: Sequence[Reply], gen_groups: Sequence[int], embedder
) -> list[float]:
    """Per prompt: mean cosine between the embeddings of its generated replies and of its real reply.

    `embedder.encode(texts)` must return unit-length vectors (training.evaluate.retrieval.Embedder). An empty
    reply (real or generated) scores 0.
    """
    real_vecs = embedder.encode([_reply_text(r) for r in real])  # (n_prompts, dim)
    gen_vecs = embedder.encode([_reply_text(r) for r in generated])  # (n_generated, dim)
    sums = [0.0] * len(real)
    counts = [0] * len(real)
    for k, g in enumerate(gen_groups):
        empty = not _reply_text(generated[k]).strip() or not _reply_text(real[g]).strip()
        sums[g] += 0.0 if empty else float(real_vecs[g] @ gen_vecs[k])
        counts[g] += 1
    return [s / c if c else 0.0 for s, c in zip(sums, counts, strict=True)]


def bootstrap_interval(
    n_prompts: int, statistic, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of `statistic(prompt_indices)` over prompts resampled with replacement.

    `statistic` takes a list of prompt indices (with repeats) and returns a float or None; None when fewer than
    two prompts or no resample gives a value.
    """
    import random

    if n_prompts < 2 or resamples < 1:
        return None
    rng = random.Random(seed)
    values = []
    for _ in range(resamples):
        v = statistic([rng.randrange(n_prompts) for _ in range(n_prompts)])
        if v is not None and v == v:
            values.append(float(v))
    if not values:
        return None
    values.sort()
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    lo = values[min(len(values) - 1, int(lo_q * len(values)))]
    hi = values[min(len(values) - 1, int(hi_q * len(values)))]
    return lo, hi


def auc_from_scores(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """ROC AUC (Mann-Whitney, ties count half) without sklearn; None unless both labels occur."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    if not pos or not neg:
        return None
    neg_sorted = sorted(neg)
    from bisect import bisect_left

    wins = 0.0
    for p in pos:
        lo, hi = bisect_left(neg_sorted, p), bisect_right(neg_sorted, p)
        wins += lo + 0.5 * (hi - lo)
    return wins / (len(pos) * len(neg))


def _normalise(message: str) -> str:
    return " ".join(message.casefold().split())


def degeneration(replies: Sequence[Reply], training_messages: set[str]) -> dict:
    """Shares of empty, self-repeating and training-copying replies (see the module docstring).

    `training_messages` must hold messages normalised with `normalise_messages`.
    """
    n = len(replies)
    empty = sum(1 for r in replies if not any(m.strip() for m in r))
    repeated = sum(
        1 for r in replies if len({_normalise(m) for m in r}) < len(r) or any(loops(m) for m in r)
    )
    assistant = sum(1 for r in replies if any(assistant_voice(m) for m in r))
    long_msgs = [_normalise(m) for r in replies for m in r if len(words(m)) >= COPY_MIN_WORDS]
    copies = sum(1 for m in long_msgs if m in training_messages)
    return {
        "empty": empty / n if n else 0.0,
        "repeated": repeated / n if n else 0.0,
        "copied": copies / len(long_msgs) if long_msgs else 0.0,
        "assistant": assistant / n if n else 0.0,
    }


def normalise_messages(messages: Sequence[str]) -> set[str]:
    """The set `degeneration` compares against: casefolded, whitespace-collapsed, 4+ words only."""
    return {_normalise(m) for m in messages if len(words(m)) >= COPY_MIN_WORDS}


def nll_summary(pairs: Sequence[tuple[float, int]]) -> dict:
    """Mean NLL per completion token over all samples (token-weighted) and its perplexity."""
    total = sum(p[0] for p in pairs)
    tokens = sum(p[1] for p in pairs)
    if not tokens:
        return {"nll_per_token": None, "perplexity": None, "tokens": 0}
    nll = total / tokens
    return {"nll_per_token": nll, "perplexity": math.exp(min(nll, 700.0)), "tokens": tokens}
