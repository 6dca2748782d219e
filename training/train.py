"""Per-person LoRA / QLoRA training with TRL, read top to bottom.

config (TrainOptions) -> data (dataset dir from `convo dataset`, tokenized here exactly as the engine scores it)
-> LoraConfig -> SFTTrainer (+ callbacks: progress, JSONL log, samples, Ctrl-C) -> train -> save adapter,
convo_adapter.json, loss curve.

Loss is on completion tokens only (TRL builds labels from our `completion_mask`). One base is shared by many
adapters, so LoRA starts from the default init (B = 0): the base weights are never touched.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from errors import ConfigError, DatasetError, TrainError
from inference.prompt_format import FORMAT_VERSION
from training.budget import resolve_budget_min

MAX_EFFECTIVE_BATCH = 32
_TAG_LINE = re.compile(r"\[([A-Z0-9_]+)\]")
CHECKPOINTS = "checkpoints"
TRAIN_LOG = "train_log.jsonl"
SAMPLES = "samples.jsonl"
RUN_FILE = "run.json"
LOSS_PNG = "loss.png"
TENSORBOARD = "tensorboard"


@dataclass(frozen=True)
class TrainOptions:
    """Everything one training run needs. The fields named like config.settings.TrainSettings have no defaults
    here: build options with `TrainOptions.from_settings(settings.train, **overrides)` so defaults live once."""

    data_dir: Path
    base: str
    out_dir: Path
    # From TrainSettings (no defaults of their own).
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    learning_rate: float
    lr_scheduler: str
    warmup_ratio: float
    epochs: float
    max_steps: int
    batch_size: int
    grad_accum: int
    max_length: int
    eval_steps: int
    max_val_samples: int
    early_stopping_patience: int
    early_stopping_min_delta: float
    lora_target_modules: str
    sample_prompts: int
    sample_seed: int
    seed: int
    group_by_length: bool
    prefer: bool  # read by `convo train` after this SFT run (training.prefer.prefer_after_sft); train() ignores it
    max_memory_gb: float | None  # training/budget.py: None from the machine, 0 no bound
    budget_min: float | None  # minutes; None: cpu_budget_min on a CPU unless the length is given; 0: off
    cpu_budget_min: float
    log_every_s: float
    # Per run, not settings.
    sample_max_new_tokens: int = 48
    qlora: bool = False
    gradient_checkpointing: bool | None = None  # None: on with CUDA (memory), off on CPU (it only costs time there)
    resume: bool = False
    force: bool = False
    logging_steps: int = 1  # every step: the loss curve smooths them (one batch alone is mostly its lengths)
    init_adapter: Path | None = None  # continue from this adapter's weights (and its LoRA config) instead of B = 0
    length_given: bool = False  # --max-steps or --epochs was given (from_settings knows): no default CPU budget

    @classmethod
    def from_settings(cls, settings, **overrides) -> TrainOptions:
        """Options from TrainSettings (or a whole Settings' `.train`), with the non-None overrides on top."""
        train_settings = getattr(settings, "train", settings)
        values = train_settings.model_dump()
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:  # a new TrainSettings field must become an option too
            raise TypeError(f"TrainSettings fields without a TrainOptions field: {sorted(unknown)}")
        given = {k for k, v in overrides.items() if v is not None} | set(train_settings.model_fields_set)
        values.update({k: v for k, v in overrides.items() if v is not None})
        values.setdefault("length_given", "epochs" in given or ("max_steps" in given and values["max_steps"] > 0))
        return cls(**values)


@dataclass(frozen=True, slots=True)
class DatasetDir:
    """A dataset dir from `convo dataset`: prompt/completion rows and meta.json."""

    path: Path
    train: list[dict]
    val: list[dict]
    meta: dict
    sha256: str


@dataclass
class TrainResult:
    """What a run produced (paths and numbers for the summary)."""

    out_dir: Path
    interrupted: bool
    global_step: int
    best_eval_loss: float | None
    final_eval_loss: float | None
    first_train_loss: float | None
    last_train_loss: float | None
    train_seconds: float
    tokens_per_s: float
    stopped_by: str | None = None  # "early_stopping", "max_steps" or "epochs"; None when interrupted
    paths: dict[str, Path] = field(default_factory=dict)
    trainer: Any = field(default=None, repr=False)  # the SFTTrainer (model with the best adapter loaded)


# ---------------------------------------------------------------- data


def read_dataset(data_dir: Path | str) -> DatasetDir:
    """Read and check a dataset dir; DatasetError naming the file and line on anything malformed."""
    from training.dataset import load_dataset_meta, read_samples

    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    meta = load_dataset_meta(data_dir)  # checks the prompt format version
    for key in ("persona",):
        if not isinstance(meta.get(key), dict) or "tag" not in meta[key]:
            raise DatasetError(f"{meta_path}: field {key!r} missing or without a tag; rebuild with `convo dataset`")
    splits = {}
    h = hashlib.sha256()
    for name in ("train", "val"):
        path = data_dir / f"{name}.jsonl"
        rows = read_samples(path)  # DatasetError naming path:line on a malformed line
        for n, row in enumerate(rows, 1):
            if _TAG_LINE.fullmatch(row["prompt"].rsplit("\n", 1)[-1]) is None:
                raise DatasetError(f"{path}: sample {n}: prompt must end with the target's tag line '[TAG]'")
        if not rows:
            raise DatasetError(f"{path}: no samples; rebuild with more data or a different --val")
        splits[name] = rows
        h.update(name.encode() + b"\0" + path.read_bytes())
    h.update(b"meta\0" + meta_path.read_bytes())
    return DatasetDir(data_dir, splits["train"], splits["val"], meta, h.hexdigest())


def target_of(prompt: str) -> str:
    """The tag a prompt ends with (whose turn the completion is): its last line is exactly `[TAG]`."""
    m = _TAG_LINE.fullmatch(prompt.rsplit("\n", 1)[-1])
    if m is None:
        raise DatasetError(f"prompt does not end with a '[TAG]' line: ...{prompt[-40:]!r}")
    return m.group(1)


def choose_sample_indices(n_rows: int, k: int, seed: int) -> list[int]:
    """Which validation rows get sample generations: a private Random(seed), immune to the Trainer's reseeding."""
    return sorted(random.Random(seed).sample(range(n_rows), min(k, n_rows)))


def spread(rows: list[dict], k: int) -> list[dict]:
    """`k` rows evenly spread over `rows` (all of them when k <= 0 or there are fewer): a capped validation set
    that still covers the whole validation period."""
    if k <= 0 or len(rows) <= k:
        return list(rows)
    return [rows[i * len(rows) // k] for i in range(k)]


def auto_eval_steps(total_steps: int, evaluations: int = 8) -> int:
    """Steps between evaluations when --eval-steps is 0: about `evaluations` per run (at least every step)."""
    return max(1, math.ceil(total_steps / evaluations))


def lora_targets(value: str, model=None) -> str | list[str]:
    """PEFT's target_modules from the setting: "all-linear" as is, else the comma-separated module names; on a
    multimodal `model` (Gemma 3 4B+) either one kept to its language model (no vision tower)."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise ConfigError("train.lora_target_modules is empty: use all-linear or names such as q_proj,v_proj")
    if model is not None:
        from inference.architectures import language_model_targets

        if names != ["all-linear"]:
            refuse_unserved_targets(model, names)
        limited = language_model_targets(model, None if names == ["all-linear"] else names)
        if limited is not None:
            return limited
    return "all-linear" if names == ["all-linear"] else names


def refuse_unserved_targets(model, names: list[str]) -> None:
    """ConfigError (one line) when a listed LoRA target names a layer the worker cannot serve LoRA on (anything
    but a linear or GPT-2 Conv1D layer, e.g. embed_tokens): refused before training, not after it."""
    from inference.lora_batch import layer_features

    for module_name, module in model.named_modules():
        hit = next((n for n in names if module_name == n or module_name.endswith("." + n)), None)
        if hit is not None and layer_features(module) is None:
            raise ConfigError(f"train.lora_target_modules: {hit} ({module_name}) is a {type(module).__name__} layer; "
                              "the worker serves LoRA on linear layers only (e.g. q_proj,v_proj or all-linear)")


def check_servable_base(base: str) -> None:
    """TrainError before any training when the worker could not serve an adapter of this base (its decode loop
    refuses the rope type or layer kind): refused now rather than when the worker loads the adapter."""
    from transformers import AutoConfig

    from inference.architectures import servable_reason

    try:
        config = AutoConfig.from_pretrained(str(base))
    except (OSError, ValueError):  # not loadable: the model load below says why
        return
    reason = servable_reason(config)
    if reason is not None:
        raise TrainError(f"{base}: the worker cannot serve adapters of this base: {reason}")


def stopped_by(global_step: int, total_steps: int, max_steps: int, budget: str | None = None) -> str:
    """Why a finished run stopped: early stopping before the step cap, else the cap (--max-steps or --epochs, or
    the time budget's plan: `budget` is its capped_by, "budget" or "epochs")."""
    if global_step < total_steps:
        return "early_stopping"
    if budget == "budget":
        return "budget"
    return "max_steps" if max_steps > 0 else "epochs"


def fit_prompt(tokenizer, prompt: str, max_tokens: int) -> str:
    """`prompt` without its oldest lines until it is at most `max_tokens` tokens; the final `[TAG]` line stays.
    (Generating from a prompt longer than training ever saw overruns models with learned positions, e.g. GPT-2.)"""
    from inference.engine import encode
    from training.evaluate.contexts import fit_prompt as drop_oldest_lines

    return drop_oldest_lines(prompt, lambda text: len(encode(tokenizer, text)), max_tokens)


def tokenize_rows(tokenizer, rows: list[dict], max_length: int | None):
    """A datasets.Dataset of input_ids + completion_mask, keeping the end (the completion) when too long."""
    from datasets import Dataset

    from inference.engine import tokenize_pair

    ids_col, mask_col = [], []
    for row in rows:
        ids, mask = tokenize_pair(tokenizer, row["prompt"], row["completion"])
        if max_length is not None and len(ids) > max_length:
            ids, mask = ids[-max_length:], mask[-max_length:]  # drop the oldest context first
        ids_col.append(ids)
        mask_col.append(mask)
    return Dataset.from_dict({"input_ids": ids_col, "completion_mask": mask_col})


def _prepare_out_dir(opts: TrainOptions, dataset_sha: str) -> str | None:
    """Check --out against --resume/--force; return the checkpoint to resume from (or None)."""
    from transformers.trainer_utils import get_last_checkpoint

    out = opts.out_dir
    if opts.resume and opts.force:
        raise ConfigError("--resume and --force contradict each other: pick one")
    if opts.resume:
        ckpt_dir = out / CHECKPOINTS
        last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
        if last is None:
            raise TrainError(f"{out}: no checkpoint to resume from; start a fresh run without --resume")
        run = json.loads((out / RUN_FILE).read_text(encoding="utf-8")) if (out / RUN_FILE).is_file() else {}
        if run.get("dataset_sha256") not in (None, dataset_sha):
            raise TrainError(
                f"{out}: was trained on a different dataset than {opts.data_dir}; use that dataset or a fresh --out"
            )
        return last
    if out.exists() and any(out.iterdir()):
        if not opts.force:
            raise TrainError(f"{out}: already exists; pick a fresh --out, --resume the run, or --force to overwrite")
        if not ((out / RUN_FILE).is_file() or (out / "convo_adapter.json").is_file()):
            # --force deletes the dir: only ever one that `convo train` made (not `--out ~` by a typo)
            raise TrainError(f"{out}: not a `convo train` output dir; --force only overwrites those, pick a fresh --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return None


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def load_trainable_adapter(base: str, adapter_dir: Path):
    """(model, tokenizer, bf16) for a preference step on top of an adapter: the base in float32 (bf16 on a CUDA
    that has it) on its device, the adapter loaded trainable; the base weights stay frozen."""
    import warnings

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16 if bf16 else torch.float32)
    model.to("cuda" if cuda else "cpu")
    with warnings.catch_warnings():  # peft calls a transformers method deprecated in v5
        warnings.simplefilter("ignore", FutureWarning)
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    return model, tokenizer, bf16


# ---------------------------------------------------------------- callbacks


def _callbacks():
    """Callback classes (defined lazily: transformers is a heavy import)."""
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        """Append every Trainer log (loss, lr, eval_loss...) to train_log.jsonl; resume keeps appending."""

        def __init__(self, path: Path):
            self.path = path
            self.first_loss: float | None = None
            self.last_loss: float | None = None
            self.extra: dict = {}  # fields added to every record (marks the final evaluation of the best model)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero:  # under `accelerate launch`, one process writes
                return
            logs = logs or {}
            if "loss" in logs:
                self.last_loss = float(logs["loss"])
                if self.first_loss is None:
                    self.first_loss = self.last_loss
            rec = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs, **self.extra}
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")

    class Samples(TrainerCallback):
        """At each evaluation, generate replies for fixed validation prompts; log them beside the real reply."""

        def __init__(self, rows: list[dict], tokenizer, path: Path, console: Console, seed: int, max_new_tokens: int,
                     max_length: int | None = None):
            self.rows, self.tokenizer, self.path, self.console = rows, tokenizer, path, console
            self.seed, self.max_new_tokens, self.max_length = seed, max_new_tokens, max_length
            self.done_steps: set[int] = set()

        def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
            from inference.engine import Engine
            from inference.prompt_format import split_completion

            if model is None or not self.rows or not state.is_world_process_zero:
                return
            if state.global_step in self.done_steps:  # the final evaluate() of the best model, already sampled
                return
            self.done_steps.add(state.global_step)
            engine = Engine(model, self.tokenizer)
            self.console.print(f"[bold]samples at step {state.global_step}[/]")
            with self.path.open("a", encoding="utf-8") as f:
                for i, row in enumerate(self.rows):
                    target = target_of(row["prompt"])
                    prompt = row["prompt"]
                    if self.max_length is not None:  # as the training samples were cut, room left for the reply
                        prompt = fit_prompt(self.tokenizer, prompt, max(1, self.max_length - self.max_new_tokens))
                    generated = engine.generate(
                        prompt, target, n=1, max_new_tokens=self.max_new_tokens, seed=self.seed + i
                    )[0]
                    real = split_completion(row["completion"], target)
                    rec = {
                        "step": state.global_step, "prompt": row["prompt"], "target": target,
                        "real": real, "generated": generated,
                    }
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    lines = row["prompt"].rsplit("\n", 2)
                    context = lines[-2] if len(lines) > 1 else ""
                    self.console.print(f"  [dim]{_show(context)}[/]", highlight=False)
                    self.console.print(f"  [green]real[/] {_show(f'[{target}] ' + ' / '.join(real))}", highlight=False)
                    self.console.print(f"  [cyan]gen [/] {_show(f'[{target}] ' + ' / '.join(generated))}", highlight=False)

    class StopOnSignal(TrainerCallback):
        """Ctrl-C: finish the current step, save a checkpoint, stop (resumable with --resume)."""

        def __init__(self):
            self.requested = False

        def on_step_end(self, args, state, control, **kwargs):
            if self.requested:
                control.should_save = True
                control.should_training_stop = True

    return JsonlLog, Samples, StopOnSignal


# ---------------------------------------------------------------- training


def train(opts: TrainOptions, console: Console | None = None, extra_callbacks: Sequence = ()) -> TrainResult:
    """Train one LoRA adapter on a dataset dir and save it (with convo_adapter.json, logs and a loss curve)."""
    started = time.monotonic()  # a time budget counts from here: loading and tokenizing are part of the run
    console = console or Console()
    check_servable_base(opts.base)
    if opts.batch_size * opts.grad_accum > MAX_EFFECTIVE_BATCH:
        raise ConfigError(
            f"effective batch {opts.batch_size * opts.grad_accum} (batch_size {opts.batch_size} x grad_accum "
            f"{opts.grad_accum}) exceeds {MAX_EFFECTIVE_BATCH}: lower --batch-size or --grad-accum"
        )
    if opts.qlora:
        from inference.engine import qlora_config

        qlora_config()  # fails fast, before loading anything, without bitsandbytes
    data = read_dataset(opts.data_dir)
    from accelerate import PartialState

    # Under `accelerate launch` every process runs this; only the main one touches --out, the others follow.
    dist = PartialState()
    if dist.is_main_process:
        resume_from = _prepare_out_dir(opts, data.sha256)
    dist.wait_for_everyone()
    if not dist.is_main_process:
        from transformers.trainer_utils import get_last_checkpoint

        resume_from = get_last_checkpoint(str(opts.out_dir / CHECKPOINTS)) if opts.resume else None
    main = dist.is_main_process
    out = opts.out_dir
    # Chosen before the Trainer exists: its set_seed() reseeds the global `random`, our Random(seed) is private.
    sample_rows = [data.val[i] for i in choose_sample_indices(len(data.val), opts.sample_prompts, opts.sample_seed)]

    import datasets
    import torch
    import transformers
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, EarlyStoppingCallback, set_seed
    from transformers.integrations import TensorBoardCallback
    from trl import SFTConfig, SFTTrainer

    from inference.adapter_meta import AdapterMeta, base_model_ref, convo_version, write_adapter_meta

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Loading weights": our own bar and summary say enough
    set_seed(opts.seed)  # LoRA init happens before the Trainer seeds anything
    cuda = torch.cuda.is_available()

    # Model and tokenizer.
    load_kwargs: dict[str, Any] = {}
    if opts.qlora:
        from inference.engine import qlora_config, qlora_device_map

        # bitsandbytes >= 0.49 has CPU kernels for 4-bit NF4: QLoRA runs without CUDA too.
        load_kwargs.update(quantization_config=qlora_config(), device_map=qlora_device_map("cuda" if cuda else "cpu"))
    else:
        load_kwargs["dtype"] = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    from training.progress import phase, progress_callback

    with phase(console, f"loading {opts.base}"):
        try:
            tokenizer = AutoTokenizer.from_pretrained(opts.base)
            if opts.qlora:
                from transformers import AutoConfig

                from inference.engine import check_qlora_shapes

                check_qlora_shapes(AutoConfig.from_pretrained(opts.base), "cuda" if cuda else "cpu")
            model = AutoModelForCausalLM.from_pretrained(opts.base, **load_kwargs)
        except OSError as e:
            raise TrainError(f"cannot load base model {opts.base}: {str(e).splitlines()[0]}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    val_rows = spread(data.val, opts.max_val_samples)
    with phase(console, f"tokenizing {len(data.train)} training and {len(val_rows)} validation samples"):
        train_ds = tokenize_rows(tokenizer, data.train, opts.max_length)
        val_ds = tokenize_rows(tokenizer, val_rows, opts.max_length)

    # Memory: the micro-batch that fits train.max_memory_gb, accumulation keeping the effective batch.
    memory = memory_plan(model, opts.max_memory_gb, max((len(x) for x in train_ds["input_ids"]), default=1),
                         opts.batch_size, opts.grad_accum, lora_r=opts.lora_r, cuda=cuda,
                         bf16=cuda and not opts.qlora and torch.cuda.is_bf16_supported(),
                         gradient_checkpointing=opts.gradient_checkpointing)
    micro_batch, accum = (memory.micro_batch, memory.grad_accum) if memory else (opts.batch_size, opts.grad_accum)
    checkpointing = (memory.gradient_checkpointing if memory else
                     opts.gradient_checkpointing if opts.gradient_checkpointing is not None else cuda)
    if memory is not None and main:
        console.print(memory.sentence(), highlight=False)
    if opts.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)

    lora = LoraConfig(
        r=opts.lora_r,
        lora_alpha=opts.lora_alpha,
        lora_dropout=opts.lora_dropout,
        target_modules=lora_targets(opts.lora_target_modules, model),
        task_type="CAUSAL_LM",
        init_lora_weights=True,  # B = 0: no PiSSA/OLoRA, which would rewrite the shared base weights
    )
    if opts.init_adapter is not None:
        # Continue from an existing adapter (`convo retrain`): its weights and its own LoRA config (rank, targets)
        # carry on; the rank options above do not apply.
        import warnings

        from peft import PeftModel

        if not (Path(opts.init_adapter) / "adapter_config.json").is_file():
            raise TrainError(f"{opts.init_adapter}: no adapter_config.json; --init-adapter needs a PEFT adapter dir")
        with warnings.catch_warnings():  # peft calls a transformers method deprecated in v5
            warnings.simplefilter("ignore", FutureWarning)
            model = PeftModel.from_pretrained(model, str(opts.init_adapter), is_trainable=True)
        lora = None
        loaded = model.peft_config["default"]  # record what is really trained, not the unused rank options
        opts = replace(opts, lora_r=loaded.r, lora_alpha=loaded.lora_alpha, lora_dropout=loaded.lora_dropout)

    steps_per_epoch = math.ceil(len(train_ds) / (opts.batch_size * opts.grad_accum))
    total_steps = opts.max_steps if opts.max_steps > 0 else math.ceil(steps_per_epoch * opts.epochs)
    eval_steps = auto_eval_steps(total_steps) if opts.eval_steps <= 0 else max(1, min(opts.eval_steps, total_steps))
    # Time: with a budget, the cap above is only provisional; the first steps are timed, then TimeBudget plans.
    budget_min = resolve_budget_min(opts.budget_min, opts.cpu_budget_min, cuda, opts.length_given)
    if budget_min > 0 and opts.eval_steps <= 0:
        eval_steps = total_steps  # no validation while the first steps are timed; the plan sets the interval
    config = SFTConfig(
        output_dir=str(out / CHECKPOINTS),
        per_device_train_batch_size=micro_batch,
        per_device_eval_batch_size=opts.batch_size,  # no activations kept: the same batches as ever, same val loss
        gradient_accumulation_steps=accum,
        learning_rate=opts.learning_rate,
        lr_scheduler_type=opts.lr_scheduler,
        warmup_steps=opts.warmup_ratio,  # a float < 1 is a ratio of the total steps
        num_train_epochs=opts.epochs,
        max_steps=total_steps if budget_min > 0 else opts.max_steps,
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=2,  # the best checkpoint is always kept besides the last
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=max(1, min(opts.logging_steps, eval_steps)),
        report_to="none",  # TensorBoard is added below with a fixed dir, so resumed runs land in the same place
        disable_tqdm=True,
        seed=opts.seed,
        data_seed=opts.seed,
        use_cpu=not cuda,
        bf16=cuda and not opts.qlora and torch.cuda.is_bf16_supported(),
        train_sampling_strategy="group_by_length" if opts.group_by_length else "random",
        include_num_input_tokens_seen="non_padding",
        completion_only_loss=True,
        max_length=None,  # truncated above, keeping the end (the completion) rather than the start
        dataset_num_proc=None,
        save_only_model=False,
        # TRL turns this on by default; recomputing activations saves GPU memory but only costs time on CPU.
        activation_checkpointing=checkpointing,
    )

    JsonlLog, Samples, StopOnSignal = _callbacks()
    from torch.utils.tensorboard import SummaryWriter

    log_cb = JsonlLog(out / TRAIN_LOG)
    stop_cb = StopOnSignal()
    tb_writer = SummaryWriter(log_dir=str(out / TENSORBOARD)) if main else None
    callbacks = [
        log_cb,
        progress_callback(console, opts.log_every_s),
        Samples(sample_rows, tokenizer, out / SAMPLES, console, opts.sample_seed, opts.sample_max_new_tokens,
                opts.max_length),
        stop_cb,
        *([TensorBoardCallback(tb_writer=tb_writer)] if main else []),
        EarlyStoppingCallback(early_stopping_patience=opts.early_stopping_patience,
                              early_stopping_threshold=opts.early_stopping_min_delta),
        *extra_callbacks,
    ]
    time_cb = None
    if budget_min > 0:
        from training.budget import eval_estimate_s, time_budget_callback

        def on_plan(plan, first: bool) -> None:
            run_record["time_budget"] = asdict(plan)
            run_record["total_steps"], run_record["eval_steps"] = plan.max_steps, plan.eval_steps
            if main:
                if first:
                    console.print(plan.sentence(_device_words(cuda)), highlight=False)
                _atomic_write_text(out / RUN_FILE, json.dumps(run_record, indent=2) + "\n")

        time_cb = time_budget_callback(
            budget_min * 60, started, total_steps, opts.eval_steps,
            lambda s: eval_estimate_s(s, len(val_rows), opts.batch_size * opts.grad_accum, len(sample_rows)), on_plan,
        )
        callbacks.insert(0, time_cb)  # before early stopping and the progress bar: they read the planned state
        if main:
            console.print(f"time budget {budget_min:g} min: timing the first steps to choose how many fit", highlight=False)
    trainer_cls = SFTTrainer
    if memory is not None:
        from training.completion_loss import bounded_trainer

        trainer_cls = bounded_trainer(SFTTrainer)
    trainer = trainer_cls(
        model=model,
        args=config,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=callbacks,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our progress bar and train_log.jsonl replace the printed dicts

    resolved = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}
    run_record = {"options": resolved, "dataset_sha256": data.sha256, "total_steps": total_steps,
                  "eval_steps": eval_steps, "val_samples": len(val_rows), "budget_min": budget_min,
                  "memory": asdict(memory) if memory else None}
    if main:
        _atomic_write_text(out / RUN_FILE, json.dumps(run_record, indent=2) + "\n")

    previous = signal.getsignal(signal.SIGINT)

    def _on_sigint(signum, frame):
        if stop_cb.requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        stop_cb.requested = True
        console.print("[yellow]Ctrl-C: saving a checkpoint after this step (Ctrl-C again to abort)[/]")

    in_main = _is_main_thread()
    if in_main:
        signal.signal(signal.SIGINT, _on_sigint)
    start = time.monotonic()
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except KeyboardInterrupt:
        raise TrainError(
            f"aborted by a second Ctrl-C; resume from the last saved checkpoint with --resume --out {out}"
        ) from None
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)
    train_seconds = time.monotonic() - start
    tokens_seen = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
    if resume_from:
        tokens_seen -= _tokens_at_checkpoint(resume_from)
    tokens_per_s = tokens_seen / train_seconds if train_seconds > 0 else 0.0
    result = TrainResult(
        out_dir=out,
        interrupted=stop_cb.requested,
        global_step=trainer.state.global_step,
        best_eval_loss=trainer.state.best_metric,
        final_eval_loss=None,
        first_train_loss=log_cb.first_loss,
        last_train_loss=log_cb.last_loss,
        train_seconds=train_seconds,
        tokens_per_s=tokens_per_s,
        paths={
            "checkpoints": out / CHECKPOINTS, "log": out / TRAIN_LOG, "samples": out / SAMPLES,
            "tensorboard": out / TENSORBOARD,
        },
        trainer=trainer,
    )
    if stop_cb.requested:
        if tb_writer is not None:
            tb_writer.close()
        return result

    # The best checkpoint is loaded (load_best_model_at_end). Its validation loss was measured when it was saved,
    # on the same samples with dropout off, so it is not evaluated again.
    if tb_writer is not None:
        tb_writer.close()
    result.final_eval_loss = trainer.state.best_metric
    plan = time_cb.plan if time_cb is not None else None
    if plan is not None:
        total_steps, eval_steps = plan.max_steps, plan.eval_steps
    result.stopped_by = stopped_by(result.global_step, total_steps, opts.max_steps, plan.capped_by if plan else None)
    if not main:
        return result
    trainer.model.save_pretrained(str(out))
    meta = AdapterMeta(
        persona=_speaker(data.meta["persona"]),
        me=_speaker(data.meta["me"]) if isinstance(data.meta.get("me"), dict) else None,
        tags={str(k): str(v) for k, v in (data.meta.get("tags") or {}).items()},
        mode=str(data.meta.get("mode", "both")),
        base_model=base_model_ref(opts.base),
        format_version=FORMAT_VERSION,
        dataset_sha256=data.sha256,
        data_last_ts=data.meta.get("data_last_ts"),
        training_args={**resolved, "effective_batch": opts.batch_size * opts.grad_accum, "total_steps": total_steps,
                       "eval_steps": eval_steps, "val_samples": len(val_rows), "budget_min": budget_min,
                       "time_budget": asdict(plan) if plan else None, "memory": asdict(memory) if memory else None},
        final_metrics={
            "best_eval_loss": result.best_eval_loss,
            "final_eval_loss": result.final_eval_loss,
            "first_train_loss": result.first_train_loss,
            "last_train_loss": result.last_train_loss,
            "global_step": result.global_step,
            "train_seconds": round(train_seconds, 2),
            "tokens_per_s": round(tokens_per_s, 1),
            "best_checkpoint": trainer.state.best_model_checkpoint,
            "stopped_by": result.stopped_by,
        },
        convo_version=convo_version(),
    )
    result.paths["adapter"] = out
    result.paths["meta"] = write_adapter_meta(out, meta)
    result.paths["loss_curve"] = plot_loss_curve(out / TRAIN_LOG, out / LOSS_PNG)
    return result


def memory_plan(model, max_memory_gb: float | None, seq_len: int, batch_size: int, grad_accum: int, *, lora_r: int,
                cuda: bool, bf16: bool, gradient_checkpointing: bool | None, sequences: int = 1):
    """training.budget's plan for this model (None with max_memory_gb = 0: no bound); `sequences` per sample
    (2 for a preference pair)."""
    import torch

    from training.budget import GIB, ModelShape, default_budget_gb, plan_memory

    if max_memory_gb == 0:
        return None
    if max_memory_gb is None:
        import psutil

        free = torch.cuda.mem_get_info()[0] if cuda else None
        max_memory_gb = default_budget_gb(psutil.virtual_memory().available, free)
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    weight_bytes = sum(p.numel() * p.element_size() for p in params) / max(1, n_params)
    shape = ModelShape.from_config(model.config, n_params, weight_bytes)
    # LoRA's trainable weights: r x (in + out) per adapted linear layer (all of them: an upper bound for named ones).
    head = model.get_output_embeddings()
    trainable = sum(lora_r * (m.in_features + m.out_features) for m in model.modules()
                    if isinstance(m, torch.nn.Linear) and m is not head)
    return plan_memory(shape, trainable, seq_len, batch_size, grad_accum, int(max_memory_gb * GIB),
                       act_bytes=2 if bf16 else 4, force_checkpointing=gradient_checkpointing, sequences=sequences)


def _device_words(cuda: bool) -> str:
    """'CPU, 2 threads' or 'CUDA (NVIDIA H100 80GB HBM3)', for the budget's sentence."""
    import torch

    return f"CUDA ({torch.cuda.get_device_name()})" if cuda else f"CPU, {torch.get_num_threads()} threads"


def _speaker(d: dict):
    from inference.adapter_meta import Speaker

    return Speaker(**{"name": d.get("name") or d["tag"], **{k: v for k, v in d.items() if k != "name"}})


def _show(text: str, width: int = 100) -> str:
    """One screen line of chat text, safe for rich markup."""
    from rich.markup import escape

    flat = text.replace("\n", "⏎")
    return escape(flat if len(flat) <= width else flat[: width - 1] + "…")


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _tokens_at_checkpoint(checkpoint: str) -> int:
    """Tokens already seen when the resumed checkpoint was written (so tokens/s counts only this run)."""
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
        return int(state.get("num_input_tokens_seen", 0) or 0)
    except (OSError, ValueError):
        return 0


def plot_loss_curve(log_path: Path, png_path: Path) -> Path:
    """Training loss (each step faint, smoothed bold) and validation loss against step, from train_log.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.evaluate.report import draw_loss, read_train_log

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    draw_loss(ax, read_train_log(log_path))
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{png_path.name}.", suffix=".png", dir=png_path.parent)
    os.close(fd)
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
