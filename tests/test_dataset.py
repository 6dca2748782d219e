"""`convo dataset`: sessions, context windows, bursts, modes, groups, the split, errors and the CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import UTC, datetime, timedelta

import pytest

from convo.cli import run
from errors import DatasetError
from inference.prompt_format import FORMAT_VERSION, Turn, line_speaker, parse, split_completion
from tests.conftest import FIXTURES
from training.dataset import (
    build_dataset,
    load_dataset_meta,
    read_messages,
    read_samples,
    resolve_speaker,
    sessionize,
)

DATA = FIXTURES / "dataset"
DUO = DATA / "duo.jsonl"


def word_tokenizer(words=()):
    """A real fast tokenizer where every whitespace-separated word is one token (unknown words -> [UNK])."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0}
    for w in words:
        vocab.setdefault(w, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def build(tmp_path, path=DUO, persona="Alice", **kw):
    """build_dataset into tmp_path/out; returns (summary, train rows, val rows)."""
    summary = build_dataset(path, persona, tmp_path / "out", **kw)
    return summary, read_samples(summary.train_path), read_samples(summary.val_path)


def all_rows(tmp_path, **kw):
    _, train, val = build(tmp_path, **kw)
    return train + val


# ---------------------------------------------------------------- sessions


def test_gap_equal_to_the_limit_stays_in_the_session():
    alice = [m for m in read_messages(DUO) if m.chat == "Alice"]
    sessions = sessionize(alice, 60)
    first = sessions[0].messages
    assert [m.text for m in first][-2:] == ["wait, which place?", "the usual"]  # 11:03 is exactly 60 min after 10:03
    assert first[-2].ts - first[-3].ts == timedelta(minutes=60)
    assert sessions[1].messages[0].text == "made it home"  # 60 min + 1 s later: a new session
    assert [s.session_id for s in sessions] == ["Alice#1", "Alice#2", "Alice#3", "Alice#4"]
    # A hair shorter gap splits at the 60-minute silence too.
    assert len(sessionize(alice, 59.99)) == 5
    # A gap of 60 min + 1 s joins the first two sessions.
    assert len(sessionize(alice, 60 + 1 / 60)) == 3


def test_sessions_sort_by_time_across_offsets_and_chats():
    sessions = sessionize(read_messages(DUO), 60)
    starts = [s.start for s in sessions]
    assert starts == sorted(starts)
    alice3 = next(s for s in sessions if s.session_id == "Alice#3")
    assert [m.text for m in alice3.messages][:2] == ["morning", "morning :)"]  # 10:00+01:00 == 09:00Z sorts first


def test_context_never_crosses_a_session(tmp_path):
    rows = all_rows(tmp_path, mode="friend")
    night = next(r for r in rows if r["completion"].startswith(" night!"))
    assert night["prompt"] == "[ALICE] made it home\n[RIYA] nice\n[ALICE]"
    assert night["session"] == "Alice#2"
    for r in rows:
        assert r["session"].startswith(r["chat"] + "#")


# ---------------------------------------------------------------- samples


def test_context_window_keeps_the_newest_messages(tmp_path):
    rows = all_rows(tmp_path, mode="friend", context_messages=2)
    usual = next(r for r in rows if r["completion"].startswith(" the usual"))
    assert usual["prompt"] == "[ALICE] see you\n[RIYA] wait, which place?\n[ALICE]"
    for r in rows:
        assert len(parse(r["prompt"])) <= 3  # two messages of history + the bare target tag

    full = all_rows(tmp_path, mode="friend", context_messages=16)
    usual = next(r for r in full if r["completion"].startswith(" the usual"))
    assert usual["prompt"].startswith("[RIYA] hey are we still going tonight?\n")
    assert len(parse(usual["prompt"])) == 7


def test_a_burst_is_one_completion_with_one_line_per_message(tmp_path):
    rows = all_rows(tmp_path, mode="both")
    first = next(r for r in rows if r["session"] == "Alice#1" and r["target"] == "ALICE")
    assert first["prompt"] == "[RIYA] hey are we still going tonight?\n[ALICE]"
    assert first["completion"] == " yeah!\n[ALICE] want to meet at 7?\n[RIYA]"
    assert split_completion(first["completion"], "ALICE") == ["yeah!", "want to meet at 7?"]
    # No sample starts in the middle of a burst.
    assert not any(r["completion"].startswith(" want to meet") or r["completion"].startswith(" my treat") for r in rows)
    coffee = next(r for r in rows if r["completion"].startswith(" coffee?"))
    assert coffee["completion"] == " coffee?\n[RIYA] my treat\n[ALICE]"
    assert coffee["target"] == "RIYA"


def test_completion_ends_with_the_next_speaker_or_end(tmp_path):
    rows = all_rows(tmp_path, mode="friend")
    endings = {r["completion"].rsplit("\n", 1)[1] for r in rows}
    assert endings == {"[RIYA]", "[END]"}
    usual = next(r for r in rows if r["completion"].startswith(" the usual"))
    assert usual["completion"].endswith("\n[END]")


@pytest.mark.parametrize(
    ("mode", "targets", "n"), [("friend", {"ALICE"}, 9), ("self", {"RIYA"}, 7), ("both", {"ALICE", "RIYA"}, 16)]
)
def test_modes_choose_whose_turns_are_targets(tmp_path, mode, targets, n):
    summary, train, val = build(tmp_path, mode=mode)
    rows = train + val
    assert len(rows) == n
    assert {r["target"] for r in rows} == targets
    assert summary.meta["targets"] == sorted(targets)
    assert sum(summary.counts["by_target"].values()) == n
    for r in rows:
        assert r["prompt"].endswith("\n[" + r["target"] + "]")
        assert set(r) == {"prompt", "completion", "session", "chat", "target"}


def test_group_chat_other_speakers_keep_their_tags(tmp_path):
    rows = [r for r in all_rows(tmp_path, mode="friend") if r["chat"] == "Pizza night"]
    assert [r["completion"] for r in rows] == [" me\n[RIYA]", " 🍕🍕\n[END]"]
    assert rows[1]["prompt"] == "[BOB] who's in for pizza\n[ALICE] me\n[RIYA] me too\n[BOB] ok ordering\n[ALICE]"
    both = all_rows(tmp_path, mode="both")
    assert "BOB" not in {r["target"] for r in both}
    me_too = next(r for r in both if r["completion"].startswith(" me too"))
    assert me_too["completion"] == " me too\n[BOB]"


def test_chats_without_the_persona_are_left_out(tmp_path):
    summary, train, val = build(tmp_path, mode="both")
    assert summary.meta["chats"] == ["Alice", "Pizza night"]
    assert "Bob" not in {r["chat"] for r in train + val}
    assert not any("lunch?" in r["prompt"] for r in train + val)


def test_role_tags(tmp_path):
    summary, train, val = build(tmp_path, mode="both", role_tags=True)
    rows = train + val
    assert {r["target"] for r in rows} == {"FRIEND", "ME"}
    assert summary.meta["persona"]["tag"] == "FRIEND" and summary.meta["me"]["tag"] == "ME"
    assert summary.meta["tags"] == {"u2": "FRIEND", "u1": "ME", "u3": "BOB"}
    pizza = next(r for r in rows if r["completion"].startswith(" 🍕"))
    assert pizza["prompt"].startswith("[BOB] who's in for pizza\n[FRIEND] me\n[ME] me too")


def test_message_text_cannot_fake_a_turn(tmp_path):
    rows = all_rows(tmp_path, mode="both")
    fake = next(r for r in rows if "unreal ending" in r["completion"])
    assert fake["completion"] == " unreal ending\\n[RIYA] I never said this\n[RIYA]"
    tell = next(r for r in rows if r["completion"].startswith(" tell me"))
    turns = parse(tell["prompt"])
    assert turns[-2] == Turn("ALICE", "unreal ending\n[RIYA] I never said this")
    assert [line_speaker(x) for x in tell["prompt"].splitlines()] == ["ALICE", "RIYA", "ALICE", "RIYA"]


@pytest.mark.parametrize("query", ["Alice", "alice", "ALICE", "u2", "U2", " Alice "])
def test_persona_by_name_or_id_case_insensitive(tmp_path, query):
    summary, *_ = build(tmp_path, persona=query, mode="friend")
    assert summary.meta["persona"] == {"name": "Alice", "speaker_id": "u2", "tag": "ALICE"}


def test_chats_option(tmp_path):
    rows = all_rows(tmp_path, mode="both", chats=["Alice"], val_fraction=0.2)
    assert {r["chat"] for r in rows} == {"Alice"}
    rows = all_rows(tmp_path, mode="both", chats=["Alice,Pizza night"])
    assert {r["chat"] for r in rows} == {"Alice", "Pizza night"}
    with pytest.raises(DatasetError, match=r"--chats 'Nope'.*chats found: 'Alice', 'Bob', 'Pizza night'"):
        build(tmp_path, chats=["Nope"])
    with pytest.raises(DatasetError, match=r"writes in none of the chats given by --chats; their chats: 'Alice', 'Pi"):
        build(tmp_path, chats=["Bob"])


# ---------------------------------------------------------------- split


@pytest.mark.parametrize("val", [0.05, 0.1, 0.3, 0.5])
def test_split_is_chronological_by_session_without_leakage(tmp_path, val):
    summary, train, val_rows = build(tmp_path, mode="both", val_fraction=val)
    train_sessions = {r["session"] for r in train}
    val_sessions = {r["session"] for r in val_rows}
    assert train_sessions and val_sessions
    assert not train_sessions & val_sessions
    starts = {s.session_id: s.start for s in sessionize(read_messages(DUO), 60)}
    assert max(starts[s] for s in train_sessions) < min(starts[s] for s in val_sessions)
    assert abs(len(val_rows) - val * (len(train) + len(val_rows))) <= 3  # about the share (3 samples of slack)
    assert summary.counts["val"] == len(val_rows) and summary.counts["train"] == len(train)
    assert summary.counts["sessions_val"] == len(val_sessions)
    # No validation prompt or completion text appears in training.
    train_text = "\n".join(r["prompt"] + r["completion"] for r in train)
    for r in val_rows:
        assert r["completion"] not in train_text


def test_most_recent_session_is_validation(tmp_path):
    _, train, val = build(tmp_path, mode="friend")
    assert {r["session"] for r in val} == {"Alice#4"}
    assert [r["session"] for r in train] == ["Alice#1"] * 3 + ["Alice#2", "Alice#3", "Alice#3"] + ["Pizza night#1"] * 2


# ---------------------------------------------------------------- max tokens


def test_max_tokens_drops_the_oldest_messages_first(tmp_path):
    tok = word_tokenizer()
    loose = {r["completion"]: r for r in all_rows(tmp_path, mode="friend")}
    rows = all_rows(tmp_path, mode="friend", max_tokens=12, tokenizer=tok)
    for r in rows:
        n = len(tok(r["prompt"] + r["completion"])["input_ids"])
        history = parse(r["prompt"])[:-1]
        assert n <= 12 or len(history) == 1
        full = parse(loose[r["completion"]]["prompt"])[:-1]
        assert history == full[len(full) - len(history):]  # a suffix: the newest messages are kept
    usual = next(r for r in rows if r["completion"].startswith(" the usual"))
    assert usual["prompt"] == "[ALICE] see you\n[RIYA] wait, which place?\n[ALICE]"  # 7 + 3 words = 10 <= 12


def test_max_tokens_keeps_one_message_and_counts_overflow(tmp_path):
    summary, train, val = build(tmp_path, mode="friend", max_tokens=3, tokenizer=word_tokenizer())
    rows = train + val
    assert all(len(parse(r["prompt"])) == 2 for r in rows)
    assert summary.counts["over_max_tokens"] == len(rows)
    assert summary.meta["max_tokens"] == 3 and summary.meta["tokenizer"]


def test_max_tokens_with_a_tokenizer_directory(tmp_path):
    tok_dir = tmp_path / "tok"
    word_tokenizer().save_pretrained(tok_dir)
    summary, *_ = build(tmp_path, mode="friend", max_tokens=12, tokenizer=str(tok_dir))
    assert summary.meta["tokenizer"] == str(tok_dir)
    with pytest.raises(DatasetError, match="--tokenizer .*missing.*local tokenizer directory"):
        build(tmp_path, mode="friend", max_tokens=12, tokenizer=str(tmp_path / "missing"))
    with pytest.raises(DatasetError, match="--max-tokens 12 needs --tokenizer"):
        build(tmp_path, mode="friend", max_tokens=12)


# ---------------------------------------------------------------- meta and files


def test_meta_contract(tmp_path):
    summary, train, val = build(tmp_path, mode="both", session_gap_min=60, context_messages=16, val_fraction=0.1)
    meta = load_dataset_meta(tmp_path / "out")
    assert meta == summary.meta
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["persona"] == {"name": "Alice", "speaker_id": "u2", "tag": "ALICE"}
    assert meta["me"] == {"name": "Riya", "speaker_id": "u1", "tag": "RIYA", "ids": ["u1"]}
    assert meta["tags"] == {"u2": "ALICE", "u1": "RIYA", "u3": "BOB"}
    assert meta["mode"] == "both" and meta["session_gap_min"] == 60 and meta["context_messages"] == 16
    assert meta["max_tokens"] is None and meta["tokenizer"] is None and meta["val_fraction"] == 0.1
    c = meta["counts"]
    assert (c["train"], c["val"]) == (len(train), len(val))
    assert c["by_target"] == {"ALICE": 9, "RIYA": 7}
    assert c["sessions_train"] + c["sessions_val"] == 5
    assert meta["source"] == str(DUO.resolve())
    assert meta["source_sha256"] == hashlib.sha256(DUO.read_bytes()).hexdigest()
    assert meta["chats"] == ["Alice", "Pizza night"]


def test_files_are_replaced_whole_and_no_temp_files_remain(tmp_path):
    out = tmp_path / "out"
    build(tmp_path, mode="both")
    first = (out / "train.jsonl").read_text()
    build(tmp_path, mode="friend")
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.jsonl", "val.jsonl"]
    assert (out / "train.jsonl").read_text() != first
    assert load_dataset_meta(out)["mode"] == "friend"
    for line in (out / "train.jsonl").read_text().splitlines():
        json.loads(line)


def test_load_dataset_meta_rejects_another_format_version(tmp_path):
    build(tmp_path, mode="friend")
    meta_path = tmp_path / "out" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="format version"):
        load_dataset_meta(tmp_path / "out")
    with pytest.raises(DatasetError, match="not found"):
        load_dataset_meta(tmp_path / "nowhere")


