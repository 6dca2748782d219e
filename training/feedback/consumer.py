"""`convo serve feedback`: move FeedbackEvents from the Redis stream into the database, losing and doubling none.

    {prefix}:feedback ──XREADGROUP (group FEEDBACK_GROUP)──▶ store.add (event id is the primary key) ──▶ XACK

* Write first, ack second. A crash between the two leaves the entry pending; on restart the consumer (same name,
  default the host name) reads its own pending entries first (id "0"), the insert finds the event id already
  stored and counts a duplicate, and the entry is acked: no loss, no duplicate row.
* Entries another consumer left pending longer than `claim_idle_s` are taken over with XAUTOCLAIM.
* An entry marked as a MessageAmendment (a chat message edited or deleted) is applied to the stored events that
  hold the message and kept for those stored later (store.amend); it is acked like an event.
* Each entry is handled on its own. One the protocol rejects (a missing field, a timestamp with no UTC value,
  an id with a NUL byte) or the database refuses (DataError, a constraint other than the duplicate key, a value
  the driver cannot encode) goes to `{prefix}:feedback:dead` with the reason and is acked; the rest of the batch
  is stored. Retrying such an entry could never succeed, and leaving it pending would block the stream for good.
* Faults of Redis or of the database itself (a lost connection, a locked SQLite file, a missing table) are no
  fault of the entry: the batch stays unacked, the loop waits (exponential backoff up to `backoff_max_s`),
  reconnects and re-reads its pending entries. Entries stored before the fault count as duplicates then.
* The loop never exits on its own: anything else that goes wrong is logged with its traceback and retried the
  same way; only `stop` ends it.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import redis
from sqlalchemy import exc as sa_exc

from errors import ProtocolError
from inference.protocol import (
    FEEDBACK_GROUP,
    FeedbackEvent,
    Keys,
    MessageAmendment,
    dumps_dead_letter,
    entry_data,
    is_amendment,
)
from training.feedback.store import FeedbackStore

logger = logging.getLogger("convo.feedback")


@dataclass
class BatchResult:
    """What one batch did."""

    read: int = 0
    stored: int = 0
    duplicates: int = 0
    dead: int = 0
    amendments: int = 0


def _metrics():
    """Prometheus counters (created once per process)."""
    global _METRICS
    if _METRICS is None:
        from prometheus_client import Counter

        _METRICS = {
            "stored": Counter("convo_feedback_events_stored_total", "Feedback events written to the database"),
            "duplicates": Counter("convo_feedback_duplicates_total", "Redelivered feedback events already stored"),
            "dead": Counter("convo_feedback_dead_letters_total", "Malformed feedback entries kept aside"),
            "amendments": Counter("convo_feedback_amendments_total", "Edited or deleted chat messages applied"),
            "errors": Counter("convo_feedback_errors_total", "Redis or database errors (retried)"),
        }
    return _METRICS


_METRICS = None


def entry_fault(e: BaseException) -> bool:
    """True when storing an entry failed because of the entry (dead-letter it), False for a fault of Redis or the
    database (retry the batch later)."""
    if isinstance(e, redis.RedisError) or getattr(e, "connection_invalidated", False):
        return False
    if isinstance(e, (sa_exc.DataError, sa_exc.IntegrityError)):
        return True
    if isinstance(e, sa_exc.DBAPIError):  # OperationalError, InterfaceError, ProgrammingError...: the database's
        return False
    if isinstance(e, sa_exc.StatementError):  # a parameter the driver could not convert
        return True
    # A value Python cannot convert (a date out of range, a string that cannot be encoded) is the entry's; any other
    # exception (pool timeouts, disconnects, a bug) is not: retried with its traceback, never a reason to drain the
    # stream into dead letters.
    return isinstance(e, (ValueError, TypeError, OverflowError)) and not isinstance(e, sa_exc.SQLAlchemyError)


def from_entry(entry_id: str, raw: str) -> FeedbackEvent:
    """The event of a stream entry. An entry without `event_id` or `ts` (bots always send both) gets them from the
    entry itself ("entry-<id>", the entry's time) rather than from defaults, so a redelivery is the same event:
    stored once, not twice."""
    event = FeedbackEvent.loads(raw)
    update = {}
    if "event_id" not in event.model_fields_set:
        update["event_id"] = f"entry-{entry_id}"
    if "ts" not in event.model_fields_set:
        update["ts"] = datetime.fromtimestamp(int(entry_id.split("-")[0]) / 1000, UTC)
    return event.model_copy(update=update) if update else event


def _refusal(e: BaseException) -> str:
    """What a database refusal says, without the statement or its parameters (they hold chat text)."""
    lines = str(getattr(e, "orig", None) or e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


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
        """Store each well-formed event, set aside each entry that cannot be stored, then ack the whole batch.

        A fault of Redis or the database raises (nothing of the batch is acked; it is read again)."""
        result = BatchResult(read=len(entries))
        done, dead = [], []
        for entry_id, fields in entries:
            entry_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            if fields is None:  # deleted from the stream while pending
                dead.append((entry_id, {}, "entry deleted from the stream while pending"))
                continue
            amendment = is_amendment(fields)
            try:
                item = (MessageAmendment.loads(entry_data(fields)) if amendment
                        else from_entry(entry_id, entry_data(fields)))
            except ProtocolError as e:
                dead.append((entry_id, fields, str(e)))
                continue
            try:
                stored = self.store.amend(item) if amendment else self.store.add(item, entry_id)
            except Exception as e:
                if not entry_fault(e):
                    raise
                dead.append((entry_id, fields, f"the database refused it: {_refusal(e)}"))
                continue
            if amendment:
                result.amendments += 1
            else:
                result.stored += stored
                result.duplicates += not stored
            done.append(entry_id)
        for entry_id, fields, reason in dead:
            self.redis.xadd(self.keys.feedback_dead, dumps_dead_letter(entry_id, fields, reason), maxlen=100_000)
            logger.warning("feedback entry %s dead-lettered: %s", entry_id, reason.split(":")[0][:80])
        result.dead = len(dead)
        self._ack(done + [eid for eid, _, _ in dead])
        m = _metrics()
        m["stored"].inc(result.stored)
        m["duplicates"].inc(result.duplicates)
        m["dead"].inc(result.dead)
        m["amendments"].inc(result.amendments)
        for k in ("read", "stored", "duplicates", "dead", "amendments"):
            setattr(self.totals, k, getattr(self.totals, k) + getattr(result, k))
        if result.read:
            logger.info("feedback batch read=%d stored=%d duplicates=%d dead=%d amendments=%d",
                        result.read, result.stored, result.duplicates, result.dead, result.amendments)
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
            for k in ("read", "stored", "duplicates", "dead", "amendments"):
                setattr(total, k, getattr(total, k) + getattr(r, k))

    def run(self, stop: threading.Event, on_retry: Callable[[int, Exception], None] | None = None) -> None:
        """Consume until `stop` is set; any fault outside an entry is retried with exponential backoff."""
        logger.info("feedback store consuming %s as %s/%s", self.keys.feedback, FEEDBACK_GROUP, self.consumer)
        failures = 0
        while not stop.is_set():
            try:
                self.poll_once()
                failures = 0
            except Exception as e:  # noqa: BLE001 - entry faults were dead-lettered in handle(); never exit
                failures += 1
                self._pending_done = False  # the batch in hand was not acked: read it again once back
                self._group_ready = False  # Redis may have restarted empty (NOGROUP)
                delay = min(self.backoff_max_s, 0.5 * 2 ** min(failures - 1, 10))
                _metrics()["errors"].inc()
                expected = isinstance(e, (redis.RedisError, sa_exc.SQLAlchemyError))
                logger.warning("feedback store: %s (%s); retry %d in %.1fs", type(e).__name__,
                               _refusal(e) if expected else "unexpected", failures, delay, exc_info=not expected)
                if on_retry is not None:
                    on_retry(failures, e)
                stop.wait(delay)
        logger.info("feedback store stopped: %s", self.totals)
