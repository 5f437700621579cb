"""Evaluation metrics over sampled answers: pass@k (unbiased estimator) and maj@k (majority vote)."""

from __future__ import annotations

import inspect
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from posttrain.config_checks import ConfigError, check_choice, check_range
from posttrain.distributed import World
from posttrain.engine import SamplingParams, completion_text
from posttrain.random_streams import group_seed


@dataclass
class EvalConfig:
    """Periodic evaluation on the held-out split."""

    every: int = 100  # evaluate every N steps (0: only at the end)
    problems: int = 256  # held-out problems used (≤ task.test_size)
    samples: int = 8  # completions per problem, for pass@k
    ks: tuple[int, ...] = (1, 8)  # k values of pass@k
    temperature: float = 1.0  # sampling temperature for evaluation
    top_k: int | None = 50  # top-k for evaluation sampling
    max_new_tokens: int = 64  # completion budget
    seed: int = 4321  # sampling seed (fixed: every evaluation sees the same randomness)
    correct: str | None = None  # dataset task: the reward that counts a sample right (a name or path; None: the
    # task's reward)
    correct_threshold: float = 1.0  # a sample is right when that reward is >= this
    backend: str | None = None  # RL: where evaluation generates: local | ray | vllm (None: the run's rollout.backend;
    # the rollout.* settings of that backend apply)

    def __post_init__(self):
        check_range("eval.every", self.every, 0, note=" (0: only at the end)")
        if self.backend is not None:
            from posttrain.rollout.base import BACKENDS

            check_choice("eval.backend", self.backend, list(BACKENDS))
        check_range("eval.problems", self.problems, 1, note=" (the final evaluation needs a problem)")
        if not self.ks:
            raise ConfigError("config key 'eval.ks' needs at least one k (e.g. [1, 8])")
        for k in self.ks:
            check_range("eval.ks", k, 1)
        check_range("eval.samples", self.samples, max(self.ks), note=" (the largest k of eval.ks: pass@k draws k "
                    "of the samples)")
        check_range("eval.temperature", self.temperature, 0, note=" (0: greedy)")
        if self.top_k is not None:
            check_range("eval.top_k", self.top_k, 1, note=" or null (no top-k)")
        check_range("eval.max_new_tokens", self.max_new_tokens, 1)
        check_range("eval.correct_threshold", self.correct_threshold)
        if self.correct is not None:  # loaded now: a bad name or path stops the run before the model loads
            from posttrain.rewards import load_reward  # here: the rewards import this module

            try:
                load_reward(self.correct)
            except ConfigError as err:
                raise ConfigError(f"config key 'eval.correct': {err}") from None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, Codex):

    pass@k = 1 − C(n − c, k) / C(n, k) = 1 − Π_{i = n−c+1}^{n} (1 − k / i)

    The product form avoids huge binomials. Returns 1.0 when n − c < k (every k-subset holds a
    correct sample). Raises ValueError unless 0 <= c <= n and 1 <= k <= n.
    """
    if n < 0 or c < 0 or k < 1:
        raise ValueError(f"pass_at_k needs n >= 0, c >= 0, k >= 1; got n={n}, c={c}, k={k}")
    if k > n or c > n:
        raise ValueError(f"pass_at_k needs k <= n and c <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0  # probability that a random k-subset holds no correct sample
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(samples_correct: Sequence[Sequence[bool]], ks: Iterable[int]) -> dict[int, float]:
    """Mean over problems of pass_at_k(n_p, c_p, k) for each k; samples_correct[p] is problem p's
    per-sample correctness. Raises ValueError for no problems or k above a problem's sample count."""
    if not samples_correct:
        raise ValueError("mean_pass_at_k needs at least one problem")
    counts = [(len(s), sum(bool(x) for x in s)) for s in samples_correct]  # (n_p, c_p)
    return {k: sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in ks}


def majority(answers: Sequence[str | None]) -> str | None:
    """Most frequent non-None answer; ties go to the answer seen first; None if there is none."""
    votes = Counter(a for a in answers if a is not None)  # insertion order = first occurrence
    return max(votes, key=votes.__getitem__) if votes else None


def maj_at_k(answers: Sequence[str | None], gold: str, k: int) -> float:
    """maj@k: 1.0 if the majority vote over the first k answers equals `gold`, else 0.0.

    None (no extractable answer) casts no vote; ties are broken by first occurrence; answers are
    compared as given, so normalise them (and gold) first.
    """
    if k < 1:
        raise ValueError(f"maj_at_k needs k >= 1, got {k}")
    return float(majority(answers[:k]) == gold)


class SampleFailures:
    """Samples whose task reward (or grade) raised or was not a finite number: each counts as wrong instead
    of stopping the evaluation; counted, and the first one said once (on stderr) when the evaluation ends."""

    def __init__(self, what: str):
        self.what, self.count, self.first = what, 0, None

    def call(self, fn: Callable, *args, fallback):
        """``fn(*args)``, or ``fallback`` (counted) when it raises or gives a non-finite number."""
        try:
            value = fn(*args)
        except Exception as err:  # noqa: BLE001 - any error of the task's code is the sample's, not the run's
            return self._failed(f"{type(err).__name__}: {err}", fallback)
        if isinstance(value, float) and not math.isfinite(value):
            return self._failed(f"returned {value}", fallback)
        return value

    def _failed(self, why: str, fallback):
        self.count += 1
        self.first = self.first or why[:300]
        return fallback

    def report(self, samples: int) -> None:
        """One line on stderr when any sample failed."""
        if self.count:
            print(f"evaluation: {self.what} failed on {self.count} of {samples} samples, counted as wrong "
                  f"(first: {self.first})", file=sys.stderr)


