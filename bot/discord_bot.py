"""`convo serve discord`: roleplay of a friend who opted in, in a Discord channel, through a webhook.

* Consent is the simulated person's own and belongs to one server: `/consent grant`, `/consent revoke`,
  `/consent status`, set only for oneself, in the server where it is run. `/forget` deletes one's drafts, feedback
  events and history messages.
* `/roleplay start persona:NAME` (bot owners or members with Manage Server) works only while the Discord user mapped
  to NAME in `discord.users` consents in that server; `/roleplay stop` ends it. While active, the persona answers
  channel (or thread) messages through a webhook of the channel named "NAME (AI)" with the person's avatar (in a
  thread: the parent channel's webhook, posting into the thread). Consent is checked before generating and again
  before posting, so a revoke stops the very next reply; `/consent revoke` also posts a notice.
* Messages of members who have not opted in in that server are private context (bot/core.py): the worker sees
  them, they expire after `discord.private_context_ttl_min` and never reach a draft or a feedback event.
* 👍/👎 reactions on the persona's messages (`on_raw_reaction_add`) by the bot's owners or the simulated person
  become `liked`/`disliked` feedback events, unless the reply answered private context (an event without what the
  persona answered would teach it nonsense); other members' reactions are ignored.
* Slash commands only: no text commands, so "@bot some text" is not parsed (nor logged).

Needs the privileged Message Content intent (Developer Portal -> Bot -> Privileged Gateway Intents).
"""

from __future__ import annotations

import logging

import discord
from discord import app_commands
from discord.ext import commands

from bot.consent import ConsentRegistry, RoleplayRecord
from bot.core import (
    BotConfig,
    BotCore,
    DraftRecord,
    Persona,
    PersonaBook,
    check_persona_name,
    connect_redis,
    ping_redis,
)
from errors import ConfigError, ConvoError
from inference.client import WorkerError, WorkerTimeout
from inference.prompt_format import make_tag

logger = logging.getLogger(__name__)

PLATFORM = "discord"
FEEDBACK_EMOJI = {"👍": "liked", "👎": "disliked"}
MAX_WEBHOOKS_REACHED = 30007  # Discord's JSON error code: the channel already has 15 webhooks


def webhook_name(persona: str) -> str:
    """The name of the channel webhook a persona speaks through: "NAME (AI)", marked as AI for everyone."""
    return f"{persona} (AI)"[:80]


