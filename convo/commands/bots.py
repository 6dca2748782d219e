"""`convo serve telegram`, `convo serve discord` and `convo chat`: thin shells over bot/ (no torch imported)."""

from __future__ import annotations

import asyncio
import logging
from enum import StrEnum
from typing import Annotated

import typer

from convo.commands.serve import serve_app


def _state(ctx: typer.Context):
    from convo.cli import state

    return state(ctx)


class _NoStartupTraceback(logging.Filter):
    """Without --debug, PTB's failed start-up (bad token, no network) logs one line; the CLI says what to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("telegram") and record.getMessage().startswith("Network Retry Loop"):
            record.exc_info = None
            record.exc_text = None
        return True


def _logging(debug: bool) -> None:
    """Log events (never chat text) to stderr; quiet the HTTP libraries."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not debug:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_NoStartupTraceback())
    # discord.webhook logs webhook URLs (their tokens) at DEBUG.
    for noisy in ("httpx", "httpcore", "discord.gateway", "discord.http", "discord.webhook"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def serve_telegram_cmd(ctx: typer.Context) -> None:
    """Run the Telegram bot: drafts of your replies in the bot chat and in Telegram Business chats (docs/bots.md)."""
    from bot.telegram_bot import run_polling

    st = _state(ctx)
    _logging(st.debug)
    run_polling(st.settings)


def serve_discord_cmd(ctx: typer.Context) -> None:
    """Run the Discord bot: roleplay of friends who opted in with /consent grant (docs/bots.md)."""
    from bot.discord_bot import run_bot

    st = _state(ctx)
    _logging(st.debug)
    run_bot(st.settings)


class ChatMode(StrEnum):
    friend = "friend"
    self = "self"


def chat_cmd(
    ctx: typer.Context,
    persona: Annotated[str, typer.Option("--persona", "-p", help="Persona name (its adapter dir under bot.adapters_dir, as the worker serves it).")],
    mode: Annotated[ChatMode, typer.Option("--mode", help="friend: the persona answers you; self: paste the friend's messages and get drafts of yours.")] = ChatMode.friend,
    drafts: Annotated[int | None, typer.Option("--drafts", min=1, max=8, help="Drafts per message in self mode. \\[default: bot.drafts = 3]")] = None,
    timeout_s: Annotated[float | None, typer.Option("--timeout", min=0.1, help="Seconds to wait for the worker. \\[default: bot.reply_timeout_s = 60]")] = None,
) -> None:
    """Chat in the terminal through the worker, with 👍 / 👎 / regenerate / send as commands (/help inside)."""
    from bot.console import run_chat, stdin_reader
    from bot.core import BotConfig, BotCore, PersonaBook, connect_redis, ping_redis

    settings = _state(ctx).settings
    config = BotConfig.from_settings(settings, drafts=drafts, reply_timeout_s=timeout_s)
    persona_ = PersonaBook(config.adapters_dir).get(persona)

    async def main() -> None:
        redis_client = connect_redis(settings)
        try:
            await ping_redis(redis_client, settings.redis.url)
            core = BotCore(redis_client, config, "console")
            await run_chat(core, persona_, mode.value, stdin_reader())
        finally:
            await redis_client.aclose()

    asyncio.run(main())


def register(app: typer.Typer) -> None:
    """Add `serve telegram`, `serve discord` and `chat`."""
    serve_app.command("telegram")(serve_telegram_cmd)
    serve_app.command("discord")(serve_discord_cmd)
    app.command("chat")(chat_cmd)
