"""The rollout half of an RL step: draw prompts, generate, score with the task, and lay the batch out
as training tensors. The engine never learns which algorithm runs; this module never computes a loss.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from posttrain.algorithms.advantages import group_stats
from posttrain.config import ConfigError
from posttrain.distributed import World
from posttrain.engine import Engine, RolloutBatch, SamplingParams, completion_text
from posttrain.prompt_sampling import TaskStream
from posttrain.random_streams import group_seed
from posttrain.rewards import RewardSet, Scores, TrainingProgress, texts
from posttrain.rewards.calls import CALL_ARGS
from posttrain.rewards.pool import RewardPool
from posttrain.rollout.base import interleave


@dataclass
class Rollout:
    """Completions of whole groups (row i answers ``convs[i // G]``) and their task rewards."""

    convs: list[dict]  # one conversation (prompt) per group
    batch: RolloutBatch  # B = len(convs) · G rows, group ids 0..len(convs)−1 in row order
    texts: list[str]  # decoded completions, (B,)
    rewards: Tensor  # (B,) task reward of each completion
    rounds: int  # generation rounds it took (1 without dynamic sampling)
    drawn: int  # rows generated over all rounds (tool counts of the batch are over these)
    first_rewards: Tensor  # task rewards of the whole first round, before any filtering: the policy's score
    frac_zero_std: float  # share of first-round rows whose group has equal rewards
    reward_metrics: dict  # rewards/<fn>/mean|std|failures of the first round
    breakdown: list[dict]  # (B,) each reward function's value for the row (None: not applicable)
    pool_ids: list[int]  # pool index of every group drawn, all rounds, dropped ones included (−1: no pool)
    success: list[float]  # each drawn group's share of completions with task reward ≥ 1, as pool_ids
    extra: list[dict]  # (B,) what the reward functions logged for the row with log_extra
    prompts_truncated: int = 0  # prompts drawn longer than the limit and cut to it (PromptLimit)
    prompts_skipped: int = 0  # prompts drawn longer than the limit and left out for another
    made_at: Tensor | None = None  # (B,) the policy step whose weights generated each row (its last segment)
    seconds: float = 0.0  # generating and scoring it took this long (all rounds)
    first_made_at: Tensor | None = None  # (B,) that of each row's first segment
    segments: Tensor | None = None  # (B,) generation segments of each row (1 without partial rollouts)
    version: int | None = None  # the oldest policy version that generated a row
    resumed: int = 0  # parked rows continued while making it (partial rollouts)
    parked: int = 0  # rows left parked after it


@dataclass(frozen=True)
class PromptLimit:
    """How long a rendered prompt may be: ``max_tokens`` (0: no limit); a longer one is cut to its last
    ``max_tokens`` tokens (``skip`` False: what TRL's left truncation keeps, the end and the generation prompt)
    or left out for another draw (``skip``)."""

    max_tokens: int = 0
    skip: bool = False


def draw_prompts(draw: Callable, rng: random.Random, task, tok, n: int, limit: PromptLimit
                 ) -> tuple[list[tuple[int, object]], list[dict], list[list[int]], int, int]:
    """``n`` prompts within ``limit``: (picked (pool index, problem), conversations, rendered ids, truncated,
    skipped). ConfigError when skipping leaves out 100 draws in a row (the data's prompts are too long)."""
    picked: list[tuple[int, object]] = []
    convs: list[dict] = []
    ids: list[list[int]] = []
    truncated = skipped = in_a_row = 0
    while len(picked) < n:
        pick = draw(rng)
        conv = task.prompt(pick[1])
        rendered = tok.render_for_completion(conv)
        if limit.max_tokens and len(rendered) > limit.max_tokens:
            if limit.skip:
                skipped, in_a_row = skipped + 1, in_a_row + 1
                if in_a_row >= 100:
                    raise ConfigError(f"100 prompts in a row were longer than max_prompt_length={limit.max_tokens} "
                                      "tokens and skipped: raise it, or use long_prompts=truncate")
                continue
            rendered, truncated = rendered[-limit.max_tokens :], truncated + 1
        in_a_row = 0
        picked.append(pick)
        convs.append(conv)
        ids.append(rendered)
    return picked, convs, ids, truncated, skipped


class Scorer:
    """The rollout's reward: a weighted :class:`RewardSet` of reward functions, called as TRL calls them
    (:mod:`posttrain.rewards.calls`). The name ``task`` stands for the task's own verifiable reward; with
    no weights given the reward is ``{"task": 1.0}``.

    ``sources`` names further reward functions built by the trainer (``reward_model``: a learned
    reward model's scorer). A conversation with ``"conversational": True`` is passed as messages: its
    prompt is ``conv["messages"]`` and its completion ``[{"role": "assistant", "content": text}]``; any
    other as text: the last message's content, and the completion decoded without its stop token.
    Columns: the task's ``columns(conv)`` (``answer``, ``extract``; a column named ``prompt``,
    ``completion`` or ``completion_ids`` is left out, as TRL leaves out the dataset's own, and one named
    as a column below is a ConfigError), ``conv``, ``group_ids``, ``lengths`` (completion tokens),
    ``completion_ids`` (the completion's ids as sampled, stop token included) and ``token_ids`` (the
    prompt's and the completion's). ``trainer_state`` is step ``step`` of ``max_steps``.

    ``on_error`` and ``max_failure_rate`` are the reward set's (:class:`RewardSet`): a function failing past
    them raises :class:`posttrain.rewards.RewardFailed` at the end of the scoring call. ``pool``: the run's
    reward worker processes (:class:`posttrain.rewards.pool.RewardPool`), where every function that can be
    loaded by name runs; ``task`` and ``reward_model`` are built here, so they run in this process.

    :meth:`solved` tells which completions the task counts as right (the prompt sampler's success): the
    reward set's own ``task`` values when it has them, else the task's reward through a second set of
    weight 0 (``checker``: isolated and timed out like any reward, its metrics not logged). A fallback of
    1 or more would pass for a right answer, so then the task is checked apart too.
    """

    OWN_COLUMNS = ("conv", "group_ids", "lengths", "completion_ids", "token_ids")
    DROPPED_COLUMNS = ("prompt", "completion", "completion_ids")  # what TRL does not pass from a dataset row

    def __init__(self, task, weights: dict[str, float], timeout_s: float, fallback: float | None,
                 sources: dict[str, object] | None = None, on_error: str = "fallback", max_failure_rate: float = 0.5,
                 max_steps: int = 0, pool: RewardPool | None = None):
        def task_reward(completions, conv, **_):
            return [task.reward(c, text) for c, text in zip(conv, texts(completions), strict=True)]

        task_reward.__name__ = "task"
        sources = {"task": task_reward, **(sources or {})}
        spec = {sources.get(name, name): w for name, w in (weights or {"task": 1.0}).items()}
        self.task, self.max_steps = task, max_steps
        self.pool = pool or RewardPool(0)  # the caller opens and closes it (train_rl: for the run)
        self.rewards = RewardSet(spec, timeout_s, fallback, on_error, max_failure_rate, self.pool)
        reuse = self.rewards.functions.get("task") is task_reward and (fallback is None or fallback < 1)
        self.checker = None if reuse else RewardSet({task_reward: 0.0}, timeout_s, None, on_error, max_failure_rate)

    def __call__(self, convs: list[dict], done: list[str], batch: RolloutBatch, step: int = 0) -> Scores:
        """The scores of row i = completion ``done[i]`` (text) of conversation ``convs[i]``, at training step
        ``step`` (0-based)."""
        prompts, completions, columns = self._inputs(convs, done, batch)
        return self.rewards.score(prompts, completions, self._progress(step), **columns)

    def solved(self, convs: list[dict], done: list[str], batch: RolloutBatch, scores: Scores,
               step: int = 0) -> list[bool]:
        """Whether each row's task reward is ≥ 1, ``scores`` being :meth:`__call__`'s for the same rows; a
        call that failed, hung or gave None counts as not solved."""
        if self.checker is None:
            values = scores.values["task"]
        else:
            prompts, completions, columns = self._inputs(convs, done, batch)
            values = self.checker.score(prompts, completions, self._progress(step), **columns).values["task"]
        return [v is not None and v >= 1 for v in values]

    def placement(self) -> str | None:
        """One line naming the functions whose timeout is best effort (they run in this process), or None. The
        task's own reward is left out: it is posttrain's code, linear in the completion's length."""
        names = [name for name in self.rewards.in_process if name != "task"]
        if not names:
            return None
        many = len(names) > 1
        return (f"reward{'s' * many} {', '.join(repr(n) for n in names)} run{'s' * (not many)} in the trainer's "
                "process (not loadable by name in a reward worker, or reward_workers is 0): reward_timeout is best "
                "effort there (a call stuck in compiled code is not stopped)")

    def failures(self, fallback: float | None) -> dict[str, str]:
        """A line for each reward function that has failed so far (with its first error), keyed to be
        printed once; ``fallback``: the value its samples got."""
        out = {name: f"reward '{name}' failed (a failed call is retried a sample at a time; samples that still fail "
                     f"get the fallback {fallback}, counted in rewards/{name}/failures), first error: {error}"
               for name, error in dict(self.rewards.first_errors).items()}  # (a copy: a queued job may add)
        if self.checker is not None and "task" in self.checker.first_errors:
            out["task (solved)"] = ("the task's reward failed while checking which completions are right for the "
                                    "prompt sampler (they count as not solved), first error: "
                                    f"{self.checker.first_errors['task']}")
        return out

    def _progress(self, step: int) -> TrainingProgress:
        return TrainingProgress(global_step=step, max_steps=self.max_steps)

    def _inputs(self, convs: list[dict], done: list[str], batch: RolloutBatch) -> tuple[list, list, dict[str, list]]:
        """(prompts, completions, columns) of the reward functions' call (see the class doc)."""
        ids = [batch.completion_tokens(i) for i in range(len(convs))]
        columns: dict[str, list] = {"conv": convs, "group_ids": batch.group_ids.tolist(),
                                    "lengths": batch.lengths.tolist(), "completion_ids": ids,
                                    "token_ids": [batch.prompt_ids[i] + c for i, c in enumerate(ids)]}
        rows = [self.task.columns(conv) for conv in convs]
        for key in dict.fromkeys(k for row in rows for k in row):  # a row without a key gets None there
            if key in self.OWN_COLUMNS + CALL_ARGS and key not in self.DROPPED_COLUMNS:
                raise ConfigError(f"the task's column '{key}' has the name of an argument the reward functions "
                                  f"get from the RL loop ({', '.join(self.OWN_COLUMNS + CALL_ARGS)}): rename it")
            if key not in self.DROPPED_COLUMNS:
                columns[key] = [row.get(key) for row in rows]
        talk = [bool(c.get("conversational")) for c in convs]
        prompts = [c["messages"] if t else c["messages"][-1]["content"] for c, t in zip(convs, talk, strict=True)]
        completions = [[{"role": "assistant", "content": x}] if t else x for x, t in zip(done, talk, strict=True)]
        return prompts, completions, columns


@dataclass
class Round:
    """One generation round: the groups of the prompts drawn, scored, and the weights that made them."""

    picked: list[tuple[int, object]]  # (pool index, problem) of each group
    convs: list[dict]  # one conversation per group
    batch: RolloutBatch  # len(convs) · G rows in group order
    texts: list[str]  # (B,) decoded completions
    scores: Scores  # the reward functions' scoring of the rows
    solved: list[bool]  # (B,) the task counts the row as right
    truncated: int = 0  # prompts cut to the limit
    skipped: int = 0  # prompts left out for another
    made_at: list[int] | None = None  # (B,) the policy step whose weights generated each row (its last segment)
    first_made_at: list[int] | None = None  # (B,) that of each row's first segment (partial rollouts: older)
    seconds: float = 0.0  # the time generating and scoring took
    version: int | None = None  # the policy version that generated it (partial rollouts: the last segments)
    segments: list[int] | None = None  # (B,) generation segments each row took (partial rollouts; None: one)
    resumed: int = 0  # parked rows continued in it (partial rollouts)
    parked: int = 0  # rows parked after it, to be continued (partial rollouts)


def draw_round(draw: Callable, rng: random.Random, task, tok, prompts: int, limit: PromptLimit
               ) -> tuple[list, list[dict], list[list[int]], int, int]:
    """The prompts of a round: :func:`draw_prompts` with ``draw`` (default: the task's stream)."""
    return draw_prompts(draw or TaskStream(task).draw, rng, task, tok, prompts, limit)


def make_round(engine: Engine, scorer: Scorer, drawn: tuple, group_size: int, sampling: SamplingParams,
               seeds: list[int], step: int, world: World, made_at: int = 0, version: int | None = None) -> Round:
    """Generate the groups of ``drawn`` (:func:`draw_round`'s) and score them at training step ``step``; the
    weights are those of policy step ``made_at`` and policy version ``version``."""
    start = time.perf_counter()
    picked, convs, ids, truncated, skipped = drawn
    batch = generate_groups(engine, ids, group_size, sampling, seeds, world)
    return scored_round(engine.tokenizer, scorer, picked, convs, batch, step, world, truncated, skipped,
                        [made_at] * len(batch.lengths), start, version)


def scored_round(tok, scorer: Scorer, picked: list, convs: list[dict], batch: RolloutBatch, step: int, world: World,
                 truncated: int, skipped: int, made_at: list[int], start: float, version: int | None,
                 **more) -> Round:
    """The :class:`Round` of whole groups ``batch`` (rows i·G … i·G + G − 1 answer ``convs[i]``), scored."""
    group_size = len(batch.lengths) // max(1, len(convs))
    done = [completion_text(tok, batch, i) for i in range(len(batch.lengths))]
    row_convs = [convs[i // group_size] for i in range(len(done))]
    if done:
        scores, solved = world.on_main(score_rows, scorer, row_convs, done, batch, step)
    else:  # (partial rollouts: no group finished in this round)
        scores, solved = Scores(torch.zeros(0), {}, {}, []), []
    return Round(picked, convs, batch, done, scores, solved, truncated, skipped, made_at,
                 more.pop("first_made_at", made_at), time.perf_counter() - start, version, **more)


def collect(
    engine: Engine,
    task,
    scorer: Scorer,
    prompt_rng: random.Random,
    prompts: int,
    group_size: int,
    sampling: SamplingParams,
    seed: int,
    step: int,
    dynamic: bool = False,
    max_rounds: int = 1,
    draw: Callable[[random.Random], tuple[int, object]] | None = None,
    limit: PromptLimit = PromptLimit(),
    world: World | None = None,
    first: Round | None = None,
    made_at: int = 0,
    run: Callable[[Callable], Round] | None = None,
) -> Rollout:
    """Generate ``group_size`` completions for ``prompts`` prompts and score them.

    Dynamic sampling (DAPO, Yu et al. 2025): groups whose rewards are all equal carry no gradient
    signal, so they are dropped and fresh prompts are drawn, round after round, until ``prompts``
    groups with signal are in hand or ``max_rounds`` rounds ran (then the step trains on what it has,
    possibly nothing; DAPO instead keeps drawing without a bound). Extra groups from the last round
    are cut. ``scorer`` gives each completion its reward.

    Prompt i of round r (both from 0) samples its group from ``group_seed(seed, step, i, r)``: ``seed`` is
    the run's seed, ``step`` the training step; a group's random numbers depend on nothing else.

    ``draw(prompt_rng)`` gives each prompt as (pool index, problem): a prompt sampler's draw (see
    posttrain/prompt_sampling.py); default a fresh ``task.train_problem(prompt_rng)`` (index −1). Every
    group drawn, kept or not, is reported in ``pool_ids`` and ``success`` for the sampler to learn from.
    ``limit``: how long a prompt may be (:func:`draw_prompts`); what it cut or left out is counted.

    ``first``: the first round, made already (the asynchronous queue generates it ahead of its step); the
    rounds after it (dynamic sampling's refills) are made now, with the weights the engine has now, and
    tagged ``made_at``; ``run(make)``, when given, makes a round (``make(world=...)``) where the engine is driven
    from (the asynchronous queue).

    Data parallel (``world``): every rank draws the same prompts and generates its share of the groups
    (:func:`generate_groups`); rank 0 scores the whole batch and sends the scores to the others (a reward that
    times out, samples or fails does so once, for every rank); the rest runs on the whole batch, the same on
    every rank.
    """
    world = world or World()
    rounds: list[Round] = []
    kept = 0
    for r in range(max_rounds if dynamic else 1):
        if r == 0 and first is not None:
            made = first
        else:
            drawn = draw_round(draw, prompt_rng, task, engine.tokenizer, prompts, limit)
            seeds = [group_seed(seed, step, i, r) for i in range(prompts)]
            make = partial(make_round, engine, scorer, drawn, group_size, sampling, seeds, step, made_at=made_at)
            made = make(world=world) if run is None else run(make)
        rounds.append(made)
        kept += sum(1 for g in range(len(made.convs)) if not (dynamic and _zero_std(made, g, group_size)))
        if kept >= prompts:
            break
    return assemble(rounds, prompts, group_size, dynamic, engine.tokenizer.pad_id)


def _zero_std(made: Round, group: int, group_size: int) -> bool:
    r = made.scores.totals[group * group_size : (group + 1) * group_size]
    return bool((r == r[0]).all())


def assemble(rounds: list[Round], prompts: int, group_size: int, dynamic: bool, pad_id: int) -> Rollout:
    """The step's :class:`Rollout` from its rounds: with ``dynamic`` only groups whose rewards differ, the first
    ``prompts`` of them; every group drawn is reported to the prompt sampler (``pool_ids``, ``success``)."""
    G = group_size
    convs: list[dict] = []
    parts: list[RolloutBatch] = []
    texts: list[str] = []
    rewards: list[Tensor] = []
    breakdown: list[dict] = []
    extra: list[dict] = []
    pool_ids: list[int] = []
    success: list[float] = []
    made_at: list[int] = []
    first_made_at: list[int] = []
    segments: list[int] = []
    kept = 0
    for made in rounds:
        r, parts_r = made.scores.totals, made.scores.rows()  # (B,), (B,)
        zero_std = group_stats(r, made.batch.group_ids).zero_std  # (B,)
        pool_ids += [i for i, _ in made.picked]
        success += group_success(made.solved, G)
        groups = [g for g in range(len(made.convs)) if not (dynamic and zero_std[g * G])]
        groups = groups[: prompts - kept] if dynamic else groups  # (partial rollouts: every group made whole)
        rows = torch.tensor([g * G + j for g in groups for j in range(G)], dtype=torch.long)
        convs += [made.convs[g] for g in groups]
        parts.append(made.batch.select(rows))
        texts += [made.texts[i] for i in rows.tolist()]
        rewards.append(r[rows])
        breakdown += [parts_r[i] for i in rows.tolist()]
        extra += [made.scores.extra[i] for i in rows.tolist()]
        made_at += [made.made_at[i] for i in rows.tolist()]
        first_made_at += [made.first_made_at[i] for i in rows.tolist()]
        segments += [made.segments[i] if made.segments else 1 for i in rows.tolist()]
        kept += len(groups)
    first = rounds[0]
    batch = RolloutBatch.concat(parts, pad_id)
    batch.group_ids = torch.arange(kept).repeat_interleave(G)  # 0..kept−1 in row order
    zero = group_stats(first.scores.totals, first.batch.group_ids).zero_std.float().mean().item() \
        if first.texts else 0.0
    return Rollout(convs, batch, texts, torch.cat(rewards), len(rounds), sum(len(m.texts) for m in rounds),
                   first.scores.totals, zero, first.scores.metrics, breakdown, pool_ids, success, extra,
                   sum(m.truncated for m in rounds), sum(m.skipped for m in rounds),
                   torch.tensor(made_at, dtype=torch.long), sum(m.seconds for m in rounds),
                   torch.tensor(first_made_at, dtype=torch.long), torch.tensor(segments, dtype=torch.long),
                   min((m.version for m in rounds if m.version is not None), default=None),
                   sum(m.resumed for m in rounds), sum(m.parked for m in rounds))


def score_rows(scorer: Scorer, convs: list[dict], completions: list[str], batch: RolloutBatch, step: int):
    """(the rows' Scores, which rows solved the task): what a rollout round needs from its rewards."""
    scores = scorer(convs, completions, batch, step)
    return scores, scorer.solved(convs, completions, batch, scores, step)


def generate_groups(engine: Engine, ids: list[list[int]], group_size: int, sampling: SamplingParams,
                    seeds: list[int], world: World) -> RolloutBatch:
    """``engine.generate`` of ``group_size`` samples for each prompt of ``ids``; under data parallelism each rank
    generates prompts rank, rank + size, ... and the ranks' rows are gathered back into prompt order, so every
    rank holds the whole batch. A group's samples come from its own seed, so they do not depend on which rank
    or batch made them. A backend that rank 0 drives (Ray workers, a vLLM server) generates the whole batch there,
    and it is broadcast."""
    if world.size == 1:
        return engine.generate(ids, group_size, sampling, seeds=seeds)
    if getattr(engine, "remote", False):
        return world.on_main(lambda: engine.generate(ids, group_size, sampling, seeds=seeds))
    mine = world.shard(list(range(len(ids))))
    local = engine.generate([ids[i] for i in mine], group_size, sampling, seeds=[seeds[i] for i in mine]) if mine \
        else RolloutBatch([], torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0), torch.zeros(0, 0),
                          torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool),
                          torch.zeros(0, dtype=torch.long))  # fewer prompts than ranks (partial rollouts)
    parts = world.gather([local])  # (host tensors) rank r's batch holds prompts r, r + size, ... in that order
    return interleave(parts, len(ids), group_size, engine.tokenizer.pad_id)


def group_success(solved: list[bool], group_size: int) -> list[float]:
    """Each group's share of solved completions (rows g·G .. g·G + G − 1 answer group g)."""
    return [sum(solved[g : g + group_size]) / group_size for g in range(0, len(solved), group_size)]


def rollout_metrics(ro: Rollout) -> dict:
    """TRL-named metrics of the rollout. ``reward``/``reward_std`` are over the first round as drawn (with
    dynamic sampling the kept groups are a biased sample; their mean is ``sampling/kept_reward``);
    ``sampling/batch_success`` is the mean group success over every group drawn, all rounds."""
    batch, first = ro.batch, ro.first_rewards
    out = {
        "sampling/rounds": ro.rounds,
        "sampling/groups": len(ro.convs),
        "data/prompts_truncated": ro.prompts_truncated,
        "data/prompts_skipped": ro.prompts_skipped,
    }
    if len(first):  # (partial rollouts: a step where no group finished has none)
        out |= {"reward": first.mean().item(), "reward_std": first.std().item() if len(first) > 1 else 0.0,
                "frac_reward_zero_std": ro.frac_zero_std, **ro.reward_metrics,
                "sampling/batch_success": sum(ro.success) / len(ro.success),
                "tools/call_frequency": batch.tool_calls / ro.drawn,
                "tools/failure_frequency": batch.tool_failures / max(1, batch.tool_calls)}
    if len(ro.rewards) == 0:
        return out
    lengths = batch.lengths.float()
    return out | {
        "sampling/kept_reward": ro.rewards.mean().item(),
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": (~batch.finished).float().mean().item(),
    }
