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

from config.settings import EvalSettings, GenerateSettings
from errors import EvalError
from training.evaluate import attribution as A
from training.evaluate import markers as K
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

METHODS = (
    "base", "incontext", "retrieval", "retrieval-bm25", "retrieval-dense",
    "adapter", "adapter+retrieval", "adapter+retrieval-bm25", "adapter+retrieval-dense", "adapter+rerank", "api",
)
ADAPTER_METHODS = frozenset({"adapter", "adapter+retrieval", "adapter+retrieval-bm25", "adapter+retrieval-dense",
                             "adapter+rerank"})
RERANK_METHODS = frozenset({"adapter+rerank"})  # sample generate.rerank_k, keep the n the adapter prefers
TEXT_ONLY_METHODS = frozenset({"api"})
# Which context each method puts before the prompt; "retrieval" means the configured retriever (cfg.retriever).
CONTEXT_OF = {
    "base": None,
    "incontext": "incontext",
    "retrieval": "retrieval",
    "retrieval-bm25": "retrieval-bm25",
    "retrieval-dense": "retrieval-dense",
    "adapter": None,
    "adapter+retrieval": "retrieval",
    "adapter+retrieval-bm25": "retrieval-bm25",
    "adapter+retrieval-dense": "retrieval-dense",
    "adapter+rerank": None,
    "api": "incontext",
}


def parse_methods(text: str) -> tuple[str, ...]:
    """`base,adapter` -> ("base", "adapter"); unknown names are an EvalError listing the known ones."""
    names = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise EvalError(f"--methods: unknown method {', '.join(bad) or '(none)'}; choose from {','.join(METHODS)}")
    return names


_E, _G = EvalSettings(), GenerateSettings()  # the defaults, defined once in config.settings


