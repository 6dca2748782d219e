"""`convo ingest`: detect each export's format, stream its messages into one canonical, ordered JSONL log.

Flow: expand the inputs (folders recursively, sorted; files of unknown format there are skipped with a
warning) -> sniff each file's format -> stream its parser's messages (optionally scrubbed) straight into a
staging file beside `--out` -> put the log in order -> rename it onto `--out` -> write the sidecar
`<out stem>.meta.json` the same way. A failure anywhere removes the staging files: `--out` is never
half-written.

Ordering (by chat title, then time; ties keep file order) without holding the log in memory. Exports
are nearly always already in time order per chat, so while streaming we only note, per chat, the byte
range it occupies in the staging file and whether it stayed in time order in one contiguous run. Then:

* every chat in order and contiguous, chats already sorted by title: the staging file *is* the log (rename);
* chats in order but not sorted by title: byte ranges are copied in title order (no JSON parsing);
* a chat out of time order or split over several runs (e.g. in two files): only that chat's lines are
  re-read and put through a bounded external merge sort (chunks of `SORT_CHUNK_LINES` sorted in memory and
  spilled to temp files, then `heapq.merge`), so memory stays bounded whatever the input.

"me" is `--me` (a speaker name or id), else the exporting account from a Telegram full export's
`personal_information`, else the one speaker present in every chat; otherwise ingest stops and asks for
`--me`, listing the speakers.
"""

from __future__ import annotations

import heapq
import importlib
import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any

from convo.errors import ConfigError, IngestError
from training.ingest.base import HEAD_BYTES, ParseContext, Parser
from training.ingest.records import Message

# Parser modules in sniffing order: the JSON formats have distinctive keys, WhatsApp lines a distinctive
# header, and JSONL is the catch-all schema.
PARSER_MODULES = ("telegram", "discord_export", "whatsapp", "jsonl")
FORMATS = ("auto", "telegram", "whatsapp", "discord", "jsonl")
SORT_CHUNK_LINES = 200_000
PROGRESS_EVERY = 5_000
_OFFSET_RE = re.compile(r"(?:UTC|GMT)?([+-])(\d{1,2})(?::?(\d{2}))?")


def load_parsers() -> dict[str, Parser]:
    """The parsers that exist in this checkout, by format name, in sniffing order."""
    parsers: dict[str, Parser] = {}
    for module in PARSER_MODULES:
        qualified = f"training.ingest.{module}"
        try:
            mod = importlib.import_module(qualified)
        except ModuleNotFoundError as e:
            if e.name == qualified:  # not written yet; anything else missing is a real error
                continue
            raise
        parsers[mod.PARSER.name] = mod.PARSER
    return parsers


def resolve_tz(name: str) -> tzinfo:
    """An IANA zone ("Europe/Berlin"), "UTC", or a fixed offset ("+02:00", "-0530", "UTC+1")."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    text = name.strip()
    if text.upper() in ("UTC", "Z", "GMT"):
        return UTC
    m = _OFFSET_RE.fullmatch(text)
    if m:
        sign = 1 if m.group(1) == "+" else -1
        hours, minutes = int(m.group(2)), int(m.group(3) or 0)
        if hours < 24 and minutes < 60:
            return timezone(sign * timedelta(hours=hours, minutes=minutes))
    try:
        return ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise ConfigError(
            f"--tz {name!r}: unknown time zone; use an IANA name like Europe/Berlin, UTC, or an offset like +02:00"
        ) from e


@dataclass
class Speaker:
    """A speaker across the whole log."""

    id: str
    name: str
    count: int = 0


@dataclass
class _Chat:
    """Where one chat's lines sit in the staging file and whether they are usable as they are."""

    start: int
    end: int
    last_ts: datetime
    ordered: bool = True  # one contiguous run in time order
    speakers: set[str] = field(default_factory=set)


@dataclass
class IngestResult:
    """What `ingest` wrote and found; `meta` is the sidecar's content."""

    out: Path
    meta_path: Path
    meta: dict[str, Any]
    warnings: list[str]


