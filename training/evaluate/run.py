"""`convo eval` from top to bottom: data -> contexts -> likelihood and samples per method -> metrics -> files.

Every method sees the same validation samples (the persona's turns of val.jsonl, at most `max_prompts`, chosen
with `seed`), the same prompt (trimmed once, for all methods, to fit the model), the same sampling settings and
per-prompt seeds, and the context-adding methods the same token budget.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from convo.errors import EvalError
from training.evaluate import metrics as M
from training.evaluate.contexts import (
    EMPTY,
    Context,
    fit_prompt,
    incontext_context,
    retrieval_context,
    token_counter,
)
from training.evaluate.data import Sample, exchanges, load_meta, read_samples, sessions

METHODS = ("base", "incontext", "retrieval", "adapter", "adapter+retrieval", "api")
ADAPTER_METHODS = frozenset({"adapter", "adapter+retrieval"})
TEXT_ONLY_METHODS = frozenset({"api"})
CONTEXT_OF = {
    "base": None,
    "incontext": "incontext",
    "retrieval": "retrieval",
    "adapter": None,
    "adapter+retrieval": "retrieval",
    "api": "incontext",
}


def parse_methods(text: str) -> tuple[str, ...]:
    """`base,adapter` -> ("base", "adapter"); unknown names are an EvalError listing the known ones."""
    names = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise EvalError(f"--methods: unknown method {', '.join(bad) or '(none)'}; choose from {','.join(METHODS)}")
    return names


@dataclass(frozen=True)
class EvalConfig:
    """Everything one evaluation run depends on (written into metrics.json)."""

    data_dir: Path
    out_dir: Path
    adapter_dir: Path | None = None
    base: str | None = None
    methods: tuple[str, ...] = ("base", "incontext", "retrieval", "adapter", "adapter+retrieval")
    context_budget_tokens: int = 256
    samples_per_prompt: int = 2
    max_prompts: int = 100
    seed: int = 0
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 64
    batch_size: int = 4
    api_base: str | None = None
    api_model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    report_path: Path | None = None
    max_total_tokens: int | None = None  # context + prompt + reply; default: the model's max positions

    def report(self) -> Path:
        """Where the HTML report goes."""
        return self.report_path or self.out_dir / "report.html"


@dataclass
class EvalResult:
    """metrics.json's content, the side-by-side comparisons, and the files written."""

    metrics: dict
    comparisons: list[dict]
    paths: dict[str, Path] = field(default_factory=dict)


def check_config(cfg: EvalConfig) -> None:
    """Fail early, with the option to fix, on combinations that cannot run."""
    if cfg.adapter_dir is None and any(m in ADAPTER_METHODS for m in cfg.methods):
        raise EvalError("methods adapter and adapter+retrieval need --adapter DIR (or drop them with --methods)")
    if cfg.adapter_dir is None and cfg.base is None:
        raise EvalError("give --adapter DIR (its base is used) or --base MODEL")
    if cfg.adapter_dir is not None and not Path(cfg.adapter_dir).is_dir():
        raise EvalError(f"--adapter {cfg.adapter_dir}: not a directory (train one with `convo train`)")
    if "api" in cfg.methods and not (cfg.api_base and cfg.api_model):
        raise EvalError("method api needs --api-base URL and --api-model NAME (or eval.api_base/api_model settings)")
    if cfg.context_budget_tokens < 0 or cfg.samples_per_prompt < 1 or cfg.max_prompts < 1:
        raise EvalError("--context-budget must be >= 0, --n and --max-prompts >= 1")


def choose_samples(val: list[Sample], tag: str, max_prompts: int, seed: int) -> list[Sample]:
    """The persona's turns of the validation split, at most `max_prompts`, in file order."""
    mine = [s for s in val if s.target == tag]
    if len(mine) > max_prompts:
        keep = sorted(random.Random(seed).sample(range(len(mine)), max_prompts))
        mine = [mine[i] for i in keep]
    return mine


def _model_max_tokens(engine) -> int:
    cfg = getattr(engine.model, "config", None)
    n = getattr(cfg, "max_position_embeddings", None) or getattr(engine.tokenizer, "model_max_length", None)
    return int(n) if n and n < 1_000_000 else 2048


