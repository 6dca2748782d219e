"""`convo serve api`: personas behind an OpenAI-compatible HTTP API, a thin shell over inference.client like the bots.

    GET  /v1/models             personas (adapters dir + what live workers have loaded) with their current version
    POST /v1/chat/completions   messages -> one GenerateRequest on the requests stream; `stream: true` as SSE
    POST /v1/completions        a raw speaker-tagged prompt ("[RIYA] hi\\n[ALICE]") for users of the plain format
    POST /v1/convo/feedback     👍/👎/sent/edited for a returned completion id -> the FeedbackEvent the bots publish
    GET  /healthz               Redis answers and a worker heartbeat exists (no key needed: container healthchecks)

Every request becomes the same `GenerateRequest` a bot would send, so workers, adapter versions and the feedback
loop stay one. The mapping (done in bot/openai_wire.py; docs/api.md has the user's version):

* `model` is a persona (an adapter dir name), optionally pinned as `alice@v3`; a pin that is not the version the
  workers serve is a 404 (workers serve each persona's `current` version only).
* `role: user` is the owner, `role: assistant` the persona, `name` on either picks another speaker of a group chat
  (a known name maps to its adapter tag, any other gets a tag made from it). `system` and `developer` messages are
  ignored: the adapter learned from chats and has no channel for instructions. Each line of a message's content
  is one chat message (a burst), and at most `dataset.context_messages` messages are sent, the window's start
  moving in blocks of `bot.context_cut_messages` as the bots' does (so a long chat's next turn reuses the worker's
  prefix cache).
* A reply is a burst: its messages are joined with "\\n" in `content` (and streamed that way) and listed in the
  choice's `convo.messages`. `stop` strings cut the text (the worker still generates to its own end).
* Errors are OpenAI's error object: 400 naming the field, 401 bad key, 404 unknown model, 429 rate limit,
  503 Redis or every worker down, 504 no answer within `api.request_timeout_s`.

No torch here (a test asserts it): this runs in the slim image beside the bots. Keys are compared in constant time
and never logged (a key is logged as the first 8 hex digits of its SHA-256); message text is never logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from bot.core import BotConfig, BotCore, DraftExpired, DraftRecord, Persona, load_persona
from bot.openai_wire import (
    BURST_SEPARATOR,
    ApiError,
    ChatBody,
    CompletionBody,
    FeedbackBody,
    SamplingBody,
    apply_stop,
    bad_field,
    chat_history,
    cut_messages,
    held_back,
    parse_body,
    prompt_history,
    raw_completion,
    stop_strings,
)
from errors import ConfigError, ConvoError, ProtocolError
from inference.client import WorkerClient, WorkerTimeout, connect
from inference.protocol import (
    MAX_NEW_TOKENS,
    GenerateRequest,
    GenerateResponse,
    HistoryMessage,
    Keys,
    Mode,
    Partial,
)
from inference.versions import discover, resolve

logger = logging.getLogger("convo.api")

MAX_BODY_BYTES = 4 * 2**20  # a chat history of 64 messages of 4,000 characters fits with room to spare
WORKER_CHECK_S = 2.0  # how long "a worker is alive" is trusted before the heartbeats are looked up again
MODEL_CACHE_S = 1.0  # how long a resolved `model` (persona, tags, current version) is reused

# ---------------------------------------------------------------- service state


class ApiMetrics:
    """Prometheus metrics of the API process (its own registry, served on `api.metrics_port`)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("convo_api_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram("convo_api_request_seconds", "Request to last byte", ["endpoint"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.tokens = Counter("convo_api_tokens", "Tokens reported by the workers", ["kind"], registry=r)
        self.feedback = Counter("convo_api_feedback", "Feedback events published", ["kind"], registry=r)


class RateLimiter:
    """A token bucket per key: `per_min` requests a minute, bursts of up to `per_min`."""

    def __init__(self, per_min: float):
        self.rate_s = per_min / 60
        self.capacity = max(per_min, 1.0)
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, monotonic time)

    def take(self, key_id: str) -> float:
        """0 when the request may go; else the seconds until it could."""
        now = time.monotonic()
        tokens, then = self._buckets.get(key_id, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - then) * self.rate_s)
        if tokens < 1:
            self._buckets[key_id] = (tokens, now)
            return (1 - tokens) / self.rate_s
        self._buckets[key_id] = (tokens - 1, now)
        return 0.0


