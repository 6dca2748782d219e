"""The wire format between bots and inference workers: pydantic models and every Redis name, in one place.

Bots never load a model. They put a `GenerateRequest` on the requests stream and wait on the request's reply key;
one worker process per GPU reads the stream with a consumer group, generates for a batch of requests at once and
writes a `GenerateResponse` to each reply key (only if none is there yet: answered once), then acks.

    bot ──XADD──▶ {prefix}:requests ──XREADGROUP (group "workers")──▶ worker
    bot ◀─BLPOP── {prefix}:reply:{id}  ◀──────── response (LPUSH, TTL) ─┘
    bot ◀─GET──── {prefix}:partial:{id} ◀──────── growing text of candidate 1 (stream: true)
    bots ──XADD──▶ {prefix}:feedback ──▶ feedback store (training/feedback)
                   (FeedbackEvent entries, and MessageAmendment entries marked `type: amendment`)

* A stream entry has one field, `data`, holding the request's JSON. Entries that fail to parse go to the dead-letter
  stream `{prefix}:dead` with the reason; the worker keeps running.
* Versioned: `v` is PROTOCOL_VERSION. A worker answers a request of another version with an `invalid` error.
* Bounds on every field (history length, text length, n, max_new_tokens): a bot learns of a bad request before
  it is sent (`ProtocolError` naming the field), and a worker never trusts a payload it did not validate.
* Import-light: pydantic only, so `from inference.protocol import GenerateRequest` never pulls torch into a bot.

Changing a model here changes what old workers and bots understand: bump PROTOCOL_VERSION.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from errors import ProtocolError

PROTOCOL_VERSION = 1
DEFAULT_PREFIX = "convo"
WORKERS_GROUP = "workers"
FEEDBACK_GROUP = "feedback-store"
STREAM_FIELD = "data"  # the field of every stream entry holding the model's JSON
AMENDMENT_MARK = ("type", "amendment")  # the second field of a MessageAmendment entry on the feedback stream

# Bounds (a bot is rejected before sending; a worker re-checks what it reads).
MAX_HISTORY = 64
MAX_TEXT_CHARS = 4000
MAX_N = 8
MAX_NEW_TOKENS = 256
MAX_NAME_CHARS = 64
MAX_ID_CHARS = 128
MAX_PLATFORM_CHARS = 32

Mode = Literal["friend", "self"]
ErrorCode = Literal["unknown_persona", "expired", "invalid", "dead_letter", "internal"]
FeedbackKind = Literal["shown", "sent", "edited", "liked", "disliked", "regenerated"]
_NAME = Field(min_length=1, max_length=MAX_NAME_CHARS, pattern=r"^[A-Za-z0-9_.\-]+$")
_TOKEN = r"^[A-Za-z0-9_.:\-]+$"  # ids and labels that become database keys: no NUL, spaces or control characters


def new_id() -> str:
    """A fresh request/draft/event id (hex uuid4)."""
    return uuid.uuid4().hex


def utcnow() -> datetime:
    """Aware UTC now (all timestamps on the wire are aware UTC)."""
    return datetime.now(UTC)


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=MAX_TEXT_CHARS)

    def dumps(self) -> str:
        """The JSON put on the wire."""
        return self.model_dump_json()

    @classmethod
    def loads(cls, raw: str | bytes | dict[str, Any]):
        """Parse and validate a payload; any problem is a ProtocolError naming the field."""
        try:
            if isinstance(raw, dict):
                return cls.model_validate(raw)
            return cls.model_validate_json(raw)
        except ValidationError as e:
            raise ProtocolError(describe_validation_error(cls.__name__, e)) from e

    @classmethod
    def build(cls, **fields):
        """Construct with validation errors turned into one-line ProtocolErrors (what bots call)."""
        try:
            return cls(**fields)
        except ValidationError as e:
            raise ProtocolError(describe_validation_error(cls.__name__, e)) from e


def describe_validation_error(model: str, e: ValidationError) -> str:
    """One line naming the first bad field and what is wrong with it."""
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(payload)"
    return f"{model}.{where}: {err['msg']}"


class HistoryMessage(_Wire):
    """One message of the conversation so far. `speaker` is a prompt tag or a display name the adapter knows."""

    speaker: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    text: str = Field(max_length=MAX_TEXT_CHARS)
    ts: datetime | None = None

    @field_validator("ts")
    @classmethod
    def _ts_in_utc_range(cls, value: datetime | None) -> datetime | None:
        return value if value is None or value.tzinfo is None else _utc_in_range(value)


class GenerateRequest(_Wire):
    """Ask a worker for `n` continuations of `history` as `persona` (friend) or as the owner to them (self)."""

    v: int = PROTOCOL_VERSION
    id: str = Field(default_factory=new_id, min_length=1, max_length=MAX_ID_CHARS, pattern=r"^[A-Za-z0-9_.:\-]+$")
    persona: str = _NAME
    mode: Mode = "friend"
    history: list[HistoryMessage] = Field(default_factory=list, max_length=MAX_HISTORY)
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(0.8, ge=0, le=5)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS)
    stream: bool = False
    deadline: datetime | None = None  # absolute UTC; a worker answers `expired` past it without generating
    reply_to: str | None = Field(None, max_length=256)  # reply key; default reply_key(prefix, id)
    enqueued_at: datetime = Field(default_factory=utcnow)

    @field_validator("deadline", "enqueued_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("must carry a UTC offset")
        return value

    @field_validator("v")
    @classmethod
    def _version(cls, value: int) -> int:
        if value != PROTOCOL_VERSION:
            raise ValueError(f"protocol version {value} is not {PROTOCOL_VERSION}")
        return value

    def expired(self, now: datetime | None = None) -> bool:
        """True once the deadline has passed."""
        return self.deadline is not None and (now or utcnow()) >= self.deadline

    @classmethod
    def with_timeout(cls, timeout_s: float, **fields) -> GenerateRequest:
        """A request whose deadline is `timeout_s` from now."""
        return cls.build(deadline=utcnow() + timedelta(seconds=timeout_s), **fields)


class AdapterRef(_Wire):
    """Which adapter answered: persona and version (`None` for an unversioned dir or the bare base)."""

    persona: str
    version: str | None = None


class ErrorInfo(_Wire):
    """Why a request got no candidates."""

    code: ErrorCode
    message: str = Field(max_length=1000)


class GenerateResponse(_Wire):
    """The answer: `candidates` (each one burst: a list of messages) or `error`."""

    id: str
    candidates: list[list[str]] = Field(default_factory=list, max_length=MAX_N)
    adapter: AdapterRef | None = None
    queue_ms: float | None = None
    generate_ms: float | None = None
    worker: str | None = None
    error: ErrorInfo | None = None
    prompt_tokens: int | None = Field(None, ge=0)  # the prompt's tokens (counted once, not once per candidate)
    completion_tokens: int | None = Field(None, ge=0)  # new tokens over all candidates

    @model_validator(mode="after")
    def _one_of(self) -> GenerateResponse:
        if self.error is not None and self.candidates:
            raise ValueError("a response has candidates or an error, not both")
        return self

    @classmethod
    def failure(cls, request_id: str, code: ErrorCode, message: str, **fields) -> GenerateResponse:
        """An error response."""
        return cls(id=request_id, error=ErrorInfo(code=code, message=message[:1000]), **fields)

    @property
    def ok(self) -> bool:
        """True when the response carries candidates."""
        return self.error is None


class Partial(_Wire):
    """Live text of candidate 1 while it is generated (`stream: true`); `done` on the last one."""

    id: str
    text: str = Field(max_length=MAX_TEXT_CHARS * 4)
    done: bool = False
    seq: int = 0  # increases with every update, so a reader can skip stale ones


def _utc_in_range(value: datetime) -> datetime:
    """An aware time that has a UTC value (what a store converts it to)."""
    try:
        value.astimezone(UTC)  # 0001-01-01T00:00+01:00 is a valid datetime but no UTC one
    except OverflowError:
        raise ValueError("out of range: in UTC it must fall between 0001-01-01 and 9999-12-31") from None
    return value


class FeedbackEvent(_Wire):
    """One reaction to a draft, put on the feedback stream by a bot; becomes training data with no platform lookup.

    `context` is the exact history the draft was generated from; `candidate` the draft's messages; `final_text`
    what the owner actually sent (`edited`: their own text; `sent`: the candidate). `target` is the tag the
    candidate was written as (the persona's tag in friend mode, the owner's in self mode).

    The bounds of the fields the feedback store keeps in columns (event_id, draft_id, persona, adapter_version,
    platform, ts) are the columns' bounds (training/feedback/store.py builds its columns from these constants), so
    every event this model accepts can be stored: ids are plain tokens, `ts` carries an offset and lies within
    Python's datetime range once converted to UTC.
    """

    v: Literal[PROTOCOL_VERSION] = PROTOCOL_VERSION  # another version is refused ("FeedbackEvent.v: Input should be 1")
    event_id: str = Field(default_factory=new_id, min_length=1, max_length=MAX_ID_CHARS, pattern=_TOKEN)
    kind: FeedbackKind
    draft_id: str = Field(min_length=1, max_length=MAX_ID_CHARS, pattern=_TOKEN)
    persona: str = _NAME
    mode: Mode = "self"
    adapter_version: str | None = Field(None, min_length=1, max_length=MAX_NAME_CHARS, pattern=_TOKEN)
    context: list[HistoryMessage] = Field(default_factory=list, max_length=MAX_HISTORY)
    target: str | None = Field(None, max_length=MAX_NAME_CHARS)
    candidate: list[str] = Field(default_factory=list, max_length=32)
    candidate_index: int | None = Field(None, ge=0, le=MAX_N)
    final_text: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    platform: str = Field("console", min_length=1, max_length=MAX_PLATFORM_CHARS, pattern=_TOKEN)
    ts: AwareDatetime = Field(default_factory=utcnow)

    @field_validator("ts")
    @classmethod
    def _ts_in_utc_range(cls, value: datetime) -> datetime:
        return _utc_in_range(value)

    @model_validator(mode="after")
    def _edited_has_text(self) -> FeedbackEvent:
        if self.kind == "edited" and not self.final_text:
            raise ValueError("an edited event carries the owner's final_text")
        return self


class MessageAmendment(_Wire):
    """A chat message was edited (`text`) or deleted (`text` None) on the platform: put on the feedback stream by
    the bot, so the feedback store changes it in every stored event, and in events stored later, too.

    The message is found the way a FeedbackEvent's context holds it, without platform message ids: `platform`,
    `speaker` and `ts` (the HistoryMessage's timestamp, to the microsecond; bots stamp messages in UTC). When the
    message was the owner's reply to a draft (typed by the owner, or one message of a burst sent with ✅),
    `reply_of` names the draft and `reply_text` is the whole reply as it now stands, or None when nothing of it is
    left: the draft's `sent`/`edited` events take it as their final text (or are dropped). `persona` is whose chat
    it is (so `convo forget --persona` finds it).
    """

    v: Literal[PROTOCOL_VERSION] = PROTOCOL_VERSION
    amendment_id: str = Field(default_factory=new_id, min_length=1, max_length=MAX_ID_CHARS, pattern=_TOKEN)
    platform: str = Field(min_length=1, max_length=MAX_PLATFORM_CHARS, pattern=_TOKEN)
    persona: str = _NAME
    speaker: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    ts: AwareDatetime
    text: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    reply_of: str | None = Field(None, min_length=1, max_length=MAX_ID_CHARS, pattern=_TOKEN)
    reply_text: str | None = Field(None, max_length=MAX_TEXT_CHARS * 4)

    @field_validator("ts")
    @classmethod
    def _ts_in_utc_range(cls, value: datetime) -> datetime:
        return _utc_in_range(value)

    @model_validator(mode="after")
    def _reply_needs_draft(self) -> MessageAmendment:
        if self.reply_text is not None and self.reply_of is None:
            raise ValueError("reply_text belongs to a draft: reply_of names it")
        return self

    @property
    def deleted(self) -> bool:
        """True when the message was deleted."""
        return self.text is None

    def finds(self, message: HistoryMessage) -> bool:
        """True when `message` (of an event on this platform) is the amended one."""
        return message.speaker == self.speaker and message.ts is not None and message.ts == self.ts


class ReloadMessage(_Wire):
    """Published on the reload channel: load `persona`'s current version (or every persona's with `None`)."""

    persona: str | None = None
    version: str | None = None


class Heartbeat(_Wire):
    """What a worker writes to its heartbeat key every few seconds.

    Read with unknown fields ignored (not refused, unlike every other wire model): during a rolling upgrade
    `convo serve status` may read the heartbeat of a newer worker, which must not make that worker vanish from the
    list. A field added here needs a default, for the heartbeats of older workers.
    """

    model_config = ConfigDict(**{**_Wire.model_config, "extra": "ignore"})

    worker: str
    pid: int
    base: str
    adapters_loaded: list[str] = Field(default_factory=list)
    batches: int = 0
    requests: int = 0
    started_at: datetime
    ts: datetime = Field(default_factory=utcnow)
    in_flight: int = 0  # requests submitted and not yet answered
    rows_active: int = 0  # rows in the running decode batch (requests x samples)
    rows_capacity: int = 0  # rows the running batch holds at most
    tokens_per_s: float = 0.0  # tokens generated per second over the last ~10 s
    prompt_tokens_run: int = 0  # prompt tokens prefilled since start (what the prefix cache did not cover)
    prompt_tokens_cached: int = 0  # prompt tokens whose keys/values came from the prefix cache since start


class Keys:
    """Every Redis name, under one prefix (setting `redis.prefix`, default "convo")."""

    def __init__(self, prefix: str = DEFAULT_PREFIX):
        if not prefix or any(c.isspace() for c in prefix):
            raise ProtocolError(f"redis prefix {prefix!r}: must be non-empty without spaces")
        self.prefix = prefix

    @property
    def requests(self) -> str:
        """Stream of GenerateRequest entries, read by group WORKERS_GROUP."""
        return f"{self.prefix}:requests"

    @property
    def dead(self) -> str:
        """Dead-letter stream: malformed entries and entries delivered too often, with the reason."""
        return f"{self.prefix}:dead"

    @property
    def feedback(self) -> str:
        """Stream of FeedbackEvent entries, read by group FEEDBACK_GROUP."""
        return f"{self.prefix}:feedback"

    @property
    def feedback_dead(self) -> str:
        """Malformed feedback events, kept aside with the reason."""
        return f"{self.prefix}:feedback:dead"

    @property
    def reload(self) -> str:
        """Pub/sub channel of ReloadMessage."""
        return f"{self.prefix}:reload"

    def reply(self, request_id: str) -> str:
        """List the response is pushed to (BLPOP by the client), with a TTL."""
        return f"{self.prefix}:reply:{request_id}"

    def answered(self, request_id: str) -> str:
        """Marker set (NX) before a response is pushed: a request is answered once even if delivered twice."""
        return f"{self.prefix}:answered:{request_id}"

    def partial(self, request_id: str) -> str:
        """String holding the latest Partial, with a TTL; also the pub/sub channel each Partial is published on."""
        return f"{self.prefix}:partial:{request_id}"

    def heartbeat(self, worker: str) -> str:
        """A worker's Heartbeat, expiring when the worker stops refreshing it."""
        return f"{self.prefix}:worker:{worker}"

    @property
    def heartbeat_pattern(self) -> str:
        """SCAN pattern of every worker's heartbeat."""
        return f"{self.prefix}:worker:*"

    # Bot-side state (bot/core.py).
    def history(self, platform: str, chat: str) -> str:
        """Rolling conversation history of one chat (a list of HistoryMessage JSON)."""
        return f"{self.prefix}:history:{platform}:{chat}"

    def draft(self, draft_id: str) -> str:
        """A draft record (context, candidates, platform ids), with a TTL."""
        return f"{self.prefix}:draft:{draft_id}"

    def chat_drafts(self, platform: str, chat: str) -> str:
        """Set of the draft ids of one chat (so /forget finds them)."""
        return f"{self.prefix}:drafts:{platform}:{chat}"

    def private_history(self, platform: str, chat: str) -> str:
        """Short-lived context of people who did not opt in (a sorted set of HistoryMessage JSON by expiry time)."""
        return f"{self.prefix}:private:{platform}:{chat}"

    def message_ids(self, platform: str, chat: str) -> str:
        """A chat's platform message id -> "speaker|ts" of its history entry (hash; finds edited/deleted messages)."""
        return f"{self.prefix}:msgids:{platform}:{chat}"

    def consent(self, platform: str, user_id: str, guild: str | None = None) -> str:
        """A person's own opt-in to be simulated in one server (Discord); without `guild` the global form used
        before consent was per server, read only to tell its holder to grant again."""
        scope = f"{guild}:" if guild is not None else ""
        return f"{self.prefix}:consent:{platform}:{scope}{user_id}"

    def roleplay(self, platform: str, channel: str) -> str:
        """An active roleplay in a channel."""
        return f"{self.prefix}:roleplay:{platform}:{channel}"


