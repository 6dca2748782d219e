"""`convo serve api`: the OpenAI-compatible HTTP server, a thin shell over bot/openai_api.py (no torch imported)."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from convo.commands.serve import serve_app
from errors import ConfigError


def serve_api_cmd(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option("--host", help="Bind address. \\[default: api.host = 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option("--port", min=1, max=65535, help="HTTP port. \\[default: api.port = 8000]")] = None,
    adapters: Annotated[str | None, typer.Option("--adapters", help="Adapters dir listing the personas. \\[default: api.adapters_dir, else worker.adapters_dir]")] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve personas over an OpenAI-compatible API (/v1/chat/completions, /v1/models...; docs/api.md)."""
    from convo.cli import state

    if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"--log-level {log_level}: use debug, info, warning or error")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = state(ctx).settings
    if adapters is not None:
        settings = settings.model_copy(update={"api": settings.api.model_copy(update={"adapters_dir": adapters})})
    from bot.openai_api import run_server

    run_server(settings, host=host, port=port, log_level=log_level.lower())


def register(app: typer.Typer) -> None:
    """Add `serve api`."""
    serve_app.command("api")(serve_api_cmd)