def key_id(key: str) -> str:
    """What logs and metrics call a key: the first 8 hex digits of its SHA-256 (never the key)."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


@dataclass
class ApiConfig:
    """What the server needs from the settings (built once by `from_settings`; defaults live in config/settings.py)."""

    keys: list[str] = field(repr=False)
    rate_limit_per_min: float
    request_timeout_s: float
    feedback: bool
    bot: BotConfig
    temperature: float
    top_p: float
    max_new_tokens: int
    redis_url: str
    redis_password: Any = None
    heartbeat_ttl_s: float = 10.0
    prefix: str = "convo"
    key_ids: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_settings(cls, settings) -> ApiConfig:
        """From `config.settings.Settings`: the api section, the bots' context rules and the generate defaults."""
        a, g = settings.api, settings.generate
        keys = [k.get_secret_value() for k in a.keys if k.get_secret_value()]
        if not keys:
            raise ConfigError("api.keys is empty: set at least one key, e.g. "
                              "CONVO_API__KEYS='[\"a-long-random-key\"]' "
                              "(python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        bot = BotConfig.from_settings(settings, adapters_dir=a.adapters_dir)
        return cls(keys=keys, rate_limit_per_min=a.rate_limit_per_min, request_timeout_s=a.request_timeout_s,
                   feedback=a.feedback, bot=bot, temperature=min(g.temperature, 2.0), top_p=g.top_p,
                   max_new_tokens=min(g.max_new_tokens, MAX_NEW_TOKENS), redis_url=settings.redis.url,
                   redis_password=settings.redis.password, heartbeat_ttl_s=settings.worker.heartbeat_ttl_s,
                   prefix=settings.redis.prefix, key_ids={k: key_id(k) for k in keys})


@dataclass(frozen=True, slots=True)
class Model:
    """A resolved `model` field: the persona, the version pinned (if any) and the version served now."""

    name: str
    persona: Persona
    pinned: str | None
    current: str | None


class ApiService:
    """The state behind the routes: Redis, the worker client, the bot core (drafts, feedback), limits, metrics."""

    def __init__(self, config: ApiConfig, redis=None):
        self.config = config
        self.keys = Keys(config.prefix)
        self.redis = redis
        self.client: WorkerClient | None = None
        self.core: BotCore | None = None
        self.limiter = RateLimiter(config.rate_limit_per_min)
        self.metrics = ApiMetrics()
        self._key_bytes = [k.encode() for k in config.keys]
        self._workers_seen = (0.0, 0)  # (monotonic time of the check, workers alive then)
        self._own_redis = redis is None
        self._models: dict[str, tuple[float, Model]] = {}  # model field -> (monotonic time, resolved model)

    async def startup(self) -> None:
        """Open Redis (a short connect timeout: a dead Redis is a fast 503, not a hung request)."""
        if self.redis is None:
            self.redis = connect(self.config.redis_url, self.config.redis_password, socket_connect_timeout=3)
        self.client = WorkerClient(self.redis, self.keys)
        self.core = BotCore(self.redis, self.config.bot, "api", self.client)
        try:
            await self.redis.ping()
        except (RedisError, OSError) as e:
            logger.warning("redis unreachable at start-up (%s): answering 503 until it is back", type(e).__name__)

    async def shutdown(self) -> None:
        """Close Redis if this service opened it."""
        if self._own_redis and self.redis is not None:
            await self.redis.aclose()

    # ------------------------------------------------------------ auth, limits

    def authenticate(self, request: Request) -> str:
        """The caller's key id; 401 (OpenAI's shape) without a valid `Authorization: Bearer KEY`."""
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "missing API key: send `Authorization: Bearer KEY` (a key from api.keys)",
                           code="invalid_api_key")
        given_b = given.strip().encode()
        match = None
        for key in self._key_bytes:  # every key is compared, in constant time, whichever matches
            if hmac.compare_digest(given_b, key):
                match = key
        if match is None:
            raise ApiError(401, "incorrect API key provided", code="invalid_api_key")
        kid = self.config.key_ids[match.decode()]
        wait_s = self.limiter.take(kid)
        if wait_s:
            raise ApiError(429, f"rate limit of {self.config.rate_limit_per_min:g} requests/min reached for this "
                                f"key: retry in {wait_s:.1f} s", code="rate_limit_exceeded", type_="requests",
                           headers={"retry-after": str(max(1, round(wait_s)))})
        return kid

    # ------------------------------------------------------------ personas

    def personas(self) -> dict[str, str | None]:
        """persona -> current version, from the adapters dir."""
        out = {}
        for name, persona_dir in discover(self.config.bot.adapters_dir).items():
            try:
                out[name] = resolve(persona_dir)[1]
            except ConvoError:
                continue
        return out

    async def loaded_by_workers(self) -> dict[str, str | None]:
        """persona -> version, of the adapters live workers report loaded (workers may run on other hosts)."""
        from inference.worker import read_status

        out: dict[str, str | None] = {}
        for worker in (await read_status(self.redis, self.keys))["workers"]:
            for loaded in worker["adapters_loaded"]:
                name, _, version = loaded.partition("@")
                out.setdefault(name, None if version in ("", "-") else version)
        return out

    async def resolve_model(self, model: str) -> Model:
        """The persona a `model` field names; 404 when nobody serves it or a pin is not the current version.

        A found model is remembered for MODEL_CACHE_S: a promotion is seen that much later, and a request does not
        read the adapters dir and the adapter's metadata every time.
        """
        cached = self._models.get(model)
        if cached is not None and time.monotonic() - cached[0] < MODEL_CACHE_S:
            return cached[1]
        found = await self._resolve_model(model)
        self._models[model] = (time.monotonic(), found)
        return found

    async def _resolve_model(self, model: str) -> Model:
        name, _, pinned = model.partition("@")
        on_disk = self.personas()
        if name in on_disk:
            current = on_disk[name]
        else:
            loaded = await self._redis(self.loaded_by_workers())
            if name not in loaded:
                raise ApiError(404, f"the model {model!r} does not exist: GET /v1/models lists the personas served",
                               param="model", code="model_not_found")
            current = loaded[name]
        if pinned and pinned != current:
            served = f"{name} serves {current}" if current else f"{name} is unversioned"
            raise ApiError(404, f"the model {model!r} is not served ({served}; workers serve the current version "
                                f"only: use {name!r})", param="model", code="model_not_found")
        try:
            persona = load_persona(self.config.bot.adapters_dir, name)
        except ConvoError as e:
            raise ApiError(404, f"the model {model!r}: {e}", param="model", code="model_not_found") from e
        return Model(model, persona, pinned or None, current)

    # ------------------------------------------------------------ the queue

    async def _redis(self, awaitable):
        """Await a Redis call; 503 when Redis is unreachable."""
        try:
            return await awaitable
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            raise ApiError(503, f"the request queue is unavailable ({type(e).__name__}); retry shortly",
                           code="queue_unavailable") from e

    async def require_worker(self) -> None:
        """503 at once when no worker has a live heartbeat (checked at most every WORKER_CHECK_S)."""
        checked, alive = self._workers_seen
        if time.monotonic() - checked > WORKER_CHECK_S or not alive:
            alive = 0
            async for _ in self.redis.scan_iter(match=self.keys.heartbeat_pattern, count=1000):
                alive += 1
            self._workers_seen = (time.monotonic(), alive)
        if not alive:
            raise ApiError(503, f"no inference worker is running (none sent a heartbeat in the last "
                                f"{self.config.heartbeat_ttl_s:g} s): start `convo serve worker`", code="no_worker")

    def build_request(self, model: Model, body: SamplingBody, history: list[HistoryMessage], mode: Mode,
                      stream: bool) -> GenerateRequest:
        """The GenerateRequest a bot would send, with the body's sampling (defaults from `generate`)."""
        c = self.config
        max_new = getattr(body, "max_completion_tokens", None) or body.max_tokens or c.max_new_tokens
        try:
            return GenerateRequest.build(
                persona=model.persona.name, mode=mode, history=history, n=body.n,
                temperature=c.temperature if body.temperature is None else body.temperature,
                top_p=c.top_p if body.top_p is None else body.top_p, max_new_tokens=max_new, stream=stream)
        except ProtocolError as e:
            raise ApiError(400, str(e), code="invalid_value") from e

    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        """Enqueue and wait; the worker's answer or an ApiError (503, 504, 404...)."""
        await self._redis(self.require_worker())
        try:
            response = await self._redis(self.client.generate(request, self.config.request_timeout_s))
        except WorkerTimeout as e:
            raise timeout_error(self.config.request_timeout_s) from e
        return checked(response)

    async def remember(self, key: str, model: Model, request: GenerateRequest, candidates: list[list[str]],
                       response: GenerateResponse) -> None:
        """Keep the completion as a draft (so feedback can name it) and emit `shown` per choice, like the bots."""
        if not self.config.feedback:
            return
        draft = DraftRecord(
            id=request.id, persona=model.persona.name, mode=request.mode, platform="api", chat=key,
            target=model.persona.target(request.mode), context=list(request.history), candidates=candidates,
            adapter_version=response.adapter.version if response.adapter else model.current, refs={"key": key})
        async with self.redis.pipeline(transaction=False) as pipe:  # one round trip for the draft and its events
            # Not BotCore.save_draft: its per-chat index (for /forget in a chat) would grow with every API call.
            pipe.set(self.keys.draft(draft.id), draft.model_dump_json(), ex=self.config.bot.draft_ttl_s)
            core = BotCore(pipe, self.config.bot, "api", self.client)  # the bots' events, queued on the pipeline
            for i in range(len(candidates)):
                await core.feedback(draft, "shown", i)
            await pipe.execute()

    def count_tokens(self, response: GenerateResponse) -> dict:
        """OpenAI's `usage` from the worker's token counts (0 where a worker reports none)."""
        prompt, completion = response.prompt_tokens or 0, response.completion_tokens or 0
        self.metrics.tokens.labels("prompt").inc(prompt)
        self.metrics.tokens.labels("completion").inc(completion)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def timeout_error(timeout_s: float) -> ApiError:
    """504: nobody answered in time."""
    return ApiError(504, f"no worker answered within {timeout_s:g} s (api.request_timeout_s); the workers may be "
                         f"overloaded", code="timeout")


