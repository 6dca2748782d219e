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

A chat in several runs that are each in time order (one chat in several exports; a log and what is appended
to it) skips the sort: its runs are merged straight from the staging file with `heapq.merge`.

De-duplication (dedup.py) rides on that merge: a message can only have a copy if its chat occurs in more than
one run, and copies share a timestamp, so they meet in the merged stream, one (chat, time) group at a time.
Every staging line remembers which input it came from (by its byte offset) for the occurrence numbers.
`append=True` streams the existing log in as input 0, so the log and the new exports are merged the same way;
the meta sidecar keeps the earlier inputs and adds the new ones, each with its date range and duplicates.

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
from json.decoder import scanstring as _scanstring
from pathlib import Path
from typing import Any, BinaryIO

from errors import ConfigError, IngestError
from training.ingest.base import HEAD_BYTES, ParseContext, Parser
from training.ingest.dedup import ChatTitles, GroupDedup
from training.ingest.records import Message

# Parser modules in sniffing order: the JSON formats have distinctive keys, WhatsApp lines a distinctive
# header, and JSONL is the catch-all schema.
PARSER_MODULES = ("telegram", "discord_export", "whatsapp", "jsonl")
FORMATS = ("auto", "telegram", "whatsapp", "discord", "jsonl")
DATE_ORDERS = ("dmy", "mdy")
MAX_WARNINGS_PER_FILE = 20
SORT_CHUNK_LINES = 200_000
MAX_MERGE_RUNS = 64  # a chat in more time-ordered runs than this goes through the external sort instead
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
    runs: list[list[Any]] = field(default_factory=list)  # [start, end, input number, in time order] per run


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
    """(chat, POSIX time) of a staging line, read without parsing the rest of it.

    Staging lines are written by Message's own serializer, so they always start `{"chat":"...","ts":"...",`.
    """
    text = line.decode("utf-8")
    chat, end = _scanstring(text, 9)  # 9 = len('{"chat":"')
    ts_end = text.index('"', end + 7)  # 7 = len(',"ts":"')
    return chat, datetime.fromisoformat(text[end + 7 : ts_end]).timestamp()


def _speaker_id(line: bytes) -> str:
    """The speaker_id of a staging line, the fourth key (see _sort_key), without parsing the rest."""
    text = line.decode("utf-8")
    end = _scanstring(text, 9)[1]
    end = text.index('"', end + 7) + 1  # past the ts
    end = _scanstring(text, end + 12)[1]  # 12 = len(',"speaker":"')
    return _scanstring(text, end + 15)[0]  # 15 = len(',"speaker_id":"')


def _tagged(run: Iterator[bytes]) -> Iterator[tuple[tuple[str, float], int, bytes]]:
    """(sort key, input number, line) for each `input<TAB>line` of a spilled run."""
    for tagged in run:
        idx, line = tagged.split(b"\t", 1)
        yield _sort_key(line), int(idx), line


def _sorted_lines(
    staging: Path, chats: set[str], tmpdir: Path, bounds: list[int]
) -> Iterator[tuple[tuple[str, float], int, bytes]]:
    """(key, input number, line) of `chats`' lines in the staging file, ordered by (chat, time), stable;
    bounded memory. `bounds[i]` is the staging offset where input i starts."""
    runs: list[Path] = []
    chunk: list[tuple[tuple[str, float], int, bytes]] = []

    def spill() -> None:
        chunk.sort(key=lambda kv: kv[0])
        run = tmpdir / f"run{len(runs)}.jsonl"
        with run.open("wb") as f:
            f.writelines(b"%d\t%s" % (idx, line) for _, idx, line in chunk)
        runs.append(run)
        chunk.clear()

    offset, idx, next_bound = 0, -1, 0
    with staging.open("rb") as f:
        for line in f:
            while next_bound is not None and offset >= next_bound:
                idx += 1
                next_bound = bounds[idx + 1] if idx + 1 < len(bounds) else None
            offset += len(line)
            if _scanstring(line.decode("utf-8"), 9)[0] in chats:
                chunk.append((_sort_key(line), idx, line))
                if len(chunk) >= SORT_CHUNK_LINES:
                    spill()
    if not runs:
        chunk.sort(key=lambda kv: kv[0])
        yield from chunk
        return
    if chunk:
        spill()
    files = [run.open("rb") for run in runs]
    try:
        yield from heapq.merge(*(_tagged(f) for f in files), key=lambda t: t[0])
    finally:
        for f in files:
            f.close()


