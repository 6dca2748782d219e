"""WhatsApp "Export chat" .txt files from Android and iOS, in the date and time shapes of every locale.

A message starts with a header; lines without one continue the message above. The header is parsed by one
regular expression assembled from the tables below, so a new locale is usually a new table entry:

    12/31/21, 9:05 PM - Alice: hi                   Android, US (12-hour clock, month first)
    31/12/2021, 21:05 - Alice: hi                   Android, most of Europe
    31.12.21, 21:05 - Alice: hi                     Android, German, Russian...
    31. 12. 21 21:05 - Alice: hi                    Android, Czech, Slovak (". " separators)
    2021. 12. 31. 오후 9:05 - Alice: hi              Android, Korean (year first, AM/PM word before the time)
    2021/12/31 午後9:05 - Alice: hi                  Android, Japanese
    31/12/2021 à 21:05 - Alice: hi                  Android, French ("à", "klo", "um" between date and time)
    31/12/21, 9:05 p. m. - Alice: hi                Android, Spanish (no-break spaces inside "p. m.")
    ‏31‏/12‏/2021 9:05 م - Alice: hi    Android, Arabic (right-to-left marks; Arabic-Indic digits too)
    [31.12.21, 21:05:33] Alice: hi                  iOS, German
    ‎[12/31/21, 9:05:33 PM] Alice: hi          iOS, US (left-to-right mark, narrow no-break space)

Tables: `SEPARATORS` (between date parts), `CONNECTORS` (words between date and time), `AM_WORDS` and
`PM_WORDS` (12-hour markers, written before or after the time), `MARKS` (invisible direction marks, allowed
between any two parts). Two-digit years are 20xx; a four-digit first part means year-month-day.

Day-first or month-first is decided per file, from the whole file (read twice, so memory stays flat): a first
number above 12 anywhere means day-first, a second number above 12 month-first (both: an error naming the two
lines). Otherwise, if time runs forward under one order and backwards under the other, that order. Otherwise
`ctx.date_order` ("dmy"/"mdy", from --date-order) decides, and without it the file is an error that asks
for --date-order.

A header with odd values is read leniently and reported in `ctx.warnings` with file and line: an hour 00 on
an AM/PM clock (00:15 AM = 00:15, 00:15 PM = 12:15; normal, so not reported, with 午前/午後 and 上午/下午)
or 13-23 with AM/PM (read as 24-hour). A header with
impossible values (minute 75, month 13 in both orders) is an IngestError with file and line. A line that
starts like a timestamp but is no header (no ` - ` / `]` after the time) is kept as a continuation line
and reported in `ctx.warnings`, never merged silently.

WhatsApp has no ids: `speaker_id` is the display name, `reply_to`, `id` and `chat_id` are null. The chat is
named after the file: the stem without the "WhatsApp Chat with " prefix (or its translation), and for iOS's
`_chat.txt` the name of the folder it was unzipped into. Timestamps carry no zone; they are read in
`ctx.tz`. Invisible U+200E marks are removed from the text.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from errors import IngestError
from training.ingest.base import ParseContext, utf8_lines
from training.ingest.records import Message

# ---------------------------------------------------------------- the tables

MARKS = "\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u061c\ufeff"
SEPARATORS = ("/", ".", "-", ". ")  # between day, month and year; ". " as in Czech "31. 12. 21"
CONNECTORS = ("klo", "à", "a las", "um", "at", "às", "alle", "kl.", "o")  # "31/12/2021 à 21:05"
# 12-hour markers. Latin "AM"/"a.m."/"a. m." (any case, any spaces) are matched by a pattern; these are the others.
AM_WORDS = ("ص", "午前", "오전", "上午", "早上", "凌晨", "π.μ.", "πμ", "ق.ظ.", "ق.ظ", "SA", "vorm.", "ก่อนเที่ยง",
            "पूर्वाह्न", "পূর্বাহ্ণ", "قبل دوپہر", "ৰাতিপুৱা")
PM_WORDS = ("م", "午後", "오후", "下午", "中午", "晚上", "μ.μ.", "μμ", "ب.ظ.", "ب.ظ", "CH", "nachm.", "หลังเที่ยง",
            "अपराह्न", "অপরাহ্ণ", "بعد دوپہر", "আবেলি")
CHAT_PREFIXES = ("WhatsApp Chat with ", "WhatsApp Chat - ", "WhatsApp-Chat mit ", "Chat de WhatsApp con ",
                 "Conversa do WhatsApp com ", "Discussion WhatsApp avec ", "WhatsApp-chat met ", "Chat WhatsApp con ",
                 "WhatsApp-chat med ", "Чат WhatsApp с ", "WhatsApp Chat mit ")

# ---------------------------------------------------------------- the header pattern, built from the tables

_M = f"[{MARKS}]*"
_LATIN_AMPM = r"[AaPp]\.?\s?[Mm]\.?"
_WORDS = "|".join(re.escape(w) for w in sorted(AM_WORDS + PM_WORDS, key=len, reverse=True))
_AMPM = rf"(?:{_LATIN_AMPM}|{_WORDS})"
_SEP = "|".join(re.escape(s) for s in sorted(SEPARATORS, key=len, reverse=True))
_CONNECT = "|".join(re.escape(c) for c in sorted(CONNECTORS, key=len, reverse=True))
_DATE = rf"(?P<d1>\d{{1,4}}){_M}(?P<sep>{_SEP}){_M}(?P<d2>\d{{1,2}}){_M}(?P=sep){_M}(?P<d3>\d{{1,4}}){_M}\.?"
_TIME = r"(?P<hh>\d{1,2})[:.](?P<mm>\d{2})(?:[:.](?P<ss>\d{2}))?"
_BETWEEN = rf"(?:,{_M}\s*|\s+)(?:(?:{_CONNECT})\s+)?{_M}"
_START = rf"^{_M}(?P<bracket>\[)?{_M}{_DATE}{_BETWEEN}(?:(?P<ampm1>{_AMPM}){_M}\s?{_M})?{_TIME}"
_HEADER = re.compile(
    # iOS: "[date, time] body"; Android: "date, time - body". \s also matches U+202F and U+00A0.
    rf"{_START}(?:{_M}\s?{_M}(?P<ampm2>{_AMPM}))?{_M}(?(bracket)\]\s|(?:\s?[-\u2013]\s|:\s))(?P<body>.*)$"
)
_LOOKS_LIKE_HEADER = re.compile(_START)  # a date and a time at the start of a line
_SPEAKER = re.compile(r"^(?P<name>[^:\n]{1,80}?):(?:\s(?P<text>.*)|)$", re.S)
_AM_SET = frozenset(AM_WORDS)

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
# What WhatsApp writes instead of something the person typed, in the languages most exports come in. The strings
# are WhatsApp's own (its Android `export_media_omitted` / `revoked_msg_*` strings and iOS Localizable keys, as
# collected by open-source export parsers such as chat-analytics and whatsapp-chat-parser, and seen in real exports
# quoted by other parsers' tests); one language's column may hold several wordings because they changed across
# versions. A locale with no known wording for a row has none rather than a guess.
PLACEHOLDERS: dict[str, dict[str, tuple[str, ...]]] = {
    # media: Android "export without media" line; ios_media: iOS's per-kind stubs; deleted: someone else's deleted message; you_deleted: the
    # exporting user's own (it names them, see me_hints); edited: the suffix after an edited message.
    "en": {"media": ("<Media omitted>",), "ios_media": ("image omitted", "video omitted", "audio omitted", "sticker omitted", "GIF omitted", "document omitted",
                     "Contact card omitted", "voice message omitted"),
           "deleted": ("This message was deleted",),
           "you_deleted": ("You deleted this message",), "edited": ("<This message was edited>",)},
    "es": {"media": ("<Multimedia omitido>", "<Archivo omitido>"),
           "ios_media": ("imagen omitida", "video omitido", "audio omitido", "sticker omitido", "GIF omitido", "documento omitido"),
           "deleted": ("Se eliminó este mensaje", "Este mensaje fue eliminado"),
           "you_deleted": ("Eliminaste este mensaje",), "edited": ("<Se editó este mensaje.>", "<Mensaje editado>")},
    "pt": {"media": ("<Mídia oculta>", "<Mídia omitida>", "<Arquivo de mídia oculto>", "<Multimédia omitido>",
                     "<Ficheiro não revelado>"),
           "ios_media": ("imagem ocultada", "vídeo omitido", "áudio ocultado", "figurinha omitida", "documento omitido"),
           "deleted": ("Mensagem apagada", "Esta mensagem foi apagada", "Essa mensagem foi apagada",
                       "Esta mensagem foi eliminada"),
           "you_deleted": ("Você apagou esta mensagem", "Apagou esta mensagem", "Eliminou esta mensagem"),
           "edited": ("<Mensagem editada>", "<Esta mensagem foi editada>")},
    "de": {"media": ("<Medien ausgeschlossen>", "<Medien weggelassen>"),
           "ios_media": ("Bild weggelassen", "Video weggelassen", "Audio weggelassen", "Sticker weggelassen", "GIF weggelassen",
                     "Dokument weggelassen"),
           "deleted": ("Diese Nachricht wurde gelöscht",),
           "you_deleted": ("Du hast diese Nachricht gelöscht", "Sie haben diese Nachricht gelöscht"),
           "edited": ("<Diese Nachricht wurde bearbeitet>",)},
    "fr": {"media": ("<Médias omis>", "<Fichier omis>"), "ios_media": ("image absente", "vidéo absente", "audio omis", "sticker omis", "GIF retiré", "document manquant"),
           "deleted": ("Ce message a été supprimé",),
           "you_deleted": ("Vous avez supprimé ce message",), "edited": ("<Ce message a été modifié>",)},
    "it": {"media": ("<Media omessi>", "<Media omesso>"), "ios_media": ("immagine omessa", "video omesso", "audio omesso", "sticker non incluso", "GIF esclusa", "documento omesso"),
           "deleted": ("Questo messaggio è stato eliminato",),
           "you_deleted": ("Hai eliminato questo messaggio",), "edited": ("<Questo messaggio è stato modificato>",)},
    "ru": {"media": ("<Без медиафайлов>", "<Файл пропущен>"),
           "ios_media": ("изображение отсутствует", "видео отсутствует", "аудиофайл отсутствует", "стикер не добавлен",
                     "GIF отсутствует", "документ отсутствует"),
           "deleted": ("Данное сообщение удалено", "Это сообщение удалено"),
           "you_deleted": ("Вы удалили данное сообщение", "Вы удалили это сообщение"),
           "edited": ("<Сообщение изменено>",)},
    "tr": {"media": ("<Medya dahil edilmedi>", "<Medya atlanmış>"), "ios_media": ("görüntü dahil edilmedi", "video dahil edilmedi", "ses dahil edilmedi", "Çıkartma dahil edilmedi",
                     "GIF dahil edilmedi", "belge dahil edilmedi"),
           "deleted": ("Bu mesaj silindi",),
           "you_deleted": ("Bu mesajı sildiniz",), "edited": ("<Bu mesaj düzenlendi>",)},
    "id": {"media": ("<Media tidak disertakan>",), "ios_media": ("gambar tidak disertakan", "video tidak disertakan", "audio tidak disertakan", "stiker tidak disertakan",
                     "GIF tidak disertakan", "dokumen tidak disertakan"),
           "deleted": ("Pesan ini telah dihapus", "Pesan ini dihapus"),
           "you_deleted": ("Anda menghapus pesan ini", "Anda telah menghapus pesan ini"),
           "edited": ("<Pesan ini diedit>",)},
    "hi": {"media": ("<मीडिया के बिना>",), "ios_media": ("फ़ोटो हटाई गई", "वीडियो छोड़ा गया", "ऑडियो हटाई गयी", "स्टिकर छोड़ा गया", "GIF छोड़ा गया",
                     "डॉक्यूमेंट छोड़ा गया"),
           "deleted": ("यह संदेश मिटाया गया", "यह मैसेज मिटाया गया"),
           "you_deleted": ("आपने यह संदेश मिटाया", "आपने यह मैसेज डिलीट किया"), "edited": ()},
    "ar": {"media": ("<تم استبعاد الوسائط>",), "ios_media": ("لم يتم إدراج الصورة", "لم يتم إدراج الفيديوهات", "لم يتم إدراج المقاطع الصوتية", "تم حذف الملصقات",
                     "لم يتم إدراج صورة GIF", "لم يتم إدراج المستند"),
           "deleted": ("تم حذف هذه الرسالة",),
           "you_deleted": ("لقد حذفت هذه الرسالة", "لقد حذَفت هذه الرسالة", "أنت حذفت هذه الرسالة"),
           "edited": ("<تم تعديل هذه الرسالة>",)},
    "nl": {"media": ("<Media weggelaten>",), "ios_media": ("afbeelding weggelaten", "video weggelaten", "audio weggelaten", "sticker weggelaten", "GIF weggelaten",
                     "document weggelaten"),
           "deleted": ("Dit bericht is verwijderd",),
           "you_deleted": ("U hebt dit bericht verwijderd", "Je hebt dit bericht verwijderd"),
           "edited": ("<Dit bericht is bewerkt>",)},
}


def _alternatives(kind: str) -> str:
    """One regex alternation of every language's `kind` strings, longest first."""
    words = {w for row in PLACEHOLDERS.values() for w in row[kind]}
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


