"""`convo train`, `convo simulate` and `convo base tiny`: thin shells over training.train, inference.engine and
training.tiny_base. Heavy imports happen inside the commands so `convo --help` stays instant."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from errors import ConfigError

console = Console(highlight=False)


def _state(ctx: typer.Context):
    from convo.cli import state

    return state(ctx)


def budget_minutes(value: str | None) -> float | None:
    """--budget 30m / 1h / 90s / 45 (minutes) -> minutes; ConfigError (one line, exit 2) on anything else."""
    if value is None:
        return None
    from training.budget import parse_budget

    try:
        return parse_budget(value)
    except ValueError as e:
        raise ConfigError(f"--budget {e}") from None


BUDGET_HELP = ("Time budget, e.g. 30m, 1h, 1h30m (0: off): the first steps are timed and the number of steps and the "
               "validation interval chosen to end inside it.")


# ---------------------------------------------------------------- convo train


def train_cmd(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option("--data", help="Dataset dir written by `convo dataset` (train.jsonl, val.jsonl, meta.json).")],
    base: Annotated[str, typer.Option("--base", help="Base model: a local HF model dir (e.g. from `convo base tiny`) or a hub id.")],
    out: Annotated[Path, typer.Option("--out", help="Output dir for the adapter, logs and checkpoints (e.g. adapters/alice); must be fresh unless --resume/--force.")],
    lora_r: Annotated[int | None, typer.Option("--lora-r", min=1, help="LoRA rank. \\[default: train.lora_r = 16]")] = None,
    lora_alpha: Annotated[int | None, typer.Option("--lora-alpha", min=1, help="LoRA alpha. \\[default: train.lora_alpha = 32]")] = None,
    lora_dropout: Annotated[float | None, typer.Option("--lora-dropout", min=0.0, max=1.0, help="LoRA dropout. \\[default: 0.05]")] = None,
    lr: Annotated[float | None, typer.Option("--lr", min=0.0, help="Peak learning rate. \\[default: train.learning_rate = 2e-4]")] = None,
    lr_scheduler: Annotated[str | None, typer.Option("--lr-scheduler", help="LR schedule after warmup (constant_with_warmup, cosine, linear...). \\[default: constant_with_warmup]")] = None,
    warmup_ratio: Annotated[float | None, typer.Option("--warmup-ratio", min=0.0, max=1.0, help="Share of the steps spent warming up. \\[default: 0.05]")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs", min=0.0, help="Passes over the training set (a cap under a time budget). \\[default: 3]")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Stop after this many optimizer steps (overrides --epochs; -1: off).")] = None,
    budget: Annotated[str | None, typer.Option("--budget", help=BUDGET_HELP + " \\[default: train.budget_min; on a CPU run without --max-steps/--epochs, train.cpu_budget_min = 30m]")] = None,
    max_memory_gb: Annotated[float | None, typer.Option("--max-memory-gb", min=0.0, help="Memory the run may use: the micro-batch is the largest that fits (gradient accumulation keeps the effective batch; 0: no bound). \\[default: train.max_memory_gb, from the machine]")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Samples per device per step. \\[default: 8]")] = None,
    grad_accum: Annotated[int | None, typer.Option("--grad-accum", min=1, help="Gradient accumulation steps; batch-size x grad-accum must be <= 32. \\[default: 4]")] = None,
    max_length: Annotated[int | None, typer.Option("--max-length", min=8, help="Max tokens per sample; the oldest context is dropped first. \\[default: 512]")] = None,
    eval_steps: Annotated[int | None, typer.Option("--eval-steps", min=0, help="Validate (and sample, and checkpoint) every N steps; 0: about 8 times per run. \\[default: 0]")] = None,
    max_val_samples: Annotated[int | None, typer.Option("--max-val-samples", min=0, help="Validation samples scored at each evaluation, evenly spread over val.jsonl (0: all). \\[default: 64]")] = None,
    patience: Annotated[int | None, typer.Option("--patience", min=1, help="Early stopping: evaluations without a better validation loss. \\[default: 3]")] = None,
    min_delta: Annotated[float | None, typer.Option("--min-delta", min=0.0, help="Early stopping: nats/token an evaluation must beat the best by. \\[default: 0.005]")] = None,
    target_modules: Annotated[str | None, typer.Option("--target-modules", help="LoRA on all-linear layers or on named ones, e.g. q_proj,v_proj. \\[default: all-linear]")] = None,
    sample_prompts: Annotated[int | None, typer.Option("--sample-prompts", min=0, help="Validation prompts generated at every evaluation. \\[default: 4]")] = None,
    sample_seed: Annotated[int | None, typer.Option("--sample-seed", help="Seed choosing those prompts (a private RNG). \\[default: 0]")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Training seed (LoRA init, shuffling). \\[default: 42]")] = None,
    group_by_length: Annotated[bool | None, typer.Option("--group-by-length/--no-group-by-length", help="Batch samples of similar length (less padding). \\[default: on]")] = None,
    qlora: Annotated[bool, typer.Option("--qlora", help="4-bit NF4 QLoRA (bitsandbytes; on CUDA or the CPU): less memory, slower steps on CPU.")] = False,
    gradient_checkpointing: Annotated[bool | None, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations to save memory. \\[default: on with CUDA, off on CPU]")] = None,
    prefer: Annotated[bool | None, typer.Option("--prefer/--no-prefer", help="After SFT, the preference step: DPO of the person's real replies over the adapter's own samples; the refined adapter is --out, the SFT run moves to --out/sft/. \\[default: train.prefer = on]")] = None,
    prefer_pairs: Annotated[int | None, typer.Option("--prefer-pairs", min=1, help="Training prompts sampled into preference pairs at most. \\[default: refine.max_pairs = 32]")] = None,
    prefer_steps: Annotated[int | None, typer.Option("--prefer-steps", min=0, help="DPO steps of the preference step (0: one pass over the pairs). \\[default: refine.max_steps = 16]")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in --out; logs are appended.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --out.")] = False,
    threads: Annotated[int, typer.Option("--threads", min=0, help="CPU threads for torch (0: torch's choice; 1 is often faster on a busy shared machine).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Train a LoRA adapter for one persona on a dataset dir (TRL SFT, loss on completions only), then refine it
    with the preference step (DPO of their real replies over its own samples; --no-prefer skips it)."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    from training.train import TrainOptions, train

    opts = TrainOptions.from_settings(
        _state(ctx).settings,
        data_dir=data, base=base, out_dir=out, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        learning_rate=lr, lr_scheduler=lr_scheduler, warmup_ratio=warmup_ratio, epochs=epochs,
        max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, max_length=max_length,
        eval_steps=eval_steps, max_val_samples=max_val_samples, early_stopping_patience=patience,
        early_stopping_min_delta=min_delta, lora_target_modules=target_modules, sample_prompts=sample_prompts,
        sample_seed=sample_seed, seed=seed, group_by_length=group_by_length, qlora=qlora,
        gradient_checkpointing=gradient_checkpointing, resume=resume,
        force=force, prefer=prefer, budget_min=budget_minutes(budget), max_memory_gb=max_memory_gb,
    )
    from training.prefer import SFT_DIR

    if resume and (out / SFT_DIR / "convo_adapter.json").is_file():
        raise ConfigError(f"{out}: already trained and refined (the SFT run is in {out / SFT_DIR}); "
                          "nothing to resume, pick a fresh --out or --force")
    out_console = Console(stderr=True) if as_json else console
    result = train(opts, console=out_console)
    summary = {
        "out": str(result.out_dir),
        "interrupted": result.interrupted,
        "steps": result.global_step,
        "stopped_by": result.stopped_by,
        "best_eval_loss": result.best_eval_loss,
        "final_eval_loss": result.final_eval_loss,
        "first_train_loss": result.first_train_loss,
        "last_train_loss": result.last_train_loss,
        "train_seconds": round(result.train_seconds, 1),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "paths": {k: str(v) for k, v in result.paths.items()},
    }
    if not result.interrupted:
        summary["prefer"] = _prefer_step(ctx, opts, out_console, prefer_pairs, prefer_steps)
        if summary["prefer"]["status"] == "refined":
            summary["paths"] = {k: _moved_into_sft(out, v) for k, v in summary["paths"].items()}
            summary["paths"]["adapter"] = str(out)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        table = Table.grid(padding=(0, 2))
        for key in ("steps", "stopped_by", "best_eval_loss", "final_eval_loss", "first_train_loss", "last_train_loss",
                    "train_seconds", "tokens_per_s"):
            value = summary[key]
            table.add_row(key.replace("_", " "), f"{value:.4f}" if isinstance(value, float) and "loss" in key else str(value))
        for name, path in summary["paths"].items():
            table.add_row(name, escape(path))
        p = summary.get("prefer", {})
        if p.get("status") == "refined":
            table.add_row("preference step", f"DPO on {p['pairs']} pairs, {p['steps']} steps: the implicit reward "
                          f"prefers the real reply on {p['accuracy_after']:.0%} of them (margin {p['margin_after']:+.3f})")
        elif p:
            table.add_row("preference step", escape(f"{p['status']}: {p['reason']}"))
        title = "training interrupted: checkpoint saved" if result.interrupted else "adapter trained"
        console.print(Panel(table, title=title, expand=False))
    if summary.get("prefer", {}).get("status") == "interrupted":
        console.print(f"the SFT adapter in {out} is complete; refine it later with: "
                      f"convo refine --adapter {out} --data {data} --out {out}-refined")
        raise typer.Exit(130)
    if result.interrupted:
        console.print(f"continue with: convo train --data {data} --base {base} --out {out} --resume")
        raise typer.Exit(130)


def _moved_into_sft(out: Path, path: str) -> str:
    """Where a file of the SFT run is after the preference step moved the run into <out>/sft/."""
    from training.prefer import SFT_DIR

    try:
        rel = Path(path).resolve().relative_to(out.resolve())
    except ValueError:
        return path
    return str(out / SFT_DIR / rel)


def _prefer_step(ctx, opts, out_console: Console, pairs: int | None, steps: int | None) -> dict:
    """The preference step after SFT (training.prefer.prefer_after_sft), or why it did not run; for the summary."""
    if not opts.prefer:
        return {"status": "skipped", "reason": "off (--no-prefer or train.prefer = false)"}
    from training.prefer import RefineOptions, prefer_after_sft

    settings = _state(ctx).settings
    # a pair (prompt + reply) is cut to no more tokens than an SFT sample was (--max-length)
    ropts = RefineOptions.from_settings(settings, max_pairs=pairs, max_steps=steps, base=opts.base,
                                        max_length=min(settings.refine.max_length, opts.max_length))
    outcome = prefer_after_sft(opts.out_dir, opts.data_dir, ropts, console=out_console)
    if outcome.result is None:
        return {"status": outcome.status, "reason": outcome.reason}
    r = outcome.result
    return {"status": outcome.status, **r.metrics, "sft_dir": str(opts.out_dir / "sft")}


# ---------------------------------------------------------------- convo simulate


def simulate_cmd(
    ctx: typer.Context,
    conversation: Annotated[str | None, typer.Argument(help="Conversation so far, one '[TAG] text' line per message (lines without a tag are yours).")] = None,
    adapter: Annotated[Path | None, typer.Option("--adapter", help="Adapter dir written by `convo train`.")] = None,
    base: Annotated[str | None, typer.Option("--base", help="Base model (default: the one recorded in the adapter).")] = None,
    as_tag: Annotated[str | None, typer.Option("--as", help="Whose turn to write, by tag (default: the adapter's persona).")] = None,
    interactive: Annotated[bool, typer.Option("--interactive", "-i", help="Chat in the terminal: type messages, get candidates.")] = False,
    n: Annotated[int | None, typer.Option("--n", min=1, help="Candidates to sample. \\[default: generate.n = 3]")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", min=0.0, help="Sampling temperature (0: greedy). \\[default: 0.8]")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass. \\[default: 0.95]")] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", min=1, help="Max tokens per candidate. \\[default: 64]")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Sampling seed (default: random).")] = None,
    rerank_k: Annotated[int | None, typer.Option("--rerank-k", min=0, help="Sample this many and keep the N the adapter prefers over the base (0: off). \\[default: generate.rerank_k]")] = None,
    resample_rounds: Annotated[int | None, typer.Option("--resample-rounds", min=0, help="Extra draws when fewer than N clean, distinct candidates came. \\[default: generate.max_resample_rounds]")] = None,
    repetition_penalty: Annotated[float | None, typer.Option("--repetition-penalty", min=1.0, help="Penalty on tokens the reply already holds (prompt and tags exempt). \\[default: generate.repetition_penalty]")] = None,
    no_repeat_ngram: Annotated[int | None, typer.Option("--no-repeat-ngram", min=0, help="Ban repeating an n-gram of the reply (0: off). \\[default: generate.no_repeat_ngram_size]")] = None,
    qlora: Annotated[bool, typer.Option("--qlora", help="Load the base in 4-bit NF4 (bitsandbytes; CUDA or CPU).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print candidates as JSON.")] = False,
) -> None:
    """Continue a conversation as a persona: N clean, distinct candidate bursts from base + adapter (reranked)."""
    from inference.engine import SimulateOptions, parse_conversation, resolve_target, simulate

    gen = SimulateOptions.from_settings(
        _state(ctx).settings.generate, n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
        seed=seed, rerank_k=rerank_k, max_resample_rounds=resample_rounds, repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram,
    )
    if adapter is None and base is None:
        raise ConfigError("simulate needs --adapter DIR (or --base MODEL to try the bare base model)")
    if not interactive and not conversation:
        raise ConfigError('give the conversation, e.g. convo simulate --adapter DIR "[RIYA] you coming?", or use --interactive')
    import transformers

    from inference.engine import Engine

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    with console.status("loading model"):
        engine = Engine.load(base=base, adapter=adapter, qlora=qlora)
    target, me_tag = resolve_target(engine.meta, as_tag)
    if not interactive:
        turns = parse_conversation(conversation, me_tag)
        candidates = simulate(engine, turns, target, gen)
        _print_candidates(target, candidates, as_json)
        return
    _interactive(engine, target, me_tag, gen)


def _print_candidates(target: str, candidates: list[list[str]], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"target": target, "candidates": candidates}, ensure_ascii=False, indent=2))
        return
    if not candidates:
        console.print("[dim](no usable candidate: the model gave only empty or broken text; sample again or raise "
                      "--resample-rounds)[/]")
    for i, messages in enumerate(candidates, 1):
        console.print(f"[bold]{i}.[/]")
        for m in messages:
            console.print(f"   [cyan]\\[{target}][/] {escape(m)}")


def _interactive(engine, target: str, me_tag: str, gen) -> None:
    from inference.engine import parse_conversation, simulate
    from inference.prompt_format import Turn

    console.print(
        f"Chatting with [bold]{target}[/]. Type a message (or '[TAG] text' lines), empty line: sample again, "
        "a number: keep that candidate, /quit: leave."
    )
    import dataclasses

    history: list = []
    candidates: list[list[str]] = []
    rounds = 0
    while True:
        try:
            line = console.input(f"[bold]{me_tag}>[/] ")
        except (EOFError, KeyboardInterrupt):
            break
        line = line.strip()
        if line in ("/quit", "/q", "/exit"):
            break
        if line.isdigit() and candidates:
            k = int(line) - 1
            if 0 <= k < len(candidates):
                history += [Turn(target, m) for m in candidates[k]]
                candidates = []
            continue
        if line:
            if candidates:  # an answer without picking: the first candidate was "sent"
                history += [Turn(target, m) for m in candidates[0]]
            history += parse_conversation(line, me_tag)
        # With --seed, every round gets its own seed (seed, seed+1, ...): "sample again" must give new replies
        # while the whole session stays reproducible.
        round_gen = gen if gen.seed is None else dataclasses.replace(gen, seed=gen.seed + rounds)
        rounds += 1
        candidates = simulate(engine, history, target, round_gen)
        _print_candidates(target, candidates, False)


# ---------------------------------------------------------------- convo base tiny

base_app = typer.Typer(help="Offline base models (model hubs unreachable: build one locally).", no_args_is_help=True)


@base_app.command("tiny")
def base_tiny_cmd(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="Output model dir (HF format), e.g. models/tiny.")],
    corpus: Annotated[str | None, typer.Option("--corpus", help="'chitchat' (the chitchat-dataset package) or a messages.jsonl from `convo ingest`. \\[default: base.corpus]")] = None,
    minutes: Annotated[float | None, typer.Option("--minutes", help="Training time budget in minutes. \\[default: base.minutes = 3]")] = None,
    exclude_speakers: Annotated[list[str] | None, typer.Option("--exclude-speakers", help="Leave out every conversation with this speaker (id or name; repeat or comma-separate).")] = None,
    vocab_size: Annotated[int | None, typer.Option("--vocab-size", help="BPE vocabulary size. \\[default: base.vocab_size = 4096]")] = None,
    hidden_size: Annotated[int, typer.Option("--hidden-size", help="Model width.")] = 128,
    layers: Annotated[int, typer.Option("--layers", help="Transformer layers.")] = 4,
    heads: Annotated[int, typer.Option("--heads", help="Attention heads (must divide --hidden-size).")] = 4,
    max_steps: Annotated[int, typer.Option("--max-steps", help="Stop after this many steps even within the time budget.")] = 1_000_000,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per training block.")] = 128,
    seed: Annotated[int, typer.Option("--seed", help="Seed for tags, order and init.")] = 0,
    threads: Annotated[int, typer.Option("--threads", min=0, help="CPU threads for torch (0: torch's choice). 1 by default: a model this small gains little from more and loses a lot when the cores are busy.")] = 1,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --out.")] = False,
) -> None:
    """Train a byte-level BPE tokenizer and a small Llama from scratch on chat text (offline demo base)."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from training.tiny_base import BaseModelError, build_tiny_base, corpus_texts, sample_text

    s = _state(ctx).settings.base
    corpus = corpus or s.corpus
    minutes = minutes if minutes is not None else s.minutes
    excluded = [x.strip() for item in exclude_speakers or [] for x in item.split(",") if x.strip()]
    if out.exists() and any(out.iterdir()) and not force:
        raise BaseModelError(f"{out}: already exists; pick a fresh --out or pass --force to overwrite")
    if hidden_size % heads:
        raise ConfigError(f"--hidden-size {hidden_size} is not divisible by --heads {heads}")
    with console.status(f"reading corpus {corpus}"):
        texts, meta = corpus_texts(corpus, excluded, seed=seed)
    meta["speakers_excluded"] = excluded
    console.print(f"corpus: {len(texts)} conversations ({escape(corpus)})")
    budget_s = minutes * 60
    with Progress(
        TextColumn("[bold]base"), BarColumn(), TextColumn("step {task.fields[step]}"),
        TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), console=console,
    ) as progress:
        task = progress.add_task("base", total=budget_s, step=0, loss="-")

        def on_step(step: int, loss: float, elapsed_s: float) -> None:
            if step % 5 == 0 or elapsed_s >= budget_s:
                progress.update(task, completed=min(elapsed_s, budget_s), step=step, loss=f"{loss:.3f}")

        started = time.monotonic()
        result = build_tiny_base(
            out, texts, vocab_size=vocab_size or s.vocab_size, hidden_size=hidden_size, num_layers=layers,
            num_heads=heads, max_steps=max_steps, max_minutes=minutes, seed=seed, seq_len=seq_len,
            meta=meta, on_step=on_step,
        )
        progress.update(task, completed=budget_s)
    sample = sample_text(out, "[ALICE] hey what are you up to?\n[BOB]", seed=seed)
    table = Table.grid(padding=(0, 2))
    table.add_row("model", escape(str(result.out_dir)))
    table.add_row("parameters", f"{result.n_params:,}")
    table.add_row("steps", str(result.steps))
    table.add_row("final loss", f"{result.final_loss:.3f}" if result.final_loss == result.final_loss else "-")
    table.add_row("time", f"{time.monotonic() - started:.0f} s")
    table.add_row("tokens/s", f"{result.tokens_seen / max(result.seconds, 1e-9):,.0f}")
    table.add_row("sample", escape("[ALICE] hey what are you up to?\n[BOB]" + sample.split("\n[END]")[0]))
    console.print(Panel(table, title="base model built", expand=False))


