"""Training throughput: length-grouped batching vs random, and LoRA vs QLoRA on the tiny and the real base.

    .venv/bin/python bench/train.py [--base models/tiny] [--conversations 400] [--steps 40] [--threads 1]
    .venv/bin/python bench/train.py --compare-bases [--steps 8] [--max-length 128] [--batch-size 4] [--threads 1]
    .venv/bin/python bench/train.py --compare-targets --base models/smollm2-135m [--steps 30] [--eval-steps 5]
        [--batch-size 4] [--max-length 128] [--conversations 60] [--val-samples 32] [--lr 1e-3] [--threads 1]

    .venv/bin/python bench/train.py --compare-memory [--bases DIR,DIR] [--steps 2] [--batch-size 1]
        [--before-batch-size 8] [--before-steps 1] [--max-length 512] [--context 64] [--max-memory-gb 4]
        [--rss-cap-gb 6.5] [--threads 2] [--json]

`--compare-memory` runs each base (SmolLM2-135M and Gemma-3-270M by default) with LoRA and QLoRA "after" (the
memory bound: micro-batch sized to train.max_memory_gb, the chunked completion-only loss) and then "before"
(`max_memory_gb = 0`: the whole batch in one micro-batch, TRL's own loss, as `convo train` was), plus the
preference step (DPO) after and before on the first base's adapter, each in its own process, and prints peak RSS,
tokens/s and s/step side by side. A run whose RSS passes --rss-cap-gb is stopped there (the old defaults can take
more memory than a shared machine has) and reported as "> cap".

`--compare-targets` trains LoRA on all linear layers and on q_proj/v_proj only, with everything else equal, and
prints the validation loss at every evaluation and the wall time of each, side by side.

`--compare-bases` trains LoRA and QLoRA (4-bit NF4, bitsandbytes on the CPU) on an untrained tiny base (hidden
192, 4 layers: bitsandbytes' 4-bit CPU path needs layer widths that are multiples of 64) and on SmolLM2-135M
(`convo base smollm2`), each run in its own process so its peak RSS is its own, and prints non-padding
tokens/s and peak RSS per run (`--json` for the raw figures). The default mode:

Builds a prompt/completion dataset from chitchat-dataset conversations (the second speaker of each conversation is
the persona, up to 16 messages of context), then trains the same LoRA twice on the same base, once with random
batches and once with `group_by_length`, timing only the optimizer steps (not evaluation or checkpointing).
Prints non-padding tokens/s, the share of padded positions over one epoch of the sampler, seconds per step,
the process's peak RSS, and the ratios. Without --base it builds an untrained tiny base first (throughput does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.prompt_format import FORMAT_VERSION, Turn, render_completion, render_prompt  # noqa: E402


def chitchat_dataset_dir(out: Path, conversations: int, context: int = 16, seed: int = 0) -> Path:
    """Write train/val prompt-completion rows from chitchat conversations (persona = second speaker)."""
    import chitchat_dataset

    data = chitchat_dataset.Dataset()
    keys = sorted(data)
    random.Random(seed).shuffle(keys)
    rows = []
    for key in keys[:conversations]:
        msgs = [(m["sender"], m["text"]) for block in data[key]["messages"] for m in block if m["text"].strip()]
        speakers = list(dict.fromkeys(s for s, _ in msgs))
        if len(speakers) != 2:
            continue
        tag = {speakers[0]: "RIYA", speakers[1]: "ALICE"}
        turns = [Turn(tag[s], t) for s, t in msgs]
        i = 0
        while i < len(turns):
            j = i
            while j < len(turns) and turns[j].speaker == turns[i].speaker:
                j += 1
            if turns[i].speaker == "ALICE" and i > 0:
                following = turns[j].speaker if j < len(turns) else None
                rows.append({
                    "prompt": render_prompt(turns[max(0, i - context) : i], "ALICE"),
                    "completion": render_completion("ALICE", [t.text for t in turns[i:j]], following),
                    "session": key, "chat": key, "target": "ALICE",
                })
            i = j
    n_val = max(1, len(rows) // 20)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[n_val:]), ("val", rows[:n_val])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
    meta = {
        "format_version": FORMAT_VERSION,
        "persona": {"name": "Alice", "speaker_id": "b", "tag": "ALICE"},
        "me": {"name": "Riya", "speaker_id": "a", "tag": "RIYA"},
        "tags": {"a": "RIYA", "b": "ALICE"}, "mode": "friend",
        "counts": {"train": len(rows) - n_val, "val": n_val},
    }
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def padding_waste(trainer) -> tuple[float, int]:
    """Share of padded positions over one epoch of the trainer's sampler, and the number of batches."""
    real = total = batches = 0
    for batch in trainer.get_train_dataloader():
        mask = batch["attention_mask"]
        real += int(mask.sum())
        total += mask.numel()
        batches += 1
    return 1 - real / total, batches


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _StepTimer:
    """Wall time and non-padding tokens between the first step's start and the last step's end."""

    @staticmethod
    def make():
        from transformers import TrainerCallback

        class StepTimer(TrainerCallback):
            def on_step_begin(self, a, state, control, **kw):
                if state.global_step == 0:
                    self.t_first = time.perf_counter()
                if state.global_step == 1:  # step 0 pays one-off costs; time from the second step on
                    self.t0, self.tok0 = time.perf_counter(), state.num_input_tokens_seen

            def on_step_end(self, a, state, control, **kw):
                self.t1, self.tok1 = time.perf_counter(), state.num_input_tokens_seen

        return StepTimer()


