"""The demo's service half, stage by stage: worker on a thread, a scripted console conversation through the bot
core, the feedback store drained, one retrain through the gate.

Each stage is a plain function over a `Settings` built by `demo_settings` (one Redis prefix per run, every
adapters dir pointing at the demo's), so tests/test_demo.py runs the same code on the tiny base. The worker runs
in this process on its own event loop and thread (as `convo serve worker` would, minus the process): Ctrl-C stays
with the demo, which stops it in its `finally`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from errors import ConvoError

logger = logging.getLogger("convo.demo")


class DemoServiceError(ConvoError):
    """A service stage of the demo did not come up or did not answer in time."""

# What the owner (Sam) types in `convo chat`: friend mode (Jordan answers), then self mode (drafts of Sam's next
# message to Jordan). Every kind of feedback occurs: 👍, 👎, a draft sent as drafted, an edit.
FRIEND_SCRIPT = (
    "hey! what are you up to this weekend?",
    "/good",
    "nice, want to grab food after?",
    "/bad",
    "/quit",
)
SELF_SCRIPT = (
    "i just got back from the lake",
    "/good 1",
    "/bad 2",
    "/send 1",
    "are you free tomorrow?",
    "/me yeah after 6, where do you want to go?",
)
AFTER_RETRAIN_LINE = "so what are you doing tonight?"


def demo_settings(settings, *, out_dir: Path, redis_url: str, prefix: str, base: str, local_redis: bool = False,
                  max_new_tokens: int | None = None, train: dict | None = None, session_gap_min: float | None = None,
                  **feedback):
    """`settings` with the demo's Redis (url, unique prefix), adapters dir, feedback database and worker options;
    `train` overrides the training section (the retrain and its gate use the numbers v1 was trained with)."""
    adapters = str(Path(out_dir) / "adapters")

    def section(section_name: str, /, **values):
        return getattr(settings, section_name).model_copy(update=values)

    return settings.model_copy(update={
        "redis": section("redis", url=redis_url, prefix=prefix,
                         password=settings.redis.password if local_redis else None),
        "train": section("train", **(train or {})),
        "dataset": section("dataset", session_gap_min=session_gap_min or settings.dataset.session_gap_min),
        "generate": section("generate", max_new_tokens=max_new_tokens or settings.generate.max_new_tokens),
        "bot": section("bot", adapters_dir=adapters, typing_s_per_char=0.0,
                       reply_timeout_s=max(settings.bot.reply_timeout_s, 180.0)),  # 3 drafts on a busy CPU
        "worker": section("worker", adapters_dir=adapters, base=base, quantize="none", metrics_port=0,
                          name=f"{prefix}-worker", watch_interval_s=0, heartbeat_interval_s=0.5),
        "feedback": section("feedback", adapters_dir=adapters, db_url=f"sqlite:///{Path(out_dir) / 'feedback.db'}",
                            consumer=f"{prefix}-store", block_ms=200, **feedback),
    })


# ---------------------------------------------------------------- worker


class WorkerThread:
    """An inference worker (inference.worker) on its own event loop in a daemon thread."""

    def __init__(self, settings, base: str | None = None):
        self.settings = settings
        self.base = base
        self.worker = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, ready_timeout_s: float = 120.0) -> None:
        """Load the base and adapters, start the loop, and return once the worker's heartbeat is in Redis."""
        from inference.client import connect
        from inference.worker import build_worker

        s = self.settings
        client = connect(s.redis)
        self.worker = build_worker(s, client, base=self.base, adapters_dir=s.worker.adapters_dir, quantize="none",
                                   name=s.worker.name)

        def target() -> None:
            async def main() -> None:
                self._loop = asyncio.get_running_loop()
                self._started.set()
                try:
                    await self.worker.main()
                finally:
                    await client.aclose()

            try:
                asyncio.run(main())
            except BaseException as e:  # noqa: BLE001 - surfaced by stop() and the ready wait
                self._error = e
                self._started.set()

        self._thread = threading.Thread(target=target, daemon=True, name="demo-worker")
        self._thread.start()
        if not self._started.wait(ready_timeout_s) or self._error is not None:
            raise DemoServiceError(f"the worker did not start: {self._error!r}")
        wait_until(lambda: self._error is not None or self.heartbeat_seen(), ready_timeout_s, "the worker's heartbeat")
        if self._error is not None:
            raise DemoServiceError(f"the worker stopped at start-up: {self._error!r}")

    def heartbeat_seen(self) -> bool:
        """True once the worker has written its heartbeat key."""
        from inference.client import connect
        from inference.protocol import Keys

        s = self.settings
        client = connect(s.redis, sync=True)
        try:
            return bool(client.exists(Keys(s.redis.prefix).heartbeat(self.worker.name)))
        finally:
            client.close()

    def serving(self, persona: str) -> str | None:
        """The version the worker serves for `persona` right now (None before it loaded one)."""
        registry = self.worker.registry if self.worker else None
        current = getattr(registry, "current", {}) if registry is not None else {}
        return current[persona].info.version if persona in current else None

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop reading, finish the batch in hand, close Redis; re-raise what killed the loop, if anything."""
        if self._thread is None:
            return
        if self._loop is not None and self.worker is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
                self._loop.call_soon_threadsafe(self.worker.stopping.set)
        self._thread.join(timeout_s)
        alive = self._thread.is_alive()
        self._thread = None
        if alive:
            logger.warning("the demo worker did not stop within %.0f s", timeout_s)
        if self._error is not None and not isinstance(self._error, (KeyboardInterrupt, asyncio.CancelledError)):
            raise RuntimeError(f"the worker failed: {self._error!r}") from self._error


@contextlib.contextmanager
def running_worker(settings, base: str | None = None) -> Iterator[WorkerThread]:
    """A started WorkerThread, stopped when the block ends (also on error or Ctrl-C)."""
    handle = WorkerThread(settings, base)
    try:
        handle.start()
        yield handle
    finally:
        handle.stop()


def wait_until(predicate, timeout_s: float, what: str) -> None:
    """Return once `predicate()` is true; DemoServiceError after `timeout_s`."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)  # polling interval of a bounded wait on a condition
    raise DemoServiceError(f"timed out after {timeout_s:g} s waiting for {what}")


