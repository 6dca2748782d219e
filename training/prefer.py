"""A preference step from the person's own history, no feedback needed (`convo refine`), read top to bottom.

SFT adapter + its dataset dir -> pairs: for up to `max_pairs` training prompts (evenly spread over train.jsonl),
chosen = the reply the person really sent, rejected = the SFT adapter's own sample for the same context (skipped
when it equals the real reply) -> TRL's DPO on top of the SFT adapter, whose frozen copy is the reference policy
-> a new adapter dir with the same convo_adapter.json conventions, so it serves and evaluates like any adapter.

Why: SFT makes the person's replies likely, but the adapter's own samples still drift into what the base does
(the assistant voice, repeated lines, empty bursts). DPO pushes probability from those samples towards what the
person wrote instead, relative to the SFT adapter (beta keeps it close). Pairs are tokenized exactly as the
engine scores text (`tokenize_pair`; no EOS appended, the completion already ends with the next speaker's tag),
and only the burst differs between chosen and rejected: both end with the real next speaker's tag.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from errors import TrainError
from inference.prompt_format import END_TAG, render_completion, split_completion

PAIRS_FILE = "pairs.jsonl"
REFINE_LOG = "refine_log.jsonl"


@dataclass(frozen=True)
class RefineOptions:
    """What one refine run needs. Fields named like config.settings.RefineSettings have no defaults here: build
    with `RefineOptions.from_settings(settings.refine, **overrides)` so defaults live once."""

    max_pairs: int
    min_pairs: int
    max_steps: int
    batch_size: int
    learning_rate: float
    beta: float
    max_length: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    budget_min: float
    max_memory_gb: float | None
    # Per run.
    base: str | None = None  # default: the base the SFT adapter records
    force: bool = False

    @classmethod
    def from_settings(cls, settings, **overrides) -> RefineOptions:
        """Options from RefineSettings (or a whole Settings' `.refine`), with the non-None overrides on top."""
        values = getattr(settings, "refine", settings).model_dump()
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:  # a new RefineSettings field must become an option too
            raise TypeError(f"RefineSettings fields without a RefineOptions field: {sorted(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass
class RefineResult:
    """What a refine run produced: counts, the DPO reward margin before and after, paths."""

    out_dir: Path
    pairs: int
    skipped_equal: int
    steps: int
    margin_before: float  # mean beta * (chosen - rejected log-ratio vs the SFT adapter): 0 at the start
    margin_after: float
    accuracy_after: float  # share of pairs whose implicit reward prefers the real reply
    train_seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)


# ---------------------------------------------------------------- pairs


def following_tag(completion: str) -> str | None:
    """The next speaker's tag a training completion ends with (None for `[END]`)."""
    last = completion.rsplit("\n", 1)[-1].strip()
    tag = last[1:-1] if last.startswith("[") and last.endswith("]") else END_TAG
    return None if tag == END_TAG else tag


def build_pairs(engine, rows: list[dict], opts: RefineOptions) -> tuple[list[dict], int]:
    """(pairs, skipped): chosen = the real completion, rejected = the engine's own sample for the same prompt.

    A sample whose messages equal the real reply's is no preference and is skipped; an empty sample stays (a
    bad draft the person would never send is exactly what to push away from).
    """
    from training.train import target_of

    pairs, skipped = [], 0
    for i, row in enumerate(rows):
        target = target_of(row["prompt"])
        real = [m.strip() for m in split_completion(row["completion"], target)]
        sample = engine.generate(row["prompt"], target, n=1, temperature=opts.temperature, top_p=opts.top_p,
                                 max_new_tokens=opts.max_new_tokens, seed=opts.seed + i)[0]
        sample = [m.strip() for m in sample]
        if sample == real:
            skipped += 1
            continue
        rejected = render_completion(target, sample or [""], following_tag(row["completion"]))
        pairs.append({"prompt": row["prompt"], "chosen": row["completion"], "rejected": rejected})
    return pairs, skipped


def tokenize_pairs(tokenizer, pairs: list[dict], max_length: int):
    """A datasets.Dataset of prompt_ids / chosen_ids / rejected_ids, tokenized as the engine scores text.

    Too long: the oldest prompt tokens go first (as in training); a completion alone over half the length is cut.
    """
    from datasets import Dataset

    from inference.engine import common_prefix_length, encode, tokenize_pair

    cols: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for p in pairs:
        chosen, _ = tokenize_pair(tokenizer, p["prompt"], p["chosen"])
        rejected, _ = tokenize_pair(tokenizer, p["prompt"], p["rejected"])
        prompt = encode(tokenizer, p["prompt"])
        start = min(common_prefix_length(prompt, chosen), common_prefix_length(prompt, rejected))
        c, r = chosen[start:][: max_length // 2], rejected[start:][: max_length // 2]
        keep = max_length - max(len(c), len(r))
        cols["prompt_ids"].append(prompt[:start][-keep:])
        cols["chosen_ids"].append(c)
        cols["rejected_ids"].append(r)
    return Dataset.from_dict(cols)


def pair_logps(engine, pairs: list[dict], max_length: int) -> list[tuple[float, float]]:
    """(log p(chosen), log p(rejected)) under the engine's model, summed over completion tokens."""
    flat = [(p["prompt"], p[k]) for p in pairs for k in ("chosen", "rejected")]
    nll = engine.completion_nll(flat, max_length=max_length)
    return [(-nll[2 * i][0], -nll[2 * i + 1][0]) for i in range(len(pairs))]


def implicit_margins(policy: list[tuple[float, float]], ref: list[tuple[float, float]], beta: float) -> list[float]:
    """DPO's implicit reward margin per pair: beta * ((chosen - ref chosen) - (rejected - ref rejected))."""
    return [beta * ((pc - rc) - (pr - rr)) for (pc, pr), (rc, rr) in zip(policy, ref, strict=True)]


# ---------------------------------------------------------------- the run


def refine(adapter_dir: Path | str, data_dir: Path | str, out_dir: Path | str, opts: RefineOptions,
           console: Console | None = None) -> RefineResult:
    """DPO on (real reply, the SFT adapter's own sample) pairs on top of `adapter_dir`; a new adapter in `out_dir`."""
    started = time.monotonic()  # refine.budget_min counts from here, sampling included
    console = console or Console()
    adapter_dir, data_dir, out_dir = Path(adapter_dir), Path(data_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not opts.force:
            raise TrainError(f"{out_dir}: already exists; pick a fresh --out or --force to overwrite")
        if not (out_dir / "convo_adapter.json").is_file():
            raise TrainError(f"{out_dir}: not an adapter dir; --force only overwrites those, pick a fresh --out")

    import datasets
    import torch
    import transformers
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    from inference.adapter_meta import check_compatible, read_adapter_meta, write_adapter_meta
    from inference.engine import Engine
    from training.train import _device_words, load_trainable_adapter, memory_plan, read_dataset, spread

    meta = read_adapter_meta(adapter_dir)
    check_compatible(meta, opts.base)
    base = opts.base or meta.base_model.id
    data = read_dataset(data_dir)
    if data.meta["persona"]["tag"] != meta.persona.tag:
        raise TrainError(f"{data_dir} is {data.meta['persona']['tag']}'s dataset but {adapter_dir} is "
                         f"{meta.persona.tag}'s adapter: refine an adapter with its own dataset")

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Loading weights": the status lines say enough
    set_seed(opts.seed)
    cuda = torch.cuda.is_available()
    model, tokenizer, bf16 = load_trainable_adapter(base, adapter_dir)
    engine = Engine(model, tokenizer, meta)

    # 1. Pairs: the adapter's own samples against what the person wrote.
    rows = spread(data.train, opts.max_pairs)
    t0 = time.monotonic()
    with console.status(f"sampling the adapter on {len(rows)} training prompts"):
        pairs, skipped = build_pairs(engine, rows, opts)
    sample_seconds = time.monotonic() - t0
    if not pairs:
        raise TrainError(f"no preference pairs: the adapter's samples equal the real reply on all {len(rows)} "
                         "prompts; nothing to refine")
    ref = pair_logps(engine, pairs, opts.max_length)  # the SFT adapter is DPO's reference policy

    # 2. DPO on top of the SFT adapter. With a PeftModel and no ref_model, TRL copies the adapter into a frozen
    # "ref" adapter: the reference is the SFT adapter, not the bare base.
    work = out_dir.with_name(f".{out_dir.name}.refine")
    shutil.rmtree(work, ignore_errors=True)
    steps = opts.max_steps if opts.max_steps > 0 else math.ceil(len(pairs) / opts.batch_size)
    train_ds = tokenize_pairs(tokenizer, pairs, opts.max_length)
    batch = min(opts.batch_size, len(pairs))
    # A pair is two sequences (chosen, rejected) of at most prompt + the longer reply.
    seq_len = max(len(p) + max(len(c), len(r)) for p, c, r in
                  zip(train_ds["prompt_ids"], train_ds["chosen_ids"], train_ds["rejected_ids"], strict=True))
    memory = memory_plan(model, opts.max_memory_gb, seq_len, batch, 1, lora_r=model.peft_config["default"].r,
                         cuda=cuda, bf16=bf16, gradient_checkpointing=None, sequences=2)
    if memory is not None:
        console.print(f"preference step: {memory.sentence()}", highlight=False)
    config = DPOConfig(
        output_dir=str(work / "trainer"),
        per_device_train_batch_size=memory.micro_batch if memory else batch,
        gradient_accumulation_steps=memory.grad_accum if memory else 1,  # DPO's loss is a mean over pairs
        learning_rate=opts.learning_rate,
        lr_scheduler_type="constant",
        max_steps=steps,
        beta=opts.beta,
        # The reference (the SFT adapter) is fixed: score it once before training instead of in every step.
        precompute_ref_log_probs=True,
        max_length=None,  # truncated above, keeping the end of the prompt
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        seed=opts.seed,
        use_cpu=not cuda,
        bf16=bf16,
        activation_checkpointing=memory.gradient_checkpointing if memory else cuda,
    )

    class _PreTokenized(DPOTrainer):
        """DPOTrainer fed pairs tokenized by `tokenize_pairs` (its own preparation would append an EOS)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    callbacks, time_cb = [], None
    if opts.budget_min > 0:
        from training.budget import time_budget_callback

        def on_plan(plan, first: bool) -> None:
            if first:
                console.print(f"preference step: {plan.sentence(_device_words(cuda), validation=False)}", highlight=False)

        time_cb = time_budget_callback(opts.budget_min * 60, started, steps, steps, lambda s: 0.0, on_plan)
        callbacks.append(time_cb)
    trainer = _PreTokenized(model=model, args=config, train_dataset=train_ds, processing_class=tokenizer,
                            callbacks=callbacks)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    t0 = time.monotonic()
    quiet = {"TQDM_DISABLE": "1"}  # TRL's bar while it scores the reference; the status line says it
    saved = {k: os.environ.get(k) for k in quiet}
    os.environ.update(quiet)
    try:
        with console.status(f"DPO on {len(pairs)} pairs, {steps} steps"):
            trainer.train()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    train_seconds = time.monotonic() - t0
    model = trainer.model
    if "ref" in model.peft_config:
        model.delete_adapter("ref")
    margins = implicit_margins(pair_logps(Engine(model, tokenizer, meta), pairs, opts.max_length), ref, opts.beta)

    # 3. Save like any adapter: PEFT weights, convo_adapter.json (the SFT adapter's, with the refine recorded).
    work.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(work / "adapter"))
    logs = [r for r in trainer.state.log_history if "loss" in r]
    with (work / "adapter" / REFINE_LOG).open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in trainer.state.log_history)
    with (work / "adapter" / PAIRS_FILE).open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    metrics = {
        "pairs": len(pairs), "skipped_equal": skipped, "prompts": len(rows), "steps": trainer.state.global_step,
        "margin_before": 0.0, "margin_after": round(sum(margins) / len(margins), 4),
        "accuracy_after": round(sum(m > 0 for m in margins) / len(margins), 4),
        "first_loss": logs[0]["loss"] if logs else None, "last_loss": logs[-1]["loss"] if logs else None,
        "sample_seconds": round(sample_seconds, 2), "train_seconds": round(train_seconds, 2),
        "memory": asdict(memory) if memory else None,
        "time_budget": asdict(time_cb.plan) if time_cb is not None and time_cb.plan else None,
    }
    options = {k: v for k, v in asdict(opts).items() if k != "force"}
    new_meta = meta.model_copy(update={
        "dataset_sha256": data.sha256,
        # Flat: the SFT run's keys stay where retrain and the version gate read them (data_dir, final_eval_loss).
        "training_args": {**meta.training_args,
                          "refine": {**options, "method": "dpo", "parent_adapter": str(adapter_dir.resolve())}},
        "final_metrics": {**meta.final_metrics, "refine": metrics},
    })
    write_adapter_meta(work / "adapter", new_meta)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    (work / "adapter").rename(out_dir)
    shutil.rmtree(work, ignore_errors=True)
    return RefineResult(
        out_dir=out_dir, pairs=len(pairs), skipped_equal=skipped, steps=metrics["steps"], margin_before=0.0,
        margin_after=metrics["margin_after"], accuracy_after=metrics["accuracy_after"], train_seconds=train_seconds,
        metrics=metrics, paths={"adapter": out_dir, "pairs": out_dir / PAIRS_FILE, "log": out_dir / REFINE_LOG},
    )


# ---------------------------------------------------------------- `convo train --prefer`

SFT_DIR = "sft"  # inside a preferred adapter dir: the SFT adapter it was refined from (logs, loss plot, samples)


@dataclass
class PreferOutcome:
    """What the preference step after SFT did: `refined` (the adapter in --out is the DPO one) or skipped/why."""

    status: str  # "refined", "skipped" or "interrupted"
    reason: str = ""
    result: RefineResult | None = None


def prefer_after_sft(out_dir: Path | str, data_dir: Path | str, opts: RefineOptions,
                     console: Console | None = None) -> PreferOutcome:
    """`convo train`'s preference step: refine the SFT adapter just written to `out_dir` and put the refined one
    in its place, the SFT run moving to `out_dir/sft/`. The study (docs/quality.md) found the refined adapter
    better than the plain one on NLL and on generated text, so this runs by default (`train.prefer`).

    Skipped, leaving the SFT adapter in `out_dir` untouched, when train.jsonl has fewer than `opts.min_pairs` samples or
    the adapter's samples equal the real replies everywhere; on Ctrl-C likewise (status "interrupted").
    """
    out_dir, data_dir = Path(out_dir), Path(data_dir)
    from training.train import read_dataset

    n_train = len(read_dataset(data_dir).train)
    if n_train < opts.min_pairs:
        return PreferOutcome("skipped", f"{n_train} training samples, fewer than refine.min_pairs = {opts.min_pairs}")
    staged = out_dir.with_name(f".{out_dir.name}.preferred")
    shutil.rmtree(staged, ignore_errors=True)
    try:
        result = refine(out_dir, data_dir, staged, replace(opts, force=True), console=console)
    except KeyboardInterrupt:
        shutil.rmtree(staged, ignore_errors=True)
        shutil.rmtree(staged.with_name(f".{staged.name}.refine"), ignore_errors=True)
        return PreferOutcome("interrupted", "Ctrl-C during the preference step; the SFT adapter is kept")
    except TrainError as e:
        if "no preference pairs" not in str(e):
            raise
        return PreferOutcome("skipped", str(e))
    # Two renames: the SFT run goes inside the refined adapter, which then takes the --out name.
    out_dir.rename(staged / SFT_DIR)
    staged.rename(out_dir)
    from inference.adapter_meta import read_adapter_meta, write_adapter_meta

    meta = read_adapter_meta(out_dir)
    args = dict(meta.training_args)
    args["refine"] = {**args["refine"], "parent_adapter": str((out_dir / SFT_DIR).resolve())}
    write_adapter_meta(out_dir, meta.model_copy(update={"training_args": args}))
    result.out_dir = out_dir
    result.paths = {k: out_dir / Path(v).name for k, v in result.paths.items()}
    result.paths["adapter"] = out_dir
    return PreferOutcome("refined", result=result)
