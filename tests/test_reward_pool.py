"""Specs for rewards in worker processes (posttrain.rewards.pool): what runs where, calls split by whole groups,
the same values as in the trainer's process, a timeout that holds for a hang in C code or in Python (the worker
is killed and replaced), and no process or thread left once a run ends, however it ends."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import tiny_gpt
from test_reward_calls import TINY_RL

from posttrain.checkpoint import save_checkpoint
from posttrain.config import ConfigError, RLConfig, load_config
from posttrain.metrics import read_jsonl
from posttrain.rewards import RewardSet, format_soft
from posttrain.rewards.calls import split
from posttrain.rewards.loading import load_reward, spec_of
from posttrain.rewards.pool import RewardPool
from posttrain.trainers.rl import train_rl
from posttrain.trainers.rollout import Scorer

HOSTILE = '''
import os
import re

CALLS = []  # a module-level cache: each worker has its own


def backtrack(completions, **kwargs):  # a regex stuck in C code, holding the GIL
    return [float(re.match(r"(a+)+$", "a" * 40 + "b") is not None) if c == "hang" else 1.0 for c in completions]


def spin(completions, **kwargs):  # a pure-Python hang
    while "hang" in completions:
        pass
    return [1.0] * len(completions)


def worker_pid(completions, **kwargs):
    kwargs["log_extra"]("pid", [os.getpid()] * len(completions))
    kwargs["log_metric"]("parts", 1.0)
    CALLS.append(len(completions))
    return [float(os.getpid())] * len(completions)


def calls_here(completions, **kwargs):
    return [float(len(CALLS))] * len(completions)


def picky(completions, **kwargs):
    if "bad" in completions:
        raise ValueError("bad sample")
    return [float(len(c)) for c in completions]


def crash(completions, **kwargs):
    if "hang" in completions:
        os._exit(3)
    return [1.0] * len(completions)
'''


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("rewards") / "hostile.py"
    path.write_text(HOSTILE)
    return str(path)


@pytest.fixture(scope="module")
def pool():
    with RewardPool(2) as pool:
        yield pool
    assert multiprocessing.active_children() == []


def test_what_runs_where(hostile):
    fn = load_reward(f"{hostile}:spin")
    assert spec_of("format_soft") == spec_of(format_soft) == "format_soft"  # a built-in by its name
    assert spec_of(fn) == f"{hostile}:spin"  # a function of a reward file by its path
    module_level = "posttrain.rewards.answers:final_answer"  # any module-level function of an importable module
    assert spec_of(load_reward(module_level)) == module_level
    assert spec_of(lambda completions, **kw: [0.0]) is None

    def closure(completions, **kw):
        return [0.0] * len(completions)

    assert spec_of(closure) is None
    reward_set = RewardSet({"format_soft": 1.0, fn: 1.0, closure: 1.0}, pool=RewardPool(2))
    assert reward_set.in_process == ["closure"]  # nothing started: the pool was never entered nor called
    assert RewardSet({"format_soft": 1.0}, pool=RewardPool(0)).in_process == ["format_soft"]


def test_rewards_in_the_trainers_process_are_named_once_but_the_tasks_own():
    from test_rl_loop import _Task

    def closure(completions, **kwargs):
        return [0.0] * len(completions)

    scorer = Scorer(_Task(), {"task": 1.0, "format_soft": 1.0}, 5.0, 0.0, pool=RewardPool(2))
    assert scorer.rewards.in_process == ["task"] and scorer.placement() is None  # posttrain's own, linear-time
    scorer = Scorer(_Task(), {"task": 1.0, "mine": 1.0}, 5.0, 0.0, {"mine": closure}, pool=RewardPool(2))
    assert scorer.placement() == (
        "reward 'closure' runs in the trainer's process (not loadable by name in a reward worker, or reward_workers is "
        "0): reward_timeout is best effort there (a call stuck in compiled code is not stopped)")
    assert Scorer(_Task(), {"format_soft": 1.0}, 5.0, 0.0, pool=RewardPool(2)).placement() is None


def test_split_joins_whole_units_into_parts_of_about_equal_size():
    assert split([[0], [1], [2], [3], [4], [5], [6]], 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split([[0, 1, 2], [3, 4, 5], [6, 7, 8]], 2) == [[0, 1, 2, 3, 4, 5], [6, 7, 8]]  # a group is never cut
    assert split([[0], [1]], 4) == [[0], [1]] and split([], 2) == []


def test_a_call_is_split_across_the_workers_by_whole_groups(pool, hostile):
    reward_set = RewardSet({f"{hostile}:worker_pid": 1.0}, pool=pool)
    pool.wait_ready()  # else the first ready worker may take both parts
    scores = reward_set.score([""] * 6, list("abcdef"), group_ids=[0, 0, 0, 1, 1, 1])
    pids = scores.values["worker_pid"]
    assert pids[:3] == [pids[0]] * 3 and pids[3:] == [pids[3]] * 3 and pids[0] != pids[3]
    assert {int(p) for p in pids} == set(pool.pids()) and os.getpid() not in pool.pids()
    assert [row["pid"] for row in scores.extra] == [int(p) for p in pids]  # log_extra, assembled over the parts
    assert scores.metrics["parts"] == 1.0  # log_metric: each part's value


def test_values_and_failures_are_the_same_in_the_pool_as_in_process(pool, hostile):
    weights = {"correctness": 1.0, "format_soft": 1.0, "majority_vote": 1.0, f"{hostile}:picky": 1.0}
    completions = ["#### 18", "bad", "<reasoning>r</reasoning> <answer>17</answer>", "#### 17"]
    kwargs = {"answer": ["18"] * 4, "group_ids": [0, 0, 1, 1]}
    there = RewardSet(weights, fallback=-1.0, max_failure_rate=1.0, pool=pool)
    here = RewardSet(weights, fallback=-1.0, max_failure_rate=1.0)
    got, want = there.score([""] * 4, completions, **kwargs), here.score([""] * 4, completions, **kwargs)
    assert got.values == want.values and got.metrics == want.metrics and got.totals.tolist() == want.totals.tolist()
    assert got.values["picky"] == [7.0, -1.0, 44.0, 7.0]  # the failed part was retried a sample at a time
    assert there.first_errors == here.first_errors == {"picky": "ValueError: bad sample"}


def test_inputs_that_cannot_be_sent_to_a_worker_fail_the_call_with_one_line(pool, hostile):
    reward_set = RewardSet({f"{hostile}:picky": 1.0}, fallback=-1.0, max_failure_rate=1.0, pool=pool)
    scores = reward_set.score(["", ""], ["a", "b"], group_ids=[0, 1], judge=lambda text: 0.0)  # a lambda column
    assert scores.values["picky"] == [-1.0, -1.0]
    assert reward_set.first_errors["picky"].startswith(
        "RuntimeError: its inputs cannot be sent to a reward worker: ")
    assert scores.metrics["rewards/picky/failures"] == 2.0


@pytest.mark.parametrize("name", ["backtrack", "spin"])
def test_a_hang_costs_its_timeout_and_its_worker_is_killed_and_replaced(pool, hostile, name):
    pool.wait_ready()  # the clock below measures the call, not a worker's start
    before, replaced = set(pool.pids()), pool.replaced
    reward_set = RewardSet({f"{hostile}:{name}": 1.0}, timeout_s=0.5, fallback=-1.0, max_failure_rate=1.0, pool=pool)
    start = time.perf_counter()
    scores = reward_set.score([""] * 4, ["a", "hang", "b", "c"], group_ids=[0, 0, 1, 1])
    assert time.perf_counter() - start < 0.5 + 2.0  # the timeout and a kill; a thread would wait for ~2^40 steps
    assert scores.values[name] == [-1.0, -1.0, 1.0, 1.0]  # the hung part's samples get the fallback, not retried
    assert scores.metrics[f"rewards/{name}/failures"] == 2.0
    assert reward_set.first_errors == {
        name: "RewardTimeout: timed out after 0.5 s (its worker process was killed and replaced)"}
    assert pool.replaced == replaced + 1
    gone = before - set(pool.pids())
    assert len(gone) == 1 and len(pool.pids()) == 2 and len(multiprocessing.active_children()) == 2
    with pytest.raises(ProcessLookupError):
        os.kill(gone.pop(), 0)
    assert reward_set.score([""] * 2, ["a", "b"], group_ids=[0, 1]).values[name] == [1.0, 1.0]  # the new worker


def test_a_worker_that_dies_is_replaced_and_its_samples_get_the_fallback(pool, hostile):
    reward_set = RewardSet({f"{hostile}:crash": 1.0}, fallback=-1.0, max_failure_rate=1.0, pool=pool)
    scores = reward_set.score([""] * 2, ["hang", "b"], group_ids=[0, 1])
    assert scores.values["crash"] == [-1.0, 1.0]
    assert reward_set.first_errors["crash"] == ("WorkerDied: its worker process ended during the call (exit code 3); "
                                                "a new one was started")
    assert len(pool.pids()) == 2


def test_a_worker_keeps_its_own_module_state_and_ctrl_c_during_a_call_ends_it(hostile, request):
    # a trainer's SIGINT handler is Python's default; in the whole captured suite the test waited out the 60 s
    # timeout instead (not reproduced alone or with -s), so the default handler is set here
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    with RewardPool(1) as one:
        reward_set = RewardSet({f"{hostile}:worker_pid": 1.0, f"{hostile}:calls_here": 1.0}, pool=one)
        reward_set.score(["", ""], ["a", "b"])
        assert reward_set.score(["", ""], ["a", "b"]).values["calls_here"] == [2.0, 2.0]  # two calls in that worker
        [pid] = one.pids()
        hung = RewardSet({f"{hostile}:spin": 1.0}, timeout_s=60.0, pool=one)
        # Ctrl-C while the call hangs, to the main thread (as a terminal's usually lands; os.kill may hand it to
        # any thread of the process, torch's included)
        threading.Timer(1.0, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            hung.score(["", ""], ["hang", "b"])
        assert one.pids() == []  # the worker on the interrupted call is gone at once
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_stuck_in_c_code_dies_with_a_trainer_killed_outright(hostile, tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(f"""
from posttrain.rewards import RewardPool, RewardSet
if __name__ == "__main__":
    with RewardPool(1) as pool:
        reward_set = RewardSet({{{f"{hostile}:backtrack"!r}: 1.0}}, timeout_s=600, pool=pool)
        pool.wait_ready()
        print(pool.pids()[0], flush=True)
        reward_set.score([""], ["hang"])
