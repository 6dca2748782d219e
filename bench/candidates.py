"""What the candidate step does to real generations: flaw rates before cleaning, after it, and with rerank.

On a real base with a persona adapter, casual one-line prompts (the kind a friend sends) are answered with the
project's sampling settings, for each repetition setting given. Per setting it prints, side by side, the share of
candidates that are empty, hold a `[TAG]`, repeat a line or loop, or sound like an assistant:

* raw: the first n samples as the model wrote them (what was served before the candidate step);
* clean: inference.candidates without rerank (cleaned, distinct, bad samples re-drawn);
* rerank: the same with rerank_k samples, the n the adapter prefers over the base kept;

and what it took: samples drawn per prompt, prompts left short of n, the rerank's extra forward passes (each
scored candidate once through the adapter and once through the base) and its wall time against `clean`.
A greedy pass (n=1, temperature 0, the issue's `convo ask --n 1 --temperature 0` case) is reported too.

    python bench/candidates.py --adapter /path/to/adapter --base models/smollm2-135m --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "are you free tomorrow?", "i'm so tired lol", "hey what are you up to tonight?", "did you see the game last night",
    "want to grab lunch?", "how was your weekend?", "omg guess what happened", "are you still coming to the party?",
    "i just finished my exams!!", "what should i watch tonight", "can you call me later", "i miss you haha",
    "that movie was so bad", "running late sorry", "do you have any plans for the summer?", "good morning :)",
    "did you finish the homework?", "i got the job!!", "where are you", "lol that's hilarious",
    "what are you eating", "my phone is almost dead", "you awake?", "happy birthday!!",
    "should i text him back", "ugh mondays", "coffee later?", "how's your mom doing",
    "i can't decide what to wear", "that was fun today", "are you mad at me?", "ok see you soon",
]
FLAW_COLUMNS = ("empty", "tag", "repeat", "assistant")


def candidate_flaws(messages: list[str], target: str) -> set[str]:
    """Flaws of one served candidate (repeat covers both a repeated line and a looping message)."""
    from inference.candidates import completion_text, flaws

    if not messages:
        return {"empty"}
    found = set(flaws(completion_text(messages, target), target))
    if "loop" in found:
        found = (found - {"loop"}) | {"repeat"}
    return found


def rates(candidates: list[list[list[str]]], target: str) -> dict[str, float]:
    """Share of candidates with each flaw, and the share of prompts that got none at all."""
    flat = [c for per in candidates for c in per]
    found = [candidate_flaws(c, target) for c in flat]
    out = {f: sum(f in x for x in found) / max(len(flat), 1) for f in FLAW_COLUMNS}
    out["bad"] = sum(bool(x) for x in found) / max(len(flat), 1)
    return out


def run_setting(engine, prompts: list[str], target: str, base_opts, label: str) -> dict:
    """Raw, clean and rerank figures for one decoding setting."""
    raw, clean, rerank = [], [], []
    stats = {"clean_s": 0.0, "rerank_s": 0.0, "clean_samples": 0, "rerank_samples": 0, "scored": 0, "short": 0}
    for i, prompt in enumerate(prompts):
        opts = dataclasses.replace(base_opts, seed=1000 + i, rerank_k=0)
        t0 = time.perf_counter()
        plain = engine.sample(prompt, target, opts)
        stats["clean_s"] += time.perf_counter() - t0
        raw.append([_as_messages(r, target) for r in plain.raw[: opts.n]])  # round 0: what was served before
        clean.append(plain.candidates)
        stats["clean_samples"] += plain.samples
        stats["short"] += len(plain.candidates) < opts.n
        t0 = time.perf_counter()
        best = engine.sample(prompt, target, dataclasses.replace(opts, rerank_k=base_opts.rerank_k))
        stats["rerank_s"] += time.perf_counter() - t0
        rerank.append(best.candidates)
        stats["rerank_samples"] += best.samples
        stats["scored"] += best.scored
    n = len(prompts)
    return {
        "setting": label,
        "raw": rates(raw, target),
        "clean": rates(clean, target),
        "rerank": rates(rerank, target),
        "samples_per_prompt": {"clean": stats["clean_samples"] / n, "rerank": stats["rerank_samples"] / n},
        "short_prompts": stats["short"],
        "rerank_forward_rows_per_prompt": 2 * stats["scored"] / n,
        "rerank_wall_ratio": stats["rerank_s"] / max(stats["clean_s"], 1e-9),
        "seconds": {"clean": stats["clean_s"], "rerank": stats["rerank_s"]},
        "examples": {"raw": raw[:4], "clean": clean[:4], "rerank": rerank[:4]},
    }


def _as_messages(raw: str, target: str) -> list[str]:
    from inference.prompt_format import split_completion, trim_burst

    return split_completion(trim_burst(raw, target), target)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", type=Path, required=True, help="persona adapter dir (convo train)")
    ap.add_argument("--base", help="base model dir (default: the adapter's recorded base)")
    ap.add_argument("--prompts", type=int, default=16, help=f"casual prompts used (at most {len(PROMPTS)})")
    ap.add_argument("--other", default="SAM", help="tag of the person writing the prompts")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--rerank-k", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--settings", default="1.0:0,1.2:0,1.0:3",
                    help="PENALTY:NGRAM pairs to compare (repetition penalty, no-repeat n-gram size; 1.0:0 = off)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from config.settings import GenerateSettings
    from inference.engine import Engine, SimulateOptions
    from inference.prompt_format import Turn, render_prompt

    engine = Engine.load(base=args.base, adapter=args.adapter, device="cpu")
    target = engine.meta.persona.tag
    prompts = [render_prompt([Turn(args.other, text)], target) for text in PROMPTS[: args.prompts]]
    base_opts = SimulateOptions.from_settings(GenerateSettings(), n=args.n, rerank_k=args.rerank_k,
                                              max_new_tokens=args.max_new_tokens)
    t_all = time.perf_counter()
    results = []
    for pair in args.settings.split(","):
        penalty, ngram = float(pair.split(":")[0]), int(pair.split(":")[1])
        opts = dataclasses.replace(base_opts, repetition_penalty=penalty, no_repeat_ngram_size=ngram)
        label = f"penalty {penalty:g}, no-repeat {ngram}"
        results.append(run_setting(engine, prompts, target, opts, label))
        print_setting(results[-1], flush=True)
    greedy = dataclasses.replace(base_opts, n=1, temperature=0.0)
    raw, served = [], []
    for prompt in prompts:
        out = engine.sample(prompt, target, dataclasses.replace(greedy, rerank_k=0))
        raw.append([_as_messages(out.raw[0], target)])
        served.append(out.candidates)
    greedy_result = {"raw": rates(raw, target), "clean": rates(served, target)}
    print(f"greedy n=1 (defaults): raw {fmt(greedy_result['raw'])} | clean {fmt(greedy_result['clean'])}")
    print(f"{len(prompts)} prompts, n={args.n}, rerank_k={args.rerank_k}, max_new_tokens={args.max_new_tokens}, "
          f"{time.perf_counter() - t_all:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps({"settings": results, "greedy": greedy_result}, indent=2, ensure_ascii=False))
    return 0


def fmt(r: dict) -> str:
    """One rate dict as `empty 0.00 tag 0.00 ...`."""
    return " ".join(f"{k} {r[k]:.2f}" for k in (*FLAW_COLUMNS, "bad"))


def print_setting(r: dict, flush: bool = False) -> None:
    """One setting's rows: raw / clean / rerank rates and the costs."""
    print(f"== {r['setting']}")
    for stage in ("raw", "clean", "rerank"):
        print(f"  {stage:7} {fmt(r[stage])}")
    spp = r["samples_per_prompt"]
    print(f"  samples/prompt clean {spp['clean']:.1f} rerank {spp['rerank']:.1f}; prompts short of n: "
          f"{r['short_prompts']}; rerank: {r['rerank_forward_rows_per_prompt']:.1f} scored rows/prompt, wall "
          f"{r['rerank_wall_ratio']:.2f}x clean ({r['seconds']['clean']:.0f} s vs {r['seconds']['rerank']:.0f} s)",
          flush=flush)


if __name__ == "__main__":
    raise SystemExit(main())
