"""The learning loop's gate on a tiny in-process base: a candidate trained on shuffled targets vs one trained on the
real data, both continuing from the same v1, judged on the same validation set and held-out feedback.

    PYTHONPATH=. .venv/bin/python bench/loop.py [--v1-steps 30] [--retrain-steps 20] [--kto]

Builds a tiny base (2 layers, hidden 32) and the test dataset (ALICE answers RIYA in a few fixed ways), trains v1,
stores 40 feedback events (sent/liked drafts in ALICE's style, disliked junk), then runs `retrain` twice and prints
the gate numbers and decisions with timings. Numbers are from a tiny model: they show the gate works, not quality.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--v1-steps", type=int, default=30)
    ap.add_argument("--retrain-steps", type=int, default=20)
    ap.add_argument("--kto", action="store_true", help="run the KTO pass too (min_kto_labels=8)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch
    from rich.console import Console

    torch.set_num_threads(args.threads)
    from config.settings import TrainSettings
    from inference.versions import set_current
    from tests.conftest import _TINY_LINES
    from tests.fixtures.train.make_dataset import write_dataset
    from tests.test_retrain import TRAIN, feedback_events, settings_for, shuffled_copy
    from training.feedback.store import FeedbackStore
    from training.retrain import retrain
    from training.tiny_base import build_tiny_base, render_conversation
    from training.train import TrainOptions, train

    quiet = Console(file=open("/dev/null", "w"))  # noqa: SIM115
    work = Path(tempfile.mkdtemp(prefix="convo-loop-"))
    try:
        rng = random.Random(0)
        texts = [render_conversation([(str(i % 2), rng.choice(_TINY_LINES)) for i in range(rng.randint(2, 8))], rng)
                 for _ in range(300)]
        base = work / "base"
        build_tiny_base(base, texts, vocab_size=400, hidden_size=32, num_layers=2, num_heads=2, max_steps=40,
                        max_minutes=1.0, seed=0, seq_len=64, batch_size=8)
        data = write_dataset(work / "data", n_train=48, n_val=12)
        root = work / "adapters"
        train(TrainOptions.from_settings(TrainSettings(**TRAIN, max_steps=args.v1_steps, eval_steps=args.v1_steps),
                                         data_dir=data, base=str(base), out_dir=root / "alice" / "v1"), console=quiet)
        set_current(root / "alice", "v1")
        store = FeedbackStore(f"sqlite:///{work}/feedback.db")
        store.create()
        for e in feedback_events():
            store.add(e)
        kto = {"min_kto_labels": 8, "kto_max_steps": 2, "kto_batch_size": 4, "kto_learning_rate": 1e-4} if args.kto else {}
        settings = settings_for(root, retrain_max_steps=args.retrain_steps, **kto)
        for label, data_dir in (("shuffled targets", shuffled_copy(data, work / "shuffled")), ("real data", data)):
            t0 = time.monotonic()
            o = retrain(settings, "alice", store, data_dir=data_dir, console=quiet, publish=False)
            print(json.dumps({"candidate": label, "version": o.candidate, "status": o.status,
                              "current": o.gate["current"], "candidate_metrics": o.gate["candidate"],
                              "kto": o.kto, "seconds": round(time.monotonic() - t0, 1), "reason": o.reason}))
        store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
