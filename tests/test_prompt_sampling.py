"""Specs for RL prompt sampling (uniform, curriculum, Kimi k1.5 priority): the formulas with exact values,
the tasks' pools and difficulty labels, the rollout reporting every group drawn, and tiny RL runs that
log ``sampling/...``, keep today's uniform draws and resume to the same prompts."""

from __future__ import annotations

import json
import random
import threading

import pytest
from conftest import tiny_gpt
from safetensors.torch import load_file
from test_rl_loop import _Engine, _Task, rollout_batch, scorer

from posttrain.checkpoint import save_checkpoint
from posttrain.config import ConfigError, RLConfig, load_config
from posttrain.metrics import read_jsonl
from posttrain.prompt_sampling import (
    PromptSamplingConfig,
    TaskStream,
    UniformSampler,
    curriculum_size,
    effective_share,
    make_sampler,
    priority_weights,
    running_success,
)
from posttrain.tasks.arithmetic import ArithmeticTask
from posttrain.tasks.gsm8k import GSM8KTask, Problem
from posttrain.trainers.rl import train_rl
from posttrain.trainers.rollout import Scorer, collect, group_success


class _Pool:
    """A task whose pool is given and whose difficulty label is the problem's length."""

    name = "toy"

    def __init__(self, problems: list[str] | None):
        self.problems = problems

    def train_pool(self, size, r):
        return self.problems

    def difficulty(self, problem):
        return float(len(problem))

    def train_problem(self, r):
        return f"fresh{r.randint(0, 99)}"


# --- the formulas -----------------------------------------------------------------------------------------------


def test_running_success_is_the_mean_of_the_first_window_groups_then_an_ema():
    s, history = 0.0, []
    for n, x in enumerate([1.0, 0.0, 0.5, 1.0, 0.0], start=1):
        s = running_success(s, n, x, window=3)
        history.append(s)
    # n=1..3: the plain mean (1, 1/2, 1/2); then s + (x − s)/3: 1/2 + 1/6, then 2/3 − 2/9
    assert history == pytest.approx([1.0, 0.5, 0.5, 2 / 3, 4 / 9], abs=1e-15)
    assert running_success(0.25, 7, 1.0, window=1) == 1.0  # window 1: the last group only


def test_priority_weights_on_hand_made_histories():
    attempts = [0, 1, 2, 5, 3, 4, 1]
    success = [0.0, 0.0, 0.0, 1.0, 0.25, 0.98, 0.5]
    assert priority_weights(attempts, success, floor=0.05, unseen_weight=2.0, min_attempts=2) == [
        2.0,  # unseen: its initial weight
        1.0,  # never solved, but one group is not enough to give up: 1 − 0
        0.05,  # never solved after min_attempts groups: the floor
        0.05,  # always solved: 1 − 1 = 0, lifted to the floor
        0.75,  # 1 − s
        0.05,  # 1 − 0.98 is below the floor
        0.5,
    ]


def test_priority_draws_are_rng_choices_over_the_weights():
    config = PromptSamplingConfig(strategy="priority", floor=0.1, min_attempts=1)
    sampler = make_sampler(config, _Pool(list("abcd")))
    sampler.update([0, 1, 1, 2], [1.0, 0.0, 1.0, 0.5])  # a: solved; b: 0 then 1, s = 1/2; c: 1/2; d: unseen
    assert sampler.weights(0.0) == [0.1, 0.5, 0.5, 1.0]
    rng = random.Random(3)
    drawn = [sampler.draw(rng)[0] for _ in range(50)]
    assert drawn == random.Random(3).choices(range(4), weights=[0.1, 0.5, 0.5, 1.0], k=50)
    assert sampler.metrics(0.0) == {
        "sampling/seen": 0.75, "sampling/mean_success": pytest.approx(2 / 3), "sampling/solved_share": 0.25,
        "sampling/unsolved_share": 0.0, "sampling/effective_share": pytest.approx(effective_share([1, 5, 5, 10]))}


@pytest.mark.parametrize(("progress", "eligible"), [(0.0, 2), (0.125, 4), (0.25, 6), (0.5, 10), (0.9, 10)])
def test_curriculum_size_opens_from_start_to_the_whole_pool_at_end(progress, eligible):
    # n(p) = max(1, ⌈N (start + (1 − start) min(1, p / end))⌉), N = 10, start 0.2, end 0.5
    assert curriculum_size(progress, 10, start=0.2, end=0.5) == eligible