def _run_items(f: BinaryIO, size: int, idx: int) -> Iterator[tuple[float, int, bytes]]:
    """(POSIX time, input number, line) for the `size` bytes of one chat's run from `f`'s position on.

    Every line of a chat starts with the same bytes `{"chat":"<title>","ts":"`, so the time is found at a
    fixed offset, measured on the first line.
    """
    at = 0
    while size > 0:
        line = f.readline()
        size -= len(line)
        if not at:
            end = _scanstring(line.decode("utf-8"), 9)[1]
            at = len(line.decode("utf-8")[: end + 7].encode("utf-8"))
        yield datetime.fromisoformat(line[at : line.index(b'"', at)].decode()).timestamp(), idx, line


def _merged_runs(staging: Path, runs: list[list[Any]]) -> Iterator[tuple[float, int, bytes]]:
    """The lines of one chat's time-ordered runs merged by time; ties keep staging order (as a stable sort)."""
    files: list[BinaryIO] = []
    try:
        items = []
        for start, end, idx, _ in runs:
            f = staging.open("rb")
            files.append(f)
            f.seek(start)
            items.append(_run_items(f, end - start, idx))
        yield from heapq.merge(*items, key=lambda t: t[0])
    finally:
        for f in files:
            f.close()


def _write_deduped(
    dst: BinaryIO, items: Iterator[tuple[Any, int, bytes]], on_copy: Callable[[int, str], None]
) -> None:
    """Write one chat's (key, input number, line) items, in order, dropping copies within each equal-key group."""
    group_key, group = None, []
    for key, idx, line in items:
        if key != group_key:
            if group:
                _write_group(dst, group, on_copy)
            group_key, group = key, []
        group.append((idx, line))
    if group:
        _write_group(dst, group, on_copy)


def _write_group(dst: BinaryIO, group: list[tuple[int, bytes]], on_copy: Callable[[int, str], None]) -> None:
    """Write the lines of one (chat, time) group, dropping copies (dedup.py); most groups are one line."""
    if len(group) == 1:
        dst.write(group[0][1])
        return
    (first_idx, first), (second_idx, second) = group[0], group[1]
    if len(group) == 2 and first == second and first_idx != second_idx:
        # The usual copy: one message in two inputs, byte for byte (same id, or first of its text in each).
        dst.write(first)
        on_copy(second_idx, _speaker_id(second))
        return
    dedup = GroupDedup()
    for idx, line in group:
        record = json.loads(line)
        if dedup.is_copy(idx, record):
            on_copy(idx, record["speaker_id"])
        else:
            dst.write(line)


def _finalize(
    staging: Path, chats: dict[str, _Chat], order: list[str], out_tmp: Path, bounds: list[int],
    on_copy: Callable[[int, str], None],
) -> Path:
    """The file holding the ordered, de-duplicated log: `staging` itself when already ordered, else `out_tmp`.

    A chat in several runs that are each in time order (the usual case: the same chat in several exports, or
    a log and the export appended to it) is merged straight from the staging file; any other unordered chat
    goes through the bounded external sort. `on_copy(input number, speaker_id)` is called for every line
    dropped as a copy of an earlier one.
    """
    titles = sorted(chats)
    unordered = {c for c, st in chats.items() if not st.ordered}
    if not unordered and titles == order:
        return staging
    mergeable = {c for c in unordered if len(chats[c].runs) <= MAX_MERGE_RUNS and all(r[3] for r in chats[c].runs)}
    hard = unordered - mergeable
    with tempfile.TemporaryDirectory(dir=out_tmp.parent, prefix=f".{out_tmp.name}.sort") as tmp:
        bad = _sorted_lines(staging, hard, Path(tmp), bounds) if hard else iter(())
        pending = next(bad, None)

        def take(title: str) -> Iterator[tuple[Any, int, bytes]]:
            nonlocal pending
            while pending is not None and pending[0][0] == title:
                yield pending
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
                elif title in mergeable:
                    _write_deduped(dst, _merged_runs(staging, st.runs), on_copy)
                else:
                    _write_deduped(dst, take(title), on_copy)
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
        # A platform id names one account; a name (or a name-only id, as WhatsApp's) names the person everywhere.
        if me in speakers and speakers[me].name != me:
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


