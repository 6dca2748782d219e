"""WhatsApp "Export chat" .txt files from Android and iOS, in their locale variants.

Line shapes (the date order and clock depend on the phone's locale):

    12/31/21, 9:05 PM - Alice: hi                   Android, US
    31/12/2021, 21:05 - Alice: hi                   Android, most of Europe
    [31.12.21, 21:05:33] Alice: hi                  iOS, German
    \u200e[12/31/21, 9:05:33\u202fPM] Alice: \u200eimage omitted       iOS, marks and narrow no-break space

Whether `01/02` is 1 February or 2 January cannot be told from one line, so the file is read twice: the
first pass keeps, for day-first and month-first, whether every date is valid that way and how often the
timestamps would go backwards; the second pass parses with the order that fits best. Memory stays flat.

WhatsApp has no ids: `speaker_id` is the display name and `reply_to` is null. The chat is named after
the file: the stem without the "WhatsApp Chat with " / "WhatsApp Chat - " prefix, and for iOS's
`_chat.txt` the name of the folder it was unzipped into. Timestamps carry no zone; they are read in
`ctx.tz`. Invisible U+200E marks are removed from the text.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from convo.errors import IngestError
from training.ingest.base import ParseContext, utf8_lines
from training.ingest.records import Message

_MARKS = "\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\ufeff"
_DATE = r"(?P<d1>\d{1,4})(?P<sep>[./-])(?P<d2>\d{1,2})(?P=sep)(?P<d3>\d{1,4})\.?"
_TIME = r"(?P<hh>\d{1,2})[:.](?P<mm>\d{2})(?:[:.](?P<ss>\d{2}))?"
_AMPM = r"(?:\s?(?P<ampm>[AaPp]\.?\s?[Mm]\.?))?"
# \s also matches U+202F and U+00A0, which real exports put before AM/PM and after the comma.
_HEADER = re.compile(
    # iOS: "[date, time] body"; Android: "date, time - body".
    rf"^[{_MARKS}]*(?P<bracket>\[)?{_DATE},?\s{_TIME}{_AMPM}(?(bracket)\]\s|\s[-\u2013]\s)(?P<body>.*)$"
)
_SPEAKER = re.compile(r"^(?P<name>[^:\n]{1,80}?):(?:\s(?P<text>.*)|)$", re.S)

# Android writes system events as a header without "Name: ". A few carry a colon inside quotes
# (`Alice changed the subject from "a" to "b: c"`), so a "name" holding one of these phrases is an event.
_SYSTEM_NAME = re.compile(
    r" (?:changed the subject|changed the group|changed this group|created group|created the group"
    r"|changed the community)"
)
_SYSTEM_TEXT = re.compile(
    r"^(?:Missed (?:group )?(?:voice|video) call|(?:Voice|Video) call|Silenced (?:voice|video) call)"
    r"(?:, .*)?\.?$",
    re.I,
)
_MEDIA = re.compile(
    r"^(?:<Media omitted>|<Medien ausgeschlossen>|<Multimedia omitido>|<Médias omis>|<Media weggelaten>"
    r"|<Media tidak disertakan>|<View once (?:voice )?message omitted>"
    r"|(?:image|video|audio|sticker|GIF|document|Contact card|voice message) omitted"
    r"|.*\u2022.*document omitted"
    r"|(?:Location|Live location): https?://\S+"
    r"|.+ \(file attached\)"
    r"|<attached: [^>]*>)$",
    re.I,
)
_ATTACHED = re.compile(r"<attached: [^>]*>|^.+?\.\w{2,5} \(file attached\)$", re.M)
_DELETED = re.compile(r"^(?:This message was deleted|You deleted this message)\.?$", re.I)
_OTHER_PLACEHOLDER = re.compile(r"^(?:null|<Message deleted by admin>|Waiting for this message.*)$", re.I)
_EDITED = re.compile(r"\s*\u200e?<This message was edited>\s*$")
_CHAT_PREFIXES = ("WhatsApp Chat with ", "WhatsApp Chat - ", "WhatsApp-Chat mit ", "Chat de WhatsApp con ")

EXPECTED = "expected a WhatsApp line like '31/12/2021, 21:05 - Name: text' or '[31.12.21, 21:05:33] Name: text'"


@dataclass(frozen=True, slots=True)
class _Stamp:
    """The raw numbers of one header, before the date order is known."""

    d1: int
    d2: int
    d3: int
    year_first: bool
    hour: int
    minute: int
    second: int


def chat_name(path: Path) -> str:
    """The chat title for an export file: stem without the "WhatsApp Chat with " prefix."""
    stem = path.stem
    if stem == "_chat" and path.parent.name:  # iOS: _chat.txt inside "WhatsApp Chat - Alice.zip"
        stem = path.parent.name
    for prefix in _CHAT_PREFIXES:
        if stem.startswith(prefix) and len(stem) > len(prefix):
            return stem[len(prefix) :]
    return stem


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, without line ends; bad bytes raise with their offset."""
    fix = "WhatsApp exports are UTF-8, re-export the chat or convert the file"
    for number, text in utf8_lines(path, fix):
        yield number, text.rstrip("\r\n")


def _stamp(m: re.Match) -> _Stamp | None:
    """The numbers of a header match, with the clock already in 24h; None if the time is impossible."""
    hour, minute, second = int(m["hh"]), int(m["mm"]), int(m["ss"] or 0)
    ampm = m["ampm"]
    if ampm:
        if not 1 <= hour <= 12:
            return None
        pm = ampm[0] in "pP"
        hour = hour % 12 + (12 if pm else 0)
    if hour > 23 or minute > 59 or second > 59:
        return None
    return _Stamp(int(m["d1"]), int(m["d2"]), int(m["d3"]), len(m["d1"]) == 4, hour, minute, second)


