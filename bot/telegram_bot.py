"""`convo serve telegram`: drafts of the owner's replies, in their chat with the bot and in Telegram Business chats.

* Only `telegram.owner_ids` may use the bot. Anyone else gets one polite refusal per process and nothing is stored.
* Bot chat: `/personas`, `/simulate NAME` (chat with the simulated friend; `/stop` ends), `/draft NAME` (paste or
  forward the friend's messages; the bot answers with drafts of the owner's next message), `/forget NAME`.
* Business mode (Settings -> Telegram Business -> Chatbots): a message from a friend mapped in `telegram.chats`
  produces `bot.drafts` drafts in the owner's voice, streamed live with sendMessageDraft and then sent to the owner's
  chat with the bot with buttons ✅ Send / 👍 / 👎 / 🔄. ✅ sends into the friend's chat through the business
  connection only while the connection's rights allow replying (checked with getBusinessConnection at that moment).
  Text the owner then writes in that chat becomes an `edited` event (or `sent` when it is a draft as drafted).

Callback data is `d|ACTION|DRAFT_ID|INDEX` (at most 38 bytes; Telegram allows 64). Every callback query is answered.
"""

from __future__ import annotations

import logging
import secrets
import time

from telegram import (
    BusinessConnection,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
    Update,
)
from telegram.constants import ChatAction
from telegram.error import TelegramError
from telegram.ext import (
    AIORateLimiter,
    Application,
    ApplicationBuilder,
    ApplicationHandlerStop,
    BusinessConnectionHandler,
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
    PersonaBook,
    check_persona_name,
    connect_redis,
    ping_redis,
)
from convo.errors import ConfigError, ConvoError
from inference.client import WorkerError, WorkerTimeout

logger = logging.getLogger(__name__)

PLATFORM = "telegram"
CALLBACK_PREFIX = "d"
ACTIONS = {"s": "send", "l": "liked", "x": "disliked", "r": "regenerate"}
REFUSAL = "Sorry, this is a private bot: it only works for its owner."
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

    # ------------------------------------------------------------ lifecycle

    async def start(self, app: Application | None = None) -> None:
        """Open Redis (post_init)."""
        if self.redis is None:
            self.redis = connect_redis(self.settings)
        await ping_redis(self.redis, self.settings.redis.url)
        self.core = BotCore(self.redis, self.config, PLATFORM)
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
            await update.callback_query.answer(REFUSAL)
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
        await core.add_message(chat, persona.tag, message.text)
        await self._draft_for(context, owner_chat=message.chat_id, chat=chat, persona=persona, refs={})

    # ------------------------------------------------------------ drafts

    async def _draft_for(self, context, owner_chat: int, chat: str, persona, refs: dict[str, str]) -> None:
        """Generate drafts of the owner's next message, stream them live, then show each with its buttons."""
        streamer = self._live_streamer(context, owner_chat) if self.settings.telegram.live_drafts else None
        try:
            draft = await self.core.generate(chat, persona, "self", n=self.config.drafts, on_partial=streamer,
                                             refs={**refs, "owner_chat": str(owner_chat)})
        except (WorkerTimeout, WorkerError) as e:
            await context.bot.send_message(owner_chat, worker_problem(e, self.config.reply_timeout_s))
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
        """Send each candidate to the owner's chat with its buttons."""
        total = len(draft.candidates)
        for i, candidate in enumerate(draft.candidates):
            header = f"✍️ {persona_name} · draft {i + 1}/{total}"
            await context.bot.send_message(owner_chat, f"{header}\n" + "\n".join(candidate),
                                           reply_markup=draft_keyboard(draft.id, i))

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
        if not message.text:
            return
        conn = await self._connection(context, message.business_connection_id)
        if conn.user.id not in self.owner_ids:
            return
        name = self._mapped_persona(message)
        if name is None:
            return  # not a chat the owner asked for drafts in: store nothing
        persona = self.book.get(name)
        chat = self._business_chat(message.chat.id)
        if message.from_user and message.from_user.id == conn.user.id:
            if message.sender_business_bot is not None:
                return  # sent by a bot (our ✅): already recorded
            await self.core.add_message(chat, persona.me_tag, message.text)
            await self.core.owner_wrote(chat, message.text)
            return
        await self.core.add_message(chat, persona.tag, message.text)
        await self._draft_for(context, owner_chat=conn.user_chat_id, chat=chat, persona=persona,
                              refs={"business_connection_id": conn.id, "chat_id": str(message.chat.id)})

    # ------------------------------------------------------------ buttons

    async def button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """✅ / 👍 / 👎 / 🔄 on a draft; always answers the callback query."""
        query = update.callback_query
        try:
            _, code, draft_id, index_s = query.data.split("|")
            action, index = ACTIONS[code], int(index_s)
        except (ValueError, KeyError):
            await query.answer("Unknown button.")
            return
        try:
            draft = await self.core.get_draft(draft_id)
        except DraftExpired:
            await query.answer("This draft has expired.")
            return
        if not 0 <= index < len(draft.candidates):
            await query.answer("Unknown button.")
            return
        if action in ("liked", "disliked"):
            await self.core.feedback(draft, action, index)
            await query.answer("Noted 👍" if action == "liked" else "Noted 👎")
        elif action == "regenerate":
            await query.answer("Drafting again…")
            persona = self.book.get(draft.persona)
            owner_chat = int(draft.refs.get("owner_chat", query.message.chat.id))
            streamer = self._live_streamer(context, owner_chat) if self.settings.telegram.live_drafts else None
            try:
                new = await self.core.regenerate(draft, persona, on_partial=streamer)
            except (WorkerTimeout, WorkerError) as e:
                await context.bot.send_message(owner_chat, worker_problem(e, self.config.reply_timeout_s))
                return
            await self._show(context, owner_chat, new, persona.name)
        else:
            await self._send(update, context, draft, index)

    async def _send(self, update: Update, context, draft: DraftRecord, index: int) -> None:
        """✅: send the candidate into the friend's chat if the connection allows it, else say why."""
        query = update.callback_query
        if draft.status != "open":
            await query.answer("This draft was already used.")
            return
        candidate = draft.candidates[index]
        persona = self.book.get(draft.persona)
        connection_id = draft.refs.get("business_connection_id")
        if connection_id is None:  # a /draft session: the owner copies it themself
            await self.core.add_messages(draft.chat, persona.me_tag, candidate)
            await self.core.set_status(draft, "sent")
            await self.core.feedback(draft, "sent", index)
            await query.answer("Marked as sent: copy it into your chat.")
            return
        conn = await self._connection(context, connection_id, fresh=True)
        if not conn.is_enabled:
            await query.answer("Can't send: the business connection is switched off.", show_alert=True)
            return
        if not (conn.rights and conn.rights.can_reply):
            await query.answer("Can't send: this bot isn't allowed to reply for you. Allow 'Reply to messages' "
                               "in Telegram Business → Chatbots.", show_alert=True)
            return
        chat_id = int(draft.refs["chat_id"])
        await self.core.deliver(
            candidate,
            send=lambda t: context.bot.send_message(chat_id, t, business_connection_id=connection_id),
            typing=lambda: context.bot.send_chat_action(chat_id, ChatAction.TYPING,
                                                        business_connection_id=connection_id),
        )
        await self.core.add_messages(draft.chat, persona.me_tag, candidate)
        await self.core.set_status(draft, "sent")
        await self.core.feedback(draft, "sent", index)
        await query.answer("Sent ✅")
        await query.edit_message_reply_markup(reply_markup=None)

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
        .rate_limiter(AIORateLimiter())
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
