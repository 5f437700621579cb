"""A weighted sum of reward functions, each called and isolated as :mod:`posttrain.rewards.calls` says."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.rewards.calls import (
    CALL_ARGS,
    Completion,
    InProcess,
    Prompt,
    RewardFailed,
    Runner,
    TrainingProgress,
    score_function,
)
from posttrain.rewards.loading import load_reward, reward_name, spec_of
from posttrain.rewards.pool import RewardPool

ON_ERROR = ("fallback", "raise")


@dataclass
class Scores:
    """A :class:`RewardSet`'s scoring of B completions."""

    totals: Tensor  # (B,) the weighted sum
    metrics: dict[str, float]  # rewards/<name>/mean|std|failures, and what the functions logged with log_metric
    values: dict[str, list[float | None]]  # each function's value per completion, fallbacks included
    extra: list[dict]  # (B,) {column: value} the functions logged with log_extra

    def rows(self) -> list[dict[str, float | None]]:
        """Per completion, {function: value}."""
        return [{name: v[i] for name, v in self.values.items()} for i in range(len(self.totals))]


class RewardSet:
    """A weighted sum of reward functions, each isolated from the others' failures.

    total_i = Σ_f w_f · r_f,i over the functions f with r_f,i not None (0 if every function gave None).
    Where a function runs: with a ``pool`` (:class:`posttrain.rewards.pool.RewardPool` with workers), every
    function that can be loaded by name in another process (``spec_of``: a built-in, ``pkg.mod:fn``,
    ``path/file.py:fn``, or a module-level function of an importable module) runs in the pool's worker
    processes, its calls split across them by whole groups, and a call past ``timeout_s`` is killed. The
    others (lambdas, closures, objects; all of them without a pool) run in this process, each call with its
    own copy of the inputs in a fresh thread, ``timeout_s`` at most but best effort (a thread cannot be
    killed; their names are in `in_process`), except those marked ``inline = True`` (a learned reward model:
    its time is compute, not a hang, and a thread abandoned mid-forward would compete with the next step),
    which run in the caller's thread with no timeout. A call that raises or returns a wrong result is retried
    a sample at a time (:func:`posttrain.rewards.calls.score_function`); the samples it still fails on, its
    NaN/inf entries and every sample of a call that timed out get ``fallback`` (None: not applicable).

    ``on_error="fallback"``: the call returns, unless a function got the fallback on more than
    ``max_failure_rate`` of the call's samples: then :class:`RewardFailed` once every function has run,
    naming the first such function, its failures and its first error. ``on_error="raise"``: the first
    failure raises :class:`RewardFailed`, chained to its cause.

    Metrics per function (named as in `reward_name`): ``rewards/<name>/mean`` and ``/std`` (Bessel;
    0 for one sample) over the samples with a value, fallbacks included (absent when none has one),
    and ``rewards/<name>/failures`` = samples that got the fallback in this call; plus the mean of each
    ``log_metric`` name (a name of the set's own is not overwritten). The first error of each function is
    kept in `first_errors[name]` for the trainer to print once. A weight of 0 keeps a function for its
    metrics only.
    """

    def __init__(self, weights: Mapping[str | Callable, float], timeout_s: float = 30.0, fallback: float | None = 0.0,
                 on_error: str = "fallback", max_failure_rate: float = 0.5, pool: RewardPool | None = None):
        if not weights:
            raise ValueError("a RewardSet needs at least one reward function")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.functions: dict[str, Callable[..., list[float | None]]] = {}
        self.weights: dict[str, float] = {}
        self.runners: dict[str, Runner] = {}
        self.in_process: list[str] = []  # functions that run in this process with a (best effort) timeout
        for spec, weight in weights.items():
            name = reward_name(spec)
            if name in self.functions:
                raise ValueError(f"two reward functions are named '{name}'")
            fn = self.functions[name] = load_reward(spec)
            self.weights[name] = float(weight)
            inline = getattr(fn, "inline", False)
            where = spec_of(spec) if pool is not None and pool.workers and not inline else None
            self.runners[name] = pool.runner(where, name) if where is not None else InProcess(fn, name)
            if where is None and not inline:
                self.in_process.append(name)
        self.timeout_s, self.fallback = timeout_s, fallback
        self.on_error, self.max_failure_rate = on_error, max_failure_rate
        self.first_errors: dict[str, str] = {}

    def __call__(self, prompts: list[Prompt], completions: list[Completion], **columns) -> tuple[Tensor, dict]:
        """(totals (B,), metrics) for B completions; see the class doc."""
        scores = self.score(prompts, completions, **columns)
        return scores.totals, scores.metrics

    def score(self, prompts: list[Prompt], completions: list[Completion],
              trainer_state: TrainingProgress | None = None, **columns) -> Scores:
        """Score B completions: ``columns`` are lists of B entries or values shared by all; ``trainer_state``
        is passed on to the functions (default: step 0 of 0)."""
        clash = [k for k in columns if k in CALL_ARGS]
        if clash:
            raise ValueError(f"columns named {clash} would hide the reward call's own arguments {CALL_ARGS}")
        progress = trainer_state or TrainingProgress()
        n = len(completions)
        totals = [0.0] * n
        metrics: dict[str, float] = {}
        logged: dict[str, list[float]] = {}
        values: dict[str, list[float | None]] = {}
        extra: list[dict] = [{} for _ in range(n)]
        over: list[str] = []
        for name, fn in self.functions.items():
            # copies: a function that edits its inputs (or still runs, abandoned) cannot touch the next one's
            inputs = {"prompts": copy.deepcopy(prompts), "completions": copy.deepcopy(completions),
                      **{k: list(v) if isinstance(v, list) else v for k, v in columns.items()}}
            out = score_function(self.runners[name], name, inputs, n, progress, self.timeout_s, self.fallback,
                                 self.on_error == "raise", getattr(fn, "per_group", False))
            if out.error is not None:
                self.first_errors.setdefault(name, out.error)
            if out.failed > self.max_failure_rate * n:
                over.append(f"reward '{name}' failed on {out.failed} of {n} samples (more than "
                            f"reward_max_failure_rate {self.max_failure_rate:g}), first error: {out.error}")
            values[name] = out.values
            for row, got in zip(extra, out.extra, strict=True):
                row.update(got)
            for key, got in out.metrics.items():
                logged.setdefault(key, []).extend(got)
            given = [v for v in out.values if v is not None]
            for i, v in enumerate(out.values):
                if v is not None:
                    totals[i] += self.weights[name] * v
            if given:
                metrics[f"rewards/{name}/mean"] = sum(given) / len(given)
                metrics[f"rewards/{name}/std"] = torch.tensor(given).std().item() if len(given) > 1 else 0.0
            metrics[f"rewards/{name}/failures"] = float(out.failed)
        if over:
            raise RewardFailed(over[0])
        metrics = {key: sum(got) / len(got) for key, got in logged.items()} | metrics  # ours win a name clash
        return Scores(torch.tensor(totals, dtype=torch.get_default_dtype()), metrics, values, extra)
