"""`convo ingest`: chat exports (Telegram, WhatsApp, Discord, JSONL) -> one ordered canonical message log."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from convo.cli import state


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("ingest")(ingest)


def ingest(
    ctx: typer.Context,
    exports: Annotated[
        list[Path],
        typer.Argument(
            help="Export files or folders (searched recursively; files of unknown format there are skipped "
            "with a warning).",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="JSONL log to write (default from settings: messages.jsonl). "
                     "Its sidecar <stem>.meta.json is written beside it."),
    ] = None,
    fmt: Annotated[
        str,
        typer.Option("--format", "-f", help="auto (detect per file), telegram, whatsapp, discord or jsonl."),
    ] = "auto",
    me: Annotated[
        str | None,
        typer.Option("--me", help="Your speaker name or id (default: detected from a Telegram full export, "
                     "else the one speaker present in every chat)."),
    ] = None,
    tz: Annotated[
        str | None,
        typer.Option("--tz", help="Time zone for timestamps without one (WhatsApp) and for Telegram times: "
                     "IANA name (Europe/Berlin), UTC or +02:00. Default from settings: UTC; with --append, the "
                     "zone the log was written with."),
    ] = None,
    scrub: Annotated[
        bool,
        typer.Option("--scrub", help="Replace emails, phone numbers, URLs, card numbers and IBANs with "
                     "placeholders such as <EMAIL>."),
    ] = False,
    phone_region: Annotated[
        list[str] | None,
        typer.Option("--phone-region", help="With --scrub: a region (ISO code: US, DE, IN...) whose national "
                     "phone numbers are found; repeat for several. Numbers with + are found for every region. "
                     "Default from settings (ingest.phone_regions): US."),
    ] = None,
    append: Annotated[
        bool,
        typer.Option("--append", "-a", help="Add the exports to the existing --out log instead of replacing it; "
                     "messages already in the log are skipped (counted as duplicates)."),
    ] = False,
    date_order: Annotated[
        str | None,
        typer.Option("--date-order", help="dmy (31/12/21) or mdy (12/31/21): how to read WhatsApp files whose "
                     "dates fit both orders (a day over 12 anywhere in a file decides by itself). Default from "
                     "settings (ingest.date_order): none, such a file is an error that asks for this option."),
    ] = None,
) -> None:
    """Read chat exports and write one canonical JSONL message log, ordered by chat then time.

    Every message is written once, however many overlapping exports hold it (March and June exports of one chat, a single chat and a full account export); --append adds new exports to an existing log.
    """
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from training.ingest.pipeline import ingest as run_ingest

    settings = state(ctx).settings.ingest
    out = out if out is not None else Path(settings.out)
    console = Console(stderr=True, highlight=False)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TextColumn("{task.completed:,} messages"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("reading", total=None)
        result = run_ingest(
            exports,
            out,
            fmt=fmt.lower(),
            me=me if me is not None else settings.me,
            tz=tz if tz is not None else (None if append else settings.tz),  # appending: the log's zone
            scrub=scrub,
            append=append,
            date_order=(date_order.lower() if date_order is not None else settings.date_order),
            phone_regions=phone_region or settings.phone_regions,
            on_file=lambda path, name: progress.update(task, description=f"{name}: {path.name}"),
            on_progress=lambda n: progress.advance(task, n),
        )
    _summary(result, console)


def _summary(result, console) -> None:
    """A panel with the counts and the paths written."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table

    meta = result.meta
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}", markup=True, soft_wrap=True)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")  # paths are never cut
    me = meta["me"]
    grid.add_row("messages", f"{meta['messages']:,} in {meta['chats']:,} chats")
    if meta["appended"] is not None:
        a = meta["appended"]
        grid.add_row("appended", f"{a['added']:,} new to the {a['log_messages']:,} in the log "
                     f"({a['new_messages']:,} read, {a['duplicates']:,} already there)")
    else:
        grid.add_row("duplicates", f"{meta['duplicates']:,} skipped (already in another input)")
    for title, finals in meta["shared_titles"].items():  # the log's, earlier appends included
        grid.add_row("same title", f"{len(finals)} chats titled {title!r}: " + ", ".join(finals))
    grid.add_row("formats", ", ".join(f"{k} {v:,}" for k, v in meta["formats"].items()))
    grid.add_row("me", f"{me['name']} (id {', '.join(me['ids'])}; {me['how']})")
    grid.add_row("speakers", f"{len(meta['speakers']):,}")
    grid.add_row("dates", f"{meta['date_range']['first']} → {meta['date_range']['last']}")
    skipped = ", ".join(f"{k} {v:,}" for k, v in meta["skipped"].items()) or "none"
    grid.add_row("skipped", skipped)
    if meta["scrubbed"] is not None:
        grid.add_row("scrubbed", ", ".join(f"{k} {v:,}" for k, v in meta["scrubbed"].items()) or "nothing found")
    grid.add_row("wrote", f"{result.out}\n{result.meta_path}")
    Console().print(Panel(grid, title="convo ingest", expand=False))
