"""Quality study on real conversations no one here wrote: which method imitates a person best on generated text?

Speakers: the demo pair (examples/: Jordan, the friend Sam talks with most) and the most active chitchat-dataset
speakers. For each: their conversations become a message log, `convo dataset --mode friend` builds the samples,
an adapter trains until early stopping or the step cap (what stopped it is recorded), a preference step refines
it (when `training.prefer` is there), and `convo eval` runs every method on the same validation prompts:
base / incontext / retrieval / adapter / adapter+retrieval / adapter+rerank / adapter+preference.

The doc (docs/quality.md) is written entirely from the results JSON: bootstrap 95% intervals of every column,
paired differences against in-context and against the adapter, findings and a recommended default computed from
them. Results are saved after every method of every speaker; a rerun with the same settings skips what is done.

    python bench/quality.py --list                                  # candidate speakers
    python bench/quality.py --base /path/to/smollm2-135m            # the study (hours on 2 shared CPU cores)
    python bench/quality.py --doc-only                              # rebuild the doc from runs/quality/results.json
    python bench/quality.py --doc-only --results bench/quality_results.json

Everything runs in-process through the library functions behind `convo dataset`, `convo train` and `convo eval`.
Models and data go under --work (default runs/quality).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# In the order they run: the comparisons that answer the question first (a run cut short still has them).
METHODS = ("incontext", "adapter", "adapter+rerank", "adapter+preference", "base", "retrieval", "adapter+retrieval")
PREFERENCE = "adapter+preference"  # the eval's `adapter` method run with the preference-refined adapter
BASELINES = ("incontext", "adapter")  # every method is compared, paired, with these two
# (key, label, better, digits): the columns of every table; `better` is the direction of a better method.
COLUMNS = (
    ("nll", "NLL/token", "lower", 3),
    ("semantic", "semantic", "higher", 3),
    ("style", "style (calibrated)", "lower", 3),
    ("auc", "AUC", "lower", 3),
    ("empty", "empty", "lower", 2),
    ("repeated", "repeat", "lower", 2),
    ("copied", "copied", "lower", 2),
    ("assistant", "assistant voice", "lower", 2),
)
DIGITS = {c: d for c, _, _, d in COLUMNS}
GENERATED = ("semantic", "style", "auc")  # what a verdict "beats on generated text" rests on
FAILURES = ("empty", "repeated", "assistant")  # rates a better method must not make worse
# The adapter's training budget: runs merged into one doc may differ here (each speaker's section says what it had
# and what stopped it); everything else in RESUME_KEYS must be the same.
BUDGET_KEYS = ("max_steps", "eval_steps", "patience")
# Settings a rerun must share with the results it resumes (the speakers may differ: new ones are added).
RESUME_KEYS = ("base", "max_prompts", "n", "max_new_tokens", "budget", "seed", *BUDGET_KEYS, "lr", "lora_r",
               "lora_targets", "pref_pairs", "pref_steps", "batch_size", "max_length", "val_samples", "context", "rerank_k")


@dataclass(frozen=True, slots=True)
class Speaker:
    """One studied person: their chitchat id, the partner (None: every partner) and the names in the log."""

    key: str  # work dir and results key
    label: str
    persona_id: str
    partner_id: str | None
    persona_name: str
    partner_name: str


def chitchat():
    """The chitchat-dataset conversations: {conversation id: {"messages": [[{text, timestamp, sender}]]}}."""
    import chitchat_dataset

    return chitchat_dataset.Dataset()


def candidates(data, min_conversations: int = 100) -> list[dict]:
    """Speakers with at least `min_conversations` conversations, most conversations first."""
    convs, msgs = Counter(), Counter()
    for conv in data.values():
        senders = set()
        for block in conv["messages"]:
            for m in block:
                senders.add(m["sender"])
                msgs[m["sender"]] += 1
        convs.update(senders)
    return [
        {"speaker": s, "conversations": n, "messages": msgs[s]}
        for s, n in convs.most_common()
        if n >= min_conversations
    ]


def study_speakers(data, args) -> list[Speaker]:
    """The demo pair (unless --no-demo), then --speakers or the --top most active chitchat speakers."""
    out = []
    if args.demo:
        from examples.make_examples import pick

        me, friend, *_ = pick()
        out.append(Speaker("demo-jordan", "demo pair: Jordan (to Sam)", friend, me, "Jordan", "Sam"))
    taken = {s.persona_id for s in out} | {s.partner_id for s in out}
    if args.speakers:
        ids = args.speakers.split(",")
    else:
        ids = [c["speaker"] for c in candidates(data) if c["messages"] <= args.max_messages
               and c["speaker"] not in taken][: args.top]
    out += [Speaker(sp[:8], f"chitchat `{sp[:8]}`", sp, None, "Robin", "Sam") for sp in ids]
    return out


def write_messages(data, sp: Speaker, path: Path, max_conversations: int | None = None,
                   rewrite=None) -> tuple[int, int]:
    """The speaker's conversations (with `partner_id` only, when set) as a canonical messages.jsonl.

    Every partner becomes one speaker, the `me` of the log. `rewrite(burst texts) -> texts`, when given, rewrites
    each of the persona's bursts (bench/idiolect.py plants a texting style); its messages keep the burst's
    timestamps, one second apart past the original's last. Returns (conversations, messages).
    """
    from datetime import timedelta

    from training.ingest.records import Message

    lines, taken = [], 0
    for conv_id in sorted(data):
        blocks = data[conv_id]["messages"]
        senders = {m["sender"] for b in blocks for m in b}
        if sp.persona_id not in senders or (sp.partner_id and senders != {sp.persona_id, sp.partner_id}):
            continue
        if max_conversations is not None and taken >= max_conversations:
            break
        taken += 1
        for b in blocks:
            stamps = [datetime.fromisoformat(m["timestamp"].replace("Z", "+00:00")).astimezone(UTC) for m in b]
            texts = [m["text"] for m in b]
            if rewrite is not None and b[0]["sender"] == sp.persona_id:
                texts = rewrite(texts)
                stamps = [stamps[min(i, len(stamps) - 1)] + timedelta(seconds=max(0, i - len(stamps) + 1))
                          for i in range(len(texts))]
            for i, (ts, text) in enumerate(zip(stamps, texts, strict=True)):
                mine = b[min(i, len(b) - 1)]["sender"] == sp.persona_id
                lines.append(Message(
                    chat=conv_id,
                    ts=ts,
                    speaker=sp.persona_name if mine else sp.partner_name,
                    speaker_id="persona" if mine else "partner",
                    text=text,
                    source="jsonl",
                ).to_json())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return taken, len(lines)


def method_availability() -> dict[str, str]:
    """Methods this checkout cannot run -> why (the doc lists them as not run)."""
    from training.evaluate.run import METHODS as EVAL_METHODS

    missing = {}
    if "adapter+rerank" not in EVAL_METHODS:
        missing["adapter+rerank"] = "`convo eval` has no adapter+rerank method in this checkout"
    try:
        from training import prefer  # noqa: F401
    except ImportError:
        missing[PREFERENCE] = "no preference step (`training.prefer`) in this checkout"
    return missing


# ---------------------------------------------------------------- training


def eval_curve(adapter_dir: Path) -> list[list[float]]:
    """[(step, validation loss)] from the adapter's train_log.jsonl."""
    from training.train import TRAIN_LOG

    path = adapter_dir / TRAIN_LOG
    if not path.is_file():
        return []
    recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    curve = {r["step"]: round(r["eval_loss"], 4) for r in reversed(recs) if "eval_loss" in r}  # first per step
    return [[step, curve[step]] for step in sorted(curve)]


