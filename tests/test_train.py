"""LoRA training end to end on a tiny in-process base model (CPU, seconds per run)."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import pytest

from config.settings import TrainSettings
from convo.cli import run
from errors import AdapterMismatch, ConfigError, TrainError
from inference.adapter_meta import ADAPTER_META_FILE, read_adapter_meta
from tests.conftest import torch_threads
from tests.fixtures.train.make_dataset import write_dataset
from training.train import TRAIN_LOG, TrainOptions, choose_sample_indices, train

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def _opts(data: Path, base: Path, out: Path, **kw) -> TrainOptions:
    values = dict(
        data_dir=data, base=str(base), out_dir=out, max_steps=12, batch_size=8, grad_accum=1, eval_steps=6,
        learning_rate=1e-2, lora_r=8, lora_alpha=16, sample_prompts=2, sample_max_new_tokens=8, logging_steps=2,
        warmup_ratio=0.0, early_stopping_patience=10,
    )
    values.update(kw)
    return TrainOptions.from_settings(TrainSettings(), **values)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "alice", n_train=48, n_val=12)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data, tiny_base):
    """One 30-step run shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("adapters") / "alice"
    return train(_opts(data, tiny_base, out, max_steps=30, eval_steps=10))


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / TRAIN_LOG).read_text().splitlines()]


def test_loss_goes_down_and_outputs_are_written(trained):
    out = trained.out_dir
    evals = [r["eval_loss"] for r in _log(out) if "eval_loss" in r]
    losses = [r["loss"] for r in _log(out) if "loss" in r]
    assert len(evals) >= 3 and evals[-1] < evals[0], evals
    assert losses[-1] < losses[0] - 0.5, losses
    assert evals[-1] < losses[0] - 0.5  # validation ends far below where training started
    for name in ("adapter_model.safetensors", "adapter_config.json", ADAPTER_META_FILE, "loss.png", "samples.jsonl"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = read_adapter_meta(out)
    assert meta.persona.tag == "ALICE" and meta.mode == "friend"
    assert meta.base_model.local_path_sha256 and meta.dataset_sha256
    assert meta.training_args["lora_r"] == 8
    assert meta.final_metrics["best_eval_loss"] == pytest.approx(min(evals))
    assert not list(out.glob(".*"))  # no temp files left behind
    assert len(evals) == 3  # one per scheduled evaluation: the best model is not evaluated again at the end
    assert trained.final_eval_loss == pytest.approx(min(evals)) == meta.final_metrics["final_eval_loss"]
    assert meta.final_metrics["stopped_by"] == trained.stopped_by == "max_steps"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in samples) == [10, 10, 20, 20, 30, 30]  # each evaluation once
    assert all(r["target"] == "ALICE" and r["real"] and isinstance(r["generated"], list) for r in samples)


def test_only_completion_tokens_carry_loss(trained, data):
    trainer = trained.trainer
    tok = trainer.processing_class
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    by_ids = {tuple(tok(r["prompt"] + r["completion"], add_special_tokens=True)["input_ids"]): r for r in rows}
    examples = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(examples)  # what the model is trained on: padded ids and labels
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        n = int(mask.sum())
        row = by_ids[tuple(ids[:n].tolist())]
        prompt_len = len(tok(row["prompt"])["input_ids"])
        assert (labels[:prompt_len] == -100).all()  # prompt: no loss
        assert (labels[n:] == -100).all()  # padding: no loss
        assert labels[prompt_len:n].tolist() == ids[prompt_len:n].tolist()  # completion: every token
        assert tok.decode(ids[prompt_len:n]) == row["completion"]


