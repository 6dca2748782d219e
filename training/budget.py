"""Memory and time budgets of a training run: pure arithmetic, no torch (tested in tests/test_budget.py).

    memory:  model shape + sequence length -> bytes per sample -> the largest micro-batch that divides the
             effective batch and fits the budget (gradient accumulation makes up the rest), or gradient
             checkpointing when even one sample does not fit without it
    time:    seconds per step (timed on the first steps) + seconds per validation -> max_steps and the validation
             interval that end inside the budget

What is learned does not change: the effective batch (micro-batch x accumulation) stays what was asked, the loss
is summed over completion tokens and divided by their count over the whole effective batch (as one big batch
would), and the LM head only ever sees a chunk of completion positions at a time (training/completion_loss.py).

The memory estimate is a model of where a step's memory goes, with its constants fitted to peak RSS measured on
SmolLM2-135M and Gemma-3-270M on CPU (docs/training.md has the figures and the command); it errs high.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

GIB = 1024**3
# Resident before the model: Python, torch, transformers, TRL, datasets (measured ~0.9 GiB on CPU).
RUNTIME_BYTES = int(1.0 * GIB)
# Activations kept for the backward pass, per token per layer, in units of (hidden + intermediate) values:
# LoRA on every linear layer keeps its dropout copies and low-rank inputs besides the layer's own activations.
# (SmolLM2-135M, one 512-token sample, CPU: ~1.0 GiB of saved tensors, 0.9-1.5 GiB more peak RSS.)
ACTIVATION_FACTOR = 8
# Attention scores kept per token per layer per head, in units of the sequence length (eager/math attention).
ATTENTION_FACTOR = 3
# Completion positions whose full-vocabulary logits exist at once (the chunked loss), and copies of them.
LOSS_CHUNK_TOKENS = 256
LOGIT_COPIES = 3
# Gradient checkpointing's share of a sample's peak RSS on a CPU: measured 0.56 vs 0.95-1.45 GiB (SmolLM2-135M,
# 512 tokens): far less than the saved tensors (30 MiB) suggest, since the recomputed layer, its gradients and the
# allocator's high-water mark remain. It also cost 1.3-2.8x the time there, so it is the last resort.
CHECKPOINT_SHARE = 0.5
# On a CPU the micro-batch barely changes tokens/s (docs/training.md), so memory beyond this buys nothing.
CPU_DEFAULT_CAP_GB = 4.0
CPU_AVAILABLE_SHARE = 0.5  # never plan for more than this share of the memory available when the run starts
CPU_MIN_GB = 2.0  # ...but not below this: the runtime alone is ~1 GB, and a plan should not flip with a moment's load
CUDA_FREE_SHARE = 0.9  # of the GPU memory free when the run starts


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the memory estimate needs of a model config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    params: int  # all weights, trainable or not
    weight_bytes: float  # bytes per frozen weight (4 fp32, 2 bf16, ~0.56 for 4-bit NF4)

    @classmethod
    def from_config(cls, config, params: int, weight_bytes: float) -> ModelShape:
        """The shape of a transformers config (its text config for multimodal ones)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = int(text.hidden_size)
        return cls(
            layers=int(text.num_hidden_layers), hidden=hidden,
            intermediate=int(getattr(text, "intermediate_size", None) or 4 * hidden),
            heads=int(getattr(text, "num_attention_heads", 1) or 1), vocab=int(text.vocab_size),
            params=int(params), weight_bytes=float(weight_bytes),
        )


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """How a step is cut to fit: micro-batch x accumulation = the effective batch."""

    budget_bytes: int
    micro_batch: int
    grad_accum: int
    gradient_checkpointing: bool
    estimate_bytes: int  # the estimated peak of a step with this plan
    fits: bool  # False: even one sample with checkpointing is over the budget (the run goes ahead, said plainly)

    def sentence(self) -> str:
        """One line a user can act on."""
        what = (f"micro-batch {self.micro_batch} x {self.grad_accum} accumulation "
                f"(effective batch {self.micro_batch * self.grad_accum})")
        if self.gradient_checkpointing:
            what += ", gradient checkpointing"
        line = f"memory budget {gib(self.budget_bytes)}: {what}, estimated peak {gib(self.estimate_bytes)}"
        if not self.fits:
            line += " (over the budget even at one sample: raise train.max_memory_gb or lower --max-length)"
        return line


def gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.1f} GB"


def default_budget_gb(available_bytes: int, cuda_free_bytes: int | None = None) -> float:
    """train.max_memory_gb when unset: 90% of the free GPU memory on CUDA; on a CPU half the available memory,
    at least CPU_MIN_GB and at most CPU_DEFAULT_CAP_GB (a larger micro-batch does not train faster there)."""
    if cuda_free_bytes is not None:
        return CUDA_FREE_SHARE * cuda_free_bytes / GIB
    return min(CPU_DEFAULT_CAP_GB, max(CPU_MIN_GB, CPU_AVAILABLE_SHARE * available_bytes / GIB))


