"""The Redis fixture: queue tests use a real server, skip without one, and fail under CONVO_REQUIRE_REDIS=1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.redis
def test_real_redis_roundtrip(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    client.xadd("convo:test", {"k": "v"})
    assert client.xlen("convo:test") == 1
    client.close()


def _run_roundtrip(require: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "CONVO_REQUIRE_REDIS"}
    env["CONVO_TEST_REDIS_URL"] = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    if require is not None:
        env["CONVO_REQUIRE_REDIS"] = require
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_redis_fixture.py::test_real_redis_roundtrip"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    return proc.stdout


def test_without_redis_queue_tests_skip_with_the_reason():
    out = _run_roundtrip(None)
    assert "1 skipped" in out


def test_required_redis_turns_the_skip_into_a_failure():
    out = _run_roundtrip("1")
    assert "1 error" in out and "CONVO_REQUIRE_REDIS=1" in out  # a fixture failure: reported as an error
