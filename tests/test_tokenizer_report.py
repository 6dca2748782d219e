"""Cutting completions by token ids (inference/completion.py) and `convo tokenizer-report`."""

from __future__ import annotations

import functools
import json

import pytest

from convo.cli import run
from errors import DatasetError
from inference.completion import cut_completion
from inference.prompt_format import Turn, render_completion, render_prompt, split_completion
from tests.test_dataset import DUO, word_tokenizer
from training.dataset import build_dataset, read_samples
from training.tokenizer_report import find_emoji, percentile, tokenizer_report


@functools.cache
def nfkc_bpe():
    """A small byte-level BPE trained here whose normalizer (NFKC) makes decode(encode(x)) != x."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [line for r in read_samples_of_duo() for line in (r["prompt"] + r["completion"]).split("\n")] * 3
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


@functools.cache
def read_samples_of_duo():
    """Samples (train + val) of the duo fixture in mode both."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        s = build_dataset(DUO, "Alice", d, mode="both")
        return tuple(read_samples(s.train_path) + read_samples(s.val_path))


def test_cut_completion_uses_token_ids_not_characters():
    tok = nfkc_bpe()
    # "…" and "ﬁ" normalize to "..." and "fi": the decoded prompt is 3 characters longer than the prompt.
    prompt = render_prompt([Turn("RIYA", "so… are we ﬁne for 7?")], "ALICE")
    completion = render_completion("ALICE", ["yeah!", "want to meet at the usual?"], "RIYA")
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    generated = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    sequence = prompt_ids + generated
    assert tok.decode(prompt_ids) != prompt  # decode does not round-trip

    naive = tok.decode(sequence, skip_special_tokens=True)[len(prompt):]
    assert naive != completion
    assert naive.startswith("CE]")  # the cut lands inside the prompt's last tag
    cut = cut_completion(tok, sequence, len(prompt_ids))
    assert cut == completion
    assert split_completion(cut, "ALICE") == ["yeah!", "want to meet at the usual?"]


def test_cut_completion_accepts_tensors_and_checks_bounds():
    import torch

    tok = nfkc_bpe()
    prompt_ids = tok("[RIYA] hey\n[ALICE]", add_special_tokens=False)["input_ids"]
    gen = tok(" sure\n[END]", add_special_tokens=False)["input_ids"]
    row = torch.tensor([prompt_ids + gen])  # (1, seq) as generate() returns it
    assert cut_completion(tok, row, len(prompt_ids)) == " sure\n[END]"
    assert cut_completion(tok, row[0], len(prompt_ids)) == " sure\n[END]"
    assert cut_completion(tok, prompt_ids, len(prompt_ids)) == ""
    with pytest.raises(ValueError):
        cut_completion(tok, prompt_ids, len(prompt_ids) + 1)
    with pytest.raises(ValueError):
        cut_completion(tok, torch.zeros(2, 3, dtype=torch.long), 1)


@pytest.mark.parametrize(
    ("text", "emoji"),
    [("hi 🙂", ["🙂"]), ("🍕🍕", ["🍕", "🍕"]), ("👩‍👩‍👧 ok", ["👩‍👩‍👧"]), ("👍🏽!", ["👍🏽"]), ("go 🇫🇷", ["🇫🇷"]),
     ("❤️ x", ["❤️"]), ("1️⃣", ["1️⃣"]), ("plain text, © 2026", [])],
)
def test_find_emoji_clusters(text, emoji):
    assert find_emoji(text) == emoji


def test_percentile_nearest_rank():
    assert percentile([3, 1, 2], 50) == 2
    assert percentile(list(range(1, 101)), 95) == 95
    assert percentile([], 50) == 0


@pytest.fixture
def friend_ds(tmp_path):
    build_dataset(DUO, "Alice", tmp_path / "ds", mode="friend")
    return tmp_path / "ds"


def test_report_lengths_and_truncation(friend_ds):
    tok = word_tokenizer(["yeah!", "me", "🙂"])
    report = tokenizer_report(tok, friend_ds, max_tokens=8)
    samples = read_samples(friend_ds / "train.jsonl") + read_samples(friend_ds / "val.jsonl")
    assert report["samples"] == len(samples) == 9
    # Target messages, each once; one word = one token here (the injected "\n[RIYA]" stays inside one word).
    m = report["messages"]
    assert m["count"] == 10
    assert (m["median_tokens"], m["p95_tokens"], m["max_tokens"]) == (2, 6, 6)
    words = [len((s["prompt"] + s["completion"]).split()) for s in samples]
    assert report["sample_tokens"]["truncated"] == sum(n > 8 for n in words) > 0
    assert report["sample_tokens"]["truncated_share"] == pytest.approx(sum(n > 8 for n in words) / 9)
    assert report["sample_tokens"]["max"] == max(words)