def _read_previous(out: Path, meta_path: Path) -> dict[str, Any]:
    """The sidecar of the log that `--append` extends ({} when it has none or it is unreadable)."""
    if not out.is_file():
        raise ConfigError(f"--append: {out} does not exist; leave out --append to create it")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _log_messages(path: Path) -> Iterator[Message]:
    """The messages of an existing canonical log, strictly validated (bad lines raise `file:line: ...`)."""
    from pydantic import ValidationError

    from training.ingest.base import utf8_lines
    from training.ingest.jsonl import _problem

    validate = Message.model_validate_json
    for number, line in utf8_lines(path, f"is {path} a log written by `convo ingest`?"):
        if not line.strip():
            continue
        try:
            yield validate(line)
        except ValidationError as e:
            raise IngestError(f"{path}:{number}: {_problem(e)}; is it a log written by `convo ingest`?") from e


def _check_append(previous: dict[str, Any], tz: str | None, scrub: bool, out: Path) -> str:
    """The zone to read new exports in; ConfigError when the new run would not match how the log was made.

    WhatsApp copies are recognised by their timestamps and text, so a different --tz or --scrub than the
    log was written with would make every copy look new.
    """
    old_tz = previous.get("tz")
    if tz is None:
        tz = old_tz if isinstance(old_tz, str) else "UTC"
    elif isinstance(old_tz, str) and resolve_tz(tz) != resolve_tz(old_tz):
        raise ConfigError(
            f"--tz {tz}: {out} was written with --tz {old_tz}; append with the same zone so that copies are found"
        )
    if "scrubbed" in previous and (previous["scrubbed"] is not None) != scrub:
        was = "with" if previous["scrubbed"] is not None else "without"
        raise ConfigError(f"{out} was written {was} --scrub; append {was} it too so that copies are found")
    return tz


