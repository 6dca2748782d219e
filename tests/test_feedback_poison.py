"""Poison feedback entries, database refusals and kills mid-batch: the consumer stores or dead-letters every entry,
never exits, and leaves nothing pending (issue 18, items 12 and 13)."""
# ruff: noqa: F811 - the fixtures of test_feedback_store (one SQLite and one PostgreSQL store) are imported by name

from __future__ import annotations

import json
import threading
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
import redis
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from errors import ProtocolError
from inference.protocol import FEEDBACK_GROUP, MAX_HISTORY, MAX_TEXT_CHARS, FeedbackEvent, Keys, entry_payload
from tests.test_feedback_store import client, consumer, event, keys  # noqa: F401  (store: conftest)
from training.feedback.consumer import FeedbackConsumer, entry_fault
from training.feedback.store import FeedbackStore

pytestmark = pytest.mark.redis

VALID = {"kind": "sent", "draft_id": "d1", "persona": "alice", "final_text": "omg yes", "candidate": ["omg yes"]}


def push_raw(client, keys, payload: dict) -> str:
    """XADD a payload as raw JSON (what an old or foreign producer may put on the stream)."""
    return client.xadd(keys.feedback, {"data": json.dumps(payload, ensure_ascii=False)}).decode()


def dead_letters(client, keys) -> dict[str, str]:
    """Original entry id -> reason, for every dead letter."""
    return {f[b"entry_id"].decode(): f[b"reason"].decode() for _, f in client.xrange(keys.feedback_dead)}


def pending(client, keys) -> int:
    return client.xpending(keys.feedback, FEEDBACK_GROUP)["pending"]


# ---------------------------------------------------------------- the protocol's side


@pytest.mark.parametrize(("change", "field"), [
    ({"ts": "0001-01-01T00:00:00+01:00"}, "ts"),
    ({"ts": "9999-12-31T23:59:59-01:00"}, "ts"),
    ({"ts": "2026-01-01T10:00:00"}, "ts"),  # no offset: which instant is that?
    ({"context": [{"speaker": "RIYA", "text": "", "ts": "0001-01-01T00:00:00+01:00"}]}, "context.0.ts"),  # found by the fuzz test
    ({"v": 2}, "v"),
    ({"adapter_version": "v" * 65}, "adapter_version"),
    ({"draft_id": "d\x001"}, "draft_id"),
    ({"platform": "tele\x00gram"}, "platform"),
    ({"event_id": "e" * 129}, "event_id"),
])
def test_feedback_event_rejects_what_the_store_cannot_hold(change, field):
    with pytest.raises(ProtocolError, match=rf"FeedbackEvent\.{field}:"):
        FeedbackEvent.loads(json.dumps({**VALID, **change}))


def test_feedback_event_limits_agree_with_the_store_columns():
    table = FeedbackStore("sqlite://").events
    for name in ("event_id", "draft_id", "persona", "adapter_version", "platform"):
        limit = next(m.max_length for m in FeedbackEvent.model_fields[name].metadata if hasattr(m, "max_length"))
        assert table.c[name].type.length == limit, name
    extreme = FeedbackEvent.loads(json.dumps({**VALID, "ts": "0001-01-01T00:00:00-01:00"}))
    assert extreme.ts.year == 1  # the earliest instant that still has a UTC value is accepted


def _db(cls, **kw):
    return cls("INSERT ...", {}, Exception("x"), **kw)


@pytest.mark.parametrize(("error", "dead"), [
    (OverflowError("date value out of range"), True),
    (UnicodeEncodeError("utf-8", "x", 0, 1, "surrogates not allowed"), True),
    (_db(sa.exc.DataError), True),
    (_db(sa.exc.IntegrityError), True),  # not the duplicate key: store.add returns False for that one
    (_db(sa.exc.OperationalError), False),  # connection lost, database locked
    (_db(sa.exc.InterfaceError), False),
    (_db(sa.exc.ProgrammingError), False),  # a missing table is the database's fault, not the entry's
    (_db(sa.exc.DataError, connection_invalidated=True), False),
    (sa.exc.TimeoutError("pool exhausted"), False),
    (redis.ConnectionError("gone"), False),
    (AttributeError("a bug"), False),  # retried with its traceback, never a reason to dead-letter everything
])
def test_entry_fault_tells_the_entry_from_the_database(error, dead):
    assert entry_fault(error) is dead


