"""`convo serve api` with the official `openai` client against a running server and a real worker on the tiny base."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from inference.protocol import FeedbackEvent, GenerateRequest, Heartbeat, Keys, entry_data, utcnow
from tests.conftest import REDIS_URL, make_persona_adapters, require_redis, torch_threads
from tests.test_worker import model_worker, running, wait_until

pytestmark = pytest.mark.redis
ROOT = Path(__file__).resolve().parent.parent
KEY, OTHER_KEY = "test-key-0123456789", "other-key-9876543210"
HISTORY = [{"speaker": "RIYA", "text": "omw"}, {"speaker": "ALICE", "text": "ok see you there"},
           {"speaker": "RIYA", "text": "running late sorry"}]
MESSAGES = [{"role": "system", "content": "You are Alice."}, {"role": "user", "content": "omw"},
            {"role": "assistant", "content": "ok see you there"}, {"role": "user", "content": "running late sorry"}]


def api_settings(redis_url, prefix, adapters, **api):
    from config.settings import Settings

    api = {"keys": [KEY, OTHER_KEY], "adapters_dir": str(adapters), "request_timeout_s": 30,
           "rate_limit_per_min": 10_000, "metrics_port": 0, **api}
    return Settings(redis={"url": redis_url, "prefix": prefix}, api=api, worker={"heartbeat_ttl_s": 2.0})


@contextlib.contextmanager
def serving(settings):
    """`convo serve api`'s app under uvicorn in a thread, on a free loopback port; yields (base url, service)."""
    import uvicorn

    from bot.openai_api import ApiConfig, build_app

    app = build_app(ApiConfig.from_settings(settings))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), 20, "uvicorn start")
        assert thread.is_alive()
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app.state.service
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


def openai_client(base, key=KEY, timeout_s=60.0):
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=timeout_s)


@pytest.fixture(scope="module")
def stack(tiny_base, tmp_path_factory):
    """One Redis prefix, alice (v1) and bob adapters, a PEFT worker on the tiny base and the API server."""
    client = require_redis()
    prefix = f"api{uuid.uuid4().hex[:6]}"
    root = make_persona_adapters(tiny_base, tmp_path_factory.mktemp("api_adapters"))
    redis_url = REDIS_URL
    with torch_threads(1):
        worker, backend = model_worker(redis_url, tiny_base, root, prefix=prefix, name="api-w", max_batch=8,
                                      max_wait_ms=0)
        with running(worker):
            wait_until(lambda: client.exists(Keys(prefix).heartbeat("api-w")), 30, "worker heartbeat")
            with serving(api_settings(redis_url, prefix, root)) as (base, service):
                yield {"base": base, "service": service, "redis_url": redis_url, "prefix": prefix, "root": root,
                       "redis": client, "backend": backend}
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.delete(key)
    client.close()


def direct(stack, **fields):
    """The same request straight through WorkerClient (what `convo ask` does): the reference answer."""
    import redis.asyncio as aioredis

    from inference.client import WorkerClient

    async def run():
        r = aioredis.from_url(stack["redis_url"])
        try:
            return await WorkerClient(r, Keys(stack["prefix"])).generate(GenerateRequest.build(**fields), 30)
        finally:
            await r.aclose()

    return asyncio.run(run())


# ---------------------------------------------------------------- models, chat, completions


def test_models_lists_each_persona_with_its_current_version(stack):
    models = {m.id: m for m in openai_client(stack["base"]).models.list()}
    assert set(models) == {"alice", "bob"}
    assert models["alice"].model_extra["convo"] == {"version": "v1"}
    assert models["bob"].model_extra["convo"] == {"version": None}
    assert openai_client(stack["base"]).models.retrieve("alice@v1").id == "alice@v1"


