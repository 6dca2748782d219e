"""Retention: `convo prune` (dry run by default) and the scheduler delete old feedback events, dead letters and
rejected adapter versions, and nothing else."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import redis

from config.settings import FeedbackSettings, RedisSettings, Settings
from errors import ConfigError
from inference.adapter_meta import read_adapter_meta, write_adapter_meta
from inference.protocol import FeedbackEvent, Keys
from inference.versions import next_version, set_current
from tests.test_adapters_cli import make_version
from training.feedback.retention import PRUNED_FILE, prune
from training.feedback.store import FeedbackStore
from training.scheduler import Scheduler
from training.versions import check_version, version_infos

NOW = datetime.now(UTC).replace(microsecond=0)  # `convo prune` runs on the real clock


def old_version(pdir, version, days, parent=None, status="rejected"):
    """A version created `days` before NOW."""
    make_version(pdir, version, parent=parent, status=status)
    meta = read_adapter_meta(pdir / version)
    write_adapter_meta(pdir / version, meta.model_copy(update={"created_at": NOW - timedelta(days=days)}))


@pytest.fixture
def env(tmp_path, redis_url):
    """A store with events 400 and 10 days old, both dead-letter streams with entries 40 and 1 days old, and
    alice's versions: v1 (old), v2 rejected 60 days ago (goes), v3 rejected 60 days ago but v4's parent (stays),
    v4 current, v5 rejected 2 days ago (stays); bob's v1 rejected long ago but promoted by hand (current: stays)."""
    root = tmp_path / "adapters"
    pa = root / "alice"
    old_version(pa, "v1", 90, status=None)
    old_version(pa, "v2", 60, parent="v1")
    old_version(pa, "v3", 60, parent="v1")
    old_version(pa, "v4", 50, parent="v3", status="promoted")
    old_version(pa, "v5", 2, parent="v4")
    set_current(pa, "v4")
    old_version(root / "bob", "v1", 90)
    set_current(root / "bob", "v1")
    store = FeedbackStore(f"sqlite:///{tmp_path}/fb.db")
    store.create()
    for days in (400, 10):
        store.add(FeedbackEvent(kind="sent", draft_id=f"d{days}", persona="alice", candidate=["x"]),
                  received_at=NOW - timedelta(days=days))
    prefix = f"ret{uuid.uuid4().hex[:8]}"
    keys = Keys(prefix)
    client = redis.Redis.from_url(redis_url)
    for stream in (keys.dead, keys.feedback_dead):
        for days in (40, 1):
            ms = int((NOW - timedelta(days=days)).timestamp() * 1000)
            client.xadd(stream, {"reason": "x"}, id=f"{ms}-0")
    settings = Settings(redis=RedisSettings(url=redis_url, prefix=prefix),
                        feedback=FeedbackSettings(adapters_dir=str(root), db_url=store.db_url))
    yield settings, store, client, keys, root
    client.close()
    store.close()


def test_prune_dry_run_counts_and_apply_deletes_only_what_is_past_retention(env):
    settings, store, client, keys, root = env
    dry = prune(settings, store, now=NOW)
    expected = (1, {keys.dead: 1, keys.feedback_dead: 1}, ["alice/v2"])
    assert (dry.feedback_events, dry.dead_letters, dry.adapter_versions) == expected and not dry.applied
    assert store.count_events() == 2 and client.xlen(keys.dead) == 2
    assert check_version(root / "alice", "v2") == "v2"  # the dry run touched nothing

    done = prune(settings, store, now=NOW, apply=True)
    assert (done.feedback_events, done.dead_letters, done.adapter_versions) == expected and done.applied
    assert [s.event.draft_id for s in store.iter_events()] == ["d10"]
    assert client.xlen(keys.dead) == 1 and client.xlen(keys.feedback_dead) == 1
    pa = root / "alice"
    assert [p.name for p in (pa / "v2").iterdir()] == [PRUNED_FILE]
    assert json.loads((pa / "v2" / PRUNED_FILE).read_text())["status"] == "rejected"
    with pytest.raises(ConfigError, match="no version 'v2'"):
        check_version(pa, "v2")  # cannot be promoted any more
    assert [v.version for v in version_infos(pa)] == ["v1", "v3", "v4", "v5"]
    assert next_version(pa) == "v6"  # the number is never handed out again
    assert not list(pa.glob(".v2*"))
    assert (root / "bob" / "v1" / "convo_adapter.json").is_file()  # current, though rejected: kept

    again = prune(settings, store, now=NOW, apply=True)  # idempotent
    assert (again.feedback_events, again.dead_letters, again.adapter_versions) == (0, {keys.dead: 0,
                                                                                       keys.feedback_dead: 0}, [])


def test_prune_zero_days_keeps_forever_and_redis_down_is_a_note(env):
    settings, store, _, keys, root = env
    fs = settings.feedback.model_copy(update={"retention_days": 0, "rejected_retention_days": 0})
    down = settings.model_copy(update={"feedback": fs,
                                       "redis": RedisSettings(url="redis://127.0.0.1:1/0", prefix=keys.prefix)})
    report = prune(down, store, now=NOW, apply=True)
    assert report.cutoffs["feedback_events"] is None and report.cutoffs["adapter_versions"] is None
    assert (report.feedback_events, report.dead_letters, report.adapter_versions) == (0, None, [])
    assert "did not answer" in report.notes[0] and store.count_events() == 2
    assert check_version(root / "alice", "v2") == "v2"


def test_prune_command_is_a_dry_run_unless_applied(env, cli, capsys, monkeypatch):
    settings, store, client, keys, root = env
    monkeypatch.setenv("CONVO_REDIS__URL", settings.redis.url)
    monkeypatch.setenv("CONVO_REDIS__PREFIX", keys.prefix)
    monkeypatch.setenv("CONVO_FEEDBACK__DB_URL", store.db_url)
    monkeypatch.setenv("CONVO_FEEDBACK__ADAPTERS_DIR", str(root))
    monkeypatch.setenv("CONVO_FEEDBACK__RETENTION_DAYS", "30")
    assert cli(["prune"]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and "would delete" in out and store.count_events() == 2
    assert cli(["prune", "--apply", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["applied"] and summary["feedback_events"] == 1 and summary["adapter_versions"] == ["alice/v2"]
    assert store.count_events() == 1


def test_scheduler_prunes_at_start_and_then_every_interval(env):
    settings, store, client, keys, root = env
    clock = [NOW]
    s = Scheduler(settings, store, retrain_fn=lambda *a: None, clock=lambda: clock[0])
    assert s.prune_if_due().feedback_events == 1
    clock[0] = NOW + timedelta(hours=23)
    assert s.prune_if_due() is None
    store.add(FeedbackEvent(kind="sent", draft_id="later", persona="alice"), received_at=NOW - timedelta(days=366))
    clock[0] = NOW + timedelta(hours=24)
    assert s.prune_if_due().feedback_events == 1
