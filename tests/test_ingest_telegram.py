"""Telegram Desktop JSON: single-chat result.json and full account export, every quirk, exact output."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from errors import IngestError
from tests.conftest import FIXTURES
from training.ingest.base import HEAD_BYTES, ParseContext
from training.ingest.pipeline import ingest
from training.ingest.telegram import PARSER

TG = FIXTURES / "ingest" / "telegram"


def parse(path: Path, tz=UTC) -> tuple[list, ParseContext]:
    ctx = ParseContext(tz=tz)
    return list(PARSER.parse(path, ctx)), ctx


def rows(msgs) -> list[tuple]:
    return [(m.chat, m.speaker, m.speaker_id, m.text, m.reply_to) for m in msgs]


def test_single_chat_quirks():
    msgs, ctx = parse(TG / "single_chat.json")
    assert rows(msgs) == [
        ("Alice Smith", "Alice Smith", "user4242", "hey, are we still on for tonight?", None),
        # text list of strings and entity objects (bold, link) joined; reply id kept as a string
        ("Alice Smith", "Riya", "user777", "yes! see you at https://maps.example.com/x 🙌", "101"),
        ("Alice Smith", "Alice Smith", "user4242", "😂", None),  # sticker -> its emoji
        ("Alice Smith", "Riya", "user777", "running 10 min late sorry", None),  # edited: kept
        ("Alice Smith", "Alice Smith", "user4242", "cats sleep 16 hours a day", None),  # forwarded: kept
        ("Alice Smith", "Alice Smith", "user4242", "look at this\nsecond line", None),  # photo with caption
    ]
    assert [m.ts for m in msgs][:2] == [
        datetime(2023, 3, 1, 10, 0, tzinfo=UTC),
        datetime(2023, 3, 1, 10, 1, 30, tzinfo=UTC),
    ]
    assert all(m.source == "telegram" for m in msgs)
    # service call, photo / voice / video without text
    assert ctx.skipped == {"service": 1, "media_only": 3}
    assert ctx.me_hints == set()


def test_unix_time_is_shown_in_tz():
    msgs, _ = parse(TG / "single_chat.json", tz=ZoneInfo("Europe/Berlin"))
    assert msgs[0].ts.isoformat() == "2023-03-01T11:00:00+01:00"
    assert msgs[0].ts == datetime(2023, 3, 1, 10, 0, tzinfo=UTC)


def test_old_export_without_unixtime_reads_local_date_in_tz(tmp_path):
    p = tmp_path / "result.json"
    p.write_text(json.dumps({"name": "Old", "type": "personal_chat", "id": 1, "messages": [
        {"id": 1, "type": "message", "date": "2019-07-01T08:30:00", "from": "A", "from_id": 5, "text": "hi"}]}))
    msgs, _ = parse(p, tz=timezone(timedelta(hours=-4)))
    assert msgs[0].ts.isoformat() == "2019-07-01T08:30:00-04:00"
    assert msgs[0].speaker_id == "5"


def test_full_export_chats_saved_messages_groups_and_me():
    msgs, ctx = parse(TG / "full_export.json")
    assert rows(msgs) == [
        ("Saved Messages", "Riya", "user777", "note to self: buy milk", None),
        ("Weekend Crew", "Bob", "user888", "who's driving?", None),
        ("Weekend Crew", "Riya", "user777", "me, @bob bring snacks", "11"),
        ("Weekend Crew", "Deleted Account", "user999", "ok", None),  # from: null
        ("Alice Smith", "Alice Smith", "user4242", "morning!", None),
        ("Alice Smith", "Riya", "user777", "☀️", None),
    ]
    assert ctx.skipped == {"service": 1}
    assert ctx.me_hints == {"user777", "Riya"}


def test_full_export_with_left_chats_and_personal_information_last(tmp_path):
    export = {
        "chats": {"about": "", "list": [{"name": "A", "type": "personal_chat", "id": 1, "messages": [
            {"id": 1, "type": "message", "date_unixtime": "1600000000", "from": "A", "from_id": "user1",
             "text": "one", "extra": {"nested": [1, {"deep": "x"}]}}]}]},
        "left_chats": {"about": "", "list": [{"name": "Old group", "type": "private_supergroup", "id": 2,
                                              "messages": [{"id": 7, "type": "message", "date_unixtime": "1500000000",
                                                            "from": "Me", "from_id": "user9", "text": "bye"}]}]},
        "personal_information": {"user_id": 9, "first_name": "Me", "last_name": "Too"},
    }
    p = tmp_path / "result.json"
    p.write_text(json.dumps(export))
    assert PARSER.sniff(p, p.read_bytes()[:HEAD_BYTES])
    msgs, ctx = parse(p)
    assert [(m.chat, m.text) for m in msgs] == [("A", "one"), ("Old group", "bye")]
    assert ctx.me_hints == {"user9", "Me Too"}


def test_full_export_keeps_two_chats_with_one_name_apart(tmp_path):
    def chat(cid, text, mid=1):
        return {"name": "Alex", "type": "personal_chat", "id": cid, "messages": [
            {"id": mid, "type": "message", "date_unixtime": "1600000000", "from": "Alex", "from_id": f"user{cid}",
             "text": text}]}

    p = tmp_path / "result.json"
    p.write_text(json.dumps({"chats": {"list": [chat(1, "a"), chat(2, "b"), chat(1, "c", 2)]}}))
    msgs, _ = parse(p)
    assert [(m.chat, m.chat_id, m.id, m.text) for m in msgs] == [
        ("Alex", "1", "1", "a"), ("Alex", "2", "1", "b"), ("Alex", "1", "2", "c")]
    result = ingest([p], tmp_path / "log.jsonl", me="Alex")  # the pipeline gives each chat its own title
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["chat"], r["text"]) for r in log] == [("Alex", "a"), ("Alex", "c"), ("Alex (2)", "b")]
    assert result.meta["shared_titles"] == {"Alex": ["Alex", "Alex (2)"]}
    assert "2 different chats are titled 'Alex'" in " ".join(result.warnings)


def test_chitchat_full_export_matches_corpus():
    msgs, ctx = parse(TG / "chitchat_full_export.json")
    expected = [json.loads(line) for line in (TG / "chitchat_full_export.expected.jsonl").open(encoding="utf-8")]
    assert len(msgs) == len(expected) > 250
    for m, e in zip(msgs, expected, strict=True):
        assert (m.chat, m.speaker, m.speaker_id, m.text, m.reply_to) == (
            e["chat"], e["speaker"], e["speaker_id"], e["text"], e["reply_to"])
        assert m.ts == datetime.fromisoformat(e["ts"])
    assert ctx.skipped == {"service": 5, "media_only": 5}
    assert "user777" in ctx.me_hints


def test_sniff():
    for name in ("single_chat.json", "full_export.json", "chitchat_full_export.json"):
        p = TG / name
        assert PARSER.sniff(p, p.read_bytes()[:HEAD_BYTES]), name
    disc = FIXTURES / "ingest" / "discord" / "general.json"
    assert not PARSER.sniff(disc, disc.read_bytes()[:HEAD_BYTES])
    assert not PARSER.sniff(Path("x.json"), b'{"messages": [1, 2]}')
    assert not PARSER.sniff(Path("x.txt"), b"12/31/21, 9:05 PM - Alice: hi")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", r"empty file"),
        (b"[1, 2]", r":1 \(byte 0\): expected a Telegram .* found a JSON array"),
        (b'{"name": "x", "type": "personal_chat"}', r"no `messages` list"),
        (b'{"name": "x", "messages": [{"id": 1, "type": "message", "date_unixtime": "1", "text": "a"}, {"id": 2,',
         r"file ends in the middle of the JSON.*truncated"),
        (b'{"name": "x",\n "messages": [\n  {"id": 1 "type": "message"}]}', r":3 \(byte \d+\): parse error"),
        (b'{"name": "x", "messages": [{"id": 1, "type": "message", "text": "a"}]}', r"message #1 .*no `date"),
        (b'{"name": "x", "messages": [{"id": 1, "date_unixtime": "1", "text": 5}]}', r"message #1 .*`text` is a int"),
        (b'{"name": "x", "messages": [3]}', r"message #1 .* not a JSON object"),
        (b'{"chats": {"list": [{"name": "c", "messages": [{"id": 1, "date_unixtime": "soon", "text": "a"}]}]}}',
         r"message #1 \(id 1\) of chat 'c'"),
    ],
)
def test_bad_input_is_one_ingest_error(tmp_path, content, match):
    p = tmp_path / "result.json"
    p.write_bytes(content)
    with pytest.raises(IngestError, match=match) as info:
        parse(p)
    assert str(p) in str(info.value) and "\n" not in str(info.value)


def test_truncated_big_file_names_byte_offset(tmp_path):
    src = (TG / "chitchat_full_export.json").read_bytes()
    p = tmp_path / "result.json"
    p.write_bytes(src[: len(src) // 2])
    with pytest.raises(IngestError, match=rf"\(byte {len(src) // 2}\): file ends in the middle"):
        parse(p)


def test_syntax_error_offset_is_exact(tmp_path):
    src = (TG / "chitchat_full_export.json").read_bytes()
    cut = src.index(b'"from_id"', len(src) // 2)
    bad = src[:cut] + b"@" + src[cut:]
    p = tmp_path / "result.json"
    p.write_bytes(bad)
    line = bad[:cut].count(b"\n") + 1
    with pytest.raises(IngestError, match=rf"result.json:{line} \(byte {cut}\): lexical error"):
        parse(p)
