"""How a reward function is called, how its result is checked, and how one failing call is isolated.

The call is TRL's (1.16, ``GRPOTrainer._calculate_rewards``), with keyword arguments only::

    fn(prompts=..., completions=..., completion_ids=..., **columns,
       trainer_state=TrainingProgress(global_step, max_steps), log_extra=..., log_metric=...)

* ``prompts``: per completion, its prompt: the text of the last prompt message, or for a conversational
  prompt the list of its messages (``[{"role": ..., "content": ...}, ...]``).
* ``completions``: the completion's text, or for a conversational prompt
  ``[{"role": "assistant", "content": text}]``.
* ``completion_ids`` and the other columns (``answer``, ``conv``, ...): lists with one entry per
  completion; the RL loop's are listed in :class:`posttrain.trainers.rollout.Scorer`.
* ``trainer_state``: a :class:`TrainingProgress`, for rewards that change over training.
* ``log_extra(column, values)``: one value per completion of the call, written with the completion in
  ``samples.jsonl`` (under ``extra``). ``log_metric(name, value)``: a number; the mean of a step's
  values is logged as ``name`` in ``metrics.jsonl``. Only calls that succeed are kept.

A function declared ``async def`` (any call that returns an awaitable) is run to the end on an event
loop of its own, in the thread the call runs in. A written-for-TRL ``f(completions, **kwargs)`` or
``f(prompts, completions, answer, **kw)`` therefore works as it is.

The result must be a sequence (list, tuple, array, tensor) of one entry per completion, each a real
number or None (the function does not apply to that sample). Anything else is a wrong result: a
ValueError that names the function and says what was wrong. A NaN or infinite entry gives that sample
the fallback (counted as a failure).

Isolation (:func:`score_function`): a call that raises or returns a wrong result is made again one
sample at a time (one group at a time for a per-group reward, see ``group_reward``), with the columns
cut to that sample, so only the samples it fails on get the fallback. A call that runs past its timeout
is not retried (a hang would cost a timeout per sample); the retries of one call share one more timeout.

Where a call runs is a :class:`Runner`'s job: :class:`InProcess` (the caller's process, a thread per
call, the timeout best effort: see :func:`call_with_timeout`) or a worker-process pool
(:mod:`posttrain.rewards.pool`, where a call past its timeout is killed). A runner with ``parts`` > 1
gets a call split into that many parts by whole groups (the samples of one prompt stay together) and
runs them at once; each part is then a call of its own (its own retries, its own ``log_metric`` values).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

Prompt = str | list[dict]  # a prompt's text, or its messages (conversational)
Completion = str | list[dict]  # a completion's text, or [{"role": "assistant", "content": text}]
CALL_ARGS = ("prompts", "completions", "trainer_state", "log_extra", "log_metric")  # never columns


@dataclass(frozen=True)
class TrainingProgress:
    """Where training is when a reward function is called (its ``trainer_state`` argument; TRL passes
    its TrainerState there, which has these two fields too)."""

    global_step: int = 0  # training steps finished before this one (0 at the first step)
    max_steps: int = 0  # the run's steps (config ``steps``); 0 when called outside a training run


class RewardFailed(RuntimeError):
    """A reward function failed more than the config allows: any failure with ``reward_on_error: raise``,
    or more than ``reward_max_failure_rate`` of one call's samples. The message is one line naming the
    function, the failures and the first error; ``posttrain`` exits 6."""


class RewardTimeout(TimeoutError):
    """A reward function ran past its timeout."""


def texts(completions: Sequence[Completion]) -> list[str]:
    """Each completion as text: a string as it is, a conversational one (a list of messages) as its
    messages' contents joined."""
    return [c if isinstance(c, str) else "".join(m["content"] for m in c) for c in completions]


def per_sample(column: object, n: int) -> bool:
    """A column with one entry per completion: a sequence or tensor of length n, not a string."""
    return not isinstance(column, str | bytes) and hasattr(column, "__len__") and len(column) == n


def groups(group_ids: Sequence) -> dict[int, list[int]]:
    """group id -> indices of its samples, in order."""
    out: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids):
        out.setdefault(int(g), []).append(i)
    return out


