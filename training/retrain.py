"""`convo retrain`: the gated learning loop, read top to bottom.

current version (adapters/NAME/current) -> feedback split by draft id (train / held out) -> new training set (the
persona's dataset + sent and edited drafts) -> SFT continuing from the current adapter (TRL) -> KTO pass on 👍/👎
when enough labels of both kinds exist (TRL KTOTrainer, class weights for imbalance) -> gate: current vs candidate
on the same validation set and the held-out feedback -> the candidate becomes vN either way; `current` moves to it
only when it passed, and a reload is published. The decision and its reason go to the version's meta, the
retrain-runs table and the terminal.

Gate: validation NLL (nats/token over completion tokens) may be worse by at most `feedback.tolerance`; the feedback
margin (mean per-token log-likelihood of held-out desirable drafts minus that of undesirable ones) must not drop.
Without held-out labels of both kinds the margin check is skipped and the reason says so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from errors import ConfigError, ConvoError, TrainError
from inference.adapter_meta import read_adapter_meta, write_adapter_meta
from inference.versions import current_version, next_version
from training.feedback.export import Exported, SpeakerMap, build_rows, rows_sha256, split_heldout
from training.feedback.store import FeedbackStore, RetrainRun
from training.versions import persona_dir, publish_reload

logger = logging.getLogger("convo.retrain")
LOCK_FILE = ".retrain.lock"
MARGIN_EPS = 1e-9


class RetrainBusy(ConvoError):
    """Another retrain holds the lock of this adapters dir."""


@dataclass
class RetrainOutcome:
    """What one retrain decided, with the numbers behind it."""

    persona: str
    status: str  # promoted | rejected
    reason: str
    parent: str
    candidate: str
    gate: dict[str, Any]
    kto: dict[str, Any] | None
    counts: dict[str, Any]
    reload_receivers: int | None = None
    paths: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def retrain_lock(adapters_dir: Path):
    """One retrain at a time per adapters dir (an flock, released when the process dies)."""
    import fcntl

    adapters_dir.mkdir(parents=True, exist_ok=True)
    with open(adapters_dir / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RetrainBusy(f"{adapters_dir}: another retrain is running; try again when it has finished") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def retrain(
    settings,
    persona: str,
    store: FeedbackStore,
    *,
    data_dir: Path | None = None,
    base: str | None = None,
    train_overrides: dict[str, Any] | None = None,
    console: Console | None = None,
    publish: bool = True,
) -> RetrainOutcome:
    """Train a candidate version for `persona` from its feedback, gate it against `current`, promote if it passes."""
    fs = settings.feedback
    console = console or Console(stderr=True)
    adapters_dir = Path(fs.adapters_dir)
    pdir = persona_dir(adapters_dir, persona)
    started = datetime.now(UTC)
    with retrain_lock(adapters_dir):
        parent = current_version(pdir)
        version = next_version(pdir)
        work = pdir / f".work-{version}"
        try:
            if parent is None:
                raise ConfigError(f"{pdir}: no `current` version to continue from; "
                                  f"`convo adapters promote {persona} VERSION` first")
            outcome = _retrain(settings, persona, store, pdir, parent, version, work, data_dir, base,
                               train_overrides or {}, console, started)
        except BaseException as e:
            shutil.rmtree(work, ignore_errors=True)
            if isinstance(e, Exception):
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:1000]
                store.record_run(RetrainRun(persona, "failed", reason, started, datetime.now(UTC), parent, version))
            raise
    if outcome.status == "promoted" and publish:
        outcome.reload_receivers = publish_reload(settings.redis, persona, outcome.candidate)
    return outcome


def _retrain(settings, persona, store, pdir: Path, parent: str, version: str, work: Path, data_dir, base,
             train_overrides: dict, console: Console, started: datetime) -> RetrainOutcome:
    from training.train import CHECKPOINTS, TrainOptions, read_dataset, train

    fs = settings.feedback
    parent_dir = pdir / parent
    parent_meta = read_adapter_meta(parent_dir)
    base = base or parent_meta.base_model.id
    data_dir = Path(data_dir or parent_meta.training_args.get("data_dir") or "")
    if not (data_dir / "meta.json").is_file():
        raise ConfigError(f"{persona}: the dataset of {parent} ({data_dir}) is not there; pass --data DIR "
                          "(the `convo dataset` output the adapter was trained on)")
    dataset = read_dataset(data_dir)

    # Feedback: drafts split by a hash of their id, so the held-out share is stable across retrains.
    stored = store.iter_events(persona=persona)
    data_until = max((s.received_at for s in stored), default=None)
    speakers = SpeakerMap.from_meta(parent_meta)
    events = [s.event for s in stored]
    fb_train = build_rows([e for e in events if not split_heldout(e.draft_id, fs.heldout_fraction)], speakers)
    fb_held = build_rows([e for e in events if split_heldout(e.draft_id, fs.heldout_fraction)], speakers)
    console.print(f"[bold]{persona}[/]: {len(events)} feedback events -> training {fb_train.counts}, "
                  f"held out {fb_held.counts}")

    # 1. New training set: the persona's dataset + what the owner sent; the validation set stays the same.
    shutil.rmtree(work, ignore_errors=True)
    train_data = work / "data"
    train_data.mkdir(parents=True)
    _write_rows(train_data / "train.jsonl", dataset.train + fb_train.sft)
    _write_rows(train_data / "val.jsonl", dataset.val)
    shutil.copyfile(data_dir / "meta.json", train_data / "meta.json")

    # 2. SFT continuing from the current version.
    overrides = {"epochs": fs.retrain_epochs, "max_steps": fs.retrain_max_steps, **train_overrides}
    opts = TrainOptions.from_settings(settings.train, data_dir=train_data, base=base, out_dir=work / "adapter",
                                      init_adapter=parent_dir, force=True, **overrides)
    result = train(opts, console=console)
    if result.interrupted:
        raise TrainError("retrain interrupted; the current version keeps serving")
    sft_metrics = {"steps": result.global_step, "final_eval_loss": result.final_eval_loss,
                   "train_seconds": round(result.train_seconds, 2)}
    result.trainer = None  # free the model before the next one loads
    shutil.rmtree(work / "adapter" / CHECKPOINTS, ignore_errors=True)

    # 3. KTO on unpaired 👍/👎, once enough labels of both kinds exist.
    n_pos = sum(1 for r in fb_train.kto if r["label"])
    n_neg = len(fb_train.kto) - n_pos
    kto_metrics = None
    if len(fb_train.kto) >= fs.min_kto_labels and n_pos and n_neg:
        kto_metrics = run_kto(base, work / "adapter", fb_train.kto, settings, work / "kto", console)
    else:
        console.print(f"KTO skipped: {n_pos} desirable / {n_neg} undesirable labels "
                      f"(needs {fs.min_kto_labels} with both kinds)")

    # 4. Gate: current vs candidate on the same validation set and held-out feedback.
    gate = gate_metrics(base, {"current": parent_dir, "candidate": work / "adapter"}, dataset.val, fb_held,
                        settings.train.max_length)
    passed, reason = decide(gate["current"], gate["candidate"], fs.tolerance)
    status = "promoted" if passed else "rejected"

    # 5. The candidate becomes vN either way (inspectable, promotable by hand); `current` moves only if it passed.
    cand_dir = work / "adapter"
    meta = read_adapter_meta(cand_dir)
    meta.training_args["data_dir"] = str(data_dir)  # the persona's dataset, which the next retrain starts from
    counts = {"events": len(events), "train": fb_train.counts, "heldout": fb_held.counts,
              "skipped": {**fb_train.skipped, **fb_held.skipped}, "dataset_train": len(dataset.train),
              "dataset_val": len(dataset.val)}
    loop = {
        "status": status, "reason": reason, "parent": parent, "tolerance": fs.tolerance,
        "current": gate["current"], "candidate": gate["candidate"], "sft": sft_metrics, "kto": kto_metrics,
        "counts": counts,
        "data_hashes": {"dataset_sha256": dataset.sha256, "train_set_sha256": meta.dataset_sha256,
                        "feedback_sft_sha256": rows_sha256(fb_train.sft), "feedback_kto_sha256": rows_sha256(fb_train.kto),
                        "heldout_sha256": rows_sha256(fb_held.sft + fb_held.kto)},
        "data_until": data_until.isoformat() if data_until else None,
    }
    meta = type(meta).model_validate({**meta.model_dump(mode="json"), "parent": parent, "loop": loop})
    write_adapter_meta(cand_dir, meta)
    final_dir = pdir / version
    os.replace(cand_dir, final_dir)
    shutil.rmtree(work, ignore_errors=True)
    if passed:
        from inference.versions import set_current

        set_current(pdir, version)
    logger.info("retrain %s %s -> %s %s", persona, parent, version, status)
    store.record_run(RetrainRun(persona, status, reason, started, datetime.now(UTC), parent, version, data_until,
                                {"current": gate["current"], "candidate": gate["candidate"], "kto": kto_metrics}))
    return RetrainOutcome(persona, status, reason, parent, version, gate, kto_metrics, counts,
                          paths={"version": str(final_dir)})


def _write_rows(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def kto_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight) so both classes weigh the same in the loss (TRL's advice:
    desirable_weight * n_desirable / (undesirable_weight * n_undesirable) within [1, 4/3])."""
    if n_desirable >= n_undesirable:
        return n_undesirable / n_desirable, 1.0
    return 1.0, n_desirable / n_undesirable


