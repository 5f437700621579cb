"""Reward functions in worker processes, so that a timeout holds: a call past it is killed with its worker.

A :class:`RewardPool` of N workers (config ``reward_workers``) is made once per run and closed when the
run ends (a context manager; :meth:`RewardPool.close` ends every worker). Workers start with the ``spawn``
method: fresh interpreters that inherit no torch threads, locks or CUDA state from the trainer; they do not
run the trainer's own script again (:func:`_main_script_hidden`), so a script that starts a run needs no
``if __name__ == "__main__":`` guard.
Each worker loads the rewards it is sent by spec (:func:`posttrain.rewards.loading.load_reward`: a
built-in name, ``pkg.mod:fn``, ``path/file.py:fn``) before it reports ready, so an import's time never
counts against a call's timeout, and makes each call as :func:`posttrain.rewards.calls.call_reward` does,
in its main thread (signal-based timeouts of libraries such as math_verify work there).

State: a worker keeps what the reward modules keep (a module-level cache lives on in that worker across
calls); nothing is shared between workers or with the trainer, and a worker that is replaced starts empty.
torch in a worker uses one thread (as DataLoader workers do): the pool's parallelism is its processes.
Workers are daemon processes (ended if the trainer exits without closing the pool; on Linux the kernel also
kills them if the trainer is killed outright), so a reward cannot start ``multiprocessing`` processes of its
own there; ``subprocess`` works.

Timeouts: a call's clock starts when a ready worker gets it. Past its timeout the worker is killed
(SIGKILL, whatever it runs: a backtracking regex, big-int arithmetic, a C extension, ``while True``) and a
new one is started in the background; the call is a :class:`RewardTimeout`. A worker that dies during a
call (a crash in C code, ``os._exit``) is replaced too; the call fails with :class:`WorkerDied`. A worker
that cannot start (its process exits or is not ready within ``START_TIMEOUT_S``) stops the run with
:class:`RewardFailed`, one line. Ctrl-C goes to the trainer only (workers ignore SIGINT); the trainer then
closes the pool.
"""

from __future__ import annotations

import multiprocessing
import pickle
import signal
import sys
import time
from collections import deque
from contextlib import contextmanager
from multiprocessing.connection import Connection, wait

from posttrain.rewards.calls import (
    CallLog,
    NoTimeLeft,
    Result,
    RewardFailed,
    RewardTimeout,
    TrainingProgress,
    call_reward,
    describe,
)

START_TIMEOUT_S = 120.0  # a worker not ready by then (imports hung) stops the run
POLL_S = 0.2  # the longest the trainer waits on its workers without looking at pending signals


class WorkerDied(RuntimeError):
    """A reward worker's process ended during a call."""


def serve(conn: Connection, specs: list[str]) -> None:
    """A worker's loop: load ``specs``, say ready, then answer each job ``(spec, name, inputs, n, progress)``
    with ``("ok", values, extra, metrics)`` or ``("error", exception)``, until ``None`` or the pipe closes."""
    from posttrain.rewards.loading import load_reward  # here: the loader imports the library

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    loaded: dict[str, object] = {}
    for spec in specs:
        try:
            loaded[spec] = load_reward(spec)
        except Exception:  # the trainer loaded it already; if it fails here, the call says why
            pass
    conn.send(("ready",))
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        spec, name, inputs, n, progress = job
        try:
            fn = loaded[spec] if spec in loaded else loaded.setdefault(spec, load_reward(spec))
            values, log = call_reward(fn, name, inputs, n, progress, None)
            reply: tuple = ("ok", values, log.extra, log.metrics)
        except BaseException as exc:  # SystemExit in a reward function must not end the worker
            reply = ("error", _portable(exc))
        try:
            conn.send(reply)
        except Exception as exc:  # what it logged cannot be pickled
            conn.send(("error", RuntimeError(f"its result could not be sent back from the worker: {describe(exc)}")))


