"""Telegram Desktop JSON exports: a single chat's `result.json` and the full account export.

Single chat: `{"name", "type", "id", "messages": [...]}`. Full export: `{"personal_information": {...},
"chats": {"list": [{"name", "type", "id", "messages": [...]}, ...]}, "left_chats": {"list": [...]}, ...}`,
where `list` may hold saved messages (no name), groups and chats without messages.

Per message: `text` is a string or a list of strings and entity objects (`{"type": "bold", "text": ...}`),
joined. `type: service` entries are skipped (reason "service"), so are media-only messages with empty text
("media_only"); a sticker becomes its `sticker_emoji`. Edited and forwarded messages are kept as they are.
`speaker_id` is `from_id` ("user123"), `reply_to` the `reply_to_message_id`, `id` the message `id` and
`chat_id` the chat's `id` (the same in a single-chat and a full export). The time is `date_unixtime`
(an instant) shown in `ctx.tz`; older exports without it have only the local `date`, read in `ctx.tz`.

Streaming: both shapes go through ijson's C `items`, which builds one message at a time. The full export,
whose chats all sit in one file, is also scanned for quotes and brackets (`StructureScanner`, numpy) to
find where each chat's `messages` list opens and closes; ijson gets the file in pieces cut there, so each
message is known to belong to the chat whose list was opened last (see `_ChatPieces`).
"""

from __future__ import annotations

import json
import os
import re
from collections import deque
from collections.abc import Iterator
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any

import ijson

from errors import IngestError
from training.ingest.base import ParseContext
from training.ingest.json_stream import (
    CountingReader,
    JSONError,
    StructureScanner,
    json_error,
    open_reader,
    read_header,
    read_whole_escapes,
    stream_items,
    unchecked_message,
)
from training.ingest.records import Message

EXPECTED = "a Telegram Desktop JSON export (result.json)"
_CHAT_TYPES = (
    b"personal_chat|private_group|private_supergroup|public_supergroup|saved_messages|bot_chat"
    b"|private_channel|public_channel"
)
_SNIFF_FULL = re.compile(rb'"(?:personal_information|chats|left_chats|frequent_contacts)"\s*:\s*\{')
_SNIFF_CHAT = re.compile(rb'"type"\s*:\s*"(?:' + _CHAT_TYPES + rb')"')
_SNIFF_MSG = re.compile(rb'"(?:date_unixtime|from_id|text_entities)"\s*:')
# Keys that mark a message whose content is media (the text then is only a caption, often empty).
_MEDIA_KEYS = ("photo", "file", "media_type", "poll", "location_information", "contact_information",
               "place_name", "game_title", "invoice_information", "todo_list", "giveaway_information")
_CHATS = ("chats.list.item", "left_chats.list.item")
_MESSAGE_LISTS = ("chats.list.item.messages", "left_chats.list.item.messages")
_CHUNK = 1 << 16  # bytes read, scanned and parsed at a time
_MAP, _ARRAY, _MESSAGES, _INFO = "map", "array", "messages", "info"  # container kinds, compared by identity
_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\r\n]*")
_SEPARATORS = re.compile(r"[ \t\r\n,]*")


def chat_title(meta: dict[str, Any], fallback: str) -> str:
    """The chat's name; saved messages and nameless chats get a stable descriptive title."""
    name = meta.get("name")
    if isinstance(name, str) and name.strip():
        return name
    kind = meta.get("type")
    if kind == "saved_messages":
        return "Saved Messages"
    if meta.get("id") is not None:
        return f"{kind or 'chat'} {meta['id']}"
    return fallback