@contextlib.contextmanager
def _adapter_state(engine, method: str, has_adapter: bool) -> Iterator[None]:
    if has_adapter and method not in ADAPTER_METHODS:
        with engine.adapter_disabled():
            yield
    else:
        yield


def run_eval(cfg: EvalConfig, engine=None, progress=None) -> EvalResult:
    """Evaluate every method of `cfg` and write metrics.json, generations.jsonl and the HTML report.

    `engine` (an inference.engine.Engine) is loaded from cfg when None; `progress` is an optional
    rich.progress.Progress to report on.
    """
    check_config(cfg)
    meta = load_meta(cfg.data_dir)
    tag = meta["persona"]["tag"]
    train = read_samples(Path(cfg.data_dir) / "train.jsonl")
    val = read_samples(Path(cfg.data_dir) / "val.jsonl")
    chosen = choose_samples(val, tag, cfg.max_prompts, cfg.seed)
    if not chosen:
        raise EvalError(f"{cfg.data_dir}/val.jsonl: no sample has the persona [{tag}] as target; "
                        "rebuild the dataset with --mode friend or both")
    if engine is None:
        from inference.engine import Engine

        engine = Engine.load(base=cfg.base, adapter=cfg.adapter_dir)
    has_adapter = cfg.adapter_dir is not None

    count = token_counter(engine.tokenizer)
    train_sessions = sessions(train)
    from training.evaluate.retrieval import ExchangeIndex

    index = ExchangeIndex(exchanges(train, tag))
    max_tokens = cfg.max_total_tokens or _model_max_tokens(engine)

    # One prompt per sample, trimmed once for all methods so the longest context still fits the model.
    prompts = []
    for s in chosen:
        room = max_tokens - cfg.context_budget_tokens - max(cfg.max_new_tokens, count(s.completion)) - 2
        prompts.append(fit_prompt(s.prompt, count, max(room, 1)))

    incontext = incontext_context(train_sessions, tag, count, cfg.context_budget_tokens, cfg.seed)
    contexts: dict[str, list[Context]] = {"incontext": [incontext] * len(chosen)}
    if any(CONTEXT_OF[m] == "retrieval" for m in cfg.methods):
        contexts["retrieval"] = [
            retrieval_context(index, s.history(), count, cfg.context_budget_tokens) for s in chosen
        ]

    client = None
    if "api" in cfg.methods:
        from training.evaluate.api import ApiClient

        client = ApiClient(cfg.api_base, cfg.api_model, os.environ.get(cfg.api_key_env) or None)

    real = [s.reply() for s in chosen]
    training_messages = M.normalise_messages([t.text for sess in train_sessions for t in sess])
    results: dict[str, dict] = {}
    replies: dict[str, list[list[list[str]]]] = {}

    task = None
    if progress is not None:
        steps = sum(len(chosen) * (1 if m in TEXT_ONLY_METHODS else 2) for m in cfg.methods)
        task = progress.add_task("evaluating", total=steps)

    def advance(desc: str, n: int = 1) -> None:
        if progress is not None:
            progress.update(task, advance=n, description=desc)

    for method in cfg.methods:
        t0 = time.perf_counter()
        kind = CONTEXT_OF[method]
        ctxs = contexts[kind] if kind else [EMPTY] * len(chosen)
        res: dict = {
            "context": kind or "none",
            "context_tokens_mean": sum(c.tokens for c in ctxs) / len(ctxs),
            "context_tokens_max": max(c.tokens for c in ctxs),
        }
        with _adapter_state(engine, method, has_adapter):
            if method not in TEXT_ONLY_METHODS:
                pairs = []
                for start in range(0, len(chosen), cfg.batch_size):
                    batch = [
                        (ctxs[i].text + prompts[i], chosen[i].completion)
                        for i in range(start, min(start + cfg.batch_size, len(chosen)))
                    ]
                    pairs += engine.completion_nll(batch, batch_size=cfg.batch_size)
                    advance(f"{method}: likelihood", len(batch))
                res.update(M.nll_summary(pairs))
            else:
                res.update({"nll_per_token": None, "perplexity": None, "tokens": 0})
            cands: list[list[list[str]]] = []
            for i in range(len(chosen)):
                kwargs = dict(
                    n=cfg.samples_per_prompt, temperature=cfg.temperature, top_p=cfg.top_p,
                    max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 1000 * i,
                )
                if method == "api":
                    from training.evaluate import api

                    out = api.generate(client, ctxs[i].text, prompts[i], tag, **kwargs)
                else:
                    out = engine.generate(ctxs[i].text + prompts[i], tag, **kwargs)
                cands.append([list(c) for c in out])
                advance(f"{method}: sampling")
        replies[method] = cands
        gen = [c for per in cands for c in per]
        gen_groups = [i for i, per in enumerate(cands) for _ in per]
        res["style"] = M.style_distance(real, gen)
        res["style_summary"] = M.summary(gen)
        res["auc"] = M.distinguishability_auc(real, gen, list(range(len(real))), gen_groups, seed=cfg.seed)
        res["degeneration"] = M.degeneration(gen, training_messages)
        res["seconds"] = round(time.perf_counter() - t0, 2)
        results[method] = res

    comparisons = [
        {
            "index": i,
            "chat": s.chat,
            "session": s.session,
            "prompt": prompts[i],
            "real": real[i],
            "replies": {m: replies[m][i] for m in cfg.methods},
        }
        for i, s in enumerate(chosen)
    ]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    config["methods"] = list(cfg.methods)
    metrics = {
        "persona": meta["persona"],
        "config": config,
        "prompts": len(chosen),
        "model_max_tokens": max_tokens,
        "real": {
            "style_summary": M.summary(real),
            "degeneration": M.degeneration(real, training_messages),
        },
        "methods": results,
    }
    result = EvalResult(metrics, comparisons)
    write_outputs(cfg, result)
    return result


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_outputs(cfg: EvalConfig, result: EvalResult) -> None:
    """metrics.json, generations.jsonl and the report, each written to a temp file then renamed."""
    from training.evaluate.report import render_report

    out = Path(cfg.out_dir)
    paths = {
        "metrics": out / "metrics.json",
        "generations": out / "generations.jsonl",
        "report": Path(cfg.report()),
    }
    _atomic_write(paths["metrics"], json.dumps(result.metrics, indent=2, ensure_ascii=False) + "\n")
    _atomic_write(
        paths["generations"], "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in result.comparisons)
    )
    log = Path(cfg.adapter_dir) / "train_log.jsonl" if cfg.adapter_dir else None
    _atomic_write(paths["report"], render_report(result.metrics, result.comparisons, log))
    result.paths = paths


