"""De-duplication across overlapping exports, `--append`, and chats that share a title."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from errors import ConfigError, IngestError
from training.ingest import pipeline
from training.ingest.dedup import ChatTitles, GroupDedup
from training.ingest.pipeline import ingest

T0 = 1_680_000_000  # 2023-03-28


def tg_chat(path: Path, msgs: list[tuple[int, int, str, str]], chat_id: int = 4242, name: str = "Alice") -> Path:
    """A Telegram single-chat result.json with (id, seconds after T0, speaker, text) messages."""
    people = {"Alice": "user4242", "Riya": "user777", "Alex": "user99"}
    path.write_text(json.dumps({"name": name, "type": "personal_chat", "id": chat_id, "messages": [
        {"id": mid, "type": "message", "date_unixtime": str(T0 + dt), "from": who, "from_id": people[who],
         "text": text} for mid, dt, who, text in msgs]}), encoding="utf-8")
    return path


def tg_full(path: Path, chats: dict[int, tuple[str, list[tuple[int, int, str, str]]]]) -> Path:
    """A Telegram full account export holding the given chats (id -> (name, messages))."""
    people = {"Alice": "user4242", "Riya": "user777", "Alex": "user99"}
    path.write_text(json.dumps({
        "personal_information": {"user_id": 777, "first_name": "Riya"},
        "chats": {"list": [{"name": name, "type": "personal_chat", "id": cid, "messages": [
            {"id": mid, "type": "message", "date_unixtime": str(T0 + dt), "from": who, "from_id": people[who],
             "text": text} for mid, dt, who, text in msgs]} for cid, (name, msgs) in chats.items()]},
    }), encoding="utf-8")
    return path


MARCH = [(1, 0, "Alice", "hi"), (2, 60, "Riya", "hey"), (3, 120, "Alice", "ok"), (4, 120, "Alice", "ok")]
JUNE = [(3, 120, "Alice", "ok"), (4, 120, "Alice", "ok"), (5, 180, "Riya", "later"), (6, 240, "Alice", "bye")]


def log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def meta(path: Path) -> dict:
    return json.loads(path.with_name(path.stem + ".meta.json").read_text(encoding="utf-8"))


def test_overlapping_telegram_exports_give_each_message_once(tmp_path):
    march, june = tg_chat(tmp_path / "march.json", MARCH), tg_chat(tmp_path / "june.json", JUNE)
    out = tmp_path / "m.jsonl"
    result = ingest([march, june], out, me="Riya")
    rows = log(out)
    assert [(r["id"], r["text"]) for r in rows] == [("1", "hi"), ("2", "hey"), ("3", "ok"), ("4", "ok"),
                                                    ("5", "later"), ("6", "bye")]
    assert {r["chat"] for r in rows} == {"Alice"} and {r["chat_id"] for r in rows} == {"4242"}
    m = result.meta
    assert m["messages"] == 6 and m["duplicates"] == 2
    assert [(Path(f["path"]).name, f["messages"], f["duplicates"]) for f in m["files"]] == [
        ("march.json", 4, 0), ("june.json", 4, 2)]
    assert m["files"][1]["date_range"] == {"first": "2023-03-28T10:42:00+00:00", "last": "2023-03-28T10:44:00+00:00"}
    assert m["formats"] == {"telegram": 6}
    assert {s["name"]: s["count"] for s in m["speakers"]} == {"Alice": 4, "Riya": 2}


def test_single_chat_and_full_export_of_the_same_chat(tmp_path):
    single = tg_chat(tmp_path / "single.json", MARCH, name="Alice")
    full = tg_full(tmp_path / "full.json", {4242: ("Alice Renamed", JUNE), 99: ("Alex", [(1, 30, "Alex", "yo")])})
    out = tmp_path / "m.jsonl"
    result = ingest([single, full], out)
    rows = log(out)
    # the chat keeps the title it was first seen with; the copies of messages 3 and 4 are dropped
    assert [(r["chat"], r["text"]) for r in rows] == [
        ("Alex", "yo"), ("Alice", "hi"), ("Alice", "hey"), ("Alice", "ok"), ("Alice", "ok"), ("Alice", "later"),
        ("Alice", "bye")]
    assert result.meta["duplicates"] == 2 and result.meta["me"]["id"] == "user777"


def test_two_single_chat_exports_with_one_title_stay_apart(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = tg_chat(tmp_path / "a" / "result.json", MARCH, chat_id=1, name="Alex")
    b = tg_chat(tmp_path / "b" / "result.json", MARCH, chat_id=2, name="Alex")
    out = tmp_path / "m.jsonl"
    result = ingest([a, b], out, me="Riya")
    rows = log(out)
    assert [r["chat"] for r in rows] == ["Alex"] * 4 + ["Alex (2)"] * 4  # nothing merged, nothing dropped
    assert result.meta["duplicates"] == 0
    assert result.meta["shared_titles"] == {"Alex": ["Alex", "Alex (2)"]}
    assert "2 different chats are titled 'Alex'; kept apart as 'Alex', 'Alex (2)'" in result.warnings
    again = ingest([b], out, append=True)  # chat 2 is found again by its id; the sidecar still says it
    assert [r["chat"] for r in log(out)] == ["Alex"] * 4 + ["Alex (2)"] * 4
    assert again.meta["duplicates"] == 4 and again.meta["shared_titles"] == {"Alex": ["Alex", "Alex (2)"]}


def test_append_equals_ingesting_both_and_is_idempotent(tmp_path):
    march, june = tg_chat(tmp_path / "march.json", MARCH), tg_chat(tmp_path / "june.json", JUNE)
    both = tmp_path / "both.jsonl"
    ingest([march, june], both, me="Riya")
    out = tmp_path / "m.jsonl"
    ingest([march], out, me="Riya")
    result = ingest([june], out, append=True)  # "me" comes from the log's sidecar
    assert out.read_bytes() == both.read_bytes()
    m = meta(out)
    assert m["messages"] == 6 and m["duplicates"] == 2 and m["me"]["id"] == "user777"
    assert m["me"]["how"] == "m.meta.json of the log appended to"
    assert [Path(f["path"]).name for f in m["files"]] == ["march.json", "june.json"]
    assert m["appended"] == {"log_messages": 4, "new_messages": 4, "duplicates": 2, "added": 2}
    assert m["formats"] == {"telegram": 6}
    assert result.meta == m
    before = out.read_bytes()
    again = ingest([june], out, append=True)
    assert out.read_bytes() == before
    assert again.meta["appended"] == {"log_messages": 6, "new_messages": 4, "duplicates": 4, "added": 0}
    assert again.meta["duplicates"] == 6  # the log's total: 2 earlier + 4 now


def test_append_keeps_the_log_ordered_by_chat_then_time(tmp_path):
    out = tmp_path / "m.jsonl"
    ingest([tg_chat(tmp_path / "z.json", [(1, 500, "Alice", "late")], chat_id=1, name="Zed")], out, me="Alice")
    ingest([tg_full(tmp_path / "full.json", {1: ("Zed", [(2, 100, "Alice", "early"), (1, 500, "Alice", "late")]),
                                            5: ("Amy", [(1, 50, "Alice", "first chat")])})], out, append=True)
    rows = log(out)
    assert [(r["chat"], r["text"]) for r in rows] == [("Amy", "first chat"), ("Zed", "early"), ("Zed", "late")]


def test_whatsapp_repeats_in_one_minute_are_counted_per_export(tmp_path):
    march = tmp_path / "WhatsApp Chat with Ben.txt"
    march.write_text("31/03/2023, 10:00 - Ben: ok\n31/03/2023, 10:00 - Ben: ok\n31/03/2023, 10:01 - Riya: k\n",
                     encoding="utf-8")
    (tmp_path / "june").mkdir()
    june = tmp_path / "june" / "WhatsApp Chat with Ben.txt"
    june.write_text("31/03/2023, 10:00 - Ben: ok\n31/03/2023, 10:00 - Ben: ok\n31/03/2023, 10:00 - Ben: ok\n"
                    "31/03/2023, 10:01 - Riya: k\n13/06/2023, 09:00 - Ben: new\n", encoding="utf-8")
    out = tmp_path / "m.jsonl"
    result = ingest([march, june], out, me="Riya")
    assert [r["text"] for r in log(out)] == ["ok", "ok", "ok", "k", "new"]  # a third "ok" arrived in June
    assert result.meta["duplicates"] == 3
    ingest([march], out, me="Riya")
    ingest([june], out, append=True)
    assert [r["text"] for r in log(out)] == ["ok", "ok", "ok", "k", "new"]


def test_append_onto_a_log_written_before_ids_were_recorded(tmp_path):
    march, june = tg_chat(tmp_path / "march.json", MARCH), tg_chat(tmp_path / "june.json", JUNE)
    out = tmp_path / "m.jsonl"
    ingest([march], out, me="Riya")
    old = [{k: v for k, v in r.items() if k not in ("id", "chat_id")} for r in log(out)]
    out.write_text("".join(json.dumps(r) + "\n" for r in old), encoding="utf-8")
    ingest([june], out, append=True)
    rows = log(out)
    assert [r["text"] for r in rows] == ["hi", "hey", "ok", "ok", "later", "bye"]  # matched by time and text
    assert {r["chat"] for r in rows} == {"Alice"}
    assert all(set(r) >= {"id", "chat_id"} for r in rows)


def test_append_errors_leave_the_log_untouched(tmp_path):
    out = tmp_path / "m.jsonl"
    with pytest.raises(ConfigError, match=r"--append: .*m\.jsonl does not exist; leave out --append"):
        ingest([tg_chat(tmp_path / "a.json", MARCH)], out, append=True)
    ingest([tg_chat(tmp_path / "a.json", MARCH)], out, me="Riya", tz="Europe/Berlin")
    before = out.read_bytes(), meta(out)
    with pytest.raises(ConfigError, match=r"--tz UTC: .* was written with --tz Europe/Berlin"):
        ingest([tg_chat(tmp_path / "b.json", JUNE)], out, append=True, tz="UTC")
    with pytest.raises(ConfigError, match=r"written without --scrub; append without it too"):
        ingest([tg_chat(tmp_path / "b.json", JUNE)], out, append=True, scrub=True)
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "X", "type": "personal_chat", "id": 1, "messages": [{"id": 1, "type": "message", ',
                   encoding="utf-8")
    with pytest.raises(IngestError, match=r"bad\.json"):
        ingest([bad], out, append=True)
    assert (out.read_bytes(), meta(out)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json", "bad.json", "m.jsonl", "m.meta.json"]
    ok = ingest([tg_chat(tmp_path / "b.json", JUNE)], out, append=True)  # no --tz: the log's zone
    assert ok.meta["tz"] == "Europe/Berlin" and ok.meta["messages"] == 6


def test_both_merge_paths_dedup_alike(tmp_path, monkeypatch):
    march = tg_chat(tmp_path / "march.json", [(i, i * 10, "Alice" if i % 2 else "Riya", f"m{i}") for i in range(20)])
    june = tg_chat(tmp_path / "june.json", [(i, i * 10, "Alice" if i % 2 else "Riya", f"m{i}") for i in range(10, 30)])
    wa = tmp_path / "WhatsApp Chat with Ben.txt"
    wa.write_text("31/03/2023, 10:00 - Ben: ok\n31/03/2023, 10:00 - Ben: ok\n", encoding="utf-8")
    outputs = []
    for path in ("merge of ordered runs", "external sort"):
        if path == "external sort":
            monkeypatch.setattr(pipeline, "MAX_MERGE_RUNS", 0)  # every unordered chat takes the external sort
            monkeypatch.setattr(pipeline, "SORT_CHUNK_LINES", 3)  # copies land in different spilled runs
        out = tmp_path / f"{path}.jsonl"
        result = ingest([june, wa, march, wa], out, me="Riya")
        assert [r["text"] for r in log(out)] == [f"m{i}" for i in range(30)] + ["ok", "ok"], path
        assert result.meta["duplicates"] == 12
        assert [f["duplicates"] for f in result.meta["files"]] == [0, 0, 10, 2]  # the later input's copies go
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


def test_discord_overlap_by_message_id(tmp_path):
    def export(path: Path, ids: range) -> Path:
        path.write_text(json.dumps({
            "guild": {"id": "1", "name": "G"}, "channel": {"id": "77", "name": "general"},
            "messages": [{"id": str(i), "type": "Default", "timestamp": f"2023-01-01T10:00:{i:02d}+00:00",
                          "content": "same text", "author": {"id": "9", "name": "tom"}} for i in ids]}),
            encoding="utf-8")
        return path

    out = tmp_path / "m.jsonl"
    result = ingest([export(tmp_path / "a.json", range(0, 6)), export(tmp_path / "b.json", range(3, 9))], out,
                    me="tom")
    assert [r["id"] for r in log(out)] == [str(i) for i in range(9)]
    assert result.meta["duplicates"] == 3


def test_group_dedup_rules():
    g = GroupDedup()
    rec = {"source": "telegram", "speaker_id": "u1", "text": "ok"}
    assert not g.is_copy(0, {**rec, "id": "1"})
    assert not g.is_copy(0, {**rec, "id": "2"})  # same text, other id: another message
    assert g.is_copy(1, {**rec, "id": "2"})  # same id
    assert g.is_copy(2, {**rec, "id": None})  # no id: first "ok" of input 2 matches the first "ok" kept
    assert g.is_copy(2, {**rec, "id": None})
    assert not g.is_copy(2, {**rec, "id": None})  # a third "ok" in input 2 is new
    assert not g.is_copy(0, {**rec, "source": "discord", "id": "1"})  # other platform


def test_chat_titles():
    t = ChatTitles()
    assert t.title("telegram", "1", "Alex") == "Alex"
    assert t.title("telegram", "2", "Alex") == "Alex (2)"
    assert t.title("telegram", "1", "Alexander") == "Alex"  # renamed later: keeps the first title
    assert t.title("whatsapp", None, "Alex") == "Alex (whatsapp)"
    assert t.title("telegram", None, "Alex") == "Alex"  # no id: joins the telegram chat of that title
    assert t.shared == {"Alex": ["Alex", "Alex (2)", "Alex (whatsapp)"]}
    old = ChatTitles()  # a log without chat ids read back first: the first chat with an id joins it, once
    assert old.title("telegram", None, "Sam") == "Sam"
    assert old.title("telegram", "7", "Sam") == "Sam"
    assert old.title("telegram", "8", "Sam") == "Sam (8)"
    assert old.title("telegram", None, "Sam") == "Sam"


def test_cli_append_prints_what_was_added(tmp_path, capsys):
    from convo.cli import run

    march, june = tg_chat(tmp_path / "march.json", MARCH), tg_chat(tmp_path / "june.json", JUNE)
    out = tmp_path / "m.jsonl"
    assert run(["ingest", str(march), str(june), "--out", str(out), "--me", "Riya"]) == 0
    assert "2 skipped (already in another input)" in capsys.readouterr().out
    assert run(["ingest", str(march), "--out", str(out), "--me", "Riya"]) == 0
    capsys.readouterr()
    assert run(["ingest", str(june), "--out", str(out), "--append"]) == 0
    shown = capsys.readouterr().out
    assert "2 new to the 4 in the log (4 read, 2 already there)" in shown
    assert len(log(out)) == 6
    assert run(["ingest", str(june), "--out", str(tmp_path / "none.jsonl"), "--append"]) == 2
    assert "does not exist; leave out --append to create it" in capsys.readouterr().err


def test_append_onto_a_damaged_log_names_the_line(tmp_path):
    out = tmp_path / "m.jsonl"
    ingest([tg_chat(tmp_path / "a.json", MARCH)], out, me="Riya")
    lines = out.read_text("utf-8").splitlines()
    lines[2] = lines[2].replace('"ts":', '"when":')
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(IngestError, match=r"m\.jsonl:3: field ts: missing; is it a log written by `convo ingest`"):
        ingest([tg_chat(tmp_path / "b.json", JUNE)], out, append=True)


def test_every_input_given_twice_gives_the_same_log(tmp_path):
    mixed = Path(__file__).parent / "fixtures" / "ingest" / "mixed"
    once, twice = tmp_path / "once.jsonl", tmp_path / "twice.jsonl"
    a = ingest([mixed], once, date_order="mdy")
    b = ingest([mixed, mixed], twice, date_order="mdy")
    assert once.read_bytes() == twice.read_bytes()
    assert b.meta["duplicates"] == a.meta["messages"] == b.meta["messages"]
    assert b.meta["speakers"] == a.meta["speakers"] and b.meta["formats"] == a.meta["formats"]
