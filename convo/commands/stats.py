"""`convo stats`: who says how much, how, and when, per chat and speaker of a message log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("stats")(stats)


def stats(
    messages: Annotated[
        Path, typer.Argument(help="Message log written by `convo ingest` (JSONL).", show_default=False)
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the numbers as JSON on stdout instead of a table.")
    ] = False,
) -> None:
    """Per chat and speaker: messages, words, median words per message, share sent in bursts, active dates, top emoji."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from errors import IngestError
    from training.stats import compute_stats

    if not messages.is_file():
        raise IngestError(f"{messages}: no such file; give the JSONL written by `convo ingest --out`")
    size = messages.stat().st_size
    with Progress(
        TextColumn("reading {task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=size < 8 * 1024 * 1024,  # small logs take well under a second
    ) as progress:
        task = progress.add_task(messages.name, total=size)
        result = compute_stats(messages, progress=lambda n: progress.advance(task, n))
    if as_json:
        typer.echo(json.dumps(result, ensure_ascii=False, indent=2))
        return
    _print_table(result)


def _print_table(result: dict) -> None:
    """One row per chat and speaker, chats separated by a rule."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['file']}: {result['messages']:,} messages in {len(result['chats'])} chats")
    table.add_column("chat", overflow="fold")
    table.add_column("speaker", overflow="fold")
    table.add_column("msgs", justify="right")
    table.add_column("words", justify="right")
    table.add_column("median\nwords", justify="right")
    table.add_column("in\nbursts", justify="right")
    table.add_column("active", no_wrap=True)
    table.add_column("top emoji")
    for chat in result["chats"]:
        rows = chat["speakers"]
        for i, s in enumerate(rows):
            first, last = (s["first"] or "")[:10], (s["last"] or "")[:10]
            table.add_row(
                chat["chat"] if i == 0 else "",
                s["speaker"],
                f"{s['messages']:,}",
                f"{s['words']:,}",
                f"{s['median_words']:g}",
                f"{s['burst_share']:.0%}",
                _date_range(first, last),
                " ".join(f"{e['emoji']}×{e['count']}" for e in s["top_emoji"]),
                end_section=i == len(rows) - 1,
            )
    Console().print(table)


def _date_range(first: str, last: str) -> str:
    """`2023-01-01 → 03-05` (the year is not repeated when it is the same)."""
    if first == last:
        return first
    return f"{first} → {last[5:] if first[:4] == last[:4] else last}"
