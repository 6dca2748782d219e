"""What a training run shows while it works: a rich bar on a terminal, a plain line every N seconds without one.

Both say what is happening before the first step ends (loading, tokenizing, "first step", its seconds so far),
then step, loss, validation loss, tokens/s and the ETA. Without a terminal (docker logs, nohup, CI) a ticker thread
prints a line every `log_every_s` seconds even while one long step runs, so a log never goes quiet for minutes;
`log_every_s` 0 prints one line per step instead (what the tests use: no thread, nothing timed).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from rich.console import Console


def fmt_duration(seconds: float) -> str:
    """0:12:05."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@contextlib.contextmanager
def phase(console: Console, text: str) -> Iterator[None]:
    """A spinner on a terminal, one plain line otherwise, for work before the first step (loading, tokenizing)."""
    if console.is_terminal:
        with console.status(text):
            yield
    else:
        console.print(f"{text}...", highlight=False)
        yield


class _Tracker:
    """The numbers both displays show, from the Trainer's state."""

    def __init__(self):
        self.started: float | None = None  # when the first step began
        self.first_done: float | None = None  # when the first step ended (ETA is timed from there)
        self.step0 = 0  # global_step at train start (resume)
        self.step = 0
        self.total = 0
        self.tokens0 = 0
        self.tokens = 0
        self.loss: float | None = None
        self.val: float | None = None
        self.evaluating = False

    def status(self, now: float) -> str:
        """'first step (37 s)' before any step ended, else 'loss 2.345 val 2.101 512 tok/s'."""
        if self.evaluating:
            return "validating"
        if self.step == self.step0:
            return f"first step ({now - self.started:.0f} s)" if self.started else "starting"
        parts = []
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        if self.val is not None:
            parts.append(f"val {self.val:.3f}")
        elapsed = now - self.started
        if elapsed > 0 and self.tokens > self.tokens0:
            parts.append(f"{(self.tokens - self.tokens0) / elapsed:,.0f} tok/s")
        return " ".join(parts)

    def eta_s(self, now: float) -> float | None:
        """Remaining steps x the mean step since the first ended (the first pays one-off costs)."""
        done = self.step - self.step0 - 1
        if self.first_done is None or done <= 0:
            return None
        return (self.total - self.step) * (now - self.first_done) / done

    def line(self, now: float) -> str:
        eta = self.eta_s(now)
        return (f"training step {self.step}/{self.total} {self.status(now)} "
                f"elapsed {fmt_duration(now - (self.started or now))} ETA {fmt_duration(eta) if eta is not None else '-'}")


def progress_callback(console: Console, log_every_s: float = 30.0):
    """The Trainer callback showing progress on `console`: rich bar on a terminal, plain lines otherwise."""
    from transformers import TrainerCallback

    class _Base(TrainerCallback):
        def __init__(self):
            self.t = _Tracker()

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            self.t.step0 = self.t.step = state.global_step
            self.t.total = state.max_steps
            self.t.tokens0 = self.t.tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
            self.start()

        def on_step_begin(self, args, state, control, **kwargs):
            if self.t.started is None:
                self.t.started = time.monotonic()
                self.show()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.monotonic()
            if self.t.first_done is None:
                self.t.first_done = now
            self.t.step, self.t.total = state.global_step, state.max_steps  # a time budget may change the total
            self.t.tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
            self.on_step()

        def on_prediction_step(self, args, state, control, **kwargs):
            if not self.t.evaluating:
                self.t.evaluating = True
                self.show()

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:
                self.t.loss = float(logs["loss"])
            if "eval_loss" in logs:
                self.t.val = float(logs["eval_loss"])
                self.t.evaluating = False
                self.show()

        def on_evaluate(self, args, state, control, **kwargs):
            self.t.evaluating = False

        def on_train_end(self, args, state, control, **kwargs):
            self.stop()

        def start(self):
            pass

        def show(self):
            pass

        def on_step(self):
            self.show()

        def stop(self):
            pass

    class RichBar(_Base):
        """A rich bar whose text says what it is doing, refreshed 4 times a second (also during the first step)."""

        def __init__(self):
            super().__init__()
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"), console=console, transient=False,
            )
            self.task = None
            self._stop = threading.Event()
            self._thread: threading.Thread | None = None

        def start(self):
            self.progress.start()
            self.task = self.progress.add_task("train", total=self.t.total, completed=self.t.step, status="starting",
                                               eta="-")
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()

        def _tick(self):
            while not self._stop.wait(0.5):
                self.show()

        def show(self):
            if self.task is None:
                return
            now = time.monotonic()
            eta = self.t.eta_s(now)
            self.progress.update(self.task, total=self.t.total, completed=self.t.step, status=self.t.status(now),
                                 eta=fmt_duration(eta) if eta is not None else "-")

        def stop(self):
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            if self.task is not None:
                self.show()
                self.progress.stop()

    class PlainLines(_Base):
        """Without a terminal: one line every `log_every_s` seconds (a ticker thread), or every step when 0."""

        def __init__(self):
            super().__init__()
            self._stop = threading.Event()
            self._thread: threading.Thread | None = None
            self._lock = threading.Lock()
            self._last = 0.0

        def start(self):
            console.print(f"training: {self.t.total} steps from step {self.t.step}", highlight=False)
            if log_every_s > 0:
                self._thread = threading.Thread(target=self._tick, daemon=True)
                self._thread.start()

        def _tick(self):
            while not self._stop.wait(log_every_s):
                self._print()

        def _print(self):
            with self._lock:
                self._last = time.monotonic()
                console.print(self.t.line(self._last), highlight=False, soft_wrap=True)

        def show(self):
            if log_every_s <= 0:
                self._print()

        def on_step(self):
            if log_every_s <= 0 or time.monotonic() - self._last >= log_every_s:
                self._print()

        def stop(self):
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self._print()

    return RichBar() if console.is_terminal else PlainLines()
