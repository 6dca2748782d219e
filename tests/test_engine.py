"""The generation engine on the tiny in-process base: stopping, seeding, scoring, adapters on and off, and its
generation being the worker's decode loop (equal greedy tokens to the HF `generate` reference)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from errors import AdapterMismatch, ConfigError, ConvoError
from inference.adapter_meta import AdapterMeta, Speaker, base_model_ref, write_adapter_meta
from inference.engine import (
    Engine,
    encode,
    parse_conversation,
    resolve_target,
    tokenize_pair,
    trim_completion,
)
from inference.prompt_format import FORMAT_VERSION, Turn
from tests.conftest import torch_threads
from tests.hf_reference import StopAtOtherSpeaker, hf_greedy

PROMPT = "[RIYA] you coming?\n[RIYA] it starts at 8\n[ALICE]"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def engine(tiny_base) -> Engine:
    return Engine.load(tiny_base)


@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory) -> Path:
    """An untrained LoRA adapter with random B (so it changes outputs), saved with its convo_adapter.json."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_base),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    out = tmp_path_factory.mktemp("adapter") / "alice"
    model.save_pretrained(out)
    meta = AdapterMeta(
        persona=Speaker(name="Alice", speaker_id="u_alice", tag="ALICE"),
        me=Speaker(name="Riya", speaker_id="u_riya", tag="RIYA"),
        tags={"u_alice": "ALICE", "u_riya": "RIYA"},
        base_model=base_model_ref(tiny_base),
        format_version=FORMAT_VERSION,
    )
    write_adapter_meta(out, meta)
    return out


def test_tokenize_pair_masks_exactly_the_completion(engine):
    tok = engine.tokenizer
    completion = " omg yes 🙌\n[ALICE] be there soon\n[RIYA]"
    ids, mask = tokenize_pair(tok, PROMPT, completion)
    n_prompt = len(encode(tok, PROMPT))
    assert mask == [0] * n_prompt + [1] * (len(ids) - n_prompt)
    assert tok.decode(ids[n_prompt:]) == completion


def test_completion_nll_is_the_sum_over_completion_tokens_only(engine):
    pairs = [(PROMPT, " omg yes 🙌\n[RIYA]"), ("[RIYA] lol\n[ALICE]", " haha same\n[ALICE] brb\n[END]")]
    batched = engine.completion_nll(pairs, batch_size=2)  # padded batch
    for (prompt, completion), (nll, count) in zip(pairs, batched, strict=True):
        ids, mask = tokenize_pair(engine.tokenizer, prompt, completion)
        with torch.no_grad():
            logits = engine.model(input_ids=torch.tensor([ids])).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        expected = -sum(logp[t - 1, ids[t]].item() for t in range(len(ids)) if mask[t])
        assert count == sum(mask)
        assert nll == pytest.approx(expected, rel=1e-4)
    # The prompt changes the context, never the number of scored tokens.
    (_, c1), (_, c2) = engine.completion_nll([("[RIYA] a\n[ALICE]", " ok\n[END]"), (PROMPT, " ok\n[END]")])
    assert c1 == c2


def test_reference_stopping_criterion_fires_at_another_speakers_tag(engine):
    tok = engine.tokenizer
    n = len(encode(tok, PROMPT))
    stop = StopAtOtherSpeaker(tok, n, "ALICE")

    def fires(continuation: str) -> bool:
        ids = torch.tensor([encode(tok, PROMPT + continuation)])
        return bool(stop(ids, None)[0])

    assert fires(" hi\n[RIYA]")
    assert fires(" hi\n[END]")
    assert not fires(" hi\n[ALICE] more")
    assert not fires(" hi\n[AL")
    assert not fires(" hi")
    assert trim_completion(" hi\n[ALICE] more\n[RIYA] no", "ALICE") == " hi\n[ALICE] more"


