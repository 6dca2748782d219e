"""Memory and time budgets of a training run: the arithmetic, the chunked loss against the plain one, and a tiny
run that plans both and logs progress without a terminal."""

from __future__ import annotations

import io
import json
import math

import pytest
from rich.console import Console

from config.settings import TrainSettings
from tests.conftest import torch_threads
from tests.fixtures.train.make_dataset import write_dataset
from training.budget import (
    GIB,
    ModelShape,
    default_budget_gb,
    fixed_bytes,
    parse_budget,
    plan_memory,
    plan_time,
    resolve_budget_min,
    sample_bytes,
)
from training.prefer import RefineOptions
from training.train import RUN_FILE, TrainOptions, fit_prompt, train

SMOLLM2 = ModelShape(layers=30, hidden=576, intermediate=1536, heads=9, vocab=49152, params=134_515_008,
                     weight_bytes=4)


# ---------------------------------------------------------------- memory arithmetic


def test_micro_batch_is_the_largest_divisor_that_fits_and_keeps_the_effective_batch():
    per_sample = sample_bytes(SMOLLM2, 512, checkpointing=False)
    base = fixed_bytes(SMOLLM2, trainable=5_000_000)
    budget = base + 3 * per_sample  # room for 3 samples: 3 does not divide 32, so 2
    plan = plan_memory(SMOLLM2, 5_000_000, 512, batch_size=8, grad_accum=4, budget_bytes=budget)
    assert (plan.micro_batch, plan.grad_accum, plan.gradient_checkpointing, plan.fits) == (2, 16, False, True)
    assert plan.estimate_bytes <= budget
    roomy = plan_memory(SMOLLM2, 5_000_000, 512, 8, 4, budget_bytes=100 * GIB)
    assert (roomy.micro_batch, roomy.grad_accum) == (32, 1)


def test_checkpointing_only_when_one_sample_does_not_fit_without_it():
    base = fixed_bytes(SMOLLM2, 5_000_000)
    one_plain = base + sample_bytes(SMOLLM2, 512, False)
    plan = plan_memory(SMOLLM2, 5_000_000, 512, 8, 4, budget_bytes=one_plain - 1)
    assert plan.gradient_checkpointing and plan.fits and plan.estimate_bytes < one_plain
    hopeless = plan_memory(SMOLLM2, 5_000_000, 512, 8, 4, budget_bytes=base)
    assert (hopeless.micro_batch, hopeless.grad_accum, hopeless.fits) == (1, 32, False)
    assert "over the budget" in hopeless.sentence()
    forced_off = plan_memory(SMOLLM2, 5_000_000, 512, 8, 4, budget_bytes=one_plain - 1, force_checkpointing=False)
    assert not forced_off.gradient_checkpointing and not forced_off.fits


def test_longer_samples_and_larger_vocabularies_cost_more():
    assert sample_bytes(SMOLLM2, 512, False) > 2 * sample_bytes(SMOLLM2, 256, False)  # attention grows with T^2
    assert sample_bytes(SMOLLM2, 512, True) < sample_bytes(SMOLLM2, 512, False)
    gemma_vocab = ModelShape(**{**{f: getattr(SMOLLM2, f) for f in SMOLLM2.__slots__}, "vocab": 262144})
    assert fixed_bytes(gemma_vocab, 0) > fixed_bytes(SMOLLM2, 0)


def test_smollm2_at_the_defaults_plans_one_sample_without_checkpointing_in_4_gb():
    plan = plan_memory(SMOLLM2, 4_900_000, 512, 8, 4, budget_bytes=4 * GIB)
    assert (plan.micro_batch, plan.grad_accum, plan.gradient_checkpointing) == (1, 32, False)


def test_default_budget_comes_from_the_machine():
    assert default_budget_gb(available_bytes=22 * GIB) == 4.0  # a big machine: the CPU cap
    assert default_budget_gb(available_bytes=6 * GIB) == 3.0  # a busy laptop: half of what is free
    assert default_budget_gb(available_bytes=1 * GIB) == 2.0  # a full machine: the floor
    assert default_budget_gb(available_bytes=22 * GIB, cuda_free_bytes=80 * GIB) == pytest.approx(72.0)


# ---------------------------------------------------------------- time arithmetic


def _run_seconds(plan, elapsed, done, step_s, eval_s, done_evals=0):
    return elapsed + (plan.max_steps - done) * step_s + (math.ceil(plan.max_steps / plan.eval_steps) - done_evals) * eval_s


