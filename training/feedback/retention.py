"""`convo prune`: time-based retention for what the learning loop keeps. `0` days keeps a kind forever.

* Feedback events (`feedback.retention_days`, default 365): rows of the events table received more than that many
  days ago. Age is `received_at`, the store's own clock: an event's `ts` comes from a bot and may say anything.
  Retrain runs (no chat text) stay. Adapters already trained on a pruned event keep what they learned from it.
* Dead letters (`feedback.dead_letter_retention_days`, 30): entries of `{prefix}:dead` (requests) and
  `{prefix}:feedback:dead` older than that. A stream entry id starts with its time in ms, so this is one
  `XTRIM MINID` per stream.
* Rejected adapter versions (`feedback.rejected_retention_days`, 30): versions a retrain refused (`loop.status`
  "rejected" in convo_adapter.json), created longer ago, that are not `current` and no remaining version's
  parent. The weights, samples and logs go; the dir stays with only a `PRUNED.json` marker, so the version
  number is never handed out again and the retrain-runs table still names a version that existed.

Dry run by default (`convo prune` shows what would go; `--apply` deletes); the scheduler always applies.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis

from inference.adapter_meta import ADAPTER_META_FILE, read_adapter_meta
from inference.protocol import Keys
from inference.versions import current_version, list_versions
from training.feedback.store import FeedbackStore

logger = logging.getLogger("convo.prune")
PRUNED_FILE = "PRUNED.json"


@dataclass
class PruneReport:
    """What one prune removed (or, in a dry run, would remove)."""

    applied: bool
    cutoffs: dict[str, str | None]  # kind -> ISO time before which it goes (None: kept forever)
    feedback_events: int = 0
    dead_letters: dict[str, int] | None = field(default_factory=dict)  # stream -> entries; None: Redis down
    adapter_versions: list[str] = field(default_factory=list)  # "persona/vN"
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        """The report as plain JSON types."""
        return asdict(self)


def _cutoff(now: datetime, days: float) -> datetime | None:
    return now - timedelta(days=days) if days > 0 else None


def prune(settings, store: FeedbackStore, *, apply: bool = False, now: datetime | None = None,
          client: redis.Redis | None = None) -> PruneReport:
    """Apply (or, by default, count) the retention settings; opens its own Redis client unless given one."""
    fs = settings.feedback
    now = now or datetime.now(UTC)
    cut = {"feedback_events": _cutoff(now, fs.retention_days),
           "dead_letters": _cutoff(now, fs.dead_letter_retention_days),
           "adapter_versions": _cutoff(now, fs.rejected_retention_days)}
    report = PruneReport(apply, {k: v.isoformat() if v else None for k, v in cut.items()})
    if cut["feedback_events"] is not None:
        report.feedback_events = store.prune_events(cut["feedback_events"], dry_run=not apply)
    if cut["dead_letters"] is not None:
        report.dead_letters = _prune_dead_letters(settings, cut["dead_letters"], apply, client, report.notes)
    if cut["adapter_versions"] is not None and fs.adapters_dir:
        report.adapter_versions = _prune_rejected(Path(fs.adapters_dir), cut["adapter_versions"], apply, now,
                                                  report.notes)
    logger.info("prune%s: %d feedback events, dead letters %s, %d rejected versions", "" if apply else " (dry run)",
                report.feedback_events, report.dead_letters, len(report.adapter_versions))
    return report


def _prune_dead_letters(settings, before: datetime, apply: bool, client, notes: list[str]) -> dict[str, int] | None:
    """XTRIM MINID both dead-letter streams (or count what it would remove); None when Redis does not answer."""
    from inference.client import connect

    keys = Keys(settings.redis.prefix)
    min_id = f"{int(before.timestamp() * 1000)}-0"
    own = client is None
    client = client or connect(settings.redis, sync=True)
    try:
        out = {}
        for stream in (keys.dead, keys.feedback_dead):
            if apply:
                out[stream] = int(client.xtrim(stream, minid=min_id, approximate=False))
            else:
                out[stream] = _count_before(client, stream, min_id)
        return out
    except (redis.ConnectionError, redis.TimeoutError) as e:
        notes.append(f"Redis at {settings.redis.url} did not answer ({type(e).__name__}): dead letters not pruned")
        return None
    finally:
        if own:
            client.close()


def _count_before(client: redis.Redis, stream: str, min_id: str) -> int:
    """Entries of `stream` with an id below `min_id`, read in pages of ids."""
    n, start = 0, "-"
    while True:
        batch = client.xrange(stream, min=start, max=f"({min_id}", count=1000)
        n += len(batch)
        if len(batch) < 1000:
            return n
        last = batch[-1][0]
        start = "(" + (last.decode() if isinstance(last, bytes) else last)


def _prune_rejected(adapters_dir: Path, before: datetime, apply: bool, now: datetime, notes: list[str]) -> list[str]:
    """Rejected versions created before `before`, not current and nobody's parent; emptied to a PRUNED marker."""
    from training.retrain import RetrainBusy, retrain_lock

    if not adapters_dir.is_dir():
        return []
    pruned = []
    try:
        with retrain_lock(adapters_dir):  # a retrain numbering its new version must not see a version vanish
            for pdir in sorted(adapters_dir.iterdir()):
                if not pdir.is_dir() or pdir.name.startswith("."):
                    continue
                for v in _rejected_versions(pdir, before):
                    if apply:
                        _empty_version(pdir / v, now)
                    pruned.append(f"{pdir.name}/{v}")
    except RetrainBusy as e:
        notes.append(f"{e}: rejected adapter versions not pruned")
    return pruned


def _rejected_versions(pdir: Path, before: datetime) -> list[str]:
    """The versions of one persona dir that retention removes."""
    metas = {v: read_adapter_meta(pdir / v) for v in list_versions(pdir) if (pdir / v / ADAPTER_META_FILE).is_file()}
    parents = {(m.model_extra or {}).get("parent") for m in metas.values()}
    current = current_version(pdir)
    out = []
    for v, meta in metas.items():
        created = meta.created_at if meta.created_at.tzinfo else meta.created_at.replace(tzinfo=UTC)
        status = ((meta.model_extra or {}).get("loop") or {}).get("status")
        if status == "rejected" and created < before and v != current and v not in parents:
            out.append(v)
    return out


def _empty_version(vdir: Path, now: datetime) -> None:
    """Replace a version dir by one holding only PRUNED.json: out of the way first (rename), then deleted."""
    doomed = vdir.with_name(f".{vdir.name}.pruning-{os.getpid()}")
    os.replace(vdir, doomed)  # from here on the version is gone for promote, rollback and workers
    vdir.mkdir()
    (vdir / PRUNED_FILE).write_text(json.dumps({"version": vdir.name, "status": "rejected",
                                                "pruned_at": now.isoformat()}) + "\n", encoding="utf-8")
    shutil.rmtree(doomed)
    logger.info("pruned rejected adapter version %s/%s", vdir.parent.name, vdir.name)
