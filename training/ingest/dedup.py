"""Message identity for `convo ingest`: which chat a message belongs to, and when two messages are one.

Chats. A chat is identified by (source, platform chat id) where the export has one (Telegram, Discord), else
by (source, title) (WhatsApp, JSONL). The log names chats by title, so two different chats with the same
title get different titles: the first one seen keeps it, the next becomes `Alice (4242)` (its chat id) or
`Alice (whatsapp)` (its source), and the summary lists every title that was shared. A chat without an id
joins a chat of the same source and title that has one (a log written before chat ids were recorded, read
back with `--append`), and the title a chat first got is kept when a later export renames it.

Messages. Within one chat and one timestamp, a message is a duplicate of an earlier one if both carry the
same platform message id, or if one of them has no id and they agree on (source, speaker_id, text,
occurrence): the occurrence number counts identical (source, speaker_id, text) at that timestamp within
one input, so "ok", "ok" sent in the same minute stay two messages, while the same minute exported twice
gives them once. Timestamps are compared as instants. The pipeline only needs to run this on chats that
occur in more than one run of input (see pipeline.py): a single time-ordered run of one file has no copies.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

ChatKey = tuple[str, str | None, str | None]  # (source, chat_id, title when there is no chat_id)


class ChatTitles:
    """Gives every chat (by key) one title in the log, unique across chats; remembers shared titles."""

    def __init__(self) -> None:
        self.by_key: dict[ChatKey, str] = {}
        self.owner: dict[str, ChatKey] = {}  # log title -> chat key
        self.shared: dict[str, list[str]] = {}  # title as exported -> log titles of the chats that carry it
        self._cache: dict[tuple[str, str | None, str], str] = {}

    def title(self, source: str, chat_id: str | None, title: str) -> str:
        """The log title of the chat with this source, id and exported title."""
        hit = self._cache.get((source, chat_id, title))
        if hit is not None:
            return hit
        key: ChatKey = (source, chat_id, None) if chat_id is not None else (source, None, title)
        final = self.by_key.get(key)
        if final is None:
            final = self._adopt(key, title)
        if final is None:
            final = title
            if final in self.owner:
                final = f"{title} ({chat_id if chat_id is not None else source})"
                n = 2
                while final in self.owner:
                    final, n = f"{title} ({chat_id if chat_id is not None else source} #{n})", n + 1
                self.shared.setdefault(title, [title]).append(final)
            self.owner[final] = key
            self.by_key[key] = final
        self._cache[(source, chat_id, title)] = final
        return final

    def _adopt(self, key: ChatKey, title: str) -> str | None:
        """An id-less chat and a chat with an id, of one source and title, are the same chat."""
        other = self.owner.get(title)
        if other is None or other[0] != key[0] or (other[1] is None) == (key[1] is None):
            return None
        self.by_key[key] = title
        if key[1] is not None:  # the chat with the id owns the title now: a second chat with an id gets its own
            self.owner[title] = key
        return title


class GroupDedup:
    """Decides, line by line, which messages of one chat at one timestamp are copies of earlier ones."""

    __slots__ = ("ids", "contents", "occurrence")

    def __init__(self) -> None:
        self.ids: set[tuple[str, str]] = set()
        self.contents: dict[tuple, set[str | None]] = {}  # content key + occurrence -> ids of kept messages
        self.occurrence: Counter = Counter()

    def is_copy(self, source_input: int, record: dict[str, Any]) -> bool:
        """True if `record` (a log line's JSON object from input number `source_input`) was already kept."""
        source = record["source"]
        content = (source, record["speaker_id"], record["text"])
        self.occurrence[(source_input, content)] += 1
        key = (*content, self.occurrence[(source_input, content)])
        msg_id = record.get("id")
        holders = self.contents.get(key)
        if msg_id is not None:
            if (source, msg_id) in self.ids or (holders is not None and None in holders):
                return True
            self.ids.add((source, msg_id))
        elif holders is not None:
            return True
        if holders is None:
            self.contents[key] = {msg_id}
        else:
            holders.add(msg_id)
        return False