def _die_with_parent() -> None:
    """On Linux, ask the kernel to SIGKILL this process when the trainer dies (PR_SET_PDEATHSIG), so that even a
    worker stuck in C code does not outlive a trainer killed outright. Elsewhere nothing: the trainer ends its
    workers when it exits normally."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG


def _portable(exc: BaseException) -> Exception:
    """The exception itself when it survives pickling, else a RuntimeError with its one-line description."""
    try:
        if isinstance(exc, Exception) and isinstance(pickle.loads(pickle.dumps(exc)), Exception):
            return exc
    except Exception:
        pass
    return RuntimeError(describe(exc))


@contextmanager
def _main_script_hidden():
    """While a worker is spawned, the trainer's ``__main__`` shows no script: a spawned process otherwise runs
    the parent's script again (as ``__mp_main__``) to rebuild it, so a user's script that starts a run without
    an ``if __name__ == "__main__":`` guard would start it again in every worker. Workers never need that
    module: rewards defined in it run in the trainer (:func:`posttrain.rewards.loading.spec_of`)."""
    main = sys.modules.get("__main__")
    saved = {key: main.__dict__[key] for key in ("__file__", "__spec__") if main is not None and key in main.__dict__}
    try:
        for key in saved:
            if key == "__file__":
                del main.__dict__[key]
            else:
                main.__dict__[key] = None
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)


class Worker:
    """One worker process and the trainer's end of its pipe."""

    def __init__(self, context, specs: list[str]):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=serve, args=(child, specs), name="posttrain-reward-worker", daemon=True)
        with _main_script_hidden():
            self.process.start()
        child.close()
        self.started = time.monotonic()
        self.ready = False

    def kill(self) -> None:
        """End the process now (SIGKILL) and wait for it."""
        self.process.kill()
        self.process.join()
        self.conn.close()

    def stop(self) -> None:
        """Ask a ready idle worker to end, kill it if it has not within a second; kill one still starting."""
        if self.ready:
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.process.join(1.0)
        self.kill()