def test_chat_answers_what_the_worker_answers_a_direct_request(stack):
    reply = openai_client(stack["base"]).chat.completions.create(
        model="alice@v1", messages=MESSAGES, temperature=0, max_tokens=12, n=2)
    want = direct(stack, persona="alice", history=HISTORY, temperature=0, max_new_tokens=12, n=2)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion" and reply.model == "alice@v1"
    assert [c.message.content for c in reply.choices] == ["\n".join(c) for c in want.candidates]
    assert [c.model_extra["convo"]["messages"] for c in reply.choices] == want.candidates
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == want.prompt_tokens > 0
    assert reply.usage.completion_tokens == want.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model_extra["convo"]["persona"] == "alice" and reply.model_extra["convo"]["version"] == "v1"
    # `stop` cuts the text before the first stop string, in content and in convo.messages alike.
    content = reply.choices[0].message.content
    assert len(content) >= 2
    stop = content[len(content) // 2:][:3]
    cut = openai_client(stack["base"]).chat.completions.create(
        model="alice", messages=MESSAGES, temperature=0, max_tokens=12, stop=[stop, "\u2603never"])
    assert cut.choices[0].message.content == content[: content.index(stop)]
    assert "\n".join(cut.choices[0].model_extra["convo"]["messages"]) == content[: content.index(stop)].rstrip("\n")


WORDS = ["apple", "bridge", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island", "jungle",
         "kettle", "lemon", "marble", "needle", "orbit", "pepper", "quartz", "river", "saddle", "tunnel", "velvet",
         "walnut", "yogurt", "zebra", "anchor", "button", "cactus", "denim", "eagle", "feather", "glacier", "hammock"]


def test_multi_turn_chat_past_the_window_hits_the_prefix_cache(stack):
    """A chat longer than dataset.context_messages (16), one turn at a time as a frontend sends it: with the window
    moving in blocks (bot.context_cut_messages = 8) the turns inside a block reuse the previous prompt's keys/values;
    sliding one message at a time (cut 1) they do not. The heartbeat counts both."""
    from dataclasses import replace

    service, backend = stack["service"], stack["backend"]
    client = openai_client(stack["base"])
    bot = service.config.bot
    assert (bot.context_messages, bot.context_cut_messages) == (16, 8)  # the defaults
    shares = {}
    try:
        for cut in (8, 1):
            service.config.bot = replace(bot, context_cut_messages=cut)
            for loaded in backend.registry.current.values():  # each configuration starts from an empty cache
                backend.prefix_cache.drop(loaded.name)
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{WORDS[i]} {i}"}
                        for i in range(18)]
            run = cached = 0
            for turn in range(4):  # 18, 20, 22, 24 messages: one block when cut is 8
                before = (backend.prefill_tokens, backend.prefill_tokens_saved)
                reply = client.chat.completions.create(model="bob", messages=messages, temperature=0, max_tokens=4)
                if turn:  # the first turn fills the cache
                    run += backend.prefill_tokens - before[0]
                    cached += backend.prefill_tokens_saved - before[1]
                n = len(messages)
                messages += [{"role": "user", "content": f"{WORDS[n]} {n}"},
                             {"role": "assistant", "content": f"{WORDS[n + 1]} {n + 1}"}]
                assert reply.choices
            shares[cut] = cached / (run + cached)
    finally:
        service.config.bot = bot
    assert shares[8] > 0.5, shares  # most of each prompt came from the cache
    assert shares[1] < 0.2, shares  # sliding: the first message changes every turn

    def counts():
        beat = Heartbeat.loads(stack["redis"].get(Keys(stack["prefix"]).heartbeat("api-w")))
        return beat.prompt_tokens_run, beat.prompt_tokens_cached

    # The worker's heartbeat (every 0.2 s here) catches up with the backend's counters; cached > 0 came from above.
    want = (backend.prefill_tokens, backend.prefill_tokens_saved)
    assert wait_until(lambda: counts() == want, 10, "heartbeat with the backend's prompt token counts")
    assert want[1] > 0