def train_adapter(data_dir: Path, base: str, out: Path, args, console) -> dict:
    """Train with early stopping on validation loss; the best checkpoint is what gets saved. Records what stopped it."""
    from config.settings import TrainSettings
    from training.train import TrainOptions, train

    t0 = time.monotonic()
    res = train(TrainOptions.from_settings(TrainSettings(),
        data_dir=data_dir, base=base, out_dir=out, lora_r=args.lora_r, lora_alpha=2 * args.lora_r,
        learning_rate=args.lr, max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=1,
        max_length=args.max_length, eval_steps=args.eval_steps, early_stopping_patience=args.patience,
        max_val_samples=args.val_samples, lora_target_modules=args.lora_targets, sample_prompts=0, seed=args.seed, force=True,
    ), console=console)
    early = res.stopped_by == "early_stopping"
    stopped = (f"early stopping at step {res.global_step} ({args.patience} validations without a better loss)"
               if early else f"the step cap ({args.max_steps} steps)" if res.stopped_by == "max_steps"
               else "the epoch limit (every sample seen the configured number of times)" if res.stopped_by
               else "an interruption")
    return {"steps": res.global_step, "best_eval_loss": _r(res.best_eval_loss), "seconds": round(time.monotonic() - t0, 1),
            "stopped_by": stopped, "stopped_early": early, "eval_curve": eval_curve(out)}


def _r(x, d=4):
    return None if x is None else round(x, d)


# ---------------------------------------------------------------- evaluation


def reply_flags(replies: list[list[str]], training_messages: set[str]) -> dict:
    """Counts behind the rate columns for one prompt's replies (so any set of prompts can be re-aggregated).

    Assistant voice is the candidate step's own test (inference.candidates.assistant_voice) on each message.
    """
    from inference.candidates import assistant_voice
    from training.evaluate import metrics as M

    out = dict.fromkeys(("replies", "empty", "repeated", "long", "copied", "assistant"), 0)
    for r in replies:
        d = M.degeneration([r], training_messages)
        long_msgs = sum(len(M.words(m)) >= M.COPY_MIN_WORDS for m in r)
        out["replies"] += 1
        out["empty"] += int(d["empty"] > 0)
        out["repeated"] += int(d["repeated"] > 0)
        out["long"] += long_msgs
        out["copied"] += round(d["copied"] * long_msgs)
        out["assistant"] += int(any(assistant_voice(m) for m in r))
    return out


def eval_method(method: str, engine, data_dir: Path, adapter: Path, out: Path, args, embedder, training_messages,
                max_total_tokens, attribution_log: Path | None = None) -> tuple[dict, list[dict], dict]:
    """One method through run_eval: (record with per-prompt units, comparisons, eval metrics).

    Each unit holds `attribution` ([persona hits, replies]) when the eval could attribute replies (see
    training.evaluate.attribution; `attribution_log` names the log of the other candidates)."""
    from training.evaluate import metrics as M
    from training.evaluate.run import EvalConfig, run_eval

    name = "adapter" if method == PREFERENCE else method
    t0 = time.monotonic()
    extra = {"rerank_k": args.rerank_k} if method == "adapter+rerank" else {}
    result = run_eval(EvalConfig(
        data_dir=data_dir, out_dir=out, adapter_dir=adapter, base=args.base, methods=(name,),
        context_budget_tokens=args.budget,
        samples_per_prompt=args.n, max_prompts=args.max_prompts, seed=args.seed, max_new_tokens=args.max_new_tokens,
        bootstrap_resamples=0, batch_size=args.gen_batch, retriever="bm25", max_total_tokens=max_total_tokens,
        attribution_log=attribution_log, **extra,
    ), engine=engine)
    comps = result.comparisons
    real = [c["real"] for c in comps]
    cands = [c["replies"][name] for c in comps]
    sem = M.semantic_similarity(real, [r for per in cands for r in per], [i for i, per in enumerate(cands) for _ in per],
                                embedder)
    units = [{"nll": c["nll"].get(name), "semantic": round(sem[i], 6), "replies": cands[i],
              "flags": reply_flags(cands[i], training_messages),
              "attribution": (c.get("attribution") or {}).get(name)} for i, c in enumerate(comps)]
    m = result.metrics["methods"][name]
    record = {"seconds": round(time.monotonic() - t0, 1), "context_tokens_mean": m["context_tokens_mean"],
              "units": units, "candidates": m.get("candidates")}
    return record, comps, result.metrics


# ---------------------------------------------------------------- statistics (no model needed: --doc-only)


def _percentile_interval(values: list[float], level: float = 0.95) -> list[float] | None:
    """Percentile interval as training.evaluate.metrics.bootstrap_interval takes it."""
    values = sorted(v for v in values if v is not None and v == v)
    if not values:
        return None
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    return [values[min(len(values) - 1, int(lo_q * len(values)))], values[min(len(values) - 1, int(hi_q * len(values)))]]


