"""`convo serve feedback`: move FeedbackEvents from the Redis stream into the database, losing and doubling none.

    {prefix}:feedback ──XREADGROUP (group FEEDBACK_GROUP)──▶ store.add (event id is the primary key) ──▶ XACK

* Write first, ack second. A crash between the two leaves the entry pending; on restart the consumer (same name,
  default the host name) reads its own pending entries first (id "0"), the insert finds the event id already
  stored and counts a duplicate, and the entry is acked: no loss, no duplicate row.
* Entries another consumer left pending longer than `claim_idle_s` are taken over with XAUTOCLAIM.
* A malformed entry goes to `{prefix}:feedback:dead` with the reason and is acked; the loop keeps running.
* Redis or the database down: the batch stays unacked, the loop waits (exponential backoff up to
  `backoff_max_s`), reconnects and re-reads its pending entries.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

import redis
from sqlalchemy.exc import SQLAlchemyError

from convo.errors import ProtocolError
from inference.protocol import FEEDBACK_GROUP, FeedbackEvent, Keys, dumps_dead_letter, entry_data
from training.feedback.store import FeedbackStore

logger = logging.getLogger("convo.feedback")


@dataclass
class BatchResult:
    """What one batch did."""

    read: int = 0
    stored: int = 0
    duplicates: int = 0
    dead: int = 0


def _metrics():
    """Prometheus counters (created once per process)."""
    global _METRICS
    if _METRICS is None:
        from prometheus_client import Counter

        _METRICS = {
            "stored": Counter("convo_feedback_events_stored_total", "Feedback events written to the database"),
            "duplicates": Counter("convo_feedback_duplicates_total", "Redelivered feedback events already stored"),
            "dead": Counter("convo_feedback_dead_letters_total", "Malformed feedback entries kept aside"),
            "errors": Counter("convo_feedback_errors_total", "Redis or database errors (retried)"),
        }
    return _METRICS


_METRICS = None


class FeedbackConsumer:
    """Reads the feedback stream as one consumer of FEEDBACK_GROUP and writes each event to the store."""

    def __init__(
        self,
        client: redis.Redis,
        store: FeedbackStore,
        keys: Keys,
        *,
        consumer: str | None = None,
        batch_size: int = 64,
        block_ms: int = 2000,
        claim_idle_s: float = 60.0,
        backoff_max_s: float = 30.0,
    ):
        self.redis = client
        self.store = store
        self.keys = keys
        self.consumer = consumer or socket.gethostname()
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.backoff_max_s = backoff_max_s
        self._pending_done = False  # own pending entries (left by a crash) are read before new ones
        self._group_ready = False
        self.totals = BatchResult()

    def ensure_group(self) -> None:
        """Create the consumer group (and the stream) if missing; from the start, so no event is skipped."""
        try:
            self.redis.xgroup_create(self.keys.feedback, FEEDBACK_GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

    def _read(self) -> list[tuple[str, dict]]:
        """The next entries to handle: own pending first, then stale ones of others, then new ones."""
        if not self._pending_done:
            got = self.redis.xreadgroup(FEEDBACK_GROUP, self.consumer, {self.keys.feedback: "0"}, count=self.batch_size)
            entries = got[0][1] if got else []
            if entries:
                return entries
            self._pending_done = True
        claimed = self.redis.xautoclaim(
            self.keys.feedback, FEEDBACK_GROUP, self.consumer, self.claim_idle_ms, "0-0", count=self.batch_size
        )
        if claimed and claimed[1]:
            return claimed[1]
        got = self.redis.xreadgroup(
            FEEDBACK_GROUP, self.consumer, {self.keys.feedback: ">"}, count=self.batch_size, block=self.block_ms
        )
        return got[0][1] if got else []

    def handle(self, entries: list[tuple[str, dict]]) -> BatchResult:
        """Store every well-formed event, set the malformed aside, then ack the whole batch."""
        result = BatchResult(read=len(entries))
        good, dead = [], []
        for entry_id, fields in entries:
            entry_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            if fields is None:  # deleted from the stream while pending
                dead.append((entry_id, {}, "entry deleted from the stream while pending"))
                continue
            try:
                good.append((FeedbackEvent.loads(entry_data(fields)), entry_id))
            except ProtocolError as e:
                dead.append((entry_id, fields, str(e)))
        result.stored, result.duplicates = self.store.add_many(good)
        for entry_id, fields, reason in dead:
            self.redis.xadd(self.keys.feedback_dead, dumps_dead_letter(entry_id, fields, reason), maxlen=100_000)
            logger.warning("feedback entry %s dead-lettered: %s", entry_id, reason[:200])
        result.dead = len(dead)
        self._ack([eid for _, eid in good] + [eid for eid, _, _ in dead])
        m = _metrics()
        m["stored"].inc(result.stored)
        m["duplicates"].inc(result.duplicates)
        m["dead"].inc(result.dead)
        for k in ("read", "stored", "duplicates", "dead"):
            setattr(self.totals, k, getattr(self.totals, k) + getattr(result, k))
        if result.read:
            logger.info("feedback batch read=%d stored=%d duplicates=%d dead=%d",
                        result.read, result.stored, result.duplicates, result.dead)
        return result

    def _ack(self, entry_ids: list[str]) -> None:
        """Ack stored entries and delete them from the stream: the database holds them now, and chat text should
        not stay in Redis as a second copy."""
        if entry_ids:
            self.redis.xack(self.keys.feedback, FEEDBACK_GROUP, *entry_ids)
            self.redis.xdel(self.keys.feedback, *entry_ids)

    def poll_once(self) -> BatchResult:
        """Read one batch (waiting up to block_ms for new entries) and handle it."""
        if not self._group_ready:
            self.ensure_group()
        entries = self._read()
        return self.handle(entries) if entries else BatchResult()

    def drain(self) -> BatchResult:
        """Handle entries until none is left (pending included); what tests and one-shot runs call."""
        total = BatchResult()
        while True:
            r = self.poll_once()
            if not r.read:
                return total
            for k in ("read", "stored", "duplicates", "dead"):
                setattr(total, k, getattr(total, k) + getattr(r, k))

    def run(self, stop: threading.Event, on_retry: Callable[[int, Exception], None] | None = None) -> None:
        """Consume until `stop` is set; Redis or database errors are retried with exponential backoff."""
        logger.info("feedback store consuming %s as %s/%s", self.keys.feedback, FEEDBACK_GROUP, self.consumer)
        failures = 0
        while not stop.is_set():
            try:
                self.poll_once()
                failures = 0
            except (redis.ConnectionError, redis.TimeoutError, SQLAlchemyError) as e:
                failures += 1
                self._pending_done = False  # the batch in hand was not acked: read it again once back
                self._group_ready = False  # Redis may have restarted empty
                delay = min(self.backoff_max_s, 0.5 * 2 ** min(failures - 1, 10))
                _metrics()["errors"].inc()
                logger.warning("feedback store: %s (%s); retry %d in %.1fs", type(e).__name__,
                               str(e).splitlines()[0][:200] if str(e) else "", failures, delay)
                if on_retry is not None:
                    on_retry(failures, e)
                stop.wait(delay)
        logger.info("feedback store stopped: %s", self.totals)

