"""Shared pieces of the bot tests: a fake worker on the real Redis, a config and an async runner."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

from inference.protocol import (
    WORKERS_GROUP,
    AdapterRef,
    FeedbackEvent,
    GenerateRequest,
    GenerateResponse,
    Keys,
    MessageAmendment,
    Partial,
    entry_data,
    is_amendment,
)

PREFIX = "bottest"


def run(coro):
    """Run a coroutine to completion in a fresh event loop (no pytest-asyncio here)."""
    return asyncio.run(asyncio.wait_for(coro, 60))


def bot_config(tmp_path: Path | None = None, **overrides):
    """A BotConfig for tests: no typing pauses, short timeouts, test prefix."""
    from bot.core import BotConfig
    from config.settings import Settings

    fields = dict(prefix=PREFIX, adapters_dir=(tmp_path or Path("/nonexistent")) / "adapters", reply_timeout_s=5.0,
                  typing_s_per_char=0.0, drafts=2)
    fields.update(overrides)
    return BotConfig.from_settings(Settings(), **fields)


def default_answer(request: GenerateRequest) -> list[list[str]]:
    """Candidates that show what they answered: the persona, the mode and the last message seen."""
    last = request.history[-1].text if request.history else "-"
    return [[f"{request.persona}/{request.mode} #{i} re: {last}", "second msg"] for i in range(request.n)]


class FakeWorker:
    """Answers GenerateRequests from the real requests stream the way the protocol says a worker does."""

    def __init__(self, redis_url: str, answer: Callable[[GenerateRequest], list[list[str]] | None] = default_answer,
                 prefix: str = PREFIX, version: str | None = "v3"):
        import redis.asyncio as aioredis

        self.redis = aioredis.from_url(redis_url)
        self.keys = Keys(prefix)
        self.answer = answer
        self.version = version
        self.requests: list[GenerateRequest] = []
        self.answered = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> FakeWorker:
        with contextlib.suppress(Exception):
            await self.redis.xgroup_create(self.keys.requests, WORKERS_GROUP, id="0", mkstream=True)
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.redis.aclose()

    async def _loop(self) -> None:
        while True:
            got = await self.redis.xreadgroup(WORKERS_GROUP, "fake", {self.keys.requests: ">"}, count=10, block=200)
            for _stream, entries in got or []:
                for entry_id, fields in entries:
                    request = GenerateRequest.loads(entry_data(fields))
                    self.requests.append(request)
                    candidates = self.answer(request)
                    if candidates is not None:
                        await self._reply(request, candidates)
                    await self.redis.xack(self.keys.requests, WORKERS_GROUP, entry_id)

    async def _reply(self, request: GenerateRequest, candidates: list[list[str]]) -> None:
        if request.stream and candidates:
            text = ""
            words = " ".join(candidates[0]).split(" ")
            for seq, word in enumerate(words):
                text = f"{text} {word}".strip()
                partial = Partial(id=request.id, text=text, seq=seq, done=seq == len(words) - 1)
                await self.redis.set(self.keys.partial(request.id), partial.dumps(), ex=60)
                await self.redis.publish(self.keys.partial(request.id), partial.dumps())
        response = GenerateResponse(id=request.id, candidates=candidates,
                                    adapter=AdapterRef(persona=request.persona, version=self.version))
        await self.redis.lpush(request.reply_to or self.keys.reply(request.id), response.dumps())
        self.answered.set()


async def feedback_events(redis, prefix: str = PREFIX) -> list[FeedbackEvent]:
    """Every FeedbackEvent on the feedback stream, oldest first."""
    return [FeedbackEvent.loads(entry_data(f)) for _id, f in await redis.xrange(Keys(prefix).feedback)
            if not is_amendment(f)]


async def amendments(redis, prefix: str = PREFIX) -> list[MessageAmendment]:
    """Every MessageAmendment on the feedback stream, oldest first."""
    return [MessageAmendment.loads(entry_data(f)) for _id, f in await redis.xrange(Keys(prefix).feedback)
            if is_amendment(f)]