def column_statistics(run: dict, method: str, seed: int) -> dict:
    """{column: fn(prompt indices) -> value or None} for one method of one speaker."""
    from training.evaluate import metrics as M

    units = run["methods"][method]["units"]
    real, ref = run["real"], run["style_reference"]
    n = len(units)

    def rate(key, over="replies"):
        def fn(idx):
            den = sum(units[i]["flags"][over] for i in idx)
            return sum(units[i]["flags"][key] for i in idx) / den if den else 0.0
        return fn

    def nll(idx):
        pairs = [units[i]["nll"] for i in idx if units[i]["nll"]]
        return M.nll_summary(pairs)["nll_per_token"] if pairs else None

    def style(idx):
        return M.calibrated_style(M.style_distance([real[i] for i in idx], [r for i in idx for r in units[i]["replies"]]),
                                  ref)["combined"]

    gen = [r for u in units for r in u["replies"]]
    groups = [i for i, u in enumerate(units) for _ in u["replies"]]
    scores = M.distinguishability_scores(real, gen, list(range(n)), groups, seed)
    by_prompt = {i: [(1, scores[i])] for i in range(n)} if scores else {}
    for k, g in enumerate(groups if scores else []):
        by_prompt[g].append((0, scores[n + k]))

    def auc(idx):
        if not scores:
            return None
        pts = [p for i in idx for p in by_prompt[i]]
        return M.auc_from_scores([y for y, _ in pts], [x for _, x in pts])

    return {
        "nll": nll, "semantic": lambda idx: sum(units[i]["semantic"] for i in idx) / len(idx), "style": style,
        "auc": auc, "empty": rate("empty"), "repeated": rate("repeated"), "copied": rate("copied", "long"),
        "assistant": rate("assistant"),
    }


def speaker_statistics(run: dict, resamples: int, seed: int, columns=None) -> dict:
    """Per method and column: value, 95% interval and the bootstrap values (same resampled prompts for every
    method, so differences between methods are paired). `columns(run, method, seed)` gives the column functions
    (default: this study's, `column_statistics`)."""
    columns = columns or column_statistics
    n = len(run["real"])
    rng = random.Random(seed)
    draws = [[rng.randrange(n) for _ in range(n)] for _ in range(resamples)] if n >= 2 else []
    out = {}
    for method in run["methods"]:
        fns = columns(run, method, seed)
        out[method] = {}
        for col, fn in fns.items():
            boot = [fn(idx) for idx in draws]
            out[method][col] = {"value": fn(list(range(n))), "boot": boot, "interval": _percentile_interval(boot)}
    return out


def paired(stats: dict, a: str, b: str, col: str) -> dict | None:
    """Method `a` minus method `b` on one speaker's column: value, interval and bootstrap values."""
    if a not in stats or b not in stats:
        return None
    sa, sb = stats[a][col], stats[b][col]
    if sa["value"] is None or sb["value"] is None:
        return None
    boot = [x - y if x is not None and y is not None else None for x, y in zip(sa["boot"], sb["boot"], strict=True)]
    return {"value": sa["value"] - sb["value"], "interval": _percentile_interval(boot), "boot": boot}


def pooled(per_speaker: list[dict]) -> dict | None:
    """Mean over speakers of their paired differences; each speaker's prompts resampled on their own."""
    ds = [d for d in per_speaker if d is not None]
    if not ds:
        return None
    k = min(len(d["boot"]) for d in ds)
    boot = []
    for j in range(k):
        vals = [d["boot"][j] for d in ds]
        boot.append(None if any(v is None for v in vals) else sum(vals) / len(vals))
    return {"value": sum(d["value"] for d in ds) / len(ds), "interval": _percentile_interval(boot), "speakers": len(ds)}


def verdict(d: dict | None, better: str, digits: int) -> int:
    """+1: the difference is better with its interval excluding 0 at the precision shown; -1: worse likewise;
    0: not distinguishable."""
    if d is None or d["interval"] is None:
        return 0
    lo, hi = (round(x, digits) for x in d["interval"])
    sign = 1 if lo > 0 else -1 if hi < 0 else 0
    return sign if better == "higher" else -sign


# ---------------------------------------------------------------- the doc


def _fmt(x, d=3, signed=False) -> str:
    if x is None:
        return "-"
    return f"{x:+.{d}f}" if signed else f"{x:.{d}f}"


def _with_iv(s: dict | None, d: int, signed=False) -> str:
    if s is None or s["value"] is None:
        return "-"
    iv = s.get("interval")
    text = _fmt(s["value"], d, signed)
    return f"{text} [{_fmt(iv[0], d, signed)}, {_fmt(iv[1], d, signed)}]" if iv else text


def analyse(results: dict) -> dict:
    """Everything the doc states, computed from the results: statistics, paired differences, verdicts."""
    b, seed = results["args"]["bootstrap"], results["args"]["seed"]
    runs = {k: r for k, r in results["runs"].items() if r.get("real") and r.get("methods")}
    stats = {k: speaker_statistics(r, b, seed) for k, r in runs.items()}
    methods = [m for m in METHODS if any(m in s for s in stats.values())]
    diffs: dict = {}
    for base_m in methods:  # every pair: the recommendation asks whether any method beats another
        for m in methods:
            if m == base_m:
                continue
            for col, _, better, _ in COLUMNS:
                per = {k: paired(s, m, base_m, col) for k, s in stats.items()}
                votes = [verdict(d, better, DIGITS[col]) for d in per.values() if d is not None]
                diffs[(m, base_m, col)] = {"per": per, "pooled": pooled(list(per.values())),
                                           "wins": votes.count(1), "losses": votes.count(-1), "of": len(votes)}
    return {"runs": runs, "stats": stats, "methods": methods, "diffs": diffs}


def coverage(a: dict, m: str, base_m: str) -> tuple[int, int]:
    """(speakers where both `m` and `base_m` have results, speakers where `base_m` has results)."""
    return (sum(1 for s in a["stats"].values() if m in s and base_m in s),
            sum(1 for s in a["stats"].values() if base_m in s))


