"""The full Telegram export's streaming path: C parse in pieces cut at chat boundaries by a structure scan.

Each case runs with tiny read chunks (so every boundary, escape and key falls across chunks) and without
numpy (the regex scanner), and must give exactly what the same chats give through the single-chat path.
"""

from __future__ import annotations

import io
import json
from datetime import UTC
from pathlib import Path

import pytest

from errors import IngestError
from training.ingest import json_stream, telegram
from training.ingest.base import ParseContext
from training.ingest.json_stream import StructureScanner, read_whole_escapes
from training.ingest.telegram import PARSER

TRICKY = ['a "quoted" [x] {y}', "back\\slash\\", '\\"]}', '"messages": [', '"left_chats": {', "üñí ☕ 😂", "]]}}"]


@pytest.fixture(params=[(3, True), (7, False), (64, True), (1 << 16, True)], ids=["3B", "7B-no-numpy", "64B", "64KiB"])
def chunking(request, monkeypatch):
    size, numpy = request.param
    monkeypatch.setattr(telegram, "_CHUNK", size)
    if not numpy:
        monkeypatch.setattr(json_stream, "_np", None)


def parse(path: Path) -> tuple[list[tuple], ParseContext]:
    ctx = ParseContext(tz=UTC)
    return [(m.chat, m.speaker, m.speaker_id, m.text, m.reply_to, m.ts) for m in PARSER.parse(path, ctx)], ctx


def message(i: int, text, **extra) -> dict:
    return {"id": i, "type": "message", "date_unixtime": str(1_600_000_000 + i), "from": "Riya",
            "from_id": "user777", "text": text, **extra}


def chat(cid: int, name: str, n: int) -> dict:
    msgs = [message(cid * 100 + j, TRICKY[j % len(TRICKY)] if j % 3 else [TRICKY[j % 7], {"type": "bold",
            "text": TRICKY[(j + 1) % 7]}], text_entities=[{"type": "plain", "text": TRICKY[j % 7]}]) for j in range(n)]
    return {"name": name, "type": "personal_chat", "id": cid, "messages": msgs}


def test_full_export_equals_each_chat_parsed_alone(tmp_path, chunking):
    chats = [chat(1, "Alice", 9), chat(2, "Saved [x]", 0), chat(3, 'Bob "B"', 4)]
    left = [chat(4, "Old {group}", 5)]
    doc = {"chats": {"about": "", "list": chats}, "left_chats": {"about": "", "list": left},
           "personal_information": {"user_id": 777, "first_name": "Riya", "last_name": ""}}
    full = tmp_path / "result.json"
    full.write_text(json.dumps(doc, indent=1, ensure_ascii=False), encoding="utf-8")
    got, ctx = parse(full)
    expected = []
    for c in chats + left:
        single = tmp_path / f"chat{c['id']}.json"
        single.write_text(json.dumps(c, ensure_ascii=True), encoding="utf-8")
        expected += parse(single)[0]
    assert got == expected and len(got) == 18
    assert ctx.me_hints == {"user777", "Riya"}


def test_keys_with_escapes_fields_after_messages_and_two_message_lists(tmp_path, chunking):
    raw = ('{"left\\u005fchats": {"list": [{"messages": [' + json.dumps(message(1, "one")) + '],'
           ' "name": "Late", "mess\\u0061ges": [' + json.dumps(message(2, "two")) + ']}]},'
           ' "chats": {"list": [{"name": "N", "messages": {"item": ' + json.dumps(message(3, "map")) + '},'
           ' "extra": {"messages": [' + json.dumps(message(4, "nested")) + ']}}]}}')
    p = tmp_path / "result.json"
    p.write_text(raw, encoding="utf-8")
    got, _ = parse(p)
    # The first list comes before the chat's name (so the chat is titled by its type/id, here the file
    # stem); the second list after it. A `messages` object and a nested `messages` list are not messages.
    assert [(c, t) for c, _, _, t, _, _ in got] == [("result", "one"), ("Late", "two")]


def test_a_non_object_last_message_is_an_error(tmp_path, chunking):
    p = tmp_path / "result.json"
    p.write_text('{"chats": {"list": [{"name": "A", "messages": [' + json.dumps(message(1, "x")) + ", 1]}]}}")
    with pytest.raises(IngestError, match=r"message #2 of chat 'A' is not a JSON object"):
        parse(p)


def test_truncated_full_export_names_line_and_byte(tmp_path, chunking):
    text = json.dumps({"chats": {"list": [chat(1, "Alice", 6)]}}, indent=1)
    p = tmp_path / "result.json"
    p.write_text(text[:-40])
    with pytest.raises(IngestError, match=rf"result.json:\d+ \(byte {len(text) - 40}\): file ends in the middle"):
        parse(p)


@pytest.mark.parametrize("numpy", [True, False])
def test_structure_scanner_skips_strings_across_chunks(monkeypatch, numpy):
    if not numpy:
        monkeypatch.setattr(json_stream, "_np", None)
    doc = b'{"a": "[{\\"}", "b": [{"c": "\\\\"}, [[]]], "d": {}}'
    scanner, reader = StructureScanner(2), io.BytesIO(doc)
    found, base = [], 0
    while chunk := read_whole_escapes(reader, 3):  # 3 bytes or a little more, never ending inside an escape
        assert not chunk.endswith(b"\\")
        found += [(base + at, opens, depth) for at, opens, depth in scanner.scan(chunk)]
        base += len(chunk)
    assert [(doc[at:at + 1], opens, depth) for at, opens, depth in found] == [
        (b"{", True, 1), (b"[", True, 2), (b"]", False, 2), (b"{", True, 2), (b"}", False, 2), (b"}", False, 1)]
