"""The Discord bot: real discord.py objects (ConnectionState, Guild, Message, Interaction) built from gateway
payloads, slash commands run through the real CommandTree, HTTP answered by a recording fake session (no network),
the real Redis and a fake worker."""

from __future__ import annotations

import asyncio
import json
import re
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import pytest

from tests.bot_helpers import PREFIX, FakeWorker, feedback_events, run

pytestmark = pytest.mark.redis

GUILD, CHANNEL, BOT_ID = 100, 200, 999
ALICE, CAROL, ADMIN = 301, 302, 303  # alice is simulated, carol chats, admin has Manage Server
MANAGE_GUILD = 1 << 5
NOW = datetime.now(UTC).isoformat()


def _user(uid: int, name: str, bot: bool = False) -> dict:
    return {"id": str(uid), "username": name, "global_name": name.title(), "discriminator": "0", "avatar": None,
            "bot": bot}


def _member(uid: int, name: str) -> dict:
    return {"user": _user(uid, name), "roles": [], "joined_at": NOW, "deaf": False, "mute": False, "flags": 0}


class FakeResponse:
    def __init__(self, status: int, body):
        self.status = status
        self.reason = "OK" if status < 300 else "Bad Request"
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
        self.calls: list[tuple[str, str, dict]] = []
        self.unexpected: list[str] = []
        self.webhooks: list[dict] = []
        self._next_id = 5000
        self.closed = False

    def _id(self) -> str:
        self._next_id += 1
        return str(self._next_id)

    def _message(self, channel: str, content: str, author: dict) -> dict:
        return {"id": self._id(), "channel_id": channel, "guild_id": str(GUILD), "author": author, "content": content,
                "timestamp": NOW, "edited_timestamp": None, "tts": False, "mention_everyone": False, "mentions": [],
                "mention_roles": [], "attachments": [], "embeds": [], "pinned": False, "type": 0}

    def request(self, method: str, url: str, data=None, **kwargs) -> FakeResponse:
        path = url.split("/api/v10", 1)[-1].split("?")[0]
        body = json.loads(data) if isinstance(data, str) and data else {}
        self.calls.append((method, path, body))
        if method == "POST" and re.fullmatch(r"/interactions/\d+/[^/]+/callback", path):
            return FakeResponse(200, {"interaction": {"id": path.split("/")[2], "type": 2}})
        if method == "GET" and path == f"/channels/{CHANNEL}/webhooks":
            return FakeResponse(200, self.webhooks)
        if method == "POST" and path == f"/channels/{CHANNEL}/webhooks":
            hook = {"id": self._id(), "type": 1, "channel_id": str(CHANNEL), "guild_id": str(GUILD),
                    "name": body["name"], "token": "hooktoken", "user": _user(BOT_ID, "convo", bot=True)}
            self.webhooks.append(hook)
            return FakeResponse(200, hook)
        if method == "POST" and re.fullmatch(r"/webhooks/\d+/hooktoken", path):
            author = _user(int(path.split("/")[2]), body.get("username", "hook"), bot=True)
            msg = self._message(str(CHANNEL), body["content"], author)
            msg["webhook_id"] = path.split("/")[2]
            return FakeResponse(200, msg)
        if method == "POST" and path == f"/channels/{CHANNEL}/messages":
            return FakeResponse(200, self._message(str(CHANNEL), body["content"], _user(BOT_ID, "convo", bot=True)))
        if method == "GET" and path == f"/guilds/{GUILD}/members/{ALICE}":
            member = _member(ALICE, "alice")
            member["user"]["avatar"] = "a1b2c3"
            return FakeResponse(200, member)
        if method == "POST" and path == f"/channels/{CHANNEL}/typing":
            return FakeResponse(204, None)
        self.unexpected.append(f"{method} {path}")
        return FakeResponse(400, {"message": f"unexpected {method} {path}", "code": 0})

    async def close(self):
        self.closed = True

    def hook_posts(self) -> list[dict]:
        return [b for m, p, b in self.calls if m == "POST" and p.startswith("/webhooks/")]

    def channel_posts(self) -> list[str]:
        return [b["content"] for m, p, b in self.calls if m == "POST" and p == f"/channels/{CHANNEL}/messages"]

    def replies(self) -> list[dict]:
        """The data of every interaction response (content, flags)."""
        return [b["data"] for m, p, b in self.calls if p.endswith("/callback")]