# ---------------------------------------------------------------- poison entries on a real stream and store


def test_feedback_poison_timestamp_dead_lettered(client, store, keys):
    poison = push_raw(client, keys, {**VALID, "event_id": "poison", "ts": "0001-01-01T00:00:00+01:00"})
    good = event()
    client.xadd(keys.feedback, entry_payload(good))
    total = consumer(client, store, keys).drain()
    assert (total.stored, total.dead) == (1, 1)
    assert store.has_event(good.event_id) and not store.has_event("poison")
    assert "FeedbackEvent.ts: Value error, out of range" in dead_letters(client, keys)[poison]
    assert pending(client, keys) == 0 and client.xlen(keys.feedback) == 0


def test_feedback_database_refusal_dead_lettered_not_retried(client, store, keys):
    """A table narrower than the protocol (an old schema, a hand-made constraint): the refused entry goes to the
    dead-letter stream with the database's reason, the others are stored, nothing stays pending."""
    md = sa.MetaData()
    columns = [c._copy() if c.name != "platform" else sa.Column("platform", sa.String(8), nullable=False)
               for c in store.events.columns]
    store.drop()
    sa.Table(store.events.name, md, *columns, sa.CheckConstraint("persona <> 'blocked'"))
    md.create_all(store.engine)
    store.create()  # keeps the narrower table

    blocked, wide, good = event(persona="blocked"), event(platform="whatsapp-business"), event()
    ids = {e.event_id: client.xadd(keys.feedback, entry_payload(e)).decode() for e in (blocked, wide, good)}
    result = consumer(client, store, keys).poll_once()  # raises if it took the refusals for a database fault
    assert result.read == 3
    assert store.has_event(good.event_id) and not store.has_event(blocked.event_id)
    dead = dead_letters(client, keys)
    assert dead[ids[blocked.event_id]].startswith("the database refused it: IntegrityError")
    if store.engine.dialect.name == "postgresql":  # SQLite does not enforce VARCHAR lengths
        assert "value too long" in dead[ids[wide.event_id]]
    else:
        assert store.has_event(wide.event_id)
    assert pending(client, keys) == 0


def test_feedback_database_down_is_retried_not_dead_lettered(client, keys):
    down = FeedbackStore("postgresql+psycopg://postgres@127.0.0.1:1/nothing")  # nothing listens on port 1
    for _ in range(3):
        client.xadd(keys.feedback, entry_payload(event()))
    c = consumer(client, down, keys, backoff_max_s=0.01)
    stop = threading.Event()
    retries = []

    def on_retry(n, exc):
        retries.append(type(exc).__name__)
        if n >= 2:
            stop.set()

    t = threading.Thread(target=c.run, args=(stop,), kwargs={"on_retry": on_retry})
    t.start()
    t.join(timeout=30)
    assert not t.is_alive() and retries == ["OperationalError", "OperationalError"]
    assert pending(client, keys) == 3 and client.xlen(keys.feedback_dead) == 0
    down.close()


def test_feedback_entry_without_event_id_or_ts_is_stored_once_across_redeliveries(client, store, keys, monkeypatch):
    entry = push_raw(client, keys, {"kind": "liked", "draft_id": "d1", "persona": "alice"})  # a minimal producer
    first = consumer(client, store, keys)
    monkeypatch.setattr(first, "_ack", lambda ids: (_ for _ in ()).throw(SystemExit("killed before the ack")))
    with pytest.raises(SystemExit):
        first.poll_once()
    total = consumer(client, store, keys).drain()  # the same entry again
    assert (total.stored, total.duplicates) == (0, 1)
    (row,) = store.iter_events()
    assert row.event.event_id == f"entry-{entry}"
    assert row.event.ts == datetime.fromtimestamp(int(entry.split("-")[0]) / 1000, UTC)


# ---------------------------------------------------------------- kills mid-batch


@pytest.mark.parametrize("restart_as", ["c1", "c2"])  # the same consumer name (own pending) or another (XAUTOCLAIM)
def test_feedback_consumer_killed_mid_batch_restart_stores_each_once(client, store, keys, monkeypatch, restart_as):
    events = [event() for _ in range(6)]
    for ev in events:
        client.xadd(keys.feedback, entry_payload(ev))
    real_add, calls = store.add, []

    def dies_on_third(ev, stream_id=None, received_at=None):
        if len(calls) == 2:
            raise SystemExit("killed mid-batch")
        calls.append(ev.event_id)
        return real_add(ev, stream_id, received_at)

    monkeypatch.setattr(store, "add", dies_on_third)
    with pytest.raises(SystemExit):
        consumer(client, store, keys, name="c1").poll_once()  # read 4, stored 2, acked none
    monkeypatch.undo()
    assert store.count_events() == 2 and pending(client, keys) == 4

    total = consumer(client, store, keys, name=restart_as, claim_idle_s=0.001).drain()
    assert (total.stored, total.duplicates, total.dead) == (4, 2, 0)
    stored = [s.event.event_id for s in store.iter_events()]
    assert sorted(stored) == sorted(e.event_id for e in events)  # each exactly once
    assert pending(client, keys) == 0 and client.xlen(keys.feedback) == 0


def test_feedback_process_sigkilled_mid_batch_restart_claims_and_stores_once(client, keys, redis_url, tmp_path):
    """A real `convo serve feedback` reads a batch, blocks on a locked SQLite file, and is SIGKILLed: the entries
    were read but never acked. Another consumer claims them and stores each once."""
    import os
    import sqlite3
    import subprocess
    import sys
    import time
    from pathlib import Path

    db = tmp_path / "feedback.db"
    url = f"sqlite:///{db}"
    store = FeedbackStore(url)
    store.create()
    events = [event() for _ in range(4)]
    for ev in events:
        client.xadd(keys.feedback, entry_payload(ev))
    consumer(client, store, keys).ensure_group()
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # every other writer now waits for the busy timeout
    env = {**os.environ, "CONVO_REDIS__URL": redis_url, "CONVO_REDIS__PREFIX": keys.prefix,
           "CONVO_FEEDBACK__DB_URL": url, "CONVO_FEEDBACK__BLOCK_MS": "100",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "convo", "serve", "feedback", "--consumer", "killed"], env=env,
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and pending(client, keys) < 4:
            time.sleep(0.05)  # waiting on the condition (the batch is read), with a timeout
        assert pending(client, keys) == 4, "the consumer process did not read the batch"
    finally:
        proc.kill()
        proc.wait(timeout=30)
        lock.execute("ROLLBACK")
        lock.close()
    assert store.count_events() == 0
    owners = client.xpending_range(keys.feedback, FEEDBACK_GROUP, "-", "+", 10)
    assert {o["consumer"].decode() for o in owners} == {"killed"}

    total = FeedbackConsumer(client, store, keys, consumer="restarted", claim_idle_s=0.001, block_ms=1).drain()
    assert (total.stored, total.duplicates, total.dead) == (4, 0, 0)
    assert sorted(s.event.event_id for s in store.iter_events()) == sorted(e.event_id for e in events)
    assert pending(client, keys) == 0
    store.close()


# ---------------------------------------------------------------- fuzz: whatever reaches the stream


