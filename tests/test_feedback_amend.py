"""Edited and deleted chat messages reach the feedback database: events stored before the edit are changed, events
stored after it (still on the stream, or left pending by a crash) take it at insert, and exports never carry the old
text (issue 18, item 5). SQLite and PostgreSQL, through the real consumer on a real Redis stream."""
# ruff: noqa: F811 - the fixtures of test_feedback_store (one SQLite and one PostgreSQL store) are imported by name

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from inference.protocol import (
    FeedbackEvent,
    HistoryMessage,
    MessageAmendment,
    amendment_payload,
    entry_payload,
)
from tests.test_feedback_export import meta
from tests.test_feedback_store import client, consumer, keys  # noqa: F401  (store: conftest)
from training.feedback.export import SpeakerMap, build_rows
from training.feedback.store import json_ts

pytestmark = pytest.mark.redis

T0 = datetime(2026, 11, 2, 12, 0, 0, 123456, tzinfo=UTC)
ASK = HistoryMessage(speaker="Riya", text="dinner at 8? my address is 12 Elm St", ts=T0)
OTHER = HistoryMessage(speaker="ALICE", text="maybe", ts=T0 + timedelta(seconds=30))


def ev(kind="shown", draft="d1", context=(ASK, OTHER), platform="telegram", **kw) -> FeedbackEvent:
    fields = dict(kind=kind, draft_id=draft, persona="alice", mode="friend", platform=platform, context=list(context),
                  candidate=["omg yes", "be there soon"], candidate_index=0, ts=T0 + timedelta(minutes=1))
    if kind in ("sent", "edited"):
        fields["final_text"] = "omg yes\nbe there soon"
    fields.update(kw)
    return FeedbackEvent(**fields)


def amend(message: HistoryMessage = ASK, text: str | None = None, **kw) -> MessageAmendment:
    return MessageAmendment(platform="telegram", persona="alice", speaker=message.speaker, ts=message.ts, text=text,
                            **kw)


def push(client, keys, *items) -> None:
    for item in items:
        client.xadd(keys.feedback, amendment_payload(item) if isinstance(item, MessageAmendment)
                    else entry_payload(item))


def stored(store) -> dict[str, FeedbackEvent]:
    return {s.event.event_id: s.event for s in store.iter_events()}


def test_edit_after_the_event_was_stored_changes_its_context(client, store, keys):
    shown, liked = ev("shown"), ev("liked")
    elsewhere = ev("shown", draft="d2", platform="discord")  # same speaker and time, another platform
    untouched = ev("shown", draft="d3", context=[OTHER])
    push(client, keys, shown, liked, elsewhere, untouched)
    c = consumer(client, store, keys)
    assert c.drain().stored == 4
    push(client, keys, amend(text="dinner at 9?"))
    assert c.drain().amendments == 1
    rows = stored(store)
    for e in (shown, liked):
        assert [m.text for m in rows[e.event_id].context] == ["dinner at 9?", "maybe"]
        assert rows[e.event_id].context[0].ts == T0
    assert rows[elsewhere.event_id] == elsewhere and rows[untouched.event_id] == untouched
    assert client.xlen(keys.feedback) == 0


def test_deletion_after_the_event_was_stored_removes_the_message(client, store, keys):
    events = [ev("shown"), ev("disliked"), ev("sent")]
    push(client, keys, *events)
    c = consumer(client, store, keys)
    c.drain()
    push(client, keys, amend(text=None))
    c.drain()
    for e in stored(store).values():
        assert [m.text for m in e.context] == ["maybe"]
        assert e.final_text in (None, "omg yes\nbe there soon")  # the reply was not the deleted message


def test_amendment_before_the_event_is_applied_at_insert(client, store, keys):
    c = consumer(client, store, keys)
    push(client, keys, amend(text="dinner at 9?"))
    c.drain()
    later = ev("liked")  # built from a context read before the edit reached the bot
    push(client, keys, later)
    c.drain()
    assert [m.text for m in stored(store)[later.event_id].context] == ["dinner at 9?", "maybe"]
    assert store.count_amendments() == 1


def test_event_left_pending_by_a_crash_takes_an_amendment_consumed_meanwhile(client, store, keys):
    shown = ev("shown")
    push(client, keys, shown)
    crashed = consumer(client, store, keys, name="crashed")
    crashed.ensure_group()
    assert len(crashed._read()) == 1  # read, then the process died before storing it
    push(client, keys, amend(text=None))
    consumer(client, store, keys, name="other").drain()  # the amendment arrives first
    assert store.count_events() == 0
    consumer(client, store, keys, name="crashed").drain()  # restarted: its pending entry is stored now
    assert [m.text for m in stored(store)[shown.event_id].context] == ["maybe"]


