"""JSONL import in the canonical schema: defaults, kept sources, and one clear error per bad line."""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from errors import IngestError
from tests.conftest import FIXTURES
from training.ingest.base import HEAD_BYTES, ParseContext
from training.ingest.jsonl import PARSER, read_messages

JL = FIXTURES / "ingest" / "jsonl"


def test_records_keep_their_source_and_get_defaults():
    ctx = ParseContext(tz=timezone(timedelta(hours=2)))
    msgs = list(PARSER.parse(JL / "mixed_sources.jsonl", ctx))
    assert [{k: v for k, v in json.loads(m.to_json()).items() if k not in ("id", "chat_id")} for m in msgs] == [
        {"chat": "Team", "ts": "2023-03-01T09:00:00+01:00", "speaker": "Nora", "speaker_id": "u1",
         "text": "standup in 5", "reply_to": None, "source": "discord"},
        {"chat": "Team", "ts": "2023-03-01T09:01:30+01:00", "speaker": "Riya", "speaker_id": "u2",
         "text": "omw ☕", "reply_to": "m1", "source": "telegram"},
        # no zone: read in ctx.tz; no speaker_id: the name; no source: "jsonl"
        {"chat": "Signal: Mum", "ts": "2023-03-02T18:00:00+02:00", "speaker": "Mum", "speaker_id": "Mum",
         "text": "dinner sunday?", "reply_to": None, "source": "jsonl"},
        {"chat": "Signal: Mum", "ts": "2023-03-02T18:05:00Z", "speaker": "Riya", "speaker_id": "+447700900123",
         "text": "yes!\nbringing cake", "reply_to": None, "source": "jsonl"},
    ]
    assert ctx.skipped == {"empty": 1}


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("bad_json.jsonl", r"bad_json\.jsonl:2: invalid JSON at column \d+"),
        ("bad_field.jsonl", r"bad_field\.jsonl:2: field ts: "),
        ("bad_source.jsonl", r"bad_source\.jsonl:1: field source: "),
        ("extra_key.jsonl", r"extra_key\.jsonl:1: field likes: unknown key"),
        ("not_object.jsonl", r"not_object\.jsonl:1: expected a JSON object"),
    ],
)
def test_bad_lines_name_file_line_and_field(name, message):
    with pytest.raises(IngestError, match=message):
        list(PARSER.parse(JL / name, ParseContext(tz=UTC)))


def test_missing_field_is_named(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"chat": "a", "ts": "2023-01-01T00:00:00Z", "speaker": "x"}\n')
    with pytest.raises(IngestError, match=r"m\.jsonl:1: field text: missing"):
        list(PARSER.parse(path, ParseContext(tz=UTC)))


def test_empty_file_and_non_utf8(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_bytes(b"\n")
    with pytest.raises(IngestError, match=r"e\.jsonl:1: empty file"):
        list(PARSER.parse(empty, ParseContext(tz=UTC)))
    bad = tmp_path / "b.jsonl"
    good = b'{"chat": "a", "ts": "2023-01-01T00:00:00Z", "speaker": "x", "text": "ok"}\n'
    bad.write_bytes(good + b'{"chat": "\xff"}\n')
    with pytest.raises(IngestError, match=rf"b\.jsonl: byte offset {len(good) + 10} \(line 2\): not UTF-8"):
        list(PARSER.parse(bad, ParseContext(tz=UTC)))


def test_read_messages_is_strict_about_zones(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text(
        '{"chat": "a", "ts": "2023-01-01T00:00:00", "speaker": "x", "speaker_id": "x", "text": "ok", '
        '"reply_to": null, "source": "jsonl"}\n'
    )
    with pytest.raises(IngestError, match=r"log\.jsonl:1: field ts: .*UTC offset"):
        list(read_messages(path))


def test_sniff():
    assert PARSER.sniff(JL / "mixed_sources.jsonl", (JL / "mixed_sources.jsonl").read_bytes()[:HEAD_BYTES])
    assert not PARSER.sniff(Path("r.json"), b'{"name": "x", "type": "personal_chat", "messages": [')
    assert not PARSER.sniff(Path("a.txt"), b"01/02/2021, 10:00 - A: hi\n")
    assert not PARSER.sniff(Path("a.jsonl"), b"")


_json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
    max_leaves=6,
)
_record = st.fixed_dictionaries(
    {},
    optional={
        "chat": st.text(max_size=8) | _json_value,
        "ts": st.sampled_from(["2023-01-01T00:00:00Z", "2023-01-01T00:00", "2023-13-01", "9999-12-31T23:59:59-23:00",
                               "0001-01-01T00:00:00+01:00"]) | _json_value,
        "speaker": st.text(max_size=8),
        "speaker_id": st.text(max_size=8) | _json_value,
        "text": st.text(max_size=8) | _json_value,
        "reply_to": st.none() | st.text(max_size=4) | _json_value,
        "source": st.sampled_from(["jsonl", "telegram", "whatsapp", "x"]),
        "extra": _json_value,
    },
)
_line = st.one_of(
    _record.map(json.dumps),
    _record.map(json.dumps).map(lambda s: s[: len(s) // 2]),
    st.text(max_size=20),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(_line, max_size=6), junk=st.binary(max_size=4), where=st.integers(0, 300))
def test_random_and_mutated_input_raises_only_ingest_error(lines, junk, where):
    data = "\n".join(lines).encode("utf-8")
    data = data[:where] + junk + data[where:]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.jsonl"
        path.write_bytes(data)
        PARSER.sniff(path, data[:HEAD_BYTES])
        for reader in (lambda: list(PARSER.parse(path, ParseContext(tz=UTC))), lambda: list(read_messages(path))):
            try:
                reader()
            except IngestError as e:
                assert str(path) in str(e)
