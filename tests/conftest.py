"""Shared fixtures: real Redis (skip or fail by CONVO_REQUIRE_REDIS), tiny in-process models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REDIS_URL = os.environ.get("CONVO_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture
def redis_url() -> str:
    """URL of a real Redis for queue tests; skips when none answers, unless CONVO_REQUIRE_REDIS=1."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as e:
        if os.environ.get("CONVO_REQUIRE_REDIS") == "1":
            pytest.fail(f"CONVO_REQUIRE_REDIS=1 but no Redis answers at {REDIS_URL}: {e}")
        pytest.skip(f"no Redis at {REDIS_URL} (run `make redis`)")
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture
def cli(monkeypatch, tmp_path):
    """Run `convo ARGS...` in-process; returns (exit_code, stdout, stderr) via capsys-free capture."""
    from convo.cli import run

    monkeypatch.chdir(tmp_path)
    return run


FIXTURES = Path(__file__).parent / "fixtures"