def _datetime(s: _Stamp, day_first: bool, tz) -> datetime | None:
    """The timestamp of `s` read with the given date order, or None if it is no valid date that way."""
    if s.year_first:
        year, month, day = s.d1, s.d2, s.d3
    elif day_first:
        day, month, year = s.d1, s.d2, s.d3
    else:
        month, day, year = s.d1, s.d2, s.d3
    if year < 100:
        year += 2000
    try:
        return datetime(year, month, day, s.hour, s.minute, s.second, tzinfo=tz)
    except ValueError:
        return None


def _header(line: str) -> tuple[re.Match, _Stamp] | None:
    m = _HEADER.match(line)
    if m is None:
        return None
    s = _stamp(m)
    return None if s is None else (m, s)


def detect_day_first(path: Path) -> bool:
    """Decide the date order of a whole file: the reading under which every date is valid and time
    runs forward most often; ties go by locale habit (12h clock: month-first, else day-first)."""
    valid = {True: True, False: True}
    backwards = {True: 0, False: 0}
    previous: dict[bool, datetime | None] = {True: None, False: None}
    twelve_hour = dotted = False
    first_bad: dict[bool, int] = {}
    for number, line in _lines(path):
        hit = _header(line)
        if hit is None:
            continue
        m, s = hit
        if s.year_first:
            return True  # irrelevant: year-month-day has one reading
        twelve_hour = twelve_hour or bool(m["ampm"])
        dotted = dotted or m["sep"] == "."
        for order in (True, False):
            if not valid[order]:
                continue
            ts = _datetime(s, order, None)
            if ts is None:
                valid[order] = False
                first_bad[order] = number
                continue
            if previous[order] is not None and ts < previous[order]:
                backwards[order] += 1
            previous[order] = ts
    if valid[True] and valid[False]:
        if backwards[True] != backwards[False]:
            return backwards[True] < backwards[False]
        return dotted or not twelve_hour
    if valid[True] or valid[False]:
        return valid[True]
    raise IngestError(
        f"{path}:{first_bad[False]}: dates fit neither day-first (line {first_bad[True]} is no valid "
        "date that way) nor month-first order; the file mixes locales, export each chat again"
    )


class WhatsAppParser:
    """See the module docstring."""

    name = "whatsapp"

    def sniff(self, path: Path, head: bytes) -> bool:
        """True if the first non-blank line of `head` is a WhatsApp message header."""
        text = head.decode("utf-8", errors="ignore").removeprefix("\ufeff")
        for line in text.splitlines()[:5]:
            if line.strip():
                return _header(line) is not None
        return False

    def parse(self, path: Path, ctx: ParseContext) -> Iterator[Message]:
        """Stream the messages of one export in file order, counting dropped lines in ctx.skipped."""
        day_first = detect_day_first(path)
        chat = chat_name(path)
        pending: tuple[datetime, str, list[str]] | None = None  # (ts, body first line, continuation lines)
        seen_header = False
        for number, line in _lines(path):
            hit = _header(line)
            if hit is None:
                if pending is not None:
                    pending[2].append(line)
                elif line.strip():
                    raise IngestError(f"{path}:{number}: {EXPECTED}")
                continue
            seen_header = True
            m, s = hit
            if pending is not None:
                msg = self._message(chat, *pending, ctx)
                if msg is not None:
                    yield msg
            ts = _datetime(s, day_first, ctx.tz)
            if ts is None:  # detect_day_first checked every date; only reachable via a race on the file
                raise IngestError(f"{path}:{number}: invalid date in WhatsApp header")
            pending = (ts, m["body"], [])
        if not seen_header:
            raise IngestError(f"{path}:1: {EXPECTED}")
        if pending is not None:
            msg = self._message(chat, *pending, ctx)
            if msg is not None:
                yield msg

    def _message(
        self, chat: str, ts: datetime, body: str, more: list[str], ctx: ParseContext
    ) -> Message | None:
        """Build one Message, or count why the entry is dropped and return None."""
        sm = _SPEAKER.match(body)
        if sm is None or _SYSTEM_NAME.search(sm["name"]):
            ctx.skipped["system"] += 1
            return None
        speaker = sm["name"].strip(_MARKS + " ")
        raw_text = "\n".join([sm["text"] or "", *more])
        text = _EDITED.sub("", raw_text).replace("\u200e", "").strip()
        kind = self._placeholder(text)
        if kind == "deleted" and text.lower().startswith("you deleted"):
            ctx.me_hints.add(speaker)
        if kind is None and raw_text.startswith("\u200e"):
            # iOS marks media and system events with a leading U+200E; typed text never starts with one.
            kind = "system"
        if kind is None and _SYSTEM_TEXT.match(text):
            kind = "system"
        if kind is None and _ATTACHED.search(text):  # media with a caption: keep the caption
            text = _ATTACHED.sub("", text).strip()
            kind = None if text else "media_only"
        if kind is None and not text:
            kind = "empty"
        if kind is None and not speaker:
            kind = "system"
        if kind is not None:
            ctx.skipped[kind] += 1
            return None
        return Message(chat=chat, ts=ts, speaker=speaker, speaker_id=speaker, text=text, source="whatsapp")

    @staticmethod
    def _placeholder(text: str) -> str | None:
        """The skip reason if `text` is a WhatsApp placeholder instead of something the person typed."""
        if _DELETED.match(text):
            return "deleted"
        if _MEDIA.match(text):
            return "media_only"
        if _OTHER_PLACEHOLDER.match(text):
            return "placeholder"
        return None


PARSER = WhatsAppParser()