def checked(response: GenerateResponse) -> GenerateResponse:
    """The response, or the ApiError its worker error maps to."""
    if response.ok:
        return response
    err = response.error
    if err.code == "unknown_persona":
        raise ApiError(404, f"the model is not served: {err.message}", param="model", code="model_not_found")
    if err.code == "invalid":
        raise ApiError(400, f"the worker refused the request: {err.message}", code="invalid_value")
    if err.code == "expired":
        raise ApiError(504, f"the request expired in the queue: {err.message}", code="timeout")
    raise ApiError(500, f"the worker failed ({err.code}): {err.message}", code=err.code)


# ---------------------------------------------------------------- responses


def _now() -> int:
    return int(time.time())


def convo_info(model: Model, response: GenerateResponse) -> dict:
    """The response-level `convo` extension: which adapter answered and how long it took."""
    return {"persona": model.persona.name, "version": response.adapter.version if response.adapter else None,
            "queue_ms": response.queue_ms, "generate_ms": response.generate_ms, "worker": response.worker}


@dataclass(frozen=True, slots=True)
class Shape:
    """What differs between chat and plain completions: names, how a burst renders, how a chunk carries text."""

    object: str
    chunk_object: str
    id_prefix: str
    render: Callable[[Sequence[str]], str]

    def choice(self, index: int, text: str, messages: list[str]) -> dict:
        """A finished choice."""
        if self.object == "chat.completion":
            return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                    "finish_reason": "stop", "logprobs": None, "convo": {"messages": messages}}
        return {"index": index, "text": text, "finish_reason": "stop", "logprobs": None,
                "convo": {"messages": messages}}

    def delta(self, index: int, text: str | None, finish: bool = False, messages: list[str] | None = None,
              role: bool = False) -> dict:
        """One streamed choice."""
        if self.object == "chat.completion":
            delta: dict = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            out = {"index": index, "delta": delta, "finish_reason": "stop" if finish else None, "logprobs": None}
        else:
            out = {"index": index, "text": text or "", "finish_reason": "stop" if finish else None, "logprobs": None}
        if messages is not None:
            out["convo"] = {"messages": messages}
        return out