class RoleplayCog(commands.Cog):
    """Consent, roleplay and feedback commands and listeners."""

    consent = app_commands.Group(name="consent", description="Your own opt-in to be simulated in this server",
                                 guild_only=True)
    roleplay = app_commands.Group(name="roleplay", description="A consenting friend's AI persona in this channel",
                                  guild_only=True)

    def __init__(self, bot: commands.Bot, settings, redis):
        self.bot = bot
        self.settings = settings
        self.owner_ids = set(settings.discord.owner_ids)
        self.users = {str(k): check_persona_name(v, f"discord.users[{k}]")  # user id -> persona
                      for k, v in settings.discord.users.items()}
        self.config = BotConfig.from_settings(settings)
        self.book = PersonaBook(self.config.adapters_dir)
        self.core = BotCore(redis, self.config, PLATFORM)
        self.registry = ConsentRegistry(redis, self.core.keys, PLATFORM)
        self.private_ttl_s = settings.discord.private_context_ttl_min * 60

    def _user_of(self, persona: str) -> str | None:
        return next((uid for uid, name in self.users.items() if name == persona), None)

    # ------------------------------------------------------------ consent

    @consent.command(name="grant", description="Allow roleplays of you in this server (only you can do this)")
    async def consent_grant(self, interaction: discord.Interaction) -> None:
        """Record the caller's own consent in this server."""
        uid = str(interaction.user.id)
        await self.registry.grant(uid, str(interaction.guild_id))
        persona = self.users.get(uid)
        note = (f" Members with Manage Server here can now start `/roleplay start persona:{persona}`." if persona
                else " No persona is configured for you yet, so nobody can roleplay you until the bot owner adds "
                "one.")
        await interaction.response.send_message(
            "You opted in to being simulated by this bot in this server (not in others)." + note + " Your messages "
            "in roleplay channels here may now be kept with the persona's replies as training data. "
            "`/consent revoke` ends it at any time.", ephemeral=True)

    @consent.command(name="revoke", description="Withdraw your consent here; roleplays of you here stop at once")
    async def consent_revoke(self, interaction: discord.Interaction) -> None:
        """Withdraw the caller's consent in this server and end every roleplay of them there, with notices."""
        # Answer within Discord's 3 s first: the work below scans Redis and posts in every channel concerned.
        await interaction.response.defer(ephemeral=True)
        ended = await self.registry.revoke(str(interaction.user.id), str(interaction.guild_id))
        for record in ended:
            await self._notify(record, f"{webhook_name(record.persona)} has left: the person withdrew consent.")
        await interaction.followup.send(
            f"Consent withdrawn. {len(ended)} roleplay(s) of you stopped. `/forget` deletes what was stored.",
            ephemeral=True)

    @consent.command(name="status", description="Whether you currently allow roleplays of you in this server")
    async def consent_status(self, interaction: discord.Interaction) -> None:
        """Tell the caller whether their consent is active in this server."""
        uid = str(interaction.user.id)
        record = await self.registry.status(uid, str(interaction.guild_id))
        if record is not None:
            text = f"You opted in in this server on {record.granted_at:%Y-%m-%d %H:%M} UTC."
        elif await self.registry.legacy(uid) is not None:
            text = ("Your earlier opt-in was for every server and no longer counts: consent is now per server. "
                    "Run `/consent grant` here (and in each server where you allow it).")
        else:
            text = "You have not opted in in this server: nobody can roleplay you here."
        await interaction.response.send_message(text, ephemeral=True)

    @app_commands.command(name="forget", description="Delete your drafts, feedback events and history messages")
    async def forget(self, interaction: discord.Interaction) -> None:
        """Delete everything stored about the caller's persona on Discord."""
        # Answer within Discord's 3 s first: forgetting scans every history, draft and feedback event.
        await interaction.response.defer(ephemeral=True)
        name = self.users.get(str(interaction.user.id))
        if name is None:
            text = "Nothing is stored about you: you have no persona here."
        else:
            counts = await self.core.forget_persona(self.book.get(name))
            text = (f"Deleted {counts['messages']} history message(s), {counts['drafts']} draft(s) and "
                    f"{counts['events']} feedback event(s) not yet archived.")
        await interaction.followup.send(text, ephemeral=True)

    # ------------------------------------------------------------ roleplay

    @roleplay.command(name="start", description="Let a consenting friend's persona answer in this channel")
    @app_commands.describe(persona="The persona name (its Discord user must have run /consent grant)")
    async def roleplay_start(self, interaction: discord.Interaction, persona: str) -> None:
        """Start a roleplay in this channel if the caller may and the person consents."""
        permissions = interaction.permissions
        if interaction.user.id not in self.owner_ids and not permissions.manage_guild:
            await interaction.response.send_message("Only the bot owner or members with Manage Server can start "
                                                    "a roleplay.", ephemeral=True)
            return
        try:
            self.book.get(persona)
        except ConvoError as e:
            await interaction.response.send_message(str(e), ephemeral=True)
            return
        uid = self._user_of(persona)
        if uid is None:
            await interaction.response.send_message(
                f"{persona} is not linked to a Discord user in this bot's config, so it cannot be roleplayed.",
                ephemeral=True)
            return
        if await self.registry.status(uid, str(interaction.guild_id)) is None:
            await interaction.response.send_message(
                f"{persona} has not opted in in this server: they must run `/consent grant` here themself first.",
                ephemeral=True)
            return
        if _webhook_channel(interaction.channel) is None:
            await interaction.response.send_message(
                "A persona can only speak in a text channel or a thread of one (it needs a channel webhook).",
                ephemeral=True)
            return
        await self.registry.start(RoleplayRecord(channel=str(interaction.channel_id), persona=persona, user_id=uid,
                                                 started_by=str(interaction.user.id),
                                                 guild=str(interaction.guild_id)))
        logger.info("roleplay started persona=%s channel=%s", persona, interaction.channel_id)
        await interaction.response.send_message(
            f"{webhook_name(persona)} will answer messages here: an AI trained on {persona}'s texts, with their "
            "consent. `/roleplay stop` ends it.")

    @roleplay.command(name="stop", description="End the roleplay in this channel")
    async def roleplay_stop(self, interaction: discord.Interaction) -> None:
        """End the channel's roleplay (owner, Manage Server, or the simulated person)."""
        record = await self.registry.roleplay(str(interaction.channel_id))
        if record is None:
            await interaction.response.send_message("No roleplay is running here.", ephemeral=True)
            return
        allowed = (interaction.user.id in self.owner_ids or interaction.permissions.manage_guild
                   or str(interaction.user.id) == record.user_id)
        if not allowed:
            await interaction.response.send_message("Only the bot owner, members with Manage Server or the "
                                                    "person simulated can stop it.", ephemeral=True)
            return
        await self.registry.stop(record.channel)
        await interaction.response.send_message(f"{webhook_name(record.persona)} has left the channel.")

    # ------------------------------------------------------------ messages

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        """Record a channel message and, while a consented roleplay runs, answer as the persona."""
        if message.author.bot or message.webhook_id is not None or message.guild is None or not message.content:
            return
        channel_key = str(message.channel.id)
        record = await self.registry.active(channel_key)
        if record is None:
            return  # no roleplay here: nothing is stored
        persona = self.book.get(record.persona)
        if str(message.author.id) == record.user_id:
            await self.core.add_message(channel_key, persona.tag, message.content)
            return  # the real person is talking: the persona stays quiet
        opted_in = await self.registry.status(str(message.author.id), str(message.guild.id)) is not None
        await self.core.add_message(channel_key, _member_tag(persona, message.author.display_name), message.content,
                                    private_ttl_s=None if opted_in else self.private_ttl_s)
        try:
            async with message.channel.typing():
                draft = await self.core.generate(channel_key, persona, "friend", n=1,
                                                 refs={"channel_id": channel_key})
        except (WorkerTimeout, WorkerError) as e:
            logger.warning("roleplay reply failed persona=%s: %s", persona.name, type(e).__name__)
            await message.channel.send(f"{webhook_name(persona.name)} can't answer right now (the model worker "
                                       "did not reply); try again shortly.")
            return
        await self._post(message.channel, record, persona, draft)

    async def _post(self, channel, record: RoleplayRecord, persona: Persona, draft: DraftRecord) -> None:
        """Post the persona's burst through the channel webhook, re-checking consent before each message."""
        if await self.registry.active(str(channel.id)) is None:
            logger.info("roleplay reply dropped: consent withdrawn persona=%s", persona.name)
            return
        try:
            webhook = await self._webhook(channel, persona.name)
        except discord.Forbidden:
            await channel.send(f"I need the Manage Webhooks permission here to speak as {webhook_name(persona.name)}.")
            return
        except discord.HTTPException as e:
            if e.code != MAX_WEBHOOKS_REACHED:
                raise
            logger.warning("roleplay reply dropped: channel has the maximum of webhooks persona=%s", persona.name)
            await channel.send(f"{webhook_name(persona.name)} can't speak here: this channel already has 15 webhooks, "
                               "Discord's maximum. Delete one (channel settings -> Integrations -> Webhooks), then "
                               "write again.")
            return
        avatar = await self._avatar(channel.guild, int(record.user_id))
        # In a thread the parent channel's webhook posts into the thread.
        where = {"thread": channel} if isinstance(channel, discord.Thread) else {}
        ids: list[str] = []

        async def send(text: str) -> None:
            if await self.registry.active(str(channel.id)) is None:
                raise _ConsentGone
            sent = await webhook.send(text, username=webhook_name(persona.name), avatar_url=avatar, wait=True,
                                      **where)
            ids.append(str(sent.id))

        try:
            await self.core.deliver(draft.candidates[0], send=send, typing=lambda: channel.typing())
        except _ConsentGone:
            logger.info("roleplay reply dropped: consent withdrawn persona=%s", persona.name)
        if ids:
            draft = draft.model_copy(update={"refs": {**draft.refs, "message_ids": ",".join(ids)}})
            await self.core.save_draft(draft)
            await self.core.add_messages(str(channel.id), persona.tag, draft.candidates[0][: len(ids)])

    @staticmethod
    async def _avatar(guild: discord.Guild, user_id: int) -> str | None:
        """The person's avatar URL (from the member cache, else one REST lookup; no members intent needed)."""
        member = guild.get_member(user_id)
        if member is None:
            try:
                member = await guild.fetch_member(user_id)
            except discord.HTTPException:
                return None
        return member.display_avatar.url

    async def _webhook(self, channel, persona: str) -> discord.Webhook:
        """The "NAME (AI)" webhook this bot made in the channel (a thread's parent), created on first use."""
        name = webhook_name(persona)
        target = _webhook_channel(channel)
        for hook in await target.webhooks():
            if hook.name == name and hook.token:
                return hook
        return await target.create_webhook(name=name, reason="convo roleplay (the person consented)")

    async def _notify(self, record: RoleplayRecord, text: str) -> None:
        channel = self.bot.get_channel(int(record.channel))
        if channel is not None:
            await channel.send(text)

    # ------------------------------------------------------------ reactions

    @commands.Cog.listener()
    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        """👍 / 👎 by an owner or the simulated person on a persona message becomes a liked / disliked event."""
        kind = FEEDBACK_EMOJI.get(str(payload.emoji))
        if kind is None or (self.bot.user is not None and payload.user_id == self.bot.user.id):
            return
        draft = await self._draft_of_message(str(payload.channel_id), str(payload.message_id))
        if draft is None:
            return
        # Only the bot's owners and the simulated person themself judge the imitation; other members' reactions
        # are not stored (they did not opt in to anything).
        if payload.user_id not in self.owner_ids and str(payload.user_id) != self._user_of(draft.persona):
            return
        if draft.withheld:
            # The reply answered members who did not opt in; without their messages the event would teach the
            # persona a reply to nothing.
            logger.info("reaction not recorded draft=%s: its context was private", draft.id)
            return
        await self.core.feedback(draft, kind, 0)

    async def _draft_of_message(self, channel: str, message_id: str) -> DraftRecord | None:
        ids = await self.core.redis.smembers(self.core.keys.chat_drafts(PLATFORM, channel))
        for raw_id in ids:
            draft_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
            try:
                draft = await self.core.get_draft(draft_id)
            except ConvoError:
                continue
            if message_id in draft.refs.get("message_ids", "").split(","):
                return draft
        return None

    async def cog_app_command_error(self, interaction: discord.Interaction, error: Exception) -> None:
        """Log the error and tell the user something short and true."""
        logger.error("discord command failed", exc_info=error)
        text = "Something went wrong on my side; try again shortly."
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True)
        else:
            await interaction.response.send_message(text, ephemeral=True)