def _text(value: Any) -> str:
    """The plain text of a message's `text`: a string, or a list of strings and entity objects."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise ValueError("a text part is neither a string nor an entity with text")
        return "".join(parts)
    if value is None:
        return ""
    raise ValueError(f"`text` is a {type(value).__name__}, expected a string or a list")


def _timestamp(m: dict, tz: tzinfo) -> datetime:
    """The message time in `tz` (date_unixtime is an instant; a bare `date` is local time)."""
    unix = m.get("date_unixtime")
    if unix is not None:
        return datetime.fromtimestamp(int(unix), tz)
    date = m.get("date")
    if not isinstance(date, str):
        raise ValueError("no `date_unixtime` or `date`")
    ts = datetime.fromisoformat(date)
    return ts.replace(tzinfo=tz) if ts.tzinfo is None else ts


class _Normalizer:
    """Turns raw message dicts of one chat into Messages, counting skips."""

    def __init__(self, path: Path, chat: str, ctx: ParseContext, chat_id: Any = None) -> None:
        self.path, self.chat, self.ctx, self.tz = path, chat, ctx, ctx.tz
        self.chat_id = None if chat_id is None else str(chat_id)
        self.index = 0

    def __call__(self, m: Any, reader) -> Message | None:
        self.index += 1
        if type(m) is not dict:
            raise IngestError(
                f"{self.path}: near byte {reader.offset}: message #{self.index} of chat {self.chat!r} is not "
                f"a JSON object; expected {EXPECTED}"
            )
        get = m.get
        try:
            if get("type", "message") != "message":
                self.ctx.skipped["service"] += 1
                return None
            text = get("text")
            if type(text) is not str:
                text = _text(text)
            if not text or text.isspace():
                emoji = get("sticker_emoji")
                if get("media_type") == "sticker" and isinstance(emoji, str) and emoji:
                    text = emoji
                elif any(k in m for k in _MEDIA_KEYS):
                    self.ctx.skipped["media_only"] += 1
                    return None
                else:
                    self.ctx.skipped["empty"] += 1
                    return None
            speaker = get("from")
            if type(speaker) is not str or not speaker:
                speaker = "Deleted Account"  # Telegram writes null for deleted accounts
            speaker_id = get("from_id")
            if type(speaker_id) is not str:
                speaker_id = speaker if speaker_id is None else str(speaker_id)
            reply = get("reply_to_message_id")
            unix = get("date_unixtime")
            ts = datetime.fromtimestamp(int(unix), self.tz) if unix is not None else _timestamp(m, self.tz)
            msg_id = get("id")
            # Every value above is a str (or an aware datetime) by construction, so skip re-validation.
            return unchecked_message(
                self.chat, ts, speaker, speaker_id, text, None if reply is None else str(reply), "telegram",
                None if msg_id is None else str(msg_id), self.chat_id,
            )
        except (ValueError, TypeError, OverflowError, OSError) as e:  # bad date or text
            first = str(e).split("\n", 1)[0]
            raise IngestError(
                f"{self.path}: near byte {reader.offset}: message #{self.index} (id {get('id')!r}) of chat "
                f"{self.chat!r}: {first}; expected {EXPECTED}"
            ) from e


def _me_hints(info: dict[str, Any], ctx: ParseContext) -> None:
    """Record the exporting user from `personal_information` (id as Telegram writes from_id, and name)."""
    user_id = info.get("user_id")
    if user_id is not None:
        ctx.me_hints.add(f"user{user_id}")
    name = " ".join(str(info[k]) for k in ("first_name", "last_name") if info.get(k)).strip()
    if name:
        ctx.me_hints.add(name)


class TelegramParser:
    """See the module docstring."""

    name = "telegram"

    def sniff(self, path: Path, head: bytes) -> bool:
        """A JSON object with Telegram's account sections, or a chat with Telegram's chat type / message keys."""
        start = head.lstrip(b"\xef\xbb\xbf \t\r\n")
        if not start.startswith(b"{") or start.startswith(b'{"chat"') or b'"guild"' in head:
            return False  # not an object, a canonical log line (JSONL), or a Discord export
        if _SNIFF_FULL.search(head):
            return True
        return b'"messages"' in head and bool(_SNIFF_CHAT.search(head) or _SNIFF_MSG.search(head))

    def parse(self, path: Path, ctx: ParseContext) -> Iterator[Message]:
        """Stream the messages of one export file, chat by chat, in file order."""
        header, stop = read_header(path, ("messages", "chats", "left_chats"), EXPECTED)
        info = {k.removeprefix("personal_information."): v for k, v in header.items()
                if k.startswith("personal_information.")}
        _me_hints(info, ctx)
        if stop == "messages":
            yield from self._single_chat(path, header, ctx)
        elif stop in ("chats", "left_chats"):
            yield from self._full_export(path, ctx)
        else:
            raise IngestError(f"{path}: no `messages` list or `chats` section; expected {EXPECTED}")

    def _single_chat(self, path: Path, header: dict[str, Any], ctx: ParseContext) -> Iterator[Message]:
        normalize = _Normalizer(path, chat_title(header, path.stem), ctx, header.get("id"))
        for item, reader in stream_items(path, "messages.item", EXPECTED):
            msg = normalize(item, reader)
            if msg is not None:
                yield msg

    def _full_export(self, path: Path, ctx: ParseContext) -> Iterator[Message]:
        """One C parse of the whole file; a structure scan of the same bytes tells which chat each message is in.

        ijson's C `items` builds every element of `chats.list.item.messages` (a top-level `left_chats` key is
        renamed to `chats`, padded with spaces, so one prefix covers both lists). `_ChatPieces` hands it the
        file in pieces cut at the brackets that open and close each chat's `messages` array, found by
        `StructureScanner` (quotes and brackets only). ijson asks for the next piece only once it has
        returned every message built from the previous ones, so the chat set at each cut is the chat of
        every message that follows, until the next cut.
        """
        raw, reader = open_reader(path)
        with raw:
            pieces = _ChatPieces(path, ctx, raw, reader)
            try:
                for m in ijson.items(pieces, "chats.list.item.messages.item", use_float=True):
                    normalize = pieces.normalize
                    if normalize is not None:
                        msg = normalize(m, reader)
                        if msg is not None:
                            yield msg
            except JSONError as e:
                raise json_error(path, reader, e, EXPECTED) from e
            except UnicodeDecodeError as e:
                raise IngestError(f"{path}: near byte {reader.window_start}: text is not UTF-8; "
                                  f"expected {EXPECTED}") from e
            except RecursionError as e:
                raise IngestError(f"{path}: near byte {reader.window_start}: JSON nested too deeply") from e
            except OSError as e:
                raise IngestError(f"{path}: cannot read ({e.strerror})") from e
            info: dict[str, Any] = {}
            for start, *end in pieces.info_ranges:
                if end:
                    info.update(_scalars(os.pread(raw.fileno(), end[0] - start, start)))
            _me_hints(info, ctx)


class _ChatPieces:
    """A binary reader over a full export for ijson: returns the file in pieces cut where a chat's `messages`
    array opens or closes and sets `normalize` to that chat's _Normalizer (None outside such arrays)."""

    def __init__(self, path: Path, ctx: ParseContext, raw: Any, reader: CountingReader) -> None:
        self.path, self.ctx, self.raw, self.reader = path, ctx, raw, reader
        self.fd = raw.fileno()
        self.normalize: _Normalizer | None = None
        self.scanner = StructureScanner(5)
        self.stack: list[list[Any]] = []  # per open container at depth <= 5: [ijson prefix, kind, chat fields]
        self.info_ranges: list[list[int]] = []  # byte ranges of top-level personal_information values
        self.switches: deque[tuple[int, _Normalizer | None]] = deque()  # (offset, chat from there on)
        self.pending = b""  # bytes read but not yet handed out; they start at file offset `fed`
        self.fed = self.base = 0  # first byte not handed out / first byte of the next chunk to read
        self.upto = 0  # bytes before this offset may be handed out
        self.last = -1  # offset of the last bracket at depth <= 5
        self.eof = False

    def read(self, n: int = -1) -> bytes:
        """The next piece: at most up to the next cut."""
        if n == 0:
            return b""
        switches = self.switches
        while True:
            while switches and switches[0][0] <= self.fed:
                self.normalize = switches.popleft()[1]
            if self.fed < self.upto:
                stop = switches[0][0] if switches and switches[0][0] < self.upto else self.upto
                piece, self.pending = self.pending[:stop - self.fed], self.pending[stop - self.fed:]
                self.fed = stop
                self.reader.note(piece)
                return piece
            if self.eof:
                return b""
            self._scan_next()

    def _scan_next(self) -> None:
        """Read and scan one chunk: note chats, cuts and renames; move `upto`."""
        chunk = read_whole_escapes(self.raw, _CHUNK)
        self.pending += chunk
        stack, base = self.stack, self.base
        for index, opens, depth in self.scanner.scan(chunk):
            at = base + index
            if not opens:
                if stack and depth == len(stack):  # else invalid JSON, which the parser rejects first
                    kind = stack.pop()[1]
                    if kind is _MESSAGES:  # after the bracket: it ends a number that may be the last message
                        self.switches.append((at + 1, None))
                    elif kind is _INFO:
                        self.info_ranges[-1].append(at + 1)
            elif depth == len(stack) + 1:
                self._open(at, depth)
            self.last = at
        self.base = base + len(chunk)
        self.eof = not chunk
        # Top-level bytes after the last bracket stay back: they may hold a key to rename.
        self.upto = self.base if self.eof or self.scanner.depth > 1 else max(self.fed, self.last + 1)

    def _open(self, at: int, depth: int) -> None:
        """A container opens at file offset `at`, at `depth`: work out its ijson prefix and what it is."""
        stack = self.stack
        parent = stack[-1] if stack else None
        prefix: str | None = ""
        if parent is not None:
            if parent[1] is _ARRAY or parent[1] is _MESSAGES:
                prefix = None if parent[0] is None else (f"{parent[0]}.item" if parent[0] else "item")
            else:
                last = self.last
                members, key, key_at, key_end = _members(os.pread(self.fd, at - last - 1, last + 1), last + 1)
                if parent[2] is not None:
                    parent[2].update((k, v) for k, v in members if "." not in k)
                prefix = None if key is None or parent[0] is None else (f"{parent[0]}.{key}" if parent[0] else key)
                if depth == 2 and key == "left_chats" and key_at >= self.fed:
                    i, j = key_at - self.fed, key_end - self.fed
                    self.pending = self.pending[:i] + b'"chats"'.ljust(j - i) + self.pending[j:]
        kind = _MAP if self.pending[at - self.fed] == 0x7B else _ARRAY
        meta = None
        if kind is _MAP and prefix in _CHATS:
            meta = {}
        elif kind is _ARRAY and prefix in _MESSAGE_LISTS:
            meta = parent[2] if parent is not None and parent[2] is not None else {}
            title = chat_title(meta, self.path.stem)  # two chats named alike are told apart by the pipeline
            self.switches.append((at + 1, _Normalizer(self.path, title, self.ctx, meta.get("id"))))
            kind, meta = _MESSAGES, None
        elif prefix == "personal_information":
            kind = _INFO
            self.info_ranges.append([at])
        stack.append([prefix, kind, meta])