def _rss_watchdog(cap_gb: float) -> None:
    """Stop this process (exit 3, one JSON line saying so) once its RSS passes `cap_gb`: a "before" run at the
    old defaults can take more memory than a shared machine has, and the kernel would kill someone else's."""
    import os
    import threading

    import psutil

    me = psutil.Process()

    def watch():
        while True:
            rss = me.memory_info().rss
            if rss > cap_gb * 1024**3:
                print(json.dumps({"rss_cap_hit": True, "peak_rss_mib": rss / 1024**2, "cap_gb": cap_gb}), flush=True)
                os._exit(3)
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()


def one_run(args) -> dict:
    """One LoRA or QLoRA run in this process (`--one BASE`): tokens/s over the timed steps and this process's peak RSS."""
    import torch
    from rich.console import Console

    from config.settings import TrainSettings
    from training.tiny_base import build_tiny_base, chitchat_texts
    from training.train import RUN_FILE, TrainOptions, train

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_cap_gb:
        _rss_watchdog(args.rss_cap_gb)
    work = Path(tempfile.mkdtemp(prefix="convo-bench-train-"))
    base = args.one
    if base == "tiny":
        texts, _ = chitchat_texts(limit=2000)
        base = str(work / "base")
        build_tiny_base(base, texts, vocab_size=2048, hidden_size=192, num_layers=4, num_heads=4, max_steps=0)
    data = chitchat_dataset_dir(work / "data", args.conversations, context=args.context)
    rss_before = peak_rss_mib()
    timer = _StepTimer.make()
    result = train(
        TrainOptions.from_settings(
            TrainSettings(),
            data_dir=data, base=base, out_dir=work / "run", max_steps=args.steps, eval_steps=args.steps,
            batch_size=args.batch_size, grad_accum=args.grad_accum, max_length=args.max_length, sample_prompts=0,
            qlora=args.qlora, max_val_samples=2, prefer=False,
            max_memory_gb=0 if args.before else args.max_memory_gb,  # 0: no bound, TRL's own loss (the old path)
        ),
        console=Console(file=open("/dev/null", "w")), extra_callbacks=[timer],  # noqa: SIM115
    )
    seconds = timer.t1 - timer.t0 if args.steps > 1 else timer.t1 - timer.t_first
    memory = json.loads((work / "run" / RUN_FILE).read_text())["memory"]
    return {"base": args.one, "mode": "qlora" if args.qlora else "lora", "before": args.before, "steps": args.steps,
            "tokens_per_s": (timer.tok1 - (timer.tok0 if args.steps > 1 else 0)) / seconds,
            "seconds_per_step": seconds / max(1, args.steps - 1),
            "peak_rss_mib": peak_rss_mib(), "rss_before_training_mib": rss_before,
            "torch_threads": torch.get_num_threads(), "memory_plan": memory, "adapter": str(result.out_dir),
            "data": str(data)}


def one_refine(args) -> dict:
    """The preference step (DPO, refine.* defaults) on an adapter in this process (`--refine ADAPTER`)."""
    import torch
    from rich.console import Console

    from config.settings import RefineSettings
    from training.prefer import RefineOptions, refine

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_cap_gb:
        _rss_watchdog(args.rss_cap_gb)
    out = Path(tempfile.mkdtemp(prefix="convo-bench-refine-")) / "refined"
    opts = RefineOptions.from_settings(RefineSettings(), max_pairs=args.pairs, max_steps=args.steps,
                                       max_memory_gb=0 if args.before else args.max_memory_gb)
    result = refine(args.refine, args.data, out, opts, console=Console(file=open("/dev/null", "w")))  # noqa: SIM115
    return {"base": "refine", "mode": "dpo", "before": args.before, "steps": result.steps,
            "seconds_per_step": result.train_seconds / max(1, result.steps), "peak_rss_mib": peak_rss_mib(),
            "memory_plan": result.metrics.get("memory"), "torch_threads": torch.get_num_threads()}


