"""Consent and active roleplays, in Redis: a person is simulated only while their own opt-in stands.

    {prefix}:consent:{platform}:{guild}:{user_id}  ConsentRecord JSON; set and deleted only by that user, per server
    {prefix}:roleplay:{platform}:{channel}         RoleplayRecord JSON; one active roleplay per channel or thread

Consent belongs to one server (guild): a grant in one server lets nobody roleplay the person in another, so a
member with Manage Server elsewhere cannot borrow it. Grants from before consent was per server
(`{prefix}:consent:{platform}:{user_id}`) count nowhere; `status` reports them so the person can grant again.
Consent is checked before every reply, not only when a roleplay starts, so a revoke stops the next reply.
"""

from __future__ import annotations

import logging
from datetime import datetime

from pydantic import BaseModel, Field

from inference.protocol import Keys, utcnow

logger = logging.getLogger(__name__)


class ConsentRecord(BaseModel):
    """A person's own opt-in to be simulated in one server."""

    user_id: str
    guild: str | None = None  # None: a global grant from before consent was per server (counts nowhere)
    granted_at: datetime = Field(default_factory=utcnow)


class RoleplayRecord(BaseModel):
    """A persona answering in a channel, started by someone allowed to."""

    channel: str
    persona: str
    user_id: str  # the person simulated (whose consent it needs)
    started_by: str
    guild: str | None = None  # the server whose consent it needs (None: a record from before; it ends at once)
    started_at: datetime = Field(default_factory=utcnow)
    webhook_id: str | None = None


class ConsentRegistry:
    """Consents and roleplays of one platform."""

    def __init__(self, redis, keys: Keys, platform: str = "discord"):
        self.redis = redis
        self.keys = keys
        self.platform = platform

    async def grant(self, user_id: str, guild: str) -> ConsentRecord:
        """Record the user's opt-in in `guild` (idempotent: keeps the first grant time)."""
        record = ConsentRecord(user_id=user_id, guild=guild)
        await self.redis.set(self.keys.consent(self.platform, user_id, guild), record.model_dump_json(), nx=True)
        logger.info("consent granted user=%s guild=%s", user_id, guild)
        return await self.status(user_id, guild) or record

    async def status(self, user_id: str, guild: str | None) -> ConsentRecord | None:
        """The user's active consent in `guild`, or None (always None without a guild)."""
        if guild is None:
            return None
        raw = await self.redis.get(self.keys.consent(self.platform, user_id, guild))
        return ConsentRecord.model_validate_json(raw) if raw is not None else None

    async def legacy(self, user_id: str) -> ConsentRecord | None:
        """The user's global grant from before consent was per server (it allows nothing), or None."""
        raw = await self.redis.get(self.keys.consent(self.platform, user_id))
        return ConsentRecord.model_validate_json(raw) if raw is not None else None

    async def revoke(self, user_id: str, guild: str) -> list[RoleplayRecord]:
        """Withdraw the user's consent in `guild` (and any global grant of before) and end every roleplay of them
        there; returns the roleplays ended."""
        await self.redis.delete(self.keys.consent(self.platform, user_id, guild), self.keys.consent(self.platform,
                                                                                                   user_id))
        ended = [r for r in await self.roleplays() if r.user_id == user_id and r.guild in (guild, None)]
        for record in ended:
            await self.stop(record.channel)
        logger.info("consent revoked user=%s guild=%s roleplays_ended=%d", user_id, guild, len(ended))
        return ended

    async def start(self, record: RoleplayRecord) -> None:
        """Make `record` the channel's active roleplay (replacing any other)."""
        await self.redis.set(self.keys.roleplay(self.platform, record.channel), record.model_dump_json())

    async def stop(self, channel: str) -> RoleplayRecord | None:
        """End the channel's roleplay; returns it (None when there was none)."""
        record = await self.roleplay(channel)
        await self.redis.delete(self.keys.roleplay(self.platform, channel))
        return record

    async def roleplay(self, channel: str) -> RoleplayRecord | None:
        """The channel's active roleplay, or None."""
        raw = await self.redis.get(self.keys.roleplay(self.platform, channel))
        return RoleplayRecord.model_validate_json(raw) if raw is not None else None

    async def active(self, channel: str) -> RoleplayRecord | None:
        """The channel's roleplay if its person still consents in its server; one without consent ends here."""
        record = await self.roleplay(channel)
        if record is None:
            return None
        if await self.status(record.user_id, record.guild) is None:
            await self.stop(channel)
            return None
        return record

    async def roleplays(self) -> list[RoleplayRecord]:
        """Every active roleplay on this platform."""
        out = []
        async for key in self.redis.scan_iter(match=self.keys.roleplay(self.platform, "*"), count=500):
            raw = await self.redis.get(key)
            if raw is not None:
                out.append(RoleplayRecord.model_validate_json(raw))
        return out