def evaluate_on(task, engine, config, world: World) -> dict[str, float]:
    """``task.evaluate`` with the same result on every rank: split over the ranks when the task's ``evaluate``
    takes a ``world`` (the built-in tasks do), else computed by rank 0 (a task of your own, or a backend that rank 0
    drives: Ray workers, a vLLM server)."""
    if world.size == 1:
        return task.evaluate(engine, config)
    if "world" in inspect.signature(task.evaluate).parameters and not getattr(engine, "remote", False):
        return task.evaluate(engine, config, world=world)
    return world.on_main(task.evaluate, engine, config)


def task_reward(task, conv: dict, completion: str) -> float:
    """``task.reward`` as a float (a None or a string raises here, inside the isolation)."""
    return float(task.reward(conv, completion))


def evaluate_task(engine, task, problems: Sequence, config, chunk: int = 64, threshold: float = 1.0,
                  world: World | None = None) -> dict[str, float]:
    """Sample ``config.samples`` completions per held-out problem and score them with the task.

    Returns ``eval/pass@k`` for each k in ``config.ks`` (unbiased estimator; a completion counts as
    correct when its reward is ≥ ``threshold``), ``eval/reward`` (mean reward per completion) and
    ``eval/mean_length`` (completion tokens). Problems go through the engine ``chunk`` at a time; problem
    p samples its group from ``group_seed(config.seed, p)``, so its samples do not depend on ``chunk``. A
    sample whose ``task.reward`` raises or is not finite gets reward 0 and never counts as correct
    (:class:`SampleFailures`), counted in ``eval/reward_failures``.

    A task with ``extra_grades`` (name → ``fn(conv, completion) -> bool``, another grader reported beside the
    task's own, e.g. a lenient one) also gets ``eval/<name>/pass@k``; a grader that raises counts the sample wrong
    there, counted in ``eval/<name>/failures``.

    Data parallel (``world``): each rank samples and scores problems rank, rank + N, ...; the per-problem
    results are gathered in problem order and every rank computes the same numbers as one process would.
    """
    world = world or World()
    params = SamplingParams(config.temperature, config.top_k, None, config.max_new_tokens)
    tok = engine.tokenizer
    failures = SampleFailures(f"the {task.name} task's reward")
    mine = world.shard(list(range(len(problems))))
    extra = getattr(task, "extra_grades", {})
    extra_failures = {name: SampleFailures(f"the {name} grader") for name in extra}
    results: list[tuple[int, list, list[int], dict]] = []  # per problem: (index, rewards (None: failed), lengths,
    # {extra grader: verdicts})
    error = None
    try:
        for start in range(0, len(mine), chunk):
            index = mine[start : start + chunk]
            convs = [task.prompt(problems[p]) for p in index]
            prompts = [tok.render_for_completion(c) for c in convs]
            batch = engine.generate(prompts, config.samples, params, seeds=[group_seed(config.seed, p) for p in index])
            lengths = batch.lengths.tolist()
            for i, (p, conv) in enumerate(zip(index, convs, strict=True)):
                rows = range(i * config.samples, (i + 1) * config.samples)
                texts = [completion_text(tok, batch, j) for j in rows]  # as the rewards read them in training
                r = [failures.call(task_reward, task, conv, t, fallback=None) for t in texts]  # None: it failed
                grades = {name: [bool(extra_failures[name].call(fn, conv, t, fallback=False)) for t in texts]
                          for name, fn in extra.items()}
                results.append((p, r, [lengths[j] for j in rows], grades))
    except Exception as err:  # noqa: BLE001 - raised on every rank just below (the others would wait for it)
        error = err
    world.raise_any(error)
    results = sorted(world.gather(results), key=lambda result: result[0])
    rewards = [0.0 if x is None else x for _, r, _, _ in results for x in r]
    correct = [[x is not None and x >= threshold for x in r] for _, r, _, _ in results]
    lengths = [n for _, _, n_s, _ in results for n in n_s]
    out = {f"eval/pass@{k}": v for k, v in mean_pass_at_k(correct, config.ks).items()}
    for name in extra:
        verdicts = [grades[name] for _, _, _, grades in results]
        out |= {f"eval/{name}/pass@{k}": v for k, v in mean_pass_at_k(verdicts, config.ks).items()}
        out[f"eval/{name}/failures"] = _gathered(extra_failures[name], world, len(rewards))
    out["eval/reward"] = sum(rewards) / len(rewards)
    out["eval/mean_length"] = sum(lengths) / len(lengths)
    out["eval/reward_failures"] = _gathered(failures, world, len(rewards))
    return out


def _gathered(failures: SampleFailures, world: World, samples: int) -> int:
    """The failures of every rank counted together, said once (by rank 0) when there are any."""
    firsts = world.gather([failures.first])
    failures.count, failures.first = int(world.sum([failures.count])[0]), next((f for f in firsts if f), None)
    if world.main:
        failures.report(samples)
    return failures.count