def test_generate_is_seeded_privately_and_stops_at_the_burst(engine):
    rng_before = torch.get_rng_state()
    a = engine.generate_raw(PROMPT, "ALICE", n=3, seed=7, max_new_tokens=24)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is neither used nor moved
    assert engine.generate_raw(PROMPT, "ALICE", n=3, seed=7, max_new_tokens=24) == a
    assert len(a) == 3
    for text in a:
        assert all(line.startswith("[ALICE]") for line in text.split("\n")[1:])
    candidates = engine.generate(PROMPT, "ALICE", n=2, seed=7, max_new_tokens=24)
    assert len(candidates) == 2 and all(isinstance(m, str) and m for c in candidates for m in c)
    greedy = engine.generate_raw(PROMPT, "ALICE", n=2, temperature=0, max_new_tokens=12)
    assert greedy[0] == greedy[1]


def test_adapter_on_off_on_one_loaded_model(engine, adapter, tiny_base):
    with_adapter = Engine.load(adapter=adapter)  # base taken from convo_adapter.json
    assert with_adapter.meta.persona.tag == "ALICE"
    pairs = [(PROMPT, " omg yes\n[RIYA]")]
    on = with_adapter.completion_nll(pairs)[0][0]
    with with_adapter.adapter_disabled():
        off = with_adapter.completion_nll(pairs)[0][0]
    assert off == pytest.approx(engine.completion_nll(pairs)[0][0], rel=1e-5)
    assert on != pytest.approx(off, rel=1e-3)
    assert with_adapter.completion_nll(pairs)[0][0] == pytest.approx(on, rel=1e-6)  # re-enabled afterwards


def test_load_errors(tmp_path, adapter, tiny_base):
    with pytest.raises(ConvoError, match="no model to load"):
        Engine.load()
    with pytest.raises(AdapterMismatch, match="not an adapter made by `convo train`"):
        Engine.load(adapter=tmp_path)
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in adapter.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    meta = json.loads((moved / "convo_adapter.json").read_text())
    meta["base_model"]["id"] = str(tmp_path / "gone")
    (moved / "convo_adapter.json").write_text(json.dumps(meta))
    with pytest.raises(ConvoError, match="is not there any more"):
        Engine.load(adapter=moved)
    assert Engine.load(base=tiny_base, adapter=moved).meta is not None  # same weights elsewhere: fine


def test_parse_conversation_and_target(adapter):
    from inference.adapter_meta import read_adapter_meta

    turns = parse_conversation("[RIYA] you coming?\nyes i am\n[ALICE]hi\n\n", "RIYA")
    assert turns == [Turn("RIYA", "you coming?"), Turn("RIYA", "yes i am"), Turn("ALICE", "hi")]
    meta = read_adapter_meta(adapter)
    assert resolve_target(meta, None) == ("ALICE", "RIYA")
    assert resolve_target(meta, "RIYA") == ("RIYA", "ALICE")
    with pytest.raises(ConfigError, match="known tags: ALICE, RIYA"):
        resolve_target(meta, "BOB")


def test_generate_batch_left_pads_prompts_of_different_lengths(engine):
    short = "[BOB] hi\n[ALICE]"
    long = PROMPT.removesuffix("[ALICE]") + "[BOB] and then what happened after that?\n[ALICE]"
    greedy = dict(n=2, temperature=0, max_new_tokens=12)
    batch = engine.generate_raw_batch([long, short], "ALICE", **greedy)
    # Padding is masked: each prompt's greedy rows equal the prompt run alone.
    assert batch == [engine.generate_raw(long, "ALICE", **greedy), engine.generate_raw(short, "ALICE", **greedy)]
    sampled = engine.generate_batch([short, long, short], "ALICE", n=2, seed=3, max_new_tokens=12)
    assert [len(c) for c in sampled] == [2, 2, 2]
    assert engine.generate_batch([short, long, short], "ALICE", n=2, seed=3, max_new_tokens=12) == sampled


