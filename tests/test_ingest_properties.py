"""Property tests: random and mutated inputs to every parser (and the pipeline); only IngestError may escape."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from errors import ConvoError, IngestError
from tests.conftest import FIXTURES
from training.ingest.base import HEAD_BYTES, ParseContext
from training.ingest.pipeline import ingest, load_parsers
from training.ingest.records import Message

PARSERS = load_parsers()
SEEDS = sorted(
    p for p in (FIXTURES / "ingest").rglob("*")
    if p.is_file() and p.suffix in (".json", ".txt", ".jsonl") and "expected" not in p.name
    and p.stat().st_size < 20_000
)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="convo-props-") as d:
        yield Path(d)


def check_every_parser(path: Path) -> None:
    """Sniff and parse `path` with every parser; anything but IngestError fails the test."""
    head = path.read_bytes()[:HEAD_BYTES]
    for parser in PARSERS.values():
        assert isinstance(parser.sniff(path, head), bool)
        ctx = ParseContext(tz=UTC)
        try:
            for msg in parser.parse(path, ctx):
                assert isinstance(msg, Message)
                assert msg.ts.utcoffset() is not None
                msg.to_json()
        except IngestError as e:
            assert str(path) in str(e), f"{parser.name}: error does not name the file: {e}"


def test_seed_fixtures_exist():
    names = {p.parent.name for p in SEEDS}
    assert {"telegram", "discord", "whatsapp", "jsonl", "mixed"} <= names
    assert set(PARSERS) == {"telegram", "discord", "whatsapp", "jsonl"}


@SETTINGS
@given(data=st.binary(max_size=2000), suffix=st.sampled_from([".json", ".txt", ".jsonl"]))
def test_random_bytes(workdir, data, suffix):
    path = workdir / f"random{suffix}"
    path.write_bytes(data)
    check_every_parser(path)


@st.composite
def mutated(draw) -> tuple[Path, bytes]:
    seed = draw(st.sampled_from(SEEDS))
    data = bytearray(seed.read_bytes())
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "delete", "insert", "replace", "duplicate", "swap"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        j = min(len(data), i + draw(st.integers(0, 64)))
        if kind == "truncate":
            del data[i:]
        elif kind == "delete":
            del data[i:j]
        elif kind == "insert":
            data[i:i] = draw(st.sampled_from([b"{", b"}", b"[", b"]", b'"', b",", b":", b"null", b"\n", b"\x00",
                                              b"\xff", b"-", b"1e999", "\u200e".encode(), b'"text": 5, ']))
        elif kind == "replace":
            data[i:j] = draw(st.binary(max_size=8))
        elif kind == "duplicate":
            data[i:i] = data[i:j]
        else:
            data[i:j] = bytes(reversed(data[i:j]))
    return seed, bytes(data)


@SETTINGS
@given(case=mutated())
def test_mutated_fixtures(workdir, case):
    seed, data = case
    path = workdir / seed.name
    path.write_bytes(data)
    check_every_parser(path)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
TG_KEYS = ["id", "type", "date", "date_unixtime", "from", "from_id", "text", "text_entities", "photo", "file",
           "media_type", "sticker_emoji", "reply_to_message_id", "forwarded_from", "edited"]
DC_KEYS = ["id", "type", "timestamp", "content", "author", "attachments", "stickers", "embeds", "reference"]


def message(keys: list[str], typical: dict) -> st.SearchStrategy:
    """Dicts using the format's keys with either a typical value or an arbitrary JSON value."""
    return st.dictionaries(
        st.sampled_from(keys),
        st.deferred(lambda: JSON_VALUES),
        max_size=len(keys),
    ).flatmap(lambda d: st.fixed_dictionaries({k: st.just(v) for k, v in typical.items()}).map(lambda t: {**t, **d}))


TG_TYPICAL = {"id": 1, "type": "message", "date_unixtime": "1600000000", "from": "A", "from_id": "user1", "text": "x"}
DC_TYPICAL = {"type": "Default", "timestamp": "2020-01-01T00:00:00+00:00", "content": "x",
              "author": {"id": "1", "name": "a"}}


@SETTINGS
@given(
    msgs=st.lists(message(TG_KEYS, TG_TYPICAL) | JSON_VALUES, max_size=4),
    full=st.booleans(),
    header=st.dictionaries(st.sampled_from(["name", "type", "id"]), JSON_VALUES, max_size=3),
)
def test_structured_telegram(workdir, msgs, full, header):
    chat = {**header, "messages": msgs}
    doc = {"personal_information": {"user_id": 1}, "chats": {"list": [chat]}} if full else chat
    path = workdir / "result.json"
    path.write_text(json.dumps(doc))
    check_every_parser(path)


@SETTINGS
@given(
    msgs=st.lists(message(DC_KEYS, DC_TYPICAL) | JSON_VALUES, max_size=4),
    guild=JSON_VALUES,
    channel=JSON_VALUES,
)
def test_structured_discord(workdir, msgs, guild, channel):
    path = workdir / "channel.json"
    path.write_text(json.dumps({"guild": guild, "channel": channel, "messages": msgs}))
    check_every_parser(path)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=mutated(), me=st.sampled_from([None, "Riya", "user777"]))
def test_pipeline_only_raises_convo_errors(workdir, case, me):
    seed, data = case
    folder = workdir / "pipeline-in"
    folder.mkdir(exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    (folder / seed.name).write_bytes(data)
    out = workdir / "out.jsonl"
    try:
        result = ingest([folder], out, me=me)
    except ConvoError:
        return
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == result.meta["messages"]
    for line in lines:
        Message.model_validate_json(line)
