"""Attribution ("whose reply is this") and the marker error in `convo eval`, on the tiny base.

The log: Alice (the persona, chitchat text rewritten with the planted `lowkey` style) and three other people
(chitchat text as written) all talking with Bob, the owner; the candidates are Alice, Bob and the three others.
"""

import json
from datetime import UTC, datetime, timedelta

import pytest

from convo.cli import run
from training.dataset import build_dataset
from training.evaluate import attribution as A
from training.evaluate.planted import get_style
from training.ingest.records import Message

pytestmark = pytest.mark.slow
OTHERS = ("Carol", "Dave", "Erin")


@pytest.fixture(scope="module")
def log_and_data(tmp_path_factory):
    """messages.jsonl (Alice planted, three others natural, all with Bob) and Alice's friend-mode dataset."""
    chitchat_dataset = pytest.importorskip("chitchat_dataset")
    data = chitchat_dataset.Dataset()
    convs = [data[k]["messages"] for k in sorted(data)[:240]]
    style = get_style("lowkey")
    people = ("Alice", *OTHERS)
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    lines = []
    for n, blocks in enumerate(convs):
        friend = people[n % len(people)]
        first = blocks[0][0]["sender"]
        t = t0 + timedelta(hours=3 * n)
        for block in blocks:
            mine = block[0]["sender"] != first  # the second sender is the friend, the first Bob
            texts = [m["text"] for m in block]
            if mine and friend == "Alice":
                texts = style.rewrite(texts, seed=0)
            for text in texts:
                t += timedelta(seconds=30)
                who = friend if mine else "Bob"
                lines.append(Message(chat=f"{friend}-bob", ts=t, speaker=who, speaker_id=who.lower(), text=text,
                                     source="jsonl").to_json())
    root = tmp_path_factory.mktemp("attr")
    log = root / "messages.jsonl"
    log.write_text("\n".join(lines) + "\n", encoding="utf-8")
    build_dataset(log, "Alice", root / "data", mode="friend", me="Bob", val_fraction=0.2)
    return log, root / "data"


def test_real_replies_attributed_above_chance(log_and_data):
    from training.evaluate.data import load_meta, read_samples

    log, data_dir = log_and_data
    meta = load_meta(data_dir)
    train = read_samples(data_dir / "train.jsonl")
    val = read_samples(data_dir / "val.jsonl")
    own = [s.reply() for s in train if s.target == meta["persona"]["tag"]]
    held_out = [s.reply() for s in val if s.target == meta["persona"]["tag"]]
    att = A.build_attributor(log, "alice", "Alice", own)
    assert not isinstance(att, str), att
    assert att.candidates[0] == "Alice" and set(att.candidates) == {"Alice", "Bob", *OTHERS}
    assert att.chance == pytest.approx(1 / 5)
    acc = A.accuracy(A.per_prompt_hits(att, [[r] for r in held_out]))
    assert acc > 0.6  # chance 0.2: the planted habits give Alice away
    others = A.log_replies(log, {"alice", "bob"})[0]
    carol = [r for r in others["carol"]][:60]
    assert A.accuracy(A.per_prompt_hits(att, [[r] for r in carol])) < 0.2  # Carol's replies are not Alice's


def test_too_few_candidates_is_a_reason_not_a_crash(log_and_data, tmp_path):
    log, _ = log_and_data
    two = tmp_path / "two.jsonl"
    two.write_text("".join(line + "\n" for line in log.read_text().splitlines()
                           if json.loads(line)["speaker_id"] in ("alice", "bob")))
    got = A.build_attributor(two, "alice", "Alice", [["hi"], ["yo"], ["ok"]])
    assert isinstance(got, str) and "need 3" in got
    assert "--attribution-log" in A.build_attributor(None, "alice", "Alice", [["hi"]])