class _ConsentGone(Exception):
    """Consent was withdrawn while a reply was being posted."""


def _webhook_channel(channel):
    """The channel whose webhooks speak in `channel` (a thread's parent), or None where webhooks cannot."""
    target = channel.parent if isinstance(channel, discord.Thread) else channel
    return target if hasattr(target, "create_webhook") else None


def _member_tag(persona: Persona, display_name: str) -> str:
    """The tag of a member other than the person simulated: never the persona's own, whatever their name."""
    tag = persona.tag_for(display_name)
    return tag if tag != persona.tag else make_tag(display_name, reserved={persona.tag, persona.me_tag})


class ConvoDiscordBot(commands.Bot):
    """The Discord client: opens Redis and adds the cog in setup_hook, syncs slash commands. Slash commands only:
    `on_message` is overridden so no text command is ever parsed (the prefix below is never used)."""

    def __init__(self, settings, redis=None, sync_commands: bool = True):
        intents = discord.Intents.default()
        intents.message_content = True  # privileged: enable it in the Developer Portal
        intents.members = False
        super().__init__(command_prefix=commands.when_mentioned, intents=intents, help_command=None)
        self.settings = settings
        self.redis = redis
        self.sync_commands = sync_commands

    async def setup_hook(self) -> None:
        """Open Redis, add the cog and sync the slash commands (to `discord.guild_ids` at once, else globally)."""
        if self.redis is None:
            self.redis = connect_redis(self.settings)
        await ping_redis(self.redis, self.settings.redis.url)
        await self.add_cog(RoleplayCog(self, self.settings, self.redis))
        if self.sync_commands:
            for guild_id in self.settings.discord.guild_ids:
                guild = discord.Object(id=guild_id)
                self.tree.copy_global_to(guild=guild)
                await self.tree.sync(guild=guild)
            if not self.settings.discord.guild_ids:
                await self.tree.sync()

    async def on_message(self, message: discord.Message, /) -> None:
        """No text commands: "@bot some text" is a message like any other (the cog's listener sees it), never a
        command lookup that would log its first word as an unknown command."""

    async def close(self) -> None:
        """Close the gateway, then Redis."""
        await super().close()
        if self.redis is not None:
            await self.redis.aclose()

    async def on_error(self, event_method: str, /, *args, **kwargs) -> None:
        """A listener failed: log it; the bot keeps running."""
        logger.exception("discord event %s failed", event_method)


def build_bot(settings, redis=None, sync_commands: bool = True) -> ConvoDiscordBot:
    """The Discord bot, after checking the settings it needs."""
    if settings.discord.token is None:
        raise ConfigError("discord.token is not set (CONVO_DISCORD__TOKEN or [discord] token in the config)")
    return ConvoDiscordBot(settings, redis=redis, sync_commands=sync_commands)


def run_bot(settings) -> None:
    """Run the Discord bot until Ctrl-C."""
    import aiohttp

    bot = build_bot(settings)
    try:
        bot.run(settings.discord.token.get_secret_value(), log_handler=None)
    except discord.LoginFailure as e:
        raise ConfigError("discord.token was rejected by Discord: reset it in the Developer Portal (Bot tab)") from e
    except discord.PrivilegedIntentsRequired as e:
        raise ConfigError("enable the Message Content intent: Developer Portal -> Bot -> Privileged Gateway "
                          "Intents") from e
    except (aiohttp.ClientError, OSError) as e:
        raise ConfigError(f"cannot reach Discord ({e}); check the network and try again") from e
