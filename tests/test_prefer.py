"""`convo refine`: DPO of the person's real replies over the SFT adapter's own samples, on the tiny base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from config.settings import RefineSettings, TrainSettings
from convo.cli import run
from inference.adapter_meta import read_adapter_meta
from inference.prompt_format import render_completion
from tests.conftest import torch_threads
from tests.fixtures.train.make_dataset import write_dataset
from training.prefer import RefineOptions, build_pairs, following_tag, refine
from training.train import TrainOptions, train

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "alice", n_train=48, n_val=8)


@pytest.fixture(scope="module")
def sft(tmp_path_factory, data, tiny_base) -> Path:
    """A short SFT run: the adapter whose own samples become the rejected replies."""
    out = tmp_path_factory.mktemp("adapters") / "sft"
    train(TrainOptions.from_settings(
        TrainSettings(), data_dir=data, base=str(tiny_base), out_dir=out, max_steps=12, batch_size=8, grad_accum=1,
        eval_steps=12, learning_rate=1e-2, lora_r=8, lora_alpha=16, sample_prompts=0, warmup_ratio=0.0,
    ))
    return out


def _opts(**kw) -> RefineOptions:
    values = dict(max_pairs=12, max_steps=8, batch_size=4, learning_rate=5e-3, max_new_tokens=12)
    values.update(kw)
    return RefineOptions.from_settings(RefineSettings(), **values)


class _Scripted:
    """An engine stand-in whose samples are given: the pair logic alone, without a model's randomness."""

    def __init__(self, samples):
        self.samples = list(samples)

    def generate(self, prompt, target, **kw):
        return [self.samples.pop(0)]


def test_pairs_are_real_reply_over_own_sample_and_equal_samples_are_skipped():
    rows = [
        {"prompt": "[RIYA] coffee?\n[ALICE]", "completion": render_completion("ALICE", ["omg yes 🙌"], "RIYA")},
        {"prompt": "[RIYA] lol\n[ALICE]", "completion": render_completion("ALICE", ["nah sorry"], None)},
        {"prompt": "[RIYA] you there?\n[ALICE]", "completion": render_completion("ALICE", ["yes", "lol"], "RIYA")},
    ]
    engine = _Scripted([[" omg yes 🙌 "], ["I'm not sure what you're asking"], []])
    pairs, skipped = build_pairs(engine, rows, _opts())
    assert skipped == 1  # the first sample equals the real reply (spaces aside): no preference there
    assert [p["prompt"] for p in pairs] == [rows[1]["prompt"], rows[2]["prompt"]]
    assert [p["chosen"] for p in pairs] == [rows[1]["completion"], rows[2]["completion"]]  # chosen = the real reply
    # rejected = the model's sample, ending with the same next speaker as the real reply; an empty one is kept.
    assert pairs[0]["rejected"] == render_completion("ALICE", ["I'm not sure what you're asking"], None)
    assert pairs[1]["rejected"] == render_completion("ALICE", [""], "RIYA")
    assert following_tag(rows[0]["completion"]) == "RIYA" and following_tag(rows[1]["completion"]) is None


def test_refine_trains_the_lora_weights_only_and_the_margin_grows(tmp_path, data, sft, tiny_base):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from inference.engine import Engine

    base_before = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(tiny_base).state_dict().items()}
    out = tmp_path / "refined"
    result = refine(sft, data, out, _opts())
    assert result.pairs + result.skipped_equal == 12 and result.pairs > 0 and result.steps == 8
    # DPO's implicit reward margin on the training pairs starts at 0 (policy == reference) and grows.
    assert result.margin_before == 0.0 and result.margin_after > 0.05 and result.accuracy_after > 0.5

    before, after = load_file(sft / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert before.keys() == after.keys()  # the "ref" copy TRL trains against is not saved
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the LoRA weights moved
    assert not (out / "ref").exists()
    base_after = AutoModelForCausalLM.from_pretrained(tiny_base).state_dict()
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)  # the shared base is untouched

    meta = read_adapter_meta(out)
    assert meta.persona.tag == "ALICE" and meta.base_model == read_adapter_meta(sft).base_model
    assert meta.training_args["refine"]["method"] == "dpo"
    assert meta.training_args["refine"]["parent_adapter"] == str(sft.resolve())
    assert meta.final_metrics["refine"]["margin_after"] == result.margin_after
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == result.pairs and all(p["chosen"] != p["rejected"] for p in pairs)

    engine = Engine.load(adapter=out)  # serves like any adapter
    drafts = engine.generate("[RIYA] coffee tomorrow?\n[ALICE]", "ALICE", n=2, max_new_tokens=8, seed=1)
    assert len(drafts) == 2 and all(isinstance(d, list) for d in drafts)
    assert not list(tmp_path.glob(".*"))  # the work dir is gone


