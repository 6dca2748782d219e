"""`convo serve scheduler`: retrain a persona once enough new labelled feedback has come in, never too often.

Every `scheduler_poll_s` it looks at each persona with a `current` version: when the labelled events (sent, edited,
liked, disliked) received since the newest event its last promoted version was trained on reach
`retrain_min_events`, and its last attempt is at least `retrain_interval_h` old, it runs `retrain`. Runs go one at a
time (this loop is sequential, and `retrain` holds a lock on the adapters dir against a manual `convo retrain`). A
failed run leaves `current` as it was, is logged with its traceback, recorded as `failed` and counted in the
`convo_retrain_failures_total` metric.

Every `prune_interval_h` (and once at start) it also applies the retention settings (training/feedback/retention.py,
what `convo prune --apply` does) and counts what went in `convo_pruned_total`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from inference.versions import current_version, discover
from training.feedback.store import FeedbackStore

logger = logging.getLogger("convo.scheduler")
_METRICS = None


def _metrics():
    global _METRICS
    if _METRICS is None:
        from prometheus_client import Counter, Gauge

        _METRICS = {
            "runs": Counter("convo_retrain_runs_total", "Scheduled retrains by outcome", ["persona", "status"]),
            "failures": Counter("convo_retrain_failures_total", "Scheduled retrains that failed", ["persona"]),
            "pending": Gauge("convo_retrain_pending_events", "Labelled events since the last version", ["persona"]),
            "pruned": Counter("convo_pruned_total", "Items removed by retention", ["kind"]),
        }
    return _METRICS


class Scheduler:
    """Decides when a persona is due and runs its retrain, one at a time."""

    def __init__(self, settings, store: FeedbackStore, retrain_fn: Callable | None = None,
                 clock: Callable[[], datetime] | None = None):
        self.settings = settings
        self.store = store
        if retrain_fn is None:
            from training.retrain import retrain as retrain_fn
        self.retrain_fn = retrain_fn
        self.clock = clock or (lambda: datetime.now(UTC))
        self._last_attempt: dict[str, datetime] = {}
        self._last_prune: datetime | None = None

    def due(self, persona: str) -> tuple[bool, str]:
        """(due, why) for one persona."""
        fs = self.settings.feedback
        runs = self.store.list_runs(persona)
        attempts = [r.started_at for r in runs] + ([self._last_attempt[persona]] if persona in self._last_attempt else [])
        now = self.clock()
        if attempts and now - max(attempts) < timedelta(hours=fs.retrain_interval_h):
            return False, f"last attempt {max(attempts):%Y-%m-%d %H:%M} is within {fs.retrain_interval_h:g} h"
        promoted = [r for r in runs if r.status == "promoted"]
        since = promoted[-1].data_until if promoted else None
        new = self.store.labelled_since(persona, since)
        _metrics()["pending"].labels(persona).set(new)
        if new < fs.retrain_min_events:
            return False, f"{new} new labelled events < {fs.retrain_min_events}"
        return True, f"{new} new labelled events"

    def run_once(self) -> dict[str, str]:
        """Check every persona once and retrain the due ones; persona -> outcome (or why not)."""
        adapters_dir = Path(self.settings.feedback.adapters_dir)
        outcomes = {}
        for persona, pdir in discover(adapters_dir).items():
            if current_version(pdir) is None:
                continue
            due, why = self.due(persona)
            if not due:
                outcomes[persona] = f"not due: {why}"
                continue
            self._last_attempt[persona] = self.clock()
            logger.info("retrain %s: %s", persona, why)
            try:
                outcome = self.retrain_fn(self.settings, persona, self.store)
            except Exception as e:  # a failed run must not stop the scheduler; `current` is untouched
                logger.exception("retrain %s failed; the current version keeps serving", persona)
                _metrics()["failures"].labels(persona).inc()
                _metrics()["runs"].labels(persona, "failed").inc()
                outcomes[persona] = f"failed: {type(e).__name__}"
                continue
            _metrics()["runs"].labels(persona, outcome.status).inc()
            logger.info("retrain %s -> %s %s", persona, outcome.candidate, outcome.status)
            outcomes[persona] = outcome.status
        return outcomes

    def prune_if_due(self):
        """Apply the retention settings when the last prune is `prune_interval_h` old (or none ran yet); returns
        the PruneReport, or None when not due."""
        from training.feedback.retention import prune

        now = self.clock()
        interval = timedelta(hours=self.settings.feedback.prune_interval_h)
        if self._last_prune is not None and now - self._last_prune < interval:
            return None
        report = prune(self.settings, self.store, apply=True, now=now)
        self._last_prune = now  # after it worked: a failed prune is tried again at the next poll
        m = _metrics()["pruned"]
        m.labels("feedback_events").inc(report.feedback_events)
        m.labels("dead_letters").inc(sum((report.dead_letters or {}).values()))
        m.labels("adapter_versions").inc(len(report.adapter_versions))
        for note in report.notes:
            logger.warning("prune: %s", note)
        return report

    def run(self, stop: threading.Event) -> None:
        """Check every `scheduler_poll_s` (and prune every `prune_interval_h`) until `stop` is set."""
        poll_s = self.settings.feedback.scheduler_poll_s
        logger.info("scheduler polling every %.0fs", poll_s)
        while not stop.is_set():
            for step in (self.prune_if_due, self.run_once):
                try:
                    step()
                except Exception:  # the database may be down for a while: log and keep polling
                    logger.exception("scheduler %s failed", step.__name__)
            stop.wait(poll_s)
