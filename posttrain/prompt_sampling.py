"""Which training prompts an RL step draws (Kimi k1.5, Team Kimi 2025, §2.3.4 "sampling strategies").

Every strategy draws from a finite **pool** of the task's training problems (``task.train_pool``:
arithmetic generates ``pool_size`` problems once from ``pool_seed``; gsm8k uses its train split) and
keeps, for each prompt i of the pool, the number of groups drawn for it n_i and its running success
rate s_i, where a group's success x is the share of its G completions with task reward ≥ 1:

    s_i ← s_i + (x − s_i) / min(n_i, window)        (n_i counted with this group)

i.e. the mean of the prompt's first ``window`` groups, then an exponential moving average with weight
1/window. s_i = 1 only while every completion drawn for i so far was right ("always solved"), s_i = 0
only while none was ("never solved").

Strategies (``PromptSamplingConfig.strategy``; unset: the task's ``default_sampling``, else ``uniform``), each
but ``epoch`` a draw with replacement from the rng passed in:

* ``epoch`` (the dataset task's default, as TRL and verl pass over a dataset): the pool in a fresh order
  every pass, each prompt once per pass (posttrain/epoch_order.py, seeded by ``pool_seed``); the state
  holds the pass and the position in it.

* ``uniform``: every pool prompt with probability 1/N. With ``pool_size`` 0 on a task that generates
  its problems (arithmetic) there is no pool: each draw is a fresh ``task.train_problem(rng)``,
  exactly the draws of the runs before prompt sampling existed. On gsm8k the pool is the train split
  in its order and the draw is ``rng.choice``, the same numbers as ``task.train_problem``.
* ``curriculum`` (easy → hard): the pool ordered easiest first, by the task's difficulty label
  (``curriculum_by: label``; ties by pool position) or by the measured failure rate 1 − s_i
  (``measured``; a prompt not drawn yet counts as 0.5). At training progress p = step / steps
  (0 on the first step) the easiest

      n(p) = max(1, ⌈N · (start + (1 − start) · min(1, p / end))⌉)

  prompts are eligible (f·N rounded to 9 decimals before the ceiling, so 0.3·10 gives 3) and one of
  them is drawn uniformly; from p = end on the whole pool is.
* ``priority`` (Kimi k1.5: "sample problems in proportion to 1 − s_i"): P(i) = w_i / Σ_j w_j with

      w_i = unseen_weight        n_i = 0 (never drawn)
      w_i = floor                n_i ≥ min_attempts and s_i = 0 (never solved: too hard for now)
      w_i = max(floor, 1 − s_i)  otherwise (always solved, s_i = 1, is at the floor from its first group)

  so the steps go to what the model gets wrong, and no prompt is ever left out (floor > 0).

The state (n, s and a fingerprint of the pool) is JSON and goes into the checkpoint, so a resumed run
draws the same prompts as one never interrupted.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from itertools import accumulate

from posttrain.epoch_order import EpochOrder

STRATEGIES = ("uniform", "epoch", "curriculum", "priority")
CURRICULUM_ORDERS = ("label", "measured")
UNSEEN_FAILURE = 0.5  # measured curriculum: the failure rate a prompt not drawn yet is ranked with


@dataclass
class PromptSamplingConfig:
    """Which training prompts RL draws (``RLConfig.prompt_sampling``); see posttrain/prompt_sampling.py."""

    strategy: str | None = None  # uniform | epoch (each prompt once per pass, reshuffled) | curriculum (easy → hard
    # over training) | priority (∝ 1 − success); None: the task's own (dataset: epoch, the others: uniform)
    pool_size: int = 0  # training prompts to draw from; 0: the task's own (gsm8k: the train split; arithmetic:
    # no pool, fresh problems forever, uniform only); arithmetic: N problems made once; gsm8k: N train rows
    pool_seed: int = 0  # seed of the pool (the arithmetic problems, or which gsm8k rows when pool_size > 0)
    window: int = 4  # running success rate: mean of a prompt's first `window` groups, then EMA with weight 1/window
    floor: float = 0.05  # priority: the smallest weight (always- and never-solved prompts get it)
    unseen_weight: float = 1.0  # priority: weight of a prompt not drawn yet
    min_attempts: int = 2  # priority: groups after which a never-solved prompt drops to the floor
    curriculum_by: str = "label"  # curriculum order: label (the task's difficulty) | measured (failure rate 1 − s)
    curriculum_start: float = 0.25  # curriculum: share of the pool (easiest first) eligible on the first step
    curriculum_end: float = 0.5  # curriculum: training progress (step / steps) from which the whole pool is eligible

    def __post_init__(self):
        from posttrain.config import check_choice, check_range  # here: posttrain.config imports this module

        if self.strategy is not None:
            check_choice("prompt_sampling.strategy", self.strategy, list(STRATEGIES))
        check_choice("prompt_sampling.curriculum_by", self.curriculum_by, list(CURRICULUM_ORDERS))
        check_range("prompt_sampling.pool_size", self.pool_size, 0, note=" (0: the task's own)")
        check_range("prompt_sampling.window", self.window, 1)
        check_range("prompt_sampling.floor", self.floor, 0, 1, low_open=True, note=" (every prompt keeps a chance)")
        check_range("prompt_sampling.unseen_weight", self.unseen_weight, 0, low_open=True)
        check_range("prompt_sampling.min_attempts", self.min_attempts, 1)
        check_range("prompt_sampling.curriculum_start", self.curriculum_start, 0, 1, low_open=True)
        check_range("prompt_sampling.curriculum_end", self.curriculum_end, 0, 1, low_open=True)


# --- the formulas -----------------------------------------------------------------------------


def running_success(s: float, n: int, x: float, window: int) -> float:
    """s + (x − s) / min(n, window): the prompt's rate after its n-th group (success x) was counted."""
    return s + (x - s) / min(n, window)


