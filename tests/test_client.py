"""WorkerClient and `convo ask` against a real Redis and an in-process worker (echo backend: no model)."""

from __future__ import annotations

import asyncio

import pytest

from errors import ProtocolError
from inference.protocol import GenerateRequest, GenerateResponse, Keys, Partial
from tests.test_worker import CountingEcho, make_worker, running


class Failing:
    def generate(self, items, on_partial=None):
        raise RuntimeError("device lost")


@pytest.mark.parametrize(
    ("fields", "field"),
    [({"n": 9}, "n"), ({"max_new_tokens": 257}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
     ({"history": [{"speaker": "RIYA", "text": "x" * 4001}]}, "history.0.text"),
     ({"history": [{"speaker": "", "text": "hi"}]}, "history.0.speaker")],
)
def test_bounds_are_rejected_before_sending_with_the_field_named(fields, field):
    with pytest.raises(ProtocolError, match=rf"GenerateRequest\.{field}:"):
        GenerateRequest.build(persona="alice", **fields)


def test_ask_cli_rejects_bad_input_with_one_line(cli, capsys):
    assert cli(["ask", "--persona", "a b", "[RIYA] hi"]) == 2
    err = capsys.readouterr().err
    assert "GenerateRequest.persona" in err and "Traceback" not in err
    assert cli(["ask", "--persona", "alice", "--n", "9", "[RIYA] hi"]) == 2
    assert cli(["ask", "--persona", "alice", "--mode", "both", "[RIYA] hi"]) == 2
    assert "--mode both" in capsys.readouterr().err


@pytest.mark.redis
def test_client_times_out_without_a_worker(redis_url):
    import redis.asyncio as aioredis

    from inference.client import WorkerClient, WorkerTimeout

    async def run():
        r = aioredis.from_url(redis_url)
        try:
            await WorkerClient(r, Keys("t")).generate(GenerateRequest.build(persona="alice"), timeout_s=0.2)
        finally:
            await r.aclose()

    with pytest.raises(WorkerTimeout, match="no worker answered"):
        asyncio.run(run())


@pytest.mark.redis
def test_client_stream_yields_partials_then_the_response(redis_url):
    import redis.asyncio as aioredis

    from inference.client import WorkerClient

    request = GenerateRequest.build(persona="alice", history=[{"speaker": "RIYA", "text": "hello there"}])

    async def run():
        r = aioredis.from_url(redis_url)
        try:
            return [item async for item in WorkerClient(r, Keys("t")).stream(request, 10)]
        finally:
            await r.aclose()

    with running(make_worker(redis_url, CountingEcho())):
        items = asyncio.run(run())
    partials, final = items[:-1], items[-1]
    assert isinstance(final, GenerateResponse) and final.candidates[0] == ["hello there"]
    assert partials and all(isinstance(p, Partial) for p in partials)
    assert partials[0].text == "hello"  # the echo backend's half-way partial
    # The done partial comes before the reply; a client that finds the reply first stops there.
    assert all("hello there".startswith(p.text) for p in partials)


@pytest.mark.redis
def test_ask_cli_round_trip_stream_and_errors(redis_url, cli, capsys, monkeypatch):
    monkeypatch.setenv("CONVO_REDIS__URL", redis_url)
    monkeypatch.setenv("CONVO_REDIS__PREFIX", "t")
    with running(make_worker(redis_url, CountingEcho())):
        assert cli(["ask", "--persona", "alice", "--n", "2", "[RIYA] you coming?\nsure"]) == 0
        out = capsys.readouterr().out
        assert "1. sure" in out and "2. sure" in out  # the echo of the last line (untagged: the owner's)
        assert cli(["ask", "--persona", "alice", "--stream", "[RIYA] you coming?"]) == 0
        out = capsys.readouterr().out
        assert "… you c" in out and "1. you coming?" in out
        assert cli(["ask", "--persona", "alice", "--json", "[RIYA] hi"]) == 0
        assert GenerateResponse.loads(capsys.readouterr().out.strip()).candidates[0] == ["hi"]
    with running(make_worker(redis_url, Failing())):
        assert cli(["ask", "--persona", "alice", "[RIYA] hi"]) == 2
        assert "worker error internal" in capsys.readouterr().err
    assert cli(["ask", "--persona", "alice", "--timeout-s", "0.2", "[RIYA] hi"]) == 2
    assert "no worker answered" in capsys.readouterr().err


@pytest.mark.redis
def test_serve_status_cli(redis_url, cli, capsys, monkeypatch):
    monkeypatch.setenv("CONVO_REDIS__URL", redis_url)
    monkeypatch.setenv("CONVO_REDIS__PREFIX", "t")
    assert cli(["serve", "status"]) == 0
    assert "queue depth 0  pending 0  dead letters 0" in capsys.readouterr().out
    monkeypatch.setenv("CONVO_REDIS__URL", "redis://127.0.0.1:1/0")
    assert cli(["serve", "status"]) == 2
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in capsys.readouterr().err


@pytest.mark.redis
def test_wait_outlasts_the_socket_timeout(redis_url):
    """A reply that takes longer than the Redis client's socket timeout is still received (BLPOP in slices)."""
    import asyncio

    import redis.asyncio as aioredis

    from inference.client import WorkerClient
    from inference.protocol import GenerateRequest, GenerateResponse, Keys

    async def scenario():
        r = aioredis.from_url(redis_url, socket_timeout=0.5)
        client = WorkerClient(r, Keys("slow"))
        request = GenerateRequest.build(persona="alice")

        async def answer_late():
            # The reply appears only after the client has blocked past its socket timeout more than once.
            for _ in range(3):
                await r.blpop(["slow:never"], timeout=0.3)
            await r.lpush(client.keys.reply(request.id), GenerateResponse(id=request.id, candidates=[["hi"]]).dumps())

        late = asyncio.create_task(answer_late())
        try:
            return await client.wait(request, timeout_s=10)
        finally:
            await late
            await r.aclose()

    assert asyncio.run(scenario()).candidates == [["hi"]]


@pytest.mark.redis
def test_serve_status_reads_heartbeats_of_older_and_newer_workers(redis_url, cli, capsys, monkeypatch):
    """A rolling upgrade: one worker's heartbeat lacks the prompt token counts, another's carries a field this
    version does not know. Both are listed; neither is dropped nor breaks the table."""
    import json

    import redis

    from convo.commands.worker import prompt_tokens
    from inference.protocol import Heartbeat, Keys, utcnow

    keys = Keys("t")
    r = redis.Redis.from_url(redis_url)
    base = {"pid": 1, "base": "tiny", "started_at": utcnow().isoformat()}
    r.set(keys.heartbeat("old"), json.dumps({"worker": "old", **base}), px=60_000)
    r.set(keys.heartbeat("new"), json.dumps({"worker": "new", **base, "prompt_tokens_run": 300,
                                             "prompt_tokens_cached": 900, "kv_pages_free": 7}), px=60_000)
    r.close()
    assert Heartbeat.loads(json.dumps({"worker": "x", **base, "kv_pages_free": 7})).worker == "x"
    monkeypatch.setenv("CONVO_REDIS__URL", redis_url)
    monkeypatch.setenv("CONVO_REDIS__PREFIX", "t")
    assert cli(["serve", "status", "--json"]) == 0
    workers = {w["worker"]: w for w in json.loads(capsys.readouterr().out)["workers"]}
    assert set(workers) == {"old", "new"}
    assert (workers["old"]["prompt_tokens_run"], workers["old"]["prompt_tokens_cached"]) == (0, 0)
    assert (workers["new"]["prompt_tokens_run"], workers["new"]["prompt_tokens_cached"]) == (300, 900)
    assert "kv_pages_free" not in workers["new"]
    assert cli(["serve", "status"]) == 0
    assert "workers (2 alive)" in capsys.readouterr().out
    assert prompt_tokens(300, 900) == "300 / 900 (75% cached)" and prompt_tokens(0, 0) == "-"
