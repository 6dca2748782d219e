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

from errors import IngestError
from training.ingest.records import Message

# ijson picks the fastest installed backend (yajl2_c); the exceptions are shared by all backends.
JSONError = ijson.common.JSONError


_FIELDS = set(Message.model_fields)  # a set: model_copy copies it and then updates the copy
_new = object.__new__
_set = object.__setattr__


def unchecked_message(
    chat: str, ts: datetime, speaker: str, speaker_id: str, text: str, reply_to: str | None, source: str,
    id: str | None = None, chat_id: str | None = None,
) -> Message:
    """A Message built without pydantic validation, for parsers whose values have the right types by
    construction (str fields, a timezone-aware `ts`). At a million messages validation alone costs about as
    much as parsing the JSON; tests check these Messages equal validated ones."""
    m = _new(Message)
    _set(m, "__dict__", {"chat": chat, "ts": ts, "speaker": speaker, "speaker_id": speaker_id, "text": text,
                         "reply_to": reply_to, "source": source, "id": id, "chat_id": chat_id})
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
            self.note(data)
        return data

    def note(self, data: bytes) -> None:
        """Record that `data` (the next bytes of the file) was handed to the parser (push parsing)."""
        self.newlines += self._prev.count(b"\n")
        self.window_start += len(self._prev)
        self._prev, self._cur = self._cur, data
        self.offset += len(data)

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
    if not before.strip():  # the spot is at the start of the last piece parsed, after `before` (whitespace)
        return reader.window_start + len(reader._prev) + len(before)
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


# --- Structure scan: where the containers near the top of a document open and close, without parsing ---

_ESCAPED = (b"\\\\", b"__", b'\\"', b"__")
_CLASSES = bytes(1 if c in b"[{" else 2 if c in b"]}" else 3 if c == 0x22 else 0 for c in range(256))
_TOKENS = re.compile(rb'["\[\]{}]')

_np: Any = ...  # numpy, imported by the first StructureScanner (None when it is not installed)


def read_whole_escapes(raw: BinaryIO, size: int) -> bytes:
    """Read about `size` bytes, never stopping right after a backslash (so no escape is split)."""
    chunk = raw.read(size)
    while chunk.endswith(b"\\"):
        more = raw.read(1)
        if not more:
            break
        chunk += more
    return chunk


class StructureScanner:
    """Tracks string state and nesting depth over consecutive chunks of a JSON document and reports the
    brackets that open or close a container at depth <= `max_depth` (the top-level value is depth 1).

    Exact for any valid JSON prefix (quotes inside strings are escaped, and brackets inside strings are
    skipped); on invalid input it reports nonsense, which is harmless when the same bytes also go through a
    real parser that rejects them first. Chunks must not end inside an escape (see `read_whole_escapes`).
    """

    def __init__(self, max_depth: int = 5) -> None:
        global _np
        if _np is ...:  # numpy finds brackets and quotes at C speed; without it a regex does (same result)
            try:
                import numpy as _np
            except ImportError:  # pragma: no cover - numpy is a dependency; this keeps a bare install working
                _np = None
        self.max_depth = max_depth
        self.depth = 0
        self.in_string = 0

    def scan(self, chunk: bytes) -> list[tuple[int, bool, int]]:
        """(index in chunk, opens?, depth of the container) for each shallow bracket of `chunk`, in order."""
        if b"\\" in chunk:  # same length, so indexes stay valid: escaped quotes and backslashes vanish
            chunk = chunk.replace(*_ESCAPED[:2]).replace(*_ESCAPED[2:])
        if _np is not None:
            return self._scan_np(chunk)
        out = []
        depth, in_string, top = self.depth, self.in_string, self.max_depth
        for m in _TOKENS.finditer(chunk):
            c = m.group()
            if c == b'"':
                in_string ^= 1
            elif not in_string:
                if c in b"[{":
                    depth += 1
                    if depth <= top:
                        out.append((m.start(), True, depth))
                else:
                    if depth <= top:
                        out.append((m.start(), False, depth))
                    depth -= 1
        self.depth, self.in_string = depth, in_string
        return out

    def _scan_np(self, chunk: bytes) -> list[tuple[int, bool, int]]:
        np = _np
        classes = np.frombuffer(chunk.translate(_CLASSES), np.uint8)
        pos = np.flatnonzero(classes)
        if not len(pos):
            return []
        kinds = classes[pos]
        quote = kinds == 3
        inside = (np.cumsum(quote, dtype=np.int64) + self.in_string) & 1  # after each quote: inside a string
        structural = ~quote & (inside == 0)
        spos = pos[structural]
        opens = kinds[structural] == 1
        depth_after = self.depth + np.cumsum(np.where(opens, 1, -1), dtype=np.int64)
        level = depth_after + ~opens  # an opening bracket's container depth is the depth after it, a closing one's before
        shallow = np.flatnonzero(level <= self.max_depth)
        self.in_string = int(inside[-1])
        if len(depth_after):
            self.depth = int(depth_after[-1])
        return [(int(spos[i]), bool(opens[i]), int(level[i])) for i in shallow]