def priority_weights(attempts: list[int], success: list[float], floor: float, unseen_weight: float,
                     min_attempts: int) -> list[float]:
    """w_i of priority sampling (module doc): unseen_weight, floor when never solved after min_attempts
    groups, else max(floor, 1 − s_i)."""
    return [unseen_weight if n == 0 else floor if n >= min_attempts and s == 0 else max(floor, 1.0 - s)
            for n, s in zip(attempts, success, strict=True)]


def curriculum_size(progress: float, pool: int, start: float, end: float) -> int:
    """n(p) = max(1, ⌈N · (start + (1 − start) · min(1, p / end))⌉): the eligible easiest prompts."""
    share = start + (1.0 - start) * min(1.0, progress / end)
    return max(1, math.ceil(round(share * pool, 9)))


def effective_share(weights: list[float]) -> float:
    """exp(H) / N of the draw distribution P ∝ weights (H its entropy in nats): 1 when uniform over
    the pool, k / N when uniform over k prompts."""
    total = sum(weights)
    entropy = -sum(w / total * math.log(w / total) for w in weights if w > 0)
    return math.exp(entropy) / len(weights)


def pool_fingerprint(pool: list) -> str:
    """A short hash of the pool's problems (their repr, in order): a checkpoint's state fits only its pool."""
    digest = hashlib.sha256()
    for problem in pool:
        digest.update(repr(problem).encode())
    return digest.hexdigest()[:16]


# --- the samplers -----------------------------------------------------------------------------


class TaskStream:
    """No pool: each draw is a fresh ``task.train_problem(rng)`` (pool index −1). Nothing to track."""

    def __init__(self, task):
        self.task = task

    def draw(self, rng: random.Random, progress: float = 0.0) -> tuple[int, object]:
        return -1, self.task.train_problem(rng)

    def update(self, indices: list[int], successes: list[float]) -> None:
        """Nothing: a generated problem is never drawn again."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore."""

    def metrics(self, progress: float) -> dict:
        return {}