def test_chat_stream_is_built_from_partials_and_ends_with_done(stack):
    import httpx

    client = openai_client(stack["base"])
    plain = client.chat.completions.create(model="bob", messages=MESSAGES, temperature=0, max_tokens=16)
    chunks = list(client.chat.completions.create(model="bob", messages=MESSAGES, temperature=0, max_tokens=16,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # live partials, not one blob
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "stop"
    assert finish[0].choices[0].model_extra["convo"]["messages"] == plain.choices[0].model_extra["convo"]["messages"]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1
    raw = httpx.post(f"{stack['base']}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": "bob", "messages": MESSAGES, "stream": True, "max_tokens": 8}, timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    # n > 1: the worker streams choice 0 live; the others arrive whole, each with its own finish chunk.
    two = list(client.chat.completions.create(model="bob", messages=MESSAGES, temperature=0, max_tokens=16, n=2,
                                              stream=True))
    for index in (0, 1):
        text = "".join(c.choices[0].delta.content or "" for c in two if c.choices and c.choices[0].index == index)
        assert text == plain.choices[0].message.content  # greedy: both choices are the same text
        assert sum(1 for c in two if c.choices and c.choices[0].index == index and c.choices[0].finish_reason) == 1


def test_client_gone_mid_stream_releases_its_subscription(stack, caplog):
    import httpx

    body = {"model": "alice", "messages": MESSAGES, "stream": True, "max_tokens": 64, "temperature": 0}
    with httpx.stream("POST", f"{stack['base']}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        first = next(r.iter_lines())
    assert first.startswith("data: ")
    completion_id = json.loads(first.removeprefix("data: "))["id"].removeprefix("chatcmpl-")
    channel = Keys(stack["prefix"]).partial(completion_id)
    wait_until(lambda: stack["redis"].pubsub_numsub(channel)[0][1] == 0, 30, "the partial channel released")
    reply = openai_client(stack["base"]).chat.completions.create(model="alice", messages=MESSAGES, max_tokens=4)
    assert reply.choices and "Traceback" not in caplog.text


def test_completions_take_a_raw_tagged_prompt(stack):
    from bot.openai_wire import raw_completion

    client = openai_client(stack["base"])
    prompt = "[RIYA] omw\n[ALICE] ok see you there\n[RIYA] running late sorry\n[ALICE]"
    reply = client.completions.create(model="alice", prompt=prompt, temperature=0, max_tokens=12)
    want = direct(stack, persona="alice", history=HISTORY, temperature=0, max_new_tokens=12)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.choices[0].text == raw_completion(want.candidates[0], "ALICE")
    assert reply.usage.completion_tokens == want.completion_tokens
    # Ending with the owner's tag drafts the owner's next message (self mode).
    mine = client.completions.create(model="alice", prompt="[ALICE] you coming?\n[RIYA]", temperature=0,
                                     max_tokens=8)
    want = direct(stack, persona="alice", mode="self", history=[{"speaker": "ALICE", "text": "you coming?"}],
                  temperature=0, max_new_tokens=8)
    assert mine.choices[0].text == raw_completion(want.candidates[0], "RIYA")
    streamed = client.completions.create(model="alice", prompt=prompt, temperature=0, max_tokens=12, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == reply.choices[0].text


def test_concurrent_requests_each_get_their_own_answer(stack):
    """Sixteen clients at once (batched together by the worker): every answer is its own request's."""
    from openai import AsyncOpenAI

    texts = ["omw", "running late sorry", "coffee tomorrow?", "did you see the game?"] * 4
    personas = ["alice", "bob"] * 8

    async def run():
        client = AsyncOpenAI(base_url=f"{stack['base']}/v1", api_key=KEY, max_retries=0, timeout=60)
        try:
            return await asyncio.gather(*(client.chat.completions.create(
                model=p, messages=[{"role": "user", "content": t}], temperature=0, max_tokens=8)
                for p, t in zip(personas, texts, strict=True)))
        finally:
            await client.close()

    replies = asyncio.run(run())
    assert len({r.id for r in replies}) == 16
    for persona, text, reply in zip(personas, texts, replies, strict=True):
        want = direct(stack, persona=persona, history=[{"speaker": "RIYA", "text": text}], temperature=0,
                      max_new_tokens=8)
        assert reply.choices[0].message.content == "\n".join(want.candidates[0]), (persona, text)
        assert reply.model_extra["convo"]["persona"] == persona


# ---------------------------------------------------------------- errors


def test_bad_key_is_401_in_openai_shape_and_never_logged(stack, caplog):
    import openai

    caplog.set_level(logging.DEBUG)
    for key in ("wrong-key", KEY[:-1]):
        with pytest.raises(openai.AuthenticationError) as e:
            openai_client(stack["base"], key=key).models.list()
        assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
        assert e.value.body["type"] == "invalid_request_error"
    openai_client(stack["base"]).chat.completions.create(model="alice", messages=MESSAGES, max_tokens=4)
    assert KEY not in caplog.text and "wrong-key" not in caplog.text


def test_unknown_model_and_stale_pin_are_404(stack):
    import openai

    client = openai_client(stack["base"])
    for model in ("carol", "alice@v2", "bob@v1"):
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model=model, messages=MESSAGES)
        assert e.value.code == "model_not_found" and e.value.param == "model"


@pytest.mark.parametrize("fields, param", [
    ({"temperature": 7}, "temperature"), ({"max_tokens": 5000}, "max_tokens"), ({"n": 9}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"), ({"seed": 3}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": 5}, "stop"), ({"n": "two"}, "n"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "name": "ǅ" * 40, "content": "x"}]}, "messages[0].name"),
])
def test_bad_field_is_400_naming_it(stack, fields, param):
    import httpx

    body = {"model": "alice", "messages": MESSAGES, **fields}
    r = httpx.post(f"{stack['base']}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"].startswith(param) and error["type"] == "invalid_request_error"