def test_adapter_reloads_to_identical_outputs_and_base_is_untouched(trained, tiny_base):
    import torch
    from transformers import AutoModelForCausalLM

    from inference.engine import Engine

    pairs = [("[RIYA] you coming?\n[ALICE]", " omg yes 🙌\n[RIYA]"), ("[RIYA] lol\n[ALICE]", " nah sorry\n[END]")]
    live = Engine(trained.trainer.model, trained.trainer.processing_class)
    loaded = Engine.load(adapter=trained.out_dir)
    assert loaded.meta is not None and loaded.meta.persona.tag == "ALICE"
    a, b = live.completion_nll(pairs), loaded.completion_nll(pairs)
    for (x, nx), (y, ny) in zip(a, b, strict=True):
        assert nx == ny and x == pytest.approx(y, rel=1e-5)
    assert loaded.generate_raw(pairs[0][0], "ALICE", n=2, seed=3) == loaded.generate_raw(pairs[0][0], "ALICE", n=2, seed=3)

    base = AutoModelForCausalLM.from_pretrained(tiny_base).state_dict()
    state = loaded.model.state_dict()
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # LoRA B starts at zero: it learned
    base_keys = [k for k in state if "lora_" not in k]
    assert base_keys
    for k in base_keys:
        name = k.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(state[k], base[name]), k  # the shared base stays exactly as it was
    with loaded.adapter_disabled():
        base_nll = loaded.completion_nll(pairs)
    assert base_nll[0][0] > b[0][0]  # the adapter made ALICE's typical reply more likely


def test_sample_prompts_follow_the_private_seed(tmp_path, data, tiny_base):
    random.seed(1)
    first = choose_sample_indices(12, 3, seed=5)
    random.seed(2)  # what the Trainer's set_seed does to the global RNG
    assert choose_sample_indices(12, 3, seed=5) == first
    assert choose_sample_indices(12, 3, seed=6) != first

    def prompts(out: Path, sample_seed: int, global_seed: int) -> set[str]:
        random.seed(global_seed)
        train(_opts(data, tiny_base, out, max_steps=2, eval_steps=2, sample_seed=sample_seed, sample_prompts=3))
        return {json.loads(line)["prompt"] for line in (out / "samples.jsonl").read_text().splitlines()}

    a = prompts(tmp_path / "a", 5, 1)
    b = prompts(tmp_path / "b", 5, 2)
    c = prompts(tmp_path / "c", 6, 1)
    assert len(a) == 3 and a == b and a != c