# A file sent with the export: Android "IMG-...jpg (file attached)" in the exporter's language, iOS
# "<attached: 00000012-PHOTO-....jpg>" with the word translated.
_FILE_ATTACHED = (r"(?:file attached|archivo adjunto|arquivo anexado|Datei angehängt|fichier joint|file allegato"
                  r"|bestand bijgevoegd|файл добавлен|dosya ekli|الملف مرفق)")
_IOS_ATTACHED = r"<[^<>:\n]{1,20}: [^<>\n]+\.\w{2,5}>"
_MEDIA = re.compile(
    rf"^(?:{_alternatives('media')}|{_alternatives('ios_media')}|<View once (?:voice )?message omitted>"
    r"|.*\u2022.*document omitted"
    r"|(?:Location|Live location): https?://\S+"
    rf"|.+ \({_FILE_ATTACHED}\)|{_IOS_ATTACHED})$",
    re.I,
)
_ATTACHED = re.compile(rf"{_IOS_ATTACHED}|^.+?\.\w{{2,5}} \({_FILE_ATTACHED}\)$", re.M | re.I)
_YOU_DELETED = re.compile(rf"^(?:{_alternatives('you_deleted')})[.।]?$", re.I)
_DELETED = re.compile(rf"^(?:{_alternatives('deleted')}|{_alternatives('you_deleted')})[.।]?$", re.I)
_OTHER_PLACEHOLDER = re.compile(r"^(?:null|<Message deleted by admin>|Waiting for this message.*)$", re.I)
_EDITED = re.compile(rf"\s*[{MARKS}]*(?:{_alternatives('edited')})\s*$", re.I)

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
    odd: str | None = None  # what was read leniently


