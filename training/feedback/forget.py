"""`convo forget --persona NAME`: remove everything the learning loop keeps about a persona.

Database rows (events, retrain runs), Redis drafts (and their ids in the per-chat draft sets), the persona's entries
on the feedback stream and its dead letters, and the adapters/NAME dir with every version. A reload is published so
running workers drop the adapter.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import redis

from inference.protocol import Keys, entry_data
from training.feedback.store import FeedbackStore

logger = logging.getLogger("convo.forget")


def _persona_of(raw: str) -> str | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value.get("persona") if isinstance(value, dict) else None


def _forget_stream(client: redis.Redis, stream: str, persona: str) -> int:
    """XDEL every entry of `stream` whose JSON payload names `persona`."""
    removed, start = 0, "-"
    while True:
        batch = client.xrange(stream, min=start, max="+", count=500)
        if not batch:
            return removed
        ids = []
        for entry_id, fields in batch:
            try:
                raw = entry_data(fields)
            except Exception:  # noqa: BLE001 - an entry without data names nobody
                continue
            if _persona_of(raw) == persona:
                ids.append(entry_id)
        if ids:
            removed += client.xdel(stream, *ids)
        last = batch[-1][0].decode() if isinstance(batch[-1][0], bytes) else batch[-1][0]
        start = "(" + last


def forget_persona(persona: str, store: FeedbackStore, client: redis.Redis | None, keys: Keys,
                   persona_dir: Path | None) -> dict[str, int]:
    """Delete the persona's rows, drafts, stream entries and adapters; returns what was removed."""
    draft_ids = store.draft_ids(persona)
    removed = store.delete_persona(persona)
    removed.update({"drafts": 0, "stream_entries": 0, "dead_letters": 0, "adapter_versions": 0})
    if client is not None:
        draft_keys = {keys.draft(d) for d in draft_ids}
        for key in client.scan_iter(match=keys.draft("*"), count=500):  # drafts no event mentions yet
            try:
                if _persona_of(client.get(key) or b"{}") == persona:
                    draft_keys.add(key.decode() if isinstance(key, bytes) else key)
            except redis.ResponseError:  # not a string value: some other bot-side structure, not ours
                continue
        if draft_keys:
            removed["drafts"] = int(client.delete(*draft_keys))
        ids = {k.removeprefix(keys.draft("")) for k in draft_keys}
        for key in client.scan_iter(match=f"{keys.prefix}:drafts:*", count=500):
            if ids:
                client.srem(key, *ids)
        removed["stream_entries"] = _forget_stream(client, keys.feedback, persona)
        removed["dead_letters"] = _forget_stream(client, keys.feedback_dead, persona)
    if persona_dir is not None and persona_dir.is_dir():
        removed["adapter_versions"] = sum(1 for p in persona_dir.iterdir() if p.is_dir() and not p.is_symlink())
        shutil.rmtree(persona_dir)
    logger.info("forgot persona %s: %s", persona, removed)
    return removed
