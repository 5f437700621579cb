"""The asynchronous rollout queue: a bounded FIFO of jobs run one at a time, in submission order, and their results
consumed in that same order. It knows no algorithm: a job is any callable (a weight sync, a generation).

With ``background`` False (``rollout.max_staleness: 0``) a job runs in the caller's thread when its result is
popped: the synchronous loop is this queue with nothing ahead. With ``background`` True one worker thread runs the
jobs while the caller trains; :meth:`pop` waits for the oldest result. Because jobs run one at a time in the order
they were submitted, what a seeded run generates does not depend on timing, only on the order of submissions.

The worker is a daemon thread: a run that stops (an error, Ctrl-C) cancels the jobs not started and does not wait
for the one running, which ends when the backend it drives is closed.

Timing: :meth:`pop` reports how long the caller waited for the result (``wait_s``) and for how long since the
previous pop a job ran while the caller was busy elsewhere (``overlap_s``).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any


@dataclass
class _Entry:
    future: Future | None  # background: the job's future; inline: None
    job: Callable[[], Any] | None  # inline: the job still to run (None: done, or a preloaded result)
    result: Any = None
    produces: bool = True  # False: a job run for its side effect (a weight sync), never popped


class RolloutQueue:
    """Jobs in submission order; ``produces`` jobs' results popped in that order (see the module doc)."""

    def __init__(self, background: bool):
        self.background = background
        self._entries: deque[_Entry] = deque()
        self._busy: list[list[float]] = []  # [start, end] of each job run since the last pop (end inf: running)
        self._lock = threading.Lock()
        self._since = time.perf_counter()  # the end of the last pop: the caller's own work started then
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        if background:
            threading.Thread(target=self._work, name="rollout-queue", daemon=True).start()

    def __len__(self) -> int:
        """Results submitted and not popped yet."""
        return sum(e.produces for e in self._entries)

    def submit(self, job: Callable[[], Any], produces: bool = True) -> None:
        """Queue ``job`` behind every job submitted before it. ``produces`` False: run for its side effect only
        (its error, if any, is raised by the next :meth:`pop` or :meth:`drain`)."""
        self._entries.append(_Entry(self._start(job), None, produces=produces) if self.background
                             else _Entry(None, job, produces=produces))

    def call(self, job: Callable[[], Any]) -> Any:
        """Run ``job`` behind every job submitted before it and return its result now (not queued)."""
        if not self.background:
            for entry in self._entries:  # the jobs before it run first, as in the background
                self._finish(entry)
            return job()
        return self._start(job).result()

    def preload(self, results: list) -> None:
        """Put finished results (from a checkpoint) at the front, in their order."""
        for result in reversed(results):
            self._entries.appendleft(_Entry(None, None, result))

    def pop(self) -> tuple[Any, float, float]:
        """(the oldest result, seconds waited for it, seconds a job ran since the last pop while this thread did
        other work). Runs the jobs before it first (inline mode); raises the error of any job up to it."""
        start = time.perf_counter()
        overlap = self._overlap(self._since, start)
        while True:
            entry = self._entries.popleft()  # (a job that failed leaves the queue with its error)
            value = self._finish(entry)
            if entry.produces:
                break
        self._since = time.perf_counter()
        with self._lock:
            self._busy = [b for b in self._busy if b[1] > self._since]
        return value, self._since - start, overlap

    def drain(self) -> list:
        """Wait for every job in flight and return the results not popped yet, in order (they stay queued); the
        first job's error, if one failed, is raised."""
        for entry in self._entries:
            self._finish(entry)
        return [e.result for e in self._entries if e.produces]

    def flush(self) -> int:
        """Drop every queued result (made by weights that no longer exist): the jobs not started are cancelled, the
        one running is waited for. Returns how many results were dropped. Errors go with their jobs."""
        dropped = len(self)
        for entry in self._entries:
            if entry.future is not None and not entry.future.cancel():
                entry.future.exception()  # the running one: wait
        self._entries.clear()
        return dropped

    def close(self) -> None:
        """Cancel the jobs not started; the one running ends with its backend (closed after this)."""
        for entry in self._entries:
            if entry.future is not None:
                entry.future.cancel()
        self._entries.clear()
        if self.background:
            self._jobs.put(None)

    def _start(self, job: Callable[[], Any]) -> Future:
        future: Future = Future()
        self._jobs.put((future, job))
        return future

    def _work(self) -> None:
        while (item := self._jobs.get()) is not None:
            future, job = item
            if not future.set_running_or_notify_cancel():
                continue  # cancelled before it started
            span = [time.perf_counter(), float("inf")]
            with self._lock:
                self._busy.append(span)
            try:
                future.set_result(job())
            except BaseException as err:  # noqa: BLE001 - handed to the thread that takes the result
                future.set_exception(err)
            finally:
                span[1] = time.perf_counter()

    def _finish(self, entry: _Entry):
        if entry.future is not None:
            entry.result, entry.future = entry.future.result(), None
        elif entry.job is not None:
            entry.result, entry.job = entry.job(), None
        return entry.result

    def _overlap(self, start: float, end: float) -> float:
        """Seconds within [start, end] during which a job ran."""
        with self._lock:
            return sum(max(0.0, min(e, end) - max(s, start)) for s, e in self._busy)