def describe(exc: BaseException, limit: int = 300) -> str:
    """'Type: message' on one line (whitespace runs become one space), at most ``limit`` characters."""
    line = " ".join(f"{type(exc).__name__}: {exc}".split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def call_with_timeout(fn: Callable, timeout_s: float, *args, **kwargs):
    """fn(*args, **kwargs) in a fresh daemon thread: its result, its exception re-raised, or
    :class:`RewardTimeout` (a TimeoutError) after `timeout_s` seconds.

    Python cannot kill a thread, so a function that hangs is abandoned: it runs on in the background
    (a daemon, so it never holds up the interpreter's exit) and whatever it returns is dropped. A
    busy-looping one keeps taking CPU time; each call gets a new thread, so later calls never wait on it.
    """
    box: dict[str, object] = {}

    def work() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # SystemExit in a reward function must not end the run
            box["error"] = exc

    worker = threading.Thread(target=work, name=f"reward-{getattr(fn, '__name__', 'fn')}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise RewardTimeout(f"timed out after {timeout_s:g} s")
    if "error" in box:
        exc = box["error"]
        raise exc if isinstance(exc, Exception) else RuntimeError(f"{type(exc).__name__}: {exc}")
    return box["value"]


class CallLog:
    """What one call logged through ``log_extra`` and ``log_metric`` (kept only if the call succeeds)."""

    def __init__(self, n: int):
        self.n = n
        self.extra: dict[str, list] = {}
        self.metrics: dict[str, list[float]] = {}

    def log_extra(self, column: str, values: Sequence) -> None:
        """One value per completion of this call for the samples log's column ``column``."""
        values = list(values)
        if len(values) != self.n:
            raise ValueError(f"log_extra('{column}', ...) got {len(values)} values for {self.n} completions")
        self.extra[str(column)] = values

    def log_metric(self, name: str, value: float) -> None:
        """A number for the metric ``name`` (averaged over the step's calls)."""
        self.metrics.setdefault(str(name), []).append(float(value))


def check_result(name: str, raw: object, n: int) -> list[float | None]:
    """A reward function's result as n numbers or None (NaN and inf kept, for the caller to replace).
    ValueError naming the function when it is not a sequence of n entries, each a real number or None."""
    if isinstance(raw, str | bytes | dict) or not hasattr(raw, "__len__") or not hasattr(raw, "__iter__"):
        raise ValueError(f"reward '{name}' returned {type(raw).__name__}, not a list with one number per completion")
    if len(raw) != n:
        raise ValueError(f"reward '{name}' returned {len(raw)} values for {n} completions (one per completion)")
    out: list[float | None] = []
    for i, v in enumerate(raw):
        try:
            if isinstance(v, str | bytes):  # float("1") would pass
                raise TypeError
            out.append(None if v is None else float(v))
        except (TypeError, ValueError):
            raise ValueError(f"reward '{name}' returned {v!r} ({type(v).__name__}) for completion {i}, "
                             "not a number or None") from None
    return out


def _signature_problem(fn: Callable, kwargs: dict) -> str | None:
    """Why ``fn(**kwargs)`` cannot bind (a missing or unknown argument), or None (also when ``fn`` has no
    readable signature)."""
    try:
        inspect.signature(fn, follow_wrapped=False).bind(**kwargs)
    except ValueError:  # no signature (some builtins)
        return None
    except TypeError as exc:
        return str(exc)
    return None


def _run(fn: Callable, kwargs: dict):
    """fn(**kwargs), an awaitable result run to the end on a new event loop."""
    out = fn(**kwargs)
    if inspect.isawaitable(out):
        async def wait():
            return await out

        out = asyncio.run(wait())
    return out


def call_reward(fn: Callable, name: str, inputs: dict, n: int, progress: TrainingProgress,
                timeout_s: float | None) -> tuple[list[float | None], CallLog]:
    """One call of ``fn`` on ``inputs`` (prompts, completions and columns of n completions, see the module
    doc): (its checked values, what it logged). In a fresh thread with ``timeout_s``, or in the caller's
    thread when ``timeout_s`` is None. Raises what the function raised, :class:`RewardTimeout`, a
    TypeError when the arguments do not fit its signature, or check_result's ValueError."""
    log = CallLog(n)
    kwargs = {**inputs, "trainer_state": progress, "log_extra": log.log_extra, "log_metric": log.log_metric}
    problem = _signature_problem(fn, kwargs)
    if problem is not None:
        raise TypeError(f"reward '{name}' does not fit TRL's keyword call: {problem} (it is called as "
                        f"{name}({', '.join(f'{k}=' for k in kwargs)}))")
    run = functools.wraps(fn)(functools.partial(_run, fn))
    raw = run(kwargs) if timeout_s is None else call_with_timeout(run, timeout_s, kwargs)
    return check_result(name, raw, n), log


class NoTimeLeft(RewardTimeout):
    """A retry that was not made: the one timeout the retries of a call share was used up."""


Result = tuple[list[float | None], CallLog] | Exception  # one call's checked values and log, or why it failed


class Runner(Protocol):
    """Runs one reward function's calls somewhere: in this process or in worker processes."""

    parts: int  # how many parts one call may be split into and run at once

    def run(self, calls: list[tuple[dict, int]], progress: TrainingProgress, timeout_s: float | None,
            shared: bool) -> list[Result]:
        """Each call (inputs of n completions, n), in order: its :func:`call_reward` result or the exception it
        raised (a :class:`RewardTimeout` past ``timeout_s``). ``shared``: the calls share one timeout, counted
        from now; those not started in it get :class:`NoTimeLeft`. Else each call has ``timeout_s`` of its own."""
        ...


class InProcess:
    """A reward function's calls one after the other in the caller's process, each in a fresh thread with its
    timeout (best effort: :func:`call_with_timeout`); one marked ``inline = True`` (a learned reward model) runs
    in the caller's thread without a timeout."""

    parts = 1

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name
        self.timed = not getattr(fn, "inline", False)

    def run(self, calls: list[tuple[dict, int]], progress: TrainingProgress, timeout_s: float | None,
            shared: bool) -> list[Result]:
        timeout = timeout_s if self.timed else None
        deadline = None if timeout is None else time.monotonic() + timeout
        out: list[Result] = []
        for inputs, n in calls:
            left = deadline - time.monotonic() if shared and deadline is not None else timeout
            if left is not None and left <= 0:
                out.append(NoTimeLeft("no time left"))
                continue
            try:
                out.append(call_reward(self.fn, self.name, inputs, n, progress, left))
            except Exception as exc:
                out.append(exc)
        return out


@dataclass
class Outcome:
    """One function's scoring of n completions."""

    values: list[float | None]  # (n,) its value per completion, fallbacks included
    failed: int = 0  # completions that got the fallback
    error: str | None = None  # the first problem, on one line
    extra: list[dict] = field(default_factory=list)  # (n,) {column: value} it logged per completion
    metrics: dict[str, list[float]] = field(default_factory=dict)  # log_metric values of its calls


def split(units: list[list[int]], parts: int) -> list[list[int]]:
    """Consecutive units (lists of row indices) joined into at most ``parts`` parts of about equal row counts:
    a part ends once the rows so far reach its share k/parts of the total."""
    total, out, rows, done = sum(len(u) for u in units), [], [], 0
    for unit in units:
        rows += unit
        done += len(unit)
        if len(out) < parts - 1 and done * parts >= total * (len(out) + 1):
            out.append(rows)
            rows = []
    return out + [rows] if rows else out


def score_function(runner: Runner, name: str, inputs: dict, n: int, progress: TrainingProgress, timeout_s: float,
                   fallback: float | None, stop_at_first: bool, per_group: bool = False) -> Outcome:
    """A function's values for n completions, isolated as the module doc says, its calls made by ``runner``.
    ``inputs``: prompts, completions and per-sample columns (lists of n) or shared values; ``per_group``: the
    function's retries are by group (``group_ids``). A part of the call that is one sample (one group) is not
    retried. ``stop_at_first``: the first failure (an exception, a wrong result, a timeout, a NaN) raises
    :class:`RewardFailed` instead, chained to its cause."""
    out = Outcome([fallback] * n, extra=[{} for _ in range(n)])

    def fail(rows: list[int], why: str, cause: BaseException | None = None) -> None:
        if stop_at_first:
            raise RewardFailed(f"reward '{name}' failed (reward_on_error: raise): {why}") from cause
        out.failed += len(rows)
        out.error = out.error or why

    def keep(rows: list[int], values: list[float | None], log: CallLog) -> None:
        for j, (i, v) in enumerate(zip(rows, values, strict=True)):
            if v is not None and not math.isfinite(v):
                fail([i], f"reward '{name}' returned {v} for completion {i}")
            else:
                out.values[i] = v
            for column, logged in log.extra.items():
                out.extra[i][column] = logged[j]
        for metric, got in log.metrics.items():
            out.metrics.setdefault(metric, []).extend(got)

    def calls(parts: list[list[int]]) -> list[tuple[dict, int]]:
        if parts == [list(range(n))]:
            return [(inputs, n)]
        return [({k: [v[i] for i in rows] if per_sample(v, n) else v for k, v in inputs.items()}, len(rows))
                for rows in parts]

    group_ids = inputs.get("group_ids")
    by_group = list(groups(group_ids).values()) if group_ids is not None and per_sample(group_ids, n) else None
    parts = split(by_group or [[i] for i in range(n)], runner.parts) if runner.parts > 1 else [list(range(n))]
    retry: list[list[int]] = []
    for rows, got in zip(parts, runner.run(calls(parts), progress, timeout_s, shared=False), strict=True):
        if not isinstance(got, Exception):
            keep(rows, *got)
            continue
        mine = set(rows)
        units = [u for u in by_group if u[0] in mine] if per_group and by_group else [[i] for i in rows]
        if isinstance(got, RewardTimeout) or len(units) == 1:
            fail(rows, describe(got), got)
        else:
            fail([], describe(got), got)  # the part's error is the first; the retries count the failures
            retry += units
    for rows, got in zip(retry, runner.run(calls(retry), progress, timeout_s, shared=True), strict=True):
        if isinstance(got, NoTimeLeft):
            fail(rows, f"reward '{name}': no time left to retry completions one at a time")
        elif isinstance(got, Exception):
            fail(rows, describe(got), got)
        else:
            keep(rows, *got)
    return out
