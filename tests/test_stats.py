"""`convo stats`: per chat and speaker numbers, as a table and as JSON, and clear errors on bad logs."""

from __future__ import annotations

import json
import re

import pytest

from convo.cli import run
from tests.conftest import FIXTURES
from training.stats import EMOJI_RE, SpeakerStats, compute_stats

LOG = FIXTURES / "ingest" / "jsonl" / "stats_log.jsonl"

EXPECTED = {
    "file": str(LOG),
    "messages": 9,
    "chats": [
        {
            "chat": "Alice",
            "messages": 7,
            "speakers": [
                {
                    "speaker": "Riya", "speaker_id": "Riya", "messages": 4, "words": 12, "median_words": 2.5,
                    "burst_share": 0.75,  # alone once, then a run of three
                    "first": "2023-01-01T10:02:00+00:00", "last": "2023-01-02T08:02:00+00:00",
                    "top_emoji": [{"emoji": "👍🏽", "count": 1}, {"emoji": "❤️", "count": 1},
                                  {"emoji": "👩‍💻", "count": 1}],
                },
                {
                    "speaker": "Alice", "speaker_id": "Alice", "messages": 3, "words": 5, "median_words": 2.0,
                    "burst_share": 0.6667,  # a run of two, then alone
                    "first": "2023-01-01T10:00:00+00:00", "last": "2023-01-01T10:03:00+00:00",
                    "top_emoji": [{"emoji": "😂", "count": 2}],
                },
            ],
        },
        {
            "chat": "Team",
            "messages": 2,
            "speakers": [
                {
                    # one id, renamed midway: counted once under the latest name
                    "speaker": "Nora B", "speaker_id": "u1", "messages": 2, "words": 2, "median_words": 1.0,
                    "burst_share": 1.0,
                    "first": "2023-02-01T09:00:00+01:00", "last": "2023-02-01T09:05:00+01:00",
                    "top_emoji": [],
                },
            ],
        },
    ],
}


def test_compute_stats_exact_numbers():
    assert compute_stats(LOG) == EXPECTED


def test_cli_json(capsys):
    assert run(["stats", str(LOG), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == EXPECTED


def test_cli_table(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    assert run(["stats", str(LOG)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    riya = next(line for line in lines if "Riya" in line)
    for cell in ("Alice", "4", "12", "2.5", "75%", "2023-01-01 → 01-02", "👍🏽×1 ❤️×1 👩‍💻×1"):
        assert cell in riya
    nora = next(line for line in lines if "Nora B" in line)
    assert "Team" in nora and "100%" in nora
    assert "9 messages in 2 chats" in out


def test_interleaved_chats_keep_separate_runs(tmp_path):
    rows = [("a", "X"), ("b", "X"), ("a", "X"), ("b", "Y"), ("a", "Y")]
    path = tmp_path / "log.jsonl"
    path.write_text(
        "".join(
            json.dumps({"chat": c, "ts": f"2023-01-01T00:0{i}:00Z", "speaker": s, "speaker_id": s, "text": "hi",
                        "reply_to": None, "source": "jsonl"}) + "\n"
            for i, (c, s) in enumerate(rows)
        )
    )
    by_chat = {c["chat"]: {s["speaker"]: s["burst_share"] for s in c["speakers"]} for c in compute_stats(path)["chats"]}
    assert by_chat == {"a": {"X": 1.0, "Y": 0.0}, "b": {"X": 0.0, "Y": 0.0}}


def test_median_from_histogram():
    s = SpeakerStats(speaker="x")
    for n in (1, 9, 3, 3, 100):
        s.messages += 1
        s.length_hist[n] += 1
    assert s.median_words() == 3
    s.messages += 1
    s.length_hist[4] += 1
    assert s.median_words() == 3.5


def test_emoji_regex_counts_sequences_once():
    assert EMOJI_RE.findall("🇩🇪 ok 👩‍👩‍👧 1️⃣ ☕ a:b 😂😂") == ["🇩🇪", "👩‍👩‍👧", "1️⃣", "☕", "😂", "😂"]
    assert EMOJI_RE.findall("plain text, 12:30 #1 *") == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", r"log\.jsonl:1: no messages"),
        ('{"chat": "a"', r"log\.jsonl:1: invalid JSON"),
        (LOG.read_text("utf-8").splitlines()[0] + "\n" + '{"chat": "a", "ts": "soon", "speaker": "x", '
         '"speaker_id": "x", "text": "t", "reply_to": null, "source": "jsonl"}\n', r"log\.jsonl:2: field ts: "),
    ],
)
def test_bad_logs_exit_2_with_file_and_line(tmp_path, capsys, content, message):
    path = tmp_path / "log.jsonl"
    path.write_text(content, encoding="utf-8")
    assert run(["stats", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(message, " ".join(err.split())), err


def test_missing_file_exits_2(tmp_path, capsys):
    assert run(["stats", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl: no such file" in " ".join(capsys.readouterr().err.split())


def test_help_explains_options(capsys):
    assert run(["stats", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--json" in out and "convo ingest" in out