def test_curriculum_size_rounds_before_the_ceiling_and_never_reaches_zero():
    assert curriculum_size(0.0, 10, start=0.3, end=1.0) == 3  # 0.3 · 10 = 3.0000000000000004 in floats
    assert curriculum_size(0.0, 3, start=0.01, end=1.0) == 1


def test_effective_share_is_one_for_uniform_and_k_over_n_for_k_equal_prompts():
    assert effective_share([1.0] * 8) == pytest.approx(1.0)
    assert effective_share([0, 3, 0, 3]) == pytest.approx(0.5)


# --- the samplers over a pool -----------------------------------------------------------------------------------


def test_curriculum_by_label_draws_only_the_easiest_eligible_prompts():
    pool = ["ccc", "a", "bb", "dddd", "e", "ff", "ggg", "h"]  # labels 3 1 2 4 1 2 3 1
    sampler = make_sampler(PromptSamplingConfig(strategy="curriculum", curriculum_start=0.25, curriculum_end=0.5),
                           _Pool(pool))
    assert sampler.order() == [1, 4, 7, 2, 5, 0, 6, 3]  # by label, ties by pool position
    rng = random.Random(0)
    assert {sampler.draw(rng, progress=0.0)[1] for _ in range(100)} == {"a", "e"}  # ⌈8 · 0.25⌉ = 2
    assert {sampler.draw(rng, progress=0.25)[1] for _ in range(200)} == {"a", "e", "h", "bb", "ff"}  # ⌈8 · 0.625⌉
    assert {sampler.draw(rng, progress=0.5)[1] for _ in range(400)} == set(pool)
    assert sampler.metrics(0.25)["sampling/eligible"] == 5 / 8
    assert sampler.metrics(0.25)["sampling/effective_share"] == pytest.approx(5 / 8)


def test_curriculum_by_measured_failure_ranks_unseen_prompts_at_one_half():
    config = PromptSamplingConfig(strategy="curriculum", curriculum_by="measured")
    sampler = make_sampler(config, _Pool(["p0", "p1", "p2", "p3", "p4"]))
    sampler.update([0, 1, 3], [0.0, 1.0, 0.75])  # failure 1, 0, 0.25; p2 and p4 unseen: 0.5
    assert sampler.order() == [1, 3, 2, 4, 0]
    sampler.update([0], [1.0])  # p0: (0 + 1) / 2 → failure 0.5, tied with the unseen, first by position
    assert sampler.order() == [1, 3, 0, 2, 4]


def test_uniform_over_a_gsm8k_train_split_draws_what_train_problem_draws():
    train = [Problem(f"q{i}", f"a <<{i}+1={i + 1}>>", str(i + 1)) for i in range(7)]
    task = GSM8KTask(train, [Problem("t", "", "1")])
    sampler = make_sampler(PromptSamplingConfig(), task)
    assert isinstance(sampler, UniformSampler) and sampler.pool == train
    r1, r2 = random.Random(11), random.Random(11)
    assert [sampler.draw(r1)[1] for _ in range(40)] == [task.train_problem(r2) for _ in range(40)]


def test_uniform_without_a_pool_is_the_task_stream():
    task = ArithmeticTask(test_size=8)
    sampler = make_sampler(PromptSamplingConfig(), task)
    assert isinstance(sampler, TaskStream) and sampler.metrics(0.0) == {} and sampler.state_dict() == {}
    r1, r2 = random.Random(5), random.Random(5)
    assert [sampler.draw(r1) for _ in range(20)] == [(-1, task.train_problem(r2)) for _ in range(20)]


def test_strategies_that_track_prompts_need_a_pool():
    with pytest.raises(ConfigError, match=r"strategy 'priority' tracks each prompt, so it needs a fixed pool: set "
                                          r"prompt_sampling.pool_size \(e.g. 256\) for the arithmetic task"):
        make_sampler(PromptSamplingConfig(strategy="priority"), ArithmeticTask(test_size=8))
    small = GSM8KTask([Problem("q", "", "1")], [])
    with pytest.raises(ConfigError, match=r"^prompt_sampling.pool_size=2 is larger than the gsm8k train split "
                                          r"\(1 rows\)$"):
        make_sampler(PromptSamplingConfig(pool_size=2), small)


