"""Turn a canonical message log into prompt/completion samples for one persona (`convo dataset`).

Pipeline, top to bottom: read the log (and the `me` of its `.meta.json` sidecar) -> keep the chats the persona
speaks in -> give every speaker a tag -> cut each chat into sessions at silences longer than the gap -> one sample
per target burst (the persona's, mine, or both) with up to `context_messages` messages of the same session as
history -> split by session, most recent sessions to validation (the last one cut at a silence so validation
holds about the share asked for) -> write train.jsonl, val.jsonl, meta.json.

Sample lines are TRL's prompt/completion format plus bookkeeping:
`{"prompt": str, "completion": str, "session": str, "chat": str, "target": TAG}` with
`prompt = render_prompt(history, TAG)` and `completion = render_completion(TAG, burst, following)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from errors import ConvoError, DatasetError
from inference.prompt_format import (
    FORMAT_VERSION,
    ROLE_FRIEND,
    ROLE_ME,
    Turn,
    make_tag,
    parse,
    render_completion,
    render_prompt,
    split_completion,
)
from training.ingest.records import Message

Mode = Literal["friend", "self", "both"]
MODES: tuple[str, ...] = ("friend", "self", "both")
SAMPLE_KEYS = ("prompt", "completion", "session", "chat", "target")
TRAIN_FILE, VAL_FILE, META_FILE = "train.jsonl", "val.jsonl", "meta.json"


@dataclass(frozen=True, slots=True)
class Speaker:
    """One person in the log: stable id, the display name they use most, and their prompt tag."""

    speaker_id: str
    name: str
    tag: str | None = None

    def as_meta(self) -> dict[str, str | None]:
        """The {name, speaker_id, tag} object written to meta.json."""
        return {"name": self.name, "speaker_id": self.speaker_id, "tag": self.tag}


@dataclass(frozen=True, slots=True)
class Session:
    """Messages of one chat with no silence longer than the session gap between consecutive ones."""

    session_id: str
    chat: str
    messages: tuple[Message, ...]

    @property
    def start(self) -> datetime:
        """Time of the first message."""
        return self.messages[0].ts


@dataclass(frozen=True, slots=True)
class Sample:
    """One training example: a prompt ending in `[TARGET]` and the target's whole burst as completion."""

    prompt: str
    completion: str
    session: str
    chat: str
    target: str

    def history(self) -> list[Turn]:
        """The turns before the target's tag (the prompt minus its last `[TAG]` line)."""
        head = self.prompt.rsplit("\n", 1)[0] if "\n" in self.prompt else ""
        return [Turn(t.speaker, t.text.strip()) for t in parse(head)]

    def reply(self) -> list[str]:
        """The target's real burst (its messages)."""
        return split_completion(self.completion, self.target)

    def to_json(self) -> str:
        """One JSONL line (no newline), keys in contract order."""
        return json.dumps({k: getattr(self, k) for k in SAMPLE_KEYS}, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class DatasetSummary:
    """What build_dataset wrote: the three paths and the meta.json content (counts included)."""

    out_dir: Path
    train_path: Path
    val_path: Path
    meta_path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, Any]:
        """meta["counts"]: train, val, sessions_train, sessions_val, by_target..."""
        return self.meta["counts"]


# ---------------------------------------------------------------- reading