def run_kto(base: str, adapter_dir: Path, rows: list[dict], settings, work: Path, console: Console) -> dict:
    """One KTO pass on top of the SFT'd adapter in `adapter_dir` (overwritten with the result); returns metrics."""
    import datasets
    import torch
    import transformers
    from trl import KTOConfig, KTOTrainer

    from training.train import load_trainable_adapter

    fs = settings.feedback
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    cuda = torch.cuda.is_available()
    model, tokenizer, bf16 = load_trainable_adapter(base, adapter_dir)
    n_pos = sum(1 for r in rows if r["label"])
    dw, uw = kto_weights(n_pos, len(rows) - n_pos)
    config = KTOConfig(
        output_dir=str(work),
        per_device_train_batch_size=max(2, min(fs.kto_batch_size, len(rows))),
        learning_rate=fs.kto_learning_rate,
        num_train_epochs=fs.kto_epochs,
        max_steps=fs.kto_max_steps,
        beta=fs.kto_beta,
        desirable_weight=dw,
        undesirable_weight=uw,
        max_length=settings.train.max_length,
        dataloader_drop_last=True,  # the KL estimate needs every batch to hold more than one example
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        seed=settings.train.seed,
        use_cpu=not cuda,
        bf16=bf16,
        activation_checkpointing=cuda,
    )
    # With a PeftModel and no ref_model, TRL copies the adapter into a frozen "ref" adapter: the reference policy
    # is the SFT'd candidate, not the bare base.
    trainer = KTOTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the metrics come back in the summary instead of printed dicts
    start = time.monotonic()
    with console.status(f"KTO on {len(rows)} labels ({n_pos} 👍 / {len(rows) - n_pos} 👎)"):
        trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    model = trainer.model
    if "ref" in model.peft_config:
        model.delete_adapter("ref")
    model.save_pretrained(str(adapter_dir))  # the "default" adapter, in place of the SFT weights
    shutil.rmtree(work, ignore_errors=True)
    return {
        "labels": len(rows), "desirable": n_pos, "undesirable": len(rows) - n_pos,
        "desirable_weight": round(dw, 4), "undesirable_weight": round(uw, 4), "steps": trainer.state.global_step,
        "first_loss": logs[0]["loss"] if logs else None, "last_loss": logs[-1]["loss"] if logs else None,
        "train_seconds": round(time.monotonic() - start, 2),
    }


