"""`WorkerClient`: how bots and `convo ask` talk to inference workers (import-light: redis + pydantic), and
`connect`, the one factory of Redis clients (async and sync) with the timeouts of the `redis.*` settings.

    client = WorkerClient(connect(settings.redis), Keys(settings.redis.prefix))
    response = await client.generate(GenerateRequest.build(persona="alice", history=[...]), timeout_s=30)
    async for item in client.stream(request, timeout_s=30):   # Partial..., then the GenerateResponse
        ...

The client subscribes to the request's partial channel *before* enqueueing (so no partial is missed), adds the
request to the requests stream, and waits on the reply list with BLPOP: no polling, no sleeps.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import timedelta

from errors import ConvoError
from inference.protocol import (
    GenerateRequest,
    GenerateResponse,
    Keys,
    Partial,
    entry_payload,
    utcnow,
)

BLPOP_SLICE_S = 2.0  # s; kept well under any socket_timeout a caller may set


class WorkerTimeout(ConvoError):
    """No worker answered in time (is `convo serve worker` running against the same Redis and prefix?)."""


class WorkerError(ConvoError):
    """A worker answered with an error (unknown persona, expired, invalid, dead letter, internal)."""

    def __init__(self, response: GenerateResponse):
        self.response = response
        err = response.error
        super().__init__(f"worker error {err.code}: {err.message}" if err else "worker error")


class WorkerClient:
    """Enqueue GenerateRequests and wait for their responses over Redis (redis.asyncio)."""

    def __init__(self, redis, keys: Keys | None = None, max_stream_len: int = 100_000):
        self.redis = redis
        self.keys = keys or Keys()
        self.max_stream_len = max_stream_len

    def _slice_s(self) -> float:
        """How long one BLPOP may block: under half the connection's socket timeout, at most BLPOP_SLICE_S."""
        pool = getattr(self.redis, "connection_pool", None)
        socket_timeout = (getattr(pool, "connection_kwargs", None) or {}).get("socket_timeout")
        return min(BLPOP_SLICE_S, socket_timeout / 2) if socket_timeout else BLPOP_SLICE_S

    def _prepare(self, request: GenerateRequest, timeout_s: float) -> GenerateRequest:
        """Fill the deadline (now + timeout) and reply key when the caller left them empty; stamp enqueued_at."""
        update: dict = {"enqueued_at": utcnow()}  # queue_ms counts from here, not from when the request was built
        if request.deadline is None:
            update["deadline"] = utcnow() + timedelta(seconds=timeout_s)
        if request.reply_to is None:
            update["reply_to"] = self.keys.reply(request.id)
        return request.model_copy(update=update)

    async def enqueue(self, request: GenerateRequest) -> str:
        """Add the request to the requests stream; returns the entry id."""
        entry = await self.redis.xadd(
            self.keys.requests, entry_payload(request), maxlen=self.max_stream_len, approximate=True
        )
        return entry.decode() if isinstance(entry, bytes) else entry

    async def wait(self, request: GenerateRequest, timeout_s: float) -> GenerateResponse:
        """Block until the response to `request` arrives (BLPOP on its reply key) or raise WorkerTimeout."""
        key = request.reply_to or self.keys.reply(request.id)
        end = time.monotonic() + timeout_s
        got = None
        while got is None:
            left = end - time.monotonic()
            if left <= 0:
                break
            # BLPOP in slices shorter than the client's socket timeout (redis-py 8 defaults it to 5 s, and a
            # blocking read longer than that fails with TimeoutError instead of waiting).
            got = await self.redis.blpop([key], timeout=max(min(left, self._slice_s()), 0.01))
        if got is None:
            raise WorkerTimeout(
                f"no worker answered request {request.id} within {timeout_s:g} s "
                f"(is `convo serve worker` running on this Redis with prefix {self.keys.prefix!r}?)"
            )
        return GenerateResponse.loads(got[1])

    async def generate(self, request: GenerateRequest, timeout_s: float = 30.0, raise_on_error: bool = False
                       ) -> GenerateResponse:
        """Enqueue `request` and wait for its response; WorkerTimeout after `timeout_s`."""
        request = self._prepare(request, timeout_s)
        await self.enqueue(request)
        response = await self.wait(request, timeout_s)
        if raise_on_error and not response.ok:
            raise WorkerError(response)
        return response

    async def stream(self, request: GenerateRequest, timeout_s: float = 30.0
                     ) -> AsyncIterator[Partial | GenerateResponse]:
        """Yield each Partial of candidate 1 as the worker publishes it, then the final GenerateResponse."""
        request = self._prepare(request.model_copy(update={"stream": True}), timeout_s)
        channel = self.keys.partial(request.id)
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(channel)
        try:
            await self.enqueue(request)
            end = time.monotonic() + timeout_s
            last_seq = -1
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    break
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=min(left, 1.0))
                if message is not None and message.get("type") == "message":
                    partial = Partial.loads(message["data"])
                    if partial.seq > last_seq:
                        last_seq = partial.seq
                        yield partial
                    if partial.done:
                        break
                # The response can come without a done partial (an error, an expired deadline): check for it.
                got = await self.redis.lpop(request.reply_to)
                if got is not None:
                    response = GenerateResponse.loads(got)
                    if response.ok and response.candidates:
                        # The worker publishes the done partial just after the reply: it may not have arrived
                        # yet. The final text is in the response, so end the partials with it.
                        yield Partial(id=request.id, text="\n".join(response.candidates[0]), done=True,
                                      seq=last_seq + 1)
                    yield response
                    return
            yield await self.wait(request, max(end - time.monotonic(), 0.01))
        finally:
            await pubsub.unsubscribe(channel)
            await pubsub.aclose()


def connect(target, password=None, *, sync: bool = False, block_s: float = 0.0, **options):
    """A Redis client: redis.asyncio by default, redis.Redis with `sync=True`.

    `target` is the `redis` settings (url, password, timeouts) or a URL (then `password`, a SecretStr or str, and
    the default timeouts). A caller that blocks in Redis (XREADGROUP BLOCK, BLPOP) passes the longest block in
    `block_s`: it is added to the socket timeout, so a blocking read is never cut short. `options` go to
    `from_url` as they are (max_connections, or a probe's own short timeouts).
    """
    from config.settings import RedisSettings

    settings = RedisSettings(url=target, password=password) if isinstance(target, str) else target
    if sync:
        import redis as module
    else:
        import redis.asyncio as module
    kwargs = {"socket_connect_timeout": settings.connect_timeout_s,
              "socket_timeout": settings.socket_timeout_s + block_s}
    if settings.password is not None:
        kwargs["password"] = settings.password.get_secret_value()
    return module.from_url(settings.url, **{**kwargs, **options})
