"""`convo dataset` (message log -> train/val samples for one persona) and `convo tokenizer-report`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from convo.cli import state


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("dataset")(dataset)
    app.command("tokenizer-report")(tokenizer_report)


def dataset(
    ctx: typer.Context,
    messages: Annotated[
        Path, typer.Argument(help="Message log written by `convo ingest` (messages.jsonl).", show_default=False)
    ],
    persona: Annotated[
        str,
        typer.Option(
            "--persona", "-p", help="The friend to imitate: a display name or speaker_id (case-insensitive).",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder for train.jsonl, val.jsonl and meta.json.",
                           show_default=False)
    ],
    me: Annotated[
        str | None,
        typer.Option("--me", help="Which speaker is you (name or speaker_id). Default: 'me' in MESSAGES' "
                                  ".meta.json sidecar written by `convo ingest`."),
    ] = None,
    gap: Annotated[
        float | None,
        typer.Option("--gap", help="Session gap in minutes: context never crosses a longer silence; a silence of "
                                   "exactly this long stays in the session. (default: dataset.session_gap_min, 60)"),
    ] = None,
    context: Annotated[
        int | None,
        typer.Option("--context", help="Max messages of history per sample. (default: dataset.context_messages, 16)"),
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option("--max-tokens", help="With --tokenizer: drop the oldest history messages until prompt + "
                                          "completion fits. (default: dataset.max_tokens, none)"),
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option("--tokenizer", help="Tokenizer (local dir, or a cached model name) for --max-tokens. "
                                         "(default: dataset.tokenizer)"),
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option("--mode", help="Whose turns are the targets: friend (the persona's), self (yours, to "
                                    "autocomplete you) or both. (default: dataset.mode, both)"),
    ] = None,
    chats: Annotated[
        list[str] | None,
        typer.Option("--chats", help="Only these chats (repeat the option, or separate names with commas). "
                                     "(default: every chat the persona writes in)"),
    ] = None,
    val: Annotated[
        float | None,
        typer.Option("--val", help="Share of samples for validation, taken from the most recent sessions. "
                                   "(default: dataset.val_fraction, 0.1)"),
    ] = None,
    role_tags: Annotated[
        bool | None,
        typer.Option("--role-tags/--name-tags", help="Tag the persona [FRIEND] and you [ME] instead of name tags "
                                                     "like ALICE. (default: dataset.role_tags, name tags)"),
    ] = None,
    since: Annotated[
        Path | None,
        typer.Option("--since", help="An adapter folder (a `convo train` --out, or a persona folder with "
                                     "`current`): keep only the sessions that ended after its newest training "
                                     "message, to retrain on what is new.", show_default=False),
    ] = None,
) -> None:
    """Build prompt/completion samples for one persona from a message log, split by session (newest = val)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    from training.dataset import MODES, adapter_data_last_ts, build_dataset

    cfg = state(ctx).settings.dataset
    mode = mode if mode is not None else cfg.mode
    if mode not in MODES:
        raise typer.BadParameter(f"{mode!r}: use one of {', '.join(MODES)}", param_hint="--mode")
    tokenizer = tokenizer if tokenizer is not None else cfg.tokenizer
    max_tokens = max_tokens if max_tokens is not None else cfg.max_tokens
    after = adapter_data_last_ts(since) if since is not None else None
    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    ) as progress:
        tasks = {"read": progress.add_task(f"reading {messages.name}", total=None),
                 "sessions": progress.add_task("building samples", total=None, visible=False)}

        def report(stage: str, done: int, total: int) -> None:
            progress.update(tasks[stage], completed=done, total=total, visible=True)

        summary = build_dataset(
            messages,
            persona,
            out,
            me=me,
            session_gap_min=gap if gap is not None else cfg.session_gap_min,
            context_messages=context if context is not None else cfg.context_messages,
            max_tokens=max_tokens,
            tokenizer=tokenizer,
            mode=mode,
            chats=chats,
            val_fraction=val if val is not None else cfg.val_fraction,
            role_tags=role_tags if role_tags is not None else cfg.role_tags,
            since=after,
            progress=report,
        )
    _print_summary(summary)