def test_state_round_trips_through_json_and_fits_only_its_pool():
    config = PromptSamplingConfig(strategy="priority", window=2)
    a = make_sampler(config, _Pool(list("abcdef")))
    a.update([0, 2, 2, 5], [0.5, 1.0, 0.0, 0.25])
    state = json.loads(json.dumps(a.state_dict()))
    b = make_sampler(config, _Pool(list("abcdef")))
    fresh = [b.draw(random.Random(1))[0] for _ in range(30)]
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict() and b.weights(0.0) == a.weights(0.0)
    ra, rb = random.Random(1), random.Random(1)
    drawn = [a.draw(ra)[0] for _ in range(30)]
    assert drawn == [b.draw(rb)[0] for _ in range(30)] and drawn != fresh  # the state decides the draws
    with pytest.raises(ConfigError, match="the checkpoint's prompt pool is not this config's"):
        make_sampler(config, _Pool(list("abcdeg"))).load_state_dict(state)


def test_config_checks_name_the_key():
    with pytest.raises(ConfigError, match=r"'prompt_sampling.strategy' has unknown value 'priorty' \(did you mean "
                                          r"'priority'\?\)"):
        load_config(RLConfig, None, ["prompt_sampling.strategy=priorty"])
    with pytest.raises(ConfigError, match=r"'prompt_sampling.floor' must be in \(0, 1\] \(every prompt keeps a "
                                          r"chance\), got 0.0"):
        load_config(RLConfig, None, ["prompt_sampling.floor=0"])
    config = load_config(RLConfig, None, ["prompt_sampling=curriculum", "prompt_sampling.pool_size=64"])
    assert (config.prompt_sampling.strategy, config.prompt_sampling.pool_size) == ("curriculum", 64)


# --- the tasks' pools and labels --------------------------------------------------------------------------------


def test_arithmetic_pool_is_distinct_training_problems_fixed_by_its_seed():
    task = ArithmeticTask(test_size=64)
    pool = task.train_pool(50, random.Random(0))
    assert len({p.question for p in pool}) == 50 and not {p.question for p in pool} & {p.question for p in task.test}
    assert pool == task.train_pool(50, random.Random(0)) != task.train_pool(50, random.Random(1))
    assert task.train_pool(0, random.Random(0)) is None
    assert {task.difficulty(p) for p in pool} == {2.0, 3.0}
    assert all(task.difficulty(p) == 3.0 for p in pool if "legs" in p.question)  # the farm: 3 calculator steps


def test_gsm8k_pool_is_the_train_split_or_a_seeded_subset_and_its_label_counts_annotations():
    train = [Problem(f"q{i}", "x", "1") for i in range(10)]
    task = GSM8KTask(train, [])
    assert task.train_pool(0, random.Random(0)) == train
    subset = task.train_pool(4, random.Random(2))
    assert len(subset) == 4 and subset == sorted(subset, key=train.index) == task.train_pool(4, random.Random(2))
    assert task.difficulty(Problem("q", "2 * 3 = <<2*3=6>>6 and 6 + 1 = <<6+1=7>>7", "7")) == 2.0
    assert task.difficulty(Problem("q", "no calculator", "7")) == 0.0


# --- the rollout ------------------------------------------------------------------------------------------------


def test_dynamic_sampling_reports_every_group_drawn_to_the_sampler():
    sampler = UniformSampler(list(range(10)), PromptSamplingConfig(), [])  # the toy task's problems 0..9
    ro = collect(_Engine(), _Task(), scorer(_Task()), random.Random(1), prompts=4, group_size=3, sampling=None,
                 seed=0, step=0, dynamic=True, max_rounds=10, draw=sampler.draw)
    assert ro.rounds > 1 and len(ro.pool_ids) == ro.rounds * 4
    # even problems: sample 0 of 3 is right; odd ones (dropped: zero variance) are reported too, with 0
    assert ro.success == [1 / 3 if i % 2 == 0 else 0.0 for i in ro.pool_ids]
    assert [c["p"] for c in ro.convs] == [i for i in ro.pool_ids if i % 2 == 0][:4]


class _Counted(_Task):
    """The toy task counting its reward calls, raising or hanging on demand."""

    def __init__(self, fail: str = ""):
        self.calls, self.fail = 0, fail

    def reward(self, conv, text):
        self.calls += 1
        if self.fail == "raise":
            raise RuntimeError("grader down")
        if self.fail == "hang":
            threading.Event().wait(5.0)
        return super().reward(conv, text)


