"""The worker loop against a real Redis: round trip, batching, answered once, expiry, dead letters, partials, reload."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from datetime import timedelta

import pytest

from config.settings import WorkerSettings
from inference.protocol import (
    WORKERS_GROUP,
    GenerateRequest,
    Keys,
    Partial,
    ReloadMessage,
    entry_payload,
    utcnow,
)
from tests.conftest import make_persona_adapters, torch_threads

pytestmark = pytest.mark.redis


def wait_until(predicate, timeout_s: float = 20.0, what: str = "condition"):
    """Poll `predicate` (cheap Redis/state reads) until true; fail after `timeout_s`."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)  # polling interval of a bounded wait on state, not synchronisation by itself
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def running(worker):
    """Run `worker.main()` in a thread for the block; stop it (as SIGTERM would) on exit and re-raise what the loop
    raised, failing when it did not stop."""
    from inference.worker import running_in_thread

    return running_in_thread(worker, ready_timeout_s=10, stop_timeout_s=30)


def make_worker(redis_url, backend, *, registry=None, prefix="t", **settings):
    import redis.asyncio as aioredis

    from inference.worker import Worker

    ws = WorkerSettings(metrics_port=0, heartbeat_interval_s=0.2, watch_interval_s=0, **settings)
    return Worker(aioredis.from_url(redis_url), Keys(prefix), backend, ws, registry=registry, base="tiny",
                  name=settings.get("name"))


def ask(redis_url, request, prefix="t", timeout_s=20.0):
    """One request through the real WorkerClient (a fresh connection and loop)."""
    import redis.asyncio as aioredis

    from inference.client import WorkerClient

    async def run():
        r = aioredis.from_url(redis_url)
        try:
            return await WorkerClient(r, Keys(prefix)).generate(request, timeout_s)
        finally:
            await r.aclose()

    return asyncio.run(run())


def ask_many(redis_url, requests, prefix="t", timeout_s=30.0):
    """Several requests at once (concurrent clients on one connection pool)."""
    import redis.asyncio as aioredis

    from inference.client import WorkerClient

    async def run():
        r = aioredis.from_url(redis_url)
        try:
            client = WorkerClient(r, Keys(prefix))
            return await asyncio.gather(*(client.generate(q, timeout_s) for q in requests))
        finally:
            await r.aclose()

    return asyncio.run(run())


def status_of(redis_url, keys):
    """`read_status` (what `convo serve status` prints) on a fresh connection and loop."""
    import redis.asyncio as aioredis

    from inference.worker import read_status

    async def run():
        r = aioredis.from_url(redis_url)
        try:
            return await read_status(r, keys)
        finally:
            await r.aclose()

    return asyncio.run(run())


class CountingEcho:
    """EchoBackend that counts generate calls and the batch sizes it saw."""

    def __init__(self, delay_s=0.0):
        from inference.batching import EchoBackend

        self.inner = EchoBackend(delay_s)
        self.batches: list[int] = []

    def generate(self, items, on_partial=None):
        self.batches.append(len(items))
        return self.inner.generate(items, on_partial)


def req(text="you coming?", **fields):
    fields.setdefault("persona", "alice")
    return GenerateRequest.build(history=[{"speaker": "RIYA", "text": text}], **fields)


@pytest.fixture
def sync_redis(redis_url):
    import redis

    r = redis.Redis.from_url(redis_url)
    yield r
    r.close()


# ---------------------------------------------------------------- queue behaviour (no model)


def test_round_trip_and_batching_with_echo(redis_url, sync_redis):
    import socket
    import urllib.request

    backend = CountingEcho(delay_s=0.2)
    with socket.socket() as sock:  # a free port for /metrics
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    worker = make_worker(redis_url, backend, max_batch=8, max_wait_ms=300)
    worker.settings = worker.settings.model_copy(update={"metrics_port": port})
    with running(worker):
        responses = ask_many(redis_url, [req(f"msg {i}") for i in range(6)])
        ask(redis_url, req(deadline=utcnow() - timedelta(seconds=1)))

        def scrape() -> str:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()

        # The worker counts a request just after writing its reply, so the client can be a step ahead.
        wait_until(lambda: 'convo_worker_errors_total{code="expired"} 1.0' in scrape(), what="expired counted")
        metrics = scrape()
    assert "convo_worker_batch_size_count" in metrics and "convo_worker_generate_seconds_bucket" in metrics
    assert 'convo_worker_errors_total{code="expired"} 1.0' in metrics
    assert 'convo_worker_requests_total{outcome="ok"} 6.0' in metrics
    for name in ("queue_depth", "pending", "tokens_per_second", "adapters_loaded", "queue_wait_seconds_count"):
        assert f"convo_worker_{name}" in metrics
    assert [r.candidates for r in responses] == [[[f"msg {i}"]] for i in range(6)]
    assert all(r.ok and r.queue_ms is not None and r.worker for r in responses)
    assert max(backend.batches) > 1  # requests arriving together share one generate
    assert sum(backend.batches) == 6
    assert not sync_redis.exists("t:worker:" + responses[0].worker)  # heartbeat removed on stop