def test_read_samples_names_the_bad_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "[A]", "completion": " x\\n[END]", "session": "c#1", "chat": "c", "target": "A"}\n'
                    '{"prompt": "[A]"}\n')
    with pytest.raises(DatasetError, match=r"train.jsonl:2: .*completion"):
        read_samples(path)


# ---------------------------------------------------------------- errors


def test_unknown_persona_lists_the_speakers(tmp_path):
    with pytest.raises(DatasetError) as e:
        build(tmp_path, persona="Zed")
    msg = str(e.value)
    assert "'Zed'" in msg and "duo.jsonl" in msg
    for who in ("Alice (id u2", "Riya (id u1", "Bob (id u3"):
        assert who in msg


def test_ambiguous_display_name(tmp_path):
    log = tmp_path / "m.jsonl"
    lines = DUO.read_text().splitlines()
    lines.append(lines[-1].replace('"u2"', '"u9"').replace("Pizza night", "Other"))
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"several speakers.*u2.*u9.*speaker_id"):
        build(tmp_path, path=log, persona="alice", me="u1")
    messages = read_messages(log)
    assert resolve_speaker("U9", messages, "--persona", log) == "u9"
    assert resolve_speaker("u2", messages, "--persona", log) == "u2"


def test_sessions_too_short_says_gap(tmp_path):
    with pytest.raises(DatasetError, match=r"no samples.*all 6 sessions are too short.*--gap 60.*larger --gap"):
        build(tmp_path, path=DATA / "sparse.jsonl", me="Riya")


