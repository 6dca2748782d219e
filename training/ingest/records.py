"""The canonical message record written by `convo ingest` and read by everything downstream.

One JSON object per line, exactly these keys, ordered by chat then time:
`chat`, `ts` (ISO 8601 with offset), `speaker`, `speaker_id`, `text`, `reply_to`, `source`, `id` (the
platform's message id, null where the export has none: WhatsApp) and `chat_id` (the platform's chat id,
null where there is none). `id` and `chat_id` give a message its identity for de-duplication (dedup.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

SOURCES = ("telegram", "whatsapp", "discord", "jsonl")
Source = Literal["telegram", "whatsapp", "discord", "jsonl"]

# Reasons a parser skips a message; counted in messages.meta.json.
SKIP_REASONS = ("service", "media_only", "empty", "system", "placeholder", "deleted")


class Message(BaseModel):
    """One chat message in the canonical log (also the JSONL import schema)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    chat: str
    ts: datetime
    speaker: str
    speaker_id: str
    text: str
    reply_to: str | None = None
    source: Source
    id: str | None = None  # platform message id (Telegram, Discord)
    chat_id: str | None = None  # platform chat id; tells apart two chats with one title

    @field_validator("ts")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None or v.utcoffset() is None:
            raise ValueError("timestamp must carry a UTC offset")
        return v

    def to_json(self) -> str:
        """One JSONL line (no newline), keys in schema order."""
        return self.model_dump_json()