def test_amendments_apply_in_the_order_received(client, store, keys):
    push(client, keys, ev("shown"), amend(text="dinner at 9?"), amend(text="dinner at 10?"))
    c = consumer(client, store, keys)
    c.drain()
    late = ev("liked")
    push(client, keys, late)
    c.drain()
    assert {e.context[0].text for e in stored(store).values()} == {"dinner at 10?"}


def test_edited_reply_becomes_the_final_text_and_a_deleted_one_drops_the_label(client, store, keys):
    typed = ev("edited", draft="d1", final_text="sure, 8 works")
    sent = ev("sent", draft="d2")
    shown = ev("shown", draft="d2")
    push(client, keys, typed, sent, shown)
    c = consumer(client, store, keys)
    c.drain()
    me = HistoryMessage(speaker="RIYA", text="sure, 8 works", ts=T0 + timedelta(seconds=50))
    push(client, keys, amend(me, "sure, 9 works", reply_of="d1", reply_text="sure, 9 works"),
         amend(me.model_copy(update={"ts": T0 + timedelta(seconds=51)}), None, reply_of="d2", reply_text=None))
    c.drain()
    rows = stored(store)
    assert (rows[typed.event_id].kind, rows[typed.event_id].final_text) == ("edited", "sure, 9 works")
    assert sent.event_id not in rows  # the whole reply was deleted: no label left
    assert rows[shown.event_id] == shown  # what was shown stays (the candidate is the model's text)
    assert store.counts()["alice"] == {"edited": 1, "shown": 1}


def test_reply_edited_back_to_the_candidate_counts_as_sent(client, store, keys):
    typed = ev("edited", draft="d1", final_text="omg yes!!")
    push(client, keys, amend(ASK, "x", reply_of="d1", reply_text="omg yes\nbe there soon"), typed)
    consumer(client, store, keys).drain()
    row = stored(store)[typed.event_id]
    assert (row.kind, row.final_text) == ("sent", "omg yes\nbe there soon")


def test_export_after_amendments_carries_no_old_text(client, store, keys):
    me = HistoryMessage(speaker="RIYA", text="meet me at 12 Elm St", ts=T0 + timedelta(seconds=50))
    events = [ev("shown"), ev("sent"), ev("liked", draft="d2"), ev("edited", draft="d3", final_text=me.text),
              ev("disliked", draft="d4", context=[OTHER, me])]
    push(client, keys, *events[:3])
    c = consumer(client, store, keys)
    c.drain()
    push(client, keys, amend(text=None), amend(me, "see you there", reply_of="d3", reply_text="see you there"),
         *events[3:])
    c.drain()
    rows = build_rows([s.event for s in store.iter_events()], SpeakerMap.from_meta(meta()))
    dumped = json.dumps([rows.sft, rows.kto, rows.pairs], ensure_ascii=False)
    assert rows.sft and rows.kto
    assert "12 Elm St" not in dumped and "see you there" in dumped


def test_poison_amendment_is_dead_lettered_and_the_rest_stored(client, store, keys):
    good = ev("shown")
    client.xadd(keys.feedback, {**amendment_payload(amend(text="x")), "data": '{"platform": "telegram"}'})
    push(client, keys, good)
    result = consumer(client, store, keys).drain()
    assert (result.dead, result.stored) == (1, 1)
    reason = client.xrange(keys.feedback_dead)[0][1][b"reason"].decode()
    assert reason.startswith("MessageAmendment.")
    assert client.xlen(keys.feedback) == 0


def test_prune_and_forget_remove_amendments(store):
    old = datetime.now(UTC) - timedelta(days=400)
    store.amend(amend(text="dinner at 9?"), received_at=old)
    store.amend(amend(OTHER, text=None))
    assert store.count_amendments() == 2
    store.prune_events(datetime.now(UTC) - timedelta(days=365))
    assert store.count_amendments() == 1
    store.delete_persona("alice")
    assert store.count_amendments() == 0


def test_json_ts_is_how_an_event_spells_the_time():
    assert json_ts(T0) in ev().dumps()
    assert json_ts(T0.replace(microsecond=0)) in ev(context=[ASK.model_copy(update={"ts": T0.replace(microsecond=0)})
                                                               ]).dumps()