def test_two_workers_share_the_load(redis_url):
    first, second = CountingEcho(delay_s=0.1), CountingEcho(delay_s=0.1)
    with running(make_worker(redis_url, first, name="w1", max_batch=2, max_wait_ms=0)), \
            running(make_worker(redis_url, second, name="w2", max_batch=2, max_wait_ms=0)):
        responses = ask_many(redis_url, [req(f"m{i}") for i in range(12)])
    assert all(r.ok for r in responses)
    assert {r.worker for r in responses} == {"w1", "w2"}
    assert sum(first.batches) + sum(second.batches) == 12


def test_duplicate_delivery_gives_one_reply(redis_url, sync_redis):
    backend = CountingEcho()
    request = req(deadline=utcnow() + timedelta(seconds=30))
    keys = Keys("t")
    worker = make_worker(redis_url, backend, max_batch=1)
    sync_redis.xgroup_create(keys.requests, WORKERS_GROUP, id="0", mkstream=True)
    for _ in range(2):  # the same request on the stream twice (e.g. a client retry)
        sync_redis.xadd(keys.requests, entry_payload(request))
    with running(worker):
        wait_until(lambda: sync_redis.xpending(keys.requests, WORKERS_GROUP)["pending"] == 0
                   and sync_redis.xinfo_groups(keys.requests)[0]["lag"] == 0, what="both entries acked")
    assert sync_redis.llen(keys.reply(request.id)) == 1
    assert sum(backend.batches) == 1  # the duplicate was not even generated


def test_expired_deadline_is_answered_without_generating(redis_url):
    backend = CountingEcho()
    with running(make_worker(redis_url, backend)):
        response = ask(redis_url, req(deadline=utcnow() - timedelta(seconds=1)))
    assert response.error.code == "expired"
    assert backend.batches == []


def test_malformed_entries_go_to_dead_letters_and_the_worker_keeps_serving(redis_url, sync_redis):
    keys = Keys("t")
    with running(make_worker(redis_url, CountingEcho())):
        sync_redis.xadd(keys.requests, {"data": "{not json"})
        sync_redis.xadd(keys.requests, {"other": "field"})
        bad = {"v": 1, "id": "bad1", "persona": "alice", "n": 99}
        sync_redis.xadd(keys.requests, {"data": json.dumps(bad)})
        response = ask(redis_url, req("still there?"))
        got = sync_redis.blpop([keys.reply("bad1")], timeout=10)
    assert response.ok and response.candidates == [["still there?"]]
    dead = sync_redis.xrange(keys.dead)
    assert len(dead) == 3
    assert b"GenerateRequest.n" in dead[2][1][b"reason"]
    from inference.protocol import GenerateResponse

    bad_response = GenerateResponse.loads(got[1])  # a salvageable id still hears back
    assert bad_response.error.code == "invalid" and "GenerateRequest.n" in bad_response.error.message


def test_too_many_deliveries_dead_letters_with_error(redis_url, sync_redis):
    keys = Keys("t")
    request = req(deadline=utcnow() + timedelta(seconds=30))
    sync_redis.xgroup_create(keys.requests, WORKERS_GROUP, id="0", mkstream=True)
    sync_redis.xadd(keys.requests, entry_payload(request))
    sync_redis.xreadgroup(WORKERS_GROUP, "ghost", {keys.requests: ">"}, count=1)  # a worker that then died
    backend = CountingEcho()
    with running(make_worker(redis_url, backend, max_deliveries=1, visibility_timeout_s=0.05)):
        got = sync_redis.blpop([keys.reply(request.id)], timeout=10)
    from inference.protocol import GenerateResponse

    assert GenerateResponse.loads(got[1]).error.code == "dead_letter"
    assert sync_redis.xlen(keys.dead) == 1 and backend.batches == []
    assert sync_redis.xpending(keys.requests, WORKERS_GROUP)["pending"] == 0


def test_stale_entries_of_a_dead_worker_are_taken_over(redis_url, sync_redis):
    keys = Keys("t")
    request = req("left behind", deadline=utcnow() + timedelta(seconds=30))
    sync_redis.xgroup_create(keys.requests, WORKERS_GROUP, id="0", mkstream=True)
    sync_redis.xadd(keys.requests, entry_payload(request))
    sync_redis.xreadgroup(WORKERS_GROUP, "ghost", {keys.requests: ">"}, count=1)
    with running(make_worker(redis_url, CountingEcho(), visibility_timeout_s=0.05)):
        got = sync_redis.blpop([keys.reply(request.id)], timeout=10)
    from inference.protocol import GenerateResponse

    assert GenerateResponse.loads(got[1]).candidates == [["left behind"]]