def test_sample_batch_runs_the_candidate_step_for_every_prompt_in_one_go(engine):
    from inference.engine import SimulateOptions

    short = "[BOB] hi\n[ALICE]"
    greedy = SimulateOptions(n=1, temperature=0, max_new_tokens=12, max_resample_rounds=0)
    together = engine.sample_batch([PROMPT, short], "ALICE", greedy)
    assert [o.candidates for o in together] == [engine.sample(p, "ALICE", greedy).candidates for p in (PROMPT, short)]
    sampled = engine.sample_batch([PROMPT, short, PROMPT], "ALICE", SimulateOptions(n=2, seed=5, max_new_tokens=12))
    for outcome in sampled:
        assert outcome.samples >= 2 and len({tuple(c) for c in outcome.candidates}) == len(outcome.candidates)


SHORT = "[BOB] hi\n[ALICE]"
LONG = PROMPT.removesuffix("[ALICE]") + "[BOB] and then what happened after that?\n[ALICE]"


@pytest.mark.parametrize("with_adapter", [True, False], ids=["adapter", "bare"])
def test_greedy_tokens_equal_hf_generate_single_and_batch(engine, adapter, with_adapter):
    """The decode loop (what the worker runs) gives HF `generate`'s greedy tokens, adapter on and off."""
    from dataclasses import replace

    eng = Engine.load(adapter=adapter) if with_adapter else engine
    prompts = [LONG, SHORT, PROMPT]
    reference = hf_greedy(eng.model, eng.tokenizer, prompts, "ALICE", max_new_tokens=20)
    assert eng.generate_raw(LONG, "ALICE", n=1, temperature=0, max_new_tokens=20) == [reference[0][1]]
    assert eng.generate_raw_batch(prompts, "ALICE", n=1, temperature=0, max_new_tokens=20) == [[t] for _, t in
                                                                                               reference]
    with eng._decoding(1.0, 0) as backend:  # the token ids themselves, not only their text
        items = eng._items(prompts, "ALICE", n=1, temperature=0, top_p=1.0, max_new_tokens=20, seed=None)
        ours = [r.token_ids[0] for r in backend.generate([replace(i) for i in items])]
    assert ours == [ids for ids, _ in reference]
    assert any(len(ids) > 3 for ids in ours)
    if with_adapter:  # the adapter changes the tokens: the bank really applies it
        assert [t for _, t in hf_greedy(engine.model, engine.tokenizer, prompts, "ALICE", max_new_tokens=20)] != [
            t for _, t in reference]
        with eng.adapter_disabled():  # the bare base inside the block, in the loop too
            bare = eng.generate_raw_batch(prompts, "ALICE", n=1, temperature=0, max_new_tokens=20)
        assert bare == engine.generate_raw_batch(prompts, "ALICE", n=1, temperature=0, max_new_tokens=20)


def test_greedy_with_repetition_rules_equals_hf_generate(engine):
    """repetition_penalty and no_repeat_ngram_size per call: the burst-only rule, as HF applies it with BurstRepetition."""
    for penalty, ngram in ((1.3, 0), (1.0, 2), (1.5, 1)):
        reference = hf_greedy(engine.model, engine.tokenizer, [LONG, SHORT], "ALICE", max_new_tokens=20,
                              repetition_penalty=penalty, no_repeat_ngram_size=ngram)
        ours = engine.generate_raw_batch([LONG, SHORT], "ALICE", n=1, temperature=0, max_new_tokens=20,
                                         repetition_penalty=penalty, no_repeat_ngram_size=ngram)
        assert ours == [[t] for _, t in reference], (penalty, ngram)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(engine):
    opts = dict(n=3, temperature=1.0, top_p=0.95, max_new_tokens=16)
    alone = engine.generate_raw(SHORT, "ALICE", seed=11, **opts)
    assert engine.generate_raw(SHORT, "ALICE", seed=11, **opts) == alone
    assert len(set(alone)) > 1  # the rows of one request draw different samples
    batch = engine.generate_raw_batch([LONG, SHORT, PROMPT], "ALICE", seed=11, **opts)
    assert batch[1] == alone  # a prompt's samples do not depend on what shares the batch
    assert engine.generate_raw(SHORT, "ALICE", seed=12, **opts) != alone


