"""`convo eval`: compare the adapter with prompting baselines on the validation split (see training/evaluate)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def eval_command(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option("--data", help="Dataset dir written by `convo dataset` (train/val.jsonl, meta.json).")],
    adapter: Annotated[
        Path | None, typer.Option("--adapter", help="Adapter dir written by `convo train`; its base model is used.")
    ] = None,
    base: Annotated[
        str | None, typer.Option("--base", help="Base model dir or hub id (default: the adapter's recorded base).")
    ] = None,
    methods: Annotated[
        str | None,
        typer.Option(
            "--methods",
            help="Comma-separated: base, incontext, retrieval, adapter, adapter+retrieval, adapter+rerank, api; retrieval-bm25, "
            "retrieval-dense, adapter+retrieval-bm25, adapter+retrieval-dense pin the retriever "
            "(default: eval.methods).",
        ),
    ] = None,
    context_budget: Annotated[
        int | None,
        typer.Option("--context-budget", help="Tokens of context every context-adding method fills "
                     "(default: eval.context_budget_tokens)."),
    ] = None,
    retriever: Annotated[
        str | None,
        typer.Option("--retriever", help="What `retrieval` methods use: bm25 (word overlap) or dense (all-MiniLM-L6-v2 "
                     "cosine) (default: eval.retriever = bm25)."),
    ] = None,
    n: Annotated[int | None, typer.Option("--n", help="Sampled replies per prompt (default: eval.samples_per_prompt).")] = None,
    max_prompts: Annotated[
        int | None, typer.Option("--max-prompts", help="Validation prompts used at most (default: eval.max_prompts).")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for prompts, sessions and sampling (default: eval.seed).")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", help="Sampling temperature (default: generate.temperature).")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling (default: generate.top_p).")] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", help="Longest reply in tokens (default: generate.max_new_tokens).")
    ] = None,
    rerank_k: Annotated[
        int | None, typer.Option("--rerank-k", help="Samples adapter+rerank draws per prompt before keeping the "
                                 "--n best (default: generate.rerank_k).")
    ] = None,
    api_base: Annotated[
        str | None, typer.Option("--api-base", help="OpenAI-compatible endpoint up to /v1, for method api (default: eval.api_base).")
    ] = None,
    api_model: Annotated[str | None, typer.Option("--api-model", help="Model name at --api-base (default: eval.api_model).")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder for metrics.json and generations.jsonl (default: ADAPTER/eval, else eval).")
    ] = None,
    report: Annotated[Path | None, typer.Option("--report", help="HTML report path (default: OUT/report.html).")] = None,
    attribution_log: Annotated[
        Path | None,
        typer.Option("--attribution-log", help="Message log whose other speakers are the attribution candidates "
                     "(default: the log the dataset was built from, recorded in its meta.json)."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print metrics.json to stdout instead of the table.")] = False,
) -> None:
    """Measure how well each method imitates the persona: likelihood, style, distinguishability, degeneration.

    All methods use the same base model, validation prompts, sampling seeds and context token budget. Writes metrics.json, generations.jsonl and a self-contained HTML report. The api key is read from the env var named by eval.api_key_env (default OPENAI_API_KEY).
    """
    import json

    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from convo.cli import state
    from training.evaluate.run import (
        EvalConfig,
        check_config,
        identity_table,
        metrics_table,
        parse_methods,
        run_eval,
    )

    s = state(ctx).settings
    cfg = EvalConfig.from_settings(
        s,
        data_dir=data,
        out_dir=out or (adapter / "eval" if adapter else Path("eval")),
        adapter_dir=adapter,
        base=base,
        methods=parse_methods(methods) if methods else None,
        context_budget_tokens=context_budget,
        samples_per_prompt=n,
        max_prompts=max_prompts,
        seed=seed,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        rerank_k=rerank_k,
        retriever=retriever,
        api_base=api_base,
        api_model=api_model,
        report_path=report,
        attribution_log=attribution_log,
    )
    check_config(cfg)
    console = Console(stderr=json_out)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, transient=True,
    ) as progress:
        result = run_eval(cfg, progress=progress)
    if json_out:
        typer.echo(json.dumps(result.metrics, indent=2, ensure_ascii=False))
        return
    console.print(metrics_table(result.metrics))
    console.print(
        "[dim]ctx: context tokens · sem: semantic similarity to the real reply (1 = same meaning) · "
        "style: calibrated style distance (0 = as close as the person's own other replies) · AUC: real vs generated (0.5 = "
        "indistinguishable) · empty/rep/asst: share of replies (empty, self-repeating, assistant voice) · copy: share of "
        "4+ word messages copied from training[/]"
    )
    console.print(identity_table(result.metrics))
    console.print(
        "[dim]marker error: mean |rate - real rate| over lowercase, final punctuation, apostrophes, short forms, "
        "laughs, emoji, bursts and short messages (0 = the person's habits) · attribution: share of replies a char "
        "n-gram classifier over the log's speakers names the persona for[/]"
    )
    console.print(f"[dim]{escape(attribution_line(result.metrics))}[/]", highlight=False)
    console.print("[bold]written[/]")
    for k, p in result.paths.items():
        console.print(f"  {k:12} {p}", soft_wrap=True, highlight=False)


def attribution_line(metrics: dict) -> str:
    """One line: the attribution's candidates, chance and ceiling, or why the column was skipped."""
    a = metrics.get("attribution") or {}
    if a.get("skipped"):
        return f"attribution skipped: {a['skipped']}"
    real = "-" if a.get("real") is None else f"{a['real']:.2f}"
    return (f"attribution: {len(a['candidates'])} candidates ({', '.join(a['candidates'])}), chance "
            f"{a['chance']:.2f}, the real held-out replies {real}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("eval", help=eval_command.__doc__)(eval_command)
