"""`convo_adapter.json`: what an adapter was trained on, written beside the PEFT weights.

An adapter only makes sense on the base model it was trained on and with the prompt format it learned. Loading
checks both (`check_compatible`) and refuses with a message that says what to do. Import-light (no torch).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from errors import AdapterMismatch
from inference.prompt_format import FORMAT_VERSION

ADAPTER_META_FILE = "convo_adapter.json"


class Speaker(BaseModel):
    """A person in the dataset: display name, speaker id in the log, and prompt tag."""

    model_config = ConfigDict(extra="allow")

    name: str
    speaker_id: str | None = None
    tag: str


class BaseModelRef(BaseModel):
    """The base an adapter belongs to: a hub id with its revision, or a local dir with a hash of its weights."""

    model_config = ConfigDict(extra="allow")

    id: str
    revision: str | None = None
    local_path_sha256: str | None = None


class AdapterMeta(BaseModel):
    """Everything recorded about one trained adapter."""

    model_config = ConfigDict(extra="allow")

    persona: Speaker
    me: Speaker | None = None
    tags: dict[str, str] = Field(default_factory=dict)  # speaker_id -> tag
    mode: str = "both"
    base_model: BaseModelRef
    format_version: int
    dataset_sha256: str | None = None
    data_last_ts: datetime | None = None  # newest message of the training split; `convo dataset --since` reads it
    training_args: dict[str, Any] = Field(default_factory=dict)
    final_metrics: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    convo_version: str = ""


def convo_version() -> str:
    """The installed version of this project ("" when running from a bare checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("conversation-continuation")
    except PackageNotFoundError:
        return ""


def read_adapter_meta(adapter_dir: Path | str) -> AdapterMeta:
    """Read `convo_adapter.json` from an adapter dir; AdapterMismatch if missing or unreadable."""
    path = Path(adapter_dir) / ADAPTER_META_FILE
    if not path.is_file():
        raise AdapterMismatch(
            f"{path}: not found; {adapter_dir} is not an adapter made by `convo train` (point --adapter at its --out dir)"
        )
    try:
        return AdapterMeta.model_validate_json(path.read_text(encoding="utf-8"))
    except (ValidationError, ValueError) as e:
        raise AdapterMismatch(f"{path}: unreadable adapter metadata ({str(e).splitlines()[0]}); retrain the adapter") from e


def write_adapter_meta(adapter_dir: Path | str, meta: AdapterMeta) -> Path:
    """Write `convo_adapter.json` atomically (temp file in the same dir, then rename)."""
    adapter_dir = Path(adapter_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    path = adapter_dir / ADAPTER_META_FILE
    fd, tmp = tempfile.mkstemp(prefix=f".{ADAPTER_META_FILE}.", dir=adapter_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(meta.model_dump_json(indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def local_model_sha256(model_dir: Path | str) -> str:
    """sha256 over the weight files of a local model dir (names and bytes, sorted); config changes do not count."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin"))
    for f in files:
        h.update(f.relative_to(model_dir).as_posix().encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def base_model_ref(base_id_or_path: str | Path, revision: str | None = None) -> BaseModelRef:
    """Describe a base model: a local dir gets its weights hash; a hub id its revision (default "main")."""
    p = Path(base_id_or_path)
    if p.is_dir():
        return BaseModelRef(id=str(p.resolve()), local_path_sha256=local_model_sha256(p))
    return BaseModelRef(id=str(base_id_or_path), revision=revision or "main")


def check_compatible(meta: AdapterMeta, base_id_or_path: str | Path | None = None) -> None:
    """Raise AdapterMismatch unless the adapter fits this prompt format and (if given) this base model."""
    if meta.format_version != FORMAT_VERSION:
        raise AdapterMismatch(
            f"adapter for {meta.persona.name} was trained with prompt format v{meta.format_version}, this convo uses "
            f"v{FORMAT_VERSION}: rebuild the dataset with `convo dataset` and retrain with `convo train`"
        )
    if base_id_or_path is None:
        return
    recorded = meta.base_model
    p = Path(base_id_or_path)
    if p.is_dir():
        if recorded.local_path_sha256 is None:
            raise AdapterMismatch(
                f"adapter for {meta.persona.name} was trained on {recorded.id}, not on the local model {p}: "
                f"use --base {recorded.id} (or leave --base out)"
            )
        if local_model_sha256(p) != recorded.local_path_sha256:
            raise AdapterMismatch(
                f"adapter for {meta.persona.name} was trained on a different base than {p} (weights hash differs "
                f"from the one recorded for {recorded.id}): use that base, or retrain the adapter on this one"
            )
        return
    if recorded.local_path_sha256 is not None or str(base_id_or_path) != recorded.id:
        raise AdapterMismatch(
            f"adapter for {meta.persona.name} was trained on {recorded.id}, not {base_id_or_path}: "
            f"use --base {recorded.id} (or leave --base out), or retrain on {base_id_or_path}"
        )