@pytest.mark.parametrize("step_s,eval_s", [(21.0, 10.0), (1.0, 30.0), (0.05, 0.5), (200.0, 60.0)])
def test_planned_run_ends_inside_the_budget(step_s, eval_s):
    plan = plan_time(budget_s=1800, elapsed_s=90, done_steps=3, seconds_per_step=step_s, seconds_per_eval=eval_s,
                     cap_steps=100_000)
    assert plan.max_steps >= 4 and plan.eval_steps >= 1
    if plan.max_steps > 4:
        assert _run_seconds(plan, 90, 3, step_s, eval_s) <= 1800
        m = plan.max_steps + 2  # no room left unused: two more steps (and their validations) would not fit
        assert 90 + (m - 3) * step_s + math.ceil(m / math.ceil(m / 8)) * eval_s > 1800
    assert plan.capped_by == "budget"


def test_the_epochs_cap_wins_when_the_budget_allows_more():
    plan = plan_time(1800, 10, 3, seconds_per_step=1.0, seconds_per_eval=1.0, cap_steps=50)
    assert (plan.max_steps, plan.capped_by) == (50, "epochs")
    assert "epochs cap" in plan.sentence("CPU, 2 threads")


def test_a_fixed_validation_interval_is_kept_and_the_sentence_says_the_plan():
    plan = plan_time(1800, 60, 3, 21.0, 15.0, cap_steps=10_000, eval_steps=10)
    assert plan.eval_steps == 10
    line = plan.sentence("CPU, 2 threads")
    assert line.startswith("CPU, 2 threads: 21 s/step -> ") and f"{plan.max_steps} steps in 30 min" in line
    assert line.endswith("validation every 10")


def test_a_spent_budget_still_plans_one_more_step_but_never_past_the_cap():
    assert plan_time(60, 120, 3, 21.0, 15.0, cap_steps=100).max_steps == 4
    assert plan_time(600, 10, 3, 1.0, 1.0, cap_steps=3).max_steps == 3


def test_budget_default_is_cpu_only_and_yields_to_a_given_length():
    assert resolve_budget_min(None, 30, cuda=False, length_given=False) == 30
    assert resolve_budget_min(None, 30, cuda=False, length_given=True) == 0
    assert resolve_budget_min(None, 30, cuda=True, length_given=False) == 0
    assert resolve_budget_min(10, 30, cuda=True, length_given=True) == 10
    assert resolve_budget_min(0, 30, cuda=False, length_given=False) == 0


def test_length_given_is_known_from_overrides_and_settings():
    assert not TrainOptions.from_settings(TrainSettings(), data_dir=".", base="b", out_dir="o").length_given
    assert TrainOptions.from_settings(TrainSettings(), data_dir=".", base="b", out_dir="o", epochs=2).length_given
    assert TrainOptions.from_settings(TrainSettings(), data_dir=".", base="b", out_dir="o", max_steps=5).length_given
    assert not TrainOptions.from_settings(TrainSettings(), data_dir=".", base="b", out_dir="o",
                                          max_steps=-1).length_given
    assert TrainOptions.from_settings(TrainSettings(epochs=1), data_dir=".", base="b", out_dir="o").length_given


@pytest.mark.parametrize("text,minutes", [("30m", 30), ("1h", 60), ("1h30m", 90), ("90s", 1.5), ("45", 45),
                                          ("2.5min", 2.5)])
def test_parse_budget(text, minutes):
    assert parse_budget(text) == pytest.approx(minutes)


@pytest.mark.parametrize("text", ["", "soon", "30x", "m30"])
def test_parse_budget_refuses_non_durations(text):
    with pytest.raises(ValueError):
        parse_budget(text)


# ---------------------------------------------------------------- the chunked loss equals the plain loss