def _settings(redis_url, tmp_path, **bot):
    from config.settings import Settings

    return Settings(
        redis={"url": redis_url, "prefix": PREFIX},
        bot={"adapters_dir": str(tmp_path / "adapters"), "typing_s_per_char": 0.0, "reply_timeout_s": 5.0, **bot},
        discord={"token": "discord-test-token", "owner_ids": [], "users": {str(ALICE): "alice"}},
    )


class Harness:
    """A bot whose state holds one guild with one text channel, fed gateway payloads."""

    def __init__(self, bot, session: RecordingSession):
        import discord

        self.bot, self.session = bot, session
        state = bot._connection
        self.state = state
        state.user = discord.ClientUser(state=state, data=_user(BOT_ID, "convo", bot=True))
        state.application_id = BOT_ID
        guild = discord.Guild(state=state, data={
            "id": str(GUILD), "name": "friends", "owner_id": str(ADMIN), "features": [], "emojis": [], "stickers": [],
            "roles": [{"id": str(GUILD), "name": "@everyone", "permissions": str(1 << 10 | 1 << 11), "position": 0,
                       "color": 0, "hoist": False, "managed": False, "mentionable": False}],
            "channels": [{"id": str(CHANNEL), "type": 0, "name": "general", "position": 0,
                          "permission_overwrites": [], "guild_id": str(GUILD)}],
            "members": [_member(ALICE, "alice"), _member(CAROL, "carol"), _member(ADMIN, "admin")],
        })
        state._add_guild(guild)
        self.guild = guild
        self.channel = guild.get_channel(CHANNEL)
        self.cog = bot.get_cog("RoleplayCog")
        self.n = 0

    def _next(self) -> str:
        self.n += 1
        return str(self.n)

    async def say(self, author: int, text: str) -> None:
        """A member posts in the channel (MESSAGE_CREATE)."""
        import discord

        name = {ALICE: "alice", CAROL: "carol", ADMIN: "admin"}[author]
        data = self.session._message(str(CHANNEL), text, _user(author, name))
        data["member"] = {"roles": [], "joined_at": NOW, "deaf": False, "mute": False, "flags": 0}
        await self.cog.on_message(discord.Message(state=self.state, channel=self.channel, data=data))

    async def command(self, user: int, name: str, sub: str | None = None, permissions: int = 0, **options) -> None:
        """A member runs a slash command (INTERACTION_CREATE through the real CommandTree)."""
        import discord

        opts = [{"type": 3, "name": k, "value": v} for k, v in options.items()]
        data = {"id": "1", "name": name, "type": 1,
                "options": [{"type": 1, "name": sub, "options": opts}] if sub else opts}
        member = _member(user, {ALICE: "alice", CAROL: "carol", ADMIN: "admin"}[user])
        member["permissions"] = str(permissions)
        payload = {"id": self._next(), "application_id": str(BOT_ID), "type": 2, "token": f"itok{self.n}",
                   "version": 1, "guild_id": str(GUILD), "channel_id": str(CHANNEL),
                   "channel": {"id": str(CHANNEL), "type": 0, "guild_id": str(GUILD), "name": "general"},
                   "member": member, "app_permissions": "0", "locale": "en-US", "guild_locale": "en-US",
                   "entitlements": [], "authorizing_integration_owners": {}, "attachment_size_limit": 8388608,
                   "data": data}
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
        sync.delete(Keys(PREFIX).consent("discord", str(ALICE)))  # the person revokes during generation
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
            await h.command(ADMIN, "roleplay", "start", permissions=MANAGE_GUILD, persona="alice")
            await h.say(CAROL, "how was the trip?")
            await h.say(ALICE, "the real alice says hi")
            hook_ids = [c for c in h.session.calls if c[1].startswith("/webhooks/")]
            assert hook_ids
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
