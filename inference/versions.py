"""Versioned adapter layout, shared by training (writes versions) and serving (reads `current`). Import-light.

    adapters/
      alice/              one persona; its name in requests is this directory's name
        v1/  v2/  ...     each a PEFT adapter dir with convo_adapter.json (parent, metrics, data hashes)
        current -> v2     a relative symlink, switched atomically (new link + os.replace)
      bob/                an unversioned adapter dir (convo_adapter.json directly inside) also serves as is

`resolve(persona_dir)` gives the dir to load and its version name (None for an unversioned dir).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from errors import ConfigError
from inference.adapter_meta import ADAPTER_META_FILE

CURRENT = "current"
_VERSION_RE = re.compile(r"v(\d+)\Z")


def version_number(name: str) -> int | None:
    """3 for "v3"; None for anything else."""
    m = _VERSION_RE.match(name)
    return int(m.group(1)) if m else None


def list_versions(persona_dir: Path | str) -> list[str]:
    """Version dir names ("v1", "v2", ...) under a persona dir, oldest first."""
    d = Path(persona_dir)
    if not d.is_dir():
        return []
    found = [p.name for p in d.iterdir() if p.is_dir() and not p.is_symlink() and version_number(p.name) is not None]
    return sorted(found, key=version_number)


def next_version(persona_dir: Path | str) -> str:
    """The name the next version gets ("v1" for a new persona)."""
    versions = list_versions(persona_dir)
    return f"v{(version_number(versions[-1]) + 1) if versions else 1}"


def current_version(persona_dir: Path | str) -> str | None:
    """The version `current` points to, or None without a `current` link."""
    link = Path(persona_dir) / CURRENT
    if not link.is_symlink():
        return None
    return Path(os.readlink(link)).name


def resolve(persona_dir: Path | str) -> tuple[Path, str | None]:
    """(adapter dir to load, version or None) for a persona dir; ConfigError when it holds no adapter."""
    d = Path(persona_dir)
    link = d / CURRENT
    if link.is_symlink():
        target = link.resolve()
        if not (target / ADAPTER_META_FILE).is_file():
            raise ConfigError(f"{link}: points to {target}, which holds no {ADAPTER_META_FILE}")
        return target, target.name
    if (d / ADAPTER_META_FILE).is_file():
        return d, None
    raise ConfigError(f"{d}: no adapter here (neither {ADAPTER_META_FILE} nor a `{CURRENT}` version link)")


def set_current(persona_dir: Path | str, version: str) -> None:
    """Point `current` at `version` atomically (a temp link renamed over the old one)."""
    d = Path(persona_dir)
    if not (d / version / ADAPTER_META_FILE).is_file():
        raise ConfigError(f"{d / version}: not an adapter version (no {ADAPTER_META_FILE})")
    tmp = d / f".{CURRENT}.{os.getpid()}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(version, tmp)
    os.replace(tmp, d / CURRENT)


def discover(adapters_dir: Path | str) -> dict[str, Path]:
    """persona name -> persona dir, for every subdir of `adapters_dir` that holds an adapter or versions."""
    root = Path(adapters_dir)
    if not root.is_dir():
        return {}
    found = {}
    for d in sorted(root.iterdir()):
        if d.is_dir() and not d.name.startswith(".") and (
            (d / CURRENT).is_symlink() or (d / ADAPTER_META_FILE).is_file()
        ):
            found[d.name] = d
    return found
