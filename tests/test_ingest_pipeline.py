"""`convo ingest` end to end: detection, folders, ordering, "me", the sidecar, atomic output, CLI errors."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from convo.cli import run
from errors import ConfigError, IngestError
from tests.conftest import FIXTURES
from training.ingest import pipeline
from training.ingest.pipeline import ingest, load_parsers, meta_path_for

ING = FIXTURES / "ingest"
MIXED = ING / "mixed"


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open(encoding="utf-8")]


def test_all_four_parsers_are_found():
    assert list(load_parsers()) == ["telegram", "discord", "whatsapp", "jsonl"]


def test_mixed_folder_exact_log_and_meta(tmp_path):
    out = tmp_path / "messages.jsonl"
    result = ingest([MIXED], out, date_order="mdy")  # the WhatsApp file's dates (5/1/23) fit both orders
    log = read_log(out)
    assert [list(r) for r in log] == [["chat", "ts", "speaker", "speaker_id", "text", "reply_to", "source", "id",
                                         "chat_id"]] * 11
    assert [(r["chat"], r["speaker"], r["text"], r["source"]) for r in log] == [
        ("Alice Smith", "Alice Smith", "lunch?", "telegram"),
        ("Alice Smith", "Riya", "yes, 12:30", "telegram"),
        ("Alice Smith", "Riya", "from my notes: bring the book", "telegram"),  # from the JSONL, merged by time
        ("Alice Smith", "Alice Smith", "here", "telegram"),
        ("Ben", "Ben", "you free tomorrow?", "whatsapp"),
        ("Ben", "Riya", "after work\nyes", "whatsapp"),
        ("Board Games / general", "Tom", "game night?", "discord"),
        ("Board Games / general", "Riya", "in!", "discord"),
        ("Imported", "Riya", "first", "jsonl"),
        ("Imported", "Riya", "third (08:00 UTC, same instant as first)", "jsonl"),  # tie keeps file order
        ("Imported", "Carla", "second", "jsonl"),
    ]
    assert log[7]["reply_to"] == "10" and log[7]["speaker_id"] == "222"
    meta = json.loads((tmp_path / "messages.meta.json").read_text())
    assert result.meta_path == tmp_path / "messages.meta.json" == meta_path_for(out)
    assert meta["me"] == {"name": "Riya", "id": "Riya", "ids": ["222", "Riya", "user777"],
                          "how": "name present in every chat"}
    assert meta["chats"] == 4 and meta["messages"] == 11
    assert meta["formats"] == {"discord": 2, "jsonl": 4, "telegram": 3, "whatsapp": 2}
    assert meta["skipped"]["system"] >= 1 and meta["skipped"]["media_only"] == 1
    assert meta["date_range"] == {"first": "2023-04-30T08:00:00+00:00", "last": "2023-05-02T18:01:00+00:00"}
    assert {"name": "Riya", "id": "user777", "count": 2} in meta["speakers"]
    assert meta["scrubbed"] is None
    assert [Path(f["path"]).name for f in meta["files"]] == [
        "general.json", "WhatsApp Chat with Ben.txt", "imported.jsonl", "result.json"]
    warned = " ".join(result.warnings)
    assert "notes.md: unknown format" in warned and "empty.txt: empty file" in warned
    assert ".hidden.json" not in warned
    assert sorted(p.name for p in tmp_path.iterdir()) == ["messages.jsonl", "messages.meta.json"]  # no temp left


def test_full_export_gives_me_and_sorts_chats_by_title(tmp_path):
    out = tmp_path / "log.jsonl"
    result = ingest([ING / "telegram" / "full_export.json"], out)
    assert result.meta["me"] == {"name": "Riya", "id": "user777", "ids": ["user777"],
                                 "how": "telegram personal_information"}
    assert [r["chat"] for r in read_log(out)] == ["Alice Smith"] * 2 + ["Saved Messages"] + ["Weekend Crew"] * 3
    assert (tmp_path / "log.meta.json").is_file()


def test_me_by_option_and_errors(tmp_path):
    single = ING / "telegram" / "single_chat.json"
    out = tmp_path / "m.jsonl"
    with pytest.raises(IngestError, match=r"cannot tell which speaker is you.*--me.*Alice Smith \(id user4242, 4 msgs\)"):
        ingest([single], out)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert ingest([single], out, me="user4242").meta["me"]["name"] == "Alice Smith"
    assert ingest([single], out, me="riya").meta["me"] == {"name": "Riya", "id": "user777", "ids": ["user777"],
                                                           "how": "--me"}
    with pytest.raises(IngestError, match=r"--me 'Zed': no speaker.*Riya \(id user777"):
        ingest([single], out, me="Zed")


def test_out_of_order_chat_is_sorted_with_bounded_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "SORT_CHUNK_LINES", 7)  # force several spilled runs and a k-way merge
    rng = random.Random(3)
    start = datetime(2023, 1, 1, tzinfo=UTC)
    rows = []
    for i in range(60):
        chat = rng.choice(["b", "a", "c"])
        rows.append({"chat": chat, "ts": (start + timedelta(minutes=rng.randint(0, 30))).isoformat(),
                     "speaker": "me" if i % 2 else f"friend-{chat}", "text": f"m{i}"})
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    ingest([src], out)
    got = [(r["chat"], r["text"]) for r in read_log(out)]
    expected = sorted(rows, key=lambda r: (r["chat"], datetime.fromisoformat(r["ts"])))  # stable: file order on ties
    assert got == [(r["chat"], r["text"]) for r in expected]


def test_failure_leaves_previous_out_untouched(tmp_path):
    out = tmp_path / "messages.jsonl"
    out.write_text("previous log\n")
    bad = tmp_path / "in" / "result.json"
    bad.parent.mkdir()
    src = (ING / "telegram" / "chitchat_full_export.json").read_bytes()
    bad.write_bytes(src[: len(src) - 500])
    with pytest.raises(IngestError, match=r"file ends in the middle"):
        ingest([ING / "discord" / "general.json", bad], out, me="Tom")
    assert out.read_text() == "previous log\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "messages.jsonl"]


def test_scrub_replaces_and_counts(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(
        json.dumps({"chat": "c", "ts": "2023-01-01T00:00:00+00:00", "speaker": "me",
                    "text": "mail me at riya@example.com or see https://example.com/x"}) + "\n"
    )
    out = tmp_path / "out.jsonl"
    result = ingest([src], out, scrub=True)
    assert read_log(out)[0]["text"] == "mail me at <EMAIL> or see <URL>"
    assert result.meta["scrubbed"] == {"email": 1, "url": 1}


def test_tz_option_applies_to_zoneless_exports(tmp_path):
    out = tmp_path / "out.jsonl"
    ingest([MIXED / "sub" / "WhatsApp Chat with Ben.txt"], out, tz="+05:30", me="Riya", date_order="mdy")
    assert read_log(out)[0]["ts"] == "2023-05-01T21:01:00+05:30"
    with pytest.raises(ConfigError, match=r"--tz 'Mars/Base'.*IANA"):
        ingest([MIXED / "sub" / "WhatsApp Chat with Ben.txt"], out, tz="Mars/Base")


def test_explicit_unknown_binary_or_missing_file_is_an_error(tmp_path):
    out = tmp_path / "out.jsonl"
    binary = tmp_path / "photo.jpg"
    binary.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" * 10)
    with pytest.raises(IngestError, match=r"photo.jpg: binary file"):
        ingest([binary], out)
    with pytest.raises(IngestError, match=r"notes.md: unknown format; expected one of telegram"):
        ingest([MIXED / "notes.md"], out)
    with pytest.raises(IngestError, match=r"nope.json: no such file"):
        ingest([tmp_path / "nope.json"], out)


def test_forced_format_parses_or_fails_cleanly(tmp_path):
    out = tmp_path / "out.jsonl"
    ingest([ING / "discord" / "general.json"], out, fmt="discord", me="Tom")
    assert len(read_log(out)) == 4
    with pytest.raises(IngestError, match=r"general.json: no messages with text found \(skipped: service 10\)"):
        ingest([ING / "discord" / "general.json"], out, fmt="telegram", me="Tom")


def test_rerun_on_folder_holding_its_own_output_skips_it(tmp_path):
    folder = tmp_path / "exports"
    folder.mkdir()
    (folder / "result.json").write_bytes((ING / "telegram" / "full_export.json").read_bytes())
    out = folder / "messages.jsonl"
    first = ingest([folder], out)
    second = ingest([folder], out)
    assert first.meta["messages"] == second.meta["messages"] == 6


def test_cli_success_prints_summary_with_paths(tmp_path, capsys):
    out = tmp_path / "log.jsonl"
    code = run(["ingest", str(MIXED), "--out", str(out), "--tz", "UTC", "--date-order", "mdy"])
    captured = capsys.readouterr()
    assert code == 0
    flat = "".join(line.strip("│ ") for line in captured.out.splitlines())
    assert "11 in 4 chats" in captured.out and str(tmp_path / "log.meta.json") in flat
    assert "notes.md" in captured.err
    assert len(read_log(out)) == 11


def test_cli_me_from_settings_env(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CONVO_INGEST__ME", "Alice Smith")
    monkeypatch.chdir(tmp_path)
    assert run(["ingest", str(ING / "telegram" / "single_chat.json")]) == 0  # --out from settings
    meta = json.loads((tmp_path / "messages.meta.json").read_text())
    assert meta["me"]["id"] == "user4242"


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: d / "missing.json", "no such file"),
        (lambda d: (d / "t.json").write_bytes(b'{"name": "x", "type": "personal_chat", "messages": [{') and d / "t.json",
         "file ends in the middle"),
        (lambda d: (d / "b.bin").write_bytes(b"\x00\x01\x02") and d / "b.bin", "binary file"),
        (lambda d: (d / "e.json").write_bytes(b"") or d / "e.json", "empty file"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, make, match):
    path = make(tmp_path)
    out = tmp_path / "out.jsonl"
    code = run(["ingest", str(path), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert match in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and path.name in err
    assert not out.exists()


def test_cli_bad_options_exit_2(tmp_path, capsys):
    src = str(ING / "discord" / "general.json")
    assert run(["ingest", src, "--out", str(tmp_path / "o.jsonl"), "--tz", "Nowhere/Else"]) == 2
    assert "--tz" in capsys.readouterr().err
    assert run(["ingest", src, "--out", str(tmp_path / "o.jsonl"), "--format", "csv"]) == 2
    assert "--format 'csv'" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert run(["ingest", src, "--out", str(tmp_path / "file" / "o.jsonl")]) == 2
    assert "cannot create folder" in capsys.readouterr().err
    assert run(["ingest", src, "--out", str(tmp_path / "new" / "o.jsonl"), "--me", "222"]) == 0  # folders made
    assert (tmp_path / "new" / "o.jsonl").is_file()


def test_cli_help_explains_options(capsys):
    assert run(["ingest", "--help"]) == 0
    out = capsys.readouterr().out
    for opt in ("--out", "--format", "--me", "--tz", "--scrub"):
        assert opt in out


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_ingest", Path(__file__).parents[1] / "bench" / "ingest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["telegram", "telegram-full", "discord"])
def test_memory_does_not_grow_with_the_export(tmp_path, kind):
    """Peak Python allocations are the same for a 4x bigger export: messages are streamed, not loaded."""
    import tracemalloc

    bench = _bench_module()
    peaks, sizes = [], []
    for n in (3_000, 12_000):
        src = tmp_path / f"export{n}.json"
        if kind == "discord":
            bench.write_discord(src, n)
        else:
            bench.write_telegram(src, n, chats=1 if kind == "telegram" else 7)
        sizes.append(src.stat().st_size)
        tracemalloc.start()
        try:
            result = ingest([src], tmp_path / "out.jsonl", me="222" if kind == "discord" else "user777")
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert result.meta["messages"] > 0.9 * n
    assert sizes[1] > 3.9 * sizes[0]
    assert peaks[1] < 1.25 * peaks[0] + 256 * 1024, (peaks, sizes)
    assert peaks[1] < sizes[1] / 2, (peaks, sizes)


def test_log_quoting_an_export_is_still_read_as_jsonl(tmp_path):
    text = '{"guild": {}, "channel": {}, "messages": [], "from_id": "user1", "chats": {}}'
    src = tmp_path / "log.jsonl"
    src.write_text(json.dumps({"chat": "c", "ts": "2023-01-01T00:00:00+00:00", "speaker": "me", "speaker_id": "me",
                               "text": text, "reply_to": None, "source": "telegram"}) + "\n")
    head = src.read_bytes()
    assert [name for name, p in load_parsers().items() if p.sniff(src, head)] == ["jsonl"]
    result = ingest([src], tmp_path / "out.jsonl")
    assert result.meta["formats"] == {"jsonl": 1} and read_log(tmp_path / "out.jsonl")[0]["text"] == text


def test_lone_surrogate_is_an_ingest_error_not_a_crash(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"chat": "c", "ts": "2023-01-01T00:00:00+00:00", "speaker": "me", "text": "bad \\ud800 text"}\n')
    out = tmp_path / "out.jsonl"
    with pytest.raises(IngestError, match=r"in.jsonl: message of 'me' .* not valid Unicode"):
        ingest([src], out)
    assert not out.exists()


def test_parsed_messages_equal_validated_ones():
    """The JSON parsers build Messages without re-validation; they must be exactly what validation gives."""
    from datetime import UTC

    from training.ingest.base import ParseContext
    from training.ingest.records import Message

    for name, fixture in (("telegram", "telegram/full_export.json"), ("telegram", "telegram/single_chat.json"),
                          ("discord", "discord/general.json")):
        for msg in load_parsers()[name].parse(ING / fixture, ParseContext(tz=UTC)):
            again = Message.model_validate(msg.model_dump())
            assert again == msg and again.to_json() == msg.to_json()
            assert Message.model_validate_json(msg.to_json()) == msg