def _members(data: bytes, offset: int) -> tuple[list[tuple[str, Any]], str | None, int, int]:
    """The members of a JSON object between two of its containers: `data` holds `, "k": v, ... "key": `
    (no brackets outside strings) and starts at file offset `offset`. Returns the scalar (key, value) pairs,
    the trailing key (of the container that follows, None if unreadable) and that key's byte range."""
    members: list[tuple[str, Any]] = []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return members, None, -1, -1  # the parser reports it
    i, n = 0, len(text)
    try:
        while True:
            i = _SEPARATORS.match(text, i).end()
            if i >= n:
                return members, None, -1, -1
            key_i = i
            key, i = _DECODER.raw_decode(text, i)
            key_j = i
            i = _SPACE.match(text, i).end()
            if type(key) is not str or text[i:i + 1] != ":":
                return members, None, -1, -1
            i = _SPACE.match(text, i + 1).end()
            if i >= n:
                key_at = offset + len(text[:key_i].encode("utf-8"))
                return members, key, key_at, key_at + len(text[key_i:key_j].encode("utf-8"))
            value, i = _DECODER.raw_decode(text, i)
            members.append((key, value))
    except ValueError:
        return members, None, -1, -1


def _scalars(data: bytes) -> dict[str, Any]:
    """String and number values directly or deeper inside the JSON value `data`, by ijson prefix."""
    out: dict[str, Any] = {}
    try:
        for prefix, event, value in ijson.parse(data, use_float=True):
            if prefix and event in ("string", "number"):
                out[prefix] = value
    except (JSONError, UnicodeDecodeError, RecursionError):
        pass  # the main parse already accepted these bytes
    return out


PARSER = TelegramParser()