def beats(a: dict, m: str, base_m: str) -> tuple[bool, list[str], list[str]]:
    """Whether `m` beats `base_m` on generated text (pooled): better on a generated-text column with the interval
    excluding 0, worse on none of them nor on a failure rate, on every speaker `base_m` was run on.
    Returns (beats, better columns, worse columns)."""
    better, worse = [], []
    for col, _, direction, _ in COLUMNS:
        if col not in (*GENERATED, *FAILURES):
            continue
        d = a["diffs"].get((m, base_m, col))
        v = verdict(d and d["pooled"], direction, DIGITS[col]) if d else 0
        if v > 0 and col in GENERATED:
            better.append(col)
        if v < 0:
            worse.append(col)
    both, total = coverage(a, m, base_m)
    return bool(better) and not worse and both == total, better, worse


def findings(results: dict, a: dict) -> list[str]:
    """The computed statements of the doc's findings section, the recommended default last."""
    labels = {c: label for c, label, _, _ in COLUMNS}
    digits = {c: d for c, _, _, d in COLUMNS}
    direction = {c: b for c, _, b, _ in COLUMNS}
    lines = []
    n_sp = len(a["runs"])
    for base_m in BASELINES:
        if not any(base_m in s for s in a["stats"].values()):
            continue
        for m in a["methods"]:
            if m == base_m:
                continue
            parts = []
            for col, _, _, _ in COLUMNS:
                d = a["diffs"][(m, base_m, col)]
                if d["of"] and (d["wins"] or d["losses"] or verdict(d["pooled"], direction[col], digits[col])):
                    parts.append(f"{labels[col]} {_with_iv(d['pooled'], digits[col], True)} "
                                 f"(better on {d['wins']}/{d['of']} speakers, worse on {d['losses']}/{d['of']})")
            if base_m == "incontext" or m.startswith("adapter"):
                text = "; ".join(parts) if parts else "no column differs with an interval excluding 0 on any speaker"
                of = max((a["diffs"][(m, base_m, c)]["of"] for c, _, _, _ in COLUMNS), default=0)
                lines.append(f"- `{m}` vs `{base_m}` (paired difference, mean over {of} of {n_sp} "
                             f"speaker{'s' if n_sp > 1 else ''}): {text}.")
    rr = [(r["methods"]["adapter+rerank"], r["methods"]["adapter"]) for r in a["runs"].values()
          if "adapter+rerank" in r["methods"] and "adapter" in r["methods"]]
    if rr and all(x.get("candidates") and y.get("candidates") for x, y in rr):
        def mean(values):
            return sum(values) / len(values)

        lines.append(
            f"- Rerank cost ({len(rr)} speaker{'s' if len(rr) > 1 else ''}): `adapter+rerank` drew "
            f"{mean([x['candidates']['samples_per_prompt'] for x, _ in rr]):.1f} raw samples per prompt against "
            f"{mean([y['candidates']['samples_per_prompt'] for _, y in rr]):.1f} for `adapter`, and scored "
            f"{mean([x['candidates']['scored_per_prompt'] for x, _ in rr]):.1f} candidates per prompt with two "
            "extra forward passes each (adapter and bare base); its eval took "
            f"{mean([x['seconds'] / y['seconds'] for x, y in rr]):.1f}× the plain adapter's time.")
    for base_m in BASELINES:
        for m in a["methods"]:
            if m == base_m or (base_m == "adapter" and not m.startswith("adapter")):
                continue
            _, better, worse = beats(a, m, base_m)
            both, total = coverage(a, m, base_m)
            if better and not worse and both < total:
                lines.append(f"- `{m}` is better than `{base_m}` on {', '.join(better)} but ran on {both} of the "
                             f"{total} speakers `{base_m}` ran on: not counted until it has run on all of them.")
    winners = []
    for m in a["methods"]:
        if m == "incontext":
            continue
        ok, better, _ = beats(a, m, "incontext")
        if ok:
            sem = a["diffs"][(m, "incontext", "semantic")]["pooled"]
            winners.append((len(better), sem["value"] if sem else 0.0, m, better))
    tried = ", ".join(f"`{m}`" for m in a["methods"] if m != "incontext")
    if winners:
        winners.sort(reverse=True)
        lines.append(f"- **Beats in-context on generated text:** {', '.join(f'`{w[2]}`' for w in winners)} "
                     f"(pooled paired interval better on at least one of {', '.join(GENERATED)} and worse on none of "
                     f"those nor on the {', '.join(FAILURES)} rates).")
    else:
        lines.append(f"- **No method beats in-context on generated text** on this evidence: tried {tried}; none is "
                     f"better than in-context (pooled paired interval excluding 0) on any of {', '.join(GENERATED)}, "
                     "on all the speakers in-context ran on, without being worse on another of them or on the "
                     f"{', '.join(FAILURES)} rates.")
    lines.append(recommendation(a))
    return lines


def recommendation(a: dict) -> str:
    """The default to serve: among the methods run on every speaker that no other method beats on generated text,
    the one with the lowest NLL/token (the likelihood of the person's real replies) breaks the tie."""
    full = [m for m in a["methods"] if all(m in s for s in a["stats"].values())]
    beaten = {m: [o for o in full if o != m and beats(a, o, m)[0]] for m in full}
    unbeaten = [m for m in full if not beaten[m]]
    if not unbeaten:
        return "- **Recommended default: none** (every method is beaten by another; the results hold a cycle)."

    def nll(m):  # mean over speakers of the method's NLL/token
        vals = [s[m]["nll"]["value"] for s in a["stats"].values() if s[m]["nll"]["value"] is not None]
        return sum(vals) / len(vals) if vals else float("inf")

    best = min(unbeaten, key=nll)
    beaten_by_best = [m for m in full if best in beaten[m]]
    serve = {"adapter+preference": "`convo train` runs the preference step by default (`train.prefer`), so this is "
                                   "the adapter the worker and `simulate` serve",
             "adapter": "`convo train --no-prefer` gives this adapter",
             "adapter+rerank": "set `generate.rerank_k` to serve it",
             "incontext": "the worker serves adapters only; in-context prompting is `convo eval --methods incontext`"}
    return (f"- **Recommended default: `{best}`**: no method beats it on generated text (unbeaten: "
            f"{', '.join(f'`{m}`' for m in unbeaten)}), and among those it has the lowest NLL/token "
            f"({nll(best):.3f}, mean over {len(a['stats'])} speakers)"
            + (f"; it beats {', '.join(f'`{m}`' for m in beaten_by_best)} on generated text" if beaten_by_best else "")
            + (f". {serve[best]}." if best in serve else "."))