def _sse(payload: dict | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n".encode()


async def complete(service: ApiService, key: str, model: Model, body: SamplingBody, history: list[HistoryMessage],
                   mode: Mode, shape: Shape) -> Response:
    """Run one completion (both endpoints): JSON, or SSE with `stream: true`."""
    stops = stop_strings(body.stop)
    request = service.build_request(model, body, history, mode, body.stream)
    started = time.monotonic()
    if body.stream:
        return await stream_completion(service, key, model, body, request, stops, shape)
    response = await service.generate(request)
    candidates = [cut_messages(c, stops) for c in response.candidates]
    check_pin(model, response)
    await service._redis(service.remember(key, model, request, candidates, response))
    logger.info("%s %s key=%s persona=%s n=%d %.0f ms", shape.object, request.id, key, model.persona.name,
                len(candidates), (time.monotonic() - started) * 1000)
    return JSONResponse({
        "id": f"{shape.id_prefix}-{request.id}", "object": shape.object, "created": _now(), "model": model.name,
        "choices": [shape.choice(i, shape.render(c), c) for i, c in enumerate(candidates)],
        "usage": service.count_tokens(response), "system_fingerprint": None, "convo": convo_info(model, response),
    })


def check_pin(model: Model, response: GenerateResponse) -> None:
    """A pinned version that changed between the check and the answer (a promotion in between) is a 409."""
    served = response.adapter.version if response.adapter else None
    if model.pinned and served != model.pinned:
        raise ApiError(409, f"{model.persona.name} switched to {served} while the request ran; pin {served} or "
                            f"drop the pin", param="model", code="model_version_changed")


async def stream_completion(service: ApiService, key: str, model: Model, body: SamplingBody, request: GenerateRequest,
                            stops: list[str], shape: Shape) -> Response:
    """SSE from the worker's live partials. The first event is awaited before answering, so a timeout or a
    refusal is still an HTTP error status; later failures arrive as an `error` event before `[DONE]`."""
    await service._redis(service.require_worker())
    items = service.client.stream(request, service.config.request_timeout_s)
    first = await _next_item(service, items)
    if isinstance(first, GenerateResponse):
        try:
            checked(first)
        except ApiError:
            await items.aclose()
            raise
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    head = {"id": f"{shape.id_prefix}-{request.id}", "object": shape.chunk_object, "model": model.name,
            "system_fingerprint": None}

    def chunk(choices: list[dict], **extra) -> bytes:
        return _sse({**head, "created": _now(), "choices": choices, **{k: v for k, v in extra.items() if v}})

    async def events() -> AsyncIterator[bytes]:
        sent, stopped, item = "", False, first
        try:
            if shape.object == "chat.completion":
                yield chunk([shape.delta(0, None, role=True)])
            while isinstance(item, Partial):
                text, stopped = apply_stop(shape.render(item.text.split(BURST_SEPARATOR)) if item.text else "",
                                           stops)
                visible = text if stopped else held_back(text, stops)
                if visible.startswith(sent) and len(visible) > len(sent):
                    yield chunk([shape.delta(0, visible[len(sent):])])
                    sent = visible
                item = await _next_item(service, items)
            response = checked(item)
            check_pin(model, response)
            candidates = [cut_messages(c, stops) for c in response.candidates]
            for i, messages in enumerate(candidates):
                final = shape.render(messages)
                rest = final[len(sent):] if i == 0 and final.startswith(sent) else (final if i else "")
                if rest:
                    yield chunk([shape.delta(i, rest)])
                yield chunk([shape.delta(i, None, finish=True, messages=messages)],
                            convo=convo_info(model, response) if i == len(candidates) - 1 else None)
            usage = service.count_tokens(response)
            if include_usage:
                yield chunk([], usage=usage)
            await service._redis(service.remember(key, model, request, candidates, response))
            logger.info("%s %s key=%s persona=%s n=%d streamed", shape.object, request.id, key, model.persona.name,
                        len(candidates))
        except ApiError as e:
            logger.warning("stream %s failed: %s %s", request.id, e.status, e.code)
            yield _sse(e.body())
        finally:
            await items.aclose()
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


async def _next_item(service: ApiService, items) -> Partial | GenerateResponse:
    """The stream's next Partial or its final response; 504 on timeout, 503 when Redis goes away."""
    try:
        return await service._redis(items.__anext__())
    except WorkerTimeout as e:
        raise timeout_error(service.config.request_timeout_s) from e
    except StopAsyncIteration as e:
        raise ApiError(500, "the stream ended without a response", code="internal") from e


CHAT = Shape("chat.completion", "chat.completion.chunk", "chatcmpl", BURST_SEPARATOR.join)


# ---------------------------------------------------------------- routes


def _service(request: Request) -> ApiService:
    return request.app.state.service


async def models_route(request: Request) -> Response:
    """GET /v1/models: every persona on disk or loaded by a live worker, with its current version."""
    service = _service(request)
    service.authenticate(request)
    found = dict(await service._redis(service.loaded_by_workers()))
    found.update(service.personas())  # the adapters dir is the truth for its personas' current version
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "convo", "convo": {"version": version}}
            for name, version in sorted(found.items())]
    return JSONResponse({"object": "list", "data": data})