_HUGE = "x" * MAX_TEXT_CHARS
_TEXT = st.one_of(
    st.text(max_size=12),  # any code point but lone surrogates (JSON cannot carry those), NUL included
    st.sampled_from(["", "\x00", "a\x00b", "é" * 64, "🙌" * 100, "\u202eevil", "\ufeff", _HUGE, _HUGE + "!"]),
)
_TOKEN = st.from_regex(r"[A-Za-z0-9_.:\-]{1,128}", fullmatch=True)
_OFFSET = st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m)))
_TS = st.one_of(
    st.datetimes(timezones=_OFFSET).map(datetime.isoformat),  # years 1 to 9999, offsets up to ±23:59
    st.sampled_from(["0001-01-01T00:00:00+01:00", "0001-01-01T00:00:00+00:00", "9999-12-31T23:59:59.999999-00:01",
                     "9999-12-31T23:59:59.999999+00:00", "2026-06-01T12:00:00", "1970-01-01T00:00:00Z"]),
)
_MESSAGE = st.fixed_dictionaries({"speaker": st.one_of(st.just("RIYA"), _TEXT), "text": _TEXT},
                                 optional={"ts": st.one_of(st.none(), _TS)})
_CONTEXT = st.one_of(
    st.lists(_MESSAGE, max_size=3),
    st.sampled_from([MAX_HISTORY, MAX_HISTORY + 1]).map(lambda n: [{"speaker": "RIYA", "text": _HUGE}] * n),
)
_PAYLOAD = st.fixed_dictionaries(
    {
        "event_id": st.one_of(_TOKEN, _TEXT, st.just("e" * 129)),
        "kind": st.sampled_from(["shown", "sent", "edited", "liked", "disliked", "regenerated"]),
        "draft_id": st.one_of(_TOKEN, _TEXT),
        "persona": st.one_of(st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True), _TEXT),
    },
    optional={
        "v": st.sampled_from([1, 2]),
        "mode": st.sampled_from(["friend", "self"]),
        "adapter_version": st.one_of(st.none(), st.sampled_from(["v1", "v" * 64, "v" * 65, "v" * 4000, "v\x00", ""])),
        "context": _CONTEXT,
        "target": st.one_of(st.none(), _TEXT),
        "candidate": st.lists(_TEXT, max_size=3),
        "candidate_index": st.one_of(st.none(), st.integers(-1, 9)),
        "final_text": st.one_of(st.none(), _TEXT),
        "platform": st.one_of(st.sampled_from(["telegram", "discord", "console"]), _TEXT),
        "ts": _TS,
    },
)


def _accepts(payload: dict) -> FeedbackEvent | None:
    try:
        return FeedbackEvent.loads(json.dumps(payload))
    except ProtocolError:
        return None


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow, HealthCheck.data_too_large])
@given(payloads=st.lists(_PAYLOAD, min_size=1, max_size=5, unique_by=lambda p: p["event_id"]))
def test_feedback_fuzz_every_entry_stored_or_dead_lettered(client, store, payloads):
    """Hypothesis-made payloads on a real stream into a real store: what the protocol accepts is stored (the
    store's columns hold all of it), everything else is dead-lettered, and nothing stays pending."""
    keys = Keys(f"fuzz{uuid.uuid4().hex[:8]}")
    with store.engine.begin() as conn:
        conn.execute(store.events.delete())
    sentinel = event()
    entries = {push_raw(client, keys, p): (p, _accepts(p)) for p in payloads}
    client.xadd(keys.feedback, entry_payload(sentinel))

    total = consumer(client, store, keys, block_ms=1).drain()  # raises if the consumer would have died

    accepted = {eid: (p, ev) for eid, (p, ev) in entries.items() if ev is not None}
    rejected = {eid for eid, (_, ev) in entries.items() if ev is None}
    stored = {s.event.event_id: s for s in store.iter_events()}
    assert set(stored) == {ev.event_id for _, ev in accepted.values()} | {sentinel.event_id}
    for entry_id, (payload, ev) in accepted.items():
        row = stored[ev.event_id]
        if "ts" not in payload:  # no ts on the wire: the entry's own time, the same on every delivery
            assert row.event.ts == datetime.fromtimestamp(int(entry_id.split("-")[0]) / 1000, UTC)
            ev = ev.model_copy(update={"ts": row.event.ts})
        assert row.event == ev and row.stream_id == entry_id
    assert set(dead_letters(client, keys)) == rejected
    assert (total.stored, total.dead, total.duplicates) == (len(accepted) + 1, len(rejected), 0)
    assert pending(client, keys) == 0 and client.xlen(keys.feedback) == 0