def sizes_section(results: dict, a: dict) -> list[str]:
    """Sizes used, the issue's targets met or not, methods not run and why."""
    args = results["args"]
    runs = list(results["runs"].values())
    done = [r for r in runs if r.get("done")]
    chitchat_done = [r for r in done if not r["key"].startswith("demo")]
    demo_done = any(r["key"].startswith("demo") for r in done)
    prompts = sorted({len(r["real"]) for r in runs if r.get("real")})

    def met(ok):
        return "met" if ok else "**not met**"

    lines = [
        f"- Speakers finished with every method run: {len(done)} of {len(runs)} started "
        f"({', '.join(r['label'] for r in done) or 'none'}). Target ≥3 chitchat speakers plus the demo pair: "
        f"{met(len(chitchat_done) >= 3 and demo_done)} ({len(chitchat_done)} chitchat, demo pair "
        f"{'done' if demo_done else 'not done'}).",
        f"- Prompts per speaker: {', '.join(map(str, prompts)) or '-'} (asked: {args['max_prompts']}), "
        f"{args['n']} sampled replies each. Target ≥40 prompts × n=2: "
        f"{met(bool(prompts) and min(prompts) >= 40 and args['n'] >= 2)}.",
    ]
    trained = [r for r in runs if r.get("adapter")]
    early = [r for r in trained if r["adapter"].get("stopped_early")]
    if trained:
        lines.append(
            f"- Early stopping ended {len(early)} of {len(trained)} adapters"
            + (f" ({', '.join(r['label'] + ' at step ' + str(r['adapter']['steps']) for r in early)})" if early else "")
            + (f"; the step cap ended {', '.join(r['label'] for r in trained if r not in early)}"
               if len(early) < len(trained) else "") + ".")
    for r in runs:
        if not r.get("done"):
            pending = [m for m in METHODS if m not in r.get("methods", {}) and m not in results.get("not_run", {})]
            lines.append(f"- {r['label']}: unfinished when this doc was written; missing {', '.join(pending) or '-'}.")
    for m in METHODS:
        if m in results.get("not_run", {}):
            lines.append(f"- `{m}`: not run ({results['not_run'][m]}).")
    return lines


def result_table(run: dict, stats: dict) -> str:
    """Each method's columns with bootstrap 95% intervals, and the real replies' own rates."""
    head = "| method | ctx tokens | " + " | ".join(f"{label} {'↑' if b == 'higher' else '↓'}" for _, label, b, _ in COLUMNS) + " |"
    rows = [head, "|---|---:|" + "---:|" * len(COLUMNS)]
    for m in METHODS:
        if m not in stats:
            continue
        cells = [_with_iv(stats[m][c], d) for c, _, _, d in COLUMNS]
        rows.append(f"| {m} | {run['methods'][m]['context_tokens_mean']:.0f} | " + " | ".join(cells) + " |")
    f = run.get("real_flags")
    if f:
        def rate(k, over="replies"):
            return _fmt(f[k] / f[over] if f[over] else 0.0, 2)
        rows.append("| (real replies) | | - | 1 | 0 | 0.5 | " + " | ".join(
            [rate("empty"), rate("repeated"), rate("copied", "long"), rate("assistant")]) + " |")
    return "\n".join(rows)


def diff_table(a: dict, base_m: str, key: str | None) -> str:
    """Paired differences `method − base_m` per column: one speaker (`key`) or pooled over speakers (None)."""
    rows = [f"| method − {base_m} | " + " | ".join(label for _, label, _, _ in COLUMNS) + " |",
            "|---|" + "---:|" * len(COLUMNS)]
    for m in a["methods"]:
        if m == base_m:
            continue
        cells = []
        for col, _, better, d in COLUMNS:
            entry = a["diffs"].get((m, base_m, col))
            x = None if entry is None else (entry["pooled"] if key is None else entry["per"].get(key))
            text = _with_iv(x, d, True)
            v = verdict(x, better, d)
            if key is None and entry and entry["of"]:
                text += f" ({entry['wins']}↑ {entry['losses']}↓ of {entry['of']})"
            cells.append(f"**{text}**" if v > 0 else f"*{text}*" if v < 0 else text)
        if any(c.strip("*") != "-" for c in cells):
            rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def samples_table(run: dict, k: int = 3) -> str:
    """The first `k` prompts: last message, real reply and each method's first sample."""
    def cell(reply) -> str:
        text = " ⏎ ".join(m.replace("|", "/").replace("\n", " ") for m in reply) or "*(empty)*"
        return text if len(text) <= 150 else text[:150] + "…"

    idx = list(range(min(k, len(run["real"]))))
    rows = ["| | " + " | ".join(f"prompt {i}" for i in idx) + " |", "|---|" + "---|" * len(idx),
            "| last message | " + " | ".join(cell([run["last_messages"][i]]) for i in idx) + " |",
            "| **real** | " + " | ".join(cell(run["real"][i]) for i in idx) + " |"]
    for m in METHODS:
        if m in run["methods"]:
            units = run["methods"][m]["units"]
            rows.append(f"| {m} | " + " | ".join(cell(units[i]["replies"][0] if units[i]["replies"] else []) for i in idx) + " |")
    return "\n".join(rows)


def budget_text(b: dict) -> str:
    """An adapter's training budget in words."""
    return (f"at most {b['max_steps']} steps, validation every {b['eval_steps'] or 'max-steps/8'} steps, early "
            f"stopping after {b['patience']} validations without a better loss")


def run_budget(results: dict, run: dict) -> dict:
    """The training budget a speaker's adapter had: its run's (merged docs) or the results' own settings."""
    return run.get("budget") or {k: results["args"][k] for k in BUDGET_KEYS}