def chat_name(path: Path) -> str:
    """The chat title for an export file: stem without the "WhatsApp Chat with " prefix."""
    stem = path.stem
    if stem == "_chat" and path.parent.name:  # iOS: _chat.txt inside "WhatsApp Chat - Alice.zip"
        stem = path.parent.name
    for prefix in CHAT_PREFIXES:
        if stem.startswith(prefix) and len(stem) > len(prefix):
            return stem[len(prefix) :]
    return stem


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, without line ends; bad bytes raise with their offset."""
    fix = "WhatsApp exports are UTF-8, re-export the chat or convert the file"
    for number, text in utf8_lines(path, fix):
        yield number, text.rstrip("\r\n")


def _is_pm(word: str) -> bool:
    """True for a PM marker, False for AM (`word` matched `_AMPM`)."""
    if word[0] in "AaPp" and word not in _AM_SET:
        return word[0] in "Pp"
    return word not in _AM_SET


def _stamp(m: re.Match, where: str) -> _Stamp:
    """The numbers of a header match, the clock in 24h; impossible times raise IngestError naming `where`."""
    hour, minute, second = int(m["hh"]), int(m["mm"]), int(m["ss"] or 0)
    ampm = m["ampm1"] or m["ampm2"]
    odd = None
    if ampm:
        if hour == 0:  # Japanese and Chinese clocks count 0-11 (午前0:05); on an AM/PM clock it is odd
            if ampm[0] in "AaPp":
                odd = f"hour 00 on a 12-hour clock ({ampm}) read as {12 if _is_pm(ampm) else 0:02d}:{minute:02d}"
            hour = 12 if _is_pm(ampm) else 0
        elif hour > 12:
            odd = f"hour {hour} with {ampm} read as a 24-hour time"
        else:
            hour = hour % 12 + (12 if _is_pm(ampm) else 0)
    if hour > 23 or minute > 59 or second > 59:
        raise IngestError(f"{where}: time {m['hh']}:{m['mm']}{':' + m['ss'] if m['ss'] else ''} is no time of day; "
                          f"{EXPECTED}")
    d1 = m["d1"]
    return _Stamp(int(d1), int(m["d2"]), int(m["d3"]), len(d1) == 4, hour, minute, second, odd)


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


def _header(line: str, where: str) -> tuple[re.Match, _Stamp] | None:
    """The header match and its numbers, or None if `line` is no header."""
    m = _HEADER.match(line)
    return None if m is None else (m, _stamp(m, where))


def detect_day_first(path: Path, date_order: str | None = None) -> bool:
    """Decide the date order of a whole file (see the module docstring); IngestError when it cannot."""
    valid = {True: True, False: True}
    backwards = {True: 0, False: 0}
    previous: dict[bool, datetime | None] = {True: None, False: None}
    first_bad: dict[bool, int] = {}
    over12: dict[bool, int] = {}  # order -> first line with a number above 12 that only that order allows
    sample = None
    for number, line in _lines(path):
        hit = _header(line, f"{path}:{number}")
        if hit is None:
            continue
        s = hit[1]
        if s.year_first:
            continue
        sample = sample or (number, f"{s.d1:02d}/{s.d2:02d}")
        if s.d1 > 12:
            over12.setdefault(True, number)
        if s.d2 > 12:
            over12.setdefault(False, number)
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
    if sample is None:
        return True  # only year-first dates (or none): the order does not matter
    if not valid[True] and not valid[False]:
        if len(over12) == 2:
            raise IngestError(
                f"{path}:{over12[True]}: a day-first date here, a month-first one on line {over12[False]}; "
                "the file mixes locales, export each chat again"
            )
        raise IngestError(
            f"{path}:{max(first_bad.values())}: no valid date either day-first (line {first_bad[True]}) or "
            f"month-first (line {first_bad[False]}); {EXPECTED}"
        )
    if valid[True] != valid[False]:  # a number above 12 (or a 29 February) allows one order only
        return valid[True]
    if (backwards[True] == 0) != (backwards[False] == 0):
        return backwards[True] == 0
    if date_order is not None:
        return date_order == "dmy"
    number, text = sample
    raise IngestError(
        f"{path}:{number}: dates such as {text} fit both day-first and month-first order and no day above 12 "
        "tells them apart; pass --date-order dmy (31/12) or --date-order mdy (12/31) (setting ingest.date_order)"
    )


class WhatsAppParser:
    """See the module docstring."""

    name = "whatsapp"

    def sniff(self, path: Path, head: bytes) -> bool:
        """True if the first non-blank line of `head` is a WhatsApp message header."""
        text = head.decode("utf-8", errors="ignore").removeprefix("\ufeff")
        for line in text.splitlines()[:5]:
            if line.strip():
                return _HEADER.match(line) is not None
        return False

    def parse(self, path: Path, ctx: ParseContext) -> Iterator[Message]:
        """Stream the messages of one export in file order, counting dropped lines in ctx.skipped."""
        day_first = detect_day_first(path, ctx.date_order)
        chat = chat_name(path)
        pending: tuple[datetime, str, list[str]] | None = None  # (ts, body first line, continuation lines)
        seen_header = False
        for number, line in _lines(path):
            hit = _header(line, f"{path}:{number}")
            if hit is None:
                if pending is not None:
                    if _LOOKS_LIKE_HEADER.match(line):
                        ctx.warnings.append(f"{path}:{number}: starts like a WhatsApp timestamp but is no message "
                                            "header (no ' - ' or ']' after the time); kept as a line of the "
                                            "message above")
                    pending[2].append(line)
                elif line.strip():
                    raise IngestError(f"{path}:{number}: {EXPECTED}")
                continue
            seen_header = True
            m, s = hit
            if s.odd is not None:
                ctx.warnings.append(f"{path}:{number}: {s.odd}")
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
        speaker = sm["name"].strip(MARKS + " ")
        raw_text = "\n".join([sm["text"] or "", *more])
        text = _EDITED.sub("", raw_text).replace("\u200e", "").strip()
        kind = self._placeholder(text)
        if kind == "deleted" and _YOU_DELETED.match(text):
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