# ---------------------------------------------------------------- convo refine


def refine_cmd(
    ctx: typer.Context,
    adapter: Annotated[Path, typer.Option("--adapter", help="The SFT adapter dir to refine (a `convo train` --out).")],
    data: Annotated[Path, typer.Option("--data", help="Its dataset dir (`convo dataset`): the real replies come from train.jsonl.")],
    out: Annotated[Path, typer.Option("--out", help="New adapter dir (must be fresh unless --force).")],
    base: Annotated[str | None, typer.Option("--base", help="Base model dir (default: the one the adapter records).")] = None,
    max_pairs: Annotated[int | None, typer.Option("--max-pairs", min=1, help="Training prompts turned into pairs at most. \\[default: refine.max_pairs = 32]")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", min=0, help="DPO steps (0: one pass over the pairs). \\[default: 16]")] = None,
    lr: Annotated[float | None, typer.Option("--lr", min=0.0, help="Learning rate. \\[default: 5e-5]")] = None,
    beta: Annotated[float | None, typer.Option("--beta", min=0.0, help="DPO beta: higher stays closer to the SFT adapter. \\[default: 0.1]")] = None,
    budget: Annotated[str | None, typer.Option("--budget", help="Time budget for the whole step, sampling included, e.g. 10m (0: off): the DPO steps are timed and capped to fit. \\[default: refine.budget_min = 0]")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing adapter dir in --out.")] = False,
    threads: Annotated[int, typer.Option("--threads", min=0, help="CPU threads for torch (0: torch's choice).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Preference step from the person's own history: DPO of their real replies over the adapter's own samples."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    from training.prefer import RefineOptions, refine

    opts = RefineOptions.from_settings(_state(ctx).settings, max_pairs=max_pairs, max_steps=max_steps,
                                       learning_rate=lr, beta=beta, base=base, force=force,
                                       budget_min=budget_minutes(budget))
    result = refine(adapter, data, out, opts, console=Console(stderr=True) if as_json else console)
    summary = {"out": str(result.out_dir), **result.metrics, "paths": {k: str(v) for k, v in result.paths.items()}}
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    table = Table.grid(padding=(0, 2))
    for key in ("pairs", "skipped_equal", "steps", "margin_after", "accuracy_after", "sample_seconds", "train_seconds"):
        table.add_row(key.replace("_", " "), str(summary[key]))
    for name, path in summary["paths"].items():
        table.add_row(name, escape(path))
    console.print(Panel(table, title="adapter refined (DPO margin before: 0)", expand=False))


def register(app: typer.Typer) -> None:
    """Add `train`, `refine`, `simulate` and the `base` sub-app to the app."""
    app.command("train")(train_cmd)
    app.command("refine")(refine_cmd)
    app.command("simulate")(simulate_cmd)
    app.add_typer(base_app, name="base")