async def model_route(request: Request) -> Response:
    """GET /v1/models/{model}."""
    service = _service(request)
    service.authenticate(request)
    model = await service.resolve_model(request.path_params["model"])
    return JSONResponse({"id": model.name, "object": "model", "created": 0, "owned_by": "convo",
                         "convo": {"version": model.current}})


async def chat_route(request: Request) -> Response:
    """POST /v1/chat/completions."""
    service = _service(request)
    key = service.authenticate(request)
    body = parse_body(ChatBody, await request.body())
    model = await service.resolve_model(body.model)
    if body.max_tokens and body.max_completion_tokens and body.max_tokens != body.max_completion_tokens:
        raise bad_field("max_completion_tokens", "differs from max_tokens: send one of them")
    history = chat_history(body.messages, model.persona, service.config.bot.context_messages,
                           service.config.bot.context_cut_messages)
    return await complete(service, key, model, body, history, body.convo.mode, CHAT)


async def completions_route(request: Request) -> Response:
    """POST /v1/completions: a raw speaker-tagged prompt."""
    service = _service(request)
    key = service.authenticate(request)
    body = parse_body(CompletionBody, await request.body())
    model = await service.resolve_model(body.model)
    history, mode = prompt_history(body.prompt, model.persona, service.config.bot.context_messages,
                                   service.config.bot.context_cut_messages)
    target = model.persona.target(mode)
    shape = Shape("text_completion", "text_completion", "cmpl", lambda messages: raw_completion(messages, target))
    return await complete(service, key, model, body, history, mode, shape)


