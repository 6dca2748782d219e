"""The Telegram bot: real `Update.de_json` payloads through the real PTB Application, the real Redis and a fake
worker; every Bot API call is recorded by a request class that answers canned results and flags anything else.

What real servers do is part of the harness: updates go through the Application's update queue and are handled
concurrently (`feed` with several updates delivers them at once, like one getUpdates batch); typing pauses are on,
only shortened; the fake HTTP layer answers with Telegram's real error bodies when a test scripts it (429 with
retry_after, 403 blocked, 400 query too old), and Telegram's retry_after is scaled down by a setting, not slept.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
from telegram import Update
from telegram.request import BaseRequest, RequestData

from tests.bot_helpers import PREFIX, FakeWorker, feedback_events, run

pytestmark = pytest.mark.redis

OWNER, FRIEND, STRANGER, BOT_ID = 1001, 2002, 3003, 999
CONN = "bc-conn-1"


def _user(uid: int, name: str) -> dict:
    return {"id": uid, "is_bot": False, "first_name": name}


TOO_MANY = (429, {"ok": False, "error_code": 429, "description": "Too Many Requests: retry after 3",
                  "parameters": {"retry_after": 3}})
BLOCKED = (403, {"ok": False, "error_code": 403, "description": "Forbidden: bot was blocked by the user"})
TOO_OLD = (400, {"ok": False, "error_code": 400,
                 "description": "Bad Request: query is too old and response timeout expired or query id is invalid"})


@dataclass
class Failure:
    """Answer the matching calls of one method with an error body: after `skip` matches, `times` of them."""

    method: str
    response: tuple[int, dict]
    when: Callable[[dict], bool] = lambda params: True
    skip: int = 0
    times: int = 1


class RecordingRequest(BaseRequest):
    """Answers Bot API calls with canned valid results, records each call, and flags any unexpected method."""

    def __init__(self, can_reply: bool = True, connection_owner: int = OWNER, drafts_fail: bool = False,
                 failures: Sequence[Failure] = ()):
        self.drafts_fail = drafts_fail
        self.failures = list(failures)
        self.calls: list[tuple[str, dict]] = []  # every attempt, refused ones included
        self.times: list[float] = []  # time.monotonic() of each call
        self.refused: list[dict] = []  # the parameters of the attempts answered with an error
        self.unexpected: list[str] = []
        self.can_reply = can_reply
        self.connection_owner = connection_owner
        self._message_id = 500
        self.sent_ids: dict[str, int] = {}  # text -> message id of each message sent

    @property
    def read_timeout(self):
        return 1.0

    async def initialize(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None

    def _message(self, params: dict) -> dict:
        self._message_id += 1
        chat_id = int(params["chat_id"])
        msg = {"message_id": self._message_id, "date": int(time.time()), "text": params.get("text", ""),
               "chat": {"id": chat_id, "type": "private", "first_name": "x"},
               "from": {"id": BOT_ID, "is_bot": True, "first_name": "Convo"}}
        if params.get("business_connection_id"):
            msg["business_connection_id"] = params["business_connection_id"]
        self.sent_ids[msg["text"]] = self._message_id
        return msg

    async def do_request(self, url: str, method: str, request_data: RequestData | None = None,
                         read_timeout=None, write_timeout=None, connect_timeout=None, pool_timeout=None):
        name = url.rsplit("/", 1)[-1]
        params = request_data.parameters if request_data else {}
        self.calls.append((name, params))
        self.times.append(time.monotonic())
        for failure in self.failures:
            if failure.method == name and failure.times > 0 and failure.when(params):
                if failure.skip > 0:
                    failure.skip -= 1
                    continue
                failure.times -= 1
                self.refused.append(params)
                status, body = failure.response
                return status, json.dumps(body).encode()
        if name == "getMe":
            result = {"id": BOT_ID, "is_bot": True, "first_name": "Convo", "username": "convo_test_bot"}
        elif name in ("sendMessage", "editMessageReplyMarkup"):
            result = self._message(params) if name == "sendMessage" else True
        elif name == "sendMessageDraft" and self.drafts_fail:
            return 400, json.dumps({"ok": False, "error_code": 400, "description": "Bad Request: no"}).encode()
        elif name in ("sendMessageDraft", "sendChatAction", "answerCallbackQuery"):
            result = True
        elif name == "getBusinessConnection":
            result = {"id": params["business_connection_id"], "user": _user(self.connection_owner, "Owner"),
                      "user_chat_id": self.connection_owner, "date": int(time.time()), "is_enabled": True,
                      "rights": {"can_reply": self.can_reply}}
        else:
            self.unexpected.append(name)
            return 400, json.dumps({"ok": False, "error_code": 400, "description": f"unexpected {name}"}).encode()
        return 200, json.dumps({"ok": True, "result": result}).encode()

    def named(self, name: str) -> list[dict]:
        """The parameters of every call of one method, in order."""
        return [p for n, p in self.calls if n == name]

    def delivered(self, name: str) -> list[dict]:
        """The parameters of the calls of one method that Telegram accepted, in order."""
        return [p for p in self.named(name) if not any(p is r for r in self.refused)]


def _settings(redis_url, tmp_path, chats=None, **bot):
    from config.settings import Settings

    telegram = {"token": "123:TEST", "owner_ids": [OWNER], "chats": chats or {str(FRIEND): "alice"},
                "live_draft_interval_s": 0.01, "debounce_ms": 20, "retry_after_scale": 0.001}
    telegram.update({k: bot.pop(k) for k in list(bot) if k in ("debounce_ms", "max_retries", "live_draft_interval_s")})
    return Settings(
        redis={"url": redis_url, "prefix": PREFIX},
        # Real pacing, shortened: a 20-character message pauses 20 ms before it is sent.
        bot={"adapters_dir": str(tmp_path / "adapters"), "typing_s_per_char": 0.001, "max_typing_s": 0.05,
             "reply_timeout_s": 5.0, "drafts": 2, **bot},
        telegram=telegram,
    )


@asynccontextmanager
async def telegram_app(redis_url, tmp_path, request: RecordingRequest, chats=None, **bot):
    """A real Application on the recording request, started like run_polling starts it (without polling)."""
    from bot.telegram_bot import build_app

    app = build_app(_settings(redis_url, tmp_path, chats=chats, **bot), request=request)
    await app.initialize()
    await app.post_init(app)
    try:
        yield app
    finally:
        await app.post_shutdown(app)
        await app.shutdown()
    assert request.unexpected == [], f"unexpected Bot API calls: {request.unexpected}"


class Updates:
    """Update payloads as Telegram sends them."""

    def __init__(self):
        self.n = 0

    def _next(self) -> int:
        self.n += 1
        return self.n

    def message(self, text: str, user: int = OWNER) -> dict:
        msg = {"message_id": self._next(), "date": int(time.time()), "text": text, "from": _user(user, "U"),
               "chat": {"id": user, "type": "private", "first_name": "U"}}
        if text.startswith("/"):
            msg["entities"] = [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}]
        return {"update_id": self.n, "message": msg}

    def connection(self, user: int = OWNER, can_reply: bool = True) -> dict:
        return {"update_id": self._next(), "business_connection": {
            "id": CONN, "user": _user(user, "Owner"), "user_chat_id": user, "date": int(time.time()),
            "is_enabled": True, "rights": {"can_reply": can_reply}}}

    def business_message(self, text: str, sender: int = FRIEND, chat: int = FRIEND) -> dict:
        return {"update_id": self._next(), "business_message": {
            "message_id": self.n, "date": int(time.time()), "text": text, "business_connection_id": CONN,
            "from": _user(sender, "Alice"), "chat": {"id": chat, "type": "private", "first_name": "Alice"}}}

    def edited_business_message(self, message_id: int, text: str, sender: int = FRIEND, chat: int = FRIEND) -> dict:
        return {"update_id": self._next(), "edited_business_message": {
            "message_id": message_id, "date": int(time.time()) - 5, "edit_date": int(time.time()), "text": text,
            "business_connection_id": CONN, "from": _user(sender, "Alice"),
            "chat": {"id": chat, "type": "private", "first_name": "Alice"}}}

    def deleted_business_messages(self, *message_ids: int, chat: int = FRIEND) -> dict:
        return {"update_id": self._next(), "deleted_business_messages": {
            "business_connection_id": CONN, "message_ids": list(message_ids),
            "chat": {"id": chat, "type": "private", "first_name": "Alice"}}}

    def callback(self, data: str, user: int = OWNER) -> dict:
        return {"update_id": self._next(), "callback_query": {
            "id": f"cq{self.n}", "from": _user(user, "Owner"), "chat_instance": "ci", "data": data,
            "message": {"message_id": 77, "date": int(time.time()), "text": "draft",
                        "chat": {"id": user, "type": "private", "first_name": "Owner"},
                        "from": {"id": BOT_ID, "is_bot": True, "first_name": "Convo"}}}}


async def feed(app, *payloads: dict) -> None:
    """Hand updates to the Application the way polling does (its update queue; handled concurrently, as
    `concurrent_updates` says) and return once every one of them has been handled."""
    for payload in payloads:
        await app.update_queue.put(Update.de_json(payload, app.bot))
    await app.start()
    await app.update_queue.join()  # every queued update handled
    await app.stop()


def _buttons(params: dict) -> list[str]:
    markup = params.get("reply_markup")
    markup = json.loads(markup) if isinstance(markup, str) else markup
    return [b["callback_data"] for row in (markup or {}).get("inline_keyboard", []) for b in row]


async def _all_keys(redis_url) -> list[bytes]:
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_url)
    try:
        return await client.keys(f"{PREFIX}:*")
    finally:
        await client.aclose()


def test_non_owner_is_refused_once_and_nothing_is_stored(redis_url, tmp_path):
    request = RecordingRequest(connection_owner=STRANGER)
    u = Updates()

    async def scenario():
        async with FakeWorker(redis_url) as worker, telegram_app(redis_url, tmp_path, request) as app:
            await feed(app, u.message("/simulate alice", user=STRANGER))
            await feed(app, u.message("hello?", user=STRANGER))
            await feed(app, u.callback(f"d|l|{'a' * 32}|0", user=STRANGER))
            await feed(app, u.connection(user=STRANGER))
            await feed(app, u.business_message("hi from a friend of a stranger"))
        return worker.requests, await _all_keys(redis_url)

    requests, keys = run(scenario())
    sent = request.named("sendMessage")
    assert [(int(p["chat_id"]), p["text"]) for p in sent] == [(STRANGER, sent[0]["text"])] * 2
    assert "only works for its owner" in sent[0]["text"]  # once in the bot chat, once for the connection
    assert request.named("answerCallbackQuery")[0]["text"].startswith("Sorry")
    assert requests == [] and keys == [f"{PREFIX}:requests".encode()]  # only the fake worker's empty stream


def test_business_message_streams_live_drafts_then_send_uses_the_connection(redis_url, tmp_path):
    request = RecordingRequest(can_reply=True)
    u = Updates()

    async def scenario():
        async with FakeWorker(redis_url) as worker, telegram_app(redis_url, tmp_path, request) as app:
            await feed(app, u.connection())
            await feed(app, u.business_message("are you coming tonight?"))
            drafts = [p for p in request.named("sendMessage") if p.get("reply_markup")]
            send_data = _buttons(drafts[1])[0]
            await feed(app, u.callback(send_data))
            await feed(app, u.callback(send_data))  # a second tap: already used
            events = await feedback_events(app.bot_data["convo"].redis)
            history = await app.bot_data["convo"].core.history(f"biz:{FRIEND}")
        return worker.requests, drafts, events, history

    requests, drafts, events, history = run(scenario())
    names = [n for n, _ in request.calls]
    first_final = next(i for i, (n, p) in enumerate(request.calls) if n == "sendMessage" and p.get("reply_markup"))
    live = [i for i, n in enumerate(names) if n == "sendMessageDraft"]
    assert live and max(live) < first_final  # the live draft streams before the final message replaces it
    assert all(int(p["chat_id"]) == OWNER for p in request.named("sendMessageDraft"))
    assert requests[0].mode == "self" and requests[0].persona == "alice" and requests[0].stream
    assert [(m.speaker, m.text) for m in requests[0].history] == [("ALICE", "are you coming tonight?")]
    assert len(drafts) == 2 and all(int(p["chat_id"]) == OWNER for p in drafts)
    for p in drafts:
        data = _buttons(p)
        assert len(data) == 4 and all(len(d.encode()) <= 64 for d in data)
    to_friend = [p for p in request.named("sendMessage") if int(p["chat_id"]) == FRIEND]
    assert [p["text"] for p in to_friend] == ["alice/self #1 re: are you coming tonight?", "second msg"]
    assert all(p["business_connection_id"] == CONN for p in to_friend)
    assert request.named("getBusinessConnection")[0]["business_connection_id"] == CONN
    answers = [p.get("text") for p in request.named("answerCallbackQuery")]
    assert answers == ["Sending…", "This draft was already used."]
    assert [e.kind for e in events] == ["shown", "shown", "sent"]
    sent = events[-1]
    assert sent.candidate_index == 1 and sent.final_text == "alice/self #1 re: are you coming tonight?\nsecond msg"
    assert [(m.speaker, m.text) for m in sent.context] == [("ALICE", "are you coming tonight?")]
    assert sent.target == "ME" and sent.platform == "telegram" and sent.adapter_version == "v3"
    assert [m.speaker for m in history] == ["ALICE", "ME", "ME"]


def test_send_refused_with_a_reason_when_the_connection_cannot_reply(redis_url, tmp_path):
    request = RecordingRequest(can_reply=False)
    u = Updates()

    async def scenario():
        async with FakeWorker(redis_url), telegram_app(redis_url, tmp_path, request) as app:
            await feed(app, u.business_message("hey"))
            drafts = [p for p in request.named("sendMessage") if p.get("reply_markup")]
            await feed(app, u.callback(_buttons(drafts[0])[0]))
            return await feedback_events(app.bot_data["convo"].redis)

    events = run(scenario())
    answer = request.named("answerCallbackQuery")[-1]
    assert "isn't allowed to reply" in answer["text"] and answer["show_alert"] is True
    assert not [p for p in request.named("sendMessage") if int(p["chat_id"]) == FRIEND]
    assert "sent" not in [e.kind for e in events]


def test_owner_text_after_a_draft_is_an_edited_event_and_buttons_give_feedback(redis_url, tmp_path):
    request = RecordingRequest()
    u = Updates()

    async def scenario():
        async with FakeWorker(redis_url) as worker, telegram_app(redis_url, tmp_path, request) as app:
            await feed(app, u.business_message("dinner at 8?"))
            drafts = [p for p in request.named("sendMessage") if p.get("reply_markup")]
            send, like, dislike, regen = _buttons(drafts[0])
            await feed(app, u.callback(like))
            await feed(app, u.callback(dislike))
            await feed(app, u.callback(regen))
            await feed(app, u.callback(f"d|l|{'0' * 32}|0"))  # expired or unknown draft
            await feed(app, u.callback("garbage"))
            await feed(app, u.business_message("sure, see you at 8", sender=OWNER, chat=FRIEND))
            return worker.requests, await feedback_events(app.bot_data["convo"].redis)

    requests, events = run(scenario())
    assert [e.kind for e in events] == ["shown", "shown", "liked", "disliked", "regenerated", "shown", "shown",
                                        "edited"]
    assert requests[1].history == requests[0].history  # 🔄 drafts again from the same context
    edited = events[-1]
    assert edited.final_text == "sure, see you at 8" and edited.candidate  # both texts
    assert [(m.speaker, m.text) for m in edited.context] == [("ALICE", "dinner at 8?")]
    answers = [p.get("text") for p in request.named("answerCallbackQuery")]
    assert answers == ["Noted 👍", "Noted 👎", "Drafting again…", "This draft has expired.", "Unknown button."]


def test_worker_timeout_tells_the_owner_in_chat(redis_url, tmp_path):
    request = RecordingRequest()
    u = Updates()

    async def scenario():
        async with FakeWorker(redis_url, answer=lambda r: None), \
                telegram_app(redis_url, tmp_path, request, reply_timeout_s=0.3) as app:
            await feed(app, u.business_message("hello?"))
            await feed(app, u.message("/simulate alice"))
            await feed(app, u.message("hi"))

    run(scenario())
    texts = [p["text"] for p in request.named("sendMessage")]
    assert sum("No reply from the model worker within 0.3 s" in t for t in texts) == 2
    assert all("Traceback" not in t for t in texts)


def test_simulate_session_bursts_and_forget_deletes(redis_url, tmp_path):
    request = RecordingRequest()
    u = Updates()

    async def scenario():
        async with FakeWorker(redis_url) as worker, telegram_app(redis_url, tmp_path, request) as app:
            await feed(app, u.message("hi"))  # no session yet
            await feed(app, u.message("/simulate alice"))
            await feed(app, u.message("hi alice"))
            await feed(app, u.message("/stop"))
            await feed(app, u.message("/draft alice"))
            await feed(app, u.message("can you bring the cake?"))
            await feed(app, u.business_message("hello"))
            before = sorted(k.decode() for k in await _all_keys(redis_url) if b":history:" in k or b":draft" in k)
            await feed(app, u.message("/forget alice"))
            after = sorted(k.decode() for k in await _all_keys(redis_url) if b":history:" in k or b":draft" in k)
        return worker.requests, before, after

    requests, before, after = run(scenario())
    texts = [p["text"] for p in request.named("sendMessage")]
    assert texts[0].startswith("Pick someone first")
    # a burst: separate messages, each labelled as AI
    assert "🤖 alice (AI): alice/friend #0 re: hi alice" in texts and "🤖 alice (AI): second msg" in texts
    assert requests[0].mode == "friend" and [m.speaker for m in requests[0].history] == ["ME"]
    assert requests[1].mode == "self" and [m.speaker for m in requests[1].history] == ["ALICE"]
    assert any(k.endswith(f":history:telegram:biz:{FRIEND}") for k in before)
    assert any(f":history:telegram:sim:{OWNER}:alice" in k for k in before)
    assert any(":draft:" in k for k in before)
    assert after == []
    assert texts[-1].startswith("Forgot alice:")


def test_history_survives_a_bot_restart(redis_url, tmp_path):
    u = Updates()

    async def scenario():
        async with FakeWorker(redis_url) as worker:
            async with telegram_app(redis_url, tmp_path, RecordingRequest()) as app:
                await feed(app, u.business_message("first message"))
            async with telegram_app(redis_url, tmp_path, RecordingRequest()) as app:
                await feed(app, u.business_message("second message"))
        return worker.requests

    requests = run(scenario())
    assert [m.text for m in requests[1].history] == ["first message", "second message"]


def test_unmapped_chats_store_nothing_and_failures_keep_the_bot_running(redis_url, tmp_path):
    request = RecordingRequest(drafts_fail=True)
    u = Updates()
    chats = {str(FRIEND): "alice", "4004": "broken"}
    broken = tmp_path / "adapters" / "broken"
    broken.mkdir(parents=True)
    (broken / "convo_adapter.json").write_text("{not json")  # an adapter replaced by something unreadable

    async def scenario():
        async with FakeWorker(redis_url) as worker, telegram_app(redis_url, tmp_path, request, chats=chats) as app:
            await feed(app, u.business_message("who is this?", sender=5005, chat=5005))  # not mapped
            keys_unmapped = await _all_keys(redis_url)
            await feed(app, u.business_message("hi", sender=4004, chat=4004))  # its adapter metadata is broken
            await feed(app, u.business_message("still there?"))  # live previews fail; drafts still arrive
            return worker.requests, keys_unmapped

    requests, keys_unmapped = run(scenario())
    assert keys_unmapped == [f"{PREFIX}:requests".encode()] and len(requests) == 1
    texts = [p["text"] for p in request.named("sendMessage")]
    assert texts[0].startswith("Couldn't draft a reply to a message in a connected chat")
    assert len(request.named("sendMessageDraft")) == 1  # failed once, then no more previews
    assert sum(1 for p in request.named("sendMessage") if p.get("reply_markup")) == 2


def test_a_bad_persona_name_in_the_config_is_refused_at_start(redis_url, tmp_path):
    from bot.telegram_bot import build_app
    from errors import ConfigError

    with pytest.raises(ConfigError, match=r"telegram.chats\[4004\] 'not/a/persona'"):
        build_app(_settings(redis_url, tmp_path, chats={"4004": "not/a/persona"}), request=RecordingRequest())


# ---------------------------------------------------------------- real conditions (issue 18)


def _to(request: RecordingRequest, chat: int) -> list[str]:
    """The texts that reached a chat."""
    return [p["text"] for p in request.delivered("sendMessage") if int(p["chat_id"]) == chat]


def _cards(request: RecordingRequest) -> list[dict]:
    """The draft cards that reached the owner."""
    return [p for p in request.delivered("sendMessage") if p.get("reply_markup")]


def test_telegram_double_tap_sends_once(redis_url, tmp_path):
    request = RecordingRequest()
    u = Updates()

    async def scenario():
        async with FakeWorker(redis_url), telegram_app(redis_url, tmp_path, request) as app:
            await feed(app, u.business_message("are you coming?"))
            send = _buttons(_cards(request)[0])[0]
            await feed(app, u.callback(send), u.callback(send))  # two taps, handled concurrently
            return await feedback_events(app.bot_data["convo"].redis)

    events = run(scenario())
    assert _to(request, FRIEND) == ["alice/self #0 re: are you coming?", "second msg"]
    assert [e.kind for e in events] == ["shown", "shown", "sent"]
    answers = [p.get("text") for p in request.named("answerCallbackQuery")]
    assert sorted(answers) == sorted(["Sending…", "This draft is being sent already."])
    names = [(n, int(p.get("chat_id", 0))) for n, p in request.calls]
    assert names.index(("answerCallbackQuery", 0)) < names.index(("sendMessage", FRIEND))  # answered at once


def test_telegram_friend_burst_drafts_once_and_stale_send_is_refused(redis_url, tmp_path):
    request = RecordingRequest()
    u = Updates()

    async def scenario():
        async with FakeWorker(redis_url) as worker, \
                telegram_app(redis_url, tmp_path, request) as app:
            await feed(app, u.business_message("hey"), u.business_message("are you there?"),
                       u.business_message("call me"))
            first_cards = _cards(request)
            await feed(app, u.business_message("never mind"))
            await feed(app, u.callback(_buttons(first_cards[0])[0]))  # ✅ on a superseded draft
            return worker.requests, first_cards

    requests, first_cards = run(scenario())
    assert len(first_cards) == 2  # one generation for the burst, `bot.drafts` cards
    assert len(requests) == 2
    assert [m.text for m in requests[0].history] == ["hey", "are you there?", "call me"]
    assert requests[1].history[-1].text == "never mind"
    closed = {int(p["message_id"]) for p in request.named("editMessageReplyMarkup") if not p.get("reply_markup")}
    assert len(closed) == 2  # the first draft's cards lost their buttons
    assert request.named("answerCallbackQuery")[-1]["text"] == "This draft was replaced by a newer one."
    assert _to(request, FRIEND) == []


@pytest.mark.parametrize("cut", [1, 8])
def test_telegram_long_business_chat_keeps_the_context_start_for_a_block(redis_url, tmp_path, cut):
    """A Business chat past the context window (16 messages): with bot.context_cut_messages = 8 consecutive drafts
    start their context at the same message (the worker's prefix cache reuses that prompt); with 1 it slides."""
    request = RecordingRequest()
    u = Updates()

    async def scenario():
        async with FakeWorker(redis_url) as worker, \
                telegram_app(redis_url, tmp_path, request, context_cut_messages=cut) as app:
            for r in range(10):
                await feed(app, u.business_message(f"friend {r}"))
                await feed(app, u.business_message(f"me {r}", sender=OWNER, chat=FRIEND))
            return worker.requests

    requests = run(scenario())
    assert len(requests) == 10 and [m.text for m in requests[9].history][-1] == "friend 9"
    # Drafts 9 and 10 see 17 and 19 messages of chat.
    firsts = [r.history[0].text for r in requests[8:]]
    if cut == 8:
        assert firsts == ["friend 4", "friend 4"] and [len(r.history) for r in requests[8:]] == [9, 11]
    else:
        assert firsts == ["me 0", "me 1"] and [len(r.history) for r in requests[8:]] == [16, 16]


def test_telegram_forwards_into_draft_session_draft_once(redis_url, tmp_path):
    request = RecordingRequest()
    u = Updates()

    async def scenario():
        async with FakeWorker(redis_url) as worker, \
                telegram_app(redis_url, tmp_path, request) as app:
            await feed(app, u.message("/draft alice"))
            await feed(app, u.message("first forward"), u.message("second forward"), u.message("third forward"))
            return worker.requests

    requests = run(scenario())
    assert len(requests) == 1 and len(requests[0].history) == 3
    assert len(_cards(request)) == 2


def test_telegram_429_on_a_card_is_retried_after_retry_after(redis_url, tmp_path):
    card_2 = Failure("sendMessage", TOO_MANY, when=lambda p: "draft 2/2" in p.get("text", ""))
    request = RecordingRequest(failures=[card_2])
    u = Updates()

    async def scenario():
        async with FakeWorker(redis_url), telegram_app(redis_url, tmp_path, request) as app:
            await feed(app, u.business_message("hi"))
            return await feedback_events(app.bot_data["convo"].redis)

    events = run(scenario())
    assert card_2.times == 0 and len(request.refused) == 1  # Telegram did answer 429 once
    assert len(_cards(request)) == 2  # the retry got card 2 through
    assert [(e.kind, e.candidate_index) for e in events] == [("shown", 0), ("shown", 1)]
    attempts = [t for (n, p), t in zip(request.calls, request.times, strict=True) if "draft 2/2" in p.get("text", "")]
    assert 0.1 <= attempts[1] - attempts[0] < 1.0  # retry_after 3 s, scaled by retry_after_scale (+ PTB's 0.1 s)


def test_telegram_429_past_retries_records_only_shown_cards_and_blames_nobody(redis_url, tmp_path):
    card_2 = Failure("sendMessage", TOO_MANY, when=lambda p: "draft 2/2" in p.get("text", ""), times=5)
    request = RecordingRequest(failures=[card_2])
    u = Updates()

    async def scenario():
        async with FakeWorker(redis_url), telegram_app(redis_url, tmp_path, request, max_retries=1) as app:
            await feed(app, u.business_message("hi"))
            return await feedback_events(app.bot_data["convo"].redis)

    events = run(scenario())
    assert [(e.kind, e.candidate_index) for e in events] == [("shown", 0)]
    assert len(request.refused) == 2  # card 2 and its one retry
    texts = _to(request, OWNER)
    assert len(texts) == 1 and texts[0].startswith("✍️ alice · draft 1/2")
    assert not any("Couldn't draft" in t or "could not" in t for t in [p["text"] for p in request.named("sendMessage")])


def test_telegram_live_previews_default_to_one_per_second():
    from config.settings import Settings

    assert Settings().telegram.live_draft_interval_s >= 1.0  # Telegram allows about one edit of a message a second


@pytest.mark.parametrize(("failure", "times", "reason"), [
    (BLOCKED, 1, "Telegram refused it: bot was blocked by the user"),
    (TOO_MANY, 2, "Telegram is rate-limiting the bot"),  # the first try and its one retry
], ids=["blocked_403", "rate_limited_429"])
def test_telegram_send_failing_mid_burst_resumes_after_what_was_sent(redis_url, tmp_path, failure, times, reason):
    second = Failure("sendMessage", failure, when=lambda p: int(p["chat_id"]) == FRIEND, skip=1, times=times)
    request = RecordingRequest(failures=[second])
    u = Updates()

    async def scenario():
        async with FakeWorker(redis_url), telegram_app(redis_url, tmp_path, request, max_retries=1) as app:
            await feed(app, u.business_message("ping"))
            send = _buttons(_cards(request)[0])[0]
            await feed(app, u.callback(send))
            after_first = list(_to(request, FRIEND))
            kinds_first = [e.kind for e in await feedback_events(app.bot_data["convo"].redis)]
            await feed(app, u.callback(send))  # the owner taps ✅ again
            tb = app.bot_data["convo"]
            return after_first, kinds_first, await feedback_events(tb.redis), await tb.core.history(f"biz:{FRIEND}")

    after_first, kinds_first, events, history = run(scenario())
    delivered = "alice/self #0 re: ping"
    assert after_first[0] == delivered and "second msg" not in after_first  # message 2 was refused
    assert "sent" not in kinds_first
    note = next(t for t in _to(request, OWNER) if t.startswith("Sent 1 of 2 messages"))
    assert reason in note and "Tap ✅ again" in note
    friend_got = [t for t in _to(request, FRIEND)]
    assert friend_got.count(delivered) == 1 and friend_got[-1] == "second msg"  # resumed after message 1
    assert [e.kind for e in events].count("sent") == 1
    assert [(m.speaker, m.text) for m in history] == [("ALICE", "ping"), ("ME", delivered), ("ME", "second msg")]


def test_telegram_edited_and_deleted_business_messages_change_history_and_drafts(redis_url, tmp_path):
    request = RecordingRequest()
    u = Updates()

    async def scenario():
        async with FakeWorker(redis_url) as worker, telegram_app(redis_url, tmp_path, request) as app:
            tb = app.bot_data["convo"]
            first = u.business_message("dinner at 8?")
            await feed(app, first)
            like = _buttons(_cards(request)[0])[1]
            await feed(app, u.edited_business_message(first["business_message"]["message_id"], "dinner at 9?"))
            edited_history = [m.text for m in await tb.core.history(f"biz:{FRIEND}")]
            await feed(app, u.callback(like))
            second = u.business_message("or lunch")
            await feed(app, second)
            dislike = _buttons(_cards(request)[-1])[2]
            await feed(app, u.deleted_business_messages(first["business_message"]["message_id"]))
            await feed(app, u.callback(dislike))
            return worker.requests, edited_history, await tb.core.history(f"biz:{FRIEND}"), \
                await feedback_events(tb.redis)

    requests, edited_history, history, events = run(scenario())
    assert edited_history == ["dinner at 9?"]
    liked = next(e for e in events if e.kind == "liked")
    assert [m.text for m in liked.context] == ["dinner at 9?"]  # the draft's context took the edit
    assert [m.text for m in requests[1].history] == ["dinner at 9?", "or lunch"]
    assert [m.text for m in history] == ["or lunch"]  # the deleted message left the history
    disliked = next(e for e in events if e.kind == "disliked")
    assert [m.text for m in disliked.context] == ["or lunch"]  # and the open draft's context


def _drain_feedback(redis_url, db_url: str):
    """Run the real feedback consumer over the stream into a SQLite store; returns the stored events."""
    import redis as sync_redis

    from inference.protocol import Keys
    from training.feedback.consumer import FeedbackConsumer
    from training.feedback.store import FeedbackStore

    store, client = FeedbackStore(db_url), sync_redis.Redis.from_url(redis_url)
    try:
        store.create()
        FeedbackConsumer(client, store, Keys(PREFIX), consumer="t", block_ms=10).drain()
        return [s.event for s in store.iter_events()]
    finally:
        client.close()
        store.close()


def _no_echo(request):
    return [[f"sure #{i}", "see you"] for i in range(request.n)]


def test_telegram_edits_and_deletions_reach_feedback_already_stored_and_the_export(redis_url, tmp_path):
    from tests.test_feedback_export import meta
    from training.feedback.export import SpeakerMap, build_rows

    request = RecordingRequest()
    u = Updates()
    db = f"sqlite:///{tmp_path}/feedback.db"

    async def scenario():
        async with FakeWorker(redis_url, answer=_no_echo), telegram_app(redis_url, tmp_path, request) as app:
            first = u.business_message("dinner at 8? 12 Elm St")
            await feed(app, first)
            await feed(app, u.callback(_buttons(_cards(request)[0])[0]))  # ✅: "sure #0", "see you" go out
            before = _drain_feedback(redis_url, db)  # stored before any edit
            friend_msg = first["business_message"]["message_id"]
            await feed(app, u.edited_business_message(friend_msg, "dinner at 9?"),
                       u.edited_business_message(request.sent_ids["see you"], "see you at 9", sender=OWNER))
            edited = _drain_feedback(redis_url, db)
            await feed(app, u.deleted_business_messages(friend_msg))
            return before, edited, _drain_feedback(redis_url, db)

    before, edited, deleted = run(scenario())
    assert {e.kind for e in before} == {"shown", "sent"}
    assert all(e.context[0].text == "dinner at 8? 12 Elm St" for e in before)
    assert all([m.text for m in e.context] == ["dinner at 9?"] for e in edited)  # shown and sent alike
    label = next(e for e in edited if e.draft_id == before[-1].draft_id and e.kind != "shown")
    assert (label.kind, label.final_text) == ("edited", "sure #0\nsee you at 9")  # the owner's edit of message 2
    assert all(e.context == [] for e in deleted) and len(deleted) == len(before)
    rows = build_rows(edited, SpeakerMap.from_meta(meta()))
    assert rows.sft and "12 Elm St" not in json.dumps([rows.sft, rows.kto, rows.pairs])


def test_telegram_owner_edits_the_first_message_of_a_send_cut_short_before_the_rest_goes_out(redis_url, tmp_path):
    blocked = Failure("sendMessage", BLOCKED, when=lambda p: int(p["chat_id"]) == FRIEND, skip=1)
    request = RecordingRequest(failures=[blocked])
    u = Updates()

    async def scenario():
        async with FakeWorker(redis_url, answer=_no_echo), telegram_app(redis_url, tmp_path, request) as app:
            await feed(app, u.business_message("dinner?"))
            send = _buttons(_cards(request)[0])[0]
            await feed(app, u.callback(send))  # "sure #0" went out, "see you" was refused
            await feed(app, u.edited_business_message(request.sent_ids["sure #0"], "sure, at 9", sender=OWNER))
            await feed(app, u.callback(send))  # the rest goes out now
            return await feedback_events(app.bot_data["convo"].redis)

    events = run(scenario())
    label = next(e for e in events if e.kind != "shown")
    assert (label.kind, label.final_text) == ("edited", "sure, at 9\nsee you")  # what the friend has, not the draft
    assert label.candidate == ["sure #0", "see you"]


def test_telegram_owner_edits_or_deletes_the_reply_they_typed(redis_url, tmp_path):
    request = RecordingRequest()
    u = Updates()
    db = f"sqlite:///{tmp_path}/feedback.db"

    async def scenario():
        async with FakeWorker(redis_url, answer=_no_echo), telegram_app(redis_url, tmp_path, request) as app:
            await feed(app, u.business_message("dinner?"))
            mine = u.business_message("yes, at 8", sender=OWNER)
            await feed(app, mine)  # typed by the owner: the draft closes as `edited`
            await feed(app, u.edited_business_message(mine["business_message"]["message_id"], "yes, at 9",
                                                      sender=OWNER))
            edited = _drain_feedback(redis_url, db)
            await feed(app, u.deleted_business_messages(mine["business_message"]["message_id"]))
            return edited, _drain_feedback(redis_url, db)

    edited, deleted = run(scenario())
    label = next(e for e in edited if e.kind != "shown")
    assert (label.kind, label.final_text) == ("edited", "yes, at 9")
    assert {e.kind for e in deleted} == {"shown"}  # the reply is gone: no label left


def test_telegram_draft_older_than_24h_is_refused_with_the_reason(redis_url, tmp_path):
    from datetime import timedelta

    from bot.core import DraftRecord

    request = RecordingRequest()
    u = Updates()

    async def scenario():
        async with FakeWorker(redis_url), telegram_app(redis_url, tmp_path, request) as app:
            tb = app.bot_data["convo"]
            await feed(app, u.business_message("still on for tomorrow?"))
            send = _buttons(_cards(request)[0])[0]
            draft = await tb.core.get_draft(send.split("|")[2])
            old = draft.created_at - timedelta(hours=30)  # drafts live 48 h; replies are allowed for 24 h
            aged = DraftRecord.model_validate({**draft.model_dump(), "created_at": old,
                                               "context": [m.model_copy(update={"ts": old}) for m in draft.context]})
            await tb.core.save_draft(aged)
            await feed(app, u.callback(send))
            return await feedback_events(tb.redis), await tb.core.get_draft(draft.id)

    events, draft = run(scenario())
    answer = request.named("answerCallbackQuery")[-1]
    assert "within 24 h" in answer["text"] and "30 h ago" in answer["text"] and answer["show_alert"] is True
    assert _to(request, FRIEND) == [] and "sent" not in [e.kind for e in events]
    assert draft.status == "open"


def test_telegram_expired_callback_query_still_sends_and_regenerates(redis_url, tmp_path):
    request = RecordingRequest(failures=[Failure("answerCallbackQuery", TOO_OLD, times=99)])
    u = Updates()

    async def scenario():
        async with FakeWorker(redis_url) as worker, telegram_app(redis_url, tmp_path, request) as app:
            await feed(app, u.business_message("lunch?"))
            _send, _like, _dislike, regen = _buttons(_cards(request)[0])
            await feed(app, u.callback(regen))
            send = _buttons(_cards(request)[-1])[0]
            await feed(app, u.callback(send))
            return worker.requests, await feedback_events(app.bot_data["convo"].redis)

    requests, events = run(scenario())
    assert len(requests) == 2 and len(_cards(request)) == 4  # 🔄 drafted again
    assert _to(request, FRIEND) == ["alice/self #1 re: lunch?", "second msg"]
    assert [e.kind for e in events][-1] == "sent"
    assert any(p["message_id"] == 77 for p in request.named("editMessageReplyMarkup"))  # the sent card closed


def test_telegram_send_cut_short_by_a_restart_resumes_after_it(redis_url, tmp_path):
    u = Updates()
    first, second = RecordingRequest(), RecordingRequest()

    async def scenario():
        async with FakeWorker(redis_url):
            async with telegram_app(redis_url, tmp_path, first) as app:
                await feed(app, u.business_message("ping"))
                send = _buttons(_cards(first)[0])[0]
                core = app.bot_data["convo"].core
                # The process stopped after message 1 of the burst went out, before the rest.
                await core.transition(send.split("|")[2], {"open"}, status="sending", chosen=0, delivered=1)
            async with telegram_app(redis_url, tmp_path, second) as app:
                await feed(app, u.callback(send))
                return await feedback_events(app.bot_data["convo"].redis)

    events = run(scenario())
    assert _to(second, FRIEND) == ["second msg"]
    assert [e.kind for e in events].count("sent") == 1