def test_no_worker_is_503_at_once_and_a_stalled_worker_504_after_the_timeout(stack):
    import httpx
    import openai

    client = stack["redis"]
    idle = f"idle{uuid.uuid4().hex[:6]}"
    settings = api_settings(stack["redis_url"], idle, stack["root"], request_timeout_s=0.5)
    with serving(settings) as (base, _):
        t0 = time.monotonic()
        with pytest.raises(openai.InternalServerError) as e:
            openai_client(base).chat.completions.create(model="alice", messages=MESSAGES)
        assert e.value.status_code == 503 and e.value.code == "no_worker"
        assert time.monotonic() - t0 < 2
        assert httpx.get(f"{base}/healthz").status_code == 503
        # A heartbeat but nobody reading the stream: the request waits request_timeout_s, then 504.
        beat = Heartbeat(worker="ghost", pid=1, base="tiny", started_at=utcnow())
        client.set(Keys(idle).heartbeat("ghost"), beat.dumps(), px=60_000)
        for stream in (False, True):
            t0 = time.monotonic()
            with pytest.raises(openai.APIStatusError) as e:
                openai_client(base).chat.completions.create(model="alice", messages=MESSAGES, stream=stream)
            assert e.value.status_code == 504 and e.value.code == "timeout"
            assert 0.4 < time.monotonic() - t0 < 3
    for key in client.scan_iter(match=f"{idle}:*"):
        client.delete(key)


def test_redis_down_is_503(stack):
    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]  # closed again at once: nothing listens there
    settings = api_settings(f"redis://127.0.0.1:{dead_port}/0", "x", stack["root"])
    with serving(settings) as (base, _):
        t0 = time.monotonic()
        with pytest.raises(openai.InternalServerError) as e:
            openai_client(base).chat.completions.create(model="alice", messages=MESSAGES)
        assert e.value.status_code == 503 and e.value.code == "queue_unavailable"
        assert time.monotonic() - t0 < 5


def test_rate_limit_per_key_is_429_with_retry_after(stack):
    import openai

    with serving(api_settings(stack["redis_url"], stack["prefix"], stack["root"], rate_limit_per_min=2)) as (base, _):
        client = openai_client(base)
        client.models.list()
        client.models.list()
        with pytest.raises(openai.RateLimitError) as e:
            client.models.list()
        assert e.value.code == "rate_limit_exceeded" and int(e.value.response.headers["retry-after"]) >= 1
        openai_client(base, key=OTHER_KEY).models.list()  # another key has its own budget


# ---------------------------------------------------------------- feedback, metrics