def test_redis_unreachable_is_retried_not_fatal(caplog):
    import redis.asyncio as aioredis

    from inference.worker import Worker

    worker = Worker(aioredis.from_url("redis://127.0.0.1:1/0"), Keys("t"), CountingEcho(),
                    WorkerSettings(metrics_port=0), name="lonely")
    def retries() -> int:
        return sum("redis unreachable" in r.message for r in caplog.records)

    with caplog.at_level(logging.WARNING, logger="convo.worker"), running(worker):
        wait_until(lambda: retries() >= 2, 15, "two retries logged")
    # running() re-raises anything the loop raised and fails when it did not stop when asked
    assert retries() >= 2 and worker.stopping.is_set()
    assert worker.answered == 0  # nothing was served, and nothing crashed


def test_status_reports_workers_and_queue(redis_url, sync_redis):
    keys = Keys("t")
    with running(make_worker(redis_url, CountingEcho(), name="w1")):
        wait_until(lambda: sync_redis.exists(keys.heartbeat("w1")), what="heartbeat")
        sync_redis.xadd(keys.dead, {"data": "x", "reason": "test"})
        status = status_of(redis_url, keys)
    assert [w["worker"] for w in status["workers"]] == ["w1"]
    assert status["dead"] == 1 and status["pending"] == 0


# ---------------------------------------------------------------- with the tiny model and real adapters


@pytest.fixture(scope="module")
def adapters_root(tiny_base, tmp_path_factory):
    """alice (versioned, v1), bob (unversioned) and carol (trained on another base: skipped)."""
    from inference.adapter_meta import BaseModelRef
    from inference.adapters import random_adapter

    root = make_persona_adapters(tiny_base, tmp_path_factory.mktemp("served"))
    with torch_threads(1):
        other = BaseModelRef(id="/elsewhere/model", local_path_sha256="0" * 64)
        random_adapter(tiny_base, root / "carol", "Carol", seed=3, base_model=other)
    return root


def model_worker(redis_url, tiny_base, root, **settings):
    """A worker on the tiny base with the decode loop and a registry over `root`."""
    from tests.test_worker_batching import make_backend

    backend = make_backend(tiny_base, root)
    backend.registry.max_loaded = settings.pop("max_loaded", 4)
    return make_worker(redis_url, backend, registry=backend.registry, **settings), backend


def test_model_round_trip_mixed_batch_and_errors(redis_url, tiny_base, adapters_root):
    from inference.batching import BatchItem, build_prompt

    greedy = dict(temperature=0, max_new_tokens=16)
    requests = [req("omw", persona="alice", **greedy), req("omw", persona="bob", **greedy),
                req("omw", persona="__base__", **greedy), req("omw", persona="carol"), req("omw", persona="dave"),
                req("omw", persona="bob", mode="self", **greedy)]
    with torch_threads(1):
        worker, backend = model_worker(redis_url, tiny_base, adapters_root, max_batch=8, max_wait_ms=500)
        with running(worker):
            responses = ask_many(redis_url, requests)
        alice, bob, base, carol, dave, bob_self = responses
        assert alice.adapter.persona == "alice" and alice.adapter.version == "v1"
        assert bob.adapter.version is None
        assert carol.error.code == "unknown_persona" and "different base" in carol.error.message
        assert dave.error.code == "unknown_persona"
        assert worker.metrics.batch_size._sum.get() == 4  # the four servable requests were read and submitted together
        # Each row got its own adapter's output, equal to the request run alone.
        for request, response in ((requests[0], alice), (requests[1], bob), (requests[5], bob_self)):
            loaded = worker.registry.current[request.persona]
            prompt, target = build_prompt(request, loaded.info.meta)
            alone = backend.generate([BatchItem(request, prompt, target, loaded.name)])[0]
            assert response.candidates == alone.candidates
        assert len({repr(r.candidates) for r in (alice, bob, base)}) == 3


def test_stream_partials_are_prefixes_of_the_final_text(redis_url, tiny_base, adapters_root):
    import redis.asyncio as aioredis

    from inference.client import WorkerClient

    request = req("hey", persona="alice", temperature=1.0, max_new_tokens=64)

    async def run():
        r = aioredis.from_url(redis_url)
        try:
            return [item async for item in WorkerClient(r, Keys("t")).stream(request, 30)]
        finally:
            await r.aclose()

    with torch_threads(1):
        worker, _ = model_worker(redis_url, tiny_base, adapters_root)
        with running(worker):
            items = asyncio.run(run())
    partials, final = [i for i in items if isinstance(i, Partial)], items[-1]
    assert final.ok and partials and partials[-1].done
    text = "\n".join(final.candidates[0])
    assert partials[-1].text == text
    assert all(text.startswith(p.text) for p in partials)
    assert [p.seq for p in partials] == sorted(p.seq for p in partials)


