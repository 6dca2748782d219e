"""`convo serve scheduler`: due when enough new labelled feedback, at most every interval, failures contained."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY

from config.settings import FeedbackSettings, Settings
from inference.protocol import FeedbackEvent
from inference.versions import current_version, set_current
from tests.test_adapters_cli import make_version
from training.feedback.store import FeedbackStore, RetrainRun
from training.retrain import RetrainOutcome
from training.scheduler import Scheduler

NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)


@pytest.fixture
def setup(tmp_path):
    root = tmp_path / "adapters"
    make_version(root / "alice", "v1")
    set_current(root / "alice", "v1")
    make_version(root / "bob", "v1")  # no `current`: never scheduled
    store = FeedbackStore(f"sqlite:///{tmp_path}/fb.db")
    store.create()
    settings = Settings(feedback=FeedbackSettings(adapters_dir=str(root), retrain_min_events=3,
                                                  retrain_interval_h=24))
    yield settings, store, root
    store.close()


def add(store, n, kind="sent", at=NOW):
    for _ in range(n):
        store.add(FeedbackEvent(kind=kind, draft_id="d", persona="alice", candidate=["x"]), received_at=at)


def test_due_counts_labelled_events_since_the_last_promoted_version(setup):
    settings, store, _ = setup
    s = Scheduler(settings, store, retrain_fn=None, clock=lambda: NOW)
    add(store, 5, kind="shown")  # not labels
    add(store, 2)
    assert s.due("alice") == (False, "2 new labelled events < 3")
    add(store, 1, kind="disliked")
    assert s.due("alice")[0]
    store.record_run(RetrainRun("alice", "promoted", "ok", NOW - timedelta(days=2), NOW - timedelta(days=2),
                                "v1", "v2", data_until=NOW))
    assert s.due("alice") == (False, "0 new labelled events < 3")
    add(store, 3, at=NOW + timedelta(minutes=1))
    assert s.due("alice")[0]
    store.record_run(RetrainRun("alice", "rejected", "worse", NOW - timedelta(hours=1), NOW, "v2", "v3", NOW))
    due, why = s.due("alice")
    assert not due and "within 24 h" in why


def test_runs_one_retrain_per_due_persona_and_contains_failures(setup, caplog):
    settings, store, root = setup
    add(store, 4)
    calls = []

    def failing(settings_, persona, store_):
        calls.append(persona)
        raise RuntimeError("CUDA out of memory")

    before = REGISTRY.get_sample_value("convo_retrain_failures_total", {"persona": "alice"}) or 0.0
    s = Scheduler(settings, store, retrain_fn=failing, clock=lambda: NOW)
    assert s.run_once() == {"alice": "failed: RuntimeError"}
    assert calls == ["alice"] and current_version(root / "alice") == "v1"
    assert REGISTRY.get_sample_value("convo_retrain_failures_total", {"persona": "alice"}) == before + 1
    assert "retrain alice failed" in caplog.text
    assert s.run_once()["alice"].startswith("not due: last attempt")  # no hot loop after a failure
    assert calls == ["alice"]

    def ok(settings_, persona, store_):
        calls.append(persona)
        return RetrainOutcome(persona, "promoted", "better", "v1", "v2", {}, None, {})

    later = Scheduler(settings, store, retrain_fn=ok, clock=lambda: NOW + timedelta(hours=25))
    assert later.run_once() == {"alice": "promoted"}
