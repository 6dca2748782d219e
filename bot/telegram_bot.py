"""`convo serve telegram`: drafts of the owner's replies, in their chat with the bot and in Telegram Business chats.

* Only `telegram.owner_ids` may use the bot. Anyone else gets one polite refusal per process and nothing is stored.
* Bot chat: `/personas`, `/simulate NAME` (chat with the simulated friend; `/stop` ends), `/draft NAME` (paste or
  forward the friend's messages; the bot answers with drafts of the owner's next message), `/forget NAME`.
* Business mode (Settings -> Telegram Business -> Chatbots): a message from a friend mapped in `telegram.chats`
  produces `bot.drafts` drafts in the owner's voice, streamed live with sendMessageDraft and then sent to the owner's
  chat with the bot with buttons ✅ Send / 👍 / 👎 / 🔄. ✅ sends into the friend's chat through the business
  connection only while the connection's rights allow replying (checked with getBusinessConnection at that moment).
  Text the owner then writes in that chat becomes an `edited` event (or `sent` when it is a draft as drafted).

What real servers do, and how the bot copes (each has a test named for it in tests/test_bot_telegram.py):

* Updates run concurrently, so two taps on ✅ race: the callback is answered at once and the draft is claimed
  with a compare-and-set on its stored status (`BotCore.transition`) before anything is sent.
* A friend writes in bursts: drafting waits `telegram.debounce_ms` after their last message and drafts once; a new
  message closes the chat's open drafts and takes their buttons away (a stale ✅ is refused).
* 429 Too Many Requests: every call is retried `telegram.max_retries` times after Telegram's `retry_after`. A
  `shown` event is recorded only for a card Telegram accepted; live previews are throttled to one per
  `telegram.live_draft_interval_s` (Telegram allows about one edit of a message per second).
* ✅ failing half-way (403 blocked, 429): the draft stays open with the messages already delivered recorded; the
  owner is told why, and the next ✅ sends only the rest.
* Edited and deleted business messages change or drop the stored copies (history, draft contexts).
* A business bot may reply only within 24 h of the friend's last message: an older draft is refused with that reason.
* A callback query Telegram no longer accepts ("query is too old") is not answered, but the button still acts.

Callback data is `d|ACTION|DRAFT_ID|INDEX` (at most 38 bytes; Telegram allows 64). Every callback query is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dtm
import itertools
import logging
import secrets
import time
from typing import get_args

from telegram import (
    BusinessConnection,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
    Update,
)
from telegram.constants import ChatAction
from telegram.error import BadRequest, Forbidden, NetworkError, RetryAfter, TelegramError
from telegram.ext import (
    AIORateLimiter,
    Application,
    ApplicationBuilder,
    ApplicationHandlerStop,
    BusinessConnectionHandler,
    BusinessMessagesDeletedHandler,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    TypeHandler,
    filters,
)

from bot.core import (
    BotConfig,
    BotCore,
    DraftExpired,
    DraftRecord,
    DraftStatus,
    PersonaBook,
    check_persona_name,
    connect_redis,
    message_fingerprint,
    ping_redis,
)
from errors import ConfigError, ConvoError
from inference.client import WorkerError, WorkerTimeout
from inference.protocol import utcnow

logger = logging.getLogger(__name__)

PLATFORM = "telegram"
CALLBACK_PREFIX = "d"
ACTIONS = {"s": "send", "l": "liked", "x": "disliked", "r": "regenerate"}
REFUSAL = "Sorry, this is a private bot: it only works for its owner."
BUSINESS_REPLY_WINDOW_H = 24  # Telegram lets a business bot reply only in chats with an incoming message this recent
ANY_STATUS: tuple[DraftStatus, ...] = get_args(DraftStatus)
USED = {"sending": "This draft is being sent already.", "sent": "This draft was already used.",
        "edited": "This draft was already used.", "closed": "This draft was replaced by a newer one."}
HELP = (
    "/personas: who I can write as\n"
    "/simulate NAME: chat with the simulated friend (/stop ends)\n"
    "/draft NAME: paste or forward NAME's messages, get drafts of your reply\n"
    "/forget NAME: delete the stored history and drafts of that chat\n"
    "Business mode: connect me under Settings → Telegram Business → Chatbots; drafts for friends in my config "
    "appear here with ✅ Send / 👍 / 👎 / 🔄."
)


def callback_data(action: str, draft_id: str, index: int) -> str:
    """The data of one draft button (well under Telegram's 64-byte limit)."""
    data = f"{CALLBACK_PREFIX}|{action}|{draft_id}|{index}"
    assert len(data.encode()) <= 64, data
    return data


def draft_keyboard(draft_id: str, index: int) -> InlineKeyboardMarkup:
    """✅ Send / 👍 / 👎 / 🔄 for candidate `index` of a draft."""
    return InlineKeyboardMarkup([[
        InlineKeyboardButton("✅ Send", callback_data=callback_data("s", draft_id, index)),
        InlineKeyboardButton("👍", callback_data=callback_data("l", draft_id, index)),
        InlineKeyboardButton("👎", callback_data=callback_data("x", draft_id, index)),
        InlineKeyboardButton("🔄", callback_data=callback_data("r", draft_id, index)),
    ]])


def worker_problem(e: ConvoError, timeout_s: float) -> str:
    """What the owner reads when the worker could not produce drafts."""
    if isinstance(e, WorkerTimeout):
        return (f"No reply from the model worker within {timeout_s:g} s, so no draft this time. "
                "Is `convo serve worker` running? Try again shortly.")
    if isinstance(e, WorkerError) and e.response.error and e.response.error.code == "unknown_persona":
        return "The worker has no adapter for this persona (train one with `convo train`)."
    return "The model worker could not draft a reply right now; try again shortly."


def _retry_after_s(e: RetryAfter) -> float:
    return e._retry_after.total_seconds()  # the timedelta behind `retry_after` (the public int form is deprecated)


def telegram_problem(e: TelegramError) -> str:
    """Why Telegram did not take a message, in words for the owner."""
    if isinstance(e, RetryAfter):
        return f"Telegram is rate-limiting the bot (it asks to wait {_retry_after_s(e):g} s)"
    if isinstance(e, Forbidden):
        return f"Telegram refused it: {e.message.removeprefix('Forbidden: ')}"
    if isinstance(e, BadRequest):
        return f"Telegram rejected it: {e.message}"
    if isinstance(e, NetworkError):
        return "Telegram could not be reached"
    return f"Telegram said: {e.message}"


class RetryingRateLimiter(AIORateLimiter):
    """PTB's AIORateLimiter (flood limits, `max_retries` retries after a 429) with Telegram's retry_after
    multiplied by `retry_after_scale`: 1 in production, small in tests so a real 3 s wait takes milliseconds."""

    def __init__(self, max_retries: int, retry_after_scale: float = 1.0):
        super().__init__(max_retries=max_retries)
        self.retry_after_scale = retry_after_scale

    async def process_request(self, callback, args, kwargs, endpoint, data, rate_limit_args):
        """Run one Bot API call through the limiter, scaling any RetryAfter it raises."""
        if self.retry_after_scale == 1:
            return await super().process_request(callback, args, kwargs, endpoint, data, rate_limit_args)

        async def scaled(*a, **kw):
            try:
                return await callback(*a, **kw)
            except RetryAfter as e:
                raise RetryAfter(dtm.timedelta(seconds=_retry_after_s(e) * self.retry_after_scale)) from e

        return await super().process_request(scaled, args, kwargs, endpoint, data, rate_limit_args)


async def answer(query, text: str | None = None, **kwargs) -> None:
    """Answer a callback query; one Telegram no longer accepts ("query is too old") is logged, not raised, so the
    button still does its work."""
    try:
        await query.answer(text, **kwargs)
    except TelegramError as e:
        logger.info("callback query not answered (%s)", type(e).__name__)


class TelegramBot:
    """Handlers and state of the Telegram bot (built by `build_app`)."""

    def __init__(self, settings, redis=None):
        self.settings = settings
        self.owner_ids = set(settings.telegram.owner_ids)
        self.chats = dict(settings.telegram.chats)  # friend's user/chat id -> persona
        for chat, persona in self.chats.items():
            check_persona_name(persona, f"telegram.chats[{chat}]")
        self.config = BotConfig.from_settings(settings)
        self.book = PersonaBook(self.config.adapters_dir)
        self.redis = redis
        self.core: BotCore | None = None
        self.refused: set[int] = set()  # in memory only: strangers are never stored
        self.connections: dict[str, BusinessConnection] = {}
        self._seq = itertools.count(1)
        self._locks: dict[str, asyncio.Lock] = {}  # per chat (mapped chats and the owner's sessions only)
        self._latest: dict[str, int] = {}  # chat -> number of its newest incoming message (debounce, staleness)

    # ------------------------------------------------------------ lifecycle

    async def start(self, app: Application | None = None) -> None:
        """Open Redis (post_init)."""
        if self.redis is None:
            self.redis = connect_redis(self.settings)
        await ping_redis(self.redis, self.settings.redis.url)
        self.core = BotCore(self.redis, self.config, PLATFORM)
        await self.core.reopen_interrupted()  # a ✅ cut short by the last stop resumes on the next tap
        logger.info("telegram bot ready owners=%d mapped_chats=%d", len(self.owner_ids), len(self.chats))

    async def stop(self, app: Application | None = None) -> None:
        """Close Redis (post_shutdown)."""
        if self.redis is not None:
            await self.redis.aclose()

    # ------------------------------------------------------------ access

    async def gate(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Let owners through; refuse anyone else once, politely, and store nothing about them."""
        if update.business_connection or update.business_message or update.edited_business_message \
                or update.deleted_business_messages:
            return  # business updates are checked against the connection's owner
        user = update.effective_user
        if user is not None and user.id in self.owner_ids:
            return
        if update.callback_query is not None:
            await answer(update.callback_query, REFUSAL)
        elif user is not None and user.id not in self.refused and update.message is not None \
                and update.message.chat.type == "private":
            self.refused.add(user.id)
            await context.bot.send_message(update.effective_chat.id, REFUSAL)
        logger.info("refused an update from a non-owner")
        raise ApplicationHandlerStop

    # ------------------------------------------------------------ bot chat commands

    async def help(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Show what the bot can do."""
        await update.effective_message.reply_text(HELP)

    async def personas(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """List the personas with an adapter and the Business chats mapped to them."""
        names = self.book.names()
        mapped = sorted(set(self.chats.values()))
        lines = [f"Personas: {', '.join(names) if names else '(none under ' + str(self.config.adapters_dir) + ')'}"]
        if mapped:
            lines.append(f"Business chats drafted for: {', '.join(mapped)}")
        await update.effective_message.reply_text("\n".join(lines))

    def _persona_arg(self, context: ContextTypes.DEFAULT_TYPE):
        if not context.args:
            raise ConfigError("name a persona, e.g. /simulate alice (see /personas)")
        return self.book.get(context.args[0])

    async def simulate(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Start chatting with a simulated friend."""
        await self._start_session(update, context, "friend")

    async def draft(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Start drafting replies to a friend whose messages the owner pastes or forwards."""
        await self._start_session(update, context, "self")

    async def _start_session(self, update: Update, context: ContextTypes.DEFAULT_TYPE, mode: str) -> None:
        try:
            persona = self._persona_arg(context)
        except ConvoError as e:
            await update.effective_message.reply_text(str(e))
            return
        context.chat_data["session"] = (mode, persona.name)
        if mode == "friend":
            text = f"You are now chatting with {persona.name} (simulated). /stop ends."
        else:
            text = f"Paste or forward {persona.name}'s messages; I answer with drafts of your reply. /stop ends."
        await update.effective_message.reply_text(text)

    async def stop_session(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """End the current /simulate or /draft session."""
        session = context.chat_data.pop("session", None)
        await update.effective_message.reply_text(f"Stopped ({session[1]})." if session else "Nothing to stop.")

    async def forget(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Delete the stored history and drafts of a persona's chats (Business chat and bot sessions)."""
        try:
            persona = self._persona_arg(context)
        except ConvoError as e:
            await update.effective_message.reply_text(str(e))
            return
        owner_chat = update.effective_chat.id
        chats = [self._business_chat(c) for c, p in self.chats.items() if p == persona.name]
        chats += [self._session_chat(m, owner_chat, persona.name) for m in ("friend", "self")]
        deleted = 0
        for chat in chats:
            deleted += await self.core.forget(chat)
        await update.effective_message.reply_text(
            f"Forgot {persona.name}: {deleted} stored item(s) deleted (history and drafts)."
            if deleted else f"Nothing stored for {persona.name}.")

    @staticmethod
    def _business_chat(chat_id) -> str:
        return f"biz:{chat_id}"

    @staticmethod
    def _session_chat(mode: str, owner_chat: int, persona: str) -> str:
        return f"{'sim' if mode == 'friend' else 'draft'}:{owner_chat}:{persona}"

    async def text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A message in the bot chat: the owner's line in /simulate, or the friend's message in /draft."""
        message = update.effective_message
        session = context.chat_data.get("session")
        if session is None:
            await message.reply_text("Pick someone first: /simulate NAME or /draft NAME (see /personas).")
            return
        mode, name = session
        persona = self.book.get(name)
        chat = self._session_chat(mode, message.chat_id, name)
        core = self.core
        if mode == "friend":
            await core.add_message(chat, persona.me_tag, message.text)
            await context.bot.send_chat_action(message.chat_id, ChatAction.TYPING)
            try:
                draft = await core.generate(chat, persona, "friend", n=1)
            except (WorkerTimeout, WorkerError) as e:
                await message.reply_text(worker_problem(e, self.config.reply_timeout_s))
                return
            burst = draft.candidates[0]
            # Simulated messages are labelled as AI, every one of them (a forwarded one keeps its label).
            await core.deliver(burst, send=lambda t: message.reply_text(f"🤖 {persona.name} (AI): {t}"),
                               typing=lambda: context.bot.send_chat_action(message.chat_id, ChatAction.TYPING))
            await core.add_messages(chat, persona.tag, burst)
            return
        seq = self._arrived(chat)
        async with self._arrival(chat):
            await core.add_message(chat, persona.tag, message.text)
        await self._incoming(context, seq, owner_chat=message.chat_id, chat=chat, persona=persona, refs={})

    # ------------------------------------------------------------ drafts

    def _arrived(self, chat: str) -> int:
        """Number a new message of a chat (called before the handler's first await, so a batch of updates is
        numbered in Telegram's order): only the newest message's handler drafts."""
        seq = self._latest[chat] = next(self._seq)
        return seq

    def _arrival(self, chat: str) -> asyncio.Lock:
        """The lock that keeps a chat's messages in the order Telegram sent them. Updates run concurrently; a
        handler takes it before its first await, and asyncio.Lock wakes waiters first come, first served."""
        return self._locks.setdefault(chat, asyncio.Lock())

    async def _incoming(self, context, seq: int, owner_chat: int, chat: str, persona, refs: dict[str, str]) -> None:
        """The friend wrote: their earlier drafts no longer answer the chat; draft once their burst is over."""
        await self._supersede(context, chat)
        delay_s = self.settings.telegram.debounce_ms / 1000
        if delay_s > 0:
            await asyncio.sleep(delay_s)  # the debounce window (updates run concurrently, so nothing waits on it)
        if self._latest.get(chat) != seq:
            return  # a newer message of the burst drafts instead
        await self._draft_for(context, owner_chat, chat, persona, refs, seq)

    async def _supersede(self, context, chat: str) -> None:
        """Close the chat's open drafts and take the buttons off their cards."""
        for draft in await self.core.open_drafts(chat):
            if await self.core.transition(draft.id, {"open"}, status="closed") is not None:
                await self._close_cards(context, draft)

    async def _close_cards(self, context, draft: DraftRecord, keep: int | None = None) -> None:
        """Remove the buttons from a draft's cards (all of them, or all but message `keep`)."""
        owner_chat = draft.refs.get("owner_chat")
        for message_id in filter(None, draft.refs.get("cards", "").split(",")):
            if owner_chat is None or int(message_id) == keep:
                continue
            try:
                await context.bot.edit_message_reply_markup(int(owner_chat), int(message_id), reply_markup=None)
            except TelegramError as e:  # too old to edit, or deleted by the owner: the stale ✅ is refused anyway
                logger.info("draft %s: could not close a card (%s)", draft.id, type(e).__name__)

    async def _draft_for(self, context, owner_chat: int, chat: str, persona, refs: dict[str, str],
                         seq: int | None = None) -> None:
        """Generate drafts of the owner's next message, stream them live, then show each with its buttons."""
        streamer = self._live_streamer(context, owner_chat) if self.settings.telegram.live_drafts else None
        try:
            draft = await self.core.generate(chat, persona, "self", n=self.config.drafts, on_partial=streamer,
                                             refs={**refs, "owner_chat": str(owner_chat)}, shown=False)
        except (WorkerTimeout, WorkerError) as e:
            await context.bot.send_message(owner_chat, worker_problem(e, self.config.reply_timeout_s))
            return
        if seq is not None and self._latest.get(chat) != seq:
            # The friend wrote again while this was generating: the draft for their newest message will come.
            await self.core.transition(draft.id, {"open"}, status="closed")
            return
        await self._show(context, owner_chat, draft, persona.name)

    def _live_streamer(self, context, owner_chat: int):
        """A partial-text callback that animates one sendMessageDraft preview (throttled)."""
        draft_id = secrets.randbelow(2**31 - 1) + 1  # non-zero; same id = one animated preview
        interval_s = self.settings.telegram.live_draft_interval_s
        last = [float("-inf")]

        async def on_partial(text: str) -> None:
            now = time.monotonic()
            if now - last[0] < interval_s:
                return
            last[0] = now
            try:
                await context.bot.send_message_draft(chat_id=owner_chat, draft_id=draft_id, text=text[:4096])
            except TelegramError as e:  # the preview is a nicety: the final message still comes
                logger.warning("live draft update failed (%s); no more previews for this draft", type(e).__name__)
                last[0] = float("inf")

        return on_partial

    async def _show(self, context, owner_chat: int, draft: DraftRecord, persona_name: str) -> None:
        """Send each candidate to the owner's chat with its buttons; `shown` only for a card Telegram accepted."""
        total, cards = len(draft.candidates), []
        for i, candidate in enumerate(draft.candidates):
            header = f"✍️ {persona_name} · draft {i + 1}/{total}"
            try:
                card = await context.bot.send_message(owner_chat, f"{header}\n" + "\n".join(candidate),
                                                      reply_markup=draft_keyboard(draft.id, i))
            except TelegramError as e:  # retries are spent: the cards already shown stay usable
                logger.warning("draft %s: card %d/%d not shown (%s)", draft.id, i + 1, total, type(e).__name__)
                if not cards:
                    await self.core.transition(draft.id, {"open"}, status="closed")
                    await self._tell(context, owner_chat, f"A draft was ready but could not be shown: "
                                                          f"{telegram_problem(e)}.")
                break
            cards.append(str(card.message_id))
            await self.core.feedback(draft, "shown", i)
        if cards:
            await self.core.transition(draft.id, ANY_STATUS, refs={**draft.refs, "cards": ",".join(cards)})

    async def _tell(self, context, chat_id: int, text: str) -> None:
        """A short note to the owner that may itself fail (blocked, rate-limited): then the log has it."""
        try:
            await context.bot.send_message(chat_id, text)
        except TelegramError as e:
            logger.warning("could not tell the owner (%s)", type(e).__name__)

    # ------------------------------------------------------------ business mode

    async def business_connection(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Remember a (dis)connection; tell the owner what it allows, refuse anyone else."""
        conn = update.business_connection
        if conn.user.id not in self.owner_ids:
            logger.info("business connection from a non-owner refused")
            await context.bot.send_message(conn.user_chat_id, REFUSAL)
            return
        self.connections[conn.id] = conn
        if not conn.is_enabled:
            await context.bot.send_message(conn.user_chat_id, "Business connection removed: no more drafts.")
            return
        can_reply = bool(conn.rights and conn.rights.can_reply)
        await context.bot.send_message(
            conn.user_chat_id,
            "Connected to your Telegram Business account. Drafts for your mapped chats will appear here. "
            + ("✅ can send replies for you." if can_reply else
               "Sending is off: allow 'Reply to messages' for this bot in Telegram Business → Chatbots."))

    async def _connection(self, context, connection_id: str, fresh: bool = False) -> BusinessConnection:
        if fresh or connection_id not in self.connections:
            self.connections[connection_id] = await context.bot.get_business_connection(connection_id)
        return self.connections[connection_id]

    def _mapped_persona(self, message: Message) -> str | None:
        for key in (str(message.chat.id), str(message.from_user.id) if message.from_user else None):
            if key is not None and key in self.chats:
                return self.chats[key]
        return None

    async def business_message(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A message in a connected chat: a friend's makes drafts; the owner's closes the open draft."""
        message = update.business_message
        name = self._mapped_persona(message) if message.text else None
        if name is None:
            return  # not a chat the owner asked for drafts in: store nothing
        chat = self._business_chat(message.chat.id)
        seq = self._arrived(chat)  # any newer message, the owner's too, makes a pending draft stale
        async with self._arrival(chat):
            conn = await self._connection(context, message.business_connection_id)
            if conn.user.id not in self.owner_ids:
                return
            persona = self.book.get(name)
            message_id = str(message.message_id)
            if message.from_user and message.from_user.id == conn.user.id:
                if message.sender_business_bot is not None:
                    return  # sent by a bot (our ✅): already recorded
                mine = await self.core.add_message(chat, persona.me_tag, message.text, message_id=message_id)
                await self.core.owner_wrote(chat, message.text, message=mine)
                return
            await self.core.add_message(chat, persona.tag, message.text, message_id=message_id)
        await self._incoming(context, seq, owner_chat=conn.user_chat_id, chat=chat, persona=persona,
                             refs={"business_connection_id": conn.id, "chat_id": str(message.chat.id)})

    async def _owned(self, context, connection_id: str) -> bool:
        conn = await self._connection(context, connection_id)
        return conn.user.id in self.owner_ids

    async def business_edit(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A message in a connected chat was edited: history, drafts and feedback events take the new text."""
        message = update.edited_business_message
        name = self._mapped_persona(message)
        if name is not None and await self._owned(context, message.business_connection_id):
            await self.core.amend_message(self._business_chat(message.chat.id), str(message.message_id),
                                          message.text or "", persona=name)

    async def business_deleted(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Messages in a connected chat were deleted: they leave the history, drafts and feedback events."""
        deleted = update.deleted_business_messages
        name = self.chats.get(str(deleted.chat.id))  # a private chat's id is the friend's user id
        if name is not None and await self._owned(context, deleted.business_connection_id):
            for message_id in deleted.message_ids:
                await self.core.amend_message(self._business_chat(deleted.chat.id), str(message_id), None,
                                              persona=name)

    # ------------------------------------------------------------ buttons

    async def button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """✅ / 👍 / 👎 / 🔄 on a draft; always answers the callback query, before any slow work."""
        query = update.callback_query
        try:
            _, code, draft_id, index_s = query.data.split("|")
            action, index = ACTIONS[code], int(index_s)
        except (ValueError, KeyError):
            await answer(query, "Unknown button.")
            return
        try:
            draft = await self.core.get_draft(draft_id)
        except DraftExpired:
            await answer(query, "This draft has expired.")
            return
        if not 0 <= index < len(draft.candidates):
            await answer(query, "Unknown button.")
            return
        if action in ("liked", "disliked"):
            await self.core.feedback(draft, action, index)
            await answer(query, "Noted 👍" if action == "liked" else "Noted 👎")
        elif action == "regenerate":
            if draft.status != "open":
                await answer(query, USED.get(draft.status, "This draft is not open any more."))
                return
            await answer(query, "Drafting again…")
            persona = self.book.get(draft.persona)
            owner_chat = int(draft.refs.get("owner_chat", query.message.chat.id))
            streamer = self._live_streamer(context, owner_chat) if self.settings.telegram.live_drafts else None
            try:
                new = await self.core.regenerate(draft, persona, on_partial=streamer, shown=False)
            except (WorkerTimeout, WorkerError) as e:
                await context.bot.send_message(owner_chat, worker_problem(e, self.config.reply_timeout_s))
                return
            except DraftExpired:  # forgotten since the tap
                return
            if new is None:  # a second tap, ✅ or a newer message took the draft first; that one goes on
                return
            await self._close_cards(context, draft)
            await self._show(context, owner_chat, new, persona.name)
        else:
            await self._send(update, context, draft, index)

    def _too_old(self, draft: DraftRecord) -> float | None:
        """Hours since the friend's message this draft answers, when that is past Telegram's reply window."""
        incoming = [m.ts for m in draft.context if m.ts is not None and m.speaker != draft.target]
        age_h = (utcnow() - max(incoming, default=draft.created_at)).total_seconds() / 3600
        return age_h if age_h > BUSINESS_REPLY_WINDOW_H else None

    async def _send(self, update: Update, context, draft: DraftRecord, index: int) -> None:
        """✅: claim the draft, then send the candidate into the friend's chat (resuming after a failure)."""
        query = update.callback_query
        connection_id = draft.refs.get("business_connection_id")
        if connection_id is not None and draft.status == "open" and (age_h := self._too_old(draft)) is not None:
            await answer(query, f"Can't send: Telegram lets a bot reply for you only within "
                                f"{BUSINESS_REPLY_WINDOW_H} h of your friend's last message, and this draft answers "
                                f"one from {age_h:.0f} h ago. Write to them yourself.", show_alert=True)
            return
        claimed = await self.core.transition(draft.id, {"open"}, status="sending")
        if claimed is None:
            current = await self.core.get_draft(draft.id)
            await answer(query, USED.get(current.status, "This draft is not open any more."))
            return
        if claimed.chosen is not None and claimed.chosen != index:
            await self.core.transition(draft.id, {"sending"}, status="open")
            await answer(query, f"Draft {claimed.chosen + 1} was partly sent: tap its ✅ to send the rest.")
            return
        done = False
        try:
            done = await self._deliver(update, context, claimed, index)
        finally:
            if not done:  # the owner may tap ✅ again: the next try resumes after what was delivered
                with contextlib.suppress(DraftExpired):
                    await self.core.transition(draft.id, {"sending"}, status="open")

    async def _deliver(self, update: Update, context, draft: DraftRecord, index: int) -> bool:
        """Send candidate `index` of a claimed draft message by message; True once all of it was delivered."""
        query = update.callback_query
        candidate = draft.candidates[index]
        persona = self.book.get(draft.persona)
        connection_id = draft.refs.get("business_connection_id")
        if connection_id is None:  # a /draft session: the owner copies it themself
            await answer(query, "Marked as sent: copy it into your chat.")
            await self.core.add_messages(draft.chat, persona.me_tag, candidate)
        else:
            conn = await self._connection(context, connection_id, fresh=True)
            if not conn.is_enabled:
                await answer(query, "Can't send: the business connection is switched off.", show_alert=True)
                return False
            if not (conn.rights and conn.rights.can_reply):
                await answer(query, "Can't send: this bot isn't allowed to reply for you. Allow 'Reply to messages' "
                                    "in Telegram Business → Chatbots.", show_alert=True)
                return False
            await answer(query, "Sending…")
            chat_id = int(draft.refs["chat_id"])
            owner_chat = int(draft.refs.get("owner_chat", query.message.chat.id))
            sent: list[Message] = []

            async def send(text: str) -> None:
                sent.append(await context.bot.send_message(chat_id, text, business_connection_id=connection_id))

            async def typing() -> None:
                await context.bot.send_chat_action(chat_id, ChatAction.TYPING, business_connection_id=connection_id)

            for i in range(draft.delivered if draft.chosen == index else 0, len(candidate)):
                sent.clear()
                try:
                    await self.core.deliver([candidate[i]], send=send, typing=typing)
                except TelegramError as e:
                    logger.warning("draft %s: message %d/%d not delivered (%s)", draft.id, i + 1, len(candidate),
                                   type(e).__name__)
                    progress = f"Sent {i} of {len(candidate)} messages" if i else "Not sent"
                    await self._tell(context, owner_chat, f"{progress}: {telegram_problem(e)}. "
                                     + ("Tap ✅ again to send the rest." if i else "Tap ✅ to try again."))
                    return False
                part = []
                if sent:
                    mine = await self.core.add_message(draft.chat, persona.me_tag, candidate[i],
                                                       message_id=str(sent[0].message_id))
                    part = [(message_fingerprint(mine), candidate[i])]

                def grow(stored: DraftRecord, part=part) -> dict:  # from the stored record: it has any edit since
                    return {"reply": [*(stored.reply if stored.chosen == index else []), *part]}

                draft = await self.core.transition(draft.id, {"sending"}, grow, chosen=index,
                                                   delivered=i + 1) or draft
        draft = await self.core.transition(draft.id, {"sending"}, status="sent") or draft
        if draft.reply_amended and draft.reply_text is not None:
            # the owner edited or deleted a message of the burst before the rest went out: their text is the label
            await self.core.feedback(draft, "edited", index, final_text=draft.reply_text)
        else:
            await self.core.feedback(draft, "sent", index)
        await self._close_cards(context, draft, keep=query.message.message_id if query.message else None)
        try:
            await query.edit_message_reply_markup(reply_markup=None)
        except TelegramError as e:
            logger.info("draft %s: could not close the sent card (%s)", draft.id, type(e).__name__)
        return True

    # ------------------------------------------------------------ errors

    async def on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Log the error with its traceback and tell the owner something short and true."""
        logger.error("telegram handler failed", exc_info=context.error)
        if not isinstance(update, Update):
            return
        if update.callback_query is not None:
            try:
                await update.callback_query.answer("Something went wrong; try again shortly.")
            except Exception:  # already answered, or Telegram is unreachable: the log has it
                logger.debug("could not answer the callback query after an error")
            return
        text = "Something went wrong on my side; try again shortly."
        if update.business_message is not None:
            conn = self.connections.get(update.business_message.business_connection_id or "")
            if conn is not None and conn.user.id in self.owner_ids:
                await context.bot.send_message(conn.user_chat_id, "Couldn't draft a reply to a message in a "
                                               "connected chat; the log has the details.")
            return
        user, chat = update.effective_user, update.effective_chat
        if user is not None and user.id in self.owner_ids and chat is not None and chat.type == "private":
            await context.bot.send_message(chat.id, text)


def build_app(settings, redis=None, request=None) -> Application:
    """The PTB Application with every handler; `request` replaces the HTTP client (tests)."""
    if settings.telegram.token is None:
        raise ConfigError("telegram.token is not set (CONVO_TELEGRAM__TOKEN or [telegram] token in the config)")
    if not settings.telegram.owner_ids:
        raise ConfigError("telegram.owner_ids is empty: put your Telegram user id there (ask @userinfobot)")
    tb = TelegramBot(settings, redis)
    builder = (
        ApplicationBuilder()
        .token(settings.telegram.token.get_secret_value())
        .rate_limiter(RetryingRateLimiter(settings.telegram.max_retries, settings.telegram.retry_after_scale))
        .concurrent_updates(True)  # drafting takes seconds: other chats need not wait
        .post_init(tb.start)
        .post_shutdown(tb.stop)
    )
    if request is not None:
        builder = builder.request(request).get_updates_request(request)
    app = builder.build()
    app.bot_data["convo"] = tb
    app.add_handler(TypeHandler(Update, tb.gate), group=-1)
    app.add_handler(BusinessConnectionHandler(tb.business_connection))
    app.add_handler(MessageHandler(filters.UpdateType.BUSINESS_MESSAGE & filters.TEXT, tb.business_message))
    app.add_handler(MessageHandler(filters.UpdateType.EDITED_BUSINESS_MESSAGE & filters.TEXT, tb.business_edit))
    app.add_handler(BusinessMessagesDeletedHandler(tb.business_deleted))
    app.add_handler(CommandHandler(["start", "help"], tb.help))
    app.add_handler(CommandHandler("personas", tb.personas))
    app.add_handler(CommandHandler("simulate", tb.simulate))
    app.add_handler(CommandHandler("draft", tb.draft))
    app.add_handler(CommandHandler("stop", tb.stop_session))
    app.add_handler(CommandHandler("forget", tb.forget))
    app.add_handler(CallbackQueryHandler(tb.button))
    app.add_handler(MessageHandler(
        filters.UpdateType.MESSAGE & filters.ChatType.PRIVATE & filters.TEXT & ~filters.COMMAND, tb.text))
    app.add_error_handler(tb.on_error)
    return app


def run_polling(settings) -> None:
    """Run the bot until Ctrl-C (long polling, business updates included)."""
    from telegram.error import InvalidToken, NetworkError

    app = build_app(settings)
    try:
        app.run_polling(allowed_updates=Update.ALL_TYPES, drop_pending_updates=False)
    except InvalidToken as e:
        raise ConfigError("telegram.token was rejected by Telegram: copy it again from @BotFather") from e
    except NetworkError as e:
        raise ConfigError(f"cannot reach the Telegram Bot API ({e}); check the network and try again") from e
