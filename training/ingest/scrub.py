"""`--scrub`: replace personal identifiers in message text with placeholders, counting each kind.

Order matters: URLs first (they may hold an @ or long digit strings), then emails, IBANs (mod-97 checked),
payment cards (13-19 digits, Luhn-checked), and phone numbers last, so that a card or an IBAN is never
half-replaced as a phone. Phones are found by `phonenumbers` at the VALID leniency: numbers written with
`+` in any country, and national numbers of the regions given (setting `ingest.phone_regions`, default US). Matches that look like a date, a time
or a year range are left alone.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

URL_RE = re.compile(r"\b(?:https?://|www\.)[^\s<>\"]+", re.I)
EMAIL_RE = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# Country code, check digits, then 11-30 capitals/digits, run together or in printed groups of four.
IBAN_RE = re.compile(r"\b[A-Z]{2}\d{2}(?:[A-Z0-9]{11,30}|(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?)\b")
# Runs of digits joined by single spaces or dashes; cards are looked for inside them group by group.
DIGIT_RUN_RE = re.compile(r"(?<![\d\w])\d+(?:[ -]\d+)*(?![\d\w])")
_DATE_LIKE = re.compile(
    r"^\s*(?:\d{1,4}[./-]\d{1,2}[./-]\d{1,4}|\d{1,2}:\d{2}(?::\d{2})?|(?:19|20)\d{2}\s*[-/]\s*(?:19|20)?\d{2})\s*$"
)
_URL_TRAILING = ".,;:!?)]}'\""
_PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "url": "<URL>", "card": "<CARD>", "iban": "<IBAN>"}


def luhn_ok(digits: str) -> bool:
    """True if the digit string passes the Luhn checksum used by payment cards."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(candidate: str) -> bool:
    """True if `candidate` (spaces allowed) is 15-34 characters that pass the IBAN mod-97 check."""
    s = candidate.replace(" ", "").upper()
    if not 15 <= len(s) <= 34 or not (s[:2].isalpha() and s[2:4].isdigit()):
        return False
    rearranged = s[4:] + s[:4]
    try:
        return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1
    except ValueError:
        return False


def card_spans(text: str) -> list[tuple[int, int]]:
    """Spans of Luhn-valid 13-19 digit card numbers, whole digit groups only, longest first per run."""
    spans = []
    for run in DIGIT_RUN_RE.finditer(text):
        groups = [(m.start() + run.start(), m.end() + run.start()) for m in re.finditer(r"\d+", run.group())]
        i = 0
        while i < len(groups):
            found = None
            for j in range(len(groups) - 1, i - 1, -1):
                start, end = groups[i][0], groups[j][1]
                digits = re.sub(r"\D", "", text[start:end])
                if 13 <= len(digits) <= 19 and luhn_ok(digits):
                    found = j
                    spans.append((start, end))
                    break
            i = (found + 1) if found is not None else i + 1
    return spans


def check_regions(regions: Sequence[str]) -> tuple[str, ...]:
    """The region codes, upper-cased; ConfigError naming any that `phonenumbers` does not know."""
    import phonenumbers

    from errors import ConfigError

    codes = tuple(str(r).strip().upper() for r in regions)
    bad = [c for c in codes if c not in phonenumbers.SUPPORTED_REGIONS]
    if bad or not codes:
        raise ConfigError(
            f"ingest.phone_regions: {', '.join(map(repr, bad)) or 'empty'}: expected ISO 3166 region codes "
            "such as US, DE, IN (national phone numbers of these regions are scrubbed)"
        )
    return codes


class Scrubber:
    """Replace emails, phones, URLs, cards and IBANs with placeholders; `counts` tallies replacements."""

    def __init__(self, regions: Sequence[str] = ("US",)) -> None:
        self.regions = tuple(regions)
        self.counts: Counter = Counter()

    def scrub(self, text: str) -> str:
        """Return `text` with every identifier replaced by its placeholder (`<EMAIL>`, `<PHONE>`, ...)."""
        if not text:
            return text
        text = URL_RE.sub(self._url, text)
        if "@" in text:
            text = self._sub_until_stable(EMAIL_RE, "email", text)
        if sum(ch.isdigit() for ch in text) >= 7:
            text = IBAN_RE.sub(self._iban, text)
            text = self._replace_spans(text, card_spans(text), "card")
            text = self._phones(text)
        return text

    def _count(self, kind: str) -> str:
        self.counts[kind] += 1
        return _PLACEHOLDERS[kind]

    def _url(self, m: re.Match) -> str:
        url = m.group()
        stripped = url.rstrip(_URL_TRAILING)
        # keep a closing bracket that belongs to the URL, e.g. wikipedia's "Foo_(bar)"
        while stripped != url and url[len(stripped)] == ")" and stripped.count("(") > stripped.count(")"):
            stripped += ")"
        return self._count("url") + url[len(stripped) :]

    def _sub_until_stable(self, pattern: re.Pattern, kind: str, text: str) -> str:
        for _ in range(100):  # a replacement never creates a new match in practice; bound it anyway
            new = pattern.sub(lambda m: self._count(kind), text)
            if new == text:
                break
            text = new
        return text

    def _iban(self, m: re.Match) -> str:
        """Replace the longest prefix of the match (whole groups) that is a valid IBAN."""
        s = m.group()
        cut = len(s)
        while cut >= 15:
            if iban_ok(s[:cut]) and (cut == len(s) or s[cut] == " "):
                return self._count("iban") + s[cut:]
            space = s.rfind(" ", 0, cut)
            if space < 0:
                break
            cut = space
        return s

    def _replace_spans(self, text: str, spans: list[tuple[int, int]], kind: str) -> str:
        for start, end in sorted(spans, reverse=True):
            text = text[:start] + self._count(kind) + text[end:]
        return text

    def _phones(self, text: str) -> str:
        import phonenumbers

        for region in self.regions:
            spans = []
            for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
                raw = match.raw_string
                if sum(ch.isdigit() for ch in raw) < 7 or _DATE_LIKE.match(raw):
                    continue
                spans.append((match.start, match.end))
            text = self._replace_spans(text, spans, "phone")
        return text
