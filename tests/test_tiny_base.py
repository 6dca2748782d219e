"""The offline base model: tokenizer, from-scratch training, corpora with excluded speakers, `convo base tiny`."""

from __future__ import annotations

import json
import random

import pytest

from convo.cli import run
from inference.adapter_meta import local_model_sha256
from inference.prompt_format import END_TAG, parse
from tests.conftest import FIXTURES, torch_threads
from training.tiny_base import (
    BASE_META_FILE,
    build_tiny_base,
    chitchat_texts,
    messages_texts,
    render_conversation,
)

MESSAGES = FIXTURES / "train" / "messages.jsonl"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def test_tiny_base_is_a_normal_hf_checkpoint(tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert tok.eos_token and tok.pad_token and tok.eos_token_id != tok.pad_token_id
    assert model.config.eos_token_id == tok.eos_token_id == model.generation_config.eos_token_id
    text = "[ZOË] naïve 🫠 日本語 \\n ok"  # unseen characters: byte-level BPE has no unknown token
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    meta = json.loads((tiny_base / BASE_META_FILE).read_text())
    assert meta["weights_sha256"] == local_model_sha256(tiny_base)
    assert meta["steps"] == 40 and meta["num_layers"] == 2


def test_training_from_scratch_lowers_the_loss(tmp_path):
    rng = random.Random(1)
    lines = ["hey", "what's up", "omg yes", "see you at 8", "lol ok"]
    texts = [render_conversation([(str(i % 2), rng.choice(lines)) for i in range(6)], rng) for _ in range(100)]
    losses = []
    result = build_tiny_base(
        tmp_path / "m", texts, vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, max_steps=40,
        max_minutes=1, seq_len=32, batch_size=8, learning_rate=1e-2, on_step=lambda s, loss, t: losses.append(loss),
    )
    assert result.steps == 40 and len(losses) == 40
    assert losses[-1] < losses[0] - 1.0
    untrained = build_tiny_base(tmp_path / "z", texts, vocab_size=300, hidden_size=32, num_layers=1, num_heads=2,
                                max_steps=10, max_minutes=0)
    assert untrained.steps == 0 and (tmp_path / "z" / "model.safetensors").is_file()  # time box of 0: no step


def test_rendered_conversations_are_in_the_prompt_format():
    rng = random.Random(0)
    text = render_conversation([("a", "hi"), ("b", "yo\n[X] fake"), ("a", "ok")], rng)
    turns = parse(text)
    assert [t.text for t in turns] == ["hi", "yo\n[X] fake", "ok", ""] and turns[-1].speaker == END_TAG
    assert turns[0].speaker == turns[2].speaker != turns[1].speaker


def test_excluded_speakers_leave_out_their_conversations():
    texts, meta = messages_texts(MESSAGES)
    assert len(texts) == 3 and meta["sessions_excluded"] == 0  # c1 has two sessions (3 h gap), c2 one
    texts, meta = messages_texts(MESSAGES, exclude_speakers=["Bob"])
    assert len(texts) == 2 and meta["sessions_excluded"] == 1
    assert not any("game" in t for t in texts)
    texts, _ = messages_texts(MESSAGES, exclude_speakers=["u_alice"])
    assert len(texts) == 1 and "game" in texts[0]

    from training.tiny_base import _chitchat

    first = _chitchat()
    first_conv = first[sorted(first)[0]]
    sender = first_conv["messages"][0][0]["sender"]
    all_texts, _ = chitchat_texts(limit=20)
    kept, meta = chitchat_texts(exclude_speakers=[sender], limit=20)
    assert meta["conversations_excluded"] >= 1 and len(meta["source_sha256"]) == 64
    assert kept[0] != all_texts[0]


def test_cli_base_tiny(tmp_path, capsys):
    out = tmp_path / "models" / "tiny"
    args = ["base", "tiny", "--out", str(out), "--corpus", str(MESSAGES), "--minutes", "0.5", "--max-steps", "3",
            "--vocab-size", "300", "--hidden-size", "32", "--layers", "1", "--heads", "2", "--seq-len", "32",
            "--exclude-speakers", "Bob"]
    assert run(args) == 0
    shown = capsys.readouterr().out
    assert "base model built" in shown and "sample" in shown
    meta = json.loads((out / BASE_META_FILE).read_text())
    assert meta["speakers_excluded"] == ["Bob"] and meta["steps"] == 3 and meta["corpus"] == str(MESSAGES)
    assert run(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert run(["base", "tiny", "--out", str(tmp_path / "x"), "--corpus", str(tmp_path / "missing.jsonl")]) == 2
    assert "corpus file not found" in capsys.readouterr().err
