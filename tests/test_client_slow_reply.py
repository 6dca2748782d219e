"""A reply slower than redis-py's default 5 s socket timeout still arrives (a CPU worker often takes that long)."""

from __future__ import annotations

import asyncio
import time

import pytest

from config.settings import RedisSettings, Settings
from errors import ConvoError
from inference.client import WorkerClient, WorkerTimeout, connect
from inference.protocol import GenerateRequest, GenerateResponse, Keys


@pytest.mark.redis
def test_bot_and_cli_clients_wait_past_five_seconds(redis_url):
    from bot.core import connect_redis

    keys = Keys("slow-reply")
    settings = Settings(redis=RedisSettings(url=redis_url, prefix=keys.prefix))

    async def run():
        answered_by_hand = GenerateRequest.build(persona="alice", history=[])
        clients = [connect(redis_url), connect_redis(settings)]
        try:
            async def reply_late():  # the "worker": answers after 5.5 s, past redis-py's default read timeout
                await asyncio.sleep(5.5)  # the scenario itself (a slow reply), not synchronisation
                await clients[0].lpush(keys.reply(answered_by_hand.id),
                                       GenerateResponse(id=answered_by_hand.id, candidates=[["ok"]]).dumps())

            waiter = WorkerClient(clients[1], keys).wait(answered_by_hand, timeout_s=8)
            unanswered = WorkerClient(clients[0], keys).wait(GenerateRequest.build(persona="alice"), timeout_s=6)
            return await asyncio.gather(waiter, unanswered, reply_late(), return_exceptions=True)
        finally:
            for c in clients:
                await c.aclose()

    t0 = time.monotonic()
    response, timeout, _ = asyncio.run(run())
    assert isinstance(response, GenerateResponse) and response.candidates == [["ok"]]
    assert isinstance(timeout, WorkerTimeout) and isinstance(timeout, ConvoError)  # one clear line, not a traceback
    assert 5.5 <= time.monotonic() - t0 < 9