class RewardPool:
    """``workers`` reward worker processes (0: none; every reward then runs in the trainer's process). They
    start when the pool is entered (or at its first call) once a reward is set to run in it (:meth:`runner`),
    and end at :meth:`close`."""

    def __init__(self, workers: int):
        if workers < 0:
            raise ValueError(f"a reward pool needs 0 or more workers, got {workers}")
        self.workers = workers
        self.specs: list[str] = []  # what a worker loads when it starts
        self.replaced = 0  # workers killed (timeouts) or dead and started again
        self._context = multiprocessing.get_context("spawn")
        self._idle: deque[Worker] = deque()  # ready or starting, no job
        self._busy: dict[Connection, tuple[Worker, int, float]] = {}  # worker, job index, its deadline

    def __enter__(self) -> RewardPool:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def runner(self, spec: str, name: str) -> PoolRunner:
        """The runner for reward ``spec`` (metrics name ``name``); workers started from now on preload it."""
        if spec not in self.specs:
            self.specs.append(spec)
        return PoolRunner(self, spec, name)

    def start(self) -> None:
        """Start the workers that are missing (without waiting for them to be ready); none while no reward is
        set to run in the pool."""
        while self.specs and len(self._idle) + len(self._busy) < self.workers:
            self._idle.append(Worker(self._context, list(self.specs)))

    def wait_ready(self) -> None:
        """Start the workers and wait until each is ready (a benchmark's or a test's clock then measures calls
        only); RewardFailed when one cannot start."""
        self.start()
        while starting := [w for w in self._idle if not w.ready]:
            wait([w.conn for w in starting], 1.0)
            for worker in starting:
                self._check_start(worker)

    def close(self) -> None:
        """End every worker: idle ones are asked to, busy ones killed. The pool can be started again."""
        while self._idle:
            self._idle.popleft().stop()
        while self._busy:
            self._busy.popitem()[1][0].kill()

    def pids(self) -> list[int]:
        """The process ids of the workers alive now."""
        return [w.process.pid for w in self._idle] + [w.process.pid for w, _, _ in self._busy.values()]

    def run(self, spec: str, name: str, calls: list[tuple[dict, int]], progress: TrainingProgress,
            timeout_s: float | None, shared: bool) -> list[Result]:
        """:meth:`posttrain.rewards.calls.Runner.run` for reward ``spec`` in the workers, as many calls at once as
        there are workers."""
        self.start()
        results: list[Result | None] = [None] * len(calls)
        pending = deque(range(len(calls)))
        end = None if timeout_s is None or not shared else time.monotonic() + timeout_s
        try:
            while pending or self._busy:
                if pending and not self._idle and not self._busy:  # close() ran in another thread: the run ends
                    raise RuntimeError("the reward workers were closed during a scoring call")
                self._dispatch(spec, name, calls, progress, timeout_s, end, pending, results)
                if end is not None and time.monotonic() >= end:
                    for i in pending:
                        results[i] = NoTimeLeft("no time left")
                    pending.clear()
                self._collect(results, timeout_s)
        finally:  # an interrupt: a worker still on one of these calls would answer the next caller
            while self._busy:
                self._busy.popitem()[1][0].kill()  # the next call starts its replacement
        return results  # type: ignore[return-value]

    def _dispatch(self, spec, name, calls, progress, timeout_s, end, pending: deque, results: list) -> None:
        """Give pending calls to the ready idle workers (a call whose inputs cannot be pickled fails at once);
        check on those still starting."""
        for worker in list(self._idle):
            if not worker.ready:
                self._check_start(worker)
        while pending and any(w.ready for w in self._idle):
            worker = next(w for w in self._idle if w.ready)
            self._idle.remove(worker)
            i = pending.popleft()
            inputs, n = calls[i]
            deadline = float("inf") if timeout_s is None else time.monotonic() + timeout_s
            self._busy[worker.conn] = (worker, i, min(deadline, end) if end is not None else deadline)
            try:
                worker.conn.send((spec, name, inputs, n, progress))
            except OSError:  # it died while idle: its recv below reads the end of the pipe
                pass
            except Exception as exc:  # the inputs do not pickle (nothing was written): the worker is free again
                del self._busy[worker.conn]
                self._idle.append(worker)
                results[i] = RuntimeError(f"its inputs cannot be sent to a reward worker: {describe(exc)}")

    def _check_start(self, worker: Worker) -> None:
        """Mark a starting worker ready once it says so; RewardFailed when it ended or took too long."""
        if worker.conn.poll():
            try:
                worker.ready = worker.conn.recv() == ("ready",)
                return
            except EOFError:  # it is ending: let it, to read its exit code
                worker.process.join(5.0)
        elif worker.process.is_alive() and time.monotonic() - worker.started < START_TIMEOUT_S:
            return
        self._idle.remove(worker)
        code = worker.process.exitcode
        worker.kill()
        self.close()
        how = f"exit code {code}" if code is not None else f"not ready after {START_TIMEOUT_S:g} s"
        raise RewardFailed(f"a reward worker process could not start ({how}); reward_workers=0 runs the rewards in "
                           "the trainer's process")

    def _collect(self, results: list, timeout_s: float | None) -> None:
        """Wait for a busy worker's answer (or a starting worker, or the first deadline) and take what came."""
        starting = [w.conn for w in self._idle if not w.ready]
        first = min((d for _, _, d in self._busy.values()), default=float("inf"))
        wait_s = None if first == float("inf") else max(0.0, first - time.monotonic())
        if not self._busy:
            wait_s = 1.0 if starting else 0.0  # a starting worker wakes the wait when it is ready
        # bounded: a Ctrl-C that the kernel hands to another thread does not interrupt this thread's wait, and
        # Python raises KeyboardInterrupt only once this thread runs again
        ready = wait(list(self._busy) + starting, POLL_S if wait_s is None else min(wait_s, POLL_S))
        for conn in ready:
            if conn not in self._busy:
                continue  # a starting worker: _dispatch reads it
            worker, i, _ = self._busy.pop(conn)
            try:
                reply = conn.recv()
            except (EOFError, OSError):
                worker.process.join()
                results[i] = WorkerDied(f"its worker process ended during the call (exit code "
                                        f"{worker.process.exitcode}); a new one was started")
                self._replace(worker)
                continue
            results[i] = reply[1] if reply[0] == "error" else (reply[1], _log(len(reply[1]), reply[2], reply[3]))
            self._idle.append(worker)
        now = time.monotonic()
        for conn, (worker, i, deadline) in list(self._busy.items()):
            if now >= deadline:
                del self._busy[conn]
                results[i] = RewardTimeout(f"timed out after {timeout_s:g} s (its worker process was killed and "
                                           "replaced)")
                self._replace(worker)

    def _replace(self, worker: Worker) -> None:
        """Kill ``worker`` and start another in its place (it gets ready in the background)."""
        worker.kill()
        self.replaced += 1
        self._idle.append(Worker(self._context, list(self.specs)))


def _log(n: int, extra: dict, metrics: dict) -> CallLog:
    log = CallLog(n)
    log.extra, log.metrics = extra, metrics
    return log


class PoolRunner:
    """A :class:`posttrain.rewards.calls.Runner` for one reward in a :class:`RewardPool`: its calls are split
    into one part per worker."""

    def __init__(self, pool: RewardPool, spec: str, name: str):
        self.pool, self.spec, self.name = pool, spec, name
        self.parts = pool.workers

    def run(self, calls: list[tuple[dict, int]], progress: TrainingProgress, timeout_s: float | None,
            shared: bool) -> list[Result]:
        return self.pool.run(self.spec, self.name, calls, progress, timeout_s, shared)