def test_eval_has_marker_and_attribution_columns(tiny_base, log_and_data, tmp_path, capsys):
    import torch

    torch.set_num_threads(1)
    _, data_dir = log_and_data
    out = tmp_path / "ev"
    args = ["eval", "--base", str(tiny_base), "--data", str(data_dir), "--out", str(out), "--max-prompts", "5",
            "--n", "1", "--max-new-tokens", "5", "--context-budget", "32", "--methods", "base,incontext"]
    code = run(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "attribution: 5 candidates" in captured.out and "marker error" in captured.out
    m = json.loads((out / "metrics.json").read_text())
    att = m["attribution"]
    assert att["skipped"] is None and att["chance"] == pytest.approx(0.2)
    assert att["real"] > att["chance"]  # the persona's real held-out replies are attributed to it above chance
    for res in m["methods"].values():
        assert 0 <= res["attribution"] <= 1 and 0 <= res["marker_error"] <= 1
        assert set(res["intervals"]) >= {"marker_error", "attribution"}
    assert m["real"]["markers"]["lowercase"] == 1.0  # lowkey: all lowercase
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert all(set(g["attribution"]) == {"base", "incontext", "(real)"} for g in gens)
    report = (out / "report.html").read_text()
    assert "Whose reply is this" in report and 'id="markers"' in report and "marker error" in report
    # --json prints the same object
    assert run([*args[:-1], "base", "--max-prompts", "2", "--json", "--out", str(tmp_path / "j")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["attribution"]["candidates"] == att["candidates"] and "marker_error" in printed["methods"]["base"]


def test_eval_skips_attribution_with_a_reason(tiny_base, log_and_data, tmp_path, capsys):
    log, data_dir = log_and_data
    two = tmp_path / "two.jsonl"
    two.write_text("".join(line + "\n" for line in log.read_text().splitlines()
                           if json.loads(line)["speaker_id"] in ("alice", "bob")))
    out = tmp_path / "ev"
    code = run(["eval", "--base", str(tiny_base), "--data", str(data_dir), "--out", str(out), "--max-prompts", "2",
                "--n", "1", "--max-new-tokens", "4", "--methods", "base", "--attribution-log", str(two)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "attribution skipped: 2 candidate(s)" in captured.out.replace("\n", " ")
    m = json.loads((out / "metrics.json").read_text())
    assert m["attribution"]["skipped"] and "attribution" not in m["methods"]["base"]
    assert "marker_error" in m["methods"]["base"]
    assert run(["eval", "--base", str(tiny_base), "--data", str(data_dir), "--methods", "base",
                "--attribution-log", str(tmp_path / "nope.jsonl")]) == 2
    assert "--attribution-log" in capsys.readouterr().err


def test_one_person_with_two_speaker_ids_is_one_candidate(log_and_data, tmp_path):
    """The owner exported from Telegram (an id) and WhatsApp (a name): one person, so one candidate, not two."""
    log, _ = log_and_data
    lines = log.read_text(encoding="utf-8").splitlines()
    twice = tmp_path / "twice.jsonl"
    renamed = []
    for n, line in enumerate(lines):
        rec = json.loads(line)
        if rec["speaker_id"] == "bob" and n % 2:
            rec["speaker_id"] = "user1001"  # half of Bob's lines under his other id
        renamed.append(json.dumps(rec))
    twice.write_text("\n".join(renamed) + "\n", encoding="utf-8")
    own = [[json.loads(line)["text"]] for line in lines if json.loads(line)["speaker_id"] == "alice"][:200]
    split = A.build_attributor(twice, "alice", "Alice", own)
    merged = A.build_attributor(twice, "alice", "Alice", own, person_of={"bob": "BOB", "user1001": "BOB"})
    assert not isinstance(split, str) and not isinstance(merged, str)
    assert len(split.candidates) == 6  # without the mapping: Bob counted twice
    assert sorted(merged.candidates) == sorted(["Alice", "Bob", *OTHERS]) and merged.chance == pytest.approx(1 / 5)