async def feedback_route(request: Request) -> Response:
    """POST /v1/convo/feedback: 👍 (liked), 👎 (disliked), sent or edited for a completion this key received."""
    service = _service(request)
    key = service.authenticate(request)
    body = parse_body(FeedbackBody, await request.body())
    draft_id = body.id.removeprefix("chatcmpl-").removeprefix("cmpl-")
    try:
        draft = await service._redis(service.core.get_draft(draft_id))
    except (DraftExpired, ProtocolError) as e:
        draft = None
        if not service.config.feedback:
            raise ApiError(404, "feedback is off on this server (api.feedback = false)", param="id",
                           code="feedback_disabled") from e
    if draft is None or draft.refs.get("key") != key:  # another key's completion is as unknown as an expired one
        raise ApiError(404, f"no completion {body.id!r} to rate: it expired (bot.draft_ttl_hours) or was not "
                            f"returned to this key", param="id", code="completion_not_found")
    if body.choice >= len(draft.candidates):
        raise bad_field("choice", f"the completion has {len(draft.candidates)} choice(s)")
    if body.kind == "edited" and not (body.text or "").strip():
        raise bad_field("text", "an edited event carries the text the owner actually sent")
    core = service.core
    if body.kind in ("sent", "edited"):  # atomic: of two clients marking one completion, one wins
        try:
            marked = await service._redis(core.transition(draft.id, ("open",), status=body.kind))
        except DraftExpired as e:
            raise ApiError(404, f"no completion {body.id!r} to rate: it expired (bot.draft_ttl_hours)", param="id",
                           code="completion_not_found") from e
        if marked is None:
            raise ApiError(409, f"completion {body.id!r} is already marked sent or edited", param="id",
                           code="already_marked")
    event = await service._redis(core.feedback(draft, body.kind, body.choice,
                                               final_text=body.text if body.kind == "edited" else None))
    service.metrics.feedback.labels(body.kind).inc()
    return JSONResponse({"object": "convo.feedback", "id": event.event_id, "completion_id": body.id,
                         "kind": body.kind, "choice": body.choice})


