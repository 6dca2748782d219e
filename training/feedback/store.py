"""The feedback database: every FeedbackEvent once (keyed by event id), and every retrain run with its reason.

SQLAlchemy Core, one code path for SQLite and PostgreSQL (`feedback.db_url`). SQLite runs in WAL mode so
`convo feedback stats` can read while `convo serve feedback` writes. Idempotence comes from the primary key: a
second insert of the same event id fails with IntegrityError and counts as a duplicate, on either database.
Timestamps are stored as naive UTC (SQLite keeps no offset) and come back aware. Import-light: no torch.

Edited and deleted chat messages (MessageAmendment, from the same stream) change every stored event that holds
them (`amend`) and are kept in the amendments table, so an event stored later (still on the stream when the
amendment came, or built from a context read before the edit) takes them at insert (`add`). On PostgreSQL the two
take an advisory lock (amend exclusive, add shared): an amendment never misses an event inserted concurrently by
another consumer. SQLite has one writer at a time anyway.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError

from errors import ConfigError
from inference.protocol import (
    MAX_ID_CHARS,
    MAX_NAME_CHARS,
    MAX_PLATFORM_CHARS,
    FeedbackEvent,
    HistoryMessage,
    MessageAmendment,
)

LABELLED_KINDS = ("sent", "edited", "liked", "disliked")  # what can become training data
REPLY_KINDS = ("sent", "edited")  # events whose final_text is the owner's reply
_AMEND_LOCK = 0x636F6E766F  # PostgreSQL advisory lock key ("convo") ordering amendments and inserts
# An event holding a message was made after the message and received after that; the margin absorbs a bot clock
# ahead of the store's. Edits come soon after the message, so an amendment reads only the newest rows.
CLOCK_SKEW_MARGIN = timedelta(days=1)


def to_db_ts(ts: datetime) -> datetime:
    """Aware -> naive UTC (what goes into the database)."""
    if ts.tzinfo is not None:
        ts = ts.astimezone(UTC).replace(tzinfo=None)
    return ts


def from_db_ts(ts: datetime | None) -> datetime | None:
    """Naive UTC from the database -> aware UTC."""
    if ts is None:
        return None
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def json_ts(ts: datetime) -> str:
    """A UTC time as it appears in an event's JSON (a HistoryMessage's `ts`): what finds candidate rows."""
    return HistoryMessage(speaker="-", text="", ts=ts.astimezone(UTC)).model_dump(mode="json")["ts"]


def apply_amendment(event: FeedbackEvent, amendment: MessageAmendment) -> FeedbackEvent | None:
    """`event` as it reads once `amendment` holds: the message changed or gone from its context and, when the
    message was the reply of the event's draft, its final text replaced (kind `sent` when the reply is the candidate
    as drafted, else `edited`). None when the event's reply is gone altogether (the label no longer holds); the
    same object when nothing in it changed."""
    if event.platform != amendment.platform:
        return event
    update: dict = {}
    if any(amendment.finds(m) for m in event.context):
        update["context"] = [
            (m.model_copy(update={"text": amendment.text}) if amendment.text is not None else None)
            if amendment.finds(m) else m
            for m in event.context
        ]
        update["context"] = [m for m in update["context"] if m is not None]
    if amendment.reply_of == event.draft_id and event.kind in REPLY_KINDS:
        if not amendment.reply_text:
            return None
        update["final_text"] = amendment.reply_text
        update["kind"] = "sent" if event.candidate and amendment.reply_text == "\n".join(event.candidate) else "edited"
    # model_validate, not model_copy: the amended event is checked like any other (an edited one has its text)
    return FeedbackEvent.model_validate({**event.model_dump(), **update}) if update else event


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One row of the events table: the event and when the store received it."""

    event: FeedbackEvent
    received_at: datetime
    stream_id: str | None


@dataclass(frozen=True, slots=True)
class RetrainRun:
    """One `convo retrain` attempt: what it decided and why."""

    persona: str
    status: str  # promoted | rejected | failed | skipped
    reason: str
    started_at: datetime
    finished_at: datetime
    parent_version: str | None = None
    candidate_version: str | None = None
    data_until: datetime | None = None  # received_at of the newest event it saw
    metrics: dict[str, Any] | None = None
    id: int | None = None


