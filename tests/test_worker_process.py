"""Real `convo serve worker` processes: SIGKILL mid-batch loses nothing, SIGTERM drains the batch in hand."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from inference.protocol import WORKERS_GROUP, GenerateRequest, GenerateResponse, Keys, entry_payload, utcnow
from tests.conftest import torch_threads
from tests.test_worker import model_worker, running, wait_until

pytestmark = pytest.mark.redis
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def adapters_root(tiny_base, tmp_path_factory):
    from inference.adapter_meta import base_model_ref
    from inference.adapters import random_adapter

    with torch_threads(1):
        root = tmp_path_factory.mktemp("proc_adapters")
        random_adapter(tiny_base, root / "alice", "Alice", seed=1, me="Riya", base_model=base_model_ref(tiny_base))
    return root


def start_worker(redis_url, prefix, tiny_base, root, name, log: Path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), CONVO_REDIS__URL=redis_url, CONVO_REDIS__PREFIX=prefix,
               CONVO_WORKER__METRICS_PORT="0", CONVO_WORKER__HEARTBEAT_INTERVAL_S="0.2",
               CONVO_WORKER__VISIBILITY_TIMEOUT_S="60")
    cmd = [sys.executable, "-m", "convo", "serve", "worker", "--base", str(tiny_base), "--adapters", str(root),
           "--name", name, "--max-batch", "4", "--max-wait-ms", "0", "--threads", "1", "--log-level", "info"]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)


def long_requests(n):
    # Greedy rows of the random tiny model write no newline, so each runs its full max_new_tokens: a slow batch.
    return [GenerateRequest.build(persona="alice", history=[{"speaker": "RIYA", "text": f"m{i}"}], temperature=0,
                                  max_new_tokens=256, deadline=utcnow() + timedelta(seconds=120)) for i in range(n)]


def pending_of(r, keys, consumer):
    try:
        return {c["name"].decode(): c["pending"] for c in r.xinfo_consumers(keys.requests, WORKERS_GROUP)}.get(
            consumer, 0)
    except Exception:  # noqa: BLE001 - no group yet
        return 0


def test_sigkill_mid_batch_then_a_second_worker_answers_everything_once(redis_url, tiny_base, adapters_root,
                                                                         tmp_path):
    import redis

    prefix = f"k{uuid.uuid4().hex[:6]}"
    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    proc = start_worker(redis_url, prefix, tiny_base, adapters_root, "A", tmp_path / "a.log")
    try:
        wait_until(lambda: r.exists(keys.heartbeat("A")) or proc.poll() is not None, 90, "worker A heartbeat")
        assert proc.poll() is None, (tmp_path / "a.log").read_text()
        requests = long_requests(12)
        for q in requests:
            r.xadd(keys.requests, entry_payload(q))
        wait_until(lambda: pending_of(r, keys, "A") > 0, 60, "worker A mid-batch")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert pending_of(r, keys, "A") > 0  # it died holding entries
    with torch_threads(1):
        worker, _ = model_worker(redis_url, tiny_base, adapters_root, prefix=prefix, name="B", max_batch=4,
                                visibility_timeout_s=0.3)
        with running(worker):
            wait_until(lambda: r.xpending(keys.requests, WORKERS_GROUP)["pending"] == 0
                       and r.xinfo_groups(keys.requests)[0]["lag"] == 0, 120, "every entry acked")
    for q in requests:
        assert r.llen(keys.reply(q.id)) == 1, q.id  # answered exactly once
        assert GenerateResponse.loads(r.lindex(keys.reply(q.id), 0)).ok
    assert r.xlen(keys.dead) == 0
    r.close()


def test_sigterm_finishes_and_acks_the_batch_in_hand(redis_url, tiny_base, adapters_root, tmp_path):
    import redis

    prefix = f"s{uuid.uuid4().hex[:6]}"
    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    log = tmp_path / "c.log"
    proc = start_worker(redis_url, prefix, tiny_base, adapters_root, "C", log)
    try:
        wait_until(lambda: r.exists(keys.heartbeat("C")) or proc.poll() is not None, 90, "worker C heartbeat")
        requests = long_requests(8)
        for q in requests:
            r.xadd(keys.requests, entry_payload(q))
        wait_until(lambda: pending_of(r, keys, "C") > 0, 60, "worker C mid-batch")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    answered = sum(r.llen(keys.reply(q.id)) for q in requests)
    lag = r.xinfo_groups(keys.requests)[0]["lag"]
    assert r.xpending(keys.requests, WORKERS_GROUP)["pending"] == 0  # the batch in hand was finished and acked
    assert answered >= 1 and answered + lag == len(requests)  # the rest waits, unread, for the next worker
    assert not r.exists(keys.heartbeat("C"))
    assert "finishing the batch in hand" in log.read_text()
    r.close()