def metrics_table(metrics: dict):
    """A rich Table of the headline figures per method: lower is better, except AUC (best at 0.5).

    ctx: mean context tokens; NLL/tok: of the real replies (perplexity is in metrics.json); style: combined
    style distance; empty/rep: share of empty/self-repeating replies; copy: share of 4+ word messages copied
    from training.
    """
    from rich import box
    from rich.table import Table

    def f(x, digits=3):
        return "-" if x is None else f"{x:.{digits}f}"

    table = Table(
        title=f"convo eval: [{metrics['persona']['tag']}], {metrics['prompts']} prompts",
        box=box.SIMPLE_HEAD, collapse_padding=True,
    )
    table.add_column("method", no_wrap=True)
    for col in ("ctx", "NLL/tok", "style", "AUC", "empty", "rep", "copy"):
        table.add_column(col, justify="right", no_wrap=True)
    for name, r in metrics["methods"].items():
        d = r["degeneration"]
        table.add_row(
            name, f"{r['context_tokens_mean']:.0f}", f(r["nll_per_token"]), f(r["style"]["combined"]), f(r["auc"]), f(d["empty"], 2), f(d["repeated"], 2), f(d["copied"], 2),
        )
    rd = metrics["real"]["degeneration"]
    table.add_row("(real)", "", "", "0.000", "0.5", f(rd["empty"], 2), f(rd["repeated"], 2), f(rd["copied"], 2),
                  style="dim")
    return table