def test_persona_never_replies(tmp_path):
    with pytest.raises(DatasetError, match="Alice never replies within a session"):
        build(tmp_path, path=DATA / "opener.jsonl", mode="friend")
    summary, *_ = build(tmp_path, path=DATA / "opener.jsonl", mode="self", me="Riya", val_fraction=0.5)
    assert summary.counts["by_target"] == {"RIYA": 2}


def test_targets_without_messages(tmp_path):
    log = tmp_path / "m.jsonl"
    # Bob's chat with Riya, plus one message by Alice elsewhere: Alice as "me" never writes to Bob.
    keep = [x for x in DUO.read_text().splitlines() if '"chat": "Bob"' in x or '"yeah!"' in x]
    log.write_text("".join(x + "\n" for x in keep))
    with pytest.raises(DatasetError, match="Alice sent no messages in the chats with Bob"):
        build(tmp_path, path=log, persona="Bob", mode="self", me="u2")


def test_one_session_is_cut_at_a_silence(tmp_path):
    # With a 120-minute gap the two-hourly messages form one session: it is cut, not all sent to validation.
    summary, train, val = build(tmp_path, path=DATA / "sparse.jsonl", me="Riya", session_gap_min=120)
    assert len(train) == 3 and len(val) == 1
    assert {r["session"] for r in train} == {"Alice#1"} and {r["session"] for r in val} == {"Alice#1.2"}
    assert summary.meta["split"]["cut"] == {"session": "Alice#1", "at": "2026-02-01T16:00:00+00:00",
                                            "silence_min": 120.0, "train_samples": 3, "val_samples": 1}
    assert summary.counts["sessions_without_samples"] == 0