def _print_summary(summary) -> None:
    """A panel with the counts and the paths written."""
    from rich.console import Console
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table

    meta, c = summary.meta, summary.counts
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    me = meta["me"]
    grid.add_row("persona", escape(f"{meta['persona']['name']} [{meta['persona']['tag']}]"
                                   + (f"   me: {me['name']} [{me['tag']}]" if me else "   me: unknown")))
    grid.add_row("mode", f"{meta['mode']} (targets {', '.join(meta['targets'])})")
    grid.add_row("samples", f"{c['train']:,} train / {c['val']:,} val   by target: "
                 + ", ".join(f"{t} {n:,}" for t, n in c["by_target"].items()))
    grid.add_row("sessions", f"{c['sessions_train']:,} train / {c['sessions_val']:,} val "
                 f"(of {c['sessions_total']:,}; gap {meta['session_gap_min']:g} min; val from {meta['val_from']})")
    cut = meta["split"]["cut"]
    grid.add_row("split", f"validation {meta['split']['val_share']:.1%} of samples (asked {meta['val_fraction']:g})"
                 + (f"; session {escape(cut['session'])} cut at {cut['at']} after a {cut['silence_min']:g}-min "
                    f"silence: {cut['train_samples']} train / {cut['val_samples']} val samples" if cut else
                    "; whole sessions"))
    grid.add_row("chats", escape(", ".join(meta["chats"])))
    if meta.get("since"):
        grid.add_row("since", f"sessions ending after {meta['since']['after']} "
                     f"({meta['since']['sessions_before']:,} older sessions left out)")
    if meta["max_tokens"] is not None:
        grid.add_row("max tokens", f"{meta['max_tokens']} with {meta['tokenizer']} "
                     f"({c['over_max_tokens']} samples still over)")
    console = Console()
    console.print(Panel(grid, title="convo dataset", expand=False))
    for path in (summary.train_path, summary.val_path, summary.meta_path):  # whole paths, never cropped
        console.print(f"wrote {escape(str(path))}", soft_wrap=True)


def tokenizer_report(
    ctx: typer.Context,
    data: Annotated[
        Path, typer.Option("--data", "-d", help="Dataset folder written by `convo dataset` (meta.json, *.jsonl).",
                           show_default=False)
    ],
    tokenizer: Annotated[
        str | None,
        typer.Option("--tokenizer", "-t", help="Base model's tokenizer: a local directory (offline) or a cached "
                                               "model name. (default: dataset.tokenizer)"),
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option("--max-tokens", help="Length limit for the truncation share (prompt + completion tokens). "
                                          "(default: the dataset's max_tokens, else train.max_length)"),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report as JSON on stdout instead of tables.")
    ] = False,
) -> None:
    """How the tokenizer sees the dataset: tokens per message, truncation, emoji, and speaker tags at line starts."""
    from training.dataset import load_dataset_meta, load_tokenizer
    from training.tokenizer_report import tokenizer_report as build_report

    settings = state(ctx).settings
    name = tokenizer if tokenizer is not None else settings.dataset.tokenizer
    if not name:
        raise typer.BadParameter("give the base model's tokenizer (a local directory works offline)",
                                 param_hint="--tokenizer")
    if max_tokens is None:
        max_tokens = load_dataset_meta(data).get("max_tokens") or settings.dataset.max_tokens \
            or settings.train.max_length
    report = build_report(load_tokenizer(name), data, max_tokens, tokenizer_name=name)
    if as_json:
        typer.echo(json.dumps(report, ensure_ascii=False, indent=2))
        return
    _print_report(report)


def _print_report(r: dict) -> None:
    """Rich tables: lengths, emoji, tags."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    m, s = r["messages"], r["sample_tokens"]
    lengths = Table(title=escape(f"{r['tokenizer']} on {r['data']}"), show_header=True)
    for col in ("what", "count", "median", "p95", "max", "note"):
        lengths.add_column(col, justify="left" if col in ("what", "note") else "right")
    lengths.add_row("tokens per message", f"{m['count']:,}", f"{m['median_tokens']:g}", f"{m['p95_tokens']:g}",
                    f"{m['max_tokens']:,}", f"{m['with_unk']} with unknown tokens" if m["with_unk"] else "")
    lengths.add_row("tokens per sample", f"{r['samples']:,}", f"{s['median']:g}", f"{s['p95']:g}", f"{s['max']:,}",
                    f"{s['truncated']:,} ({s['truncated_share']:.1%}) over {r['max_tokens']}")
    console.print(lengths)

    if r["emoji"]:
        emoji = Table(title="emoji (tokenized alone)")
        for col in ("emoji", "codepoints", "samples", "tokens", "pieces", "problem"):
            emoji.add_column(col, justify="right" if col in ("samples", "tokens") else "left")
        for e in r["emoji"]:
            problems = [p for p, bad in (("unknown", e["unk"]), ("byte fallback", e["byte_fallback"]),
                                         ("decode differs", not e["round_trip"])) if bad]
            emoji.add_row(e["emoji"], e["codepoints"], f"{e['samples']:,}", str(e["tokens"]),
                          escape(" ".join(e["pieces"])), ", ".join(problems) or "-")
        console.print(emoji)
    else:
        console.print("no emoji in the data")

    tags = Table(title='speaker tags after "\\n"')
    for col in ("tag", "tokens", "pieces", "prompt end is a token prefix", "problem"):
        tags.add_column(col)
    for t in r["tags"]:
        problems = [p for p, bad in (("unknown", t["unk"]), ("byte fallback", t["byte_fallback"])) if bad]
        tags.add_row(f"[{t['tag']}]", str(t["tokens"]), escape(" ".join(repr(p) for p in t["pieces"])),
                     "yes" if t["prompt_prefix_ok"] else "NO: prompt ends mid-token", ", ".join(problems) or "-")
    console.print(tags)