def test_feedback_endpoint_publishes_the_event_the_bots_publish(stack):
    import httpx

    keys = Keys(stack["prefix"])
    r = stack["redis"]
    reply = openai_client(stack["base"]).chat.completions.create(model="alice", messages=MESSAGES, max_tokens=8)
    url, auth = f"{stack['base']}/v1/convo/feedback", {"Authorization": f"Bearer {KEY}"}
    other = httpx.post(url, headers={"Authorization": f"Bearer {OTHER_KEY}"}, json={"id": reply.id, "kind": "liked"})
    assert other.status_code == 404  # only the key the completion was returned to may rate it
    assert httpx.post(url, headers=auth, json={"id": reply.id, "kind": "edited"}).json()["error"]["param"] == "text"
    for body in ({"id": reply.id, "kind": "liked"}, {"id": reply.id, "kind": "edited", "text": "on my way!!"}):
        answer = httpx.post(url, headers=auth, json=body)
        assert answer.status_code == 200, answer.text
    again = httpx.post(url, headers=auth, json={"id": reply.id, "kind": "sent"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_marked"  # one final label
    draft_id = reply.id.removeprefix("chatcmpl-")
    events = [FeedbackEvent.loads(entry_data(f)) for _, f in r.xrange(keys.feedback)]
    mine = [e for e in events if e.draft_id == draft_id]
    assert [e.kind for e in mine] == ["shown", "liked", "edited"]
    edited = mine[-1]
    assert edited.platform == "api" and edited.persona == "alice" and edited.adapter_version == "v1"
    assert edited.final_text == "on my way!!" and edited.target == "ALICE" and edited.mode == "friend"
    assert edited.candidate == reply.choices[0].model_extra["convo"]["messages"]
    assert [(m.speaker, m.text) for m in edited.context] == [(h["speaker"], h["text"]) for h in HISTORY]


def test_metrics_count_requests_and_tokens(stack):
    from prometheus_client import generate_latest

    openai_client(stack["base"]).chat.completions.create(model="alice", messages=MESSAGES, max_tokens=4)
    text = generate_latest(stack["service"].metrics.registry).decode()
    ok = re.search(r'convo_api_requests_total\{endpoint="/v1/chat/completions",status="200"\} (\d+)', text)
    assert ok and int(float(ok.group(1))) >= 1
    assert re.search(r'convo_api_tokens_total\{kind="completion"\} [1-9]', text)
    assert 'convo_api_request_seconds_count{endpoint="/v1/chat/completions"}' in text


# ---------------------------------------------------------------- the docs' examples


def test_curl_examples_in_docs_run(stack):
    """Every ```bash block of docs/api.md that runs curl, against this server: each prints JSON (or SSE)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "docs" / "api.md").read_text(encoding="utf-8"), re.S)
    blocks = [b for b in blocks if b.lstrip().startswith("curl")]
    assert len(blocks) >= 5
    port = stack["base"].rsplit(":", 1)[1]
    env = {**os.environ, "CONVO_API_KEY": KEY}
    completion_id = "(no chat example before the feedback one)"
    for block in blocks:
        command = block.replace("localhost:8000", f"127.0.0.1:{port}")
        if "/v1/convo/feedback" in command:  # rate the completion an earlier example returned
            command = command.replace("chatcmpl-...", completion_id)
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0, (block, done.stderr)
        if '"stream": true' in block:
            events = [e for e in done.stdout.split("\n\n") if e.strip()]
            assert events[-1].strip() == "data: [DONE]", done.stdout
            json.loads(events[0].removeprefix("data: "))
            continue
        answer = json.loads(done.stdout)
        assert "error" not in answer, (block, answer)
        if answer.get("object") == "chat.completion":
            completion_id = answer["id"]


# ---------------------------------------------------------------- pure parts


def test_messages_map_to_speakers_system_ignored_bursts_split():
    from bot.core import Persona
    from bot.openai_wire import ChatMessage, chat_history

    alice = Persona(name="alice", tag="ALICE", me_tag="RIYA", display_name="Alice", me_name="Riya")
    messages = [ChatMessage(role="system", content="be nice"), ChatMessage(role="user", content="hey\n\nyou up?"),
                ChatMessage(role="assistant", content=[{"type": "text", "text": "yes"}]),
                ChatMessage(role="user", name="Sam", content="me too"), ChatMessage(role="user", name="Alice",
                                                                                    content="(as alice)")]
    got = [(m.speaker, m.text) for m in chat_history(messages, alice, 16)]
    assert got == [("RIYA", "hey"), ("RIYA", "you up?"), ("ALICE", "yes"), ("SAM", "me too"), ("ALICE", "(as alice)")]
    assert len(chat_history(messages, alice, 2)) == 2


def test_chat_and_prompt_history_window_moves_in_blocks():
    from bot.core import Persona, window_start
    from bot.openai_wire import ChatMessage, chat_history, prompt_history

    alice = Persona(name="alice", tag="ALICE", me_tag="RIYA")
    lines = [f"m{i}" for i in range(30)]
    for n in range(1, 31):
        messages = [ChatMessage(role="user" if i % 2 == 0 else "assistant", content=t) for i, t in enumerate(lines[:n])]
        prompt = "".join(f"[{'RIYA' if i % 2 == 0 else 'ALICE'}] {t}\n" for i, t in enumerate(lines[:n])) + "[ALICE]"
        assert [m.text for m in chat_history(messages, alice, 16, 1)] == lines[max(0, n - 16):n]  # as before
        assert [m.text for m in chat_history(messages, alice, 16, 8)] == lines[window_start(n, 16, 8):n]
        assert [m.text for m in prompt_history(prompt, alice, 16, 8)[0]] == lines[window_start(n, 16, 8):n]
    # Turn after turn the context keeps its first message for a block of 8 messages.
    firsts = [chat_history([ChatMessage(role="user", content=t) for t in lines[:n]], alice, 16, 8)[0].text
              for n in range(17, 30)]
    assert firsts == ["m8"] * 8 + ["m16"] * 5


def test_stop_strings_cut_text_and_hold_back_a_possible_start():
    from bot.openai_wire import apply_stop, cut_messages, held_back

    assert apply_stop("see you at 7 ok", ["at", "ok"]) == ("see you ", True)
    assert apply_stop("fine", ["zz"]) == ("fine", False)
    assert held_back("see you a", ["at 7"]) == "see you "  # "a" may start "at 7"
    assert held_back("see you", ["at 7"]) == "see you"
    assert cut_messages(["hey", "see you at 7", "bye"], ["at"]) == ["hey", "see you "]
    assert cut_messages(["hey", "bye"], ["bye"]) == ["hey"]


def test_api_module_never_imports_torch():
    code = ("import bot.openai_api, convo.commands.api, sys; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------- the command


def test_serve_api_without_a_key_is_a_one_line_error(cli, monkeypatch, capsys):
    monkeypatch.delenv("CONVO_API__KEYS", raising=False)
    assert cli(["serve", "api"]) == 2
    err = capsys.readouterr().err
    assert "api.keys is empty" in err and "Traceback" not in err


def test_serve_api_process_answers_and_stops_on_sigterm_without_logging_keys(tmp_path):
    import signal

    import httpx

    prefix = f"proc{uuid.uuid4().hex[:6]}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT), CONVO_REDIS__URL=REDIS_URL, CONVO_REDIS__PREFIX=prefix,
               CONVO_API__KEYS=json.dumps([KEY]), CONVO_API__METRICS_PORT="0")
    log = tmp_path / "api.log"
    proc = subprocess.Popen([sys.executable, "-m", "convo", "serve", "api", "--port", str(port), "--adapters",
                             str(tmp_path), "--log-level", "debug"], env=env, cwd=ROOT, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    try:
        def answers():
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
            assert proc.poll() is None, log.read_text()

        health = wait_until(answers, 60, "convo serve api to answer")
        assert health.status_code == 503 and health.json()["reason"].startswith("no worker")
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert models.status_code == 200 and models.json() == {"object": "list", "data": []}
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught: dying of SIGTERM is its clean exit.
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    text = log.read_text()
    assert "api on http://127.0.0.1" in text and "Application shutdown complete" in text and KEY not in text
