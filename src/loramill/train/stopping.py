"""Stopping a training job cleanly: at the next step boundary, with its state saved.

Three things ask a job to stop, and each must leave a state a rerun resumes from:

- SIGINT: Ctrl-C in the terminal reaches every process of the foreground group;
- SIGTERM: what Slurm and other schedulers send before they kill;
- its scheduler going away: `kill -INT <snakemake>` stops Snakemake alone, which then exits
  without stopping the job it started (its local executor only shuts its thread pool down).
  The job would train on, orphaned, and write a result nobody scheduled. A job notices this
  as a change in its chain of parent processes.

A second SIGINT or SIGTERM stops the job at once, as it would without this module; one within
REPEAT_SECONDS of the first is the same request (Ctrl-C reaches a job from the terminal and
again from Snakemake, which passes signals on: :func:`pass_signals_to_jobs`).
"""

from __future__ import annotations

import contextlib
import signal
import time
from types import FrameType, TracebackType
from typing import Any

import psutil

from loramill import LoramillError

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_SECONDS = 2.0
PARENT_CHECK_SECONDS = 1.0
SCHEDULER_GONE = "its scheduler exited"
# every reason a job stops for, by a number the processes of a multi-process run can share
REASONS = (None, *(number.name for number in SIGNALS), SCHEDULER_GONE)


class Interrupted(LoramillError):
    """A job stopped on request, after saving what a rerun resumes from."""

    def __init__(self, why: str, step: int, saved: bool) -> None:
        state = f"state saved at step {step}" if saved else f"stopped at step {step}"
        super().__init__(f"interrupted ({why}): {state}; rerun the same command to resume")
        self.step = step


def _ancestors() -> list[tuple[int, float]]:
    """Our parent processes, nearest first, each as (pid, start time): a pid alone could be
    reused by a new process."""
    try:
        return [(p.pid, p.create_time()) for p in psutil.Process().parents()]
    except psutil.Error:  # a parent exiting while we look: compared again next time
        return []


class StopRequest:
    """A context in which SIGINT and SIGTERM, or the loss of a parent process, set
    :attr:`reason` instead of ending the process; the loop polls it between steps."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._first = self._looked = 0.0
        self._previous: dict[int, Any] = {}
        self._parents: list[tuple[int, float]] = []

    def __enter__(self) -> StopRequest:
        self._parents = _ancestors()
        try:
            for number in SIGNALS:
                self._previous[number] = signal.signal(number, self._on_signal)
        except ValueError:  # not the main thread (a notebook's worker, say): signals as before
            self._restore()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _on_signal(self, number: int, frame: FrameType | None) -> None:
        if self.reason is None:
            self.reason, self._first = signal.Signals(number).name, time.monotonic()
        elif time.monotonic() - self._first > REPEAT_SECONDS:  # asked again: stop now
            self._restore()
            signal.raise_signal(number)

    def requested(self) -> str | None:
        """Why to stop, or None: a signal received, or a parent process gone (looked at once
        every PARENT_CHECK_SECONDS: reading the process table takes about a millisecond)."""
        due = time.monotonic() - self._looked >= PARENT_CHECK_SECONDS
        if self.reason is None and self._parents and due:
            self._looked = time.monotonic()
            now = _ancestors()
            if now and now != self._parents:  # one of them exited: we were left behind
                self.reason = SCHEDULER_GONE
        return self.reason


def pass_signals_to_jobs() -> None:
    """In Snakemake's own process: pass SIGINT and SIGTERM on to every job it started.

    Snakemake's local executor, interrupted, waits for its running jobs to end (SIGTERM:
    "graceful") and stops none of them; a signal to Snakemake alone (``kill -INT``, a
    scheduler stopping its step) would leave a training to run to its end. Passed on, it
    reaches each job as a Ctrl-C in the terminal would, and the job stops at its next step
    boundary. Snakemake's own handling follows. Call it from ``onstart:``: Snakemake sets
    its SIGTERM handler after parsing, just before that.
    """
    for number in SIGNALS:
        try:
            previous = signal.getsignal(number)
            signal.signal(number, _passing_on(previous))
        except ValueError:  # not the main thread: nothing to take over
            return


def _passing_on(previous: Any) -> Any:
    def handler(number: int, frame: FrameType | None) -> None:
        for process in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                process.send_signal(number)
        if callable(previous):
            previous(number, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(number, signal.SIG_DFL)
            signal.raise_signal(number)

    return handler
