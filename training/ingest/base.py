"""The contract every export parser follows, so the pipeline can detect, stream and count uniformly.

A parser module (telegram.py, whatsapp.py, discord_export.py, jsonl.py) exposes a module-level object
`PARSER` with:

* `name`: the source name written into each Message ("telegram", ...);
* `sniff(path, head) -> bool`: cheap format detection from the path and the first bytes (`head`, up to 64 KiB);
* `parse(path, ctx) -> Iterator[Message]`: stream the messages of one file, in file order, adding every
  skipped message to `ctx.skipped[reason]` (reasons from records.SKIP_REASONS). Bad input raises IngestError
  naming the file and the line or byte offset. Nothing else may escape (property tests check it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import tzinfo
from pathlib import Path
from typing import Protocol

from errors import IngestError
from training.ingest.records import Message

HEAD_BYTES = 64 * 1024


@dataclass
class ParseContext:
    """What a parser needs beyond the file, and what it reports back besides messages."""

    tz: tzinfo  # zone for timestamps without one (WhatsApp), from --tz
    date_order: str | None = None  # "dmy" or "mdy" for WhatsApp files whose dates fit both; from --date-order
    skipped: Counter = field(default_factory=Counter)
    warnings: list[str] = field(default_factory=list)  # "file:line: ..." for odd input that was still read
    me_hints: set[str] = field(default_factory=set)  # ids/names of the exporting user found in the file


class Parser(Protocol):
    """See the module docstring."""

    name: str

    def sniff(self, path: Path, head: bytes) -> bool: ...

    def parse(self, path: Path, ctx: ParseContext) -> Iterator[Message]: ...


def utf8_lines(
    path: Path, fix: str, progress: Callable[[int], None] | None = None
) -> Iterator[tuple[int, str]]:
    """(line number, text with its line end) of a UTF-8 text file, BOM dropped; bad bytes raise IngestError.

    The error names the byte offset and line, followed by `fix` (what the user can do about it).
    """
    offset = 0
    try:
        f = path.open("rb")
    except OSError as e:
        raise IngestError(f"{path}: cannot read ({e.strerror})") from e
    with f:
        for number, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise IngestError(f"{path}: byte offset {offset + e.start} (line {number}): not UTF-8; {fix}") from e
            offset += len(raw)
            if progress is not None:
                progress(len(raw))
            if number == 1:
                text = text.removeprefix("\ufeff")
            yield number, text