def ingest(
    inputs: Sequence[Path],
    out: Path,
    *,
    fmt: str = "auto",
    me: str | None = None,
    tz: str | None = None,
    scrub: bool = False,
    append: bool = False,
    date_order: str | None = None,
    phone_regions: Sequence[str] = ("US",),
    on_file: Callable[[Path, str], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> IngestResult:
    """Parse every export in `inputs` into the ordered, de-duplicated log `out` plus its `.meta.json` sidecar.

    `append=True` keeps the messages already in `out` and adds the new ones; `tz=None` means UTC, or the
    log's zone when appending. `date_order` ("dmy"/"mdy") reads WhatsApp files whose dates fit both orders.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if date_order is not None and date_order not in DATE_ORDERS:
        raise ConfigError(f"--date-order {date_order!r}: expected dmy (31/12) or mdy (12/31)")
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; expected a file path such as {out / 'messages.jsonl'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create folder {out.parent} ({e.strerror or e})") from e
    meta_path = meta_path_for(out)
    previous = _read_previous(out, meta_path) if append else {}
    tz = _check_append(previous, tz, scrub, out) if append else (tz or "UTC")
    zone = resolve_tz(tz)
    parsers = load_parsers()
    if fmt != "auto" and fmt not in parsers:
        raise ConfigError(f"--format {fmt}: this parser is not installed in this checkout")
    scrubber = None
    if scrub:
        try:
            from training.ingest.scrub import Scrubber, check_regions
        except ModuleNotFoundError as e:
            raise ConfigError("--scrub: the scrubber (training/ingest/scrub.py) is not available") from e
        scrubber = Scrubber(check_regions(phone_regions))

    files = expand_inputs(inputs, skip={out.resolve(), meta_path.resolve()})
    if not files:
        raise IngestError(f"{', '.join(map(str, inputs))}: no files found; expected chat exports")

    warnings: list[str] = []
    ctx = ParseContext(tz=zone, date_order=date_order)
    prev_me = previous.get("me")
    me_from_log = prev_me.get("name") if me is None and isinstance(prev_me, dict) else None
    titles = ChatTitles()
    chats: dict[str, _Chat] = {}
    order: list[str] = []  # chats in staging order
    speakers: dict[str, Speaker] = {}
    formats: Counter = Counter()
    runs: list[dict[str, Any]] = []  # one per input (the existing log first when appending)
    bounds: list[int] = []  # staging offset where each input starts
    first_ts = last_ts = None
    total = 0

    sources = ([(out, True)] if append else []) + files  # (path, named explicitly); the log itself first

    serialize = Message.__pydantic_serializer__.to_json
    staging = _temp_beside(out, ".staging")
    out_tmp = _temp_beside(out, ".tmp")
    try:
        with staging.open("wb") as dst:
            offset = 0
            for i, (path, explicit) in enumerate(sources):
                if append and i == 0:
                    name, messages = "log", _log_messages(path)
                else:
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
                    name, messages = parser.name, parser.parse(path, ctx)
                if on_file:
                    on_file(path, name)
                current = None  # chat of the previous message of this file
                file_count = 0
                file_first = file_last = None
                bounds.append(offset)
                input_no = len(bounds) - 1
                before = len(ctx.warnings)
                for msg in messages:
                    if scrubber is not None and name != "log":
                        text = scrubber.scrub(msg.text)
                        if text != msg.text:
                            msg = msg.model_copy(update={"text": text})
                    chat = titles.title(msg.source, msg.chat_id, msg.chat)
                    if chat != msg.chat:
                        msg = msg.model_copy(update={"chat": chat})
                    try:
                        line = serialize(msg) + b"\n"  # what Message.to_json() gives, as bytes
                    except ValueError as e:  # e.g. a lone surrogate from a "\ud800" escape
                        raise IngestError(
                            f"{path}: message of {msg.speaker!r} at {msg.ts.isoformat()} in chat {msg.chat!r}: "
                            f"text is not valid Unicode ({str(e).splitlines()[0]}); fix or drop that message"
                        ) from e
                    ts = msg.ts
                    if chat != current:
                        st = chats.get(chat)
                        if st is None:
                            st = chats[chat] = _Chat(start=offset, end=offset, last_ts=ts)
                            order.append(chat)
                        else:
                            st.ordered = False  # a second run of the same chat
                        run = [offset, offset, input_no, True]
                        st.runs.append(run)
                        run_last = ts
                        current = chat
                    if ts < st.last_ts:
                        st.ordered = False
                    if ts < run_last:
                        run[3] = False
                    st.last_ts = run_last = ts
                    offset += len(line)
                    st.end = run[1] = offset
                    dst.write(line)
                    sid = msg.speaker_id
                    sp = speakers.get(sid)
                    if sp is None:
                        sp = speakers[sid] = Speaker(id=sid, name=msg.speaker)
                    sp.count += 1
                    st.speakers.add(sid)
                    if file_first is None or ts < file_first:
                        file_first = ts
                    if file_last is None or ts > file_last:
                        file_last = ts
                    file_count += 1
                    if on_progress and file_count % PROGRESS_EVERY == 0:
                        on_progress(PROGRESS_EVERY)
                if on_progress:
                    on_progress(file_count % PROGRESS_EVERY)
                new_warnings = ctx.warnings[before:]
                warnings += new_warnings[:MAX_WARNINGS_PER_FILE]
                if len(new_warnings) > MAX_WARNINGS_PER_FILE:
                    warnings.append(f"{path}: {len(new_warnings) - MAX_WARNINGS_PER_FILE} more warnings like these")
                if file_first is not None:
                    first_ts = file_first if first_ts is None else min(first_ts, file_first)
                    last_ts = file_last if last_ts is None else max(last_ts, file_last)
                formats[name] += file_count
                total += file_count
                runs.append({
                    "path": str(path), "format": name, "messages": file_count, "duplicates": 0,
                    "date_range": {"first": file_first.isoformat(), "last": file_last.isoformat()}
                    if file_first is not None else None,
                })
        if total == 0:
            skipped = ", ".join(f"{k} {v}" for k, v in sorted(ctx.skipped.items())) or "nothing"
            raise IngestError(
                f"{', '.join(str(f['path']) for f in runs) or 'inputs'}: no messages with text found "
                f"(skipped: {skipped}); is --format right?"
            )
        if isinstance(me_from_log, str) and me_from_log:  # appending: the log's "me" unless --me says otherwise
            me_info = _identify_me(me_from_log, ctx.me_hints, speakers, chats)
            me_info["how"] = f"{meta_path.name} of the log appended to"
        else:
            me_info = _identify_me(me, ctx.me_hints, speakers, chats)

        def on_copy(idx: int, speaker_id: str) -> None:
            runs[idx]["duplicates"] += 1
            formats[runs[idx]["format"]] -= 1
            speakers[speaker_id].count -= 1

        final = _finalize(staging, chats, order, out_tmp, bounds, on_copy)
        os.replace(final, out)
    finally:
        staging.unlink(missing_ok=True)
        out_tmp.unlink(missing_ok=True)

    duplicates = sum(r["duplicates"] for r in runs)
    shared_all: dict[str, set[str]] = {}
    prev_shared = previous.get("shared_titles")
    for title, finals in (prev_shared.items() if isinstance(prev_shared, dict) else ()):  # earlier runs' too
        shared_all.setdefault(title, set()).update(f for f in finals if isinstance(f, str))
    for title, finals in titles.shared.items():
        shared_all.setdefault(title, set()).update(finals)
    shared = {t: sorted(finals) for t, finals in sorted(shared_all.items())}
    for title, finals in shared.items():
        if title not in titles.shared:
            continue  # found by an earlier run; the sidecar keeps saying so, the summary need not repeat it
        warnings.append(f"{len(finals)} different chats are titled {title!r}; kept apart as "
                        + ", ".join(repr(f) for f in finals))
    new_runs = runs[1:] if append else runs
    if append:
        prev_files = previous.get("files") if isinstance(previous.get("files"), list) else []
        prev_skipped = previous.get("skipped") if isinstance(previous.get("skipped"), dict) else {}
        skipped_all = Counter({k: v for k, v in prev_skipped.items() if isinstance(v, int)}) + ctx.skipped
        prev_dups = previous.get("duplicates") if isinstance(previous.get("duplicates"), int) else 0
        for fmt_name, n in Counter(previous.get("formats") or {}).items():
            if isinstance(n, int):
                formats[fmt_name] += n
    else:
        prev_files, skipped_all, prev_dups = [], ctx.skipped, 0
    meta = {
        "out": str(out),
        "messages": total - duplicates,
        "duplicates": prev_dups + duplicates,
        "me": me_info,
        "speakers": [
            {"name": s.name, "id": s.id, "count": s.count}
            for s in sorted(speakers.values(), key=lambda s: (-s.count, s.name, s.id)) if s.count > 0
        ],
        "chats": len(chats),
        "shared_titles": shared,
        "formats": {k: v for k, v in sorted(formats.items()) if v > 0 and k != "log"},
        "date_range": {"first": first_ts.isoformat(), "last": last_ts.isoformat()},
        "skipped": dict(sorted(skipped_all.items())),
        "scrubbed": dict(sorted(scrubber.counts.items())) if scrubber is not None else None,
        "tz": tz,
        "files": prev_files + new_runs,
        "appended": {"log_messages": runs[0]["messages"], "new_messages": sum(r["messages"] for r in new_runs),
                     "duplicates": duplicates, "added": total - duplicates - runs[0]["messages"]}
        if append else None,
        "warnings": warnings,
    }
    _write_json_atomic(meta_path, meta)
    return IngestResult(out=out, meta_path=meta_path, meta=meta, warnings=warnings)
