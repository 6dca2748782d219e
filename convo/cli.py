"""The `convo` command: a thin typer shell over library functions.

Each area registers its commands from its own module in `convo/commands/`. Errors a user can fix
(ConvoError) print one line and exit 2; `--debug` shows the traceback. Anything else is a bug and keeps its
traceback. Heavy libraries are imported inside the commands that need them, so `convo --help` is instant.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from typer._click.exceptions import ClickException  # typer >= 0.20 vendors click

from config.settings import Settings, load_settings
from errors import ConvoError

err_console = Console(stderr=True, highlight=False)

app = typer.Typer(
    name="convo",
    help="Learn how a person texts from a chat export and continue conversations as them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


@dataclass
class State:
    """What the global options give every command."""

    settings: Settings
    debug: bool = False


@app.callback()
def _global(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="TOML config file (default: $CONVO_CONFIG). Env vars CONVO_* override it."),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    """Learn how a person texts from a chat export and continue conversations as them."""
    ctx.obj = State(settings=load_settings(config), debug=debug)


def state(ctx: typer.Context) -> State:
    """The State built by the global callback (settings and --debug)."""
    return ctx.find_root().obj


# The order commands appear in `convo --help`; any other module in convo/commands/ follows in name order.
_COMMAND_ORDER = ("ingest", "stats", "dataset", "base", "train", "refine", "evaluate", "simulate", "serve", "ask", "chat",
                  "feedback", "adapters", "retrain")


def _register_all() -> None:
    """Register every module of convo/commands/ that has a `register(app)` (each area owns its module)."""
    import importlib
    import pkgutil

    import convo.commands as pkg

    names = {m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")}
    ordered = [n for n in _COMMAND_ORDER if n in names] + sorted(names - set(_COMMAND_ORDER))
    for name in ordered:
        module = importlib.import_module(f"convo.commands.{name}")
        if hasattr(module, "register"):
            module.register(app)


_register_all()


def run(argv: list[str] | None = None) -> int:
    """Run the CLI with `argv` and return the exit code (what `main` exits with; tests call this)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        result = app(args=argv, prog_name="convo", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except ConvoError as e:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {e}", markup=True, soft_wrap=True)
        return 2
    except ClickException as e:  # usage errors, bad parameters
        e.show()
        return 2
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        err_console.print("aborted")
        return 130
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


def main() -> None:
    """Console entry point."""
    sys.exit(run())
