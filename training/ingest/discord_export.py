"""DiscordChatExporter JSON exports: `{"guild": {...}, "channel": {...}, "messages": [...]}`, one channel per file.

Kept: message types `Default` and `Reply`; other types (joins, pins, calls, renames, threads...) are skipped
as "system", messages whose `content` is empty but that carry attachments, stickers or embeds as
"media_only", and the rest with empty content as "empty". The speaker is the author's `nickname` (the
name shown in that server) when present, else `name`; `speaker_id` is the author's id. `reply_to` is
`reference.messageId`, `id` the message id and `chat_id` the channel id. The chat is "guild / channel"
(e.g. "My Server / general", "Direct Messages / alice").
Timestamps carry their offset and are kept as exported. Streaming: ijson's C `items` over `messages`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from errors import IngestError
from training.ingest.base import ParseContext
from training.ingest.json_stream import read_header, stream_items, unchecked_message
from training.ingest.records import Message

EXPECTED = "a DiscordChatExporter JSON export"
KEPT_TYPES = frozenset({"Default", "Reply"})
_SNIFF = re.compile(rb'"guild"\s*:\s*\{')
_SNIFF_CHANNEL = re.compile(rb'"channel"\s*:\s*\{')
_MEDIA_KEYS = ("attachments", "stickers", "embeds")


def chat_title(header: dict[str, Any], fallback: str) -> str:
    """"guild / channel" from the export header, with whatever part exists."""
    parts = [header.get("guild.name"), header.get("channel.name")]
    parts = [str(p) for p in parts if p not in (None, "")]
    return " / ".join(parts) if parts else fallback


class DiscordParser:
    """See the module docstring."""

    name = "discord"

    def sniff(self, path: Path, head: bytes) -> bool:
        """A JSON object with DiscordChatExporter's `guild` and `channel` sections."""
        start = head.lstrip(b"\xef\xbb\xbf \t\r\n")
        if start.startswith(b'{"chat"'):  # a canonical log line (JSONL) quoting an export in its text
            return False
        return start.startswith(b"{") and bool(_SNIFF.search(head) and _SNIFF_CHANNEL.search(head))

    def parse(self, path: Path, ctx: ParseContext) -> Iterator[Message]:
        """Stream the kept messages of one channel export, in file order."""
        header, stop = read_header(path, ("messages",), EXPECTED)
        if stop is None:
            raise IngestError(f"{path}: no `messages` list; expected {EXPECTED}")
        chat = chat_title(header, path.stem)
        chat_id = header.get("channel.id")
        chat_id = None if chat_id is None else str(chat_id)
        skipped, tz = ctx.skipped, ctx.tz
        index = 0
        for m, reader in stream_items(path, "messages.item", EXPECTED):
            index += 1
            if type(m) is not dict:
                raise IngestError(
                    f"{path}: near byte {reader.offset}: message #{index} is not a JSON object; expected {EXPECTED}"
                )
            get = m.get
            try:
                if get("type", "Default") not in KEPT_TYPES:
                    skipped["system"] += 1
                    continue
                text = get("content")
                if text is None:
                    text = ""
                elif type(text) is not str:
                    raise ValueError(f"`content` is a {type(text).__name__}, expected a string")
                if not text or text.isspace():
                    skipped["media_only" if any(get(k) for k in _MEDIA_KEYS) else "empty"] += 1
                    continue
                author = get("author")
                if type(author) is not dict:
                    raise ValueError("no `author` object")
                name = author.get("nickname") or author.get("name")
                if type(name) is not str or not name:
                    raise ValueError("the author has no `name`")
                author_id = author.get("id")
                if type(author_id) is not str:
                    author_id = name if author_id is None else str(author_id)
                ref = get("reference")
                reply = ref.get("messageId") if type(ref) is dict else None
                ts = get("timestamp")
                if type(ts) is not str:
                    raise ValueError("no `timestamp` string")
                when = datetime.fromisoformat(ts)
                if when.tzinfo is None:
                    when = when.replace(tzinfo=tz)
                msg_id = get("id")
                # Every value is a str (or an aware datetime) by construction, so skip re-validation.
                yield unchecked_message(
                    chat, when, name, author_id, text, None if reply is None else str(reply), "discord",
                    None if msg_id is None else str(msg_id), chat_id,
                )
            except (ValueError, TypeError, OverflowError) as e:  # bad timestamps
                first = str(e).split("\n", 1)[0]
                raise IngestError(
                    f"{path}: near byte {reader.offset}: message #{index} (id {get('id')!r}): {first}; "
                    f"expected {EXPECTED}"
                ) from e


PARSER = DiscordParser()