def fixed_bytes(shape: ModelShape, trainable: int, runtime_bytes: int = RUNTIME_BYTES) -> int:
    """Memory that does not grow with the batch: runtime, weights, trainable weights' gradients and Adam states,
    and the chunked loss's logits."""
    weights = shape.params * shape.weight_bytes
    trainable_state = trainable * 4 * 4  # fp32 weight, gradient, Adam's two moments
    logits = LOSS_CHUNK_TOKENS * shape.vocab * 4 * LOGIT_COPIES
    return int(runtime_bytes + weights + trainable_state + logits)


def sample_bytes(shape: ModelShape, seq_len: int, checkpointing: bool, act_bytes: int = 4) -> int:
    """Activation memory one sample of `seq_len` tokens adds to a training step."""
    per_layer_token = ACTIVATION_FACTOR * (shape.hidden + shape.intermediate) + ATTENTION_FACTOR * shape.heads * seq_len
    plain = shape.layers * per_layer_token * seq_len * act_bytes
    return int(CHECKPOINT_SHARE * plain if checkpointing else plain)


def plan_memory(shape: ModelShape, trainable: int, seq_len: int, batch_size: int, grad_accum: int,
                budget_bytes: int, act_bytes: int = 4, allow_checkpointing: bool = True,
                force_checkpointing: bool | None = None, sequences: int = 1) -> MemoryPlan:
    """The largest micro-batch dividing batch_size x grad_accum whose estimated step fits `budget_bytes`.

    Gradient checkpointing (recomputing activations in the backward pass, ~30% more time) is turned on only when
    one sample does not fit without it, unless `force_checkpointing` says otherwise. A sample is `sequences`
    sequences of `seq_len` tokens (2 for a preference pair: chosen and rejected).
    """
    effective = batch_size * grad_accum
    base = fixed_bytes(shape, trainable)
    choices = [force_checkpointing] if force_checkpointing is not None else (
        [False, True] if allow_checkpointing else [False])
    for ckpt in choices:
        per_sample = sequences * sample_bytes(shape, seq_len, ckpt, act_bytes)
        for mb in sorted((d for d in range(1, effective + 1) if effective % d == 0), reverse=True):
            estimate = base + mb * per_sample
            if estimate <= budget_bytes:
                return MemoryPlan(budget_bytes, mb, effective // mb, ckpt, estimate, True)
    ckpt = choices[-1]
    one = base + sequences * sample_bytes(shape, seq_len, ckpt, act_bytes)
    return MemoryPlan(budget_bytes, 1, effective, ckpt, one, False)


# ---------------------------------------------------------------- time


@dataclass(frozen=True, slots=True)
class TimePlan:
    """Steps and validation interval chosen to end inside the budget."""

    budget_s: float
    seconds_per_step: float
    seconds_per_eval: float
    max_steps: int
    eval_steps: int
    capped_by: str  # "budget" or "epochs" (the epochs cap came first) or "max_steps"

    def sentence(self, device: str, validation: bool = True) -> str:
        """'CPU, 2 threads: 21 s/step -> 80 steps in 30 min, validation every 10'."""
        line = (f"{device}: {self.seconds_per_step:.3g} s/step -> {self.max_steps} steps in "
                f"{self.budget_s / 60:.3g} min" + (f", validation every {self.eval_steps}" if validation else ""))
        if self.capped_by == "epochs":
            line += " (the epochs cap: the budget would allow more)"
        return line


def plan_time(budget_s: float, elapsed_s: float, done_steps: int, seconds_per_step: float, seconds_per_eval: float,
              cap_steps: int, eval_steps: int = 0, evaluations: int = 8, done_evals: int = 0) -> TimePlan:
    """max_steps and eval_steps so that the run (elapsed so far + the remaining steps + their validations) ends
    inside `budget_s`. `eval_steps` 0: about `evaluations` validations per run. Never fewer steps than done + 1,
    never more than `cap_steps` (or than done, once the cap is reached)."""
    step_s = max(seconds_per_step, 1e-6)
    left = budget_s - elapsed_s

    def cost(steps: int) -> tuple[float, int]:
        every = eval_steps if eval_steps > 0 else max(1, math.ceil(steps / evaluations))
        n_evals = math.ceil(steps / every) - done_evals  # the last step is always validated
        return (steps - done_steps) * step_s + max(0, n_evals) * seconds_per_eval, every

    # The largest number of steps that fits, found from the steps-only bound downwards.
    steps = min(cap_steps, done_steps + max(0, math.floor(left / step_s)))
    while steps > done_steps + 1 and cost(steps)[0] > left:
        over = cost(steps)[0] - left
        steps -= max(1, math.floor(over / (step_s + seconds_per_eval / max(1, evaluations))))
    steps = max(steps, done_steps if done_steps >= cap_steps else done_steps + 1)
    capped = "epochs" if steps >= cap_steps and cost(cap_steps)[0] < left else "budget"
    return TimePlan(budget_s, seconds_per_step, seconds_per_eval, steps, cost(steps)[1], capped)


def parse_budget(value: str) -> float:
    """'30m', '1h', '90s', '1h30m' or a bare number of minutes -> minutes. ValueError on anything else."""
    import re

    text = value.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(min|h|m|s)", text)
    if not parts or "".join(f"{n}{u}" for n, u in parts) != re.sub(r"\s+", "", text):
        raise ValueError(f"{value!r} is not a duration: use e.g. 30m, 1h, 1h30m or 90s")
    unit = {"h": 60.0, "m": 1.0, "min": 1.0, "s": 1 / 60}
    return sum(float(n) * unit[u] for n, u in parts)


# ---------------------------------------------------------------- applying the time plan to a Trainer run

PLAN_AFTER_STEPS = 3  # steps timed before planning (the first pays one-off costs and is left out when it can be)


def eval_estimate_s(seconds_per_step: float, val_samples: int, effective_batch: int, sample_prompts: int) -> float:
    """A validation's seconds before one has been timed: forward passes only (~1/3 of a step per batch of
    samples) plus the sample generations and the checkpoint (half a step each prompt, a rough guess)."""
    return seconds_per_step * (math.ceil(val_samples / max(1, effective_batch)) / 3 + 0.5 * sample_prompts + 0.5)


def time_budget_callback(budget_s: float, started: float, cap_steps: int, eval_steps: int, first_eval_s,
                         on_plan, evaluations: int = 8):
    """A TrainerCallback that times the first steps, then sets max_steps and the validation interval so the run
    ends inside `budget_s` seconds from `started` (time.monotonic()); it re-plans max_steps after every timed
    validation. `first_eval_s(seconds_per_step)` guesses a validation's cost until one is timed; `on_plan(plan,
    first)` is told every plan (to print and record it). Early stopping still ends the run sooner."""
    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):
        def __init__(self):
            self.plan: TimePlan | None = None
            self.steps: list[float] = []
            self.evals: list[float] = []
            self.t_step = self.t_end = None
            self.evaluated = False

        def on_step_begin(self, args, state, control, **kwargs):
            now = time.monotonic()
            if self.evaluated and self.t_end is not None:  # the gap since the last step: validation + checkpoint
                self.evals.append(now - self.t_end)
                self.evaluated = False
                if self.plan is not None:
                    self._plan(args, state, control, kwargs, first=False)
            self.t_step = now

        def on_evaluate(self, args, state, control, **kwargs):
            self.evaluated = True

        def on_step_end(self, args, state, control, **kwargs):
            self.t_end = time.monotonic()
            self.steps.append(self.t_end - self.t_step)
            if self.plan is None and (len(self.steps) >= PLAN_AFTER_STEPS or state.global_step >= state.max_steps
                                      or self.t_end - started > budget_s / 10):
                self._plan(args, state, control, kwargs, first=True)

        def _plan(self, args, state, control, kwargs, first: bool):
            timed = self.steps[1:] if len(self.steps) > 1 else self.steps
            per_step = sum(timed) / len(timed)
            per_eval = sum(self.evals) / len(self.evals) if self.evals else first_eval_s(per_step)
            every = self.plan.eval_steps if self.plan is not None else eval_steps
            done_evals = len(self.evals)
            plan = plan_time(budget_s, time.monotonic() - started, state.global_step, per_step, per_eval,
                             cap_steps, every, evaluations, done_evals)
            changed = self.plan is None or plan.max_steps != self.plan.max_steps
            self.plan = plan
            state.max_steps = plan.max_steps
            state.eval_steps = state.save_steps = plan.eval_steps
            if state.global_step >= plan.max_steps:  # the budget is already spent: validate, save and stop here
                control.should_training_stop = True
                control.should_evaluate = control.should_evaluate or args.eval_strategy != "no"
                control.should_save = control.should_save or args.save_strategy != "no"
            if first:
                _rescale_schedule(args, kwargs.get("lr_scheduler"), plan.max_steps)
            if changed:
                on_plan(plan, first)

    return TimeBudget()


def _rescale_schedule(args, scheduler, total_steps: int) -> None:
    """Warmup and decay were laid out for the provisional step count: lay them out for the planned one."""
    if scheduler is None or not hasattr(scheduler, "lr_lambdas"):
        return
    import torch
    from transformers import get_scheduler

    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    fresh = get_scheduler(args.lr_scheduler_type, optimizer=dummy, num_warmup_steps=args.get_warmup_steps(total_steps),
                          num_training_steps=total_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    if len(fresh.lr_lambdas) == 1:
        scheduler.lr_lambdas = fresh.lr_lambdas * len(scheduler.lr_lambdas)


def resolve_budget_min(budget_min: float | None, cpu_budget_min: float, cuda: bool, length_given: bool) -> float:
    """The minutes a run gets (0: no budget): train.budget_min when set; unset, cpu_budget_min on a CPU run that
    names no length (--max-steps, --epochs) of its own, and none on a GPU (its epochs stay)."""
    if budget_min is not None:
        return float(budget_min)
    return 0.0 if cuda or length_given else float(cpu_budget_min)
