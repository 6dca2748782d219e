"""Training-side helpers on the versioned adapter layout of inference/versions.py: list, promote, rollback, reload.

A version's convo_adapter.json carries, besides what `convo train` writes, `parent` (the version it continued
from) and `loop` (the retrain's gate metrics, decision, reason and the hashes of its feedback data). Promote and
rollback only switch the `current` link (atomically) and publish a ReloadMessage so running workers switch.
Import-light: no torch.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from errors import ConfigError
from inference.adapter_meta import ADAPTER_META_FILE, read_adapter_meta
from inference.protocol import Keys, ReloadMessage
from inference.versions import current_version, list_versions, set_current, version_number

logger = logging.getLogger("convo.versions")
_PERSONA = re.compile(r"[A-Za-z0-9_.\-]{1,64}\Z")


@dataclass(frozen=True)
class VersionInfo:
    """One version of a persona's adapter, as `convo adapters list` shows it."""

    version: str
    current: bool
    parent: str | None
    created_at: str | None
    status: str | None  # from the retrain that made it: promoted | rejected (None for `convo train` versions)
    metrics: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None


def persona_dir(adapters_dir: Path | str, persona: str, must_exist: bool = True) -> Path:
    """adapters/NAME, checked: a persona name is a plain dir name; ConfigError when missing."""
    if not _PERSONA.match(persona) or persona in (".", ".."):
        raise ConfigError(f"persona {persona!r}: use letters, digits, '_', '.', '-' only")
    d = Path(adapters_dir) / persona
    if must_exist and not d.is_dir():
        raise ConfigError(f"{d}: no adapters for {persona} (train one with `convo train --out {d}/v1`, then "
                          f"`convo adapters promote {persona} v1`)")
    return d


def version_infos(pdir: Path) -> list[VersionInfo]:
    """Every version under a persona dir, oldest first."""
    cur = current_version(pdir)
    out = []
    for v in list_versions(pdir):
        if not (pdir / v / ADAPTER_META_FILE).is_file():
            continue
        meta = read_adapter_meta(pdir / v)
        extra = meta.model_extra or {}
        loop = extra.get("loop") or {}
        metrics = dict(loop.get("candidate") or {})
        if not metrics and meta.final_metrics.get("final_eval_loss") is not None:
            metrics = {"val_nll": meta.final_metrics["final_eval_loss"]}
        out.append(VersionInfo(v, v == cur, extra.get("parent"), meta.created_at.isoformat(timespec="seconds"),
                               loop.get("status"), metrics, loop.get("reason")))
    return out


def check_version(pdir: Path, version: str) -> str:
    """`version` if it names an adapter version of this persona (accepts "3" for "v3"); ConfigError otherwise."""
    if version.isdigit():
        version = f"v{version}"
    if version_number(version) is None or not (pdir / version / ADAPTER_META_FILE).is_file():
        have = ", ".join(list_versions(pdir)) or "none"
        raise ConfigError(f"{pdir.name}: no version {version!r} (versions: {have})")
    return version


def promote(pdir: Path, version: str) -> tuple[str | None, str]:
    """Point `current` at `version`; returns (previous, new)."""
    version = check_version(pdir, version)
    previous = current_version(pdir)
    set_current(pdir, version)
    logger.info("adapter %s current %s -> %s", pdir.name, previous, version)
    return previous, version


def rollback_target(pdir: Path, version: str | None = None) -> str:
    """The version a rollback goes to: `version` if given, else the current version's parent, else the newest older one."""
    if version is not None:
        return check_version(pdir, version)
    cur = current_version(pdir)
    if cur is None:
        raise ConfigError(f"{pdir.name}: no `current` version to roll back from; use `convo adapters promote`")
    parent = (read_adapter_meta(pdir / cur).model_extra or {}).get("parent")
    if parent and (pdir / parent / ADAPTER_META_FILE).is_file():
        return parent
    older = [v for v in list_versions(pdir) if version_number(v) < version_number(cur)
             and (pdir / v / ADAPTER_META_FILE).is_file()]
    if not older:
        raise ConfigError(f"{pdir.name}: {cur} is the oldest version; nothing to roll back to")
    return older[-1]


def publish_reload(redis_settings, persona: str, version: str | None) -> int | None:
    """Publish a ReloadMessage; returns how many subscribers got it, or None when Redis does not answer."""
    import redis

    from inference.client import connect

    client = connect(redis_settings, sync=True)
    try:
        return int(client.publish(Keys(redis_settings.prefix).reload, ReloadMessage(persona=persona,
                                                                                    version=version).dumps()))
    except (redis.ConnectionError, redis.TimeoutError) as e:
        logger.warning("reload for %s not published (Redis: %s); workers pick it up on restart", persona,
                       type(e).__name__)
        return None
    finally:
        client.close()
