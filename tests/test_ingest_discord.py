"""DiscordChatExporter JSON: kept and skipped message types, nicknames, replies, exact output."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from errors import IngestError
from tests.conftest import FIXTURES
from training.ingest.base import HEAD_BYTES, ParseContext
from training.ingest.discord_export import PARSER

DC = FIXTURES / "ingest" / "discord"


def parse(path: Path, tz=UTC) -> tuple[list, ParseContext]:
    ctx = ParseContext(tz=tz)
    return list(PARSER.parse(path, ctx)), ctx


def test_channel_quirks():
    msgs, ctx = parse(DC / "general.json")
    assert [(m.chat, m.speaker, m.speaker_id, m.text, m.reply_to) for m in msgs] == [
        ("Board Games / general", "Tom", "111", "anyone up for catan tonight?", None),  # nickname preferred
        ("Board Games / general", "riya.k", "222", "yes!! 8pm?", "900000000000000002"),  # Reply, nickname null
        ("Board Games / general", "Alice S.", "333", "bringing snacks\nand the expansion 🎲", None),  # text+file
        ("Board Games / general", "riya.k", "222", "see you all at 8", None),
    ]
    assert [m.ts for m in msgs] == [
        datetime(2023, 4, 1, 18, 0, 0, 123000, tzinfo=UTC),
        datetime(2023, 4, 1, 18, 1, 10, tzinfo=UTC),
        datetime(2023, 4, 1, 18, 3, tzinfo=UTC),
        datetime(2023, 4, 1, 18, 6, tzinfo=UTC),
    ]
    assert msgs[-1].ts.utcoffset() == timedelta(hours=2)  # the exported offset is kept
    assert all(m.source == "discord" for m in msgs)
    # join, pin, call -> system; attachment-only and sticker-only -> media_only; blank content -> empty
    assert ctx.skipped == {"system": 3, "media_only": 2, "empty": 1}


def test_chitchat_channel_matches_corpus():
    msgs, ctx = parse(DC / "chitchat_channel.json")
    expected = [json.loads(line) for line in (DC / "chitchat_channel.expected.jsonl").open(encoding="utf-8")]
    assert len(msgs) == len(expected) > 100
    for m, e in zip(msgs, expected, strict=True):
        assert (m.chat, m.speaker, m.speaker_id, m.text, m.reply_to) == (
            e["chat"], e["speaker"], e["speaker_id"], e["text"], e["reply_to"])
        assert m.ts == datetime.fromisoformat(e["ts"])
    assert ctx.skipped == {"system": 4, "media_only": 4}


def test_direct_messages_title_and_zoneless_timestamp(tmp_path):
    p = tmp_path / "dm.json"
    p.write_text(json.dumps({
        "guild": {"id": "0", "name": "Direct Messages"},
        "channel": {"id": "5", "type": "DirectTextChat", "name": "alice"},
        "messages": [{"id": "1", "type": "Default", "timestamp": "2022-05-01T10:00:00", "content": "yo",
                      "author": {"id": "9", "name": "alice"}}],
    }))
    msgs, _ = parse(p, tz=timezone(timedelta(hours=3)))
    assert [(m.chat, m.speaker, m.text, m.ts.isoformat()) for m in msgs] == [
        ("Direct Messages / alice", "alice", "yo", "2022-05-01T10:00:00+03:00")]


def test_sniff():
    for name in ("general.json", "chitchat_channel.json"):
        p = DC / name
        assert PARSER.sniff(p, p.read_bytes()[:HEAD_BYTES])
    tg = FIXTURES / "ingest" / "telegram" / "single_chat.json"
    assert not PARSER.sniff(tg, tg.read_bytes()[:HEAD_BYTES])
    assert not PARSER.sniff(Path("x.jsonl"), b'{"chat": "a", "guild": 1}\n')


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", r"empty file"),
        (b'{"guild": {"name": "g"}, "channel": {"name": "c"}}', r"no `messages` list"),
        (b'{"guild": {}, "channel": {}, "messages": [{"type": "Default", "content": "a", "author": {"id": "1", '
         b'"name": "x"}, "timestamp": "2020-01-01T00:00:00+00:00"}, {"type": "Def', r"ends in the middle"),
        (b'{"guild": {}, "channel": {}, "messages": [{"type": "Default", "content": "a"}]}', r"no `author`"),
        (b'{"guild": {}, "channel": {}, "messages": [{"type": "Default", "content": "a", "author": {"id": "1"}}]}',
         r"no `name`"),
        (b'{"guild": {}, "channel": {}, "messages": [{"content": "a", "author": {"name": "x"}, "timestamp": "x"}]}',
         r"message #1 .*Invalid isoformat"),
        (b'{"guild": {}, "channel": {}, "messages": [{"content": ["a"], "author": {"name": "x"}}]}',
         r"`content` is a list"),
        (b'{"guild": {}, "channel": {}, "messages": [null]}', r"message #1 is not a JSON object"),
        (b'\xff\xfe{\x00"\x00', r"(lexical error|not UTF-8|parse error)"),
    ],
)
def test_bad_input_is_one_ingest_error(tmp_path, content, match):
    p = tmp_path / "channel.json"
    p.write_bytes(content)
    with pytest.raises(IngestError, match=match) as info:
        parse(p)
    assert str(p) in str(info.value) and "\n" not in str(info.value)