def solved_rows(task, weights, fallback=0.0, timeout_s=5.0):
    """Scorer.solved on four rows: problems 4 and 3, samples '[1]' and '[2]' (only 4's '[1]' is right)."""
    s = Scorer(task, weights, timeout_s, fallback, max_failure_rate=1.0)  # failures never stop these
    convs = [task.prompt(4), task.prompt(4), task.prompt(3), task.prompt(3)]
    batch = rollout_batch([[5], [4]], [[1, 99], [2, 99], [1, 99], [2, 99]], 2)
    texts = ["[1]", "[2]", "[1]", "[2]"]
    scores = s(convs, texts, batch)
    return s, s.solved(convs, texts, batch, scores), scores.metrics


def test_solved_reuses_the_task_reward_of_the_reward_set():
    task = _Counted()
    s, solved, _ = solved_rows(task, {"task": 1.0})
    assert solved == [True, False, False, False] and task.calls == 4  # one call per completion, not two
    assert s.checker is None and group_success(solved, 2) == [0.5, 0.0]


def test_solved_checks_the_task_apart_with_weight_zero_when_it_is_no_reward():
    task = _Counted()
    _, solved, metrics = solved_rows(task, {"format_soft": 1.0})
    assert solved == [True, False, False, False] and task.calls == 4
    assert not any(k.startswith("rewards/task/") for k in metrics)  # the check logs nothing


@pytest.mark.parametrize(("fail", "weights", "fallback"), [
    ("raise", {"format_soft": 1.0}, 0.0),
    ("raise", {"task": 1.0}, 1.0),  # the fallback 1 must not pass for a right answer
    ("hang", {"format_soft": 1.0}, 0.0),
])
def test_a_failing_or_hanging_task_reward_counts_as_not_solved(fail, weights, fallback):
    s, solved, _ = solved_rows(_Counted(fail), weights, fallback, timeout_s=0.2)
    assert solved == [False] * 4
    error = "RewardTimeout: timed out after 0.2 s" if fail == "hang" else "RuntimeError: grader down"
    assert s.failures(fallback)["task (solved)"] == (
        "the task's reward failed while checking which completions are right for the prompt sampler (they count "
        f"as not solved), first error: {error}")


# --- tiny RL runs -----------------------------------------------------------------------------------------------

TINY_RL = ["algorithm=dr_grpo", "steps=4", "prompts_per_step=2", "samples_per_prompt=2", "save_every=2",
           "eval_before=false", "eval.every=0", "eval.problems=2", "eval.samples=2", "eval.ks=[1,2]",
           "eval.max_new_tokens=8", "sampling.max_new_tokens=8", "task.test_size=8", "optim.warmup_steps=1",
           "log_samples_every=1"]
POOL = ["prompt_sampling.pool_size=8"]
VOLATILE = ("timing_s/", "throughput/")


@pytest.fixture(scope="module")
def policy(tok, tmp_path_factory) -> str:
    """A tiny random GPT saved as a built-in checkpoint (it solves nothing: every group's success is 0)."""
    return str(save_checkpoint(tmp_path_factory.mktemp("policy") / "ckpt", tiny_gpt(tok.vocab_size), tok))


class _Graded(ArithmeticTask):
    """The arithmetic task with ``grade(completion)`` as the reward of training prompts (the test problems keep
    the real one: the final evaluation calls ``task.reward`` itself)."""

    def __init__(self, grade):
        super().__init__(test_size=8)
        self.grade, self.tests = grade, {p.question for p in self.test}

    def reward(self, conv, completion):
        if conv["messages"][0]["content"] in self.tests:
            return super().reward(conv, completion)
        return self.grade(completion)


def grader_down(completion):
    raise RuntimeError("grader down")


def even_length(completion):
    """Right when the completion has an even number of characters: about half of a random policy's."""
    return float(len(completion) % 2 == 0)


def rl(policy: str, run_dir, *extra: str) -> list[dict]:
    train_rl(load_config(RLConfig, None, [f"run_dir={run_dir}", f"model={policy}", *TINY_RL, *extra]), progress=False)
    return read_jsonl(run_dir / "metrics.jsonl")


