"""`convo chat` through the bot core, the real Redis and a fake worker; the bot CLI commands' errors."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from tests.bot_helpers import FakeWorker, bot_config, feedback_events, run


def _lines(*lines):
    it = iter(lines)

    async def read():
        return next(it, None)

    return read


async def _chat(redis_url, tmp_path, mode, lines, **config):
    import redis.asyncio as aioredis

    from bot.console import run_chat
    from bot.core import BotCore, Persona

    out = io.StringIO()
    core = BotCore(aioredis.from_url(redis_url), bot_config(tmp_path, **config), "console")
    await run_chat(core, Persona(name="alice", tag="ALICE", me_tag="ME"), mode, _lines(*lines),
                   Console(file=out, width=200, highlight=False))
    events = await feedback_events(core.redis)
    history = await core.history(f"alice:{mode}")
    await core.redis.aclose()
    return out.getvalue(), events, history


@pytest.mark.redis
def test_friend_mode_reply_reactions_and_regenerate(redis_url, tmp_path):
    async def scenario():
        async with FakeWorker(redis_url) as worker:
            result = await _chat(redis_url, tmp_path, "friend",
                                 ["hey alice", "/good", "/regen", "/bad", "how are you?", "/quit"])
        return (*result, worker.requests)

    out, events, history, requests = run(scenario())
    assert "alice (AI): alice/friend #0 re: hey alice" in out and "alice (AI): second msg" in out
    assert [e.kind for e in events] == ["shown", "liked", "regenerated", "shown", "disliked", "shown"]
    assert all(e.platform == "console" and e.target == "ALICE" for e in events)
    assert requests[1].history == requests[0].history
    # The regenerated reply was kept when the chat went on; the last one when the chat ended.
    assert [(m.speaker, m.text) for m in history] == [
        ("ME", "hey alice"), ("ALICE", "alice/friend #0 re: hey alice"), ("ALICE", "second msg"),
        ("ME", "how are you?"), ("ALICE", "alice/friend #0 re: how are you?"), ("ALICE", "second msg")]


@pytest.mark.redis
def test_self_mode_send_and_own_text_and_history_carries_over(redis_url, tmp_path):
    async def scenario():
        async with FakeWorker(redis_url) as worker:
            first = await _chat(redis_url, tmp_path, "self", ["are you free?", "/send 2", "/send 9", "/quit"])
            second = await _chat(redis_url, tmp_path, "self", ["great, 7pm?", "/me yes 7 works", "/forget"])
        return first, second, worker.requests

    (out1, events1, history1), (out2, events2, history2), requests = run(scenario())
    assert "draft 1:" in out1 and "draft 2:" in out1
    assert "nothing to react to yet" in out1  # /send 9 after the draft was used
    sent = [e for e in events1 if e.kind == "sent"][0]
    assert sent.candidate_index == 1 and sent.target == "ME" and sent.mode == "self"
    # The second session continued the stored conversation.
    assert [m.text for m in requests[1].history][:1] == ["are you free?"]
    assert requests[1].history[-1].text == "great, 7pm?"
    edited = [e for e in events2 if e.kind == "edited"][0]
    assert edited.final_text == "yes 7 works" and edited.candidate
    assert history2 == []  # /forget


@pytest.mark.redis
def test_worker_timeout_is_reported_and_chat_goes_on(redis_url, tmp_path):
    async def scenario():
        async with FakeWorker(redis_url, answer=lambda r: None):
            return await _chat(redis_url, tmp_path, "friend", ["hello", "/regen", "/nope"], reply_timeout_s=0.3)

    out, events, history = run(scenario())
    assert "no reply from the model worker within 0.3 s" in out
    assert "nothing to regenerate yet" in out and "unknown command /nope" in out
    assert events == []


@pytest.mark.redis
def test_console_never_resurrects_an_expired_draft(redis_url, tmp_path):
    import redis.asyncio as aioredis

    from bot.console import ConsoleChat
    from bot.core import BotCore, Persona

    async def scenario():
        out = io.StringIO()
        core = BotCore(aioredis.from_url(redis_url), bot_config(tmp_path), "console")
        alice = Persona(name="alice", tag="ALICE", me_tag="ME")
        left = []
        async with FakeWorker(redis_url):
            for mode, lines in (("self", ["are you free?", "/send 1"]), ("friend", ["hey alice", "/quit"])):
                chat = ConsoleChat(core, alice, mode, Console(file=out, width=200, highlight=False))
                await chat.handle(lines[0])
                draft_id = chat.pending.id
                await core.redis.delete(core.keys.draft(draft_id))  # what Redis does when the draft TTL runs out
                await chat.handle(lines[1])
                left.append(await core.redis.exists(core.keys.draft(draft_id)))
        events = await feedback_events(core.redis)
        await core.redis.aclose()
        return out.getvalue(), left, events

    out, left, events = run(scenario())
    assert left == [0, 0]  # neither /send nor the reply standing at /quit stores it again (without a TTL)
    assert "has expired or was forgotten" in out
    assert [e.kind for e in events] == ["shown", "shown", "shown"]  # no `sent` for a draft that is gone


@pytest.mark.redis
def test_console_end_of_input_keeps_the_last_reply(redis_url, tmp_path):
    async def scenario():
        async with FakeWorker(redis_url):
            return await _chat(redis_url, tmp_path, "friend", ["hey alice"])  # then Ctrl-D: end of input

    out, events, history = run(scenario())
    assert [(m.speaker, m.text) for m in history] == [
        ("ME", "hey alice"), ("ALICE", "alice/friend #0 re: hey alice"), ("ALICE", "second msg")]


@pytest.mark.redis
def test_console_ctrl_c_at_the_prompt_keeps_the_last_reply(redis_url, tmp_path):
    import redis.asyncio as aioredis

    from bot.console import run_chat
    from bot.core import BotCore, Persona

    async def scenario():
        waiting = asyncio.Event()
        lines = iter(["hey alice"])

        async def read():
            line = next(lines, None)
            if line is None:
                waiting.set()
                await asyncio.Event().wait()  # at the prompt until Ctrl-C cancels the chat
            return line

        core = BotCore(aioredis.from_url(redis_url), bot_config(tmp_path), "console")
        async with FakeWorker(redis_url):
            chat = asyncio.create_task(run_chat(core, Persona(name="alice", tag="ALICE", me_tag="ME"), "friend",
                                                read, Console(file=io.StringIO())))
            await waiting.wait()
            chat.cancel()  # what asyncio.run does on Ctrl-C
            with pytest.raises(asyncio.CancelledError):
                await chat
        history = await core.history("alice:friend")
        await core.redis.aclose()
        return history

    history = run(scenario())
    assert [m.speaker for m in history] == ["ME", "ALICE", "ALICE"]


@pytest.mark.redis
def test_console_ctrl_c_at_the_prompt_exits_at_once(redis_url, tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONUNBUFFERED="1", CONVO_REDIS__URL=redis_url,
               CONVO_REDIS__PREFIX="bottest", CONVO_BOT__ADAPTERS_DIR=str(tmp_path / "adapters"))
    proc = subprocess.Popen([sys.executable, "-m", "convo", "chat", "--persona", "alice"], env=env, cwd=root,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # Ctrl-C's disposition as in a terminal: a shell's background job (`make test &`)
                            # ignores SIGINT, and the child would inherit that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        banner = proc.stdout.readline()  # printed just before the first prompt
        assert "chatting with alice" in banner, banner + proc.stderr.read()
        proc.send_signal(signal.SIGINT)  # stdin stays open: nobody presses Enter
        started = time.monotonic()
        proc.wait(timeout=15)
        assert time.monotonic() - started < 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 130


def test_cli_errors_are_one_line(cli, capsys, monkeypatch):
    for var in ("CONVO_TELEGRAM__TOKEN", "CONVO_DISCORD__TOKEN"):
        monkeypatch.delenv(var, raising=False)
    assert cli(["serve", "telegram"]) == 2
    assert "telegram.token is not set" in capsys.readouterr().err
    assert cli(["serve", "discord"]) == 2
    assert "discord.token is not set" in capsys.readouterr().err
    assert cli(["chat", "--persona", "../etc"]) == 2
    err = capsys.readouterr().err
    assert "persona '../etc'" in err and "Traceback" not in err
    assert cli(["chat", "--help"]) == 0
    assert "--mode" in capsys.readouterr().out