def test_engine_reads_a_model_under_training_afresh_and_keeps_train_mode(tiny_base):
    """Training's sample callback: the engine sees the LoRA weights as they are now and restores train mode."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1))
    model.train()
    eng = Engine(model, AutoTokenizer.from_pretrained(tiny_base))
    greedy = dict(n=1, temperature=0, max_new_tokens=16)
    before = eng.generate_raw_batch([LONG, SHORT], "ALICE", **greedy)
    assert model.training and all(m.training for m in model.modules())
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    with torch.no_grad():  # a "training step": B moves away from zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p))
    after = eng.generate_raw_batch([LONG, SHORT], "ALICE", **greedy)
    assert after != before
    model.eval()
    assert after == [[t] for _, t in hf_greedy(model, eng.tokenizer, [LONG, SHORT], "ALICE", max_new_tokens=16)]
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks == 0  # the bank's hooks came off


@pytest.mark.slow
def test_qlora_engine_decodes_a_4bit_base_like_hf_generate(tmp_path):
    """--qlora simulate: a 4-bit NF4 base (bitsandbytes CPU kernels) with the adapter in the bank, as the worker
    serves a 4-bit base; greedy tokens equal HF `generate` through PEFT on the same quantized model."""
    import random

    import bitsandbytes as bnb

    from inference.adapter_meta import base_model_ref
    from inference.adapters import random_adapter
    from tests.conftest import _TINY_LINES
    from training.tiny_base import build_tiny_base, render_conversation

    rng = random.Random(0)
    texts = [render_conversation([(str(i % 2), rng.choice(_TINY_LINES)) for i in range(4)], rng) for _ in range(60)]
    base = tmp_path / "base192"
    build_tiny_base(base, texts, vocab_size=300, hidden_size=192, num_layers=2, num_heads=2, max_steps=0, seq_len=32)
    random_adapter(base, tmp_path / "alice", "Alice", seed=1, me="Riya", base_model=base_model_ref(base))
    eng = Engine.load(adapter=tmp_path / "alice", qlora=True, device="cpu")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in eng.model.modules())
    prompts = ["[RIYA] you coming?\n[ALICE]", "[RIYA] hi\n[ALICE] hey\n[RIYA] what's up\n[ALICE]"]
    ours = eng.generate_raw_batch(prompts, "ALICE", n=1, temperature=0, max_new_tokens=10)
    assert ours == [[t] for _, t in hf_greedy(eng.model, eng.tokenizer, prompts, "ALICE", max_new_tokens=10)]
    with eng.adapter_disabled():
        bare = eng.generate_raw_batch(prompts, "ALICE", n=1, temperature=0, max_new_tokens=10)
        assert bare == [[t] for _, t in hf_greedy(eng.model, eng.tokenizer, prompts, "ALICE", max_new_tokens=10)]


def test_chunked_completion_nll_equals_the_models_own_logits_with_an_adapter(adapter, tiny_base):
    """The LM head in chunks of 2 positions, through a PEFT wrapper, gives the model's own log-probs."""
    from inference.completion_nll import token_nll

    eng = Engine.load(tiny_base, adapter)
    ids, mask = tokenize_pair(eng.tokenizer, PROMPT, " omg yes 🙌\n[RIYA] brb\n[END]")
    x, m = torch.tensor([ids, ids]), torch.tensor([mask, mask], dtype=torch.bool)
    m[1, : len(ids) // 2] = False  # the second row scores fewer tokens
    with torch.no_grad():
        nll, rows, _ = token_nll(eng.model, x, torch.ones_like(x), m, chunk_tokens=2)
        logp = torch.log_softmax(eng.model(input_ids=x).logits.float(), -1)
    expected = torch.cat([-logp[r, t - 1, x[r, t]].reshape(1) for r in range(2) for t in range(1, len(ids)) if m[r, t]])
    assert rows.tolist() == [r for r in range(2) for t in range(1, len(ids)) if m[r, t]]
    assert torch.allclose(nll, expected, atol=1e-4)
