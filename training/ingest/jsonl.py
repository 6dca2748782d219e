"""JSONL in the canonical message schema (records.Message): bring any other source, or re-read a log.

One JSON object per line with the keys `chat`, `ts`, `speaker`, `speaker_id`, `text`, `reply_to`, `source`.
On import (`PARSER.parse`) a few conveniences apply: `speaker_id` defaults to `speaker`, `reply_to` to
null, `source` to "jsonl" (a record's own valid `source` is kept, so a re-ingested log keeps its origin),
and a `ts` without a UTC offset is read in `ctx.tz`. Unknown keys are an error. Blank lines are ignored.
`read_messages` reads a canonical log strictly (what `convo stats` and the dataset builder use).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import datetime, tzinfo
from pathlib import Path

from pydantic import ValidationError

from errors import IngestError
from training.ingest.base import ParseContext, utf8_lines
from training.ingest.records import Message

_KEYS = frozenset(Message.model_fields)


def _problem(e: ValidationError) -> str:
    """`field X: problem` for the first error pydantic found."""
    err = e.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "record"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = f"unknown key (allowed: {', '.join(Message.model_fields)})"
    elif err["type"] == "missing":
        msg = "missing"
    return f"field {field}: {msg}"


def _records(
    path: Path, progress: Callable[[int], None] | None = None
) -> Iterator[tuple[int, dict]]:
    """(line number, decoded JSON object) for every non-blank line; bad bytes or JSON raise IngestError."""
    for number, line in utf8_lines(path, "JSONL must be UTF-8", progress):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            col = getattr(e, "colno", 0)
            raise IngestError(
                f"{path}:{number}: invalid JSON at column {col}; expected one message object per line"
            ) from e
        if not isinstance(obj, dict):
            raise IngestError(
                f"{path}:{number}: expected a JSON object with keys {', '.join(Message.model_fields)}, "
                f"got {type(obj).__name__}"
            )
        yield number, obj


def _localize(obj: dict, tz: tzinfo) -> dict:
    """Give a zone-less `ts` string the zone `tz`; anything else is left for validation to judge."""
    ts = obj.get("ts")
    if isinstance(ts, str):
        try:
            parsed = datetime.fromisoformat(ts)
        except ValueError:
            return obj
        if parsed.tzinfo is None:
            obj = {**obj, "ts": parsed.replace(tzinfo=tz)}
    return obj


def read_messages(path: Path, progress: Callable[[int], None] | None = None) -> Iterator[Message]:
    """Stream a canonical message log; each bad line raises IngestError `file:line: field X: problem`.

    `progress`, if given, is called with the byte count of every line read.
    """
    seen = False
    for number, obj in _records(path, progress):
        try:
            yield Message.model_validate(obj)
        except ValidationError as e:
            raise IngestError(f"{path}:{number}: {_problem(e)}") from e
        seen = True
    if not seen:
        raise IngestError(f"{path}:1: no messages; expected one JSON message per line (from `convo ingest`)")


class JsonlParser:
    """See the module docstring."""

    name = "jsonl"

    def sniff(self, path: Path, head: bytes) -> bool:
        """True if the first non-blank line of `head` is a JSON object with the message keys."""
        text = head.decode("utf-8", errors="ignore").removeprefix("\ufeff")
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError):
                return False
            return isinstance(obj, dict) and {"chat", "ts", "speaker", "text"} <= obj.keys() <= _KEYS
        return False

    def parse(self, path: Path, ctx: ParseContext) -> Iterator[Message]:
        """Stream the records of one file in order (see the module docstring for the defaults)."""
        seen = False
        for number, obj in _records(path):
            if "speaker_id" not in obj and isinstance(obj.get("speaker"), str):
                obj["speaker_id"] = obj["speaker"]
            obj.setdefault("source", "jsonl")
            obj = _localize(obj, ctx.tz)
            try:
                msg = Message.model_validate(obj)
            except ValidationError as e:
                raise IngestError(f"{path}:{number}: {_problem(e)}") from e
            seen = True
            if not msg.text.strip():
                ctx.skipped["empty"] += 1
                continue
            yield msg
        if not seen:
            raise IngestError(f"{path}:1: empty file; expected one JSON message object per line")


PARSER = JsonlParser()
