"""The Discord bot: real discord.py objects (ConnectionState, Guild, Thread, Message, Interaction) built from gateway
payloads, slash commands run through the real CommandTree, HTTP answered by a recording fake session (no network),
the real Redis and a fake worker.

The fake HTTP layer answers what Discord does in the conditions tested here: two servers, a thread whose webhooks
are its parent channel's, the 15-webhook limit (400, code 30007), and an interaction whose first response comes after
work marked slow (longer than Discord's 3 s): 404 "Unknown interaction" (code 10062).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import pytest

from tests.bot_helpers import PREFIX, FakeWorker, feedback_events, run

pytestmark = pytest.mark.redis

GUILD, CHANNEL, THREAD, BOT_ID = 100, 200, 201, 999
GUILD2, CHANNEL2 = 110, 210  # another server, where alice is not a member
ALICE, CAROL, ADMIN, ADMIN2 = 301, 302, 303, 304  # alice is simulated, carol chats, the admins have Manage Server
NAMEALIKE = 305  # another member who calls herself "Alice"
NAMES = {ALICE: "alice", CAROL: "carol", ADMIN: "admin", ADMIN2: "admin2", NAMEALIKE: "alice"}
GUILD_OF = {CHANNEL: GUILD, THREAD: GUILD, CHANNEL2: GUILD2}
MANAGE_GUILD = 1 << 5
NOW = datetime.now(UTC).isoformat()


def _user(uid: int, name: str, bot: bool = False) -> dict:
    return {"id": str(uid), "username": name, "global_name": name.title(), "discriminator": "0", "avatar": None,
            "bot": bot}


def _member(uid: int, name: str) -> dict:
    return {"user": _user(uid, name), "roles": [], "joined_at": NOW, "deaf": False, "mute": False, "flags": 0}


def _thread(tid: int, parent: int, name: str) -> dict:
    return {"id": str(tid), "type": 11, "guild_id": str(GUILD_OF[parent]), "parent_id": str(parent), "name": name,
            "owner_id": str(ADMIN), "message_count": 0, "member_count": 1, "rate_limit_per_user": 0,
            "thread_metadata": {"archived": False, "auto_archive_duration": 1440, "archive_timestamp": NOW,
                                "locked": False}}


class FakeResponse:
    def __init__(self, status: int, body):
        self.status = status
        self.reason = {200: "OK", 204: "No Content", 404: "Not Found"}.get(status, "Bad Request")
        self._text = "" if body is None else json.dumps(body)
        self.headers = {"content-type": "application/json"} if body is not None else {}

    async def text(self, encoding="utf-8"):
        return self._text

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False


class RecordingSession:
    """Stands in for aiohttp.ClientSession: records every Discord API call, answers canned payloads, flags the rest."""

    def __init__(self):
        self.calls: list[tuple[str, str, dict]] = []  # also ("INTERACTION", id, {}) and ("WORK", name, {}) marks
        self.params: list[dict] = []  # the query parameters of each call, same order
        self.unexpected: list[str] = []
        self.webhooks: dict[str, list[dict]] = {str(CHANNEL): [], str(CHANNEL2): []}  # a thread has none
        self._next_id = 5000
        self.closed = False

    def mark(self, kind: str, name: str) -> None:
        """Note an interaction arriving or slow work starting, for the 3-second rule and order assertions."""
        self.calls.append((kind, name, {}))
        self.params.append({})

    def _expired(self, interaction_id: str) -> bool:
        """Discord's 3 s rule: slow work ran between the interaction's arrival and its first response."""
        start = max(i for i, c in enumerate(self.calls) if c[:2] == ("INTERACTION", interaction_id))
        later = self.calls[start + 1:-1]
        answered = any(m == "POST" and p.startswith(f"/interactions/{interaction_id}/") for m, p, _ in later)
        return not answered and any(m == "WORK" for m, _, _ in later)

    def _id(self) -> str:
        self._next_id += 1
        return str(self._next_id)

    def _message(self, channel: str, content: str, author: dict) -> dict:
        return {"id": self._id(), "channel_id": channel, "guild_id": str(GUILD_OF[int(channel)]), "author": author,
                "content": content,
                "timestamp": NOW, "edited_timestamp": None, "tts": False, "mention_everyone": False, "mentions": [],
                "mention_roles": [], "attachments": [], "embeds": [], "pinned": False, "type": 0}

    def request(self, method: str, url: str, data=None, params=None, **kwargs) -> FakeResponse:
        path = url.split("/api/v10", 1)[-1].split("?")[0]
        body = json.loads(data) if isinstance(data, str) and data else {}
        self.calls.append((method, path, body))
        self.params.append(dict(params or {}))
        if method == "POST" and (m := re.fullmatch(r"/interactions/(\d+)/[^/]+/callback", path)):
            if self._expired(m[1]):
                return FakeResponse(404, {"message": "Unknown interaction", "code": 10062})
            return FakeResponse(200, {"interaction": {"id": m[1], "type": 2}})
        if m := re.fullmatch(r"/channels/(\d+)/webhooks", path):
            hooks = self.webhooks.get(m[1])
            if hooks is None:
                self.unexpected.append(f"{method} {path}")  # threads have no webhooks of their own
                return FakeResponse(400, {"message": "Invalid channel type", "code": 50024})
            if method == "GET":
                return FakeResponse(200, hooks)
            if len(hooks) >= 15:
                return FakeResponse(400, {"message": "Maximum number of webhooks reached (15)", "code": 30007})
            hook = {"id": self._id(), "type": 1, "channel_id": m[1], "guild_id": str(GUILD_OF[int(m[1])]),
                    "name": body["name"], "token": "hooktoken", "user": _user(BOT_ID, "convo", bot=True)}
            hooks.append(hook)
            return FakeResponse(200, hook)
        if method == "POST" and re.fullmatch(r"/webhooks/\d+/hooktoken", path):
            hook_id = path.split("/")[2]
            channel = next(h["channel_id"] for hooks in self.webhooks.values() for h in hooks if h["id"] == hook_id)
            author = _user(int(hook_id), body.get("username", "hook"), bot=True)
            msg = self._message(str((params or {}).get("thread_id", channel)), body["content"], author)
            msg["webhook_id"] = hook_id
            return FakeResponse(200, msg)
        if method == "POST" and re.fullmatch(rf"/webhooks/{BOT_ID}/itok\d+", path):  # interaction follow-up
            return FakeResponse(200, self._message(str(CHANNEL), body["content"], _user(BOT_ID, "convo", bot=True)))
        if method == "POST" and (m := re.fullmatch(r"/channels/(\d+)/messages", path)):
            return FakeResponse(200, self._message(m[1], body["content"], _user(BOT_ID, "convo", bot=True)))
        if method == "GET" and path == f"/guilds/{GUILD}/members/{ALICE}":
            member = _member(ALICE, "alice")
            member["user"]["avatar"] = "a1b2c3"
            return FakeResponse(200, member)
        if method == "POST" and re.fullmatch(r"/channels/\d+/typing", path):
            return FakeResponse(204, None)
        self.unexpected.append(f"{method} {path}")
        return FakeResponse(400, {"message": f"unexpected {method} {path}", "code": 0})

    async def close(self):
        self.closed = True

    def hook_posts(self, thread: int | None = None) -> list[dict]:
        """Messages posted through persona webhooks (into `thread` when given, else into channels)."""
        return [b for (m, p, b), q in zip(self.calls, self.params, strict=True)
                if m == "POST" and re.fullmatch(r"/webhooks/\d+/hooktoken", p)
                and str(q.get("thread_id")) == str(thread)]

    def channel_posts(self, channel: int = CHANNEL) -> list[str]:
        return [b["content"] for m, p, b in self.calls if m == "POST" and p == f"/channels/{channel}/messages"]

    def replies(self) -> list[dict]:
        """What every interaction answered (content, flags): immediate responses and follow-ups after a defer."""
        return [b["data"] if p.endswith("/callback") else b for m, p, b in self.calls
                if (p.endswith("/callback") and b["type"] == 4)
                or (m == "POST" and re.fullmatch(rf"/webhooks/{BOT_ID}/itok\d+", p))]


def _settings(redis_url, tmp_path, **bot):
    from config.settings import Settings

    return Settings(
        redis={"url": redis_url, "prefix": PREFIX},
        bot={"adapters_dir": str(tmp_path / "adapters"), "typing_s_per_char": 0.0, "reply_timeout_s": 5.0, **bot},
        discord={"token": "discord-test-token", "owner_ids": [], "users": {str(ALICE): "alice"}},
    )


def _guild(gid: int, name: str, channel: int, members: list[int], threads: list[dict]) -> dict:
    return {"id": str(gid), "name": name, "owner_id": str(members[-1]), "features": [], "emojis": [], "stickers": [],
            "roles": [{"id": str(gid), "name": "@everyone", "permissions": str(1 << 10 | 1 << 11), "position": 0,
                       "color": 0, "hoist": False, "managed": False, "mentionable": False}],
            "channels": [{"id": str(channel), "type": 0, "name": "general", "position": 0,
                          "permission_overwrites": [], "guild_id": str(gid)}],
            "threads": threads, "members": [_member(uid, NAMES[uid]) for uid in members]}


class Harness:
    """A bot whose state holds two guilds: "friends" (a text channel and a thread in it; alice, carol, admin) and
    "elsewhere" (one channel; carol, admin2), fed gateway payloads."""

    def __init__(self, bot, session: RecordingSession):
        import discord

        self.bot, self.session = bot, session
        state = bot._connection
        self.state = state
        state.user = discord.ClientUser(state=state, data=_user(BOT_ID, "convo", bot=True))
        state.application_id = BOT_ID
        guild = discord.Guild(state=state, data=_guild(GUILD, "friends", CHANNEL, [ALICE, CAROL, NAMEALIKE, ADMIN],
                                                       [_thread(THREAD, CHANNEL, "plans")]))
        state._add_guild(guild)
        state._add_guild(discord.Guild(state=state, data=_guild(GUILD2, "elsewhere", CHANNEL2, [CAROL, ADMIN2], [])))
        self.guild = guild
        self.channel = guild.get_channel(CHANNEL)
        self.cog = bot.get_cog("RoleplayCog")
        self.n = 0

    def _next(self) -> str:
        self.n += 1
        return str(self.n)

    def _posted(self, author: int, text: str, channel: int) -> dict:
        data = self.session._message(str(channel), text, _user(author, NAMES[author]))
        data["member"] = {"roles": [], "joined_at": NOW, "deaf": False, "mute": False, "flags": 0}
        return data

    async def say(self, author: int, text: str, channel: int = CHANNEL) -> None:
        """A member posts in a channel or thread (MESSAGE_CREATE, handed to the cog's listener)."""
        import discord

        where = self.state._get_guild(GUILD_OF[channel])._resolve_channel(channel)
        await self.cog.on_message(discord.Message(state=self.state, channel=where, data=self._posted(author, text,
                                                                                                      channel)))

    async def gateway_message(self, author: int, text: str, channel: int = CHANNEL) -> None:
        """A member posts (MESSAGE_CREATE parsed by the real ConnectionState and dispatched to every listener of
        the client); returns when every event task it started is done."""
        self.state.parsers["MESSAGE_CREATE"](self._posted(author, text, channel))
        while pending := [t for t in asyncio.all_tasks() if t.get_name().startswith("discord.py: ") and not t.done()]:
            await asyncio.gather(*pending)

    def slow(self, obj, method: str) -> None:
        """Mark `obj.method` as work slower than Discord's 3 s interaction window."""
        original = getattr(obj, method)

        async def slow_method(*args, **kwargs):
            self.session.mark("WORK", method)
            return await original(*args, **kwargs)

        setattr(obj, method, slow_method)

    async def command(self, user: int, name: str, sub: str | None = None, permissions: int = 0,
                      channel: int = CHANNEL, **options) -> None:
        """A member runs a slash command in a channel or thread (INTERACTION_CREATE through the real CommandTree)."""
        import discord

        opts = [{"type": 3, "name": k, "value": v} for k, v in options.items()]
        data = {"id": "1", "name": name, "type": 1,
                "options": [{"type": 1, "name": sub, "options": opts}] if sub else opts}
        member = _member(user, NAMES[user])
        member["permissions"] = str(permissions)
        guild = str(GUILD_OF[channel])
        raw_channel = ({"id": str(channel), "type": 0, "guild_id": guild, "name": "general"} if channel != THREAD
                       else _thread(THREAD, CHANNEL, "plans"))
        payload = {"id": self._next(), "application_id": str(BOT_ID), "type": 2, "token": f"itok{self.n}",
                   "version": 1, "guild_id": guild, "channel_id": str(channel), "channel": raw_channel,
                   "member": member, "app_permissions": "0", "locale": "en-US", "guild_locale": "en-US",
                   "entitlements": [], "authorizing_integration_owners": {}, "attachment_size_limit": 8388608,
                   "data": data}
        self.session.mark("INTERACTION", payload["id"])
        await self.bot.tree._call(discord.Interaction(data=payload, state=self.state))

    async def react(self, user: int, message_id: str, emoji: str) -> None:
        """A member reacts (MESSAGE_REACTION_ADD)."""
        import discord

        event = discord.RawReactionActionEvent(
            {"user_id": str(user), "channel_id": str(CHANNEL), "message_id": message_id, "guild_id": str(GUILD),
             "type": 0, "burst": False}, discord.PartialEmoji(name=emoji), "REACTION_ADD")
        await self.cog.on_raw_reaction_add(event)


@asynccontextmanager
async def discord_bot(redis_url, tmp_path, **bot):
    import redis.asyncio as aioredis

    from bot.discord_bot import build_bot

    session = RecordingSession()
    client = build_bot(_settings(redis_url, tmp_path, **bot), redis=aioredis.from_url(redis_url), sync_commands=False)
    # What HTTPClient.static_login does, with the recording session in place of aiohttp's (the HTTP edge).
    client.http._HTTPClient__session = session
    client.http._global_over = asyncio.Event()
    client.http._global_over.set()
    await client._async_setup_hook()
    await client.setup_hook()
    try:
        yield Harness(client, session)
    finally:
        await client.redis.aclose()
    assert session.unexpected == [], f"unexpected Discord API calls: {session.unexpected}"


def test_roleplay_refused_without_consent_then_allowed_with_it(redis_url, tmp_path):
    async def scenario():
        async with FakeWorker(redis_url) as worker, \
                discord_bot(redis_url, tmp_path, typing_s_per_char=0.0001, max_typing_s=0.001) as h:
            await h.command(CAROL, "roleplay", "start", persona="alice")  # no Manage Server
            await h.command(ADMIN, "roleplay", "start", permissions=MANAGE_GUILD, persona="alice")  # no consent
            await h.say(CAROL, "anyone here?")  # no roleplay: nothing stored, no reply
            keys_before = await h.bot.redis.keys(f"{PREFIX}:history:*")
            await h.command(ALICE, "consent", "grant")
            await h.command(ADMIN, "roleplay", "start", permissions=MANAGE_GUILD, persona="alice")
            await h.say(CAROL, "hey alice, pizza?")
            return worker.requests, keys_before, h.session

    requests, keys_before, session = run(scenario())
    replies = session.replies()
    assert "Only the bot owner or members with Manage Server" in replies[0]["content"]
    assert "has not opted in" in replies[1]["content"] and replies[1]["flags"] & 64  # ephemeral
    assert "You opted in" in replies[2]["content"]
    assert "alice (AI) will answer" in replies[3]["content"]
    assert keys_before == []
    assert len(requests) == 1 and requests[0].persona == "alice" and requests[0].mode == "friend"
    assert [(m.speaker, m.text) for m in requests[0].history] == [("CAROL", "hey alice, pizza?")]
    creates = [b for m, p, b in session.calls if m == "POST" and p.endswith("/webhooks")]
    assert [c["name"] for c in creates] == ["alice (AI)"]
    posts = session.hook_posts()
    assert [p["content"] for p in posts] == ["alice/friend #0 re: hey alice, pizza?", "second msg"]
    assert all(p["username"] == "alice (AI)" for p in posts)
    assert all(f"/avatars/{ALICE}/a1b2c3." in p["avatar_url"] for p in posts)  # the person's own avatar
    # A burst: each message of it is preceded by a typing indicator.
    kinds = ["typing" if p.endswith("/typing") else "post" for m, p, _ in session.calls
             if p.endswith("/typing") or p.startswith("/webhooks/")]
    assert kinds[-4:] == ["typing", "post", "typing", "post"]


def test_consent_revoked_mid_roleplay_stops_the_next_reply(redis_url, tmp_path):
    async def scenario():
        async with FakeWorker(redis_url) as worker, discord_bot(redis_url, tmp_path) as h:
            await h.command(ALICE, "consent", "grant")
            await h.command(ADMIN, "roleplay", "start", permissions=MANAGE_GUILD, persona="alice")
            await h.say(CAROL, "first")
            posts_before = len(h.session.hook_posts())
            await h.command(ALICE, "consent", "revoke")
            await h.say(CAROL, "second")
            return worker.requests, posts_before, h.session, await h.cog.registry.roleplay(str(CHANNEL))

    requests, posts_before, session, roleplay = run(scenario())
    assert posts_before == 2 and len(session.hook_posts()) == 2  # nothing after the revoke
    assert len(requests) == 1
    assert roleplay is None
    assert session.channel_posts() == ["alice (AI) has left: the person withdrew consent."]
    assert "Consent withdrawn. 1 roleplay(s)" in session.replies()[-1]["content"]


def test_consent_revoked_while_the_reply_is_generated_drops_it(redis_url, tmp_path):
    import redis

    from inference.protocol import Keys

    sync = redis.Redis.from_url(redis_url)

    def revoke_then_answer(request):
        sync.delete(Keys(PREFIX).consent("discord", str(ALICE), str(GUILD)))  # the person revokes during generation
        return [["too late"]]

    async def scenario():
        async with FakeWorker(redis_url, answer=revoke_then_answer) as worker, discord_bot(redis_url, tmp_path) as h:
            await h.command(ALICE, "consent", "grant")
            await h.command(ADMIN, "roleplay", "start", permissions=MANAGE_GUILD, persona="alice")
            await h.say(CAROL, "hello")
            return h.session, worker.requests, await h.cog.registry.roleplay(str(CHANNEL))

    session, requests, roleplay = run(scenario())
    sync.close()
    assert len(requests) == 1 and session.hook_posts() == []
    assert roleplay is None  # ended when the missing consent was noticed


def test_reactions_become_feedback_and_forget_deletes(redis_url, tmp_path):
    async def scenario():
        async with FakeWorker(redis_url), discord_bot(redis_url, tmp_path) as h:
            await h.command(ALICE, "consent", "grant")
            await h.command(CAROL, "consent", "grant")  # carol opts in: her messages may be training context
            await h.command(ADMIN, "roleplay", "start", permissions=MANAGE_GUILD, persona="alice")
            await h.say(CAROL, "how was the trip?")
            await h.say(ALICE, "the real alice says hi")
            assert h.session.hook_posts()
            persona_message = str(h.session._next_id - 1)  # the 2nd webhook message (alice's own came after)
            await h.react(CAROL, persona_message, "👍")  # not the owner nor alice: ignored, nothing stored
            await h.react(ALICE, persona_message, "👍")  # the simulated person judges her imitation
            await h.react(ALICE, persona_message, "👎")
            await h.react(ALICE, persona_message, "🎉")  # not feedback
            await h.react(ALICE, "123", "👍")  # not a persona message
            events = await feedback_events(h.bot.redis)
            history = await h.cog.core.history(str(CHANNEL))
            await h.command(ALICE, "forget")
            await h.command(CAROL, "forget")
            after = await feedback_events(h.bot.redis)
            history_after = await h.cog.core.history(str(CHANNEL))
            drafts_after = await h.bot.redis.keys(f"{PREFIX}:draft:*")
            return events, history, after, history_after, drafts_after, h.session.replies()

    events, history, after, history_after, drafts_after, replies = run(scenario())
    assert [e.kind for e in events] == ["shown", "liked", "disliked"]
    liked = events[1]
    assert liked.candidate == ["alice/friend #0 re: how was the trip?", "second msg"] and liked.target == "ALICE"
    assert [(m.speaker, m.text) for m in liked.context] == [("CAROL", "how was the trip?")]
    assert liked.platform == "discord"
    assert [m.speaker for m in history] == ["CAROL", "ALICE", "ALICE", "ALICE"]
    assert after == [] and drafts_after == []
    assert [m.speaker for m in history_after] == ["CAROL"]
    assert "Deleted 3 history message(s), 1 draft(s) and 3 feedback event(s)" in replies[-2]["content"]
    assert "you have no persona here" in replies[-1]["content"]


def test_worker_timeout_gives_a_clear_message_in_the_channel(redis_url, tmp_path):
    async def scenario():
        async with FakeWorker(redis_url, answer=lambda r: None), \
                discord_bot(redis_url, tmp_path, reply_timeout_s=0.3) as h:
            await h.command(ALICE, "consent", "grant")
            await h.command(ADMIN, "roleplay", "start", permissions=MANAGE_GUILD, persona="alice")
            await h.say(CAROL, "hello?")
            return h.session

    session = run(scenario())
    assert session.channel_posts() == ["alice (AI) can't answer right now (the model worker did not reply); "
                                       "try again shortly."]
    assert session.hook_posts() == []


def test_roleplay_in_a_thread_speaks_through_the_parent_webhook_into_the_thread(redis_url, tmp_path):
    async def scenario():
        async with FakeWorker(redis_url), discord_bot(redis_url, tmp_path) as h:
            await h.command(ALICE, "consent", "grant")
            await h.command(ADMIN, "roleplay", "start", permissions=MANAGE_GUILD, channel=THREAD, persona="alice")
            await h.say(CAROL, "thread question", channel=THREAD)
            await h.say(CAROL, "main channel chat")  # no roleplay in the parent channel itself
            return h.session, await h.cog.registry.roleplay(str(THREAD))

    session, roleplay = run(scenario())
    assert "alice (AI) will answer" in session.replies()[-1]["content"] and roleplay.guild == str(GUILD)
    creates = [(p, b["name"]) for m, p, b in session.calls if m == "POST" and p.endswith("/webhooks")]
    assert creates == [(f"/channels/{CHANNEL}/webhooks", "alice (AI)")]  # the parent's webhook
    assert [p["content"] for p in session.hook_posts(thread=THREAD)] == ["alice/friend #0 re: thread question",
                                                                         "second msg"]
    assert session.hook_posts() == []  # nothing landed in the parent channel


def test_consent_in_one_server_does_not_allow_roleplay_in_another(redis_url, tmp_path):
    import redis

    from bot.consent import ConsentRecord
    from inference.protocol import Keys

    sync = redis.Redis.from_url(redis_url)

    async def scenario():
        async with FakeWorker(redis_url) as worker, discord_bot(redis_url, tmp_path) as h:
            # A global grant from before consent was per server counts nowhere; its holder is told to grant again.
            sync.set(Keys(PREFIX).consent("discord", str(ALICE)), ConsentRecord(user_id=str(ALICE)).model_dump_json())
            await h.command(ADMIN, "roleplay", "start", permissions=MANAGE_GUILD, persona="alice")
            await h.command(ALICE, "consent", "status")
            await h.command(ALICE, "consent", "grant")  # in "friends" only
            # An admin of another server, where alice is not even a member, tries to borrow her consent.
            await h.command(ADMIN2, "roleplay", "start", permissions=MANAGE_GUILD, channel=CHANNEL2, persona="alice")
            await h.say(CAROL, "alice, you there?", channel=CHANNEL2)
            await h.command(ADMIN, "roleplay", "start", permissions=MANAGE_GUILD, persona="alice")
            await h.command(ALICE, "consent", "status")
            return (h.session, worker.requests, await h.cog.registry.roleplay(str(CHANNEL2)),
                    await h.cog.registry.roleplay(str(CHANNEL)))

    session, requests, elsewhere, here = run(scenario())
    sync.close()
    replies = [r["content"] for r in session.replies()]
    assert "has not opted in in this server" in replies[0]
    assert "no longer counts" in replies[1] and "/consent grant" in replies[1]
    assert "in this server (not in others)" in replies[2]
    assert "has not opted in in this server" in replies[3]
    assert elsewhere is None and requests == [] and session.hook_posts() == []
    assert "alice (AI) will answer" in replies[4] and here.guild == str(GUILD)
    assert "You opted in in this server" in replies[5]


def test_slow_forget_and_revoke_are_deferred_before_the_work(redis_url, tmp_path):
    async def scenario():
        async with FakeWorker(redis_url), discord_bot(redis_url, tmp_path) as h:
            await h.command(ALICE, "consent", "grant")
            await h.command(ADMIN, "roleplay", "start", permissions=MANAGE_GUILD, persona="alice")
            await h.say(CAROL, "hi")
            h.slow(h.cog.core, "forget_persona")
            h.slow(h.cog.registry, "revoke")
            await h.command(ALICE, "forget")
            await h.command(ALICE, "consent", "revoke")
            return h.session

    session = run(scenario())
    for work in ("forget_persona", "revoke"):
        at = session.calls.index(("WORK", work, {}))
        before = [(p, b) for m, p, b in session.calls[:at] if m == "POST"][-1]
        after = [(p, b) for m, p, b in session.calls[at:] if m == "POST"]
        assert before[0].endswith("/callback") and before[1] == {"type": 5, "data": {"flags": 64}}  # deferred
        assert re.fullmatch(rf"/webhooks/{BOT_ID}/itok\d+", after[-1][0]) and after[-1][1]["flags"] & 64
    assert "Deleted 2 history message(s), 1 draft(s)" in session.replies()[-2]["content"]
    assert "Consent withdrawn. 1 roleplay(s)" in session.replies()[-1]["content"]
    assert session.channel_posts() == ["alice (AI) has left: the person withdrew consent."]


def test_mention_with_text_is_not_a_command_and_its_text_never_reaches_the_logs(redis_url, tmp_path, caplog):
    caplog.set_level(logging.INFO)

    async def scenario():
        async with FakeWorker(redis_url), discord_bot(redis_url, tmp_path) as h:
            await h.gateway_message(CAROL, f"<@{BOT_ID}> pineapple tell me a secret")  # no roleplay here
            await h.command(ALICE, "consent", "grant")
            await h.command(ADMIN, "roleplay", "start", permissions=MANAGE_GUILD, persona="alice")
            await h.gateway_message(CAROL, f"<@{BOT_ID}> kumquat what do you think?")  # the persona answers it
            return h.session

    session = run(scenario())
    assert [p["content"] for p in session.hook_posts()][0].endswith("kumquat what do you think?")
    assert "pineapple" not in caplog.text and "kumquat" not in caplog.text
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_channel_with_fifteen_webhooks_gets_a_clear_message(redis_url, tmp_path):
    async def scenario():
        async with FakeWorker(redis_url), discord_bot(redis_url, tmp_path) as h:
            h.session.webhooks[str(CHANNEL)] = [  # other integrations' webhooks fill the channel
                {"id": str(7000 + i), "type": 1, "channel_id": str(CHANNEL), "guild_id": str(GUILD),
                 "name": f"other {i}", "token": None} for i in range(15)]
            await h.command(ALICE, "consent", "grant")
            await h.command(ADMIN, "roleplay", "start", permissions=MANAGE_GUILD, persona="alice")
            await h.say(CAROL, "hello")
            return h.session

    session = run(scenario())
    create = [(i, c) for i, c in enumerate(session.calls) if c[0] == "POST" and c[1].endswith("/webhooks")]
    assert len(create) == 1 and session.hook_posts() == []
    assert session.channel_posts() == ["alice (AI) can't speak here: this channel already has 15 webhooks, "
                                       "Discord's maximum. Delete one (channel settings -> Integrations -> "
                                       "Webhooks), then write again."]


def test_messages_of_members_who_did_not_opt_in_are_short_lived_context_never_training_data(redis_url, tmp_path):
    async def scenario():
        async with FakeWorker(redis_url) as worker, discord_bot(redis_url, tmp_path) as h:
            await h.command(ALICE, "consent", "grant")
            await h.command(ADMIN, "consent", "grant")
            await h.command(ADMIN, "roleplay", "start", permissions=MANAGE_GUILD, persona="alice")
            await h.say(ADMIN, "admin opted in")
            await h.say(CAROL, "carol did not")
            written = time.time()
            key = f"{PREFIX}:private:discord:{CHANNEL}"
            scores = [s for _, s in await h.bot.redis.zrange(key, 0, -1, withscores=True)]
            ttl_s = await h.bot.redis.ttl(key)
            history = await h.cog.core.history(str(CHANNEL))
            events = await feedback_events(h.bot.redis)
            draft = await h.cog._draft_of_message(str(CHANNEL), str(h.session._next_id))
            await h.react(ALICE, str(h.session._next_id), "👍")  # on a reply to carol: not recorded
            after_reaction = await feedback_events(h.bot.redis)
            # Each private message expires on its own: move carol's expiry into the past.
            await h.bot.redis.zadd(key, {m: written - 1 for m in await h.bot.redis.zrange(key, 0, -1)})
            context_later = await h.cog.core.context(str(CHANNEL))
            return (worker.requests, written, scores, ttl_s, history, events, draft, after_reaction, context_later,
                    await h.bot.redis.exists(key))

    requests, written, scores, ttl_s, history, events, draft, after, later, key_left = run(scenario())
    # The worker saw carol's message as context...
    assert [(m.speaker, m.text) for m in requests[-1].history] == [
        ("ADMIN", "admin opted in"), ("ALICE", "alice/friend #0 re: admin opted in"), ("ALICE", "second msg"),
        ("CAROL", "carol did not")]
    # ...but it is kept only in the private context, for an hour (discord.private_context_ttl_min = 60)...
    assert len(scores) == 1 and abs(scores[0] - (written + 3600)) < 60 and 3500 < ttl_s <= 3600
    assert "CAROL" not in {m.speaker for m in history}
    # ...and nothing that becomes training data holds it: not the draft, not a feedback event.
    assert draft.withheld == 1 and "carol did not" not in {m.text for m in draft.context}
    assert events and all("carol did not" not in {m.text for m in e.context} for e in events)
    assert after == events
    assert [m.text for m in later] == ["admin opted in", "alice/friend #0 re: admin opted in", "second msg",
                                       "alice/friend #0 re: carol did not", "second msg"]
    assert key_left == 0


def test_member_named_like_the_persona_is_never_recorded_as_the_persona(redis_url, tmp_path):
    async def scenario():
        async with FakeWorker(redis_url) as worker, discord_bot(redis_url, tmp_path) as h:
            await h.command(ALICE, "consent", "grant")
            await h.command(NAMEALIKE, "consent", "grant")  # opted in: her messages are kept, under her own tag
            await h.command(ADMIN, "roleplay", "start", permissions=MANAGE_GUILD, persona="alice")
            await h.say(NAMEALIKE, "I am the real alice, honest")
            return worker.requests, await h.cog.core.history(str(CHANNEL))

    requests, history = run(scenario())
    assert [m.speaker for m in requests[0].history] == ["ALICE_"]
    assert [m.speaker for m in history] == ["ALICE_", "ALICE", "ALICE"]  # then the persona's own reply
