"""`convo prune`: time-based retention of feedback events, dead letters and rejected adapter versions (a thin
shell over training/feedback/retention.py)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

console = Console(highlight=False)


def prune_cmd(
    ctx: typer.Context,
    apply: Annotated[bool, typer.Option("--apply", help="Delete. Without it, only show what would be deleted.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Show (dry run) or, with --apply, delete what is past retention: feedback events (feedback.retention_days),
    dead letters (feedback.dead_letter_retention_days), rejected adapter versions (feedback.rejected_retention_days)."""
    from convo.cli import state
    from training.feedback.retention import prune
    from training.feedback.store import FeedbackStore

    settings = state(ctx).settings
    store = FeedbackStore.from_settings(settings.feedback)
    try:
        report = prune(settings, store, apply=apply)
    finally:
        store.close()
    if as_json:
        print(json.dumps(report.as_dict(), indent=2, ensure_ascii=False))
        return
    verb = "deleted" if apply else "would delete"
    table = Table("", verb, "older than", box=None, padding=(0, 2))
    cut = report.cutoffs

    def when(kind: str) -> str:
        return cut[kind][:19].replace("T", " ") if cut[kind] else "(kept forever)"

    table.add_row("feedback events", str(report.feedback_events), when("feedback_events"))
    if report.dead_letters is None:
        table.add_row("dead letters", "-", when("dead_letters"))
    for stream, n in (report.dead_letters or {}).items():
        table.add_row(f"dead letters {escape(stream)}", str(n), when("dead_letters"))
    table.add_row("rejected adapter versions", str(len(report.adapter_versions)), when("adapter_versions"))
    lines = [escape(", ".join(report.adapter_versions))] if report.adapter_versions else []
    lines += [f"[yellow]{escape(n)}[/]" for n in report.notes]
    if not apply:
        lines.append("dry run: nothing was deleted; run `convo prune --apply` to delete")
    console.print(Panel(table, title="prune" if apply else "prune (dry run)", expand=False))
    for line in lines:
        console.print(line)


def register(app: typer.Typer) -> None:
    """Add `convo prune`."""
    app.command("prune")(prune_cmd)