def test_chunked_completion_loss_equals_the_plain_loss_and_its_gradients(tiny_base):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from training.completion_loss import completion_loss

    with torch_threads(1):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
        model = get_peft_model(model, lora)
        ids = torch.randint(3, model.config.vocab_size, (3, 20))
        mask = torch.ones_like(ids)
        mask[2, 15:] = 0  # a padded row
        labels = ids.clone()
        labels[:, :12] = -100  # prompt
        labels[mask == 0] = -100
        trainable = [p for p in model.parameters() if p.requires_grad]

        def grads(loss):
            model.zero_grad()
            loss.backward()
            return [p.grad.clone() for p in trainable]

        plain = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        g_plain = grads(plain)
        for chunk in (1, 5, 1000):  # chunks smaller than, across and larger than the 20 completion tokens
            ours = completion_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels},
                                   chunk_tokens=chunk)
            assert ours.item() == pytest.approx(plain.item(), rel=1e-5)
            for a, b in zip(grads(ours), g_plain, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        # Micro-batches divided by the effective batch's token count sum to the one big batch's loss.
        n_items = (labels[:, 1:] != -100).sum()
        parts = [completion_loss(model, {"input_ids": ids[i : i + 1], "attention_mask": mask[i : i + 1],
                                         "labels": labels[i : i + 1]}, num_items_in_batch=n_items) for i in range(3)]
        assert sum(p.item() for p in parts) == pytest.approx(plain.item(), rel=1e-5)


def test_fit_prompt_drops_the_oldest_lines_and_keeps_the_tag(tiny_base):
    from transformers import AutoTokenizer

    from inference.engine import encode

    tok = AutoTokenizer.from_pretrained(tiny_base)
    prompt = "\n".join(f"[RIYA] message number {i} with some words" for i in range(40)) + "\n[ALICE]"
    cut = fit_prompt(tok, prompt, 60)
    assert len(encode(tok, cut)) <= 60 and cut.endswith("\n[ALICE]") and prompt.endswith(cut)
    assert fit_prompt(tok, prompt, 10_000) == prompt
    assert fit_prompt(tok, prompt, 1) == "[ALICE]"


# ---------------------------------------------------------------- a tiny run with both budgets, no terminal


def test_tiny_run_plans_memory_and_time_and_logs_progress_without_a_terminal(tmp_path, tiny_base):
    data = write_dataset(tmp_path / "data", n_train=48, n_val=8)
    buf = io.StringIO()
    console = Console(file=buf, width=200)  # a file: not a terminal
    assert not console.is_terminal
    opts = TrainOptions.from_settings(
        TrainSettings(), data_dir=data, base=str(tiny_base), out_dir=tmp_path / "out", batch_size=8, grad_accum=1,
        lora_r=4, lora_alpha=8, sample_prompts=1, sample_max_new_tokens=4, max_val_samples=8,
        max_memory_gb=fixed_bytes(ModelShape(2, 32, 128, 2, 400, 100_000, 4), 10_000) / GIB + 1e-6,  # ~1 sample
        budget_min=0.5, log_every_s=0, epochs=2, warmup_ratio=0.0,
    )
    with torch_threads(1):
        result = train(opts, console=console)
    text = buf.getvalue()
    run = json.loads((tmp_path / "out" / RUN_FILE).read_text())
    memory, plan = run["memory"], run["time_budget"]
    assert memory["micro_batch"] * memory["grad_accum"] == 8 and memory["micro_batch"] < 8
    assert plan["max_steps"] == run["total_steps"] and plan["max_steps"] <= 12  # 2 epochs of 6 steps cap it
    assert result.global_step <= plan["max_steps"]
    assert result.stopped_by in ("budget", "epochs", "early_stopping")
    lines = text.splitlines()
    assert any(line.startswith("memory budget ") and "micro-batch" in line for line in lines)
    assert any(line.startswith("CPU, 1 threads: ") and "validation every" in line for line in lines)
    assert any(line.startswith("loading ") for line in lines) and any("tokenizing" in line for line in lines)
    step_lines = [line for line in lines if line.startswith("training step ")]
    assert step_lines and "ETA" in step_lines[-1] and "loss" in step_lines[-1]
    assert f"training step {result.global_step}/" in text
    assert "\x1b[" not in text  # plain text, no cursor movement


def test_cli_budget_that_is_not_a_duration_is_one_line_exit_2(tmp_path, tiny_base, capsys):
    from convo.cli import run

    data = write_dataset(tmp_path / "data", n_train=8, n_val=2)
    for cmd in (["train", "--data", str(data), "--base", str(tiny_base), "--out", str(tmp_path / "o")],
                ["refine", "--adapter", str(tmp_path / "a"), "--data", str(data), "--out", str(tmp_path / "r")]):
        assert run([*cmd, "--budget", "soon"]) == 2
        err = capsys.readouterr().err
        assert "--budget 'soon' is not a duration" in err and "Traceback" not in err


def test_refine_plans_its_micro_batch_and_its_time(tmp_path, tiny_base):
    from config.settings import RefineSettings
    from training.prefer import refine

    data = write_dataset(tmp_path / "data", n_train=16, n_val=4)
    with torch_threads(1):
        train(TrainOptions.from_settings(
            TrainSettings(), data_dir=data, base=str(tiny_base), out_dir=tmp_path / "sft", max_steps=2, batch_size=8,
            grad_accum=1, eval_steps=2, lora_r=4, lora_alpha=8, sample_prompts=0, max_val_samples=4,
        ), console=Console(file=io.StringIO()))
        buf = io.StringIO()
        opts = RefineOptions.from_settings(
            RefineSettings(), max_pairs=4, max_steps=3, batch_size=4, max_new_tokens=6, budget_min=5.0,
            max_memory_gb=fixed_bytes(ModelShape(2, 32, 128, 2, 400, 100_000, 4), 10_000) / GIB + 1e-6,
        )
        result = refine(tmp_path / "sft", data, tmp_path / "refined", opts, console=Console(file=buf, width=200))
    memory, plan = result.metrics["memory"], result.metrics["time_budget"]
    assert memory["micro_batch"] * memory["grad_accum"] == 4 and memory["micro_batch"] < 4
    assert plan["max_steps"] == 3 and plan["capped_by"] == "epochs"  # 5 minutes allow more than the 3 steps
    assert result.steps == 3
    text = buf.getvalue()
    assert "preference step: memory budget" in text and "preference step: CPU, 1 threads" in text