def test_default_uniform_run_draws_the_task_stream_as_before(policy, tmp_path):
    rows = rl(policy, tmp_path)
    task, r = ArithmeticTask(test_size=8), random.Random(0)  # the prompt rng is Random(seed)
    expected = [task.prompt(task.train_problem(r))["messages"][0]["content"] for _ in range(4 * 2)]
    assert [s["prompt"] for s in read_jsonl(tmp_path / "samples.jsonl")] == expected
    assert all(row["sampling/batch_success"] == 0.0 and "sampling/seen" not in row for row in rows)
    assert json.loads((tmp_path / "checkpoints/final/trainer_state.json").read_text())["extra"]["prompt_sampling"] == {}


def test_curriculum_run_logs_the_eligible_share_opening_up(policy, tmp_path):
    rows = rl(policy, tmp_path, *POOL, "prompt_sampling.strategy=curriculum")
    # N = 8, start 0.25, end 0.5: p = 0, 1/4, 1/2, 3/4 → ⌈2⌉, ⌈5⌉, 8, 8 prompts
    assert [row["sampling/eligible"] for row in rows] == [0.25, 0.625, 1.0, 1.0]
    sampler = make_sampler(load_config(RLConfig, tmp_path / "config.yaml").prompt_sampling, ArithmeticTask(8))
    first = {sampler.pool[i].question for i in sampler.order()[:2]}
    assert {s["prompt"] for s in read_jsonl(tmp_path / "samples.jsonl") if s["step"] == 1} <= first


def test_a_task_reward_that_raises_does_not_end_a_priority_run(policy, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("posttrain.trainers.rl.make_task", lambda config: _Graded(grader_down))
    rows = rl(policy, tmp_path, *POOL, "prompt_sampling.strategy=priority", "rewards.format_soft=1.0", "steps=2",
              "reward_max_failure_rate=1")  # (the default 0.5 stops the run: tests/test_reward_calls.py)
    assert [(r["step"], r["sampling/batch_success"]) for r in rows] == [(1, 0.0), (2, 0.0)]  # failed: not solved
    state = json.loads((tmp_path / "checkpoints/final/trainer_state.json").read_text())["extra"]["prompt_sampling"]
    assert sum(state["attempts"]) == 2 * 2 and set(state["success"]) == {0.0}
    notice = ("the task's reward failed while checking which completions are right for the prompt sampler (they "
              "count as not solved), first error: RuntimeError: grader down")
    assert " ".join(capsys.readouterr().out.split()).count(notice) == 1


def test_priority_run_resumed_mid_way_draws_the_same_prompts(policy, tmp_path, monkeypatch):
    monkeypatch.setattr("posttrain.trainers.rl.make_task", lambda config: _Graded(even_length))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    rows = rl(policy, straight, *POOL, "prompt_sampling.strategy=priority")
    state = json.loads((straight / "checkpoints/step_000002/trainer_state.json").read_text())["extra"]
    assert sum(state["prompt_sampling"]["attempts"]) == 2 * 2  # two steps of two prompts learned
    assert 0 < max(state["prompt_sampling"]["success"])  # some prompts solved: a running success to resume
    rl(policy, resumed, *POOL, "prompt_sampling.strategy=priority", f"resume={straight}/checkpoints/step_000002")

    def stable(path, name):
        return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in read_jsonl(path / name)
                if r["step"] > 2]

    assert stable(straight, "samples.jsonl") == stable(resumed, "samples.jsonl") != []  # the same prompts drawn
    assert stable(straight, "metrics.jsonl") == stable(resumed, "metrics.jsonl")
    final = [json.loads((d / "checkpoints/final/trainer_state.json").read_text())["extra"]["prompt_sampling"]
             for d in (straight, resumed)]
    assert final[0] == final[1] and sum(final[0]["attempts"]) == 4 * 2
    assert any(0 < s < 1 for s in final[0]["success"]) and 0 < rows[-1]["sampling/mean_success"] < 1
    assert any(0 < r["sampling/batch_success"] for r in rows if r["step"] > 2)  # solved after the resume too
    a, b = (load_file(d / "checkpoints/final/model.safetensors") for d in (straight, resumed))
    assert all(a[k].equal(b[k]) for k in a)
    for key in ("sampling/batch_success", "sampling/seen", "sampling/mean_success", "sampling/solved_share",
                "sampling/unsolved_share", "sampling/effective_share"):
        assert all(key in row for row in rows), key
    assert rows[-1]["sampling/seen"] == sum(n > 0 for n in final[0]["attempts"]) / 8