def entry_payload(model: _Wire) -> dict[str, str]:
    """The fields of a stream entry carrying `model`."""
    return {STREAM_FIELD: model.dumps()}


def amendment_payload(amendment: MessageAmendment) -> dict[str, str]:
    """The fields of a feedback-stream entry carrying a MessageAmendment (told apart by AMENDMENT_MARK)."""
    return {STREAM_FIELD: amendment.dumps(), AMENDMENT_MARK[0]: AMENDMENT_MARK[1]}


def is_amendment(fields: dict) -> bool:
    """True when a feedback-stream entry carries a MessageAmendment rather than a FeedbackEvent."""
    key, value = AMENDMENT_MARK
    got = fields.get(key, fields.get(key.encode()))
    return (got.decode("utf-8", "replace") if isinstance(got, bytes) else got) == value


def entry_data(fields: dict) -> str:
    """The JSON of a stream entry's `data` field (bytes or str keys); ProtocolError when it is missing."""
    for key in (STREAM_FIELD, STREAM_FIELD.encode()):
        if key in fields:
            value = fields[key]
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    raise ProtocolError(f"stream entry has no {STREAM_FIELD!r} field (fields: {sorted(map(str, fields))[:5]})")


def dumps_dead_letter(entry_id: str, fields: dict, reason: str) -> dict[str, str]:
    """Fields of a dead-letter entry: the original entry id, its raw data (if any) and the reason."""
    try:
        raw = entry_data(fields)
    except ProtocolError:
        raw = json.dumps({str(k): str(v) for k, v in fields.items()})
    return {"entry_id": entry_id, "data": raw[: MAX_TEXT_CHARS * 16], "reason": reason[:1000]}