def _tables(prefix: str) -> tuple[sa.MetaData, sa.Table, sa.Table, sa.Table]:
    md = sa.MetaData()
    # The column bounds are FeedbackEvent's field bounds: whatever the protocol accepts fits (tested).
    events = sa.Table(
        f"{prefix}feedback_events", md,
        sa.Column("event_id", sa.String(MAX_ID_CHARS), primary_key=True),
        sa.Column("persona", sa.String(MAX_NAME_CHARS), nullable=False, index=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("draft_id", sa.String(MAX_ID_CHARS), nullable=False, index=True),
        sa.Column("mode", sa.String(8), nullable=False),
        sa.Column("adapter_version", sa.String(MAX_NAME_CHARS)),
        sa.Column("platform", sa.String(MAX_PLATFORM_CHARS), nullable=False),
        sa.Column("ts", sa.DateTime(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False, index=True),
        sa.Column("stream_id", sa.String(64)),
        sa.Column("payload", sa.Text(), nullable=False),  # the event's JSON, as it came off the stream
    )
    amendments = sa.Table(
        f"{prefix}feedback_amendments", md,
        sa.Column("amendment_id", sa.String(MAX_ID_CHARS), primary_key=True),
        sa.Column("platform", sa.String(MAX_PLATFORM_CHARS), nullable=False),
        sa.Column("persona", sa.String(MAX_NAME_CHARS), nullable=False, index=True),
        sa.Column("msg_ts", sa.DateTime(), nullable=False, index=True),
        sa.Column("reply_of", sa.String(MAX_ID_CHARS), index=True),
        sa.Column("received_at", sa.DateTime(), nullable=False, index=True),
        sa.Column("payload", sa.Text(), nullable=False),  # the amendment's JSON
    )
    runs = sa.Table(
        f"{prefix}retrain_runs", md,
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("persona", sa.String(64), nullable=False, index=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=False),
        sa.Column("parent_version", sa.String(64)),
        sa.Column("candidate_version", sa.String(64)),
        sa.Column("data_until", sa.DateTime()),
        sa.Column("metrics", sa.Text()),
    )
    return md, events, amendments, runs


def make_engine(db_url: str) -> sa.Engine:
    """An Engine for `db_url`; SQLite gets its folder created, WAL mode and a busy timeout."""
    try:
        url = sa.make_url(db_url)
    except sa.exc.ArgumentError as e:
        raise ConfigError(f"feedback.db_url {db_url!r}: not a database URL (e.g. sqlite:///data/feedback.db)") from e
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            cur.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; WAL keeps it consistent
            cur.close()

        return engine
    try:
        return sa.create_engine(url, pool_pre_ping=True)
    except (ImportError, sa.exc.NoSuchModuleError) as e:
        raise ConfigError(f"feedback.db_url: no driver for {url.drivername} ({e}); use postgresql+psycopg://...") from e


class FeedbackStore:
    """The events, amendments and retrain-runs tables of one database."""

    def __init__(self, db_url: str, table_prefix: str = "convo_"):
        self.db_url = db_url
        self.engine = make_engine(db_url)
        self.metadata, self.events, self.amendments, self.runs = _tables(table_prefix)

    @classmethod
    def from_settings(cls, feedback_settings) -> FeedbackStore:
        """The store `feedback.db_url` names, tables created if missing."""
        store = cls(feedback_settings.db_url, feedback_settings.table_prefix)
        store.create()
        return store

    def create(self) -> None:
        """Create the tables if they do not exist; ConfigError when the database does not answer."""
        try:
            self.metadata.create_all(self.engine)
        except OperationalError as e:
            raise ConfigError(f"feedback database {self.safe_url}: {str(e.orig).strip().splitlines()[0]}") from e

    def drop(self) -> None:
        """Drop this store's tables (tests)."""
        self.metadata.drop_all(self.engine)

    def close(self) -> None:
        """Close pooled connections."""
        self.engine.dispose()

    @property
    def safe_url(self) -> str:
        """The URL with any password hidden (for messages and logs)."""
        return self.engine.url.render_as_string(hide_password=True)

    # ------------------------------------------------------------ events

    def add(self, event: FeedbackEvent, stream_id: str | None = None, received_at: datetime | None = None) -> bool:
        """Insert one event, as the stored amendments of its messages have changed it; False when its event id is
        already stored (a redelivery). An event whose reply was deleted altogether is not stored (True: handled).

        Raises what the database raises otherwise: an IntegrityError that is not the duplicate key, a DataError, a
        lost connection (the consumer tells entry faults from database faults, consumer.entry_fault)."""
        try:
            with self.engine.begin() as conn:
                self._lock(conn, exclusive=False)
                for amendment in self._amendments_for(conn, event):
                    event = apply_amendment(event, amendment)
                    if event is None:
                        return True
                row = {
                    "event_id": event.event_id, "persona": event.persona, "kind": event.kind,
                    "draft_id": event.draft_id, "mode": event.mode, "adapter_version": event.adapter_version,
                    "platform": event.platform, "ts": to_db_ts(event.ts),
                    "received_at": to_db_ts(received_at or datetime.now(UTC)), "stream_id": stream_id,
                    "payload": event.dumps(),
                }
                conn.execute(self.events.insert().values(**row))
        except IntegrityError:
            if self.has_event(event.event_id):
                return False
            raise
        return True

    def _lock(self, conn: sa.Connection, exclusive: bool) -> None:
        """Order amendments against inserts until the transaction ends (PostgreSQL; SQLite serialises writers)."""
        if conn.dialect.name == "postgresql":
            fn = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
            conn.execute(sa.text(f"SELECT {fn}(:key)"), {"key": _AMEND_LOCK})

    def _amendments_for(self, conn: sa.Connection, event: FeedbackEvent) -> list[MessageAmendment]:
        """Stored amendments that touch `event` (its context messages or its draft's reply), oldest first."""
        t = self.amendments
        stamps = {to_db_ts(m.ts) for m in event.context if m.ts is not None}
        touches = [t.c.msg_ts.in_(sorted(stamps))] if stamps else []
        if event.kind in REPLY_KINDS:
            touches.append(t.c.reply_of == event.draft_id)
        if not touches:
            return []
        q = (sa.select(t.c.payload).where(t.c.platform == event.platform, sa.or_(*touches))
             .order_by(t.c.received_at, t.c.amendment_id))
        return [MessageAmendment.loads(r.payload) for r in conn.execute(q)]

    def amend(self, amendment: MessageAmendment, received_at: datetime | None = None) -> int:
        """Apply an edit or deletion to every stored event holding the message (or, for a reply, the draft's
        `sent`/`edited` events) and keep it for events stored later; returns how many rows changed or went. A
        redelivered amendment is applied again (harmless: it sets, never appends) and kept once."""
        t = self.events
        changed = 0
        with self.engine.begin() as conn:
            self._lock(conn, exclusive=True)
            exists = sa.select(sa.func.count()).select_from(self.amendments).where(
                self.amendments.c.amendment_id == amendment.amendment_id)
            if not conn.execute(exists).scalar_one():
                conn.execute(self.amendments.insert().values(
                    amendment_id=amendment.amendment_id, platform=amendment.platform, persona=amendment.persona,
                    msg_ts=to_db_ts(amendment.ts), reply_of=amendment.reply_of,
                    received_at=to_db_ts(received_at or datetime.now(UTC)), payload=amendment.dumps()))
            # Rows whose JSON holds the message's timestamp, or the reply's draft; matched exactly below.
            holds = [t.c.payload.contains(json_ts(amendment.ts), autoescape=True)]
            if amendment.reply_of is not None:
                holds.append(sa.and_(t.c.draft_id == amendment.reply_of, t.c.kind.in_(REPLY_KINDS)))
            q = sa.select(t.c.event_id, t.c.payload).where(
                t.c.platform == amendment.platform, sa.or_(*holds),
                t.c.received_at >= to_db_ts(amendment.ts - CLOCK_SKEW_MARGIN))
            for row in conn.execute(q).all():
                event = FeedbackEvent.loads(row.payload)
                new = apply_amendment(event, amendment)
                if new is event:
                    continue
                if new is None:
                    conn.execute(t.delete().where(t.c.event_id == row.event_id))
                else:
                    conn.execute(t.update().where(t.c.event_id == row.event_id)
                                 .values(payload=new.dumps(), kind=new.kind))
                changed += 1
        return changed

    def count_amendments(self) -> int:
        """How many amendments are kept."""
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(self.amendments)).scalar_one())

    def has_event(self, event_id: str) -> bool:
        """True when an event with this id is stored."""
        q = sa.select(sa.func.count()).select_from(self.events).where(self.events.c.event_id == event_id)
        with self.engine.connect() as conn:
            return bool(conn.execute(q).scalar_one())

    def add_many(self, items: Iterable[tuple[FeedbackEvent, str | None]]) -> tuple[int, int]:
        """Insert (event, stream id) pairs; returns (new, duplicates)."""
        new = dup = 0
        for event, stream_id in items:
            if self.add(event, stream_id):
                new += 1
            else:
                dup += 1
        return new, dup

    def iter_events(
        self, persona: str | None = None, kinds: Sequence[str] | None = None, since: datetime | None = None
    ) -> list[StoredEvent]:
        """Stored events, oldest first (by event time), filtered by persona, kind and received_at > since."""
        t = self.events
        q = sa.select(t.c.payload, t.c.received_at, t.c.stream_id).order_by(t.c.ts, t.c.event_id)
        if persona is not None:
            q = q.where(t.c.persona == persona)
        if kinds:
            q = q.where(t.c.kind.in_(list(kinds)))
        if since is not None:
            q = q.where(t.c.received_at > to_db_ts(since))
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        return [StoredEvent(FeedbackEvent.loads(r.payload), from_db_ts(r.received_at), r.stream_id) for r in rows]

    def count_events(self, persona: str | None = None) -> int:
        """How many events are stored (for one persona or all)."""
        q = sa.select(sa.func.count()).select_from(self.events)
        if persona is not None:
            q = q.where(self.events.c.persona == persona)
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar_one())

    def counts(self, persona: str | None = None) -> dict[str, dict[str, int]]:
        """persona -> kind -> number of events."""
        t = self.events
        q = sa.select(t.c.persona, t.c.kind, sa.func.count()).group_by(t.c.persona, t.c.kind)
        if persona is not None:
            q = q.where(t.c.persona == persona)
        out: dict[str, dict[str, int]] = {}
        with self.engine.connect() as conn:
            for p, kind, n in conn.execute(q):
                out.setdefault(p, {})[kind] = int(n)
        return out

    def labelled_since(self, persona: str, since: datetime | None) -> int:
        """Labelled events (sent/edited/liked/disliked) of `persona` received after `since` (all when None)."""
        t = self.events
        q = sa.select(sa.func.count()).select_from(t).where(t.c.persona == persona, t.c.kind.in_(LABELLED_KINDS))
        if since is not None:
            q = q.where(t.c.received_at > to_db_ts(since))
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar_one())

    def latest_received(self, persona: str) -> datetime | None:
        """received_at of the persona's newest event."""
        t = self.events
        q = sa.select(sa.func.max(t.c.received_at)).where(t.c.persona == persona)
        with self.engine.connect() as conn:
            return from_db_ts(conn.execute(q).scalar_one())

    def draft_ids(self, persona: str) -> list[str]:
        """Every draft id the persona's events mention."""
        t = self.events
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(sa.select(t.c.draft_id).where(t.c.persona == persona).distinct())]

    def personas(self) -> list[str]:
        """Personas with stored events."""
        with self.engine.connect() as conn:
            return sorted(r[0] for r in conn.execute(sa.select(self.events.c.persona).distinct()))

    def prune_events(self, received_before: datetime, dry_run: bool = False) -> int:
        """Delete the events received before `received_before` (count them only, with dry_run); returns how many.
        Amendments received before it go too (not counted): an event still on the stream that long is rare, and
        the amendment's own text should not outlive the retention either."""
        t = self.events
        cond = t.c.received_at < to_db_ts(received_before)
        if dry_run:
            with self.engine.connect() as conn:
                return int(conn.execute(sa.select(sa.func.count()).select_from(t).where(cond)).scalar_one())
        with self.engine.begin() as conn:
            a = self.amendments
            conn.execute(a.delete().where(a.c.received_at < to_db_ts(received_before)))
            return int(conn.execute(t.delete().where(cond)).rowcount or 0)

    # ------------------------------------------------------------ retrain runs

    def record_run(self, run: RetrainRun) -> int:
        """Store a retrain run; returns its id."""
        row = {
            "persona": run.persona, "status": run.status, "reason": run.reason,
            "started_at": to_db_ts(run.started_at), "finished_at": to_db_ts(run.finished_at),
            "parent_version": run.parent_version, "candidate_version": run.candidate_version,
            "data_until": to_db_ts(run.data_until) if run.data_until else None,
            "metrics": json.dumps(run.metrics) if run.metrics is not None else None,
        }
        with self.engine.begin() as conn:
            result = conn.execute(self.runs.insert().values(**row))
            return int(result.inserted_primary_key[0])

    def list_runs(self, persona: str | None = None) -> list[RetrainRun]:
        """Retrain runs, oldest first."""
        t = self.runs
        q = sa.select(t).order_by(t.c.started_at, t.c.id)
        if persona is not None:
            q = q.where(t.c.persona == persona)
        with self.engine.connect() as conn:
            rows = conn.execute(q).mappings().all()
        return [
            RetrainRun(
                persona=r["persona"], status=r["status"], reason=r["reason"], started_at=from_db_ts(r["started_at"]),
                finished_at=from_db_ts(r["finished_at"]), parent_version=r["parent_version"],
                candidate_version=r["candidate_version"], data_until=from_db_ts(r["data_until"]),
                metrics=json.loads(r["metrics"]) if r["metrics"] else None, id=r["id"],
            )
            for r in rows
        ]

    # ------------------------------------------------------------ forget

    def delete_persona(self, persona: str) -> dict[str, int]:
        """Delete every event and retrain run of `persona`; returns the row counts deleted."""
        with self.engine.begin() as conn:
            events = conn.execute(self.events.delete().where(self.events.c.persona == persona)).rowcount
            conn.execute(self.amendments.delete().where(self.amendments.c.persona == persona))
            runs = conn.execute(self.runs.delete().where(self.runs.c.persona == persona)).rowcount
        return {"events": int(events or 0), "runs": int(runs or 0)}
