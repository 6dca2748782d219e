"""The platform-free bot core: chat history, personas, drafts, feedback events and burst delivery.

Telegram, Discord and `convo chat` all go through `BotCore`; it knows Redis and the wire format
(inference/protocol.py), never a platform and never a model.

    history   {prefix}:history:{platform}:{chat}   list of HistoryMessage JSON: the context window, TTL
    ids       {prefix}:msgids:{platform}:{chat}    hash platform message id -> "speaker|ts" of its history entry
                                                   (so an edit or deletion on the platform finds it), TTL
              {prefix}:private:{platform}:{chat}   people who did not opt in: context only, each message with a TTL
    drafts    {prefix}:draft:{id}                  DraftRecord JSON (context, candidates, platform refs), TTL
              {prefix}:drafts:{platform}:{chat}    set of a chat's draft ids (so /forget finds them)
    feedback  {prefix}:feedback                    FeedbackEvent entries, each complete on its own, and
                                                   MessageAmendment entries (a message edited or deleted)

A request's context is what `convo dataset` would have used: the chat's last `context_messages` messages that
sit in one session (no silence longer than `session_gap_min` between them, nor between the last one and now),
except that the window's start moves in blocks of `context_cut_messages` (`window_start`): a chat longer than the
window keeps its prompt's first messages for several turns, so the worker's prefix cache reuses their keys/values
instead of reading them again. The stored history is trimmed the same way, in one WATCH/MULTI transaction per
message, so it always holds exactly the window.
Messages of people who did not opt in (Discord members other than the person simulated) are private context: sent
to the worker, never kept in a draft or a feedback event, so never in training data. Speakers are prompt tags: a persona's tags come from its adapter's `convo_adapter.json`, so live names map to
the tags the adapter learned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import WatchError

from errors import ConfigError, ConvoError
from inference.client import WorkerClient, WorkerError, connect
from inference.prompt_format import ROLE_ME, make_tag
from inference.protocol import (
    MAX_HISTORY,
    MAX_TEXT_CHARS,
    FeedbackEvent,
    FeedbackKind,
    GenerateRequest,
    GenerateResponse,
    HistoryMessage,
    Keys,
    MessageAmendment,
    Mode,
    Partial,
    amendment_payload,
    entry_data,
    entry_payload,
    is_amendment,
    new_id,
    utcnow,
)

logger = logging.getLogger(__name__)
_PERSONA_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # the wire rule for persona names

DraftStatus = Literal["open", "sending", "sent", "edited", "closed"]


class DraftExpired(ConvoError):
    """A draft that is no longer stored (expired, forgotten, or never made here)."""


@dataclass(frozen=True, slots=True)
class BotConfig:
    """What the core needs from the settings (built once by the entry point with `from_settings`; the defaults
    live in config/settings.py only)."""

    prefix: str
    adapters_dir: Path
    context_messages: int
    session_gap_min: float
    history_ttl_s: int
    draft_ttl_s: int
    reply_timeout_s: float
    drafts: int
    temperature: float
    top_p: float
    max_new_tokens: int
    typing_s_per_char: float
    max_typing_s: float
    context_cut_messages: int

    @classmethod
    def from_settings(cls, settings, **overrides) -> BotConfig:
        """Build from `config.settings.Settings` (dataset context rules, generate sampling, bot section)."""
        b, d, g = settings.bot, settings.dataset, settings.generate
        fields = dict(
            prefix=settings.redis.prefix, adapters_dir=Path(b.adapters_dir),
            context_messages=min(d.context_messages, MAX_HISTORY), session_gap_min=d.session_gap_min,
            history_ttl_s=max(1, round(b.history_ttl_days * 86400)), draft_ttl_s=max(1, round(b.draft_ttl_hours * 3600)),
            reply_timeout_s=b.reply_timeout_s, drafts=b.drafts, temperature=g.temperature, top_p=g.top_p,
            max_new_tokens=g.max_new_tokens, typing_s_per_char=b.typing_s_per_char, max_typing_s=b.max_typing_s,
            context_cut_messages=b.context_cut_messages,
        )
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)


# ---------------------------------------------------------------- personas


@dataclass(frozen=True, slots=True)
class Persona:
    """A persona as the bots see it: its request name, its tag and the owner's tag in its adapter."""

    name: str
    tag: str
    me_tag: str = ROLE_ME
    display_name: str | None = None
    me_name: str | None = None
    version: str | None = None

    def target(self, mode: Mode) -> str:
        """The tag a candidate is written as: the persona's in friend mode, the owner's in self mode."""
        return self.tag if mode == "friend" else self.me_tag

    def tag_for(self, display_name: str) -> str:
        """The tag of someone else in a live chat: a known speaker's tag by name, else one made from the name."""
        folded = display_name.casefold()
        for name, tag in ((self.display_name, self.tag), (self.name, self.tag), (self.me_name, self.me_tag)):
            if name and name.casefold() == folded:
                return tag
        return make_tag(display_name, reserved={self.tag, self.me_tag})