def read_messages(path: Path, progress: Callable[[int, int], None] | None = None) -> list[Message]:
    """All Message lines of a canonical log; a bad line is a DatasetError naming path:line.

    `progress(bytes_read, total_bytes)` is called every few thousand lines.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: message log not found (create it with `convo ingest EXPORT --out {path}`)")
    messages: list[Message] = []
    total = path.stat().st_size
    try:
        _read_lines(path, messages, progress, total)
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e.reason}); give the JSONL written by `convo ingest`") from e
    if progress is not None:
        progress(total, total)
    return messages


def _read_lines(path: Path, messages: list[Message], progress: Callable[[int, int], None] | None, total: int) -> None:
    """Append the Message of each line of `path` to `messages`."""
    done = 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            done += len(line.encode("utf-8")) if progress is not None else 0
            if progress is not None and lineno % 5000 == 0:
                progress(done, total)
            if not line.strip():
                continue
            try:
                messages.append(Message.model_validate_json(line))
            except ValidationError as e:
                err = e.errors()[0]
                where = ".".join(str(p) for p in err["loc"]) or "line"
                raise DatasetError(
                    f"{path}:{lineno}: {where}: {err['msg']} (not a `convo ingest` message line; re-run convo ingest)"
                ) from e


def sidecar_path(messages_path: Path) -> Path:
    """`messages.jsonl` -> `messages.meta.json` (written by `convo ingest`)."""
    messages_path = Path(messages_path)
    return messages_path.with_name(messages_path.stem + ".meta.json")


def read_sidecar_me(messages_path: Path) -> tuple[list[str], list[str]]:
    """(ids, names) of the exporting user from the sidecar's "me"; empty lists when absent or unreadable.

    Accepts what `convo ingest` writes ({"name", "id", "ids", "how"}) and the older {"speaker", "speaker_id"}.
    """
    try:
        meta = json.loads(sidecar_path(messages_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [], []
    me = meta.get("me") if isinstance(meta, dict) else None
    if isinstance(me, str):
        return [me], [me]
    if not isinstance(me, dict):
        return [], []

    def strings(*values: Any) -> list[str]:
        flat = [x for v in values for x in (v if isinstance(v, list) else [v])]
        return [str(x) for x in flat if isinstance(x, (str, int)) and str(x).strip()]

    return strings(me.get("speaker_id"), me.get("id"), me.get("ids")), strings(me.get("speaker"), me.get("name"))


def resolve_me(messages: Sequence[Message], me: str | None, messages_path: Path) -> list[str]:
    """speaker_ids of the exporting user: `--me` (an id, or a name standing for all its ids), else the sidecar's.

    One person can have several ids (the same name on two platforms). Empty when unknown.
    """
    known = {m.speaker_id for m in messages}

    def by_name(name: str) -> list[str]:
        q = name.strip().casefold()
        return sorted({m.speaker_id for m in messages if m.speaker.strip().casefold() == q})

    if me:
        q = me.strip().casefold()
        ids = sorted(sid for sid in known if sid.casefold() == q) or by_name(me)
        if not ids:
            raise DatasetError(
                f"--me {me!r} is not a speaker in {messages_path}; speakers found: {_describe_speakers(messages)}"
            )
        return ids
    side_ids, side_names = read_sidecar_me(messages_path)
    ids = list(dict.fromkeys(i for i in side_ids if i in known))
    if ids:
        return ids
    for name in side_names:
        if ids := by_name(name):
            return ids
    return []


def adapter_data_last_ts(adapter_dir: Path) -> datetime:
    """The newest training message of an adapter (a `convo train` output dir, or a persona dir with `current`)."""
    from inference.adapter_meta import read_adapter_meta
    from inference.versions import resolve

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise DatasetError(f"--since {adapter_dir}: no such adapter folder (give a `convo train` --out folder)")
    try:
        resolved, _ = resolve(adapter_dir)
        meta = read_adapter_meta(resolved)
    except ConvoError as e:
        raise DatasetError(f"--since {adapter_dir}: {e}") from e
    if meta.data_last_ts is None:
        raise DatasetError(
            f"--since {adapter_dir}: the adapter does not record its newest training message (data_last_ts; it "
            "was trained before convo recorded it); build the dataset without --since, or retrain once"
        )
    return meta.data_last_ts


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- speakers, chats, tags


def speakers_of(messages: Iterable[Message]) -> dict[str, Speaker]:
    """Speakers by id, in order of first appearance; the name is the display name they used most."""
    names: dict[str, Counter] = {}
    for m in messages:
        names.setdefault(m.speaker_id, Counter())[m.speaker] += 1
    return {sid: Speaker(sid, c.most_common(1)[0][0]) for sid, c in names.items()}


def _describe_speakers(messages: Sequence[Message], limit: int = 20) -> str:
    counts = Counter(m.speaker_id for m in messages)
    speakers = speakers_of(messages)
    parts = [f"{speakers[sid].name} (id {sid}, {n} msgs)" for sid, n in counts.most_common(limit)]
    if len(counts) > limit:
        parts.append(f"... and {len(counts) - limit} more")
    return ", ".join(parts) or "none"


def resolve_speaker(query: str, messages: Sequence[Message], option: str, source: Path) -> str:
    """The speaker_id that `query` names: a speaker_id or any display name they used, case-insensitive."""
    ids = {m.speaker_id for m in messages}
    if query.strip() in ids:
        return query.strip()
    q = query.strip().casefold()
    by_id = {sid for sid in ids if sid.casefold() == q}
    if len(by_id) == 1:
        return by_id.pop()
    by_name = sorted({m.speaker_id for m in messages if m.speaker.strip().casefold() == q})
    if len(by_name) == 1:
        return by_name[0]
    if len(by_name) > 1:
        speakers = speakers_of(messages)
        ids = ", ".join(f"{speakers[s].name} (id {s})" for s in by_name)
        raise DatasetError(f"{option} {query!r} names several speakers in {source}: {ids}; pass the speaker_id instead")
    raise DatasetError(
        f"{option} {query!r} is not a speaker in {source}; speakers found: {_describe_speakers(messages)}"
    )


def _resolves(query: str, messages: Sequence[Message], source: Path) -> str | None:
    """resolve_speaker, or None instead of an error."""
    try:
        return resolve_speaker(query, messages, "--persona", source)
    except DatasetError:
        return None


def select_chats(messages: Sequence[Message], chats: Sequence[str] | None, source: Path) -> list[Message]:
    """Messages of the chats named in `chats` (each a chat name or a comma-separated list); all when None/empty."""
    if not chats:
        return list(messages)
    known = list(dict.fromkeys(m.chat for m in messages))
    known_set = set(known)
    wanted: set[str] = set()
    for value in chats:
        names = [value] if value in known_set else [p.strip() for p in value.split(",") if p.strip()]
        for name in names:
            if name not in known_set:
                shown = ", ".join(repr(c) for c in known[:20]) + (" ..." if len(known) > 20 else "")
                raise DatasetError(f"--chats {name!r}: no such chat in {source}; chats found: {shown}")
            wanted.add(name)
    return [m for m in messages if m.chat in wanted]


def assign_tags(
    speakers: dict[str, Speaker], persona_id: str, me_id: str | None, *, role_tags: bool
) -> dict[str, Speaker]:
    """Give every speaker a unique tag: persona first (so it gets the clean one), then me, then the others.

    With role tags the persona is [FRIEND] and I am [ME]; everyone else keeps a name tag either way.
    """
    order = [persona_id] + ([me_id] if me_id and me_id != persona_id else [])
    order += [sid for sid in speakers if sid not in order]
    taken: list[str] = [ROLE_ME, ROLE_FRIEND] if role_tags else []
    tagged: dict[str, Speaker] = {}
    for sid in order:
        sp = speakers[sid]
        if role_tags and sid == persona_id:
            tag = ROLE_FRIEND
        elif role_tags and sid == me_id:
            tag = ROLE_ME
        else:
            tag = make_tag(sp.name, reserved=taken)
            taken.append(tag)
        tagged[sid] = Speaker(sid, sp.name, tag)
    return tagged


# ---------------------------------------------------------------- sessions and samples


def sessionize(messages: Iterable[Message], session_gap_min: float) -> list[Session]:
    """Cut each chat into sessions: a new one starts after a silence *longer* than the gap (equal stays in).

    Messages are grouped by chat and stably sorted by time; sessions come out in chronological order of start.
    """
    gap = timedelta(minutes=session_gap_min)
    by_chat: dict[str, list[Message]] = defaultdict(list)
    for m in messages:
        by_chat[m.chat].append(m)
    sessions: list[Session] = []
    for chat, msgs in by_chat.items():
        msgs.sort(key=lambda m: m.ts)
        runs: list[list[Message]] = []
        for m in msgs:
            if not runs or m.ts - runs[-1][-1].ts > gap:
                runs.append([])
            runs[-1].append(m)
        sessions += [Session(f"{chat}#{i}", chat, tuple(run)) for i, run in enumerate(runs, 1)]
    sessions.sort(key=lambda s: (s.start, s.chat, s.session_id))
    return sessions


def bursts_of(messages: Sequence[Message]) -> list[list[Message]]:
    """Consecutive messages by one speaker grouped together."""
    bursts: list[list[Message]] = []
    for m in messages:
        if bursts and bursts[-1][0].speaker_id == m.speaker_id:
            bursts[-1].append(m)
        else:
            bursts.append([m])
    return bursts


# (history turns, target tag, completion) -> history to keep (oldest dropped first).
FitFn = Callable[[list[Turn], str, str], list[Turn]]


def token_fitter(tokenizer: Any, max_tokens: int) -> FitFn:
    """A FitFn dropping the oldest history messages until prompt+completion fits in `max_tokens` tokens.

    At least one message of history is kept, even if the sample then stays over the limit (counted in meta).
    """

    def count(history: list[Turn], target: str, completion: str) -> int:
        return len(tokenizer(render_prompt(history, target) + completion)["input_ids"])

    def fit(history: list[Turn], target: str, completion: str) -> list[Turn]:
        if len(history) <= 1 or count(history, target, completion) <= max_tokens:
            return history
        lo, hi = 1, len(history) - 1  # keep the newest k messages; find the largest k that fits
        while lo < hi:
            k = (lo + hi + 1) // 2
            if count(history[-k:], target, completion) <= max_tokens:
                lo = k
            else:
                hi = k - 1
        return history[-lo:]

    return fit


def session_samples(
    session: Session,
    tags: dict[str, Speaker],
    targets: set[str],
    context_messages: int,
    fit: FitFn | None = None,
) -> list[Sample]:
    """One sample per burst by a target speaker that has at least one earlier message in the session."""
    bursts = bursts_of(session.messages)
    samples = []
    seen: list[Turn] = []
    for i, burst in enumerate(bursts):
        sid = burst[0].speaker_id
        if sid in targets and seen:
            target = tags[sid].tag
            following = tags[bursts[i + 1][0].speaker_id].tag if i + 1 < len(bursts) else None
            completion = render_completion(target, [m.text for m in burst], following)
            history = seen[-context_messages:]
            if fit is not None:
                history = fit(history, target, completion)
            prompt = render_prompt(history, target)
            samples.append(Sample(prompt, completion, session.session_id, session.chat, target))
        seen.extend(Turn(tags[m.speaker_id].tag, m.text) for m in burst)
    return samples


@dataclass(frozen=True, slots=True)
class Split:
    """Sessions on each side, the samples of every session (cut parts included) and what the split did."""

    train: list[Session]
    val: list[Session]
    samples: dict[str, list[Sample]]
    info: dict[str, Any]


def _cut_point(bursts: list[list[Message]], targets: set[str], need: float, slack: float) -> int | None:
    """The burst index to cut a session at so that its later part holds about `need` samples, or None.

    A part's first burst has no history in that part, so it gives no sample. Among the cuts leaving samples on
    both sides, those within `slack` of `need` are candidates and the longest silence wins (a natural pause
    in the conversation); if none is that close, the closest count wins.
    """
    is_target = [b[0].speaker_id in targets for b in bursts]
    best: tuple[bool, float, float] | None = None
    cut = None
    for j in range(2, len(bursts)):
        head = sum(is_target[1:j])
        tail = sum(is_target[j + 1:])
        if head == 0 or tail == 0:
            continue
        off = abs(tail - need)
        silence_s = (bursts[j][0].ts - bursts[j - 1][-1].ts).total_seconds()
        key = (off <= slack, silence_s if off <= slack else -off, -off)
        if best is None or key > best:
            best, cut = key, j
    return cut


def split_by_session(
    sessions: Sequence[Session],
    samples: dict[str, list[Sample]],
    val_fraction: float,
    samples_of: Callable[[Session], list[Sample]],
    targets: set[str],
) -> Split:
    """Chronological split holding about `val_fraction` of the samples in validation, newest last.

    The most recent sessions go to validation whole while they fit; the session that would overshoot the share
    by more than max(3 samples, 20 %) is cut in two at a silence between bursts (see `_cut_point`): its later
    part, as a session of its own (id `<session>.2`), goes to validation and its earlier part stays in
    training. Context never crosses a cut: the validation part's samples see only messages after the cut, the
    training part's only messages before it (history only ever looks back), so no message is context on one
    side and a target on the other. Only sessions with samples are split. Returns sessions in time order.
    """
    used = [s for s in sessions if samples.get(s.session_id)]
    total = sum(len(samples[s.session_id]) for s in used)
    want = val_fraction * total
    slack = max(3.0, 0.2 * want)
    parts = dict(samples)
    val: list[Session] = []
    train = list(used)
    n_val = 0
    cut_info = None
    for s in reversed(used):
        if n_val >= want:
            break
        n_s = len(samples[s.session_id])
        need = want - n_val
        if n_s - need <= slack:
            val.append(s)
            train.remove(s)
            n_val += n_s
            continue
        bursts = bursts_of(s.messages)
        j = _cut_point(bursts, targets, need, slack)
        if j is None:
            if not val:  # validation must not stay empty: the whole session, however big
                val.append(s)
                train.remove(s)
                n_val += n_s
            break
        n_head = sum(1 for b in bursts[1:j] if b[0].speaker_id in targets)
        cut_at = sum(len(b) for b in bursts[:j])
        head = Session(s.session_id, s.chat, s.messages[:cut_at])
        tail = Session(f"{s.session_id}.2", s.chat, s.messages[cut_at:])
        parts[head.session_id] = samples[s.session_id][:n_head]  # the same samples: history only looks back
        parts[tail.session_id] = samples_of(tail)
        train[train.index(s)] = head
        val.append(tail)
        n_val += len(parts[tail.session_id])
        cut_info = {"session": s.session_id, "at": tail.start.isoformat(),
                    "silence_min": round((tail.start - head.messages[-1].ts).total_seconds() / 60, 1),
                    "train_samples": n_head, "val_samples": len(parts[tail.session_id])}
        break
    val.reverse()
    val_ids = {s.session_id for s in val}
    assert not val_ids & {s.session_id for s in train}, "a session is in both splits"
    n_total = sum(len(parts[s.session_id]) for s in train + val)
    info = {"rule": "newest sessions to validation, the last one cut at its longest fitting silence",
            "val_share": round(n_val / n_total, 4) if n_total else 0.0, "cut": cut_info}
    return Split(train, val, parts, info)


# ---------------------------------------------------------------- writing


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file in the same folder, then rename over `path` (never half-written)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_samples(path: Path, samples: Iterable[Sample]) -> None:
    """Write samples as JSONL, atomically."""
    atomic_write_text(path, "".join(s.to_json() + "\n" for s in samples))


def read_samples(path: Path) -> list[dict[str, str]]:
    """Read a train.jsonl / val.jsonl written by build_dataset; a bad line is a DatasetError naming path:line."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: not found (build it with `convo dataset MESSAGES --persona NAME --out DIR`)")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DatasetError(f"{path}:{lineno}: not JSON ({e}); rebuild with `convo dataset`") from e
            missing = [k for k in SAMPLE_KEYS if not isinstance(row, dict) or not isinstance(row.get(k), str)]
            if missing:
                raise DatasetError(f"{path}:{lineno}: missing or non-string field(s) {', '.join(missing)}; "
                                   "rebuild with `convo dataset`")
            rows.append(row)
    return rows