class UniformSampler:
    """Uniform draws from a finite pool, tracking every prompt's n_i and s_i (the base of the others).
    ``labels``: each pool problem's difficulty (used by the curriculum)."""

    def __init__(self, pool: list, config: PromptSamplingConfig, labels: list[float]):
        self.pool, self.config, self.labels = pool, config, labels
        self.fingerprint = pool_fingerprint(pool)
        self.attempts = [0] * len(pool)  # n_i: groups drawn for prompt i
        self.success = [0.0] * len(pool)  # s_i: running success rate (0 while n_i = 0)
        self._cache = None  # tables derived from the state (cumulative weights, order); None: to rebuild

    def weights(self, progress: float) -> list[float]:
        """Unnormalised draw probabilities of the pool's prompts at ``progress``."""
        return [1.0] * len(self.pool)

    def draw(self, rng: random.Random, progress: float = 0.0) -> tuple[int, object]:
        """(pool index, problem). ``rng.choice`` of the index: the numbers ``rng.choice(pool)`` uses."""
        i = rng.choice(range(len(self.pool)))
        return i, self.pool[i]

    def update(self, indices: list[int], successes: list[float]) -> None:
        """Count one group of prompt ``indices[k]`` with success ``successes[k]``, in order."""
        for i, x in zip(indices, successes, strict=True):
            self.attempts[i] += 1
            self.success[i] = running_success(self.success[i], self.attempts[i], x, self.config.window)
        self._cache = None

    def state_dict(self) -> dict:
        return {"pool": self.fingerprint, "attempts": list(self.attempts), "success": list(self.success)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output; ConfigError if it was made for another pool."""
        if state.get("pool") != self.fingerprint:
            from posttrain.config import ConfigError

            raise ConfigError("the checkpoint's prompt pool is not this config's (prompt_sampling.pool_size, "
                              "pool_seed or the task's data changed): resume with the settings the run started "
                              "with, or use another run_dir")
        self.attempts, self.success = list(state["attempts"]), list(state["success"])
        self._cache = None

    def metrics(self, progress: float) -> dict:
        """``sampling/...`` of the pool after the step's update: shares of the pool seen, always solved
        (s = 1) and never solved (s = 0) so far, the mean s over prompts seen, and the effective share
        exp(H)/N of the draw distribution."""
        seen = [s for n, s in zip(self.attempts, self.success, strict=True) if n > 0]
        size = len(self.pool)
        return {
            "sampling/seen": len(seen) / size,
            "sampling/mean_success": sum(seen) / len(seen) if seen else 0.0,
            "sampling/solved_share": sum(s == 1 for s in seen) / size,
            "sampling/unsolved_share": sum(s == 0 for s in seen) / size,
            "sampling/effective_share": effective_share(self.weights(progress)),
        }


class EpochSampler(UniformSampler):
    """Passes over the pool, each in a fresh seeded order (posttrain/epoch_order.py, seeded by ``pool_seed``);
    the rng passed to draw is not used."""

    def __init__(self, pool: list, config: PromptSamplingConfig, labels: list[float]):
        super().__init__(pool, config, labels)
        self.passes = EpochOrder(len(pool), config.pool_seed)

    def draw(self, rng: random.Random, progress: float = 0.0) -> tuple[int, object]:
        i = self.passes.next()
        return i, self.pool[i]

    def state_dict(self) -> dict:
        return super().state_dict() | {k: v for k, v in self.passes.state_dict().items() if k != "size"}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.passes.load_state_dict(state)

    def metrics(self, progress: float) -> dict:
        return super().metrics(progress) | {"sampling/epoch": self.passes.progress}


class CurriculumSampler(UniformSampler):
    """Easy → hard: uniform over the n(p) easiest prompts (module doc)."""

    def order(self) -> list[int]:
        """Pool indices, easiest first: by label, or by measured failure rate 1 − s (unseen: 0.5); ties
        by pool position."""
        if self._cache is None:
            if self.config.curriculum_by == "label":
                key = self.labels
            else:
                key = [1.0 - s if n > 0 else UNSEEN_FAILURE for n, s in zip(self.attempts, self.success, strict=True)]
            self._cache = sorted(range(len(self.pool)), key=lambda i: (key[i], i))
        return self._cache

    def eligible(self, progress: float) -> int:
        return curriculum_size(progress, len(self.pool), self.config.curriculum_start, self.config.curriculum_end)

    def weights(self, progress: float) -> list[float]:
        out = [0.0] * len(self.pool)
        for i in self.order()[: self.eligible(progress)]:
            out[i] = 1.0
        return out

    def draw(self, rng: random.Random, progress: float = 0.0) -> tuple[int, object]:
        i = self.order()[rng.randrange(self.eligible(progress))]
        return i, self.pool[i]

    def metrics(self, progress: float) -> dict:
        return super().metrics(progress) | {"sampling/eligible": self.eligible(progress) / len(self.pool)}


class PrioritySampler(UniformSampler):
    """Kimi k1.5 priority sampling: P(i) ∝ w_i (module doc)."""

    def weights(self, progress: float) -> list[float]:
        c = self.config
        return priority_weights(self.attempts, self.success, c.floor, c.unseen_weight, c.min_attempts)

    def draw(self, rng: random.Random, progress: float = 0.0) -> tuple[int, object]:
        """The index ``rng.choices(range(N), weights=w)`` gives (cumulative weights kept until the next update)."""
        if self._cache is None:
            self._cache = list(accumulate(self.weights(progress)))
        i = rng.choices(range(len(self.pool)), cum_weights=self._cache)[0]
        return i, self.pool[i]


SAMPLERS = {"uniform": UniformSampler, "epoch": EpochSampler, "curriculum": CurriculumSampler,
            "priority": PrioritySampler}


def make_sampler(config: PromptSamplingConfig, task):
    """The sampler ``config`` names over ``task.train_pool(pool_size, Random(pool_seed))``; a task with no
    pool (arithmetic with pool_size 0) gets :class:`TaskStream`, which only ``uniform`` can use."""
    from posttrain.config import ConfigError  # here: posttrain.config imports this module

    strategy = config.strategy or getattr(task, "default_sampling", "uniform")
    try:
        pool = task.train_pool(config.pool_size, random.Random(config.pool_seed))
    except ValueError as err:  # a pool larger than the data, or no training rows: the config's to change
        raise ConfigError(str(err)) from None
    if pool is None:
        if strategy != "uniform":
            raise ConfigError(f"prompt_sampling.strategy '{strategy}' tracks each prompt, so it needs a fixed "
                              f"pool: set prompt_sampling.pool_size (e.g. 256) for the {task.name} task")
        return TaskStream(task)
    labels = [task.difficulty(p) for p in pool] if strategy == "curriculum" else []
    return SAMPLERS[strategy](pool, config, labels)
