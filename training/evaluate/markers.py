"""Texting-style markers: how often a set of replies shows each habit a reader recognises first.

A *reply* is one turn: the list of messages (a burst) the person, or a method, sent after a prompt. Every marker
is a share in [0, 1], counted as hits over a total so per-prompt counts add up (the study's bootstrap resamples
prompts and sums them):

| marker | hits / total |
|---|---|
| `lowercase` | messages written all in lowercase / messages with a letter |
| `final_punct` | messages whose last character is `.`, `!` or `?` / messages |
| `apostrophe` | messages holding an apostrophe (`'` or `’`) / messages |
| `short_forms` | short forms (u, ur, idk, tbh, btw, tho, bc, pls, rn, ppl, thx) / those plus their long forms (you, your, I don't know, to be honest, ...) |
| `laugh` | messages holding a laugh (lol, lmao, haha, hehe, rofl, xd) / messages |
| `emoji` | messages holding an emoji / messages |
| `burst` | replies of 2+ messages / replies |
| `short_message` | messages of at most 4 words / messages |

A marker with no total (no message with a letter, no you-word for `short_forms`) is undefined (None) and left
out of the error.

**Marker error** (`marker_error`): the mean absolute difference, over the markers defined on both sides, between
the rates of generated replies and of the person's real held-out replies. 0 = every habit at the person's rate;
1 = every habit at the opposite extreme (always where they never, never where they always).

How to read it, ceiling and chance:

* the *ceiling* (the best a method can score) is not 0: a finite sample of the person's own replies differs
  from the held-out ones by chance. `marker_reference` gives that floor, the error of random draws of the
  person's other (training) replies against the held-out ones, the same number of replies as the method was
  scored on;
* the *chance* level is a model that writes plausible replies with none of the person's habits; in the planted
  study (training.evaluate.planted, bench/idiolect.py) it is the person's own held-out replies before the style
  was planted (the same words, none of the habits), which scores the style's distance from natural text;
* a difference between two methods is real when its paired bootstrap interval over prompts excludes 0.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from training.evaluate.metrics import is_emoji, words

Reply = Sequence[str]

MARKERS = ("lowercase", "final_punct", "apostrophe", "short_forms", "laugh", "emoji", "burst", "short_message")
SHORT_MESSAGE_WORDS = 4

# Short form -> the long form it stands for (planted.py writes one or the other; the measure counts both).
SHORT_FORMS = {
    "idk": "i don't know", "tbh": "to be honest", "btw": "by the way", "rn": "right now", "ur": "your",
    "u": "you", "tho": "though", "bc": "because", "pls": "please", "ppl": "people", "thx": "thanks",
}
_SHORT_RE = re.compile(r"\b(?:idk|tbh|btw|rn|ur|u|tho|bc|cuz|pls|plz|ppl|thx)\b", re.IGNORECASE)
_LONG_RE = re.compile(
    r"\b(?:i do(?:n'|n’|n)?t know|to be honest|by the way|right now|you(?:'|’)?re|your|you|though|because|please|"
    r"people|thanks)\b",
    re.IGNORECASE,
)
LAUGH_RE = re.compile(r"\b(?:l+o+l+z?|lmf?a+o+|rofl|(?:ha){2,}h?|ha(?:ha)+|(?:he){2,}|xd+)\b", re.IGNORECASE)
_FINAL = (".", "!", "?")


def _has_letter(m: str) -> bool:
    return any(c.isalpha() for c in m)


def marker_counts(replies: Iterable[Reply]) -> dict[str, list[int]]:
    """{marker: [hits, total]} over `replies` (see the module docstring)."""
    c = {k: [0, 0] for k in MARKERS}
    for reply in replies:
        msgs = [m for m in reply if m.strip()]
        c["burst"][0] += len(msgs) >= 2
        c["burst"][1] += 1
        for m in msgs:
            s = m.strip()
            if _has_letter(s):
                c["lowercase"][0] += s == s.lower()
                c["lowercase"][1] += 1
            short, long = len(_SHORT_RE.findall(s)), len(_LONG_RE.findall(s))
            c["short_forms"][0] += short
            c["short_forms"][1] += short + long
            for key, hit in (
                ("final_punct", s.endswith(_FINAL)),
                ("apostrophe", "'" in s or "’" in s),
                ("laugh", LAUGH_RE.search(s) is not None),
                ("emoji", any(is_emoji(ch) for ch in s)),
                ("short_message", len(words(s)) <= SHORT_MESSAGE_WORDS),
            ):
                c[key][0] += hit
                c[key][1] += 1
    return c


def add_counts(parts: Iterable[dict[str, list[int]]]) -> dict[str, list[int]]:
    """Sum per-prompt `marker_counts` (what a bootstrap resample does)."""
    out = {k: [0, 0] for k in MARKERS}
    for p in parts:
        for k in MARKERS:
            out[k][0] += p[k][0]
            out[k][1] += p[k][1]
    return out


def rates_from_counts(counts: dict[str, list[int]]) -> dict[str, float | None]:
    """{marker: hits / total, None without a total}."""
    return {k: (counts[k][0] / counts[k][1] if counts[k][1] else None) for k in MARKERS}


def marker_rates(replies: Iterable[Reply]) -> dict[str, float | None]:
    """Each marker's rate in `replies`."""
    return rates_from_counts(marker_counts(replies))


def marker_differences(real: dict, generated: dict) -> dict[str, float | None]:
    """{marker: |generated - real|}, None where either rate is undefined."""
    return {
        k: (abs(generated[k] - real[k]) if real.get(k) is not None and generated.get(k) is not None else None)
        for k in MARKERS
    }


def marker_error(real: dict, generated: dict, only: Iterable[str] | None = None) -> float | None:
    """Mean absolute difference of the rates over markers defined on both sides (and in `only`, when given);
    None when none is. Methods are compared over one set (`common_markers`): a method that never writes a
    you-word must not drop `short_forms` from its error while another is charged for it."""
    keep = None if only is None else set(only)
    diffs = [d for k, d in marker_differences(real, generated).items()
             if d is not None and (keep is None or k in keep)]
    return sum(diffs) / len(diffs) if diffs else None


def marker_reference(real: Sequence[Reply], pool: Sequence[Reply], n: int, draws: int = 20, seed: int = 0) -> float:
    """The ceiling: mean marker error of `draws` random sets of `n` replies from `pool` (the person's training
    replies) against `real` (held out), i.e. what a perfect imitation still scores on samples this size."""
    import random

    if not pool or not real or n < 1:
        return 0.0
    rng = random.Random(seed)
    ref = marker_rates(real)
    total = 0.0
    for _ in range(draws):
        e = marker_error(ref, marker_rates(rng.sample(list(pool), min(n, len(pool)))))
        total += (e or 0.0) / draws
    return total


def common_markers(real: dict, methods: Iterable[dict]) -> list[str]:
    """The markers defined for the real replies and for every method's replies: the set marker errors that are
    compared with each other are computed over."""
    rates = list(methods)
    return [k for k in MARKERS if real.get(k) is not None and all(r.get(k) is not None for r in rates)]
