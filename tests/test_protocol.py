"""The wire format: bounds name the field, round trips are exact, key names share one prefix."""

from __future__ import annotations

import pytest

from errors import ProtocolError
from inference.protocol import (
    MAX_N,
    FeedbackEvent,
    GenerateRequest,
    GenerateResponse,
    Keys,
    Partial,
    entry_data,
    entry_payload,
)


def test_request_round_trip():
    req = GenerateRequest.with_timeout(5, persona="alice", history=[{"speaker": "RIYA", "text": "you coming?"}], n=2)
    back = GenerateRequest.loads(entry_data(entry_payload(req)))
    assert back == req and back.deadline is not None and not back.expired()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"persona": "alice", "n": MAX_N + 1}, "n"),
        ({"persona": "alice", "max_new_tokens": 1000}, "max_new_tokens"),
        ({"persona": "a b"}, "persona"),
        ({"persona": "alice", "history": [{"speaker": "X", "text": "x" * 5000}]}, "history.0.text"),
        ({"persona": "alice", "history": [{"speaker": "X", "text": "hi"}] * 65}, "history"),
        ({"persona": "alice", "v": 99}, "v"),
    ],
)
def test_bounds_name_the_field(fields, field):
    with pytest.raises(ProtocolError, match=rf"GenerateRequest\.{field}:"):
        GenerateRequest.build(**fields)


def test_malformed_json_is_protocol_error():
    with pytest.raises(ProtocolError):
        GenerateRequest.loads("{not json")
    with pytest.raises(ProtocolError, match="no 'data' field"):
        entry_data({b"other": b"x"})


def test_response_has_candidates_or_error():
    ok = GenerateResponse(id="1", candidates=[["hi", "there"]])
    assert ok.ok
    bad = GenerateResponse.failure("1", "unknown_persona", "no adapter named bob")
    assert not bad.ok and GenerateResponse.loads(bad.dumps()).error.code == "unknown_persona"
    with pytest.raises(ProtocolError):
        GenerateResponse.loads({"id": "1", "candidates": [["x"]], "error": {"code": "internal", "message": "m"}})


def test_feedback_edited_needs_text():
    with pytest.raises(ProtocolError, match="final_text"):
        FeedbackEvent.build(kind="edited", draft_id="d1", persona="alice")
    assert FeedbackEvent.build(kind="liked", draft_id="d1", persona="alice").kind == "liked"


def test_keys_share_prefix():
    keys = Keys("test7")
    names = [keys.requests, keys.dead, keys.feedback, keys.reload, keys.reply("r"), keys.partial("r"),
             keys.heartbeat("w"), keys.draft("d"), keys.history("telegram", "1"), keys.consent("discord", "2")]
    assert all(n.startswith("test7:") for n in names) and len(set(names)) == len(names)
    with pytest.raises(ProtocolError):
        Keys("bad prefix")
    assert Partial(id="1", text="he").seq == 0
