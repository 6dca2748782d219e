"""Planted texting styles: rewrite one person's messages with habits at known rates, so a study knows the answer.

Real chat histories carry strong, stable habits (always lowercase, no final period, "u", a laugh they always use,
several short messages instead of one long one); chitchat-dataset strangers barely do. A `Style` rewrites one
speaker's bursts (the consecutive messages they sent, one reply) and leaves everyone else as written; a method
that learned the person shows the habits at the rates below, one that did not shows natural text's rates.

    burst -> expand or abbreviate short forms -> strip laughs and emoji -> case -> apostrophes
          -> split or join messages -> final punctuation -> add the signature laugh / emoji (per message, rate p)

Every step is deterministic: a coin for message i of a burst is drawn from sha256(seed, style, the burst's text,
i), so the same text always gets the same rewrite, and the rewrite never depends on the order bursts are seen.

The styles (`STYLES`), with the markers of training.evaluate.markers they fix (`Style.rates`; the others are
left to the text and only shifted, e.g. splitting raises `short_message`):

| style | lowercase | final_punct | apostrophe | short_forms | laugh | emoji | burst |
|---|---|---|---|---|---|---|---|
| `lowkey`: all lowercase, no final punctuation, no apostrophes, u/ur/idk/tbh, "lmao", long messages split | 1.0 | 0.0 | 0.0 | 1.0 | 0.35 | 0.0 | (raised) |
| `sunny`: capitalised, every message ends with ! or ? then 😊 on half, "haha" opens a quarter, words spelt out | 0.0 | 0.5 | (text) | 0.0 | 0.25 | 0.5 | (text) |
| `proper`: one message per reply, capitalised sentences with full stops, no laugh, no emoji, words spelt out | 0.0 | 1.0 | (text) | 0.0 | 0.0 | 0.0 | 0.0 |

Rates drawn per message (laugh, emoji) hold up to the coin's sampling error (a few points on a few hundred
messages); the others hold exactly, except that a burst left empty by the stripping becomes one filler message.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from training.evaluate.markers import LAUGH_RE, SHORT_FORMS
from training.evaluate.metrics import is_emoji, words

_APOSTROPHES = ("'", "’")
_SPLIT_WORDS = 8  # lowkey splits messages longer than this into a burst
_PIECE_WORDS = 4  # ... of pieces about this long


def _sub_ci(text: str, pattern: str, repl: str) -> str:
    return re.sub(pattern, repl, text, flags=re.IGNORECASE)


def abbreviate(text: str) -> str:
    """Long forms -> short forms (you -> u, I don't know -> idk, ...)."""
    text = _sub_ci(text, r"\bi do(?:n'|n’|n)?t know\b", "idk")
    text = _sub_ci(text, r"\byou(?:'|’)?re\b", "ur")
    for short, long in SHORT_FORMS.items():
        if short != "idk":
            text = _sub_ci(text, rf"\b{long}\b", short)
    return text


def expand(text: str) -> str:
    """Short forms -> long forms (u -> you, idk -> I don't know, ...)."""
    text = _sub_ci(text, r"\bcuz\b", "because")
    text = _sub_ci(text, r"\bplz\b", "please")
    for short, long in SHORT_FORMS.items():
        text = _sub_ci(text, rf"\b{short}\b", "I don't know" if short == "idk" else long)
    return text


def _tidy(text: str) -> str:
    text = re.sub(r"\s+([,.!?])", r"\1", " ".join(text.split()))
    return text.lstrip(" ,.;:-").strip()


def strip_laughs(text: str) -> str:
    """The message without laugh tokens."""
    return _tidy(LAUGH_RE.sub(" ", text))


def strip_emoji(text: str) -> str:
    """The message without emoji (and the variation selectors that follow them)."""
    return _tidy("".join(c for c in text if not is_emoji(c) and c not in "\ufe0f\u200d"))


def capitalise(text: str) -> str:
    """First letter upper-case, the standalone pronoun "i" as "I"."""
    text = re.sub(r"\bi\b", "I", text)
    for k, c in enumerate(text):
        if c.isalpha():
            return text[:k] + c.upper() + text[k + 1:]
    return text


def split_long(text: str) -> list[str]:
    """A long message as a burst: at sentence ends, then pieces of about `_PIECE_WORDS` words."""
    if len(words(text)) <= _SPLIT_WORDS:
        return [text]
    out = []
    for sentence in re.split(r"(?<=[.!?,;])\s+", text):
        toks = sentence.split()
        if len(toks) <= _SPLIT_WORDS:
            out.append(sentence)
            continue
        pieces = -(-len(toks) // _PIECE_WORDS)
        size = -(-len(toks) // pieces)
        out += [" ".join(toks[i:i + size]) for i in range(0, len(toks), size)]
    return [p for p in out if p.strip()]


@dataclass(frozen=True, slots=True)
class Style:
    """One planted texting style: its steps and the marker rates they fix (`rates`)."""

    name: str
    description: str
    rates: dict = field(hash=False)  # marker -> designed rate (training.evaluate.markers names)
    lowercase: bool = False  # else capitalised
    short_forms: bool = False  # abbreviate, else spell out
    drop_apostrophes: bool = False
    split: bool = False  # long messages -> several short ones
    join: bool = False  # a burst -> one message
    final: str = ""  # "": strip final punctuation; "!": end with ! (or ?); ".": end with . (or ! ?)
    laugh: str = ""  # signature laugh, added with probability laugh_rate ...
    laugh_rate: float = 0.0
    laugh_first: bool = False  # ... at the start (else at the end)
    emoji: str = ""  # signature emoji, appended with probability emoji_rate
    emoji_rate: float = 0.0
    filler: str = "ok"  # a burst left empty becomes this

    def _coin(self, seed: int, burst: Sequence[str], i: int, what: str) -> float:
        h = hashlib.sha256(f"{seed}\x1f{self.name}\x1f{what}\x1f{i}\x1f".encode() + "\x1e".join(burst).encode())
        return random.Random(int.from_bytes(h.digest()[:8], "big")).random()

    def _message(self, text: str) -> str:
        text = abbreviate(text) if self.short_forms else expand(text)
        text = strip_emoji(strip_laughs(text))
        text = text.lower() if self.lowercase else capitalise(text)
        if self.drop_apostrophes:
            text = "".join(c for c in text if c not in _APOSTROPHES)
        return text

    def _end(self, text: str) -> str:
        if not self.final:
            return text.rstrip(".!?,;: ")
        body = text.rstrip(".!,;: ") if self.final == "!" else text.rstrip(",;: ")
        if body.endswith(("?", "!", ".") if self.final == "." else ("?",)):
            return body
        return body + self.final

    def rewrite(self, burst: Sequence[str], seed: int = 0) -> list[str]:
        """The burst as this person would have texted it (deterministic in `seed` and the burst's text)."""
        msgs = [m for m in (self._message(t) for t in burst) if m]
        if self.split:
            msgs = [p for m in msgs for p in split_long(m)]
        if self.join and msgs:
            msgs = [" ".join(self._end(m) if self.final else m for m in msgs)]
        msgs = [e for e in (self._end(m) for m in msgs) if e.strip(".!? ")]
        if not msgs:
            msgs = [self.filler]
        out = []
        for i, m in enumerate(msgs):
            if self.laugh and self._coin(seed, burst, i, "laugh") < self.laugh_rate:
                m = f"{self.laugh} {m[0].lower() + m[1:]}" if self.laugh_first else f"{m} {self.laugh}"
                if not self.lowercase:
                    m = capitalise(m)
            if self.emoji and self._coin(seed, burst, i, "emoji") < self.emoji_rate:
                m = f"{m} {self.emoji}"
            out.append(m)
        return out


STYLES: dict[str, Style] = {
    s.name: s
    for s in (
        Style(
            "lowkey",
            "all lowercase, no final punctuation, apostrophes dropped, u/ur/idk/tbh, 'lmao' on about a third of "
            "messages, no emoji, long messages split into bursts of short ones",
            rates={"lowercase": 1.0, "final_punct": 0.0, "apostrophe": 0.0, "short_forms": 1.0, "laugh": 0.35,
                   "emoji": 0.0},
            lowercase=True, short_forms=True, drop_apostrophes=True, split=True, final="",
            laugh="lmao", laugh_rate=0.35, filler="ok",
        ),
        Style(
            "sunny",
            "capitalised, every message ends with ! (or ?) and half of them then with 😊, 'haha' opens a quarter "
            "of messages, words spelt out (you, I don't know)",
            rates={"lowercase": 0.0, "final_punct": 0.5, "short_forms": 0.0, "laugh": 0.25, "emoji": 0.5},
            short_forms=False, final="!", laugh="haha", laugh_rate=0.25, laugh_first=True,
            emoji="😊", emoji_rate=0.5, filler="Yes!",
        ),
        Style(
            "proper",
            "one message per reply, capitalised sentences ending with a full stop, no laugh, no emoji, words "
            "spelt out",
            rates={"lowercase": 0.0, "final_punct": 1.0, "short_forms": 0.0, "laugh": 0.0, "emoji": 0.0,
                   "burst": 0.0},
            short_forms=False, join=True, final=".", filler="Okay.",
        ),
    )
}


def get_style(name: str) -> Style:
    """The style called `name`; ValueError naming the known ones otherwise."""
    try:
        return STYLES[name]
    except KeyError:
        raise ValueError(f"unknown planted style {name!r} (known: {', '.join(STYLES)})") from None
