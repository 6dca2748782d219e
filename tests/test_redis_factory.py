"""inference.client.connect: the one factory of Redis clients, sync and async, with the timeouts of `redis.*`."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from pydantic import SecretStr

from config.settings import RedisSettings
from inference.client import connect

ROOT = Path(__file__).resolve().parents[1]


def _kwargs(client) -> dict:
    return client.connection_pool.connection_kwargs


def test_connect_takes_timeouts_and_password_from_the_settings():
    settings = RedisSettings(url="redis://127.0.0.1:6379/3", password=SecretStr("s3cret"), connect_timeout_s=1.5,
                             socket_timeout_s=4.0)
    sync = connect(settings, sync=True, block_s=2.0)
    assert isinstance(sync, redis.Redis) and not isinstance(sync, aioredis.Redis)
    kw = _kwargs(sync)
    assert (kw["socket_connect_timeout"], kw["socket_timeout"], kw["password"], kw["db"]) == (1.5, 6.0, "s3cret", 3)
    async_client = connect(settings)
    assert isinstance(async_client, aioredis.Redis) and _kwargs(async_client)["socket_timeout"] == 4.0
    probe = connect("redis://127.0.0.1:6379/0", sync=True, socket_timeout=0.5)  # a URL: default timeouts, overridable
    assert (_kwargs(probe)["socket_timeout"], _kwargs(probe)["socket_connect_timeout"]) == (0.5, 5.0)
    assert "password" not in _kwargs(probe) or _kwargs(probe)["password"] is None


@pytest.mark.redis
def test_connect_clients_talk_to_a_real_redis_and_block_past_the_socket_timeout(redis_url):
    """A blocking read longer than socket_timeout_s succeeds when its block time is declared."""
    settings = RedisSettings(url=redis_url, socket_timeout_s=0.3)
    sync = connect(settings, sync=True, block_s=1.0)
    try:
        sync.xadd("t:stream", {"data": "x"})
        assert sync.xread({"t:stream": "$"}, block=600) == []  # 0.6 s > 0.3 s, within 0.3 + 1.0
    finally:
        sync.close()

    async def go():
        client = connect(redis_url)
        try:
            return await client.ping()
        finally:
            await client.aclose()

    assert asyncio.run(go()) is True


def test_no_other_module_builds_its_own_redis_client():
    """Every Redis client of the product code comes from inference.client.connect (tests may build their own)."""
    pattern = re.compile(r"\bRedis\(|\bfrom_url\(")
    offenders = []
    for package in ("bot", "inference", "training", "convo", "bench", "config"):
        for path in (ROOT / package).rglob("*.py"):
            if path == ROOT / "inference" / "client.py":
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if pattern.search(line) and "sa.make_url" not in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []
