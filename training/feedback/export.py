"""Feedback events -> training rows in the dataset's exact prompt/completion format (inference/prompt_format.py).

* `sft.jsonl`: what the owner sent: the draft as drafted (`sent`) or their own text (`edited`); one row per draft
  (its last sent/edited event), with the dataset's keys (prompt, completion, session, chat, target).
* `kto.jsonl`: `prompt`, `completion`, `label`: a sent or liked draft is desirable, a disliked one undesirable
  (the last reaction to a draft wins).
* `pairs.jsonl`: `prompt`, `chosen` (the owner's edit), `rejected` (the draft), from `edited` events.

The prompt is the event's `context` rendered with prompt tags, ending in the target's `[TAG]`; the completion ends
with the tag of whoever the draft answered (the usual next speaker), exactly like a dataset completion. Context
speakers are tags already or names/ids the adapter knows (its convo_adapter.json); unknown names get make_tag().
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from errors import ConvoError
from inference.prompt_format import PromptFormatError, Turn, make_tag, render_completion, render_prompt
from inference.protocol import FeedbackEvent

SFT_FILE, KTO_FILE, PAIRS_FILE = "sft.jsonl", "kto.jsonl", "pairs.jsonl"
_TAG = re.compile(r"[A-Z0-9_]+\Z")


class ExportError(ConvoError):
    """Feedback that cannot be exported (unknown persona, nothing to write, unwritable --out)."""


@dataclass(frozen=True)
class SpeakerMap:
    """Display names and speaker ids -> prompt tags, and the persona's and owner's tags."""

    persona_tag: str | None
    me_tag: str | None
    names: dict[str, str] = field(default_factory=dict)  # lower-cased name or id -> tag

    @classmethod
    def from_meta(cls, meta) -> SpeakerMap:
        """From an AdapterMeta (persona, me, tags)."""
        names: dict[str, str] = {}
        for sp in (meta.persona, meta.me):
            if sp is not None:
                names[sp.name.lower()] = sp.tag
                if sp.speaker_id:
                    names[sp.speaker_id.lower()] = sp.tag
        names.update({str(k).lower(): v for k, v in (meta.tags or {}).items()})
        return cls(meta.persona.tag, meta.me.tag if meta.me else None, names)

    def tag(self, speaker: str) -> str:
        """The prompt tag of a context speaker."""
        if _TAG.match(speaker):
            return speaker
        return self.names.get(speaker.lower()) or make_tag(speaker)

    def target(self, event: FeedbackEvent) -> str | None:
        """Whose turn the draft was: the event's target tag, else the persona (friend mode) or the owner (self)."""
        if event.target:
            return self.tag(event.target)
        return self.persona_tag if event.mode == "friend" else self.me_tag


@dataclass
class Exported:
    """Rows built from a set of events, and how many events could not be used (with why)."""

    sft: list[dict] = field(default_factory=list)
    kto: list[dict] = field(default_factory=list)
    pairs: list[dict] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        """Count an unusable event."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    @property
    def counts(self) -> dict[str, int]:
        """Rows per file."""
        return {"sft": len(self.sft), "kto": len(self.kto), "pairs": len(self.pairs),
                "kto_desirable": sum(1 for r in self.kto if r["label"]),
                "kto_undesirable": sum(1 for r in self.kto if not r["label"])}


def prompt_for(event: FeedbackEvent, speakers: SpeakerMap, target: str) -> tuple[str, str | None]:
    """(prompt ending in `[TARGET]`, tag of whoever the draft answered or None)."""
    turns = [Turn(speakers.tag(m.speaker), m.text) for m in event.context]
    following = next((t.speaker for t in reversed(turns) if t.speaker != target), None)
    return render_prompt(turns, target), following


def split_heldout(draft_id: str, fraction: float) -> bool:
    """True when a draft belongs to the held-out share (stable: a hash of its id, not a random draw)."""
    if fraction <= 0:
        return False
    h = int(hashlib.sha256(draft_id.encode()).hexdigest()[:8], 16) / 0x1_0000_0000
    return h < fraction


def build_rows(events: Iterable[FeedbackEvent], speakers: SpeakerMap) -> Exported:
    """SFT, KTO and pair rows from events (oldest first); later events about a draft override earlier ones."""
    out = Exported()
    sft: dict[str, dict] = {}
    kto: dict[tuple[str, str], dict] = {}
    pairs: dict[str, dict] = {}
    for ev in events:
        if ev.kind not in ("sent", "edited", "liked", "disliked"):
            continue
        target = speakers.target(ev)
        if target is None:
            out.skip(f"{ev.kind}: no target tag (mode {ev.mode} and the adapter does not know that speaker)")
            continue
        try:
            prompt, following = prompt_for(ev, speakers, target)
            draft = render_completion(target, ev.candidate, following) if ev.candidate else None
            own = render_completion(target, [ev.final_text], following) if ev.final_text else None
        except PromptFormatError as e:
            out.skip(f"{ev.kind}: {e}")
            continue
        base = {"session": f"feedback:{ev.draft_id}", "chat": f"{ev.platform}:feedback", "target": target}
        if ev.kind == "sent":
            sent = draft or own
            if sent is None:
                out.skip("sent: neither candidate nor final_text")
                continue
            sft[ev.draft_id] = {"prompt": prompt, "completion": sent, **base}
            kto[(ev.draft_id, sent)] = {"prompt": prompt, "completion": sent, "label": True}
        elif ev.kind == "edited":
            sft[ev.draft_id] = {"prompt": prompt, "completion": own, **base}
            if draft is not None and draft != own:
                pairs[ev.draft_id] = {"prompt": prompt, "chosen": own, "rejected": draft}
        else:
            if draft is None:
                out.skip(f"{ev.kind}: no candidate")
                continue
            kto[(ev.draft_id, draft)] = {"prompt": prompt, "completion": draft, "label": ev.kind == "liked"}
    out.sft, out.kto, out.pairs = list(sft.values()), list(kto.values()), list(pairs.values())
    return out


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_export(exported: Exported, out_dir: Path | str) -> dict[str, Path]:
    """Write sft.jsonl, kto.jsonl and pairs.jsonl into `out_dir` (each atomically); returns their paths."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"--out {out}: cannot create it ({e.strerror})") from e
    paths = {"sft": out / SFT_FILE, "kto": out / KTO_FILE, "pairs": out / PAIRS_FILE}
    _write_jsonl(paths["sft"], exported.sft)
    _write_jsonl(paths["kto"], exported.kto)
    _write_jsonl(paths["pairs"], exported.pairs)
    return paths


def rows_sha256(rows: Sequence[dict]) -> str:
    """A hash of rows as written (recorded in a version's meta)."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, ensure_ascii=False, sort_keys=True).encode() + b"\n")
    return h.hexdigest()
