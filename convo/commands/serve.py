"""`convo serve ...`: the long-running processes (worker, bots, feedback store, scheduler).

Each area adds its own subcommand to `serve_app` from its own module (`convo/commands/worker.py` adds `serve worker`,
...), so this module only creates the group.
"""

from __future__ import annotations

import typer

serve_app = typer.Typer(
    help="Run a service: the inference worker, a bot, the feedback store or the retraining scheduler.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add the `serve` group (its subcommands are added by the other command modules)."""
    app.add_typer(serve_app, name="serve")
