"""`convo adapters list|promote|rollback` and `convo forget` against real Redis, on version dirs built by hand."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import redis

from inference.adapter_meta import AdapterMeta, BaseModelRef, Speaker, write_adapter_meta
from inference.protocol import FeedbackEvent, Keys, ReloadMessage, entry_payload
from inference.versions import current_version, set_current
from training.feedback.store import FeedbackStore

pytestmark = pytest.mark.redis


def make_version(pdir: Path, version: str, parent: str | None = None, status: str | None = None) -> None:
    meta = AdapterMeta(persona=Speaker(name="Alice", tag="ALICE"), base_model=BaseModelRef(id="tiny"),
                       format_version=1, final_metrics={"final_eval_loss": 3.5})
    extra = {"parent": parent} if parent else {}
    if status:
        extra["loop"] = {"status": status, "candidate": {"val_nll": 3.4, "margin": 0.7}, "reason": "why"}
    write_adapter_meta(pdir / version, AdapterMeta.model_validate({**meta.model_dump(mode="json"), **extra}))


@pytest.fixture
def env(tmp_path, redis_url, monkeypatch):
    """Adapters alice v1..v3 (v3 current, parent v1; v2 rejected) and settings pointing at them."""
    prefix = f"adtest{uuid.uuid4().hex[:8]}"
    root = tmp_path / "adapters"
    pdir = root / "alice"
    make_version(pdir, "v1")
    make_version(pdir, "v2", parent="v1", status="rejected")
    make_version(pdir, "v3", parent="v1", status="promoted")
    set_current(pdir, "v3")
    monkeypatch.setenv("CONVO_FEEDBACK__ADAPTERS_DIR", str(root))
    monkeypatch.setenv("CONVO_FEEDBACK__DB_URL", f"sqlite:///{tmp_path}/fb.db")
    monkeypatch.setenv("CONVO_REDIS__URL", redis_url)
    monkeypatch.setenv("CONVO_REDIS__PREFIX", prefix)
    client = redis.Redis.from_url(redis_url)
    sub = client.pubsub()
    sub.subscribe(Keys(prefix).reload)
    assert sub.get_message(timeout=5)["type"] == "subscribe"
    yield {"root": root, "pdir": pdir, "keys": Keys(prefix), "sub": sub, "redis": client, "tmp": tmp_path}
    sub.close()
    client.close()


def reload_of(sub) -> ReloadMessage:
    msg = sub.get_message(timeout=5)
    assert msg is not None and msg["type"] == "message"
    return ReloadMessage.loads(msg["data"])


def test_list_shows_versions_parents_and_current(env, cli, capsys):
    assert cli(["adapters", "list", "alice", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)["alice"]
    assert [(v["version"], v["current"], v["parent"], v["status"]) for v in listing] == [
        ("v1", False, None, None), ("v2", False, "v1", "rejected"), ("v3", True, "v1", "promoted")]
    assert listing[2]["metrics"] == {"val_nll": 3.4, "margin": 0.7} and listing[0]["metrics"] == {"val_nll": 3.5}
    assert cli(["adapters", "list"]) == 0
    assert "v3" in capsys.readouterr().out


def test_rollback_goes_to_the_parent_and_publishes_a_reload(env, cli):
    assert cli(["adapters", "rollback", "alice"]) == 0
    assert current_version(env["pdir"]) == "v1"
    assert reload_of(env["sub"]) == ReloadMessage(persona="alice", version="v1")
    assert (env["pdir"] / "current").is_symlink() and not list(env["pdir"].glob(".current*"))  # renamed into place
    assert cli(["adapters", "rollback", "alice"]) == 2  # v1 is the oldest: nothing to roll back to
    assert cli(["adapters", "promote", "alice", "v2"]) == 0
    assert reload_of(env["sub"]) == ReloadMessage(persona="alice", version="v2")
    assert cli(["adapters", "rollback", "alice", "v3"]) == 0
    assert current_version(env["pdir"]) == "v3"


def test_bad_names_and_versions_are_one_line_errors(env, cli, capsys):
    assert cli(["adapters", "promote", "alice", "v7"]) == 2
    assert "no version 'v7' (versions: v1, v2, v3)" in capsys.readouterr().err
    assert cli(["adapters", "promote", "../etc", "v1"]) == 2
    assert cli(["adapters", "rollback", "bob"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert current_version(env["pdir"]) == "v3"


def test_forget_removes_every_row_draft_and_adapter_of_the_persona(env, cli):
    keys, r = env["keys"], env["redis"]
    store = FeedbackStore(f"sqlite:///{env['tmp']}/fb.db")
    store.create()
    make_version(env["root"] / "bob", "v1")
    set_current(env["root"] / "bob", "v1")
    for persona, draft in (("alice", "a1"), ("alice", "a2"), ("bob", "b1")):
        ev = FeedbackEvent(kind="sent", draft_id=draft, persona=persona, candidate=["hi"])
        store.add(ev)
        r.xadd(keys.feedback, entry_payload(ev))
        r.set(keys.draft(draft), json.dumps({"persona": persona, "candidates": [["hi"]]}))
        r.sadd(keys.chat_drafts("telegram", "42"), draft)
    r.set(keys.draft("a3"), json.dumps({"persona": "alice"}))  # a draft no event mentions yet
    r.xadd(keys.feedback_dead, {"entry_id": "1-0", "data": json.dumps({"persona": "alice"}), "reason": "bad"})

    assert cli(["forget", "--persona", "alice", "--yes"]) == 0
    assert store.personas() == ["bob"] and store.count_events() == 1
    assert not (env["root"] / "alice").exists() and (env["root"] / "bob" / "v1").is_dir()
    assert [k.decode() for k in r.scan_iter(match=keys.draft("*"))] == [keys.draft("b1")]
    assert r.smembers(keys.chat_drafts("telegram", "42")) == {b"b1"}
    remaining = [json.loads(f[b"data"])["persona"] for _, f in r.xrange(keys.feedback)]
    assert remaining == ["bob"] and r.xlen(keys.feedback_dead) == 0
    assert reload_of(env["sub"]) == ReloadMessage(persona="alice", version=None)
    store.close()