def compare_memory(args) -> None:
    """Before (no memory bound, TRL's own loss) and after (train.max_memory_gb from the machine, the chunked
    completion loss) for each base, LoRA and QLoRA, and the preference step; each run in its own process."""
    import subprocess

    import psutil

    cap = args.rss_cap_gb or max(4.0, psutil.virtual_memory().available / 1024**3 - 3.0)
    rows = []

    def launch(extra: list[str]) -> dict:
        cmd = [sys.executable, __file__, *extra, "--rss-cap-gb", f"{cap:.1f}",
               *(["--threads", str(args.threads)] if args.threads else []),
               *(["--max-memory-gb", str(args.max_memory_gb)] if args.max_memory_gb is not None else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode not in (0, 3) or not lines:
            sys.exit(f"bench run failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        return json.loads(lines[-1])

    bases = args.bases.split(",")
    # After (the targets) first, then before, which at the old defaults may hit the cap.
    for before in (False, True):
        for base in bases:
            for qlora in (False, True):
                if before and qlora and not args.before_qlora:
                    continue
                batch = args.before_batch_size if before else args.batch_size
                r = launch(["--one", base, "--steps", str(args.before_steps if before else args.steps),
                            "--batch-size", str(batch), "--grad-accum", str(args.grad_accum),
                            "--max-length", str(args.max_length), "--conversations", str(args.conversations),
                            "--context", str(args.context), *(["--qlora"] if qlora else []),
                            *(["--before"] if before else [])])
                rows.append({**r, "base": Path(base).name, "mode": "qlora" if qlora else "lora", "before": before,
                             "batch": batch})
                _print_row(rows[-1], cap)
                if not qlora and base == bases[0] and "adapter" in r and not before:
                    sft = r
        for_dpo = [] if args.skip_dpo else [before]
        for b in for_dpo:
            r = launch(["--refine", sft["adapter"], "--data", sft["data"], "--steps", "2", "--pairs", "8",
                        *(["--before"] if b else [])])
            rows.append({**r, "base": Path(bases[0]).name, "mode": "dpo", "before": b})
            _print_row(rows[-1], cap)
    if args.json:
        print(json.dumps(rows, indent=2))
    print(f"(batch {args.batch_size} x {args.grad_accum} accumulation, max length {args.max_length}, {args.context} "
          f"messages of context; {args.steps} steps, s/step and tokens/s from the second step; peak RSS of each "
          f"run's own process, base loading included; runs past {cap:.1f} GB were stopped there)")


def _print_row(r: dict, cap: float) -> None:
    plan = r.get("memory_plan") or {}
    how = (f"budget {plan['budget_bytes'] / 1024**3:.1f} GB: micro-batch {plan['micro_batch']} x {plan['grad_accum']}"
           + (", ckpt" if plan.get("gradient_checkpointing") else "")) if plan else "no bound"
    if r.get("rss_cap_hit"):
        print(f"{r['base']:<16}{r['mode']:<7}{'before' if r['before'] else 'after':<8}  stopped at the {cap:.1f} GB "
              f"cap (peak RSS > {r['peak_rss_mib']:.0f} MiB)", flush=True)
        return
    tps = f"{r['tokens_per_s']:>8.0f} tok/s" if "tokens_per_s" in r else " " * 14
    print(f"{r['base']:<16}{r['mode']:<7}{'before' if r['before'] else 'after':<8}{tps}{r['seconds_per_step']:>8.1f} "
          f"s/step{r['peak_rss_mib']:>8.0f} MiB peak RSS   {how}", flush=True)


def compare_bases(args) -> None:
    """LoRA and QLoRA on the tiny and the SmolLM2 base, each in a fresh process; a table (or --json)."""
    import subprocess

    from config.settings import BaseModelSettings
    from training.base_models import SMOLLM2, convert_wheel_model

    s = BaseModelSettings()
    smollm2 = Path(__file__).resolve().parents[1] / s.smollm2_dir
    convert_wheel_model(SMOLLM2, smollm2, Path(s.cache_dir).expanduser())
    rows = []
    for base in ("tiny", str(smollm2)):
        for qlora in (False, True):
            cmd = [sys.executable, __file__, "--one", base, "--steps", str(args.steps), "--batch-size",
                   str(args.batch_size), "--max-length", str(args.max_length), "--conversations",
                   str(args.conversations), *(["--qlora"] if qlora else []),
                   *(["--threads", str(args.threads)] if args.threads else [])]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"bench run failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            if not args.json:
                r = rows[-1]
                print(f"{Path(r['base']).name:<16}{r['mode']:<7}{r['tokens_per_s']:>10.0f} tokens/s"
                      f"{r['seconds_per_step']:>8.2f} s/step{r['peak_rss_mib']:>8.0f} MiB peak RSS", flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"({args.steps} steps, batch {args.batch_size}, max length {args.max_length}; tokens/s counts non-padding "
          "tokens from the second step on; peak RSS of each run's own process, base loading included)")


def compare_targets(args) -> None:
    """LoRA on all linear layers vs on q_proj/v_proj only, same base, data, steps and settings otherwise:
    validation loss at every evaluation and wall time, side by side."""
    import torch
    from rich.console import Console

    from config.settings import TrainSettings
    from training.train import TrainOptions, train

    torch.set_num_threads(args.threads or 1)
    if not args.base:
        sys.exit("--compare-targets needs --base DIR (e.g. models/smollm2-135m from `convo base smollm2`)")
    work = Path(tempfile.mkdtemp(prefix="convo-bench-targets-"))
    data = chitchat_dataset_dir(work / "data", args.conversations)
    n_train = sum(1 for _ in (data / "train.jsonl").open())
    quiet = Console(file=open("/dev/null", "w"))  # noqa: SIM115 - the bench prints its own table
    runs = {}
    for targets in ("all-linear", "q_proj,v_proj"):
        t0 = time.perf_counter()
        result = train(
            TrainOptions.from_settings(
                TrainSettings(),
                data_dir=data, base=args.base, out_dir=work / targets.replace(",", "+"), max_steps=args.steps,
                eval_steps=args.eval_steps, max_val_samples=args.val_samples, batch_size=args.batch_size,
                grad_accum=1, max_length=args.max_length, learning_rate=args.lr, lora_target_modules=targets,
                sample_prompts=0, early_stopping_patience=args.steps,  # fixed length: compare the curves
            ),
            console=quiet,
        )
        wall = time.perf_counter() - t0
        log = [json.loads(line) for line in (result.out_dir / "train_log.jsonl").read_text().splitlines()]
        trainable = sum(p.numel() for p in result.trainer.model.parameters() if p.requires_grad)
        runs[targets] = {"val": {r["step"]: r["eval_loss"] for r in log if "eval_loss" in r}, "wall_s": wall,
                         "train_s": result.train_seconds, "trainable_params": trainable,
                         "tokens_per_s": result.tokens_per_s}
    if args.json:
        print(json.dumps(runs, indent=2))
        return
    a, q = runs["all-linear"], runs["q_proj,v_proj"]
    print(f"base {args.base}; {n_train} training samples from {args.conversations} chitchat conversations; "
          f"{args.steps} steps, batch {args.batch_size}, max length {args.max_length}, lr {args.lr:g}, "
          f"validation {args.val_samples} samples every {args.eval_steps} steps, torch threads {torch.get_num_threads()}")
    print(f"{'step':>6}{'all-linear':>14}{'q_proj,v_proj':>16}")
    for step in sorted(set(a["val"]) | set(q["val"])):
        print(f"{step:>6}{a['val'].get(step, float('nan')):>14.4f}{q['val'].get(step, float('nan')):>16.4f}")
    for name, key, fmt in (("wall s", "wall_s", ".1f"), ("train s", "train_s", ".1f"),
                           ("tokens/s", "tokens_per_s", ".0f"), ("trainable params", "trainable_params", ",")):
        print(f"{name:>16}{a[key]:>14{fmt}}{q[key]:>16{fmt}}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare-bases", action="store_true", help="LoRA vs QLoRA on the tiny and the SmolLM2 base")
    ap.add_argument("--compare-targets", action="store_true",
                    help="LoRA on all linear layers vs q_proj/v_proj only (needs --base): val loss and wall time")
    ap.add_argument("--eval-steps", type=int, default=5, help="--compare-targets: steps between evaluations")
    ap.add_argument("--val-samples", type=int, default=32, help="--compare-targets: validation samples scored")
    ap.add_argument("--lr", type=float, default=1e-3, help="--compare-targets: learning rate (both runs)")
    ap.add_argument("--compare-memory", action="store_true",
                    help="before/after the memory bound: --bases, LoRA and QLoRA, and the preference step")
    ap.add_argument("--bases", default="/work/models/smollm2-135m,/work/models/gemma3-270m",
                    help="--compare-memory: comma-separated base dirs")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--before-batch-size", type=int, default=8, help="--compare-memory: batch of the 'before' runs")
    ap.add_argument("--before-steps", type=int, default=2, help="--compare-memory: steps of the 'before' runs")
    ap.add_argument("--before-qlora", action="store_true", help="--compare-memory: also QLoRA before")
    ap.add_argument("--skip-dpo", action="store_true", help="--compare-memory: no preference-step runs")
    ap.add_argument("--max-memory-gb", type=float, default=None, help="train.max_memory_gb of the 'after' runs")
    ap.add_argument("--rss-cap-gb", type=float, default=0, help="stop a run past this RSS (default: available - 3)")
    ap.add_argument("--before", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--refine", help=argparse.SUPPRESS)  # one preference-step run, in its own process
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--pairs", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # one run of --compare-bases, in its own process
    ap.add_argument("--qlora", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help="--compare-bases: print the raw figures as JSON")
    ap.add_argument("--base", help="base model dir (default: build an untrained tiny base)")
    ap.add_argument("--conversations", type=int, default=400)
    ap.add_argument("--context", type=int, default=16, help="messages of context per sample (as dataset.context_messages)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_run(args)))
        return
    if args.refine:
        print(json.dumps(one_refine(args)))
        return
    if args.compare_memory:
        compare_memory(args)
        return
    if args.compare_bases:
        compare_bases(args)
        return
    if args.compare_targets:
        compare_targets(args)
        return

    import torch
    from rich.console import Console

    from config.settings import TrainSettings
    from training.tiny_base import build_tiny_base, chitchat_texts
    from training.train import TrainOptions, train

    if args.threads:
        torch.set_num_threads(args.threads)
    quiet = Console(file=open("/dev/null", "w"))  # noqa: SIM115 - the bench prints its own table
    work = Path(tempfile.mkdtemp(prefix="convo-bench-train-"))
    base = args.base
    if base is None:
        texts, _ = chitchat_texts(limit=2000)
        base = str(work / "base")
        build_tiny_base(base, texts, vocab_size=2048, hidden_size=128, num_layers=4, num_heads=4, max_steps=0)
        print(f"built an untrained tiny base (vocab 2048, hidden 128, 4 layers) in {base}")
    data = chitchat_dataset_dir(work / "data", args.conversations)
    n_train = sum(1 for _ in (data / "train.jsonl").open())
    print(f"dataset: {n_train} training samples from {args.conversations} chitchat conversations")

    def one(grouped: bool, steps: int) -> dict:
        timer = _StepTimer.make()
        out = work / f"run-{'grouped' if grouped else 'random'}-{steps}"
        result = train(
            TrainOptions.from_settings(
                TrainSettings(),
                data_dir=data, base=base, out_dir=out, max_steps=steps, eval_steps=steps, batch_size=args.batch_size,
                grad_accum=1, max_length=args.max_length, sample_prompts=0, group_by_length=grouped,
            ),
            console=quiet, extra_callbacks=[timer],
        )
        waste, batches = padding_waste(result.trainer)
        seconds = timer.t1 - timer.t0
        return {"tokens_per_s": (timer.tok1 - timer.tok0) / seconds, "padding_waste": waste,
                "seconds": seconds, "peak_rss_mib": peak_rss_mib(), "batches_per_epoch": batches}

    one(False, 3)  # warm-up: imports, first allocations
    plain = one(False, args.steps)
    grouped = one(True, args.steps)
    print(f"\n{'sampler':<18}{'tokens/s':>12}{'padding':>10}{'step s':>9}   ({args.steps} steps, "
          f"batch {args.batch_size}, torch threads {torch.get_num_threads()})")
    for name, r in (("random", plain), ("group_by_length", grouped)):
        per_step = r["seconds"] / (args.steps - 1)
        print(f"{name:<18}{r['tokens_per_s']:>12.0f}{r['padding_waste']:>10.1%}{per_step:>9.2f}")
    print(f"peak RSS of the process: {plain['peak_rss_mib']:.0f} MiB after the random run, "
          f"{grouped['peak_rss_mib']:.0f} MiB after both (includes the chitchat corpus and the base build)")
    print(f"\ngroup_by_length / random: tokens/s x{grouped['tokens_per_s'] / plain['tokens_per_s']:.2f}, "
          f"padding waste x{grouped['padding_waste'] / max(plain['padding_waste'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
