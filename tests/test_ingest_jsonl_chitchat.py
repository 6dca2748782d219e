"""A larger JSONL fixture converted from chitchat-dataset (real conversations), parsed exactly."""

from __future__ import annotations

import json
from datetime import UTC

from tests.conftest import FIXTURES
from training.ingest.base import ParseContext
from training.ingest.jsonl import PARSER

JL = FIXTURES / "ingest" / "jsonl"


def test_chitchat_jsonl_parses_to_the_exact_speakers_texts_and_order():
    path = JL / "chitchat_signal.jsonl"
    assert PARSER.sniff(path, path.read_bytes()[:65536])
    ctx = ParseContext(tz=UTC)
    got = [json.loads(m.to_json()) for m in PARSER.parse(path, ctx)]
    expected = json.loads((JL / "chitchat_signal.expected.json").read_text(encoding="utf-8"))
    for row in got:  # pydantic writes UTC as "Z"; compare instants
        row["ts"] = row["ts"].replace("Z", "+00:00")
        assert row.pop("id") is None and row.pop("chat_id") is None  # JSONL records without ids
    assert len(got) == len(expected) > 100
    assert got == expected
    assert {r["speaker"] for r in got} == {"Kai", "Mina"}