def test_report_flags_unknown_emoji_and_tags(friend_ds):
    report = tokenizer_report(word_tokenizer(["🙂", "[ALICE]"]), friend_ds, max_tokens=512)
    emoji = {e["emoji"]: e for e in report["emoji"]}
    assert set(emoji) == {"🙂", "🍕"}
    assert emoji["🙂"]["unk"] is False and emoji["🙂"]["round_trip"] is True and emoji["🙂"]["samples"] == 1
    assert emoji["🍕"]["unk"] is True and emoji["🍕"]["round_trip"] is False
    tags = {t["tag"]: t for t in report["tags"]}
    assert set(tags) == {"ALICE", "RIYA", "BOB", "END"}
    assert tags["ALICE"]["pieces"] == ["[ALICE]"] and not tags["ALICE"]["unk"]
    assert tags["RIYA"]["unk"] and tags["RIYA"]["prompt_prefix_ok"]


def byte_fallback_tokenizer():
    """Characters of the data plus <0x..> byte pieces (Llama style), and one merge "] " that breaks prompt ends."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("".join(r["prompt"] + r["completion"] for r in read_samples_of_duo())) - set("🍕🙂"))
    vocab = {"<unk>": 0}
    for piece in [f"<0x{b:02X}>" for b in range(256)] + chars + ["🙂", "] "]:
        vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("]", " ")], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def test_report_shows_byte_fallback_and_prompt_boundary(friend_ds):
    report = tokenizer_report(byte_fallback_tokenizer(), friend_ds, max_tokens=512)
    emoji = {e["emoji"]: e for e in report["emoji"]}
    assert emoji["🍕"]["pieces"] == ["<0xF0>", "<0x9F>", "<0x8D>", "<0x95>"]
    assert emoji["🍕"]["byte_fallback"] and emoji["🍕"]["tokens"] == 4 and emoji["🍕"]["round_trip"]
    assert emoji["🙂"]["tokens"] == 1 and not emoji["🙂"]["byte_fallback"]
    alice = next(t for t in report["tags"] if t["tag"] == "ALICE")
    assert alice["pieces"] == ["\n", "[", "A", "L", "I", "C", "E", "] "]
    # "[ALICE]" at the end of a prompt is "]" but "] " in training text: the prompt is not a token prefix.
    assert alice["prompt_prefix_ok"] is False


def test_report_errors(tmp_path, friend_ds):
    with pytest.raises(DatasetError, match="meta.json: not found"):
        tokenizer_report(word_tokenizer(), tmp_path, max_tokens=10)
    (friend_ds / "train.jsonl").write_text("")
    (friend_ds / "val.jsonl").write_text("")
    with pytest.raises(DatasetError, match="no samples"):
        tokenizer_report(word_tokenizer(), friend_ds, max_tokens=10)


def test_cli_tokenizer_report(tmp_path, friend_ds, capsys):
    tok_dir = tmp_path / "tok"
    word_tokenizer(["yeah!"]).save_pretrained(tok_dir)
    args = ["tokenizer-report", "--tokenizer", str(tok_dir), "--data", str(friend_ds)]
    assert run([*args, "--json", "--max-tokens", "8"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_tokens"] == 8 and report["samples"] == 9 and report["tokenizer"] == str(tok_dir)
    assert run(args) == 0
    out = capsys.readouterr().out
    assert "tokens per message" in out and "🍕" in out and "[ALICE]" in out and "over 512" in out  # train.max_length

    assert run(["tokenizer-report", "--data", str(friend_ds)]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert run(["tokenizer-report", "--tokenizer", str(tmp_path / "none"), "--data", str(friend_ds)]) == 2
    err = capsys.readouterr().err
    assert "local tokenizer directory" in err and "Traceback" not in err
    assert run(["tokenizer-report", "--help"]) == 0
    assert "--max-tokens" in capsys.readouterr().out


def test_completion_module_stays_light():
    import subprocess
    import sys

    code = "import inference.completion, sys; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; " \
           "assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)