def list_personas(adapters_dir: Path | str) -> list[str]:
    """Persona names with an adapter under `adapters_dir` (what /personas shows)."""
    from inference.versions import discover

    return sorted(discover(adapters_dir))


def load_persona(adapters_dir: Path | str, name: str) -> Persona:
    """The persona `name` with the tags its adapter learned; without an adapter dir, tags made from the name."""
    from inference.adapter_meta import read_adapter_meta
    from inference.versions import resolve

    persona_dir = Path(adapters_dir) / name
    if not persona_dir.is_dir():
        # The worker may serve adapters from another machine: fall back to the default tags of `convo dataset`.
        logger.warning("persona %s: no adapter dir under %s; using tags made from the name", name, adapters_dir)
        return Persona(name=name, tag=make_tag(name, reserved={ROLE_ME}), me_tag=ROLE_ME, display_name=name)
    adapter_dir, version = resolve(persona_dir)
    meta = read_adapter_meta(adapter_dir)
    me = meta.me
    return Persona(
        name=name, tag=meta.persona.tag, me_tag=me.tag if me else ROLE_ME, display_name=meta.persona.name,
        me_name=me.name if me else None, version=version,
    )


def check_persona_name(name: str, where: str = "persona") -> str:
    """`name` if it can be a persona (an adapter dir name on the wire), else ConfigError naming `where`."""
    if not isinstance(name, str) or not _PERSONA_RE.fullmatch(name):
        raise ConfigError(f"{where} {name!r}: use letters, digits, '.', '_' or '-' (an adapter dir name)")
    return name


class PersonaBook:
    """Persona lookups for one bot process, read from adapter metadata once per name."""

    def __init__(self, adapters_dir: Path | str):
        self.adapters_dir = Path(adapters_dir)
        self._cache: dict[str, Persona] = {}

    def get(self, name: str) -> Persona:
        """The persona `name`; ConfigError when the name cannot be an adapter dir."""
        if name not in self._cache:
            check_persona_name(name)
            self._cache[name] = load_persona(self.adapters_dir, name)
        return self._cache[name]

    def names(self) -> list[str]:
        """Persona names found under the adapters dir."""
        return list_personas(self.adapters_dir)


# ---------------------------------------------------------------- drafts


class DraftRecord(BaseModel):
    """A stored draft: everything a feedback event needs, so an event never requires a platform lookup."""

    model_config = ConfigDict(extra="ignore")

    id: str
    persona: str
    mode: Mode
    platform: str
    chat: str
    target: str
    context: list[HistoryMessage] = Field(default_factory=list)
    candidates: list[list[str]] = Field(default_factory=list)
    adapter_version: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    status: DraftStatus = "open"
    withheld: int = 0  # private context messages the worker saw that `context` leaves out
    refs: dict[str, str] = Field(default_factory=dict)  # platform ids (chat, message, business connection...)
    chosen: int | None = None  # the candidate being sent; set once its first message went out
    delivered: int = 0  # messages of `chosen` already delivered (a retry resumes after them)
    # The owner's reply as it stands in the chat: (fingerprint, text) of each message that carried it (their own
    # typed message, or each message ✅ sent), so an edit or deletion there reaches the draft's sent/edited event.
    reply: list[tuple[str, str]] = Field(default_factory=list)
    reply_amended: bool = False  # a message of the reply was edited or deleted: the reply is no longer as drafted

    @property
    def reply_text(self) -> str | None:
        """The reply's messages joined as a FeedbackEvent's final_text; None when none is left (or none yet)."""
        return "\n".join(text for _, text in self.reply) or None


