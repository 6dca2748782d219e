"""`convo dataset --since ADAPTER`: only the sessions that ended after the adapter's newest training message."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from convo.cli import run
from errors import DatasetError
from inference.adapter_meta import AdapterMeta, BaseModelRef, Speaker, read_adapter_meta, write_adapter_meta
from inference.prompt_format import FORMAT_VERSION
from tests.conftest import torch_threads
from training.dataset import adapter_data_last_ts, build_dataset
from training.ingest.pipeline import ingest

DAY0 = datetime(2023, 3, 1, 18, 0, tzinfo=UTC)


def _export(path: Path, days: range) -> Path:
    """A JSONL export: one evening conversation (a session) per day in `days`."""
    lines = []
    for day in days:
        t = DAY0 + timedelta(days=day)
        for i, (who, text) in enumerate([("Alice", f"day {day}: you around?"), ("Riya", f"yes, day {day}"),
                                         ("Alice", "cool"), ("Riya", "see you")]):
            lines.append(json.dumps({"chat": "Alice", "ts": (t + timedelta(minutes=i)).isoformat(), "speaker": who,
                                     "text": text}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _adapter(folder: Path, last: str | None) -> Path:
    """An adapter folder whose convo_adapter.json records `last` as its newest training message."""
    meta = AdapterMeta(persona=Speaker(name="Alice", speaker_id="Alice", tag="ALICE"),
                       base_model=BaseModelRef(id="tiny"), format_version=FORMAT_VERSION, data_last_ts=last)
    write_adapter_meta(folder, meta)
    return folder


def test_since_keeps_sessions_ending_after_the_newest_training_message(tmp_path):
    log = tmp_path / "m.jsonl"
    ingest([_export(tmp_path / "march.jsonl", range(0, 10))], log, me="Riya")
    first = build_dataset(log, "Alice", tmp_path / "d1", mode="friend", val_fraction=0.2)
    last = first.meta["data_last_ts"]
    train_days = {json.loads(line)["session"] for line in first.train_path.read_text("utf-8").splitlines()}
    assert last == (DAY0 + timedelta(days=7, minutes=3)).isoformat() and len(train_days) == 8  # days 0-7 train
    adapter = _adapter(tmp_path / "adapter", last)

    ingest([_export(tmp_path / "june.jsonl", range(8, 14))], log, append=True)  # days 8, 9 again, 10-13 new
    since = adapter_data_last_ts(adapter)
    assert since == datetime.fromisoformat(last)
    second = build_dataset(log, "Alice", tmp_path / "d2", mode="friend", val_fraction=0.2, since=since)
    rows = [json.loads(line) for p in (second.train_path, second.val_path) for line in p.read_text("utf-8").splitlines()]
    texts = [r["prompt"] for r in rows]
    assert all(any(f"day {d}:" in t for d in range(8, 14)) for t in texts)  # days 8, 9 were validation only
    assert {r["session"] for r in rows} == {f"Alice#{d + 1}" for d in range(8, 14)}
    assert second.meta["since"] == {"after": last, "sessions_before": 8}
    assert second.meta["persona"] == first.meta["persona"] and second.meta["tags"] == first.meta["tags"]

    with pytest.raises(DatasetError, match=r"nothing new for Alice since .* all 14 sessions ended by then"):
        build_dataset(log, "Alice", tmp_path / "d3", mode="friend", since=DAY0 + timedelta(days=30))


def test_since_errors_and_cli(tmp_path, capsys):
    log = tmp_path / "m.jsonl"
    ingest([_export(tmp_path / "march.jsonl", range(0, 12))], log, me="Riya")
    old = _adapter(tmp_path / "old", None)
    with pytest.raises(DatasetError, match=r"--since .*old: the adapter does not record its newest training message"):
        adapter_data_last_ts(old)
    with pytest.raises(DatasetError, match=r"--since .*nope: no such adapter folder"):
        adapter_data_last_ts(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"--since .*empty: "):
        adapter_data_last_ts(tmp_path / "empty")

    adapter = _adapter(tmp_path / "alice" / "v1", (DAY0 + timedelta(days=5, minutes=3)).isoformat())
    (tmp_path / "alice" / "current").symlink_to("v1")  # a versioned persona folder works too
    assert run(["dataset", str(log), "--persona", "Alice", "--out", str(tmp_path / "d"), "--mode", "friend",
                "--since", str(tmp_path / "alice")]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "since sessions ending after 2023-03-06T18:03:00+00:00" in shown and "6 older sessions" in shown
    assert json.loads((tmp_path / "d" / "meta.json").read_text())["counts"]["sessions_total"] == 6
    assert adapter.is_dir()
    assert run(["dataset", str(log), "--persona", "Alice", "--out", str(tmp_path / "d"), "--since", str(old)]) == 2
    err = capsys.readouterr().err
    assert "does not record its newest training message" in err and "Traceback" not in err


@pytest.mark.slow
def test_training_records_the_newest_training_message(tmp_path, tiny_base):
    from config.settings import TrainSettings
    from training.train import TrainOptions, train

    log = tmp_path / "m.jsonl"
    ingest([_export(tmp_path / "march.jsonl", range(0, 10))], log, me="Riya")
    data = build_dataset(log, "Alice", tmp_path / "d", mode="both", val_fraction=0.2)
    with torch_threads(1):
        train(TrainOptions.from_settings(TrainSettings(), data_dir=tmp_path / "d", base=str(tiny_base), out_dir=tmp_path / "a", max_steps=1,
                           batch_size=4, grad_accum=1, eval_steps=1, sample_prompts=0, logging_steps=1))
    assert read_adapter_meta(tmp_path / "a").data_last_ts == datetime.fromisoformat(data.meta["data_last_ts"])
    assert adapter_data_last_ts(tmp_path / "a") == datetime.fromisoformat(data.meta["data_last_ts"])