async def health_route(request: Request) -> Response:
    """GET /healthz: 200 when Redis answers and a worker heartbeat exists, else 503 saying which is missing."""
    from inference.worker import read_status

    service = _service(request)
    try:
        status = await read_status(service.redis, service.keys)
    except (RedisError, OSError) as e:
        return JSONResponse({"status": "unavailable", "redis": False, "workers": 0,
                             "reason": f"redis unreachable ({type(e).__name__})"}, status_code=503)
    workers = len(status["workers"])
    body = {"status": "ok" if workers else "unavailable", "redis": True, "workers": workers,
            "queue_depth": status["queue_depth"]}
    if not workers:
        body["reason"] = "no worker heartbeat: start `convo serve worker`"
    return JSONResponse(body, status_code=200 if workers else 503)


async def api_error(request: Request, exc: Exception) -> Response:
    """ApiError -> OpenAI's error JSON with its status."""
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def internal_error(request: Request, exc: Exception) -> Response:
    """Anything else is a bug: logged with its traceback, answered as a 500 in OpenAI's shape."""
    logger.error("unhandled error on %s", request.url.path, exc_info=exc)
    return JSONResponse(ApiError(500, "internal error (see the server log)", code="internal").body(),
                        status_code=500)


async def not_found(request: Request, exc: Exception) -> Response:
    """Unknown paths and methods, in OpenAI's shape."""
    status = getattr(exc, "status_code", 404)
    return JSONResponse(ApiError(status, f"{request.method} {request.url.path}: no such endpoint",
                                 code="unknown_url").body(), status_code=status)


class _Metrics:
    """ASGI middleware: count every request by endpoint and status, and time it to its last byte."""

    def __init__(self, app, metrics: ApiMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.monotonic(), {"code": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"] if scope["path"] in _ENDPOINTS else "other"
            self.metrics.requests.labels(path, str(status["code"])).inc()
            self.metrics.latency.labels(path).observe(time.monotonic() - started)


_ROUTES = [
    Route("/v1/models", models_route, methods=["GET"]),
    Route("/v1/models/{model:path}", model_route, methods=["GET"]),
    Route("/v1/chat/completions", chat_route, methods=["POST"]),
    Route("/v1/completions", completions_route, methods=["POST"]),
    Route("/v1/convo/feedback", feedback_route, methods=["POST"]),
    Route("/healthz", health_route, methods=["GET"]),
]
_ENDPOINTS = {r.path for r in _ROUTES if "{" not in r.path}


def build_app(config: ApiConfig, redis=None, metrics_port: int = 0) -> Starlette:
    """The ASGI app; `redis` is opened at start-up when None (tests may pass their own)."""
    service = ApiService(config, redis)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.startup()
        server = None
        if metrics_port:
            from prometheus_client import start_http_server

            try:
                server, _ = start_http_server(metrics_port, registry=service.metrics.registry)
            except OSError as e:
                raise ConfigError(f"metrics port {metrics_port}: {e.strerror or e} (set api.metrics_port, "
                                  f"0 turns metrics off)") from e
        try:
            yield
        finally:
            if server is not None:
                server.shutdown()
            await service.shutdown()

    app = Starlette(routes=_ROUTES, lifespan=lifespan, max_body_size=MAX_BODY_BYTES,
                    exception_handlers={ApiError: api_error, 404: not_found, 405: not_found,
                                        Exception: internal_error})
    app.state.service = service
    app.add_middleware(_Metrics, metrics=service.metrics)
    return app


def run_server(settings, host: str | None = None, port: int | None = None, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM (uvicorn); ConfigError without a key."""
    import uvicorn

    config = ApiConfig.from_settings(settings)
    app = build_app(config, metrics_port=settings.api.metrics_port)
    host, port = host or settings.api.host, port or settings.api.port
    logger.info("api on http://%s:%d/v1 (%d key(s), personas from %s)", host, port, len(config.keys),
                config.bot.adapters_dir)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)