def window_start(count: int, limit: int, cut: int) -> int:
    """Index of the first of `count` messages (oldest first) in a context of at most `limit`, its start moving in
    blocks of `cut` messages: the context holds `limit - cut + 1` to `limit` messages and keeps its start while
    messages are added, until it would exceed `limit`. `cut` is clamped to 1..limit-1 (1 slides one at a time)."""
    if count <= limit:
        return 0
    cut = max(1, min(cut, limit - 1))
    return -(-(count - limit) // cut) * cut  # (count - limit) rounded up to a multiple of cut


def session_context(messages: Sequence[HistoryMessage], now: datetime, session_gap_min: float, limit: int,
                    cut: int = 1) -> list[HistoryMessage]:
    """The newest messages of the current session, oldest first, at most `limit` (as `convo dataset` cuts), the
    window's start moving in blocks of `cut` messages (`window_start`; 1: the last `limit`)."""
    gap_s = session_gap_min * 60
    out: list[HistoryMessage] = []
    later = now
    for message in reversed(messages[window_start(len(messages), limit, cut):]):
        if message.ts is not None:
            if (later - message.ts).total_seconds() > gap_s:
                break
            later = message.ts
        out.append(message)
        if len(out) >= limit:
            break
    return out[::-1]


def message_fingerprint(message: HistoryMessage) -> str:
    """What finds a stored message again without keeping its text: speaker and timestamp (to the microsecond)."""
    return f"{message.speaker}|{message.ts.isoformat() if message.ts else '-'}"


def _message_of(fingerprint: str) -> tuple[str, datetime] | None:
    """(speaker, ts) of a fingerprint; None for a message stored without a time."""
    speaker, _, stamp = fingerprint.rpartition("|")
    return (speaker, datetime.fromisoformat(stamp)) if speaker and stamp != "-" else None


def clip_text(text: str) -> str:
    """A message text cut to what the wire format carries."""
    return text if len(text) <= MAX_TEXT_CHARS else text[: MAX_TEXT_CHARS - 1] + "…"


class BotCore:
    """History, drafts and feedback for one platform, over Redis and a WorkerClient."""

    def __init__(self, redis, config: BotConfig, platform: str, client: WorkerClient | None = None):
        self.redis = redis
        self.config = config
        self.platform = platform
        self.keys = Keys(config.prefix)
        self.client = client or WorkerClient(redis, self.keys)

    # ------------------------------------------------------------ history

    async def add_message(self, chat: str, speaker: str, text: str, ts: datetime | None = None,
                          private_ttl_s: float | None = None, message_id: str | None = None) -> HistoryMessage:
        """Append one message to a chat's rolling history (trimmed in blocks to the context window, TTL refreshed);
        `message_id` (the platform's) lets a later edit or deletion find it.

        With `private_ttl_s` the speaker did not opt in: the message goes to the chat's private context, where it
        is deleted `private_ttl_s` after it was written (a sorted set scored by expiry time)."""
        message = HistoryMessage.build(speaker=speaker, text=clip_text(text), ts=ts or utcnow())
        limit, cut = self.config.context_messages, self.config.context_cut_messages
        if private_ttl_s is not None:
            key = self.keys.private_history(self.platform, chat)

            async def on_private(pipe):
                now = time.time()
                alive = await pipe.zcount(key, f"({now}", "+inf")
                pipe.multi()
                pipe.zadd(key, {message.dumps(): now + private_ttl_s})
                pipe.zremrangebyscore(key, "-inf", now)
                start = window_start(alive + 1, limit, cut)
                if start:  # in blocks, like the history: the merged context keeps its start
                    pipe.zremrangebyrank(key, 0, start - 1)
                pipe.expire(key, max(1, round(private_ttl_s)))

            await self._atomically(key, on_private)
            return message
        key = self.keys.history(self.platform, chat)

        async def on_history(pipe):
            # The list always holds the window (its start a multiple of `cut` messages into the chat), so after
            # this message it starts `window_start` further on. Read and trim under WATCH: a writer that read the
            # length before another one pushed would trim by the wrong amount (a message lost or one too many kept).
            count = await pipe.llen(key) + 1
            pipe.multi()
            pipe.rpush(key, message.dumps())
            start = window_start(count, limit, cut)
            if start:
                pipe.ltrim(key, start, -1)
            pipe.expire(key, self.config.history_ttl_s)
            if message_id is not None:
                pipe.hset(self.keys.message_ids(self.platform, chat), message_id, message_fingerprint(message))
                pipe.expire(self.keys.message_ids(self.platform, chat), self.config.history_ttl_s)

        await self._atomically(key, on_history)
        return message

    async def amend_message(self, chat: str, message_id: str, text: str | None, persona: str) -> int:
        """The platform says message `message_id` of `persona`'s chat was edited to `text` (or deleted: None):
        change or drop it in the chat's history, in the context of the chat's stored drafts and in a draft's reply
        when it was one, so the next request and every later feedback event carry what was finally said; and put
        a MessageAmendment on the feedback stream for the events already published. Returns how many copies in
        Redis changed."""
        ids_key = self.keys.message_ids(self.platform, chat)
        raw_print = await self.redis.hget(ids_key, message_id)
        if raw_print is None:
            return 0  # never stored here (unmapped chat, or older than the history)
        wanted = raw_print.decode() if isinstance(raw_print, bytes) else raw_print
        if text is None:
            await self.redis.hdel(ids_key, message_id)

        def amended(messages: list) -> list | None:
            """`messages` (HistoryMessage, or raw entries as stored) with the message changed; None if absent."""
            out, hit = [], False
            for item in messages:
                try:
                    message = item if isinstance(item, HistoryMessage) else HistoryMessage.loads(item)
                except ConvoError:
                    out.append(item)  # a malformed entry is nobody's message: keep it as it is
                    continue
                if message_fingerprint(message) != wanted:
                    out.append(item)
                    continue
                hit = True
                if text is not None:
                    new = message.model_copy(update={"text": clip_text(text)})
                    out.append(new if isinstance(item, HistoryMessage) else new.dumps())
            return out if hit else None

        history_key = self.keys.history(self.platform, chat)

        async def on_history(pipe):
            new = amended(await pipe.lrange(history_key, 0, -1))
            if new is None:
                return 0
            pipe.multi()
            pipe.delete(history_key)
            if new:
                pipe.rpush(history_key, *new)
                pipe.expire(history_key, self.config.history_ttl_s)
            return 1

        changed = await self._atomically(history_key, on_history)
        reply_of: DraftRecord | None = None  # a closed draft this message was the reply of, as amended
        index = self.keys.chat_drafts(self.platform, chat)
        for draft_id in [i.decode() if isinstance(i, bytes) else i for i in await self.redis.smembers(index)]:
            async def on_draft(pipe, key=self.keys.draft(draft_id)):
                raw = await pipe.get(key)
                if raw is None:
                    return None
                draft = DraftRecord.model_validate_json(raw)
                update = {}
                new = amended(draft.context)
                if new is not None:
                    update["context"] = new
                if any(fp == wanted for fp, _ in draft.reply):
                    update["reply"] = [(fp, text if fp == wanted else old) for fp, old in draft.reply
                                       if fp != wanted or text is not None]
                    update["reply_amended"] = True
                if not update:
                    return None
                draft = draft.model_copy(update=update)
                pipe.multi()
                pipe.set(key, draft.model_dump_json(), keepttl=True)
                return draft, "reply" in update

            done = await self._atomically(self.keys.draft(draft_id), on_draft)
            if done is not None:
                changed += 1
                if done[1] and done[0].status in ("sent", "edited"):  # its sent/edited event exists: amend it
                    reply_of = done[0]
        message = _message_of(wanted)
        if message is not None:
            # Events already on the stream or in the feedback database hold the old text: the store amends them.
            amendment = MessageAmendment.build(
                platform=self.platform, persona=persona, speaker=message[0], ts=message[1],
                text=clip_text(text) if text is not None else None,
                reply_of=reply_of.id if reply_of else None, reply_text=reply_of.reply_text if reply_of else None,
            )
            await self.redis.xadd(self.keys.feedback, amendment_payload(amendment))
        logger.info("%s message in %s:%s: %d stored copies changed", "edited" if text is not None else "deleted",
                    self.platform, chat, changed)
        return changed

    async def _atomically(self, key: str, step: Callable[[object], Awaitable]):
        """Run `step(pipe)` under WATCH `key`, again whenever another client changed the key meanwhile. `step`
        reads through `pipe`, then either returns without writing or calls `pipe.multi()` and queues its writes."""
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    result = await step(pipe)
                    if pipe.explicit_transaction:
                        await pipe.execute()
                    return result
                except WatchError:
                    continue

    async def add_messages(self, chat: str, speaker: str, texts: Sequence[str]) -> None:
        """Append a burst of one speaker's messages."""
        for text in texts:
            await self.add_message(chat, speaker, text)

    async def history(self, chat: str) -> list[HistoryMessage]:
        """Every stored message of a chat, oldest first (unparseable entries are skipped and logged)."""
        out = []
        for raw in await self.redis.lrange(self.keys.history(self.platform, chat), 0, -1):
            try:
                out.append(HistoryMessage.loads(raw))
            except ConvoError:
                logger.warning("history %s:%s: skipped a malformed entry", self.platform, chat)
        return out

    async def private_history(self, chat: str) -> list[HistoryMessage]:
        """The chat's private context still alive, oldest first (expired messages are deleted here)."""
        key = self.keys.private_history(self.platform, chat)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(key, "-inf", time.time())
            pipe.zrange(key, 0, -1)
            _, raws = await pipe.execute()
        return [HistoryMessage.loads(raw) for raw in raws]

    async def context(self, chat: str, now: datetime | None = None) -> list[HistoryMessage]:
        """The context a request for this chat carries now (current session, the window of `context_messages` moving
        in blocks of `context_cut_messages`), private context included."""
        return (await self._context(chat, now))[0]

    async def _context(self, chat: str, now: datetime | None = None) -> tuple[list[HistoryMessage], set]:
        """(the request context, the private messages among it)."""
        now = now or utcnow()
        messages, private = await self.history(chat), await self.private_history(chat)
        if private:
            messages = sorted([*messages, *private], key=lambda m: m.ts or now)  # stable: history first on ties
        context = session_context(messages, now, self.config.session_gap_min, self.config.context_messages,
                                  self.config.context_cut_messages)
        return context, set(private) & set(context)

    # ------------------------------------------------------------ drafts

    async def generate(self, chat: str, persona: Persona, mode: Mode, n: int = 1,
                       on_partial: Callable[[str], Awaitable[None]] | None = None,
                       refs: dict[str, str] | None = None, shown: bool = True) -> DraftRecord:
        """Ask the worker for `n` candidates from the chat's context, store the draft and emit `shown` events
        (`shown=False`: the caller emits each once the platform has really shown it).

        With `on_partial` the request streams and each newer text of candidate 1 is passed to it. Raises
        WorkerTimeout (nobody answered) or WorkerError (the worker refused).
        """
        context, private = await self._context(chat)
        return await self._generate(chat, persona, mode, n, context, on_partial, refs or {}, private, shown)

    async def _generate(self, chat, persona, mode, n, context, on_partial, refs, private=frozenset(), shown=True
                        ) -> DraftRecord:
        cfg = self.config
        request = GenerateRequest.build(
            persona=persona.name, mode=mode, history=context, n=n, temperature=cfg.temperature, top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
        )
        started = time.monotonic()
        response: GenerateResponse | None = None
        if on_partial is None:
            response = await self.client.generate(request, timeout_s=cfg.reply_timeout_s)
        else:
            async for item in self.client.stream(request, timeout_s=cfg.reply_timeout_s):
                if isinstance(item, Partial):
                    if item.text:
                        await on_partial(item.text)
                else:
                    response = item
        if response is None or not response.ok:
            raise WorkerError(response or GenerateResponse.failure(request.id, "internal", "no response"))
        candidates = [c for c in response.candidates if any(m.strip() for m in c)]
        if not candidates:
            raise WorkerError(GenerateResponse.failure(request.id, "internal", "the model produced only empty text"))
        draft = DraftRecord(
            id=new_id(), persona=persona.name, mode=mode, platform=self.platform, chat=chat,
            target=persona.target(mode), context=[m for m in context if m not in private], withheld=len(private),
            candidates=candidates,
            adapter_version=response.adapter.version if response.adapter else persona.version, refs=refs,
        )
        await self.save_draft(draft)
        logger.info("draft %s persona=%s mode=%s n=%d %.2fs", draft.id, persona.name, mode, len(candidates),
                    time.monotonic() - started)
        for i in range(len(candidates) if shown else 0):
            await self.feedback(draft, "shown", i)
        return draft

    async def regenerate(self, draft: DraftRecord, persona: Persona, n: int | None = None,
                         on_partial: Callable[[str], Awaitable[None]] | None = None, shown: bool = True
                         ) -> DraftRecord | None:
        """Make a new draft from the very same context, then close `draft` and emit `regenerated`. None when
        `draft` is not open, or stopped being open meanwhile (a second tap, ✅, a newer message, /forget: the new
        draft is deleted then); DraftExpired when it is gone before generating."""
        draft = await self.get_draft(draft.id)  # the stored record: its status and its context as amended
        if draft.status != "open":
            return None
        new = await self._generate(draft.chat, persona, draft.mode, n or len(draft.candidates), draft.context,
                                   on_partial, dict(draft.refs), shown=False)
        # Claimed only now, so a failed generation leaves `draft` open to try again.
        try:
            closed = await self.transition(draft.id, {"open"}, status="closed")
        except DraftExpired:  # forgotten meanwhile: so is what the new draft was made from
            closed = None
        if closed is None:  # never shown to anyone: drop it
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(self.keys.draft(new.id))
                pipe.srem(self.keys.chat_drafts(self.platform, new.chat), new.id)
                await pipe.execute()
            return None
        await self.feedback(closed, "regenerated")
        for i in range(len(new.candidates) if shown else 0):
            await self.feedback(new, "shown", i)
        return new

    async def save_draft(self, draft: DraftRecord) -> None:
        """Store a draft record and index it under its chat, both with the draft TTL."""
        index = self.keys.chat_drafts(self.platform, draft.chat)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.draft(draft.id), draft.model_dump_json(), ex=self.config.draft_ttl_s)
            pipe.sadd(index, draft.id)
            pipe.expire(index, self.config.draft_ttl_s)
            await pipe.execute()

    async def get_draft(self, draft_id: str) -> DraftRecord:
        """A stored draft; DraftExpired when it is gone."""
        raw = await self.redis.get(self.keys.draft(draft_id))
        if raw is None:
            raise DraftExpired(f"draft {draft_id} has expired or was forgotten")
        return DraftRecord.model_validate_json(raw)

    async def transition(self, draft_id: str, allowed: Collection[DraftStatus],
                         derive: Callable[[DraftRecord], dict] | None = None, **changes) -> DraftRecord | None:
        """Apply `changes` (and what `derive` computes from the stored record) to a stored draft if its status is in
        `allowed`, atomically (compare-and-set: of two handlers racing on one draft only one wins). None when the
        status is not allowed; DraftExpired when gone."""
        key = self.keys.draft(draft_id)

        async def step(pipe):
            raw = await pipe.get(key)
            if raw is None:
                raise DraftExpired(f"draft {draft_id} has expired or was forgotten")
            draft = DraftRecord.model_validate_json(raw)
            if draft.status not in allowed:
                return None
            updated = draft.model_copy(update={**changes, **(derive(draft) if derive else {})})
            pipe.multi()
            pipe.set(key, updated.model_dump_json(), keepttl=True)
            return updated

        return await self._atomically(key, step)

    async def reopen_interrupted(self) -> int:
        """Drafts of this platform left "sending" by a process that stopped mid-delivery go back to "open" (what
        was delivered stays recorded, so ✅ resumes). Only for the platform's one bot process, at its start."""
        reopened = 0
        async for key in self.redis.scan_iter(match=self.keys.draft("*"), count=500):
            raw = await self.redis.get(key)
            if raw is None:
                continue
            draft = DraftRecord.model_validate_json(raw)
            if draft.platform == self.platform and draft.status == "sending":
                with contextlib.suppress(DraftExpired):
                    reopened += await self.transition(draft.id, {"sending"}, status="open") is not None
        if reopened:
            logger.info("%d interrupted draft(s) reopened on %s", reopened, self.platform)
        return reopened

    async def open_drafts(self, chat: str) -> list[DraftRecord]:
        """The drafts of a chat still waiting for the owner, oldest first."""
        ids = await self.redis.smembers(self.keys.chat_drafts(self.platform, chat))
        if not ids:
            return []
        drafts = []
        for raw in await self.redis.mget([self.keys.draft(i.decode() if isinstance(i, bytes) else i) for i in ids]):
            if raw is not None:
                draft = DraftRecord.model_validate_json(raw)
                if draft.status == "open":
                    drafts.append(draft)
        return sorted(drafts, key=lambda d: d.created_at)

    async def open_draft(self, chat: str) -> DraftRecord | None:
        """The newest draft of a chat still waiting for the owner (None when there is none)."""
        drafts = await self.open_drafts(chat)
        return drafts[-1] if drafts else None

    # ------------------------------------------------------------ feedback

    async def feedback(self, draft: DraftRecord, kind: FeedbackKind, candidate_index: int | None = None,
                       final_text: str | None = None) -> FeedbackEvent:
        """Put one self-contained FeedbackEvent on the feedback stream and return it."""
        candidate = draft.candidates[candidate_index] if candidate_index is not None else []
        if kind == "sent" and final_text is None and candidate:
            final_text = "\n".join(candidate)
        event = FeedbackEvent.build(
            kind=kind, draft_id=draft.id, persona=draft.persona, mode=draft.mode,
            adapter_version=draft.adapter_version, context=draft.context, target=draft.target,
            candidate=candidate, candidate_index=candidate_index,
            final_text=clip_text(final_text) if final_text else None, platform=self.platform,
        )
        await self.redis.xadd(self.keys.feedback, entry_payload(event))
        logger.info("feedback %s draft=%s persona=%s", kind, draft.id, draft.persona)
        return event

    async def owner_wrote(self, chat: str, text: str, message: HistoryMessage | None = None
                          ) -> FeedbackEvent | None:
        """The owner sent `text` in a chat with an open draft: `sent` if it is a candidate as drafted, else
        `edited` with both texts; the draft closes, remembering `message` (its history entry) as its reply. None
        when no draft was waiting (or it stopped waiting meanwhile: expired, forgotten, or taken by ✅ or a newer
        message)."""
        draft = await self.open_draft(chat)
        if draft is None:
            return None
        index = next((i for i, candidate in enumerate(draft.candidates)
                      if text.strip() in ("\n".join(candidate).strip(), candidate[0].strip() if candidate else None)),
                     None)
        with contextlib.suppress(DraftExpired):
            reply = [(message_fingerprint(message), text)] if message is not None else []
            closed = await self.transition(draft.id, {"open"}, status="edited" if index is None else "sent",
                                           reply=reply)
            if closed is not None:  # the stored record: it carries any change made meanwhile (an edited context)
                if index is None:
                    return await self.feedback(closed, "edited", 0, final_text=text)
                return await self.feedback(closed, "sent", index)
        return None

    # ------------------------------------------------------------ deletion

    async def forget(self, chat: str) -> int:
        """Delete a chat's history and drafts; returns the number of keys deleted."""
        index = self.keys.chat_drafts(self.platform, chat)
        ids = [i.decode() if isinstance(i, bytes) else i for i in await self.redis.smembers(index)]
        keys = [self.keys.history(self.platform, chat), self.keys.private_history(self.platform, chat),
                self.keys.message_ids(self.platform, chat), index, *(self.keys.draft(i) for i in ids)]
        deleted = await self.redis.delete(*keys)
        logger.info("forgot chat %s:%s (%d keys)", self.platform, chat, deleted)
        return deleted

    async def forget_persona(self, persona: Persona) -> dict[str, int]:
        """Delete everything of one person on this platform: their messages in every stored history, every
        draft written as them, and their feedback events (and amendments) still on the stream. Returns counts."""
        counts = {"messages": 0, "drafts": 0, "events": 0}
        async for key in self.redis.scan_iter(match=self.keys.history(self.platform, "*"), count=500):
            kept, dropped = [], 0
            for raw in await self.redis.lrange(key, 0, -1):
                try:
                    speaker = HistoryMessage.loads(raw).speaker
                except ConvoError:
                    speaker = None
                if speaker == persona.tag:
                    dropped += 1
                else:
                    kept.append(raw)
            if dropped:
                ttl = await self.redis.ttl(key)
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.delete(key)
                    if kept:
                        pipe.rpush(key, *kept)
                        if ttl and ttl > 0:
                            pipe.expire(key, ttl)
                    await pipe.execute()
                counts["messages"] += dropped
        async for key in self.redis.scan_iter(match=self.keys.draft("*"), count=500):
            raw = await self.redis.get(key)
            if raw is None:
                continue
            draft = DraftRecord.model_validate_json(raw)
            if draft.persona == persona.name and draft.platform == self.platform:
                await self.redis.delete(key)
                await self.redis.srem(self.keys.chat_drafts(self.platform, draft.chat), draft.id)
                counts["drafts"] += 1
        last = "-"
        while True:
            entries = await self.redis.xrange(self.keys.feedback, min=f"({last}" if last != "-" else "-", count=500)
            if not entries:
                break
            doomed = []
            for entry_id, fields in entries:
                try:  # events and amendments alike name their persona and platform
                    event = (MessageAmendment if is_amendment(fields) else FeedbackEvent).loads(entry_data(fields))
                except ConvoError:
                    continue
                if event.persona == persona.name and event.platform == self.platform:
                    doomed.append(entry_id)
            if doomed:
                counts["events"] += await self.redis.xdel(self.keys.feedback, *doomed)
            last = entries[-1][0].decode() if isinstance(entries[-1][0], bytes) else entries[-1][0]
        logger.info("forgot persona %s on %s: %s", persona.name, self.platform, counts)
        return counts

    # ------------------------------------------------------------ delivery

    def typing_delay_s(self, text: str) -> float:
        """Pause before sending `text` in a burst: proportional to its length, capped."""
        return min(len(text) * self.config.typing_s_per_char, self.config.max_typing_s)

    async def deliver(self, messages: Sequence[str], send: Callable[[str], Awaitable[object]],
                      typing: Callable[[], Awaitable[object]] | None = None) -> int:
        """Send a burst as separate messages, each after a typing pause proportional to its length."""
        sent = 0
        for text in messages:
            if not text.strip():
                continue
            delay_s = self.typing_delay_s(text)
            if delay_s > 0:
                if typing is not None:
                    await typing()
                await asyncio.sleep(delay_s)  # pacing that looks human, not synchronisation
            await send(text)
            sent += 1
        return sent


def connect_redis(settings):
    """An async Redis client for the bot (settings.redis url and password)."""
    return connect(settings.redis)


async def ping_redis(client, url: str) -> None:
    """Check Redis answers; ConfigError with the URL when it does not (bots start with this)."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    try:
        await client.ping()
    except (RedisConnectionError, OSError) as e:
        raise ConfigError(f"cannot reach Redis at {url} ({e}); start it (`make redis`) or set redis.url") from e