def budgets_line(results: dict, runs_of: list[dict]) -> list[str]:
    """How the runs merged into the doc relate: the same settings, or the same but the training budget."""
    if len(runs_of) < 2:
        return []
    budgets = [p.get("budget") or {k: results["args"][k] for k in BUDGET_KEYS} for p in runs_of]
    if all(b == budgets[0] for b in budgets):
        return ["Runs side by side (one torch thread each), each over its own speakers, with the same settings."]
    groups: dict[str, list[int]] = {}
    for i, b in enumerate(budgets, 1):
        groups.setdefault(budget_text(b), []).append(i)
    return ["Runs side by side (one torch thread each), each over its own speakers, with the same settings except "
            "the adapters' training budget: " + "; ".join(
                f"run{'s' if len(ix) > 1 else ''} {', '.join(map(str, ix))}: {text}" for text, ix in groups.items())
            + "."]


def write_doc(path: Path, results: dict, extra: list[str] | None = None) -> None:
    """docs/quality.md from the results alone: every figure and statement below is computed here. `extra`: lines
    appended at the end (bench/idiolect.py's planted-style sections)."""
    a = analyse(results)
    args = results["args"]
    runs_of = results.get("parts") or [{k: results.get(k) for k in ("command", "wall_s", "finished", "results_path")}]
    one_budget = len({budget_text(run_budget(results, r)) for r in results["runs"].values()}) <= 1
    rebuild = " ".join(f"--results {p.get('results_path') or 'runs/quality/results.json'}" for p in runs_of)
    parts = [
        "# Quality study: which method imitates a person best on generated text",
        "",
        "Written entirely by `bench/quality.py` from its results; rebuild it with "
        f"`python bench/quality.py --doc-only {rebuild}`.",
        "",
        "```bash", *(p["command"] for p in runs_of), "```", "",
        *(f"Wall time{f' of run {i + 1}' if len(runs_of) > 1 else ''}: {(p.get('wall_s') or 0) / 60:.1f} min on "
          f"{args['machine']} (summed over resumed runs; last results saved {p.get('finished', '?')})."
          for i, p in enumerate(runs_of)),
        *budgets_line(results, runs_of),
        "",
        f"- Base: `{results['base']}` ({results['base_note']}).",
        "- Generation: " + (results.get("decode_path") or "HF `generate` (`Engine.sample_batch`): these results "
                            "were recorded before the study generated through the worker's decode loop and have not "
                            "been rerun; the planted-style study below does use the decode loop") + ".",
        f"- Speakers: the demo pair (Jordan's replies to Sam, `examples/`) and the most active chitchat-dataset "
        "speakers; each speaker's conversations become one message log; `convo dataset --mode friend`, "
        f"{args['context']} messages of history per sample.",
        f"- Adapters: LoRA r={args['lora_r']} (alpha {2 * args['lora_r']}, {args.get('lora_targets', 'all-linear')}), lr {args['lr']}, batch "
        f"{args['batch_size']}, max length {args['max_length']} tokens, validation on {args['val_samples']} samples; "
        + (f"{budget_text(args)} (`convo train`'s min delta; the step cap is the stated budget)" if one_budget else
           "the training budget of each run above (`convo train`'s min delta for early stopping)")
        + "; the best checkpoint is the adapter. What stopped each one is in its section.",
        f"- Eval: {args['max_prompts']} validation prompts per speaker, {args['n']} sampled replies each "
        f"(at most {args['max_new_tokens']} new tokens), context budget {args['budget']} tokens for incontext and "
        f"retrieval (BM25), rerank K={args['rerank_k']}, seed {args['seed']}; bootstrap 95% intervals over prompts "
        f"({args['bootstrap']} resamples, the same resampled prompts for every method, so differences are paired).",
        "",
        "Columns: NLL/token of the real replies given each method's context; semantic: cosine between "
        "all-MiniLM-L6-v2 embeddings of generated and real reply; style (calibrated): style distance to the real "
        "replies beyond what another sample of the person's own replies scores (0 = as close as the person to "
        "themself); AUC of a char n-gram classifier telling real from generated (0.5 = indistinguishable); rates of "
        "empty replies, replies repeating a message or looping, 4+ word messages copied from training, and replies "
        "in an assistant's voice. `↑`/`↓`: the better direction.",
        "",
        "## Sizes and targets",
        "",
        *sizes_section(results, a),
        "",
        "## Findings (computed)",
        "",
        *(findings(results, a) if a["runs"] else ["- No speaker has results yet."]),
    ]
    if a["runs"]:
        parts += ["", "Rule: a method *beats* another on generated text when its paired difference, averaged over "
                  "speakers, is better with the 95% interval excluding 0 on at least one of semantic, style and AUC, "
                  "and worse with the interval excluding 0 on none of them nor on the empty, repeat and "
                  "assistant-voice rates, with both methods run on the same speakers. Several methods and columns "
                  "are compared at once, so a single interval that barely excludes 0 is weak evidence. The recommended default "
                  "is, among the methods run on every speaker that no other method beats, the one with the lowest "
                  "NLL/token of the real replies."]
        for base_m in BASELINES:
            if any(base_m in s for s in a["stats"].values()):
                parts += ["", f"## Paired differences vs {base_m}, mean over speakers", "",
                          "Each speaker's difference is resampled over its own prompts; (k↑ j↓ of s): speakers where "
                          "the method is better / worse with the interval excluding 0. **Bold**: better, *italic*: "
                          "worse, pooled interval excluding 0.", "", diff_table(a, base_m, None)]
    for key, run in a["runs"].items():
        ad, pref = run.get("adapter"), run.get("preference")
        curve = ", ".join(f"{v:.3f}@{s}" for s, v in (ad or {}).get("eval_curve", []))
        parts += ["", f"## {run['label']}", "",
                  f"{run['conversations']} conversations, {run['messages']} messages; dataset {run['counts'].get('train')} "
                  f"train / {run['counts'].get('val')} val samples."
                  + (f" Adapter ({budget_text(run_budget(results, run))}): {ad['steps']} steps in "
                     f"{ad['seconds']:.0f} s, stopped by {ad['stopped_by']}; best "
                     f"val loss {ad['best_eval_loss']} (val loss at steps: {curve or '-'})." if ad else "")
                  + (f" Preference step: {pref['summary']}." if pref else "")
                  + " Eval seconds per method: " + ", ".join(f"{m} {r['seconds']:.0f}" for m, r in run["methods"].items())
                  + ". Candidate step per method (raw samples drawn per prompt / share rejected as unusable / "
                  f"candidates scored by rerank per prompt; {args['n']} kept): "
                  + ", ".join(f"{m} {c['samples_per_prompt']:.1f}/{c['rejected']:.2f}/{c['scored_per_prompt']:.1f}"
                              for m, r in run["methods"].items() if (c := r.get("candidates")))
                  + ".", "", result_table(run, a["stats"][key])]
        for base_m in BASELINES:
            if base_m in a["stats"][key]:
                parts += ["", f"Paired differences vs {base_m} on this speaker:", "", diff_table(a, base_m, key)]
        parts += ["", "Sample replies (first sample of each method; ⏎ separates messages of one burst):", "",
                  samples_table(run)]
    parts += ["", "## The same measurements on your own data", "",
              "Every method above is `convo eval` on the speaker's dataset (see [evaluation.md](evaluation.md)); "
              "`adapter+preference` is the `adapter` method on the adapter `convo refine` writes:", "",
              "```bash", "convo eval --data data/alice --adapter adapters/alice --methods "
              "incontext,adapter,adapter+rerank,base,retrieval,adapter+retrieval",
              "convo refine --adapter adapters/alice --data data/alice --out adapters/alice-refined",
              "convo eval --data data/alice --adapter adapters/alice-refined --methods adapter", "```"]
    parts += extra or []
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(parts) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="list candidate speakers and exit")
    p.add_argument("--doc-only", action="store_true", help="rebuild --doc from the results file and exit")
    p.add_argument("--results", type=Path, action="append",
                   help="results file (default WORK/results.json); --doc-only takes several (runs side by side)")
    p.add_argument("--planted", type=Path, action="append", default=[],
                   help="bench/idiolect.py results (one per base) whose sections --doc-only appends")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming the results file")
    p.add_argument("--speakers", help="comma-separated chitchat sender ids (default: --top picks)")
    p.add_argument("--top", type=int, default=3, help="chitchat speakers picked when --speakers is not given")
    p.add_argument("--no-demo", dest="demo", action="store_false", help="leave out the demo pair (Jordan to Sam)")
    p.add_argument("--max-messages", type=int, default=1_000_000, help="pick only speakers with at most this many messages")
    p.add_argument("--max-conversations", type=int, help="use only each speaker's first N conversations (quick runs)")
    p.add_argument("--base", required=False, help="base model dir (e.g. models/smollm2-135m)")
    p.add_argument("--base-note", default="", help="what the base is, written into the doc")
    p.add_argument("--max-steps", type=int, default=200, help="adapter step cap: the budget when early stopping does not end it")
    p.add_argument("--eval-steps", type=int, default=0, help="validate every N steps (0: about 8 times per run)")
    p.add_argument("--patience", type=int, default=3, help="validations without a better loss before stopping")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=96, help="max tokens per training sample")
    p.add_argument("--val-samples", type=int, default=64, help="validation samples scored at each evaluation")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-targets", default="all-linear", help="LoRA target modules (`convo train --lora-targets`)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--pref-pairs", type=int, default=64, help="preference pairs (training prompts) at most")
    p.add_argument("--pref-steps", type=int, default=32, help="preference (DPO) optimizer steps")
    p.add_argument("--context", type=int, default=6, help="messages of history per sample")
    p.add_argument("--budget", type=int, default=128, help="context token budget of incontext and retrieval")
    p.add_argument("--max-prompts", type=int, default=40)
    p.add_argument("--n", type=int, default=2, help="sampled replies per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--rerank-k", type=int, default=6, help="samples the rerank draws per prompt before keeping n")
    p.add_argument("--gen-batch", type=int, default=8, help="prompts per generate call (n rows each)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy shared machine)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "quality", help="where models, data and results go")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "quality.md")
    p.add_argument("--machine", default="2 CPU cores shared with other jobs, no GPU", help="written into the doc")
    return p.parse_args(argv)


DECODE_PATH = "the worker's decode loop and candidate step (inference.engine.Engine over DecodeBackend)"


def load_results(path: Path, args, command: str) -> dict:
    """The results to resume (same settings) or a fresh record."""
    fresh = {"command": command, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
             "base": args.base, "base_note": args.base_note or "given with --base", "runs": {}, "wall_s": 0.0,
             "decode_path": DECODE_PATH}
    if args.fresh or not path.is_file():
        return fresh
    old = json.loads(path.read_text(encoding="utf-8"))
    changed = [k for k in RESUME_KEYS if old["args"].get(k) != fresh["args"].get(k)]
    if changed:
        raise SystemExit(f"{path}: made with other settings ({', '.join(changed)}); rerun with them, --fresh, or another --work")
    old["command"] = command
    old["args"].update({k: fresh["args"][k] for k in ("top", "speakers", "demo", "bootstrap", "machine")})
    return old


def merge_results(paths: list[Path]) -> dict:
    """One results record from runs made side by side with the same settings, each over its own speakers."""
    merged = None
    for path in paths:
        res = json.loads(Path(path).read_text(encoding="utf-8"))
        part = {"command": res["command"], "wall_s": res.get("wall_s", 0.0), "finished": res.get("finished"),
                "results_path": str(path), "budget": {k: res["args"].get(k) for k in BUDGET_KEYS}}
        runs = {k: {**r, "budget": part["budget"]} for k, r in res["runs"].items()}
        if merged is None:
            merged = {**res, "runs": runs, "parts": [part]}
            continue
        changed = [k for k in RESUME_KEYS if k not in BUDGET_KEYS and merged["args"].get(k) != res["args"].get(k)]
        if changed:
            raise SystemExit(f"{path}: other settings than {paths[0]} ({', '.join(changed)}); the doc needs one set")
        for k, r in runs.items():  # a speaker two runs started: the one with more methods done
            if len(r.get("methods", {})) > len(merged["runs"].get(k, {}).get("methods", {})):
                merged["runs"][k] = r
        merged["not_run"] = {**res.get("not_run", {}), **merged.get("not_run", {})}
        merged["parts"].append(part)
    return merged


def results_saver(results: dict, results_path: Path, after=None):
    """A `save()` that adds the wall time since the last save, writes the results file atomically (temp file,
    then rename) and then calls `after` (e.g. rewrite the doc): a run killed mid-way keeps what it finished."""
    last = [time.monotonic()]

    def save() -> None:
        now = time.monotonic()
        results["wall_s"] = results.get("wall_s", 0.0) + now - last[0]
        last[0] = now
        results["finished"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        results_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, results_path)
        if after is not None:
            after()

    return save


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the study, or rebuild the doc (see the module docstring)."""
    args = parse_args(argv)
    work = Path(args.work)
    results_path = Path(args.results[0] if args.results else work / "results.json")
    if args.doc_only:
        if args.planted:  # the planted-style study's doc: this one with its sections appended
            import idiolect

            idiolect.write_doc(args.doc, args.results or [results_path], args.planted)
        else:
            write_doc(args.doc, merge_results(args.results or [results_path]))
        print(f"wrote {args.doc}")
        return 0
    data = chitchat()
    if args.list:
        print(f"{'speaker':38} conversations messages")
        for c in candidates(data):
            print(f"{c['speaker']:38} {c['conversations']:13} {c['messages']:8}")
        return 0
    if not args.base:
        print("--base DIR is needed (e.g. models/smollm2-135m from `convo base smollm2`)", file=sys.stderr)
        return 2

    from rich.console import Console

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    console = Console()
    speakers = study_speakers(data, args)
    known = {c["speaker"] for c in candidates(data, 1)}
    unknown = [s.persona_id for s in speakers if s.persona_id not in known]
    if unknown or not speakers:
        print(f"unknown or no speakers: {unknown}; see --list", file=sys.stderr)
        return 2
    command = "python bench/quality.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    results = load_results(results_path, args, command.strip())
    results["not_run"] = method_availability()
    results["results_path"] = str(results_path)
    save = results_saver(results, results_path, lambda: write_doc(args.doc, results))

    from training.evaluate.retrieval import Embedder

    embedder = Embedder()
    for sp in speakers:
        run_speaker(sp, data, args, work, results, save, embedder, console)
        console.print(f"{sp.label} done ({results['wall_s'] / 60:.1f} min so far); wrote {args.doc}")
    return 0


def run_speaker(sp: Speaker, data, args, work: Path, results: dict, save, embedder, console) -> None:
    """Data, adapter, preference step and every method for one speaker, skipping what the results already hold."""
    from training.dataset import build_dataset
    from training.evaluate import metrics as M
    from training.evaluate.data import read_samples, sessions

    d = work / sp.key
    run = results["runs"].setdefault(sp.key, {"key": sp.key, "label": sp.label, "speaker": sp.persona_id, "methods": {}})
    if "counts" not in run or not (d / "data" / "meta.json").is_file():
        convs, n_msgs = write_messages(data, sp, d / "messages.jsonl", args.max_conversations)
        summary = build_dataset(d / "messages.jsonl", "persona", d / "data", me="partner", mode="friend",
                                context_messages=args.context)
        run.update(conversations=convs, messages=n_msgs, counts=summary.counts)
        console.print(f"{sp.label}: {n_msgs} messages -> {summary.counts}")
        save()
    if "adapter" not in run or not (d / "adapter" / "adapter_config.json").is_file():
        run["adapter"] = train_adapter(d / "data", args.base, d / "adapter", args, console)
        save()
    todo = [m for m in METHODS if m not in run["methods"] and m not in results["not_run"]]
    train = read_samples(d / "data" / "train.jsonl")
    training_messages = M.normalise_messages([t.text for sess in sessions(train) for t in sess])

    def record(method: str, engine, adapter: Path) -> None:
        rec, comps, metrics = eval_method(method, engine, d / "data", adapter, d / "eval" / method.replace("+", "-"),
                                          args, embedder, training_messages, None)
        real = [c["real"] for c in comps]
        if "real" not in run:
            run.update(real=real, last_messages=[_last_message(c["prompt"]) for c in comps],
                       style_reference=metrics["real"]["style_reference"],
                       real_flags=_sum_flags([reply_flags([r], training_messages) for r in real]))
        elif run["real"] != real:
            raise SystemExit(f"{sp.label}: {method} was scored on other prompts than the methods before it")
        run["methods"][method] = rec
        console.print(f"{sp.label}: {method} done in {rec['seconds']:.0f} s")
        save()

    from inference.engine import Engine

    engine = None  # the SFT adapter's, loaded once for every method but the preference one
    for m in todo:
        if m != PREFERENCE:
            engine = engine or Engine.load(base=args.base, adapter=d / "adapter")
            record(m, engine, d / "adapter")
            continue
        if "preference" not in run or not (d / "adapter-preference" / "adapter_config.json").is_file():
            run["preference"] = train_preference(d, args, console)
            save()
        record(PREFERENCE, Engine.load(base=args.base, adapter=d / "adapter-preference"), d / "adapter-preference")
    run["done"] = all(m in run["methods"] or m in results["not_run"] for m in METHODS)
    save()


def _last_message(prompt: str) -> str:
    lines = prompt.rstrip().split("\n")
    return lines[-2] if len(lines) > 1 else "(start of the conversation)"


def _sum_flags(flags: list[dict]) -> dict:
    return {k: sum(f[k] for f in flags) for k in flags[0]} if flags else {}


def train_preference(d: Path, args, console) -> dict:
    """The preference step on top of the SFT adapter: DPO on (real reply, the adapter's own sample) pairs."""
    from config.settings import RefineSettings
    from training.prefer import RefineOptions, refine

    t0 = time.monotonic()
    res = refine(d / "adapter", d / "data", d / "adapter-preference", RefineOptions.from_settings(
        RefineSettings(), base=args.base, max_pairs=args.pref_pairs, max_steps=args.pref_steps, seed=args.seed,
        max_length=args.max_length, max_new_tokens=args.max_new_tokens, force=True), console=console)
    seconds = round(time.monotonic() - t0, 1)
    return {"pairs": res.pairs, "steps": res.steps, "seconds": seconds, "accuracy_after": _r(res.accuracy_after),
            "margin_after": _r(res.margin_after),
            "summary": f"DPO on {res.pairs} (real reply, the adapter's own sample) pairs, {res.steps} steps in "
                       f"{seconds:.0f} s; afterwards the implicit reward prefers the real reply on "
                       f"{res.accuracy_after:.0%} of the pairs (margin {res.margin_after:+.3f})"}


if __name__ == "__main__":
    sys.exit(main())
