"""Telegram Desktop JSON exports: a single chat's `result.json` and the full account export.

Single chat: `{"name", "type", "id", "messages": [...]}`. Full export: `{"personal_information": {...},
"chats": {"list": [{"name", "type", "id", "messages": [...]}, ...]}, "left_chats": {"list": [...]}, ...}`,
where `list` may hold saved messages (no name), groups and chats without messages.

Per message: `text` is a string or a list of strings and entity objects (`{"type": "bold", "text": ...}`),
joined. `type: service` entries are skipped (reason "service"), so are media-only messages with empty text
("media_only"); a sticker becomes its `sticker_emoji`. Edited and forwarded messages are kept as they are.
`speaker_id` is `from_id` ("user123"), `reply_to` the `reply_to_message_id`. The time is `date_unixtime`
(an instant) shown in `ctx.tz`; older exports without it have only the local `date`, read in `ctx.tz`.

Streaming: a single chat goes through ijson's C `items` (fast path); the full export, whose chats all sit in
one file, is read event by event so each message is still built alone (about 2x slower per message).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime, tzinfo
from functools import partial
from itertools import takewhile
from operator import ne
from pathlib import Path
from typing import Any

import ijson

from convo.errors import IngestError
from training.ingest.base import ParseContext
from training.ingest.json_stream import (
    JSONError,
    json_error,
    open_reader,
    read_header,
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
_LISTS = ("chats.list", "left_chats.list")
_BACKEND = ijson.get_backend(ijson.backend)  # its items_basecoro builds objects from pushed events


class _Sink:
    """Push target collecting what ijson's items coroutine builds."""

    def __init__(self, into: list) -> None:
        self.send = into.append


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

    def __init__(self, path: Path, chat: str, ctx: ParseContext) -> None:
        self.path, self.chat, self.ctx, self.tz = path, chat, ctx, ctx.tz
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
            # Every value above is a str (or an aware datetime) by construction, so skip re-validation.
            return unchecked_message(
                self.chat, ts, speaker, speaker_id, text, None if reply is None else str(reply), "telegram"
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
        normalize = _Normalizer(path, chat_title(header, path.stem), ctx)
        for item, reader in stream_items(path, "messages.item", EXPECTED):
            msg = normalize(item, reader)
            if msg is not None:
                yield msg

    def _full_export(self, path: Path, ctx: ParseContext) -> Iterator[Message]:
        """Event-driven: chat fields come from events, each message is built by ijson's C builder."""
        built: list[Any] = []
        raw, reader = open_reader(path)
        with raw:
            events = ijson.parse(reader, use_float=True)
            chat_prefix = None
            meta: dict[str, Any] = {}
            info: dict[str, Any] = {}
            titles: dict[str, Any] = {}  # title -> chat id, to tell apart different chats with one name
            try:
                for prefix, event, value in events:
                    if prefix in _LISTS and event == "start_array":
                        continue
                    if chat_prefix is None:
                        for lst in _LISTS:
                            if prefix == lst + ".item" and event == "start_map":
                                chat_prefix, meta = prefix, {}
                                break
                        else:
                            if prefix.startswith("personal_information.") and event in ("string", "number"):
                                info[prefix.removeprefix("personal_information.")] = value
                        continue
                    if prefix == chat_prefix and event == "end_map":
                        chat_prefix = None
                    elif prefix == chat_prefix + ".messages" and event == "start_array":
                        title = chat_title(meta, path.stem)
                        if titles.setdefault(title, meta.get("id")) != meta.get("id"):
                            title = f"{title} ({meta.get('id')})"  # two chats named alike stay apart
                        normalize = _Normalizer(path, title, ctx)
                        send = _BACKEND.items_basecoro(_Sink(built), prefix + ".item").send
                        # The hot loop, once per event inside the array: the end test runs in C (takewhile
                        # with a C predicate) and ijson's C builder assembles each message.
                        for ev in takewhile(partial(ne, (prefix, "end_array", None)), events):
                            send(ev)
                            if built:
                                for m in built:
                                    msg = normalize(m, reader)
                                    if msg is not None:
                                        yield msg
                                built.clear()
                    elif event in ("string", "number", "null", "boolean"):
                        key = prefix[len(chat_prefix) + 1:]
                        if "." not in key:
                            meta[key] = value
            except JSONError as e:
                raise json_error(path, reader, e, EXPECTED) from e
            except UnicodeDecodeError as e:
                raise IngestError(f"{path}: near byte {reader.window_start}: text is not UTF-8; "
                                  f"expected {EXPECTED}") from e
            except RecursionError as e:
                raise IngestError(f"{path}: near byte {reader.window_start}: JSON nested too deeply") from e
            _me_hints(info, ctx)


PARSER = TelegramParser()
