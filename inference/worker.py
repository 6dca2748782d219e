"""The inference worker: read a batch of requests from the Redis stream, generate, reply once, ack.

    main()            start-up, then poll_iteration() until SIGTERM/SIGINT, then shut-down
    poll_iteration()  apply reloads; take stale entries (XAUTOCLAIM) or read new ones (XREADGROUP), then run_batch()
    run_batch()       parse/validate, answer what needs no model (expired, unknown persona, dead letters), then
                      submit each request to the backend's running batch and reply + ack it (atomically) as soon
                      as its own rows stop; a backend without `submit` gets one generate call for the batch instead
    handle_sig()      stop reading; the requests in hand are finished and acked; exit 0

With a continuously batching backend (inference.decode) up to `max_batch` requests are in flight at once: new
ones are read while others generate and join the running batch at its next step, so a short request is never held
behind long ones.

Delivery is at-least-once, answering exactly once: a reply is written by one Lua script that sets the request's
`answered` marker (NX), pushes the response only if the marker was new, and acks the entry, all atomically. So a
worker killed mid-batch leaves its entries pending; another worker (or itself, restarted under the same name) takes
them over after `visibility_timeout_s` and answers whatever was not answered yet. An entry delivered more than
`max_deliveries` times (e.g. one that crashes the worker) goes to the dead-letter stream and its client gets a
`dead_letter` error. Redis going away is logged and retried with backoff; the worker never dies of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from config.settings import WorkerSettings
from errors import ConfigError, ProtocolError
from inference.protocol import (
    MAX_ID_CHARS,
    WORKERS_GROUP,
    AdapterRef,
    ErrorCode,
    GenerateRequest,
    GenerateResponse,
    Heartbeat,
    Keys,
    Partial,
    ReloadMessage,
    dumps_dead_letter,
    entry_data,
    utcnow,
)

logger = logging.getLogger("convo.worker")

BASE_PERSONA = "__base__"  # a request for this persona runs on the bare base model (no adapter)

# KEYS: the requests stream, then per answer its answered marker and reply list.
# ARGV: worker name, ttl s, group, then per answer its response JSON and entry id. Returns 1/0 per answer (fresh?).
# Marker, reply and ack in one atomic step per entry, one round trip per batch: a request is answered once however
# often it is delivered, and an entry is acked only once its reply is written. An answered entry is then deleted:
# it holds chat text, which Redis should keep no longer than it takes to answer.
_REPLY_AND_ACK = """
local out = {}
for i = 1, (#KEYS - 1) / 2 do
  local fresh = redis.call('SET', KEYS[2 * i], ARGV[1], 'NX', 'EX', ARGV[2])
  if fresh then
    redis.call('LPUSH', KEYS[2 * i + 1], ARGV[2 + 2 * i])
    redis.call('EXPIRE', KEYS[2 * i + 1], ARGV[2])
    out[i] = 1
  else
    out[i] = 0
  end
  redis.call('XACK', KEYS[1], ARGV[3], ARGV[3 + 2 * i])
  redis.call('XDEL', KEYS[1], ARGV[3 + 2 * i])
end
return out
"""


@dataclass(slots=True)
class Entry:
    """One stream entry in hand: its id, raw fields and how often it has been delivered."""

    entry_id: str
    fields: dict
    deliveries: int = 1


class WorkerMetrics:
    """Prometheus metrics of one worker (its own registry, so several workers can live in one test process)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("convo_worker_queue_depth", "Requests not yet read by any worker", registry=r)
        self.pending = Gauge("convo_worker_pending", "Requests read but not acked (all workers)", registry=r)
        self.batch_size = Histogram("convo_worker_batch_size", "Requests read and handed to the model together",
                                    registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.queue_wait = Histogram("convo_worker_queue_wait_seconds", "Enqueue to start of generation", registry=r)
        self.generate_latency = Histogram("convo_worker_generate_seconds",
                                          "Submit to answer of one request (or one batch)",
                                          registry=r)
        self.tokens_per_s = Gauge("convo_worker_tokens_per_second", "New tokens per second (running batch, last ~10 s)",
                                  registry=r)
        self.tokens = Counter("convo_worker_tokens", "New tokens generated", registry=r)
        self.requests = Counter("convo_worker_requests", "Requests answered", ["outcome"], registry=r)
        self.errors = Counter("convo_worker_errors", "Error responses by code", ["code"], registry=r)
        self.adapters_loaded = Gauge("convo_worker_adapters_loaded", "Adapters on the model", registry=r)

    def serve(self, port: int) -> None:
        """Expose /metrics on `port` (a daemon thread)."""
        from prometheus_client import start_http_server

        start_http_server(port, registry=self.registry)


class Worker:
    """One worker process: a backend (model) and a consumer in the `workers` group of the requests stream."""

    def __init__(self, redis, keys: Keys, backend, settings: WorkerSettings, *, registry=None, base: str = "",
                 name: str | None = None, metrics: WorkerMetrics | None = None):
        self.redis = redis
        self.keys = keys
        self.backend = backend
        self.settings = settings
        self.registry = registry  # inference.adapters.AdapterRegistry; None serves every persona on the bare base
        self.base = base
        self.name = name or settings.name or f"{socket.gethostname()}-{os.getpid()}"
        self.metrics = metrics or WorkerMetrics()
        self.stopping = asyncio.Event()
        self.batches = 0
        self.answered = 0
        self.started_at = utcnow()
        self._reloads: set[str | None] = set()
        self._own_backlog = True  # on start, re-read this consumer's own pending entries first
        self._next_claim_s = 0.0
        self._next_watch_s = time.monotonic() + settings.watch_interval_s
        self._backoff_s = 0.0
        self._tasks: list[asyncio.Task] = []
        self._reply = redis.register_script(_REPLY_AND_ACK)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._partial_seq: dict[str, int] = {}
        self._partial_futures: dict[str, list] = {}  # request id -> its partial publishes not yet awaited
        self._inflight: dict[str, asyncio.Task] = {}  # entry id -> the task answering it (submitting backends)

    # ------------------------------------------------------------ life cycle

    async def main(self) -> None:
        """Run until stopped: start-up, poll iterations (retrying Redis with backoff), shut-down."""
        await self.startup()
        try:
            while not self.stopping.is_set():
                try:
                    await self.poll_iteration()
                    self._backoff_s = 0.0
                except (RedisConnectionError, RedisTimeoutError, OSError) as e:
                    self._own_backlog = True  # replies of the batch in hand may be lost: re-read it on reconnect
                    await self._backoff(e)
                except Exception:  # a bug or an odd Redis state: log it, keep serving
                    logger.exception("poll iteration failed")
                    self._own_backlog = True
                    await self._pause(1.0)
        finally:
            if self._inflight:  # the requests in hand: finished, replied and acked before exiting
                await asyncio.gather(*self._inflight.values(), return_exceptions=True)
            await self.shutdown()

    async def startup(self) -> None:
        """Signal handlers, consumer group, heartbeat and reload listener, metrics endpoint."""
        self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._loop.add_signal_handler(sig, self.handle_sig, sig)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests)
                pass
        if self.settings.metrics_port:
            try:
                self.metrics.serve(self.settings.metrics_port)
            except OSError as e:
                raise ConfigError(f"metrics port {self.settings.metrics_port}: {e.strerror or e} "
                                  f"(pick another with --metrics-port, or 0 to turn metrics off)") from e
        if self.registry is not None:
            await asyncio.to_thread(self.registry.scan)
            for persona, reason in self.registry.rejected.items():
                logger.warning("persona=%s not served: %s", persona, reason)
        if self.settings.warm_up and hasattr(self.backend, "warm_up"):
            t0 = time.perf_counter()
            await asyncio.to_thread(self.backend.warm_up)
            logger.info("warm-up %.0f ms", (time.perf_counter() - t0) * 1000)
        while not self.stopping.is_set():
            try:
                await self._ensure_group()
                break
            except (RedisConnectionError, RedisTimeoutError, OSError) as e:
                await self._backoff(e)
        self._tasks = [asyncio.create_task(self._heartbeat_loop()), asyncio.create_task(self._reload_listener())]
        logger.info("worker %s started base=%s personas=%d", self.name, self.base,
                    len(self.registry.available) if self.registry else 0)

    async def shutdown(self) -> None:
        """Stop the background tasks and remove this worker's heartbeat."""
        self.stopping.set()  # the loops below also end on their own: redis-py can swallow a cancellation
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self.redis.delete(self.keys.heartbeat(self.name))
        except (RedisConnectionError, RedisTimeoutError, OSError):
            pass
        logger.info("worker %s stopped after %d batches, %d answers", self.name, self.batches, self.answered)

    def handle_sig(self, signum: int) -> None:
        """Stop reading new requests; the batch in hand is finished and acked first."""
        logger.info("worker %s got %s: finishing the batch in hand", self.name, signal.Signals(signum).name)
        self.stopping.set()

    async def _backoff(self, error: Exception) -> None:
        self._backoff_s = min(max(self._backoff_s * 2, 0.1), 10.0)
        logger.warning("redis unreachable (%s): retrying in %.1f s", type(error).__name__, self._backoff_s)
        await self._pause(self._backoff_s)

    async def _pause(self, seconds: float) -> None:
        """Wait `seconds`, or less when the worker is told to stop."""
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except TimeoutError:
            pass

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.requests, WORKERS_GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    # ------------------------------------------------------------ one iteration

    async def poll_iteration(self) -> None:
        """Apply pending reloads, then take one batch (stale, own backlog or new entries) and run it."""
        await self._apply_reloads()
        try:
            entries = await self._take_entries()
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            await self._ensure_group()  # the stream or group was deleted under us
            return
        if entries:
            await self.run_batch(entries)

    async def _take_entries(self) -> list[Entry]:
        s = self.settings
        room = s.max_batch - len(self._inflight)
        if room <= 0:  # as many requests in flight as allowed: wait for one to be answered
            await asyncio.wait(list(self._inflight.values()), timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            return []
        if self._own_backlog:  # entries this consumer read before a restart and never acked
            got = await self.redis.xreadgroup(WORKERS_GROUP, self.name, {self.keys.requests: "0"},
                                              count=room + len(self._inflight))
            entries = [e for e in _entries(got) if e.entry_id not in self._inflight][:room]
            if entries:
                return await self._with_deliveries(entries)
            self._own_backlog = False
        if time.monotonic() >= self._next_claim_s:
            self._next_claim_s = time.monotonic() + max(min(s.visibility_timeout_s / 4, 5.0), 0.05)
            claimed = await self.redis.xautoclaim(
                self.keys.requests, WORKERS_GROUP, self.name, min_idle_time=int(s.visibility_timeout_s * 1000),
                start_id="0-0", count=s.max_batch,
            )
            entries = [Entry(_str(i), f) for i, f in (claimed[1] if len(claimed) > 1 else []) if f is not None]
            if entries:
                logger.info("worker %s took over %d stale entries", self.name, len(entries))
                return await self._with_deliveries(entries)
        return await self._read_new(room)

    async def _read_new(self, room: int) -> list[Entry]:
        """XREADGROUP: block up to 500 ms for the first entry, then up to max_wait_ms for more (up to `room`)."""
        s = self.settings
        got = await self.redis.xreadgroup(WORKERS_GROUP, self.name, {self.keys.requests: ">"}, count=room,
                                          block=500)
        entries = _entries(got)
        end = time.monotonic() + s.max_wait_ms / 1000
        while entries and len(entries) < room:
            left_ms = int((end - time.monotonic()) * 1000)
            if left_ms < 1:
                break
            more = _entries(await self.redis.xreadgroup(
                WORKERS_GROUP, self.name, {self.keys.requests: ">"}, count=room - len(entries), block=left_ms))
            if not more:
                break
            entries += more
        return entries

    async def _with_deliveries(self, entries: list[Entry]) -> list[Entry]:
        """Fill each entry's delivery count from the group's pending list."""
        for entry in entries:
            info = await self.redis.xpending_range(self.keys.requests, WORKERS_GROUP, min=entry.entry_id,
                                                   max=entry.entry_id, count=1)
            if info:
                entry.deliveries = int(info[0]["times_delivered"])
        return entries

    # ------------------------------------------------------------ one batch

    async def run_batch(self, entries: Sequence[Entry]) -> None:
        """Answer every entry: errors without the model; the rest submitted (each answered when done) or generated."""
        answers: list[tuple[Entry, GenerateRequest, GenerateResponse]] = []
        requests = await self._validate(entries, answers)
        if requests:
            # Acquiring an adapter may load it from disk: off the event loop (not needed without a registry).
            if self.registry is None:
                items, failures = self._prepare(requests)
            else:
                items, failures = await asyncio.to_thread(self._prepare, requests)
                self.metrics.adapters_loaded.set(len(self.registry.loaded_names))
            answers += failures
            if items and hasattr(self.backend, "submit"):
                await self._send(answers)
                self._submit(items)
                return
            if items:
                answers += await self._generate(items)
        await self._send(answers)

    def _submit(self, items) -> None:
        """Hand each item to the running batch; a task per request replies and acks when its rows are done."""
        self.metrics.batch_size.observe(len(items))
        for entry, item, ref in items:
            try:
                future = self.backend.submit(item, self._on_partial)
            except (KeyError, RuntimeError) as e:  # the adapter went away since _prepare, or the backend closed
                future = asyncio.get_running_loop().create_future()
                future.set_exception(e)
            task = asyncio.create_task(self._answer(entry, item, ref, future, utcnow()))
            self._inflight[entry.entry_id] = task
            task.add_done_callback(lambda _, entry_id=entry.entry_id: self._inflight.pop(entry_id, None))

    async def _answer(self, entry: Entry, item, ref, future, started) -> None:
        """Wait for one submitted request, then reply and ack it (a failure becomes an `internal` error)."""
        request = item.request
        t0 = time.perf_counter()
        try:
            result = await (future if isinstance(future, asyncio.Future) else asyncio.wrap_future(future))
        except Exception as e:  # a bug or the device failing: this request learns of it
            logger.error("request %s failed: %s", request.id, type(e).__name__)
            await self._send([(entry, request, GenerateResponse.failure(
                request.id, "internal", f"generation failed ({type(e).__name__})", worker=self.name))])
            return
        generate_s = time.perf_counter() - t0
        self.batches += 1
        m = self.metrics
        m.generate_latency.observe(generate_s)
        m.tokens.inc(result.new_tokens)
        m.tokens_per_s.set(self.backend.stats()["tokens_per_s"] if hasattr(self.backend, "stats") else 0.0)
        queue_ms = max((started - request.enqueued_at).total_seconds() * 1000, 0.0)
        m.queue_wait.observe(queue_ms / 1000)
        await self._send([(entry, request, GenerateResponse(
            id=request.id, candidates=result.candidates, adapter=ref, queue_ms=round(queue_ms, 2),
            generate_ms=round(generate_s * 1000, 2), worker=self.name, prompt_tokens=result.prompt_tokens,
            completion_tokens=result.new_tokens))])

    async def _validate(self, entries: Sequence[Entry], answers: list) -> list[tuple[Entry, GenerateRequest]]:
        """Requests worth generating; the rest are dead-lettered, acked as duplicates or answered `expired`."""
        parsed = []
        for entry in entries:
            try:
                request = GenerateRequest.loads(entry_data(entry.fields))
            except ProtocolError as e:
                await self._dead_letter(entry, str(e))
                continue
            if entry.deliveries > self.settings.max_deliveries:
                await self._dead_letter(entry, f"delivered {entry.deliveries} times (max_deliveries "
                                               f"{self.settings.max_deliveries})", request)
                continue
            parsed.append((entry, request))
        if not parsed:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for _, request in parsed:
                pipe.exists(self.keys.answered(request.id))
            answered = await pipe.execute()
        duplicates = [entry.entry_id for (entry, _), done in zip(parsed, answered, strict=True) if done]
        if duplicates:  # delivered again after being answered: ack, never answer twice
            await self.redis.xack(self.keys.requests, WORKERS_GROUP, *duplicates)
            await self.redis.xdel(self.keys.requests, *duplicates)
            self.metrics.requests.labels("duplicate").inc(len(duplicates))
        fresh = []
        for (entry, request), done in zip(parsed, answered, strict=True):
            if done:
                continue
            if request.expired():
                answers.append((entry, request, GenerateResponse.failure(
                    request.id, "expired", f"deadline {request.deadline.isoformat()} passed before generation",
                    worker=self.name)))
            else:
                fresh.append((entry, request))
        return fresh

    def _prepare(self, requests: list[tuple[Entry, GenerateRequest]]):
        """(batch items with their adapter refs, failure answers): adapters acquired, prompts built."""
        from inference.adapters import BASE_ADAPTER, UnknownPersona
        from inference.batching import BatchItem, PromptError, build_prompt

        items, failures, pinned = [], [], set()
        for entry, request in requests:
            code = None
            try:
                if self.registry is None or request.persona == BASE_PERSONA:
                    adapter, meta, ref = BASE_ADAPTER, None, AdapterRef(persona=request.persona)
                else:
                    loaded = self.registry.acquire(request.persona, frozenset(pinned))
                    pinned.add(loaded.name)
                    adapter, meta = loaded.name, loaded.info.meta
                    ref = AdapterRef(persona=request.persona, version=loaded.info.version)
                prompt, target = build_prompt(request, meta)
                items.append((entry, BatchItem(request, prompt, target, adapter), ref))
            except UnknownPersona as e:
                code, message = "unknown_persona", str(e)
            except (PromptError, ProtocolError, ValueError) as e:
                code, message = "invalid", str(e)
            if code is not None:
                failures.append((entry, request, GenerateResponse.failure(request.id, code, message,
                                                                          worker=self.name)))
        return items, failures

    async def _generate(self, items) -> list[tuple[Entry, GenerateRequest, GenerateResponse]]:
        """One backend generate for the batch, off the event loop; a response per item."""
        started = utcnow()
        t0 = time.perf_counter()
        try:
            batch = [i for _, i, _ in items]
            if getattr(self.backend, "blocking", True):  # a model: off the event loop
                results = await asyncio.to_thread(self.backend.generate, batch, self._on_partial)
            else:
                results = self.backend.generate(batch, self._on_partial_inline)
        except Exception as e:  # a bug or the device failing: every request of the batch learns of it
            logger.exception("batch of %d failed", len(items))
            return [(entry, item.request, GenerateResponse.failure(
                item.request.id, "internal", f"generation failed ({type(e).__name__})", worker=self.name))
                for entry, item, _ in items]
        generate_s = time.perf_counter() - t0
        new_tokens = sum(r.new_tokens for r in results)
        self.batches += 1
        m = self.metrics
        m.batch_size.observe(len(items))
        m.generate_latency.observe(generate_s)
        m.tokens.inc(new_tokens)
        m.tokens_per_s.set(new_tokens / generate_s if generate_s > 0 else 0.0)
        out = []
        for (entry, item, ref), result in zip(items, results, strict=True):
            request = item.request
            queue_ms = max((started - request.enqueued_at).total_seconds() * 1000, 0.0)
            m.queue_wait.observe(queue_ms / 1000)
            out.append((entry, request, GenerateResponse(
                id=request.id, candidates=result.candidates, adapter=ref, queue_ms=round(queue_ms, 2),
                generate_ms=round(generate_s * 1000, 2), worker=self.name, prompt_tokens=result.prompt_tokens,
                completion_tokens=result.new_tokens)))
        logger.info("batch %d: %d requests, %d new tokens, %.0f ms", self.batches, len(items), new_tokens,
                    generate_s * 1000)
        return out

    async def _send(self, answers: list[tuple[Entry, GenerateRequest, GenerateResponse]]) -> None:
        """Final partials of stream requests, then every reply + ack (answered once) in one round trip."""
        if not answers:
            return
        from inference.batching import final_text

        for _, request, _ in answers:
            await self._drain_partials(request.id)
        for _, request, response in answers:
            if request.stream and response.ok:
                await self._publish_partial(request.id, final_text(response.candidates[0]), done=True)
            self._partial_seq.pop(request.id, None)
        fresh = await self._reply_all([(entry.entry_id, request.id, request.reply_to, response)
                                       for entry, request, response in answers])
        for (_, _, response), was_fresh in zip(answers, fresh, strict=True):
            self._count(response, bool(was_fresh))

    async def _dead_letter(self, entry: Entry, reason: str, request: GenerateRequest | None = None) -> None:
        """Move an entry to the dead-letter stream; its client, when it can be told, gets an error response."""
        logger.warning("dead letter entry=%s: %s", entry.entry_id, reason.splitlines()[0][:200])
        await self.redis.xadd(self.keys.dead, dumps_dead_letter(entry.entry_id, entry.fields, reason),
                              maxlen=self.settings.max_stream_len, approximate=True)
        request_id, reply_to = (request.id, request.reply_to) if request else _salvage_ids(entry.fields)
        if request_id is None:
            await self.redis.xack(self.keys.requests, WORKERS_GROUP, entry.entry_id)
            await self.redis.xdel(self.keys.requests, entry.entry_id)
            self.metrics.errors.labels("dead_letter").inc()
            return
        # A payload that failed validation is `invalid` to its client; one delivered too often, `dead_letter`.
        code: ErrorCode = "dead_letter" if request is not None else "invalid"
        response = GenerateResponse.failure(request_id, code, reason, worker=self.name)
        await self._write_reply(entry.entry_id, request_id, reply_to, response)

    async def _write_reply(self, entry_id: str, request_id: str, reply_to: str | None,
                           response: GenerateResponse) -> bool:
        """Reply (unless answered already) and ack, atomically; True when this reply was the one written."""
        fresh = bool((await self._reply_all([(entry_id, request_id, reply_to, response)]))[0])
        self._count(response, fresh)
        return fresh

    async def _reply_all(self, answers: list[tuple[str, str, str | None, GenerateResponse]]) -> list[int]:
        """Run the reply-and-ack script for (entry id, request id, reply_to, response) answers; 1 where fresh."""
        keys, args = [self.keys.requests], [self.name, self.settings.reply_ttl_s, WORKERS_GROUP]
        for entry_id, request_id, reply_to, response in answers:
            keys += [self.keys.answered(request_id), self._reply_key(request_id, reply_to)]
            args += [response.dumps(), entry_id]
        return await self._reply(keys=keys, args=args)

    def _count(self, response: GenerateResponse, fresh: bool) -> None:
        if not fresh:
            self.metrics.requests.labels("duplicate").inc()
            return
        self.answered += 1
        code: ErrorCode | None = response.error.code if response.error else None
        self.metrics.requests.labels(code or "ok").inc()
        if code:
            self.metrics.errors.labels(code).inc()

    def _reply_key(self, request_id: str, reply_to: str | None) -> str:
        # Only keys under our prefix: a request must not make the worker write to arbitrary keys.
        if reply_to and reply_to.startswith(self.keys.prefix + ":"):
            return reply_to
        return self.keys.reply(request_id)

    # ------------------------------------------------------------ partials (called from the generating thread)

    def _on_partial(self, request_id: str, text: str) -> None:
        """Schedule publishing `text` as the request's next Partial on the event loop."""
        if self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._on_partial_inline, request_id, text)

    def _on_partial_inline(self, request_id: str, text: str) -> None:
        """`_on_partial` on the event loop itself: publish in order, remembered until the request is answered."""
        self._partial_futures.setdefault(request_id, []).append(
            asyncio.ensure_future(self._publish_partial(request_id, text)))

    async def _drain_partials(self, request_id: str) -> None:
        for future in self._partial_futures.pop(request_id, []):
            try:
                await (future if isinstance(future, asyncio.Future) else asyncio.wrap_future(future))
            except (RedisConnectionError, RedisTimeoutError, OSError):
                pass

    async def _publish_partial(self, request_id: str, text: str, done: bool = False) -> None:
        seq = self._partial_seq.get(request_id, -1) + 1
        self._partial_seq[request_id] = seq
        payload = Partial(id=request_id, text=text, done=done, seq=seq).dumps()
        key = self.keys.partial(request_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(key, payload, ex=self.settings.reply_ttl_s)
            pipe.publish(key, payload)
            await pipe.execute()

    # ------------------------------------------------------------ background: heartbeat, reloads

    async def _heartbeat_loop(self) -> None:
        """Write this worker's heartbeat and refresh the queue gauges every heartbeat_interval_s."""
        s = self.settings
        while not self.stopping.is_set():
            try:
                stats = self.backend.stats() if hasattr(self.backend, "stats") else {}
                beat = Heartbeat(
                    worker=self.name, pid=os.getpid(), base=str(self.base)[:200],
                    adapters_loaded=self.registry.loaded_names if self.registry else [],
                    batches=self.batches, requests=self.answered, started_at=self.started_at,
                    in_flight=len(self._inflight), **stats,
                )
                await self.redis.set(self.keys.heartbeat(self.name), beat.dumps(), px=int(s.heartbeat_ttl_s * 1000))
                depth, pending = await queue_state(self.redis, self.keys)
                self.metrics.queue_depth.set(depth)
                self.metrics.pending.set(pending)
            except (RedisConnectionError, RedisTimeoutError, OSError, ResponseError) as e:
                logger.debug("heartbeat failed: %s", type(e).__name__)
            await self._pause(s.heartbeat_interval_s)

    async def _reload_listener(self) -> None:
        """Queue a reload for every ReloadMessage on the reload channel (applied between batches)."""
        while not self.stopping.is_set():
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.keys.reload)
                while not self.stopping.is_set():
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is None or message.get("type") != "message":
                        continue
                    try:
                        reload = ReloadMessage.loads(message["data"])
                    except ProtocolError as e:
                        logger.warning("bad reload message ignored: %s", e)
                        continue
                    self._reloads.add(reload.persona)
                    logger.info("reload requested persona=%s", reload.persona or "*")
            except (RedisConnectionError, RedisTimeoutError, OSError) as e:
                logger.warning("reload channel lost (%s): resubscribing", type(e).__name__)
                await self._pause(1.0)
            finally:
                try:
                    await pubsub.aclose()
                except (RedisConnectionError, RedisTimeoutError, OSError):
                    pass

    async def _apply_reloads(self) -> None:
        if self.registry is None:
            self._reloads.clear()
            return
        if self.settings.watch_interval_s and time.monotonic() >= self._next_watch_s:
            self._next_watch_s = time.monotonic() + self.settings.watch_interval_s
            self._reloads.update(await asyncio.to_thread(self.registry.changed_on_disk))
        if not self._reloads:
            return
        todo, self._reloads = (None,) if None in self._reloads else tuple(self._reloads), set()
        for persona in todo:
            changed = await asyncio.to_thread(self.registry.reload, persona)
            for p in changed:
                logger.info("persona=%s now serves %s", p,
                            self.registry.current[p].info.version if p in self.registry.current else "(nothing)")
        self.metrics.adapters_loaded.set(len(self.registry.loaded_names))


@contextlib.contextmanager
def running_in_thread(worker: Worker, *, ready: Callable[[], bool] | None = None, ready_timeout_s: float = 30.0,
                      stop_timeout_s: float = 60.0) -> Iterator[Worker]:
    """Run `worker.main()` on its own event loop in a daemon thread for the block (tests and benchmarks).

    Yields once the loop runs and, if given, `ready()` is true (e.g. the heartbeat exists: warmed up). On exit it
    stops the worker as SIGTERM would (the batch in hand finishes), and raises what killed the loop, or
    RuntimeError when it did not stop within `stop_timeout_s`.
    """
    box: dict = {}
    started = threading.Event()

    def target() -> None:
        async def main() -> None:
            box["loop"] = asyncio.get_running_loop()
            started.set()
            await worker.main()

        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread below
            box["error"] = e
        finally:
            started.set()

    thread = threading.Thread(target=target, daemon=True, name=f"worker-{worker.name}")
    thread.start()
    end = time.monotonic() + ready_timeout_s
    if not started.wait(ready_timeout_s):
        raise RuntimeError(f"the worker's loop did not start within {ready_timeout_s:g} s")
    while ready is not None and "error" not in box and not ready():  # bounded wait for start-up and warm-up
        if time.monotonic() > end:
            raise RuntimeError(f"the worker was not ready within {ready_timeout_s:g} s")
        time.sleep(0.05)  # polling interval of a bounded wait on a condition
    try:
        yield worker
    finally:
        loop = box.get("loop")
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
                loop.call_soon_threadsafe(worker.stopping.set)
        thread.join(stop_timeout_s)
        if thread.is_alive():
            raise RuntimeError(f"the worker did not stop within {stop_timeout_s:g} s")
        if "error" in box:
            raise box["error"]


async def queue_state(redis, keys: Keys) -> tuple[int, int]:
    """(entries no worker has read yet, entries read but not acked) of the requests stream."""
    try:
        groups = await redis.xinfo_groups(keys.requests)
    except ResponseError:  # no stream yet
        return 0, 0
    for g in groups:
        if _str(g.get("name")) == WORKERS_GROUP:
            lag = g.get("lag")
            return int(lag) if lag is not None else 0, int(g.get("pending") or 0)
    return int(await redis.xlen(keys.requests)), 0


async def read_status(redis, keys: Keys) -> dict:
    """Workers alive (by heartbeat), queue depth, pending and dead letters: what `convo serve status` prints."""
    workers = []
    async for key in redis.scan_iter(match=keys.heartbeat_pattern, count=100):
        raw = await redis.get(key)
        if raw is None:
            continue
        try:
            beat = Heartbeat.loads(raw)
        except ProtocolError:
            continue
        info = beat.model_dump(mode="json")
        info["age_s"] = max((utcnow() - beat.ts).total_seconds(), 0.0)
        workers.append(info)
    depth, pending = await queue_state(redis, keys)
    dead = int(await redis.xlen(keys.dead))
    return {"workers": sorted(workers, key=lambda w: w["worker"]), "queue_depth": depth, "pending": pending,
            "dead": dead}


def _entries(got) -> list[Entry]:
    """Entries of an XREADGROUP reply (RESP2 list or RESP3 dict); deleted entries (no fields) are skipped."""
    if not got:
        return []
    streams = got.items() if isinstance(got, dict) else got
    out = []
    for _, messages in streams:
        for entry_id, fields in messages:
            if fields is not None:
                out.append(Entry(_str(entry_id), fields))
    return out


def _str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _salvage_ids(fields: dict) -> tuple[str | None, str | None]:
    """(id, reply_to) from a malformed entry when its JSON still carries a usable id, so its client hears back."""
    try:
        raw = json.loads(entry_data(fields))
    except (ProtocolError, ValueError):
        return None, None
    if not isinstance(raw, dict):
        return None, None
    request_id, reply_to = raw.get("id"), raw.get("reply_to")
    if not isinstance(request_id, str) or not request_id or len(request_id) > MAX_ID_CHARS:
        return None, None
    if not all(c.isalnum() or c in "_.:-" for c in request_id):
        return None, None
    return request_id, reply_to if isinstance(reply_to, str) else None


def build_worker(settings, redis, *, base: str | None = None, adapters_dir: str | None = None,
                 quantize: str | None = None, name: str | None = None) -> Worker:
    """Load the base model once and wrap it with the decode loop (continuous batching, batched LoRA, prefix cache),
    the candidate step of inference.candidates on top (`generate.*` settings), the adapter registry and the queue
    loop."""
    from pathlib import Path

    from inference.adapters import AdapterRegistry, recorded_base
    from inference.batching import CandidateBackend
    from inference.decode import load_backend

    ws = settings.worker
    adapters = Path(adapters_dir or ws.adapters_dir)
    base = base or ws.base or recorded_base(adapters)
    if base is None:
        raise ConfigError(f"no base model: pass --base DIR|ID (no adapter under {adapters} records one)")
    gs = settings.generate
    decoder = load_backend(base, quantize=quantize or ws.quantize, device=ws.device, max_rows=ws.max_rows,
                           partial_interval_ms=ws.partial_interval_ms, prefix_cache_mb=ws.prefix_cache_mb,
                           repetition_penalty=gs.repetition_penalty, no_repeat_ngram_size=gs.no_repeat_ngram_size)
    backend = CandidateBackend(decoder, rerank_k=gs.rerank_k, max_resample_rounds=gs.max_resample_rounds,
                               resample_temperature=gs.resample_temperature, max_in_flight=ws.max_batch)
    registry = AdapterRegistry(decoder.bank, adapters, base, ws.max_loaded_adapters)
    return Worker(redis, Keys(settings.redis.prefix), backend, ws, registry=registry, base=str(base), name=name)
