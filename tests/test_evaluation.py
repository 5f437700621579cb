"""Specs for posttrain.evaluation: pass@k, maj@k and the task evaluation's sampling."""

import math
import threading

import pytest

from posttrain.config import EvalConfig
from posttrain.engine import Engine
from posttrain.evaluation import evaluate_task, maj_at_k, mean_pass_at_k, pass_at_k
from posttrain.tasks.arithmetic import ArithmeticTask


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (1, 0.4),  # 1 − (1 − 1/4)(1 − 1/5) = 1 − 0.75·0.8 = 1 − C(3,1)/C(5,1)
        (2, 0.7),  # 1 − (1 − 2/4)(1 − 2/5) = 1 − 0.5·0.6  = 1 − C(3,2)/C(5,2)
        (3, 0.9),  # 1 − (1 − 3/4)(1 − 3/5) = 1 − 0.25·0.4 = 1 − C(3,3)/C(5,3)
        (4, 1.0),  # n − c = 3 < 4: every 4-subset holds a correct sample
        (5, 1.0),
    ],
)
def test_pass_at_k_n5_c2(k, expected):
    assert pass_at_k(5, 2, k) == pytest.approx(expected)


def test_pass_at_k_edges():
    assert all(pass_at_k(10, 0, k) == 0.0 for k in range(1, 11))
    assert all(pass_at_k(10, 10, k) == 1.0 for k in range(1, 11))
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)


def test_pass_at_k_matches_binomials():
    n, c, k = 200, 37, 10
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


@pytest.mark.parametrize(("n", "c", "k"), [(5, 2, 6), (5, 6, 1), (-1, 0, 1), (5, -1, 1), (5, 2, 0)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_mean_pass_at_k():
    # problem 0: n=2, c=1 → pass@1 = 0.5, pass@2 = 1;  problem 1: n=2, c=0 → 0, 0.
    assert mean_pass_at_k([[True, False], [False, False]], [1, 2]) == {1: 0.25, 2: 0.5}
    with pytest.raises(ValueError):
        mean_pass_at_k([], [1])


def test_maj_at_k():
    answers = ["3", "4", "4", None, "3", "3"]
    assert maj_at_k(answers, "3", 3) == 0.0  # first 3: "4" ×2 beats "3" ×1
    assert maj_at_k(answers, "4", 3) == 1.0
    assert maj_at_k(answers, "3", 6) == 1.0  # "3" ×3 beats "4" ×2; None casts no vote
    assert maj_at_k(answers, "3", 100) == 1.0  # k beyond the list uses every answer


def test_maj_at_k_ties_and_no_answers():
    assert maj_at_k(["4", "3"], "4", 2) == 1.0  # tie → first occurrence wins
    assert maj_at_k(["4", "3"], "3", 2) == 0.0
    assert maj_at_k([None, "3", "4"], "3", 3) == 1.0
    assert maj_at_k([None, None], "3", 2) == 0.0
    with pytest.raises(ValueError):
        maj_at_k(["3"], "3", 0)


def test_evaluate_task_samples_do_not_depend_on_the_chunk(gpt, tok):
    """Problem p samples from group_seed(seed, p): one problem per engine call or four, same result."""
    task, engine = ArithmeticTask(test_size=5), Engine(gpt, tok)
    config = EvalConfig(problems=5, samples=3, ks=(1, 3), max_new_tokens=8)
    by_one = evaluate_task(engine, task, task.test, config, chunk=1)
    assert evaluate_task(engine, task, task.test, config, chunk=4) == by_one
    assert evaluate_task(engine, task, task.test, EvalConfig(problems=5, samples=3, ks=(1, 3), max_new_tokens=8,
                                                             seed=1), chunk=1) != by_one


class _Flaky:
    """The arithmetic task with a reward that raises on every third call and is NaN on every fifth."""

    def __init__(self, task):
        self.task, self.name, self.calls = task, task.name, 0

    def prompt(self, problem):
        return self.task.prompt(problem)

    def reward(self, conv, completion):
        self.calls += 1
        if self.calls % 3 == 0:
            raise ValueError("exceeds the limit (4300 digits) for integer string conversion")
        return float("nan") if self.calls % 5 == 0 else self.task.reward(conv, completion)


def test_a_failing_task_reward_costs_its_sample_not_the_evaluation(gpt, tok, capsys):
    task, engine = ArithmeticTask(test_size=5), Engine(gpt, tok)
    config = EvalConfig(problems=5, samples=3, ks=(1, 3), max_new_tokens=8)
    out = evaluate_task(engine, _Flaky(task), task.test, config)
    assert out["eval/reward_failures"] == 5 + 2  # calls 3, 6, 9, 12, 15 raise; 5 and 10 are NaN
    assert evaluate_task(engine, task, task.test, config)["eval/reward_failures"] == 0
    err = capsys.readouterr().err
    assert "the arithmetic task's reward failed on 7 of 15 samples, counted as wrong (first: ValueError" in err


class _Checksum:
    """The arithmetic task's prompts with a reward that is 1 for about a third of any completions."""

    def __init__(self, task):
        self.task, self.name = task, task.name

    def prompt(self, problem):
        return self.task.prompt(problem)

    def reward(self, conv, completion):
        return float(sum(map(ord, completion)) % 3 == 0)


class _ThreadRank:
    """One rank of a data-parallel evaluation simulated by a thread: ``gather`` meets the other threads."""

    def __init__(self, rank: int, size: int, barrier: threading.Barrier, box: dict):
        self.rank, self.size, self.barrier, self.box = rank, size, barrier, box

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items):
        return items[self.rank :: self.size]

    def gather(self, items):
        self.box[self.rank] = list(items)
        self.barrier.wait()
        out = [x for r in range(self.size) for x in self.box[r]]
        self.barrier.wait()  # everyone has read the box before the next gather writes it
        return out

    def sum(self, values):
        return [sum(column) for column in zip(*self.gather([values]), strict=True)]

    def raise_any(self, error):
        first = next((e for e in self.gather([error]) if e is not None), None)
        if first is not None:
            raise first


@pytest.mark.parametrize("size", [2, 3])
def test_an_evaluation_split_over_ranks_gives_the_one_process_numbers(gpt, tok, size):
    """Problems rank, rank + N, ... on each rank (5 problems: uneven shares), gathered in problem order: every
    rank gets exactly the numbers of one process."""
    task, engine = _Checksum(ArithmeticTask(test_size=5)), Engine(gpt, tok)
    config = EvalConfig(problems=5, samples=3, ks=(1, 3), max_new_tokens=8)
    alone = evaluate_task(engine, task, task.task.test, config)
    assert 0 < alone["eval/pass@1"] < 1
    barrier, box, results = threading.Barrier(size), {}, {}

    def rank(r: int) -> None:
        results[r] = evaluate_task(engine, task, task.task.test, config, chunk=2,
                                   world=_ThreadRank(r, size, barrier, box))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [results[r] for r in range(size)] == [alone] * size