@dataclass(frozen=True)
class EvalConfig:
    """Everything one evaluation run depends on (written into metrics.json); defaults from config.settings."""

    data_dir: Path
    out_dir: Path
    adapter_dir: Path | None = None
    base: str | None = None
    methods: tuple[str, ...] = parse_methods(_E.methods)
    context_budget_tokens: int = _E.context_budget_tokens
    samples_per_prompt: int = _E.samples_per_prompt
    max_prompts: int = _E.max_prompts
    seed: int = _E.seed
    temperature: float = _G.temperature
    top_p: float = _G.top_p
    max_new_tokens: int = _G.max_new_tokens
    rerank_k: int = _G.rerank_k
    max_resample_rounds: int = _G.max_resample_rounds
    resample_temperature: float = _G.resample_temperature
    repetition_penalty: float = _G.repetition_penalty
    no_repeat_ngram_size: int = _G.no_repeat_ngram_size
    batch_size: int = _E.batch_size
    retriever: str = _E.retriever
    embedding_model: str | None = _E.embedding_model
    bootstrap_resamples: int = _E.bootstrap_resamples
    api_base: str | None = _E.api_base
    api_model: str | None = _E.api_model
    api_key_env: str = _E.api_key_env
    report_path: Path | None = None
    max_total_tokens: int | None = None  # context + prompt + reply; default: the model's max positions
    attribution_log: Path | None = None  # the log whose other speakers are attribution candidates; default: meta source

    @classmethod
    def from_settings(cls, settings, data_dir: Path, out_dir: Path, **overrides) -> EvalConfig:
        """A config from `settings.eval` and `settings.generate`, with the given non-None overrides on top."""
        e, g = settings.eval, settings.generate
        values = {
            "methods": parse_methods(e.methods), "context_budget_tokens": e.context_budget_tokens,
            "samples_per_prompt": e.samples_per_prompt, "max_prompts": e.max_prompts, "seed": e.seed,
            "temperature": g.temperature, "top_p": g.top_p, "max_new_tokens": g.max_new_tokens,
            "rerank_k": g.rerank_k, "max_resample_rounds": g.max_resample_rounds,
            "resample_temperature": g.resample_temperature, "repetition_penalty": g.repetition_penalty,
            "no_repeat_ngram_size": g.no_repeat_ngram_size,
            "batch_size": e.batch_size, "retriever": e.retriever, "embedding_model": e.embedding_model,
            "bootstrap_resamples": e.bootstrap_resamples, "api_base": e.api_base, "api_model": e.api_model,
            "api_key_env": e.api_key_env,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(data_dir=data_dir, out_dir=out_dir, **values)

    def report(self) -> Path:
        """Where the HTML report goes."""
        return self.report_path or self.out_dir / "report.html"

    def context_kind(self, method: str) -> str | None:
        """The context `method` uses, with plain "retrieval" resolved to the configured retriever."""
        kind = CONTEXT_OF[method]
        return f"retrieval-{self.retriever}" if kind == "retrieval" else kind


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
    if cfg.rerank_k <= 0 and any(m in RERANK_METHODS for m in cfg.methods):
        raise EvalError("method adapter+rerank needs --rerank-k K > 0 (or generate.rerank_k)")
    if cfg.retriever not in ("bm25", "dense"):
        raise EvalError(f"retriever {cfg.retriever!r}: choose bm25 or dense (--retriever, eval.retriever)")
    if cfg.attribution_log is not None and not Path(cfg.attribution_log).is_file():
        raise EvalError(f"--attribution-log {cfg.attribution_log}: no such file (a messages.jsonl from convo ingest)")
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
    max_tokens = cfg.max_total_tokens or _model_max_tokens(engine)

    # One prompt per sample, trimmed once for all methods so the longest context still fits the model.
    prompts = []
    for s in chosen:
        room = max_tokens - cfg.context_budget_tokens - max(cfg.max_new_tokens, count(s.completion)) - 2
        prompts.append(fit_prompt(s.prompt, count, max(room, 1)))

    from training.evaluate.retrieval import Embedder, build_index

    embedder = Embedder(cfg.embedding_model)
    incontext = incontext_context(train_sessions, tag, count, cfg.context_budget_tokens, cfg.seed)
    contexts: dict[str, list[Context]] = {"incontext": [incontext] * len(chosen)}
    items = exchanges(train, tag)
    for kind in sorted({cfg.context_kind(m) for m in cfg.methods} - {None, "incontext"}):
        index = build_index(kind.removeprefix("retrieval-"), items, embedder)
        contexts[kind] = [retrieval_context(index, s.history(), count, cfg.context_budget_tokens) for s in chosen]

    client = None
    if "api" in cfg.methods:
        from training.evaluate.api import ApiClient

        client = ApiClient(cfg.api_base, cfg.api_model, os.environ.get(cfg.api_key_env) or None)

    real = [s.reply() for s in chosen]
    # The person's own other replies: the style distance a perfect imitation would still get (see metrics.py).
    own = [s.reply() for s in train if s.target == tag and s.reply()]
    style_ref = M.style_reference(real, own, len(chosen) * cfg.samples_per_prompt, seed=cfg.seed)
    marker_ref = K.marker_reference(real, own, len(chosen) * cfg.samples_per_prompt, seed=cfg.seed)
    real_markers = K.marker_rates(real)
    attributor, attribution = attribution_setup(cfg, meta, own, real)
    training_messages = M.normalise_messages([t.text for sess in train_sessions for t in sess])
    results: dict[str, dict] = {}
    replies: dict[str, list[list[list[str]]]] = {}
    nll_pairs: dict[str, list[tuple[float, int]]] = {}
    attribution_hits: dict[str, list[list[int]]] = {}

    task = None
    if progress is not None:
        steps = sum(len(chosen) * (1 if m in TEXT_ONLY_METHODS else 2) for m in cfg.methods)
        task = progress.add_task("evaluating", total=steps)

    def advance(desc: str, n: int = 1) -> None:
        if progress is not None:
            progress.update(task, advance=n, description=desc)

    for method in cfg.methods:
        t0 = time.perf_counter()
        kind = cfg.context_kind(method)
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
                nll_pairs[method] = pairs
            else:
                res.update({"nll_per_token": None, "perplexity": None, "tokens": 0})
            drawn = CandidateCounts()
            if method == "api":
                from training.evaluate import api

                cands = []
                for i in range(len(chosen)):
                    out = api.generate(client, ctxs[i].text, prompts[i], tag, n=cfg.samples_per_prompt,
                                       temperature=cfg.temperature, top_p=cfg.top_p,
                                       max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 1000 * i)
                    cands.append([list(c) for c in out])
                    advance(f"{method}: sampling")
            else:  # through the candidate step the worker and simulate use (inference.candidates)
                cands = sample_batched(engine, [ctxs[i].text + prompts[i] for i in range(len(chosen))], tag, cfg,
                                       method, drawn, lambda k, method=method: advance(f"{method}: sampling", k))
        replies[method] = cands
        res.update(score_replies(real, cands, training_messages, embedder, cfg.seed))
        res["markers"] = K.marker_rates(r for per in cands for r in per)  # marker_error: below, over one set
        if attributor is not None:
            attribution_hits[method] = A.per_prompt_hits(attributor, cands)
            res["attribution"] = A.accuracy(attribution_hits[method])
        if method not in TEXT_ONLY_METHODS:
            res["candidates"] = drawn.summary()
        res["style_calibrated"] = M.calibrated_style(res["style"], style_ref)
        res["intervals"] = intervals(real, cands, nll_pairs.get(method), training_messages, embedder, cfg, style_ref)
        res["seconds"] = round(time.perf_counter() - t0, 2)
        results[method] = res

    # Marker errors over one set of markers for every method, so they compare like with like.
    marker_set = K.common_markers(real_markers, [r["markers"] for r in results.values()])
    for method, res in results.items():
        res["marker_error"] = K.marker_error(real_markers, res["markers"], marker_set)
        res["intervals"].update(marker_intervals(real, replies[method], attribution_hits.get(method), cfg,
                                                 marker_set))
    comparisons = [
        {
            "index": i,
            "chat": s.chat,
            "session": s.session,
            "prompt": prompts[i],
            "real": real[i],
            "replies": {m: replies[m][i] for m in cfg.methods},
            "nll": {m: list(nll_pairs[m][i]) for m in cfg.methods if m in nll_pairs},  # (nll sum, tokens)
            # [persona hits, replies] per method and for the real reply ("(real)"); absent when skipped
            "attribution": ({m: attribution_hits[m][i] for m in cfg.methods} | {"(real)": attribution["hits"][i]}
                            if attributor is not None else None),
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
            "style_reference": style_ref,
            "markers": real_markers,
            "marker_reference": marker_ref,
            "marker_set": marker_set,  # the markers every method's marker error is computed over
        },
        "attribution": {k: v for k, v in attribution.items() if k != "hits"},
        "methods": results,
    }
    result = EvalResult(metrics, comparisons)
    write_outputs(cfg, result)
    return result


def attribution_setup(cfg: EvalConfig, meta: dict, own: list, real: list) -> tuple[A.Attributor | None, dict]:
    """The attributor (None when skipped) and metrics.json's `attribution` object: candidates, chance, the real
    held-out replies' accuracy (the ceiling) and its interval, or `skipped` with the one-line reason."""
    log = cfg.attribution_log or meta.get("source")
    persona = meta["persona"]
    got = A.build_attributor(Path(log) if log else None, persona.get("speaker_id") or persona["tag"],
                             persona.get("name") or persona["tag"], own, seed=cfg.seed,
                             person_of=meta.get("tags") or None)
    if isinstance(got, str):
        return None, {"skipped": got, "log": None if log is None else str(log)}
    hits = A.per_prompt_hits(got, [[r] for r in real])
    iv = M.bootstrap_interval(len(real), lambda idx: A.accuracy(hits, idx), cfg.bootstrap_resamples, cfg.seed)
    return got, {
        "skipped": None, "log": str(log), "candidates": got.candidates, "training_replies": got.training_replies,
        "chance": got.chance, "real": A.accuracy(hits), "real_interval": None if iv is None else list(iv),
        "hits": hits,
    }


def marker_intervals(real: list, cands: list[list[list[str]]], hits: list[list[int]] | None,
                     cfg: EvalConfig, only: list[str] | None = None) -> dict[str, list[float] | None]:
    """Bootstrap 95% intervals over prompts of the marker error and, when measured, the attribution."""
    n, b, seed = len(real), cfg.bootstrap_resamples, cfg.seed
    if b <= 0 or n < 2:
        return {}
    real_counts = [K.marker_counts([r]) for r in real]
    gen_counts = [K.marker_counts(per) for per in cands]

    def err(idx):
        return K.marker_error(K.rates_from_counts(K.add_counts(real_counts[i] for i in idx)),
                              K.rates_from_counts(K.add_counts(gen_counts[i] for i in idx)), only)

    def ci(fn) -> list[float] | None:
        r = M.bootstrap_interval(n, fn, b, seed)
        return None if r is None else [round(r[0], 6), round(r[1], 6)]

    out = {"marker_error": ci(err)}
    if hits is not None:
        out["attribution"] = ci(lambda idx: A.accuracy(hits, idx))
    return out


def candidate_options(cfg: EvalConfig, method: str, batch: int):
    """The candidate step's options for batch `batch` of `method`: eval's sampling, its own seed, rerank or not."""
    from inference.engine import SimulateOptions

    return SimulateOptions(
        n=cfg.samples_per_prompt, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed + 1000 * batch, rerank_k=cfg.rerank_k if method in RERANK_METHODS else 0,
        max_resample_rounds=cfg.max_resample_rounds, resample_temperature=cfg.resample_temperature,
        repetition_penalty=cfg.repetition_penalty, no_repeat_ngram_size=cfg.no_repeat_ngram_size,
    )


def sample_batched(engine, texts: list[str], tag: str, cfg: EvalConfig, method: str, drawn: CandidateCounts,
                   done=None) -> list[list[list[str]]]:
    """`cfg.samples_per_prompt` candidates per text through the candidate step (clean, distinct, re-sampled,
    reranked for the rerank methods), counted into `drawn`.

    Texts of similar length share one left-padded `generate` call (`cfg.batch_size` texts, n or K rows each),
    far cheaper than one call per prompt on a CPU; `done(count)` is called after each batch.
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    cands: list[list[list[str]]] = [[] for _ in texts]
    for k, start in enumerate(range(0, len(order), cfg.batch_size)):
        idx = order[start : start + cfg.batch_size]
        outcomes = engine.sample_batch([texts[i] for i in idx], tag, candidate_options(cfg, method, k))
        for i, outcome in zip(idx, outcomes, strict=True):
            cands[i] = [list(c) for c in outcome.candidates]
            drawn.add(outcome)
        if done is not None:
            done(len(idx))
    return cands


@dataclass
class CandidateCounts:
    """What the candidate step took for one method: raw samples drawn, their flaws, rejections, scored, short."""

    samples: int = 0
    rejected: int = 0
    scored: int = 0
    short: int = 0  # prompts that got fewer than n candidates (rounds ran out)
    prompts: int = 0
    flaws: dict = field(default_factory=dict)

    def add(self, outcome) -> None:
        """Count one prompt's Outcome (inference.candidates)."""
        self.prompts += 1
        self.samples += outcome.samples
        self.rejected += outcome.rejected
        self.scored += outcome.scored
        self.short += len(outcome.candidates) < outcome.n
        for name, count in outcome.flaws.items():
            self.flaws[name] = self.flaws.get(name, 0) + count

    def summary(self) -> dict:
        """Rates over the raw samples (before cleaning) and per-prompt counts, for metrics.json."""
        from inference.candidates import FLAWS

        per = max(self.samples, 1)
        return {
            "samples_per_prompt": self.samples / max(self.prompts, 1),
            "raw_flaws": {name: self.flaws.get(name, 0) / per for name in FLAWS},
            "rejected": self.rejected / per,
            "scored_per_prompt": self.scored / max(self.prompts, 1),
            "short_prompts": self.short,
        }


def score_replies(real: list, cands: list[list[list[str]]], training_messages: set[str], embedder, seed: int) -> dict:
    """Text metrics of one method's replies against the real ones (style, AUC, semantic, degeneration)."""
    gen = [c for per in cands for c in per]
    gen_groups = [i for i, per in enumerate(cands) for _ in per]
    semantic = M.semantic_similarity(real, gen, gen_groups, embedder)
    return {
        "style": M.style_distance(real, gen),
        "style_summary": M.summary(gen),
        "auc": M.distinguishability_auc(real, gen, list(range(len(real))), gen_groups, seed=seed),
        "semantic": sum(semantic) / len(semantic) if semantic else None,
        "degeneration": M.degeneration(gen, training_messages),
    }


def intervals(
    real: list, cands: list[list[list[str]]], nll_pairs: list[tuple[float, int]] | None,
    training_messages: set[str], embedder, cfg: EvalConfig, style_ref: dict | None = None,
) -> dict[str, list[float] | None]:
    """Bootstrap 95% intervals over prompts for every headline figure of one method (see metrics.py).

    The AUC interval resamples the classifier's out-of-fold scores (refitting per resample would cost minutes).
    """
    n, b, seed = len(real), cfg.bootstrap_resamples, cfg.seed
    if b <= 0 or n < 2:
        return {}
    gen_groups = [i for i, per in enumerate(cands) for _ in per]
    gen = [c for per in cands for c in per]
    out: dict[str, list[float] | None] = {}

    def ci(fn) -> list[float] | None:
        r = M.bootstrap_interval(n, fn, b, seed)
        return None if r is None else [round(r[0], 6), round(r[1], 6)]

    if nll_pairs:
        out["nll_per_token"] = ci(lambda idx: M.nll_summary([nll_pairs[i] for i in idx])["nll_per_token"])
    sem = M.semantic_similarity(real, gen, gen_groups, embedder)
    out["semantic"] = ci(lambda idx: sum(sem[i] for i in idx) / len(idx))
    out["style"] = ci(lambda idx: M.style_distance(
        [real[i] for i in idx], [c for i in idx for c in cands[i]])["combined"])
    if style_ref is not None:
        out["style_calibrated"] = ci(lambda idx: M.calibrated_style(M.style_distance(
            [real[i] for i in idx], [c for i in idx for c in cands[i]]), style_ref)["combined"])
    scores = M.distinguishability_scores(real, gen, list(range(n)), gen_groups, seed)
    if scores is not None:
        by_prompt: dict[int, list[tuple[int, float]]] = {i: [(1, scores[i])] for i in range(n)}
        for k, g in enumerate(gen_groups):
            by_prompt[g].append((0, scores[n + k]))

        def auc(idx):
            pts = [p for i in idx for p in by_prompt[i]]
            return M.auc_from_scores([y for y, _ in pts], [x for _, x in pts])

        out["auc"] = ci(auc)
    for key in ("empty", "repeated", "copied", "assistant"):
        out[key] = ci(lambda idx, key=key: M.degeneration([c for i in idx for c in cands[i]], training_messages)[key])
    return out


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
    log = training_log(Path(cfg.adapter_dir)) if cfg.adapter_dir else None
    _atomic_write(paths["report"], render_report(result.metrics, result.comparisons, log))
    result.paths = paths


def training_log(adapter_dir: Path) -> Path:
    """The adapter's train_log.jsonl: its own, or, for an adapter from `convo train`'s preference step, the one of
    the SFT run kept in its `sft/` dir (the loss curve the report plots)."""
    own, sft = adapter_dir / "train_log.jsonl", adapter_dir / "sft" / "train_log.jsonl"
    return sft if not own.is_file() and sft.is_file() else own


def metrics_table(metrics: dict):
    """A rich Table of the headline figures per method: lower is better, except AUC (best at 0.5).

    ctx: mean context tokens; NLL/tok: of the real replies (perplexity is in metrics.json); sem: semantic
    similarity to the real reply (higher is better); style: calibrated combined
    style distance; empty/rep: share of empty/self-repeating replies; copy: share of 4+ word messages copied
    from training; asst: share of replies in an assistant's voice (the share of raw samples the candidate step
    rejected is in metrics.json and the report).
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
    for col in ("ctx", "NLL/tok", "sem", "style", "AUC", "empty", "rep", "copy", "asst"):
        table.add_column(col, justify="right", no_wrap=True)
    for name, r in metrics["methods"].items():
        d = r["degeneration"]
        table.add_row(
            name, f"{r['context_tokens_mean']:.0f}", f(r["nll_per_token"]), f(r.get("semantic")),
            f((r.get("style_calibrated") or r["style"])["combined"]), f(r["auc"]), f(d["empty"], 2), f(d["repeated"], 2),
            f(d["copied"], 2), f(d.get("assistant"), 2),
        )
    rd = metrics["real"]["degeneration"]
    table.add_row("(real)", "", "", "1.000", "0.000", "0.5", f(rd["empty"], 2), f(rd["repeated"], 2), f(rd["copied"], 2),
                  f(rd.get("assistant"), 2), style="dim")
    return table


def identity_table(metrics: dict):
    """A rich Table of how recognisably the persona each method writes: marker error and attribution, with their
    bootstrap intervals; the reference rows give the floor and ceiling (see markers.py and attribution.py)."""
    from rich import box
    from rich.table import Table

    def f(x, iv=None, digits=3):
        if x is None:
            return "-"
        return f"{x:.{digits}f}" + (f" [{iv[0]:.{digits}f}, {iv[1]:.{digits}f}]" if iv else "")

    att = metrics.get("attribution") or {}
    table = Table(title="texting habits and attribution", box=box.SIMPLE_HEAD, collapse_padding=True)
    table.add_column("method", no_wrap=True)
    table.add_column("marker error", justify="right", no_wrap=True)
    table.add_column("attribution", justify="right", no_wrap=True)
    for name, r in metrics["methods"].items():
        iv = r.get("intervals") or {}
        table.add_row(name, f(r.get("marker_error"), iv.get("marker_error")),
                      f(r.get("attribution"), iv.get("attribution"), 2))
    table.add_row("(another sample of the person)", f(metrics["real"].get("marker_reference")), "", style="dim")
    table.add_row("(real held-out replies)", "0", f(att.get("real"), att.get("real_interval"), 2), style="dim")
    if att.get("chance") is not None:
        table.add_row("(chance)", "", f(att["chance"], None, 2), style="dim")
    return table