def load_dataset_meta(directory: Path) -> dict[str, Any]:
    """meta.json of a dataset directory, checked for the prompt format version this code speaks."""
    path = Path(directory) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: not found; is {directory} a `convo dataset` output folder?") from e
    except ValueError as e:
        raise DatasetError(f"{path}: not valid JSON ({e}); rebuild with `convo dataset`") from e
    if not isinstance(meta, dict) or "format_version" not in meta:
        raise DatasetError(f"{path}: no format_version; rebuild with `convo dataset`")
    if meta["format_version"] != FORMAT_VERSION:
        raise DatasetError(
            f"{path}: prompt format version {meta['format_version']}, this convo speaks {FORMAT_VERSION}; "
            "rebuild the dataset with `convo dataset`"
        )
    return meta


# ---------------------------------------------------------------- the whole build


def load_tokenizer(name_or_dir: str) -> Any:
    """AutoTokenizer from a local directory (offline) or a model name already in the Hugging Face cache/hub."""
    from transformers import AutoTokenizer

    path = Path(name_or_dir).expanduser()
    hub_like = not name_or_dir.startswith((".", "/", "~")) and name_or_dir.count("/") <= 1  # "gpt2", "org/model"
    if not path.is_dir() and (path.exists() or not hub_like):
        raise DatasetError(f"--tokenizer {name_or_dir}: no such directory; pass a local tokenizer directory "
                           "(one with tokenizer.json / tokenizer_config.json)")
    try:
        if path.is_dir():
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        try:
            return AutoTokenizer.from_pretrained(name_or_dir, local_files_only=True)
        except (OSError, ValueError):
            return AutoTokenizer.from_pretrained(name_or_dir)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatasetError(
            f"--tokenizer {name_or_dir}: cannot load a tokenizer ({first}); pass a local tokenizer directory "
            "(one with tokenizer.json / tokenizer_config.json) to work offline"
        ) from e