def test_cli_refine_and_its_errors(tmp_path, data, sft, capsys):
    out = tmp_path / "r"
    code = run(["refine", "--adapter", str(sft), "--data", str(data), "--out", str(out), "--max-pairs", "4",
                "--max-steps", "2", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["pairs"] + summary["skipped_equal"] == 4
    assert run(["refine", "--adapter", str(sft), "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "Traceback" not in err
    assert run(["refine", "--adapter", str(tmp_path / "nope"), "--data", str(data), "--out", str(tmp_path / "x")]) == 2
    assert "convo_adapter.json" in capsys.readouterr().err


def test_convo_train_refines_by_default_and_keeps_the_sft_run(tmp_path, data, tiny_base, capsys):
    """`convo train`: SFT, then the preference step; --out serves the refined adapter, --out/sft/ is the SFT run
    with its logs; the metadata stays flat so retrain and the version gate read the SFT keys where they were."""
    from training.prefer import SFT_DIR

    out = tmp_path / "alice"
    common = ["--data", str(data), "--base", str(tiny_base), "--max-steps", "4", "--eval-steps", "2",
              "--batch-size", "8", "--grad-accum", "1", "--sample-prompts", "0", "--lr", "1e-2"]
    code = run(["train", *common, "--out", str(out), "--prefer-pairs", "8", "--prefer-steps", "3", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["prefer"]["status"] == "refined"
    assert summary["prefer"]["steps"] == 3 and summary["prefer"]["pairs"] + summary["prefer"]["skipped_equal"] == 8
    sft = out / SFT_DIR
    assert (sft / "train_log.jsonl").is_file() and (sft / "adapter_model.safetensors").is_file()
    assert (out / "pairs.jsonl").is_file() and not list(tmp_path.glob(".*"))  # no staging dir left behind
    meta, sft_meta = read_adapter_meta(out), read_adapter_meta(sft)
    assert meta.training_args["refine"]["parent_adapter"] == str(sft.resolve())
    assert meta.training_args["data_dir"] == sft_meta.training_args["data_dir"]  # where retrain looks
    assert meta.final_metrics["final_eval_loss"] == sft_meta.final_metrics["final_eval_loss"]  # the version gate
    assert meta.final_metrics["refine"]["steps"] == 3

    # Nothing to resume in a refined dir: a clear error, not a second SFT run over it.
    assert run(["train", *common, "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "already trained and refined" in err and "Traceback" not in err

    # --no-prefer: the SFT adapter alone, as before.
    plain = tmp_path / "plain"
    assert run(["train", *common, "--out", str(plain), "--no-prefer", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["prefer"]["status"] == "skipped" and not (plain / SFT_DIR).exists()
    assert "refine" not in read_adapter_meta(plain).training_args


def test_preference_step_is_skipped_on_too_little_data(tmp_path, sft, tiny_base):
    """Fewer training samples than refine.min_pairs: the SFT adapter stays, untouched, and the reason is given."""
    from training.prefer import prefer_after_sft

    small = write_dataset(tmp_path / "small", n_train=3, n_val=2)
    before = (sft / "adapter_model.safetensors").read_bytes()
    outcome = prefer_after_sft(sft, small, _opts(min_pairs=4))
    assert outcome.status == "skipped" and "3 training samples" in outcome.reason and outcome.result is None
    assert (sft / "adapter_model.safetensors").read_bytes() == before and not (sft / "sft").exists()