""")
    trainer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    worker = int(trainer.stdout.readline())
    trainer.kill()
    trainer.wait()
    for _ in range(100):  # the kernel's SIGKILL lands within moments
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(worker, signal.SIGKILL)
        raise AssertionError("the worker outlived its trainer")


def test_reward_workers_is_checked():
    assert RLConfig().reward_workers == 2
    with pytest.raises(ConfigError, match="reward_workers"):
        RLConfig(reward_workers=-1)


# --- whole runs: nothing outlives them ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy(tok, tmp_path_factory) -> str:
    return str(save_checkpoint(tmp_path_factory.mktemp("policy") / "ckpt", tiny_gpt(tok.vocab_size), tok))


def rl_config(policy: str, run_dir, rewards: str, *more: str) -> RLConfig:
    return load_config(RLConfig, None, [f"run_dir={run_dir}", f"model={policy}", *TINY_RL, f"rewards={rewards}",
                                        *more])


def test_no_process_or_thread_outlives_a_run_whose_reward_hangs(policy, tmp_path):
    children, threads = set(multiprocessing.active_children()), set(threading.enumerate())
    always = tmp_path / "always.py"
    always.write_text("def hang(completions, **kwargs):\n    while True:\n        pass\n")
    config = rl_config(policy, tmp_path / "run", f"{{task: 1.0, format_soft: 1.0, '{always}:hang': 1.0}}",
                       "steps=1", "reward_timeout=0.3", "reward_max_failure_rate=1.0")
    train_rl(config, progress=False)
    [row] = read_jsonl(tmp_path / "run/metrics.jsonl")
    assert row["rewards/hang/failures"] == 4.0 and row["rewards/format_soft/failures"] == 0.0
    assert set(multiprocessing.active_children()) == children and set(threading.enumerate()) == threads


def test_no_process_outlives_a_run_cut_short_by_ctrl_c(policy, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    children = set(multiprocessing.active_children())
    monkeypatch.setattr("posttrain.trainers.rl_rollouts.make_round", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_rl(rl_config(policy, tmp_path / "run", "{format_soft: 1.0}", "steps=1"), progress=False)
    assert set(multiprocessing.active_children()) == children