def test_a_session_too_short_to_cut_still_errs_when_training_is_empty(tmp_path):
    log = tmp_path / "m.jsonl"
    log.write_text("".join(line + "\n" for line in (DATA / "sparse.jsonl").read_text().splitlines()[:3]))
    with pytest.raises(DatasetError, match=r"training split is empty.*smaller --val.*smaller --gap"):
        build(tmp_path, path=log, me="Riya", session_gap_min=120)


def _long_chat(path, n_small=18, big=60):
    """A chat like issue 16's: `n_small` short old sessions, then one newest session of `big` messages."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    rows = []
    for d in range(n_small):
        for k in range(4):
            rows.append((t0 + timedelta(days=d, minutes=k), ("u1", "u2")[k % 2], f"old {d} {k}"))
    t = t0 + timedelta(days=n_small)
    for k in range(big):
        t += timedelta(minutes=55 if k == 48 else 1 + k % 7)  # one long silence before message 48
        rows.append((t, ("u1", "u2")[k % 2], f"new {k}"))
    path.write_text("".join(json.dumps({"chat": "Alice", "ts": ts.isoformat(), "speaker": {"u1": "Riya", "u2": "Alice"}[sid],
                                        "speaker_id": sid, "text": text, "reply_to": None, "source": "jsonl"}) + "\n"
                            for ts, sid, text in rows))
    return path


def test_big_newest_session_is_cut_to_the_share(tmp_path):
    log = _long_chat(tmp_path / "long.jsonl")
    summary, train, val = build(tmp_path, path=log, me="Riya", mode="friend", val_fraction=0.1)
    share = len(val) / (len(train) + len(val))
    assert 0.07 <= share <= 0.13, share  # 6 of 66; the whole newest session would be 30 of 66 (45 %)
    cut = summary.meta["split"]["cut"]
    assert cut["session"] == "Alice#19" and cut["silence_min"] == 55.0  # the long silence within reach
    assert {r["session"] for r in val} == {"Alice#19.2"}
    assert summary.meta["split"]["val_share"] == round(share, 4)
    # Context never crosses the cut: no validation prompt holds a message from before it, and no training
    # sample holds one from after it.
    before = {f"new {k}" for k in range(48)}
    after = {f"new {k}" for k in range(48, 60)}
    for r in val:
        assert not any(line.endswith(tuple(before)) for line in r["prompt"].splitlines())
    for r in train:
        assert not any(w in r["prompt"] + r["completion"] for w in after)
    assert summary.meta["val_from"] == cut["at"]


def test_cli_summary_says_how_it_split(tmp_path, capsys):
    log = _long_chat(tmp_path / "long.jsonl")
    assert run(["dataset", str(log), "--persona", "Alice", "--me", "Riya", "--mode", "friend",
                "--out", str(tmp_path / "ds")]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "session Alice#19 cut at" in printed and "55-min silence" in printed


def test_empty_validation_split(tmp_path):
    with pytest.raises(DatasetError, match=r"validation split is empty \(--val 0\).*--val 0.1"):
        build(tmp_path, val_fraction=0)


def test_me_comes_from_the_sidecar_or_me(tmp_path):
    log = tmp_path / "messages.jsonl"
    shutil.copy(DUO, log)
    with pytest.raises(DatasetError, match=r"--mode both needs to know which speaker is you: pass --me"):
        build(tmp_path, path=log)
    summary, *_ = build(tmp_path, path=log, mode="friend")
    assert summary.meta["me"] is None
    (tmp_path / "messages.meta.json").write_text('{"me": {"speaker": "Riya", "speaker_id": "u1"}}')
    assert build(tmp_path, path=log)[0].meta["me"]["name"] == "Riya"
    (tmp_path / "messages.meta.json").write_text('{"me": null, "other": 1}')  # ingest could not tell
    assert build(tmp_path, path=log, me="riya")[0].meta["me"]["speaker_id"] == "u1"
    (tmp_path / "messages.meta.json").write_text("not json")
    assert build(tmp_path, path=log, mode="friend")[0].meta["me"] is None
    # --me overrides the sidecar: with Bob as me, Riya is just another speaker.
    (tmp_path / "messages.meta.json").write_text('{"me": {"speaker": "Riya", "speaker_id": "u1"}}')
    summary, *_ = build(tmp_path, path=log, me="Bob", mode="both")
    assert summary.meta["me"]["speaker_id"] == "u3"
    assert summary.counts["by_target"] == {"ALICE": 9, "BOB": 1}
    with pytest.raises(DatasetError, match="--me 'Nobody' is not a speaker"):
        build(tmp_path, path=log, me="Nobody")


def test_me_with_several_ids_from_the_ingest_sidecar(tmp_path):
    # The same person on two platforms: Riya is "u1" in the Alice chat and "w1" in the group.
    log = tmp_path / "messages.jsonl"
    log.write_text(DUO.read_text().replace('"speaker": "Riya", "speaker_id": "u1", "text": "me too"',
                                           '"speaker": "Riya", "speaker_id": "w1", "text": "me too"'))
    (tmp_path / "messages.meta.json").write_text(json.dumps(
        {"me": {"name": "Riya", "id": "u1", "ids": ["u1", "w1"], "how": "name present in every chat"}}))
    summary, train, val = build(tmp_path, path=log, mode="self")
    assert summary.meta["me"] == {"name": "Riya", "speaker_id": "u1", "tag": "RIYA", "ids": ["u1", "w1"]}
    assert summary.meta["tags"]["w1"] == "RIYA"
    assert summary.counts["by_target"] == {"RIYA": 7}
    assert any(r["completion"] == " me too\n[BOB]" for r in train + val)
    # --me by name stands for every id with that name.
    assert build(tmp_path, path=log, me="riya")[0].meta["me"]["ids"] == ["u1", "w1"]
    with pytest.raises(DatasetError, match="several speakers"):  # a persona name must name one speaker
        build(tmp_path, path=log, persona="Riya", me="Bob")


def test_persona_cannot_be_me(tmp_path):
    with pytest.raises(DatasetError, match="is you"):
        build(tmp_path, persona="Riya")


def test_bad_log_line_names_file_and_line(tmp_path):
    log = tmp_path / "m.jsonl"
    log.write_text(DUO.read_text().splitlines()[0] + "\n" + '{"chat": "x"}\n')
    with pytest.raises(DatasetError, match=r"m.jsonl:2: .*convo ingest"):
        build(tmp_path, path=log)
    with pytest.raises(DatasetError, match="not found"):
        build(tmp_path, path=tmp_path / "missing.jsonl")
    log.write_bytes(b'{"chat": "\xff"}\n')
    with pytest.raises(DatasetError, match="not UTF-8"):
        build(tmp_path, path=log)


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"session_gap_min": 0}, "--gap"), ({"context_messages": 0}, "--context"), ({"val_fraction": 1.0}, "--val"),
     ({"mode": "other"}, "--mode")],
)
def test_bad_options(tmp_path, kw, match):
    with pytest.raises(DatasetError, match=match):
        build(tmp_path, **kw)


# ---------------------------------------------------------------- CLI


def test_cli_builds_a_dataset(tmp_path, capsys):
    out = tmp_path / "ds"
    code = run(["dataset", str(DUO), "--persona", "alice", "--out", str(out), "--mode", "friend", "--context", "4"])
    assert code == 0
    printed = capsys.readouterr().out
    assert str(out / "train.jsonl") in printed and "9" in printed
    meta = load_dataset_meta(out)
    assert meta["context_messages"] == 4 and meta["counts"]["train"] + meta["counts"]["val"] == 9


def test_cli_defaults_come_from_settings(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CONVO_DATASET__MODE", "self")
    monkeypatch.setenv("CONVO_DATASET__CONTEXT_MESSAGES", "3")
    monkeypatch.setenv("CONVO_DATASET__ROLE_TAGS", "true")
    out = tmp_path / "ds"
    assert run(["dataset", str(DUO), "-p", "u2", "-o", str(out)]) == 0
    meta = load_dataset_meta(out)
    assert (meta["mode"], meta["context_messages"], meta["targets"]) == ("self", 3, ["ME"])
    assert run(["dataset", str(DUO), "-p", "u2", "-o", str(out), "--mode", "friend", "--name-tags"]) == 0
    assert load_dataset_meta(out)["targets"] == ["ALICE"]


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    code = run(["dataset", str(DUO), "--persona", "Zed", "--out", str(tmp_path / "ds")])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and "speakers found" in err
    assert run(["dataset", str(DUO), "--persona", "Alice", "--out", str(tmp_path / "ds"), "--mode", "all"]) == 2
    assert "--mode" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()


def test_cli_help_explains_options(capsys):
    assert run(["dataset", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--persona", "--out", "--me", "--gap", "--context", "--max-tokens", "--tokenizer", "--mode",
                   "--chats", "--val", "--role-tags"):
        assert option in out
    assert "exactly" in out  # the gap boundary is documented
