"""Feedback stream -> database: round trip, crash before ack (no loss, no duplicate), dead letters, Redis down."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from inference.protocol import FEEDBACK_GROUP, FeedbackEvent, HistoryMessage, Keys, entry_payload
from training.feedback.consumer import FeedbackConsumer
from training.feedback.store import FeedbackStore, RetrainRun

pytestmark = pytest.mark.redis




@pytest.fixture
def keys():
    return Keys(f"fbtest{uuid.uuid4().hex[:8]}")


@pytest.fixture
def client(redis_url):
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def event(kind="sent", persona="alice", draft=None, **kw) -> FeedbackEvent:
    fields = dict(
        kind=kind, draft_id=draft or uuid.uuid4().hex, persona=persona, mode="friend",
        context=[HistoryMessage(speaker="RIYA", text="you coming?")], candidate=["omg yes 🙌"],
        final_text="omg yes 🙌" if kind in ("sent", "edited") else None,
    )
    fields.update(kw)
    return FeedbackEvent(**fields)


def consumer(client, store, keys, name="c1", **kw) -> FeedbackConsumer:
    return FeedbackConsumer(client, store, keys, consumer=name, **{"batch_size": 4, "block_ms": 50, **kw})


def test_round_trip_and_crash_before_ack(client, store, keys, monkeypatch):
    events = [event(kind=k) for k in ("shown", "sent", "edited", "liked", "disliked", "regenerated", "sent")]
    for ev in events:
        client.xadd(keys.feedback, entry_payload(ev))
    client.xadd(keys.feedback, {"data": '{"kind": "sent"}'})  # malformed: no draft_id, persona...
    client.xadd(keys.feedback, {"other": "x"})  # no data field at all

    first = consumer(client, store, keys)
    first.ensure_group()

    def crash(ids):
        raise SystemExit("killed between database write and XACK")

    monkeypatch.setattr(first, "_ack", crash)
    with pytest.raises(SystemExit):
        first.poll_once()  # wrote the first batch (4 entries), then "died"
    assert store.count_events() == 4
    assert client.xpending(keys.feedback, FEEDBACK_GROUP)["pending"] == 4

    # Restart under the same consumer name: pending entries first, the duplicates are recognised, then the rest.
    restarted = consumer(client, store, keys)
    total = restarted.drain()
    assert total.duplicates == 4 and total.stored == 3 and total.dead == 2
    assert client.xpending(keys.feedback, FEEDBACK_GROUP)["pending"] == 0
    assert store.count_events() == 7
    stored = store.iter_events()
    assert sorted(s.event.event_id for s in stored) == sorted(e.event_id for e in events)  # no loss, no duplicate
    by_id = {s.event.event_id: s.event for s in stored}
    assert by_id[events[2].event_id] == events[2]  # the whole event round-trips, timestamps included
    assert all(s.received_at.tzinfo is not None for s in stored)
    dead = client.xrange(keys.feedback_dead)
    reasons = [fields[b"reason"].decode() for _, fields in dead]
    assert len(dead) == 2 and any("FeedbackEvent.draft_id" in r for r in reasons) and any("no 'data'" in r for r in reasons)
    assert store.counts() == {"alice": {"shown": 1, "sent": 2, "edited": 1, "liked": 1, "disliked": 1, "regenerated": 1}}


def test_other_consumer_claims_what_a_dead_one_left_pending(client, store, keys, monkeypatch):
    for _ in range(3):
        client.xadd(keys.feedback, entry_payload(event()))
    dead = consumer(client, store, keys, name="host-a")
    monkeypatch.setattr(dead, "_ack", lambda ids: (_ for _ in ()).throw(SystemExit()))
    with pytest.raises(SystemExit):
        dead.poll_once()
    other = consumer(client, store, keys, name="host-b", claim_idle_s=0.001)
    total = other.drain()
    assert (total.stored, total.duplicates) == (0, 3)
    assert client.xpending(keys.feedback, FEEDBACK_GROUP)["pending"] == 0
    assert store.count_events() == 3


def test_redis_down_is_retried_with_backoff_and_the_loop_keeps_running(store, keys):
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # Nothing listens on port 1; redis-py's own retries are off so the test sees each of ours.
    down = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    c = consumer(down, store, keys, backoff_max_s=0.01)
    stop = threading.Event()
    retries = []

    def on_retry(n, exc):
        retries.append((n, type(exc).__name__))
        if n >= 3:
            stop.set()

    t = threading.Thread(target=c.run, args=(stop,), kwargs={"on_retry": on_retry})
    t.start()
    t.join(timeout=20)
    assert not t.is_alive()
    assert [n for n, _ in retries] == [1, 2, 3] and retries[0][1] == "ConnectionError"


def test_retrain_runs_and_labelled_counts(store):
    now = datetime.now(UTC)
    store.add(event(kind="shown"), received_at=now - timedelta(hours=2))
    store.add(event(kind="sent"), received_at=now - timedelta(hours=2))
    store.add(event(kind="liked"), received_at=now)
    assert store.labelled_since("alice", None) == 2
    assert store.labelled_since("alice", now - timedelta(hours=1)) == 1
    rid = store.record_run(RetrainRun("alice", "rejected", "worse", now, now, "v1", "v2", now, {"x": 1.5}))
    runs = store.list_runs("alice")
    assert runs[0].id == rid and runs[0].metrics == {"x": 1.5} and runs[0].data_until == now.replace(microsecond=now.microsecond)
    assert store.delete_persona("alice") == {"events": 3, "runs": 1}
    assert store.count_events() == 0


def test_sqlite_runs_in_wal_mode(tmp_path):
    s = FeedbackStore(f"sqlite:///{tmp_path}/a/b/feedback.db")
    s.create()
    with s.engine.connect() as conn:
        assert conn.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"
    s.close()


def test_serve_feedback_process_stores_events_and_stops_on_sigterm(client, keys, redis_url, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    db = tmp_path / "data" / "feedback.db"
    env = {**os.environ, "CONVO_REDIS__URL": redis_url, "CONVO_REDIS__PREFIX": keys.prefix,
           "CONVO_FEEDBACK__DB_URL": f"sqlite:///{db}", "CONVO_FEEDBACK__BLOCK_MS": "100",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    events = [event(kind=k) for k in ("shown", "sent", "liked")]
    for ev in events:
        client.xadd(keys.feedback, entry_payload(ev))
    proc = subprocess.Popen([sys.executable, "-m", "convo", "serve", "feedback", "--consumer", "t1"], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        store = FeedbackStore(f"sqlite:///{db}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:  # wait on the condition, with a timeout
            try:
                if store.count_events() == 3:
                    break
            except sa.exc.OperationalError:  # tables not created yet
                pass
            time.sleep(0.1)
        assert store.count_events() == 3
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "stopping after the current batch" in out and "you coming" not in out  # events, never chat text
        assert client.xpending(keys.feedback, FEEDBACK_GROUP)["pending"] == 0
        store.close()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_prune_events_counts_then_deletes_what_was_received_before_the_cutoff(store):
    now = datetime.now(UTC)
    for days in (400, 366, 1):
        store.add(event(), received_at=now - timedelta(days=days))
    cutoff = now - timedelta(days=365)
    assert store.prune_events(cutoff, dry_run=True) == 2 and store.count_events() == 3
    assert store.prune_events(cutoff) == 2 and store.count_events() == 1
    assert store.prune_events(cutoff) == 0
