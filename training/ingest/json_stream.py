"""Streaming JSON reading shared by the Telegram and Discord parsers: ijson (yajl2_c), exact error positions.

Both exports are one JSON object whose big part is a `messages` array (per chat). The fast path reads the
small header (every scalar before `messages`) with a few ijson events and then lets ijson's C `items`
build one message dict at a time, so memory stays flat and Python runs once per message, not per token.

ijson's errors carry no position, so the reader counts bytes and newlines and keeps the last two chunks;
`json_error` finds the spot yajl quotes in its message inside those chunks and names `file:line (byte N)`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import ijson

from convo.errors import IngestError
from training.ingest.records import Message

# ijson picks the fastest installed backend (yajl2_c); the exceptions are shared by all backends.
JSONError = ijson.common.JSONError


_FIELDS = frozenset(Message.model_fields)
_new = object.__new__
_set = object.__setattr__


def unchecked_message(
    chat: str, ts: datetime, speaker: str, speaker_id: str, text: str, reply_to: str | None, source: str
) -> Message:
    """A Message built without pydantic validation, for parsers whose values have the right types by
    construction (str fields, a timezone-aware `ts`). At a million messages validation alone costs about as
    much as parsing the JSON; tests check these Messages equal validated ones."""
    m = _new(Message)
    _set(m, "__dict__", {"chat": chat, "ts": ts, "speaker": speaker, "speaker_id": speaker_id, "text": text,
                         "reply_to": reply_to, "source": source})
    _set(m, "__pydantic_fields_set__", _FIELDS)
    _set(m, "__pydantic_extra__", None)
    _set(m, "__pydantic_private__", None)
    return m


class CountingReader:
    """A binary reader that remembers how far it got, how many newlines it passed and the last chunks."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.offset = 0  # bytes handed to the parser so far
        self.newlines = 0  # newlines before `window_start`
        self.window_start = 0  # file offset of `_prev`
        self._prev = b""
        self._cur = b""

    def read(self, n: int = -1) -> bytes:
        """Read like the wrapped file, keeping the bookkeeping."""
        data = self._raw.read(n)
        if data:
            self.newlines += self._prev.count(b"\n")
            self.window_start += len(self._prev)
            self._prev, self._cur = self._cur, data
            self.offset += len(data)
        return data

    @property
    def window(self) -> bytes:
        """The last two chunks read, starting at `window_start`."""
        return self._prev + self._cur

    def line_at(self, byte_offset: int) -> int:
        """1-based line number of `byte_offset`, which must lie inside the window."""
        window = self.window
        inside = max(0, min(byte_offset - self.window_start, len(window)))
        return self.newlines + window[:inside].count(b"\n") + 1


def _error_offset(message: str, reader: CountingReader) -> int | None:
    """Byte offset of the spot yajl's verbose message points at, or None when it cannot be found."""
    lines = message.split("\n")
    if len(lines) < 3 or "^" not in lines[2]:
        return None
    caret = lines[2].index("^")
    snippet = lines[1]
    pad = len(snippet) - len(snippet.lstrip(" "))
    before = snippet[pad:caret]
    if not before.strip():
        return None
    # yajl prints newlines as spaces; a space in the quote may be any whitespace byte in the file
    pattern = re.escape(before.encode("utf-8", "replace")).replace(b"\\ ", b"\\s")
    matches = list(re.finditer(pattern, reader.window))
    if not matches:
        return None
    return reader.window_start + matches[-1].end()


def json_error(path: Path, reader: CountingReader, exc: Exception, expected: str) -> IngestError:
    """An IngestError naming `path`, the line and byte offset of a JSON syntax error, and what was expected."""
    message = str(exc)
    first = message.split("\n", 1)[0].strip() or "invalid JSON"
    if "premature EOF" in message:
        offset = reader.offset
        if not reader.window.strip() and reader.window_start == 0:
            return IngestError(f"{path}: empty file; expected {expected}")
        return IngestError(
            f"{path}:{reader.line_at(offset)} (byte {offset}): file ends in the middle of the JSON; "
            f"expected {expected} (is the export truncated?)"
        )
    offset = _error_offset(message, reader)
    if offset is None:
        start = reader.window_start
        return IngestError(
            f"{path}: near bytes {start}-{reader.offset}: {first}; expected {expected}"
        )
    if first.startswith("lexical error"):
        offset -= 1  # yajl points just past the character it could not read
    return IngestError(f"{path}:{reader.line_at(offset)} (byte {offset}): {first}; expected {expected}")


def open_reader(path: Path) -> tuple[BinaryIO, CountingReader]:
    """Open `path` for streaming, wrapping OSError in IngestError."""
    try:
        raw = path.open("rb")
    except OSError as e:
        raise IngestError(f"{path}: cannot read ({e.strerror})") from e
    return raw, CountingReader(raw)


def _check_top(path: Path, reader: CountingReader, events: Iterator, expected: str) -> None:
    """Raise IngestError unless the document is a JSON object (checked on its first event)."""
    first = next(events, None)
    if first is None:
        raise IngestError(f"{path}: empty file; expected {expected}")
    if first[1] != "start_map":
        raise IngestError(f"{path}:1 (byte 0): expected {expected}, found a JSON {first[1].replace('start_', '')}")


def read_header(path: Path, stop_prefixes: tuple[str, ...], expected: str) -> tuple[dict[str, Any], str | None]:
    """Scalars of the document before the first container in `stop_prefixes` starts.

    Returns ({"name": ..., "guild.name": ..., ...}, the prefix that stopped the scan or None at the end).
    Scalars inside arrays are not collected. Syntax errors become IngestError.
    """
    raw, reader = open_reader(path)
    header: dict[str, Any] = {}
    with raw:
        events = ijson.parse(reader, use_float=True)
        try:
            _check_top(path, reader, events, expected)
            for prefix, event, value in events:
                if event in ("start_array", "start_map"):
                    if prefix in stop_prefixes:
                        return header, prefix
                elif event not in ("end_array", "end_map", "map_key") and ".item" not in f".{prefix}.":
                    header[prefix] = value
        except JSONError as e:
            raise json_error(path, reader, e, expected) from e
        except UnicodeDecodeError as e:  # yajl2_c decodes strings as UTF-8
            raise IngestError(f"{path}: near byte {reader.window_start}: text is not UTF-8; expected {expected}") from e
    return header, None


def stream_items(path: Path, prefix: str, expected: str) -> Iterator[tuple[Any, CountingReader]]:
    """Yield (item, reader) for each element of the array at `prefix`, built by ijson's C backend."""
    raw, reader = open_reader(path)
    with raw:
        items = ijson.items(reader, prefix, use_float=True)
        try:
            for item in items:
                yield item, reader
        except JSONError as e:
            raise json_error(path, reader, e, expected) from e
        except UnicodeDecodeError as e:
            raise IngestError(f"{path}: near byte {reader.window_start}: text is not UTF-8; expected {expected}") from e
        except RecursionError as e:
            raise IngestError(f"{path}: near byte {reader.window_start}: JSON nested too deeply") from e