def _per_token(pairs: list[tuple[float, int]]) -> list[float]:
    return [-nll / n for nll, n in pairs if n > 0]


def gate_metrics(base: str, adapters: dict[str, Path], val_rows: list[dict], held: Exported,
                 max_length: int | None) -> dict[str, dict[str, Any]]:
    """For each named adapter: validation NLL, held-out sent NLL and the liked-vs-disliked margin (one base load)."""
    import warnings

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inference.engine import Engine

    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16 if cuda else torch.float32)
    model.to("cuda" if cuda else "cpu")
    names = list(adapters)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(adapters[name]), adapter_name=name)
    model.eval()
    engine = Engine(model, tokenizer)
    val_pairs = [(r["prompt"], r["completion"]) for r in val_rows]
    sent_pairs = [(r["prompt"], r["completion"]) for r in held.sft]
    good = [(r["prompt"], r["completion"]) for r in held.kto if r["label"]]
    bad = [(r["prompt"], r["completion"]) for r in held.kto if not r["label"]]
    out = {}
    for name in names:
        model.set_adapter(name)
        val = engine.completion_nll(val_pairs, max_length=max_length)
        tokens = sum(n for _, n in val)
        m: dict[str, Any] = {"val_nll": sum(x for x, _ in val) / tokens if tokens else None, "val_tokens": tokens}
        if sent_pairs:
            sent = engine.completion_nll(sent_pairs, max_length=max_length)
            m["sent_nll"] = sum(x for x, _ in sent) / max(1, sum(n for _, n in sent))
            m["sent_rows"] = len(sent_pairs)
        if good and bad:
            g = _per_token(engine.completion_nll(good, max_length=max_length))
            b = _per_token(engine.completion_nll(bad, max_length=max_length))
            m["margin"] = sum(g) / len(g) - sum(b) / len(b)
            m["margin_rows"] = [len(g), len(b)]
        out[name] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in m.items()}
    return out


def decide(current: dict, candidate: dict, tolerance: float) -> tuple[bool, str]:
    """(passed, reason): validation NLL not worse by more than `tolerance`, feedback margin not lower."""
    cur_nll, cand_nll = current["val_nll"], candidate["val_nll"]
    if cur_nll is None or cand_nll is None or not math.isfinite(cand_nll):
        return False, "no validation NLL for the candidate; the current version keeps serving"
    nll = f"validation NLL {cur_nll:.4f} -> {cand_nll:.4f} (tolerance {tolerance:g})"
    if cand_nll > cur_nll + tolerance:
        return False, f"rejected: {nll} is worse by more than the tolerance; the current version keeps serving"
    if "margin" in current and "margin" in candidate:
        margin = f"feedback margin {current['margin']:.4f} -> {candidate['margin']:.4f}"
        if candidate["margin"] < current["margin"] - MARGIN_EPS:
            return False, f"rejected: {margin} dropped ({nll}); the current version keeps serving"
        return True, f"promoted: {nll}; {margin}"
    return True, f"promoted: {nll}; no held-out liked and disliked drafts, margin not checked"