def test_hot_reload_under_load(redis_url, tiny_base, adapters_root, tmp_path, sync_redis):
    import shutil

    from inference.adapter_meta import read_adapter_meta
    from inference.adapters import random_adapter
    from inference.versions import set_current

    root = tmp_path / "adapters"
    shutil.copytree(adapters_root / "alice" / "v1", root / "alice" / "v1")
    set_current(root / "alice", "v1")
    greedy = dict(persona="alice", temperature=0, max_new_tokens=12)
    keys = Keys("t")
    with torch_threads(1):
        worker, _ = model_worker(redis_url, tiny_base, root, max_batch=4)
        with running(worker):
            before = ask(redis_url, req("omw", **greedy))
            results: list = []
            groups: list[list[str]] = []  # versions per group of 3 requests sent together
            load_done = threading.Event()

            def load():  # a steady stream of requests while the new version arrives
                while not load_done.is_set() or len(results) < 8:
                    group = ask_many(redis_url, [req("omw", **greedy) for _ in range(3)])
                    groups.append([r.adapter.version if r.adapter else None for r in group])
                    results.extend(group)

            loader = threading.Thread(target=load)
            loader.start()
            wait_until(lambda: len(results) >= 3, what="load running")
            ref = read_adapter_meta(root / "alice" / "v1").base_model
            random_adapter(tiny_base, root / "alice" / "v2", "Alice", seed=7, me="Riya", base_model=ref)
            set_current(root / "alice", "v2")
            sync_redis.publish(keys.reload, ReloadMessage(persona="alice").dumps())
            wait_until(lambda: any(r.adapter and r.adapter.version == "v2" for r in results), what="v2 answers")
            load_done.set()
            loader.join(60)
            after = ask(redis_url, req("omw", **greedy))
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    versions = [r.adapter.version for r in results]
    assert versions[0] == "v1" and "v2" in groups[-1]
    # Switched once and never back: requests sent together may straddle the switch, every later group is all v2.
    first = next(i for i, g in enumerate(groups) if "v2" in g)
    assert all(g == ["v2"] * 3 for g in groups[first + 1 :]), groups
    assert after.adapter.version == "v2" and after.candidates != before.candidates
    assert worker.registry.loaded_names == ["alice@v2"]  # the old version was dropped


def test_metrics_port_in_use_is_one_clear_error(redis_url):
    import socket

    from errors import ConfigError

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        worker = make_worker(redis_url, CountingEcho())
        worker.settings = worker.settings.model_copy(update={"metrics_port": sock.getsockname()[1]})
        with pytest.raises(ConfigError, match="pick another with --metrics-port"):
            asyncio.run(worker.main())


def test_short_request_is_not_held_behind_long_ones(redis_url, tiny_base, adapters_root, sync_redis):
    """Continuous batching through the real worker loop: a short request arriving mid-generation is answered first."""
    keys = Keys("t")
    long_requests = [req(f"long {i}", persona=p, temperature=0, max_new_tokens=200)
                     for i, p in enumerate(("alice", "bob", "__base__"))]
    with torch_threads(1):
        worker, backend = model_worker(redis_url, tiny_base, adapters_root, max_batch=8)
        backend.newline_ids, backend.eos_ids = frozenset(), frozenset()  # no stops: long rows run 200 tokens
        with running(worker):
            longs: list = []
            thread = threading.Thread(target=lambda: longs.extend(ask_many(redis_url, long_requests, timeout_s=120)))
            thread.start()
            wait_until(lambda: backend.stats()["rows_active"] == 3, what="three long rows generating")
            short = ask(redis_url, req("short", persona="bob", temperature=0, max_new_tokens=4))
            still_running = [not sync_redis.exists(keys.answered(q.id)) for q in long_requests]
            beat = json.loads(sync_redis.get(keys.heartbeat(worker.name)))
            thread.join(120)
            shown = status_of(redis_url, keys)["workers"][0]
    assert short.ok and all(still_running), still_running
    assert len(longs) == 3 and all(r.ok for r in longs)
    assert short.generate_ms < min(r.generate_ms for r in longs)
    assert beat["rows_capacity"] == backend.max_rows and shown["tokens_per_s"] >= 0
    assert "in_flight" in beat and "rows_active" in shown