def test_ctrl_c_leaves_a_resumable_checkpoint_and_resume_appends_logs(tmp_path, data, tiny_base):
    from transformers import TrainerCallback

    class CtrlCAtStep3(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "run"
    first = train(_opts(data, tiny_base, out, max_steps=10, eval_steps=5), extra_callbacks=[CtrlCAtStep3()])
    assert first.interrupted and first.global_step == 4
    assert (out / "checkpoints" / "checkpoint-4").is_dir()
    assert not (out / ADAPTER_META_FILE).exists()
    before = _log(out)
    tb_before = sorted(p.name for p in (out / "tensorboard").glob("events.*"))

    second = train(_opts(data, tiny_base, out, max_steps=10, eval_steps=5, resume=True))
    assert not second.interrupted and second.global_step == 10
    after = _log(out)
    assert after[: len(before)] == before  # appended, not rewritten
    assert max(r["step"] for r in after) == 10 and min(r["step"] for r in after[len(before):]) > 4
    assert len(list((out / "tensorboard").glob("events.*"))) > len(tb_before)
    assert read_adapter_meta(out).final_metrics["global_step"] == 10


def test_existing_out_needs_resume_or_force(tmp_path, data, tiny_base):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(TrainError, match="already exists"):
        train(_opts(data, tiny_base, out))
    with pytest.raises(TrainError, match="no checkpoint to resume"):
        train(_opts(data, tiny_base, out, resume=True))
    with pytest.raises(TrainError, match="not a `convo train` output dir"):
        train(_opts(data, tiny_base, out, force=True))  # never deletes a dir it did not make
    assert (out / "something").is_file()
    train(_opts(data, tiny_base, out / "run", max_steps=1, eval_steps=1, sample_prompts=0))
    (out / "run" / "something").write_text("x")
    result = train(_opts(data, tiny_base, out / "run", max_steps=2, eval_steps=2, force=True, sample_prompts=0))
    assert not (out / "run" / "something").exists() and (out / "run" / ADAPTER_META_FILE).is_file()
    assert result.global_step == 2


def test_cli_errors_are_one_line_exit_2(tmp_path, data, tiny_base, capsys):
    out = tmp_path / "x"
    out.mkdir()
    (out / "f").write_text("x")
    assert run(["train", "--data", str(data), "--base", str(tiny_base), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "Traceback" not in err
    code = run(["train", "--data", str(data), "--base", str(tiny_base), "--out", str(tmp_path / "y"),
                "--batch-size", "16", "--grad-accum", "4"])
    assert code == 2 and "effective batch 64" in capsys.readouterr().err
    assert run(["train", "--data", str(tmp_path / "nodata"), "--base", str(tiny_base), "--out", str(tmp_path / "z")]) == 2
    assert "meta.json" in capsys.readouterr().err
    # LoRA on a layer the worker cannot serve (an embedding) is refused before any training, not after
    code = run(["train", "--data", str(data), "--base", str(tiny_base), "--out", str(tmp_path / "e"),
                "--target-modules", "q_proj,embed_tokens", "--max-steps", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "embed_tokens" in err and "Embedding" in err and "Traceback" not in err
    assert not (tmp_path / "e" / "adapter_config.json").exists()


def test_effective_batch_over_32_is_refused(tmp_path, data, tiny_base):
    with pytest.raises(ConfigError, match="lower --batch-size or --grad-accum"):
        train(_opts(data, tiny_base, tmp_path / "o", batch_size=16, grad_accum=4))


@pytest.fixture(scope="module")
def qlora_base(tmp_path_factory) -> Path:
    """A tiny base whose linear layers bitsandbytes' CPU 4-bit path accepts: every in_features a multiple of its
    64-value blocks (hidden 192, MLP 512); the shared tiny_base (hidden 32) is too small for it."""
    from tests.conftest import _TINY_LINES
    from training.tiny_base import build_tiny_base, render_conversation

    rng = random.Random(0)
    texts = [render_conversation([(str(i % 2), rng.choice(_TINY_LINES)) for i in range(4)], rng) for _ in range(100)]
    out = tmp_path_factory.mktemp("qlora_base") / "model"
    build_tiny_base(out, texts, vocab_size=400, hidden_size=192, num_layers=2, num_heads=2, max_steps=0, seq_len=64)
    return out


def test_qlora_trains_on_cpu(tmp_path, data, qlora_base):
    """4-bit NF4 base (bitsandbytes CPU kernels), LoRA on top: a few steps run and only the adapter learns."""
    import torch
    from bitsandbytes.nn import Linear4bit

    result = train(_opts(data, qlora_base, tmp_path / "q", qlora=True, max_steps=4, eval_steps=2, sample_prompts=0))
    model = result.trainer.model
    assert any(isinstance(m, Linear4bit) for m in model.modules())  # the base really is 4-bit
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.detach().abs().sum()) > 0 for p in lora_b)  # B starts at 0: it moved
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    evals = [r["eval_loss"] for r in _log(result.out_dir) if "eval_loss" in r]
    assert evals and all(torch.isfinite(torch.tensor(e)) for e in evals)
    assert read_adapter_meta(result.out_dir).training_args["qlora"] is True
    assert (result.out_dir / "adapter_model.safetensors").is_file()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU shape rule")
def test_qlora_on_cpu_with_widths_bitsandbytes_cannot_block_is_a_clear_error(tmp_path, data, tiny_base, capsys):
    code = run(["train", "--data", str(data), "--base", str(tiny_base), "--out", str(tmp_path / "q"), "--qlora"])
    err = capsys.readouterr().err
    assert code == 2 and "multiples of 64" in err and "hidden_size=32" in err and "Traceback" not in err


def test_cli_qlora_on_cpu_is_accepted(tmp_path, data, qlora_base, capsys):
    code = run(["train", "--data", str(data), "--base", str(qlora_base), "--out", str(tmp_path / "q"), "--qlora",
                "--max-steps", "2", "--eval-steps", "2", "--batch-size", "8", "--grad-accum", "1",
                "--sample-prompts", "0", "--no-prefer", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert json.loads(out.out)["steps"] == 2
    assert "kernels-community" not in out.err  # bitsandbytes' offline hub-kernel warning is filtered
    code = run(["simulate", "--adapter", str(tmp_path / "q"), "--qlora", "--n", "2", "--max-new-tokens", "6",
                "--seed", "1", "--json", "[BOB] hey are you coming?"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert len(json.loads(out.out)["candidates"]) == 2


def test_cli_train_then_simulate(tmp_path, data, tiny_base, capsys):
    out = tmp_path / "cli"
    code = run(["train", "--data", str(data), "--base", str(tiny_base), "--out", str(out), "--max-steps", "4",
                "--eval-steps", "2", "--batch-size", "8", "--grad-accum", "1", "--sample-prompts", "1",
                "--max-length", "96", "--prefer-pairs", "6", "--prefer-steps", "2", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    # --max-length bounds the preference pairs too (refine.max_length, 256, would let them grow past it)
    refine_args = json.loads((out / "convo_adapter.json").read_text())["training_args"]["refine"]
    assert refine_args["max_length"] == 96
    assert summary["steps"] == 4 and Path(summary["paths"]["meta"]).is_file()
    # The preference step ran by default: the refined adapter is --out, the SFT run's files moved to --out/sft/.
    assert summary["prefer"]["status"] == "refined" and summary["prefer"]["steps"] == 2
    assert Path(summary["paths"]["meta"]).parent == out / "sft" and summary["paths"]["adapter"] == str(out)
    code = run(["simulate", "--adapter", str(out), "[RIYA] you coming?", "--n", "2", "--seed", "1",
                "--max-new-tokens", "8", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["target"] == "ALICE" and len(result["candidates"]) == 2
    assert all(isinstance(m, str) for c in result["candidates"] for m in c)
    code = run(["simulate", "--adapter", str(out), "--as", "BOB", "hi"])
    assert code == 2 and "known tags: ALICE, RIYA" in capsys.readouterr().err


def test_mismatched_adapter_is_refused(tmp_path, trained, capsys):
    import shutil

    from inference.engine import Engine

    adapter = tmp_path / "old_format"
    shutil.copytree(trained.out_dir, adapter, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    meta = json.loads((adapter / ADAPTER_META_FILE).read_text())
    meta["format_version"] = 0
    (adapter / ADAPTER_META_FILE).write_text(json.dumps(meta))
    with pytest.raises(AdapterMismatch, match="prompt format v0"):
        Engine.load(adapter=adapter)
    assert run(["simulate", "--adapter", str(adapter), "hi"]) == 2
    err = capsys.readouterr().err
    assert "retrain" in err and "Traceback" not in err

    other_base = tmp_path / "other_base"
    shutil.copytree(meta["base_model"]["id"], other_base)
    (other_base / "model.safetensors").write_bytes((other_base / "model.safetensors").read_bytes()[:-1] + b"\0")
    with pytest.raises(AdapterMismatch, match="different base"):
        Engine.load(base=other_base, adapter=trained.out_dir)
    assert run(["simulate", "--adapter", str(trained.out_dir), "--base", str(other_base), "hi"]) == 2
    assert "different base" in capsys.readouterr().err


def test_interactive_simulate_keeps_history_and_resamples(trained, monkeypatch, capsys):
    from convo.commands import train as train_cmd

    lines = iter(["you coming?", "", "1", "/quit"])
    monkeypatch.setattr(train_cmd.console, "input", lambda prompt="": next(lines))
    seen: list[tuple[list, int | None]] = []
    import inference.engine as engine_mod

    real = engine_mod.simulate

    def spy(engine, history, target, gen):
        seen.append((list(history), gen.seed))
        return real(engine, history, target, gen)

    monkeypatch.setattr(engine_mod, "simulate", spy)
    code = run(["simulate", "--adapter", str(trained.out_dir), "--interactive", "--n", "2", "--seed", "5",
                "--max-new-tokens", "6"])
    assert code == 0
    assert len(seen) == 2  # the message, then "sample again"; picking "1" samples nothing
    (h1, s1), (h2, s2) = seen
    assert h1 == h2 and h1[-1].text == "you coming?" and h1[-1].speaker == "RIYA"
    assert (s1, s2) == (5, 6)  # each round its own seed: a resample gives new replies, reproducibly
    assert "Chatting with" in capsys.readouterr().out


def test_early_stopping_triggers_on_a_capped_validation_set_with_q_v_only(tmp_path, data, tiny_base):
    """min_delta larger than any gain: after `patience` evaluations without one the run stops, well before the cap."""
    result = train(_opts(data, tiny_base, tmp_path / "es", max_steps=40, eval_steps=2, early_stopping_patience=2,
                         early_stopping_min_delta=10.0, max_val_samples=4, lora_target_modules="q_proj,v_proj",
                         sample_prompts=0))
    assert result.stopped_by == "early_stopping" and result.global_step == 6  # evals at 2 (best), 4, 6
    run_record = json.loads((result.out_dir / "run.json").read_text())
    assert run_record["val_samples"] == 4 and run_record["eval_steps"] == 2
    names = [n for n, _ in result.trainer.model.named_parameters() if "lora_A" in n]
    assert names and {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in names} == {"q_proj", "v_proj"}
    meta = read_adapter_meta(result.out_dir)
    assert meta.final_metrics["stopped_by"] == "early_stopping"
    assert meta.training_args["lora_target_modules"] == "q_proj,v_proj"


def test_training_defaults_helpers():
    from training.train import auto_eval_steps, lora_targets, spread, stopped_by

    rows = [{"i": i} for i in range(10)]
    assert [r["i"] for r in spread(rows, 4)] == [0, 2, 5, 7] and spread(rows, 0) == rows and spread(rows, 20) == rows
    assert auto_eval_steps(16) == 2 and auto_eval_steps(3) == 1 and auto_eval_steps(900) == 113
    assert lora_targets("all-linear") == "all-linear" and lora_targets(" q_proj, v_proj ") == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="lora_target_modules is empty"):
        lora_targets(" , ")
    assert stopped_by(6, 40, 40) == "early_stopping" and stopped_by(40, 40, 40) == "max_steps"
    assert stopped_by(12, 12, -1) == "epochs"
    defaults = TrainSettings()
    assert defaults.lr_scheduler == "constant_with_warmup"  # no decay to 0 at an arbitrary step cap
    assert defaults.eval_steps == 0 and defaults.max_val_samples > 0 and defaults.early_stopping_min_delta > 0


def test_loss_curve_smooths_training_and_shows_every_validation(tmp_path):
    """What the plot draws: each logged loss faint, their moving average, and validation at every evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.evaluate.report import draw_loss, ema, read_train_log

    assert ema([(1, 2.0), (2, 2.0), (3, 2.0)], span=4) == [(1, 2.0), (2, 2.0), (3, 2.0)]  # bias-corrected start
    # Batches alternating short (high loss) and long (low loss) over a slow decline: the average declines smoothly.
    raw = [(s, 3.0 - 0.02 * s + (0.4 if s % 2 else -0.4)) for s in range(1, 41)]
    smooth = [v for _, v in ema(raw, span=8)][8:]
    assert all(b < a for a, b in zip(smooth[::2], smooth[2::2], strict=False))
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": v}) + "\n" for s, v in raw)
                   + "".join(json.dumps({"step": s, "eval_loss": 3.0 - 0.02 * s}) + "\n" for s in (10, 20, 30, 40))
                   + json.dumps({"step": 40, "eval_loss": 2.2, "final_best_model": True}) + "\n")  # an older log
    series = read_train_log(log)
    assert [s for s, _ in series["validation"]] == [10, 20, 30, 40]
    fig, ax = plt.subplots()
    draw_loss(ax, series)
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["train (each log)", "train (moving average)", "validation"]
    plt.close(fig)