# ---------------------------------------------------------------- the scripted conversation


@dataclass
class Conversation:
    """What the scripted conversation did: replies shown, feedback events put on the stream, versions that answered."""

    replies: int = 0
    events: dict[str, int] = field(default_factory=dict)
    versions: set[str] = field(default_factory=set)

    @property
    def total_events(self) -> int:
        """Feedback events of every kind."""
        return sum(self.events.values())


async def _run_script(core, persona, mode: str, lines: Sequence[str], console: Console, conv: Conversation) -> None:
    from bot.console import ConsoleChat

    chat = ConsoleChat(core, persona, mode, console)
    who = "sam" if mode == "friend" else escape(persona.name.lower())
    for line in lines:
        speaker = "sam" if line.startswith("/") else who
        console.print(f"[dim]{speaker}>[/] {escape(line)}")
        before = chat.pending
        if not await chat.handle(line):
            break
        if chat.pending is not None and chat.pending is not before:
            conv.replies += 1
            if chat.pending.adapter_version:
                conv.versions.add(chat.pending.adapter_version)


async def _conversation(settings, persona_name: str, scripts: Sequence[tuple[str, Sequence[str]]],
                        console: Console) -> Conversation:
    from bot.core import BotConfig, BotCore, PersonaBook, connect_redis, ping_redis
    from inference.protocol import FeedbackEvent, entry_data

    config = BotConfig.from_settings(settings)
    persona = PersonaBook(config.adapters_dir).get(persona_name)
    client = connect_redis(settings)  # what `convo chat` uses
    conv = Conversation()
    try:
        await ping_redis(client, settings.redis.url)
        core = BotCore(client, config, "console")
        start = await client.xrevrange(core.keys.feedback, count=1)
        last_id = start[0][0] if start else b"0-0"
        for mode, lines in scripts:
            console.rule(f"[bold]{'friend simulation' if mode == 'friend' else 'drafts of your replies'}[/] "
                         f"({mode} mode)", style="dim")
            await _run_script(core, persona, mode, lines, console, conv)
        for _, fields in await client.xrange(core.keys.feedback, min=f"({_s(last_id)}"):
            kind = FeedbackEvent.loads(entry_data(fields)).kind
            conv.events[kind] = conv.events.get(kind, 0) + 1
    finally:
        await client.aclose()
    return conv


def scripted_conversation(settings, persona: str, console: Console,
                          scripts: Sequence[tuple[str, Sequence[str]]] = (("friend", FRIEND_SCRIPT),
                                                                          ("self", SELF_SCRIPT))) -> Conversation:
    """Run `convo chat`'s ConsoleChat over `scripts` (friend simulation, drafts, 👍/👎, an edit) through the worker."""
    return asyncio.run(_conversation(settings, persona, scripts, console))


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------- feedback store and retrain


def store_feedback(settings):
    """Drain the feedback stream into the feedback database; returns (BatchResult totals, FeedbackStore)."""
    from inference.client import connect
    from inference.protocol import Keys
    from training.feedback.consumer import FeedbackConsumer
    from training.feedback.store import FeedbackStore

    fs = settings.feedback
    store = FeedbackStore.from_settings(fs)
    client = connect(settings.redis, sync=True, block_s=fs.block_ms / 1000)
    try:
        consumer = FeedbackConsumer(client, store, Keys(settings.redis.prefix), consumer=fs.consumer,
                                    batch_size=fs.batch_size, block_ms=fs.block_ms)
        totals = consumer.drain()
    finally:
        client.close()
    return totals, store


def retrain_once(settings, persona: str, store, *, data_dir: Path, base: str, console: Console,
                 train_overrides: dict | None = None):
    """One `convo retrain`: SFT from `current` on dataset + feedback, (KTO when labels allow), gate, promote or not."""
    from training.retrain import retrain

    return retrain(settings, persona, store, data_dir=data_dir, base=base, train_overrides=train_overrides,
                   console=console, publish=True)


def cleanup_prefix(settings) -> int:
    """Delete every key under the demo's prefix (a local Redis keeps nothing of the demo); returns the count."""
    import redis

    from inference.client import connect

    client = connect(settings.redis, sync=True)
    try:
        keys = list(client.scan_iter(match=f"{settings.redis.prefix}:*", count=500))
        return client.delete(*keys) if keys else 0
    except (redis.ConnectionError, redis.TimeoutError):
        return 0
    finally:
        client.close()
