"""Preemption: SIGTERM (a scheduler taking the machine back) and SIGINT (Ctrl-C) end a run at the next safe point
— the end of the step in flight — with a checkpoint of that step, one line and exit code 8
(:class:`RunInterrupted`); the same command resumes it. A second signal stops at once (``KeyboardInterrupt``:
the ``with`` blocks around the loop still close their rollout workers and servers). Under data parallelism rank
0's reading decides for every rank (torchrun forwards the signal to each of them).

The handlers live only while the training loop runs (``with Preemption():``), in the main thread (elsewhere, as
in a thread of a program that trains through the Python API, signals keep their handlers)."""

from __future__ import annotations

import signal
import sys
import threading

from posttrain.distributed import World


class RunInterrupted(RuntimeError):
    """A signal ended the run at a step boundary, after a checkpoint of that step."""


class Preemption:
    def __init__(self):
        self.received: str | None = None  # the name of the first signal
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:  # the second one: now
            self.__exit__()
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        print(f"{self.received}: the run stops after this step, with a checkpoint (send it again to stop at once)",
              file=sys.stderr, flush=True)

    def due(self, world: World) -> str | None:
        """The signal that ends the run at this step boundary, the same on every rank (rank 0's), or None."""
        return world.broadcast(self.received) if world.size > 1 else self.received