def _no_samples_reason(
    sessions: Sequence[Session], targets: dict[str, Speaker], session_gap_min: float, persona: Speaker
) -> str:
    target_ids = set(targets)
    names = " or ".join(sp.name for sp in targets.values())
    n_target_msgs = sum(1 for s in sessions for m in s.messages if m.speaker_id in target_ids)
    if n_target_msgs == 0:
        return f"{names} sent no messages in the chats with {persona.name}; check --persona, --me, --mode and --chats"
    single = sum(1 for s in sessions if len(bursts_of(s.messages)) < 2)
    if single == len(sessions):
        return (
            f"all {len(sessions)} sessions are too short (a single speaker each) with --gap {session_gap_min:g} min: "
            "the gap is too small to keep a reply with what it answers; try a larger --gap"
        )
    return (
        f"{names} never replies within a session: each of their bursts opens a session "
        f"({len(sessions)} sessions, --gap {session_gap_min:g} min); try a larger --gap or another --mode"
    )


def build_dataset(
    messages_path: Path,
    persona: str,
    out_dir: Path,
    *,
    me: str | None = None,
    session_gap_min: float = 60.0,
    context_messages: int = 16,
    max_tokens: int | None = None,
    tokenizer: Any = None,
    mode: Mode = "both",
    chats: Sequence[str] | None = None,
    val_fraction: float = 0.1,
    role_tags: bool = False,
    since: datetime | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> DatasetSummary:
    """Build train.jsonl, val.jsonl and meta.json in `out_dir` for `persona` (see the module docstring).

    `tokenizer` is a model name / local directory or an already loaded tokenizer; with `max_tokens` it is used to
    drop the oldest history messages until each sample fits. `since` keeps only the sessions that ended after it
(see `adapter_data_last_ts`), whole, for retraining on what is new. `progress(stage, done, total)` reports "read"
    (bytes of the log) and then "sessions".
    """
    messages_path = Path(messages_path)
    out_dir = Path(out_dir)
    if mode not in MODES:
        raise DatasetError(f"--mode {mode!r}: use one of {', '.join(MODES)}")
    if not session_gap_min > 0:
        raise DatasetError(f"--gap {session_gap_min}: the session gap must be a positive number of minutes")
    if context_messages < 1:
        raise DatasetError(f"--context {context_messages}: need at least 1 message of history")
    if not 0 <= val_fraction < 1:
        raise DatasetError(f"--val {val_fraction}: the validation fraction must be in [0, 1), e.g. 0.1")
    if max_tokens is not None and max_tokens < 1:
        raise DatasetError(f"--max-tokens {max_tokens}: must be a positive number of tokens")
    if max_tokens is not None and tokenizer is None:
        raise DatasetError(f"--max-tokens {max_tokens} needs --tokenizer MODEL_OR_DIR to count tokens")

    all_messages = read_messages(messages_path, (lambda d, t: progress("read", d, t)) if progress else None)
    if not all_messages:
        raise DatasetError(f"{messages_path}: the message log is empty; re-run convo ingest on a non-empty export")
    messages = select_chats(all_messages, chats, messages_path)
    try:
        persona_id = resolve_speaker(persona, messages, "--persona", messages_path)
    except DatasetError:
        elsewhere = _resolves(persona, all_messages, messages_path) if chats else None
        if elsewhere is None:
            raise
        theirs = ", ".join(repr(c) for c in dict.fromkeys(m.chat for m in all_messages if m.speaker_id == elsewhere))
        raise DatasetError(f"--persona {persona!r} writes in none of the chats given by --chats; their chats: "
                           f"{theirs}") from None

    me_ids = resolve_me(all_messages, me, messages_path)
    me_from = "--me" if me else str(sidecar_path(messages_path))
    if mode in ("self", "both") and not me_ids:
        raise DatasetError(
            f"--mode {mode} needs to know which speaker is you: pass --me NAME (no usable 'me' in {me_from}) "
            "or use --mode friend"
        )
    if persona_id in me_ids:
        raise DatasetError(f"--persona {persona!r} is you (the exporting user, from {me_from}); pick a friend, "
                           "or pass --me")
    me_id = None
    if me_ids:  # all of my ids speak as one person: my most frequent id
        counts = Counter(m.speaker_id for m in all_messages if m.speaker_id in me_ids)
        me_id = max(me_ids, key=lambda sid: (counts[sid], sid))
        if len(me_ids) > 1:
            alias = set(me_ids) - {me_id}
            all_messages = [m.model_copy(update={"speaker_id": me_id}) if m.speaker_id in alias else m
                            for m in all_messages]
            messages = [m.model_copy(update={"speaker_id": me_id}) if m.speaker_id in alias else m for m in messages]

    # Only the chats the persona speaks in: their adapter learns them and me talking to them.
    persona_chats = list(dict.fromkeys(m.chat for m in messages if m.speaker_id == persona_id))
    chat_set = set(persona_chats)
    messages = [m for m in messages if m.chat in chat_set]
    found = speakers_of(messages)
    if me_id is not None and me_id not in found:  # I never write in the persona's chats: still tag me for meta
        found[me_id] = speakers_of(all_messages)[me_id]
    speakers = assign_tags(found, persona_id, me_id, role_tags=role_tags)
    persona_sp = speakers[persona_id]
    me_sp = speakers[me_id] if me_id is not None else None
    target_ids = {"friend": {persona_id}, "self": {me_id}, "both": {persona_id, me_id}}[mode]
    targets = {sid: speakers[sid] for sid in target_ids}

    tokenizer_name = None
    fit = None
    if tokenizer is not None:
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer_name = str(tokenizer)
            tokenizer = load_tokenizer(tokenizer_name)
        else:
            tokenizer_name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        if max_tokens is not None:
            fit = token_fitter(tokenizer, max_tokens)

    sessions = sessionize(messages, session_gap_min)
    older = 0
    if since is not None:  # tags and chats above still come from the whole log, so they match the adapter's
        kept = [s for s in sessions if s.messages[-1].ts > since]
        older = len(sessions) - len(kept)
        if not kept:
            raise DatasetError(f"nothing new for {persona_sp.name} since {since.isoformat()} (--since): all "
                               f"{older} sessions ended by then; ingest newer exports first (convo ingest --append)")
        sessions = kept
    by_session: dict[str, list[Sample]] = {}
    for i, session in enumerate(sessions):
        by_session[session.session_id] = session_samples(session, speakers, target_ids, context_messages, fit)
        if progress is not None:
            progress("sessions", i + 1, len(sessions))
    n_samples = sum(len(v) for v in by_session.values())
    if n_samples == 0:
        reason = _no_samples_reason(sessions, targets, session_gap_min, persona_sp)
        raise DatasetError(f"no samples from {messages_path} for {persona_sp.name} (--mode {mode}): {reason}")

    split = split_by_session(
        sessions, by_session, val_fraction,
        lambda sess: session_samples(sess, speakers, target_ids, context_messages, fit), target_ids,
    )
    train_sessions, val_sessions, by_session = split.train, split.val, split.samples
    if not val_sessions:
        raise DatasetError(
            f"the validation split is empty (--val {val_fraction:g}): use --val 0.1 or more (and more data if "
            "that leaves training empty); validation drives early stopping and evaluation"
        )
    if not train_sessions:
        raise DatasetError(
            f"the training split is empty: all {len(val_sessions)} session(s) with samples went to validation "
            f"(--val {val_fraction:g}); add more data, use a smaller --val, or a smaller --gap to get more sessions"
        )
    train = [s for sess in train_sessions for s in by_session[sess.session_id]]
    val = [s for sess in val_sessions for s in by_session[sess.session_id]]
    assert not {s.session for s in train} & {s.session for s in val}, "session leaked across the split"

    over = 0
    if fit is not None:
        over = sum(1 for s in train + val if len(tokenizer(s.prompt + s.completion)["input_ids"]) > max_tokens)

    counts = {
        "train": len(train),
        "val": len(val),
        "sessions_train": len(train_sessions),
        "sessions_val": len(val_sessions),
        "sessions_total": len(sessions),
        "sessions_without_samples": len(sessions) - len(train_sessions) - len(val_sessions) + bool(split.info["cut"]),
        "messages": len(messages),
        "by_target": dict(Counter(s.target for s in train + val).most_common()),
        "over_max_tokens": over,
    }
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "persona": persona_sp.as_meta(),
        "me": {**me_sp.as_meta(), "ids": me_ids} if me_sp else None,  # None: unknown (possible in friend mode)
        "tags": {sid: sp.tag for sid, sp in speakers.items()} | {sid: me_sp.tag for sid in me_ids if me_sp},
        "names": {sid: sp.name for sid, sp in speakers.items()},
        "targets": sorted(sp.tag for sp in targets.values()),
        "mode": mode,
        "role_tags": role_tags,
        "session_gap_min": session_gap_min,
        "context_messages": context_messages,
        "max_tokens": max_tokens,
        "tokenizer": tokenizer_name,
        "val_fraction": val_fraction,
        "split": split.info,
        "counts": counts,
        "source": str(messages_path.resolve()),
        "source_sha256": file_sha256(messages_path),
        "chats": persona_chats,
        "val_from": val_sessions[0].start.isoformat(),
        # The newest message of the training split: `convo dataset --since ADAPTER` starts after it.
        "data_last_ts": max(s.messages[-1].ts for s in train_sessions).isoformat(),
        "since": {"after": since.isoformat(), "sessions_before": older} if since is not None else None,
    }

    out_dir.mkdir(parents=True, exist_ok=True)
    # An interrupted rebuild must not leave new samples beside the old meta: meta.json goes first and comes last.
    (out_dir / META_FILE).unlink(missing_ok=True)
    summary = DatasetSummary(out_dir, out_dir / TRAIN_FILE, out_dir / VAL_FILE, out_dir / META_FILE, meta)
    write_samples(summary.train_path, train)
    write_samples(summary.val_path, val)
    atomic_write_text(summary.meta_path, json.dumps(meta, ensure_ascii=False, indent=2) + "\n")  # last: marks done
    return summary

