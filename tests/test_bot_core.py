"""Bot core against the real Redis: history, personas, drafts, feedback events, deletion, delivery."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from tests.bot_helpers import PREFIX, FakeWorker, bot_config, feedback_events, run


def _core(redis_url, tmp_path, platform="console", **overrides):
    import redis.asyncio as aioredis

    from bot.core import BotCore

    return BotCore(aioredis.from_url(redis_url), bot_config(tmp_path, **overrides), platform)


def write_adapter(adapters_dir: Path, persona: str, tag: str, me_tag: str, version: str | None = "v2") -> Path:
    """A persona dir with convo_adapter.json (versioned with a `current` link when `version` is given)."""
    from inference.adapter_meta import AdapterMeta, BaseModelRef, Speaker, write_adapter_meta
    from inference.prompt_format import FORMAT_VERSION
    from inference.versions import set_current

    meta = AdapterMeta(persona=Speaker(name="Alice Smith", tag=tag), me=Speaker(name="Bob", tag=me_tag),
                       base_model=BaseModelRef(id="tiny"), format_version=FORMAT_VERSION)
    persona_dir = adapters_dir / persona
    write_adapter_meta(persona_dir / version if version else persona_dir, meta)
    if version:
        set_current(persona_dir, version)
    return persona_dir


def test_bot_packages_never_import_torch():
    code = "import bot.telegram_bot, bot.discord_bot, bot.console, bot.core, config.settings, sys; " \
           "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr


def test_persona_tags_come_from_adapter_metadata(tmp_path):
    from bot.core import PersonaBook

    write_adapter(tmp_path / "adapters", "alice", "ALICE_S", "BOBBY")
    book = PersonaBook(tmp_path / "adapters")
    alice = book.get("alice")
    assert (alice.tag, alice.me_tag, alice.version) == ("ALICE_S", "BOBBY", "v2")
    assert alice.target("friend") == "ALICE_S" and alice.target("self") == "BOBBY"
    assert alice.tag_for("alice smith") == "ALICE_S" and alice.tag_for("Bob") == "BOBBY"
    assert alice.tag_for("Zoë Li") == "ZOE_LI"
    assert book.names() == ["alice"]
    assert book.get("ghost").tag == "GHOST"  # no adapter here: tags made from the name
    from errors import ConfigError

    with pytest.raises(ConfigError, match="persona"):
        book.get("../etc")


@pytest.mark.redis
def test_history_survives_restart_and_respects_sessions_and_limits(redis_url, tmp_path):
    from bot.core import BotCore
    from inference.protocol import Keys, utcnow

    async def scenario():
        first = _core(redis_url, tmp_path, context_messages=3, session_gap_min=10)
        old = utcnow() - timedelta(minutes=30)
        await first.add_message("c1", "ALICE", "before the gap", ts=old)
        for i in range(4):
            await first.add_message("c1", "ALICE" if i % 2 else "ME", f"m{i}")
        await first.redis.aclose()
        # A new process: a new client and a new core read the same history.
        second = _core(redis_url, tmp_path, context_messages=3, session_gap_min=10)
        assert isinstance(second, BotCore)
        stored = await second.history("c1")
        context = await second.context("c1")
        ttl = await second.redis.ttl(Keys(PREFIX).history("console", "c1"))
        # Silence longer than the gap since the last message: a new session, no context.
        later = await second.context("c1", now=utcnow() + timedelta(minutes=11))
        await second.add_message("c2", "ALICE", "old", ts=old)
        await second.add_message("c2", "ALICE", "new")
        cut = await second.context("c2")
        await second.redis.aclose()
        return stored, context, ttl, later, cut

    stored, context, ttl, later, cut = run(scenario())
    assert [m.text for m in stored] == ["m1", "m2", "m3"]  # trimmed to context_messages
    assert [(m.speaker, m.text) for m in context] == [("ALICE", "m1"), ("ME", "m2"), ("ALICE", "m3")]
    assert 0 < ttl <= 30 * 86400
    assert later == []
    assert [m.text for m in cut] == ["new"]  # never crosses a session gap


def test_window_start_moves_in_blocks_and_cut_1_slides():
    from bot.core import window_start

    # limit 16, cut 8: the start stays put for 8 messages, then jumps by 8; 9 to 16 messages are kept.
    starts = [window_start(n, 16, 8) for n in range(1, 41)]
    assert starts[:16] == [0] * 16
    assert starts[16:24] == [8] * 8 and starts[24:32] == [16] * 8 and starts[32:] == [24] * 8
    assert {n - window_start(n, 16, 8) for n in range(17, 200)} == set(range(9, 17))
    for limit in (1, 2, 3, 16, 64):
        for n in range(0, 150):
            assert window_start(n, limit, 1) == max(0, n - limit)  # cut 1 is the sliding window of old
            # cut >= limit acts as limit - 1: never an empty context, never more than `limit`
            for cut in (limit - 1, limit, limit + 5):
                start = window_start(n, limit, cut)
                assert start == window_start(n, limit, max(1, limit - 1))
                assert 0 <= n - start <= limit and (n == 0 or n - start >= 1)


def test_session_context_with_cut_1_equals_the_last_messages():
    from bot.core import session_context
    from inference.protocol import HistoryMessage, utcnow

    now = utcnow()
    messages = [HistoryMessage(speaker="A", text=f"m{i}", ts=now - timedelta(seconds=100 - i)) for i in range(40)]
    for n in range(41):
        assert session_context(messages[:n], now, 60, 16, 1) == messages[max(0, n - 16):n]
        assert session_context(messages[:n], now, 60, 16) == messages[max(0, n - 16):n]  # cut defaults to 1
    # cut 8: consecutive turns share the context's first message until the block moves.
    firsts = [session_context(messages[:n], now, 60, 16, 8)[0].text for n in range(17, 33)]
    assert firsts == ["m8"] * 8 + ["m16"] * 8
    # The session gap still cuts inside the window.
    gap = [*messages[:20], *(m.model_copy(update={"ts": now}) for m in messages[20:22])]
    assert [m.text for m in session_context(gap, now + timedelta(seconds=20), 0.5, 16, 8)] == ["m20", "m21"]


@pytest.mark.redis
@pytest.mark.parametrize("cut", [1, 8])
def test_stored_history_is_the_window_trimmed_in_blocks(redis_url, tmp_path, cut):
    from bot.core import window_start

    async def scenario():
        core = _core(redis_url, tmp_path, context_messages=16, context_cut_messages=cut)
        stored, contexts = [], []
        for i in range(40):
            await core.add_message("c", "ALICE" if i % 2 else "ME", f"m{i}")
            stored.append([m.text for m in await core.history("c")])
            contexts.append([m.text for m in await core.context("c")])
        await core.redis.aclose()
        return stored, contexts

    stored, contexts = run(scenario())
    texts = [f"m{i}" for i in range(40)]
    for n in range(1, 41):
        assert stored[n - 1] == texts[window_start(n, 16, cut):n]  # exactly the window, no more
        assert contexts[n - 1] == stored[n - 1]
    if cut == 1:
        assert all(len(s) == 16 for s in stored[15:])  # the old per-message trim
    else:
        assert [len(s) for s in stored[16:24]] == [9, 10, 11, 12, 13, 14, 15, 16]


@pytest.mark.redis
def test_concurrent_writers_lose_no_message_and_never_over_trim(redis_url, tmp_path):
    """40 writers at once (4 chats' worth of racing clients on separate connections): every message is stored or
    trimmed by the block rule, never lost to a stale length, and each writer's messages keep their order."""
    import redis.asyncio as aioredis

    from bot.core import BotCore, window_start

    async def scenario(limit: int, cut: int):
        config = bot_config(tmp_path, context_messages=limit, context_cut_messages=cut)
        cores = [BotCore(aioredis.from_url(redis_url), config, "console") for _ in range(4)]
        await cores[0].forget("race")

        async def writer(w: int):
            for i in range(10):  # 4 writers x 10 messages, interleaved at every await
                await cores[w].add_message("race", f"W{w}", f"{w}-{i}")

        await asyncio.gather(*(writer(w) for w in range(4)))
        stored = [m.text for m in await cores[0].history("race")]
        context = [m.text for m in await cores[0].context("race")]
        for core in cores:
            await core.redis.aclose()
        return stored, context

    # Nothing trimmed: every one of the 40 messages is there.
    stored, context = run(scenario(64, 8))
    assert sorted(stored) == sorted(f"{w}-{i}" for w in range(4) for i in range(10))
    # Trimmed in blocks: exactly the window of 40 messages (16 of them), each writer's newest ones, in order.
    stored, context = run(scenario(16, 8))
    assert len(stored) == 40 - window_start(40, 16, 8) == 16 and len(set(stored)) == 16
    for w in range(4):
        mine = [int(t.split("-")[1]) for t in stored if t.startswith(f"{w}-")]
        assert mine == list(range(10 - len(mine), 10))  # a suffix of what the writer wrote, in its order
    assert context == stored
    # Trimmed in blocks of 5 out of a limit of 12: 40 messages leave 40 - 30 = 10.
    stored, _ = run(scenario(12, 5))
    assert len(stored) == 40 - window_start(40, 12, 5) == 10


@pytest.mark.redis
def test_private_context_is_trimmed_in_blocks_too(redis_url, tmp_path):
    async def scenario():
        core = _core(redis_url, tmp_path, context_messages=4, context_cut_messages=2, platform="discord")
        kept = []
        for i in range(8):
            await core.add_message("ch", "CAROL", f"p{i}", private_ttl_s=600)
            kept.append([m.text for m in await core.private_history("ch")])
        await core.redis.aclose()
        return kept

    kept = run(scenario())
    assert kept == [["p0"], ["p0", "p1"], ["p0", "p1", "p2"], ["p0", "p1", "p2", "p3"], ["p2", "p3", "p4"],
                    ["p2", "p3", "p4", "p5"], ["p4", "p5", "p6"], ["p4", "p5", "p6", "p7"]]


@pytest.mark.redis
def test_draft_feedback_events_are_self_contained(redis_url, tmp_path):
    from bot.core import Persona

    alice = Persona(name="alice", tag="ALICE", me_tag="BOB")

    async def scenario():
        core = _core(redis_url, tmp_path, platform="telegram")
        async with FakeWorker(redis_url) as worker:
            await core.add_message("chat", "ALICE", "you coming tonight?")
            draft = await core.generate("chat", alice, "self", n=2, refs={"chat_id": "42"})
            stored = await core.get_draft(draft.id)
            await core.feedback(draft, "liked", 1)
            await core.feedback(draft, "disliked", 0)
            new = await core.regenerate(draft, alice)
            edited = await core.owner_wrote("chat", "yes, on my way")
            none_left = await core.owner_wrote("chat", "another")
        events = await feedback_events(core.redis)
        await core.redis.aclose()
        return draft, stored, new, edited, none_left, events, worker.requests

    draft, stored, new, edited, none_left, events, requests = run(scenario())
    assert requests[0].persona == "alice" and requests[0].mode == "self" and requests[0].n == 2
    assert [(m.speaker, m.text) for m in requests[0].history] == [("ALICE", "you coming tonight?")]
    assert stored == draft and draft.adapter_version == "v3" and draft.refs == {"chat_id": "42"}
    assert requests[1].history == requests[0].history  # regenerated from the very same context
    kinds = [e.kind for e in events]
    assert kinds == ["shown", "shown", "liked", "disliked", "regenerated", "shown", "shown", "edited"]
    for event in events:
        assert event.persona == "alice" and event.mode == "self" and event.platform == "telegram"
        assert event.adapter_version == "v3" and event.target == "BOB"
        assert [(m.speaker, m.text) for m in event.context] == [("ALICE", "you coming tonight?")]
    liked = events[2]
    assert liked.draft_id == draft.id and liked.candidate == draft.candidates[1] and liked.candidate_index == 1
    assert edited.kind == "edited" and edited.final_text == "yes, on my way" and edited.draft_id == new.id
    assert edited.candidate == new.candidates[0]
    assert none_left is None


@pytest.mark.redis
def test_owner_sending_a_candidate_as_drafted_is_sent(redis_url, tmp_path):
    from bot.core import Persona

    async def scenario():
        core = _core(redis_url, tmp_path)
        async with FakeWorker(redis_url):
            await core.add_message("chat", "ALICE", "hi")
            draft = await core.generate("chat", Persona(name="alice", tag="ALICE"), "self", n=2)
            event = await core.owner_wrote("chat", draft.candidates[1][0])
        await core.redis.aclose()
        return draft, event

    draft, event = run(scenario())
    assert event.kind == "sent" and event.candidate_index == 1 and event.final_text == "\n".join(draft.candidates[1])


@pytest.mark.redis
def test_worker_timeout_is_a_clear_error(redis_url, tmp_path):
    from bot.core import Persona
    from inference.client import WorkerTimeout

    async def scenario():
        core = _core(redis_url, tmp_path, reply_timeout_s=0.3)
        async with FakeWorker(redis_url, answer=lambda r: None):
            with pytest.raises(WorkerTimeout, match="no worker answered"):
                await core.generate("chat", Persona(name="alice", tag="ALICE"), "friend")
            with pytest.raises(WorkerTimeout):
                await core.generate("chat", Persona(name="alice", tag="ALICE"), "friend", on_partial=_noop)
        await core.redis.aclose()

    run(scenario())


async def _noop(text):
    return None


@pytest.mark.redis
def test_forget_chat_and_forget_persona(redis_url, tmp_path):
    from bot.core import DraftExpired, Persona
    from inference.protocol import Keys

    alice = Persona(name="alice", tag="ALICE")

    async def scenario():
        core = _core(redis_url, tmp_path, platform="discord")
        keys = Keys(PREFIX)
        async with FakeWorker(redis_url):
            await core.add_message("chan", "ALICE", "hello")
            await core.add_message("chan", "CAROL", "hi alice")
            d1 = await core.generate("chan", alice, "friend")
            await core.add_message("other", "ALICE", "elsewhere")
            d2 = await core.generate("other", alice, "friend")
        counts = await core.forget_persona(alice)
        left_history = [m.text for m in await core.history("chan")]
        with pytest.raises(DraftExpired):
            await core.get_draft(d1.id)
        events_left = await feedback_events(core.redis)
        await core.add_message("chan", "CAROL", "again")
        deleted = await core.forget("chan")
        gone = await core.redis.exists(keys.history("discord", "chan"))
        await core.redis.aclose()
        return d2, counts, left_history, events_left, deleted, gone

    d2, counts, left_history, events_left, deleted, gone = run(scenario())
    assert counts == {"messages": 2, "drafts": 2, "events": 2}
    assert left_history == ["hi alice"]
    assert events_left == []
    assert deleted >= 1 and gone == 0


def test_burst_is_delivered_as_separate_messages_with_typing(tmp_path):
    import fakeredis.aioredis

    from bot.core import BotCore

    sent, typed = [], []

    async def scenario():
        core = BotCore(fakeredis.aioredis.FakeRedis(), bot_config(tmp_path, typing_s_per_char=0.001,
                                                                  max_typing_s=0.002), "console")
        assert core.typing_delay_s("x" * 100) == 0.002 and core.typing_delay_s("ab") == 0.002
        n = await core.deliver(["one", " ", "two"], send=_append(sent), typing=_append(typed, ""))
        return n

    assert run(scenario()) == 2
    assert sent == ["one", "two"] and len(typed) == 2


def _append(into, value=None):
    async def f(*args):
        into.append(value if value is not None else args[0])

    return f



async def _saved_draft(core, chat: str = "chat"):
    """A stored open draft answering the chat's current context (no worker needed)."""
    from bot.core import DraftRecord
    from inference.protocol import new_id

    draft = DraftRecord(id=new_id(), persona="alice", mode="self", platform=core.platform, chat=chat, target="BOB",
                        context=await core.context(chat), candidates=[["see you at 8", "bring snacks"]])
    await core.save_draft(draft)
    return draft


SHIFTS = [*range(-6, 7)] * 3  # round trips one racer waits for before starting (<0: the other one waits)
ROUNDS = len(SHIFTS)


async def _race(core, first, second):
    """Results of `first(i)` and `second(i)` run concurrently in rounds i = 0..ROUNDS-1, one of them held back by
    SHIFTS[i] Redis round trips: every interleaving of their Redis commands, each a few times, without sleeping."""

    async def after(round_trips: int, coro):
        for _ in range(round_trips):
            await core.redis.ping()
        return await coro

    return [await asyncio.gather(after(max(s, 0), first(i)), after(max(-s, 0), second(i)))
            for i, s in enumerate(SHIFTS)]


async def _round_drafts(core, messages=("dinner?",)) -> list:
    """One stored open draft per race round, in chats chat0, chat1, ..., each answering ALICE's `messages`
    (platform message ids 1, 2, ...)."""
    drafts = []
    for i in range(ROUNDS):
        for n, text in enumerate(messages, 1):
            await core.add_message(f"chat{i}", "ALICE", text, message_id=str(n))
        drafts.append(await _saved_draft(core, f"chat{i}"))
    return drafts


@pytest.mark.redis
def test_owner_wrote_racing_forget_never_resurrects_the_draft(redis_url, tmp_path):
    async def scenario():
        core = _core(redis_url, tmp_path, platform="telegram")
        drafts = await _round_drafts(core)
        await _race(core, lambda i: core.owner_wrote(f"chat{i}", "sure, 8?"), lambda i: core.forget(f"chat{i}"))
        left = [await core.redis.ttl(core.keys.draft(d.id)) for d in drafts]
        await core.redis.aclose()
        return left

    assert run(scenario()) == [-2] * ROUNDS  # forgotten stays forgotten (not back for good without a TTL)


def _race_a_send_claim(redis_url, tmp_path, racer):
    """Race `racer(core, draft)` against ✅'s claim on the same draft, every round; (racer won, claim won, final
    status) per round, and the feedback events."""

    async def scenario():
        core = _core(redis_url, tmp_path, platform="telegram")
        drafts = await _round_drafts(core)
        async with FakeWorker(redis_url):
            results = await _race(core, lambda i: racer(core, drafts[i]),
                                  lambda i: core.transition(drafts[i].id, {"open"}, status="sending"))
        statuses = [(await core.get_draft(d.id)).status for d in drafts]
        events = await feedback_events(core.redis)
        await core.redis.aclose()
        return [(won is not None, claimed is not None, status)
                for (won, claimed), status in zip(results, statuses, strict=True)], events

    return run(scenario())


@pytest.mark.redis
def test_owner_wrote_racing_a_send_claim_lets_only_one_win(redis_url, tmp_path):
    outcomes, events = _race_a_send_claim(redis_url, tmp_path, lambda core, d: core.owner_wrote(d.chat, "sure, 8?"))
    for outcome in outcomes:  # either the owner's own text closed it, or ✅ took it; never both
        assert outcome in [(True, False, "edited"), (False, True, "sending")], outcomes
    assert len(events) == sum(wrote for wrote, _, _ in outcomes)


@pytest.mark.redis
def test_owner_wrote_racing_a_deletion_keeps_both_changes(redis_url, tmp_path):
    async def scenario():
        core = _core(redis_url, tmp_path, platform="telegram")
        drafts = await _round_drafts(core, ["dinner?", "oops, wrong chat"])
        await _race(core, lambda i: core.owner_wrote(f"chat{i}", "sure, 8?"),
                    lambda i: core.amend_message(f"chat{i}", "2", None, persona="alice"))
        stored = [await core.get_draft(d.id) for d in drafts]
        await core.redis.aclose()
        return [(d.status, [m.text for m in d.context]) for d in stored]

    assert run(scenario()) == [("edited", ["dinner?"])] * ROUNDS  # closed, and the deleted message stays deleted


@pytest.mark.redis
def test_regenerate_racing_a_send_claim_never_closes_the_draft_being_sent(redis_url, tmp_path):
    from bot.core import Persona

    alice = Persona(name="alice", tag="ALICE", me_tag="BOB")
    outcomes, events = _race_a_send_claim(redis_url, tmp_path, lambda core, d: core.regenerate(d, alice))
    for outcome in outcomes:  # 🔄 replaced it, or ✅ is sending it; never a draft closed under a send
        assert outcome in [(True, False, "closed"), (False, True, "sending")], outcomes
    assert sum(e.kind == "regenerated" for e in events) == sum(new for new, _, _ in outcomes)


@pytest.mark.redis
def test_double_tap_regenerate_drafts_once(redis_url, tmp_path):
    from bot.core import Persona

    alice = Persona(name="alice", tag="ALICE", me_tag="BOB")

    async def scenario():
        core = _core(redis_url, tmp_path, platform="telegram")
        drafts = await _round_drafts(core)
        async with FakeWorker(redis_url):
            results = await _race(core, lambda i: core.regenerate(drafts[i], alice),
                                  lambda i: core.regenerate(drafts[i], alice))
        left = [[d.id for d in await core.open_drafts(f"chat{i}")] for i in range(ROUNDS)]
        events = await feedback_events(core.redis)
        await core.redis.aclose()
        return results, left, events

    results, left, events = run(scenario())
    for (a, b), open_ids in zip(results, left, strict=True):
        assert (a is None) != (b is None)  # one tap drafts again, the other finds the draft taken
        assert open_ids == [(a or b).id]  # and the loser's draft is not left behind
    assert [e.kind for e in events].count("regenerated") == ROUNDS
    assert [e.kind for e in events].count("shown") == ROUNDS  # one candidate each, shown once


@pytest.mark.redis
def test_regenerate_after_a_worker_timeout_leaves_the_draft_open(redis_url, tmp_path):
    from bot.core import Persona
    from inference.client import WorkerTimeout

    alice = Persona(name="alice", tag="ALICE", me_tag="BOB")

    async def scenario():
        core = _core(redis_url, tmp_path, platform="telegram", reply_timeout_s=0.3)
        await core.add_message("chat", "ALICE", "dinner?")
        draft = await _saved_draft(core, "chat")
        async with FakeWorker(redis_url, answer=lambda r: None):
            with pytest.raises(WorkerTimeout):
                await core.regenerate(draft, alice)
        status = (await core.get_draft(draft.id)).status
        events = await feedback_events(core.redis)
        await core.redis.aclose()
        return status, events

    assert run(scenario()) == ("open", [])  # 🔄 can be tried again; nothing was regenerated