def expand_inputs(inputs: Sequence[Path], skip: set[Path]) -> list[tuple[Path, bool]]:
    """(file, named explicitly) for every input; folders are walked recursively in sorted order."""
    files: list[tuple[Path, bool]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for sub in sorted(p for p in path.rglob("*") if p.is_file()):
                if sub.resolve() in skip or any(part.startswith(".") for part in sub.relative_to(path).parts):
                    continue
                files.append((sub, False))
        elif path.is_file():
            files.append((path, True))
        elif path.exists():
            raise IngestError(f"{path}: not a regular file or folder; expected a chat export")
        else:
            raise IngestError(f"{path}: no such file or folder; expected a chat export")
    return files


def _head(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(HEAD_BYTES)
    except OSError as e:
        raise IngestError(f"{path}: cannot read ({e.strerror})") from e


def _looks_binary(head: bytes) -> bool:
    return b"\x00" in head[:8192]


def detect(path: Path, head: bytes, parsers: dict[str, Parser]) -> Parser | None:
    """The first parser whose sniff accepts the file, or None."""
    for parser in parsers.values():
        if parser.sniff(path, head):
            return parser
    return None


def _unknown_reason(path: Path, head: bytes, names: Sequence[str]) -> str:
    if not head.strip():
        what = "empty file"
    elif _looks_binary(head):
        what = "binary file (byte 0 onwards is not text)"
    else:
        what = "unknown format"
    return f"{path}: {what}; expected one of {', '.join(names)} (or name it with --format)"


def _temp_beside(target: Path, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)  # mkstemp makes 0600; the log should get the usual permissions
    return Path(name)


def _sort_key(line: bytes) -> tuple[str, float]:
    d = json.loads(line)
    return d["chat"], datetime.fromisoformat(d["ts"]).timestamp()


def _sorted_lines(staging: Path, chats: set[str], tmpdir: Path) -> Iterator[bytes]:
    """Lines of `chats` from the staging file ordered by (chat, time), stable; bounded memory."""
    runs: list[Path] = []
    chunk: list[tuple[tuple[str, float], bytes]] = []

    def spill() -> None:
        chunk.sort(key=lambda kv: kv[0])
        run = tmpdir / f"run{len(runs)}.jsonl"
        with run.open("wb") as f:
            f.writelines(line for _, line in chunk)
        runs.append(run)
        chunk.clear()

    with staging.open("rb") as f:
        for line in f:
            key = _sort_key(line)
            if key[0] in chats:
                chunk.append((key, line))
                if len(chunk) >= SORT_CHUNK_LINES:
                    spill()
    if not runs:
        chunk.sort(key=lambda kv: kv[0])
        yield from (line for _, line in chunk)
        return
    if chunk:
        spill()
    files = [run.open("rb") for run in runs]
    try:
        yield from heapq.merge(*files, key=_sort_key)
    finally:
        for f in files:
            f.close()


def _finalize(staging: Path, chats: dict[str, _Chat], order: list[str], out_tmp: Path) -> Path:
    """The file holding the ordered log: `staging` itself when already ordered, else `out_tmp`."""
    titles = sorted(chats)
    unordered = {c for c, st in chats.items() if not st.ordered}
    if not unordered and titles == order:
        return staging
    with tempfile.TemporaryDirectory(dir=out_tmp.parent, prefix=f".{out_tmp.name}.sort") as tmp:
        bad = _sorted_lines(staging, unordered, Path(tmp)) if unordered else iter(())
        pending = next(bad, None)
        with staging.open("rb") as src, out_tmp.open("wb") as dst:
            for title in titles:
                st = chats[title]
                if st.ordered:
                    src.seek(st.start)
                    remaining = st.end - st.start
                    while remaining:
                        block = src.read(min(remaining, 1 << 20))
                        dst.write(block)
                        remaining -= len(block)
                else:
                    while pending is not None and json.loads(pending)["chat"] == title:
                        dst.write(pending)
                        pending = next(bad, None)
    return out_tmp


def _identify_me(
    me: str | None, hints: set[str], speakers: dict[str, Speaker], chats: dict[str, _Chat]
) -> dict[str, Any]:
    """{"name", "id", "ids", "how"} for the exporting user, or IngestError asking for --me.

    A name can stand for several ids (the same person on Telegram, WhatsApp and Discord): `ids` lists them all.
    """

    def by_name(name: str, how: str) -> dict[str, Any]:
        folded = name.casefold()
        ids = sorted(sid for sid, s in speakers.items() if s.name.casefold() == folded)
        best = max(ids, key=lambda sid: speakers[sid].count)
        return {"name": speakers[best].name, "id": best, "ids": ids, "how": how}

    if me:
        if me in speakers:
            return {"name": speakers[me].name, "id": me, "ids": [me], "how": "--me"}
        if any(s.name.casefold() == me.casefold() for s in speakers.values()):
            return by_name(me, "--me")
        raise IngestError(f"--me {me!r}: no speaker has this name or id; speakers: {_speaker_list(speakers)}")
    ids = sorted(h for h in hints if h in speakers)
    if ids:
        return {"name": speakers[ids[0]].name, "id": ids[0], "ids": ids, "how": "telegram personal_information"}
    everywhere = set.intersection(*(c.speakers for c in chats.values())) if chats else set()
    if len(everywhere) == 1:
        sid = everywhere.pop()
        return {"name": speakers[sid].name, "id": sid, "ids": [sid], "how": "present in every chat"}
    if not everywhere:  # across platforms ids differ; the same display name may still be in every chat
        names = set.intersection(*({speakers[sid].name.casefold() for sid in c.speakers} for c in chats.values()))
        if len(names) == 1:
            return by_name(names.pop(), "name present in every chat")
    why = "several speakers are in every chat" if everywhere else "no speaker is in every chat"
    raise IngestError(
        f"cannot tell which speaker is you ({why}); pass --me NAME_OR_ID. Speakers: {_speaker_list(speakers)}"
    )


def _speaker_list(speakers: dict[str, Speaker], limit: int = 12) -> str:
    top = sorted(speakers.values(), key=lambda s: (-s.count, s.name))
    text = ", ".join(f"{s.name} (id {s.id}, {s.count} msgs)" if s.id != s.name else f"{s.name} ({s.count} msgs)"
                     for s in top[:limit])
    return text + (f", ... {len(top) - limit} more" if len(top) > limit else "") if top else "(none)"


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = _temp_beside(path, ".tmp")
    try:
        tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def meta_path_for(out: Path) -> Path:
    """The sidecar of a log: messages.jsonl -> messages.meta.json."""
    return out.with_name(f"{out.stem}.meta.json")


def ingest(
    inputs: Sequence[Path],
    out: Path,
    *,
    fmt: str = "auto",
    me: str | None = None,
    tz: str = "UTC",
    scrub: bool = False,
    on_file: Callable[[Path, str], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> IngestResult:
    """Parse every export in `inputs` into the ordered canonical log `out` plus its `.meta.json` sidecar."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    zone = resolve_tz(tz)
    parsers = load_parsers()
    if fmt != "auto" and fmt not in parsers:
        raise ConfigError(f"--format {fmt}: this parser is not installed in this checkout")
    scrubber = None
    if scrub:
        try:
            from training.ingest.scrub import Scrubber
        except ModuleNotFoundError as e:
            raise ConfigError("--scrub: the scrubber (training/ingest/scrub.py) is not available") from e
        scrubber = Scrubber()

    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; expected a file path such as {out / 'messages.jsonl'}")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: folder {out.parent} does not exist")
    meta_path = meta_path_for(out)
    files = expand_inputs(inputs, skip={out.resolve(), meta_path.resolve()})
    if not files:
        raise IngestError(f"{', '.join(map(str, inputs))}: no files found; expected chat exports")

    warnings: list[str] = []
    ctx = ParseContext(tz=zone)
    chats: dict[str, _Chat] = {}
    order: list[str] = []  # chats in staging order
    speakers: dict[str, Speaker] = {}
    formats: Counter = Counter()
    files_used: list[dict[str, Any]] = []
    first_ts = last_ts = None
    total = 0

    serialize = Message.__pydantic_serializer__.to_json
    staging = _temp_beside(out, ".staging")
    out_tmp = _temp_beside(out, ".tmp")
    try:
        with staging.open("wb") as dst:
            offset = 0
            for path, explicit in files:
                head = _head(path)
                if fmt != "auto":
                    parser = parsers[fmt]
                else:
                    parser = None if _looks_binary(head) else detect(path, head, parsers)
                    if parser is None:
                        reason = _unknown_reason(path, head, [n for n in parsers])
                        if explicit:
                            raise IngestError(reason)
                        warnings.append(f"skipped {reason}")
                        continue
                if on_file:
                    on_file(path, parser.name)
                current = None  # chat of the previous message of this file
                file_count = 0
                for msg in parser.parse(path, ctx):
                    if scrubber is not None:
                        text = scrubber.scrub(msg.text)
                        if text != msg.text:
                            msg = msg.model_copy(update={"text": text})
                    try:
                        line = serialize(msg) + b"\n"  # what Message.to_json() gives, as bytes
                    except ValueError as e:  # e.g. a lone surrogate from a "\ud800" escape
                        raise IngestError(
                            f"{path}: message of {msg.speaker!r} at {msg.ts.isoformat()} in chat {msg.chat!r}: "
                            f"text is not valid Unicode ({str(e).splitlines()[0]}); fix or drop that message"
                        ) from e
                    chat, ts = msg.chat, msg.ts
                    if chat != current:
                        st = chats.get(chat)
                        if st is None:
                            st = chats[chat] = _Chat(start=offset, end=offset, last_ts=ts)
                            order.append(chat)
                        else:
                            st.ordered = False  # a second run of the same chat
                        current = chat
                    if ts < st.last_ts:
                        st.ordered = False
                    st.last_ts = ts
                    offset += len(line)
                    st.end = offset
                    dst.write(line)
                    sid = msg.speaker_id
                    sp = speakers.get(sid)
                    if sp is None:
                        sp = speakers[sid] = Speaker(id=sid, name=msg.speaker)
                    sp.count += 1
                    st.speakers.add(sid)
                    if first_ts is None or ts < first_ts:
                        first_ts = ts
                    if last_ts is None or ts > last_ts:
                        last_ts = ts
                    file_count += 1
                    if on_progress and file_count % PROGRESS_EVERY == 0:
                        on_progress(PROGRESS_EVERY)
                if on_progress:
                    on_progress(file_count % PROGRESS_EVERY)
                formats[parser.name] += file_count
                total += file_count
                files_used.append({"path": str(path), "format": parser.name, "messages": file_count})
        if total == 0:
            skipped = ", ".join(f"{k} {v}" for k, v in sorted(ctx.skipped.items())) or "nothing"
            raise IngestError(
                f"{', '.join(str(f['path']) for f in files_used) or 'inputs'}: no messages with text found "
                f"(skipped: {skipped}); is --format right?"
            )
        me_info = _identify_me(me, ctx.me_hints, speakers, chats)
        final = _finalize(staging, chats, order, out_tmp)
        os.replace(final, out)
    finally:
        staging.unlink(missing_ok=True)
        out_tmp.unlink(missing_ok=True)

    meta = {
        "out": str(out),
        "messages": total,
        "me": me_info,
        "speakers": [
            {"name": s.name, "id": s.id, "count": s.count}
            for s in sorted(speakers.values(), key=lambda s: (-s.count, s.name, s.id))
        ],
        "chats": len(chats),
        "formats": dict(sorted(formats.items())),
        "date_range": {"first": first_ts.isoformat(), "last": last_ts.isoformat()},
        "skipped": dict(sorted(ctx.skipped.items())),
        "scrubbed": dict(sorted(scrubber.counts.items())) if scrubber is not None else None,
        "tz": tz,
        "files": files_used,
        "warnings": warnings,
    }
    _write_json_atomic(meta_path, meta)
    return IngestResult(out=out, meta_path=meta_path, meta=meta, warnings=warnings)
