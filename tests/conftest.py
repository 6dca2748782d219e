"""Shared fixtures: real Redis (skip or fail by CONVO_REQUIRE_REDIS), tiny in-process models."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

REDIS_URL = os.environ.get("CONVO_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def require_redis():
    """A client of the test Redis; skips the test when none answers, unless CONVO_REQUIRE_REDIS=1 (then fails)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as e:
        if os.environ.get("CONVO_REQUIRE_REDIS") == "1":
            pytest.fail(f"CONVO_REQUIRE_REDIS=1 but no Redis answers at {REDIS_URL}: {e}")
        pytest.skip(f"no Redis at {REDIS_URL} (run `make redis`)")
    return client


@pytest.fixture
def redis_url() -> str:
    """URL of a real Redis for queue tests; skips when none answers, unless CONVO_REQUIRE_REDIS=1."""
    client = require_redis()
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


# Lines for the tiny base's corpus: short chat messages incl. emoji and an escaped newline, so the tokenizer is a
# real byte-level BPE whose decode does not always round-trip piecewise.
_TINY_LINES = (
    "hey are we still going tonight?", "yeah! want to meet at 7?", "sounds perfect", "ok see you there",
    "lol that's so funny 😂", "what are you doing", "nothing much, you?", "omw", "running late sorry",
    "did you see the game?", "no I missed it", "haha same", "can you call me later", "sure, after 6",
    "love that 🙌", "brb", "multi\nline message", "i'm so tired today", "coffee tomorrow?", "yes please ☕",
)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny Llama base model dir (byte-level BPE tokenizer, 2 layers, hidden 32), built once in a few seconds."""
    import random

    from training.tiny_base import build_tiny_base, render_conversation

    rng = random.Random(0)
    texts = [
        render_conversation([(str(i % 2), rng.choice(_TINY_LINES)) for i in range(rng.randint(2, 8))], rng)
        for _ in range(300)
    ]
    out = tmp_path_factory.mktemp("tiny_base") / "model"
    with torch_threads(1):
        build_tiny_base(
            out, texts, vocab_size=400, hidden_size=32, num_layers=2, num_heads=2, max_steps=40, max_minutes=1.0,
            seed=0, seq_len=64, batch_size=8,
        )
    return out


def make_persona_adapters(tiny_base: Path, root: Path) -> Path:
    """Two personas with different random LoRA weights on `tiny_base`: alice (versioned, v1) and bob (unversioned)."""
    from inference.adapter_meta import base_model_ref
    from inference.adapters import random_adapter
    from inference.versions import set_current

    with torch_threads(1):
        ref = base_model_ref(tiny_base)
        random_adapter(tiny_base, root / "alice" / "v1", "Alice", seed=1, me="Riya", base_model=ref)
        set_current(root / "alice", "v1")
        random_adapter(tiny_base, root / "bob", "Bob", seed=2, me="Riya", base_model=ref)
    return root


@pytest.fixture(scope="module")
def adapters_dir(tiny_base, tmp_path_factory) -> Path:
    """Two personas with different random LoRA weights (alice versioned v1, bob unversioned), per test module."""
    return make_persona_adapters(tiny_base, tmp_path_factory.mktemp("adapters"))


@contextlib.contextmanager
def torch_threads(n: int):
    """Run torch ops on `n` threads inside the block. Tiny models on a shared 2-core machine run many times
    faster on one thread than on two competing with other processes (OpenMP oversubscription)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


POSTGRES_URL = os.environ.get("CONVO_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture
def postgres_url() -> str:
    """URL of a real PostgreSQL for store tests; skips when none answers, unless CONVO_REQUIRE_POSTGRES=1.

    Tests sharing it use a unique table prefix per test (parallel runs must not collide) and drop their tables.
    """
    import sqlalchemy as sa

    engine = sa.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
    except Exception as e:  # noqa: BLE001 - any failure to connect means "no server here"
        if os.environ.get("CONVO_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"CONVO_REQUIRE_POSTGRES=1 but no PostgreSQL answers at {POSTGRES_URL}: {e}")
        pytest.skip(f"no PostgreSQL at {POSTGRES_URL}: {str(e).splitlines()[0]}")
    finally:
        engine.dispose()
    return POSTGRES_URL


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    """A FeedbackStore (tests of the feedback store and its stats) on SQLite (WAL) or PostgreSQL, with tables under a prefix unique to this test."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/fb/feedback.db"
    else:
        url = request.getfixturevalue("postgres_url")
    import uuid

    from training.feedback.store import FeedbackStore

    s = FeedbackStore(url, table_prefix=f"t{uuid.uuid4().hex[:10]}_")
    s.create()
    yield s
    s.drop()
    s.close()
