"""Specs for how reward functions are called (TRL 1.16's keyword call), checked and isolated, the failure
policy (reward_on_error, reward_max_failure_rate: RewardFailed, exit 6), rewards named by file or module
path, and those specs checked before the model loads; the last tests go through real tiny RL runs."""

from __future__ import annotations

import asyncio
import sys
import threading
import time

import pytest
from conftest import tiny_gpt
from test_rl_loop import _Task, rollout_batch
from typer.testing import CliRunner

from posttrain.checkpoint import save_checkpoint
from posttrain.cli import app
from posttrain.config import ConfigError, RLConfig, load_config
from posttrain.metrics import read_jsonl
from posttrain.rewards import (
    RewardFailed,
    RewardSet,
    TrainingProgress,
    check_reward_specs,
    group_reward,
    load_reward,
)
from posttrain.rewards.calls import check_result
from posttrain.trainers.rl import train_rl
from posttrain.trainers.rollout import Scorer

# --- the call --------------------------------------------------------------------------------------------------


def four_rows(task, conversational: bool = False):
    """Problems 4, 4, 3, 3 answered '[1]', '[2]', '[1]', '[2]' (token 1 or 2, then the stop token 99)."""
    convs = [task.prompt(p) | ({"conversational": True} if conversational else {}) for p in (4, 4, 3, 3)]
    batch = rollout_batch([[5], [4]], [[1, 99], [2, 99], [1, 99], [2, 99]], 2)
    return convs, ["[1]", "[2]", "[1]", "[2]"], batch


def test_a_function_written_for_trl_gets_keyword_arguments_and_every_column():
    seen = {}

    def trl_style(completions, **kwargs):  # TRL's documented minimal signature
        seen.update(kwargs, completions=completions)
        return [float(len(c)) for c in completions]

    def with_answer(prompts, completions, answer, **kw):
        return [float(a == p) for p, a in zip(prompts, answer, strict=True)]

    task = _Task()
    s = Scorer(task, {trl_style: 1.0, with_answer: 10.0}, timeout_s=5.0, fallback=0.0, max_steps=10)
    scores = s(*four_rows(task), step=3)
    assert scores.totals.tolist() == [3.0 + 10, 3.0 + 10, 3.0 + 10, 3.0 + 10]  # len('[1]'); prompt '4' = answer '4'
    assert set(seen) == {"prompts", "completions", "completion_ids", "answer", "conv", "group_ids", "lengths",
                         "token_ids", "trainer_state", "log_extra", "log_metric"}
    assert seen["prompts"] == ["4", "4", "3", "3"] and seen["completions"] == ["[1]", "[2]", "[1]", "[2]"]
    assert seen["completion_ids"] == [[1, 99], [2, 99], [1, 99], [2, 99]]  # as sampled, stop token included
    assert seen["token_ids"] == [[5, 1, 99], [5, 2, 99], [4, 1, 99], [4, 2, 99]]
    assert seen["answer"] == ["4", "4", "3", "3"] and seen["group_ids"] == [0, 0, 1, 1]
    assert seen["trainer_state"] == TrainingProgress(global_step=3, max_steps=10)
    assert scores.metrics["rewards/trl_style/failures"] == 0.0 and s.rewards.first_errors == {}


def test_conversational_prompts_and_completions_are_messages_and_the_built_ins_read_them():
    seen = {}

    def look(prompts, completions, **kw):
        seen.update(prompts=prompts, completions=completions)
        return [0.0] * len(completions)

    task = _Task()
    weights = {"task": 1.0, "correctness": 1.0, "format_soft": 1.0, look: 1.0}
    plain = Scorer(task, weights, 5.0, 0.0)(*four_rows(task))
    talk = Scorer(task, weights, 5.0, 0.0)(*four_rows(task, conversational=True))
    assert seen["prompts"][0] == [{"role": "user", "content": "4"}]
    assert seen["completions"][0] == [{"role": "assistant", "content": "[1]"}]
    assert talk.rows() == plain.rows() and talk.totals.tolist() == plain.totals.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_trainer_state_log_extra_and_log_metric():
    def logs(completions, trainer_state, log_extra, log_metric, **kw):
        log_extra("progress", [f"{trainer_state.global_step}/{trainer_state.max_steps}"] * len(completions))
        log_metric("judge/calls", 2.0)
        return [1.0] * len(completions)

    def logs_too(completions, log_metric, **kw):
        log_metric("judge/calls", 4.0)
        return [None] * len(completions)

    scores = RewardSet({logs: 1.0, logs_too: 1.0}).score(["p", "q"], ["a", "b"], TrainingProgress(2, 5))
    assert scores.extra == [{"progress": "2/5"}, {"progress": "2/5"}]
    assert scores.metrics["judge/calls"] == 3.0  # the mean of the step's values


def test_a_per_group_reward_logs_its_groups_values():
    @group_reward
    def rank(prompt, completions, log_extra, **kw):
        order = sorted(completions)
        log_extra("rank", [order.index(c) for c in completions])
        return [0.0] * len(completions)

    scores = RewardSet({rank: 1.0}).score([""] * 4, ["b", "a", "d", "c"], group_ids=[0, 0, 1, 1])
    assert scores.extra == [{"rank": 1}, {"rank": 0}, {"rank": 1}, {"rank": 0}]


def test_an_async_reward_is_awaited():
    async def judge(prompts, completions, **kw):
        await asyncio.sleep(0)
        return [float(c == "yes") for c in completions]

    totals, metrics = RewardSet({judge: 1.0})(["p", "p"], ["yes", "no"])
    assert totals.tolist() == [1.0, 0.0] and metrics["rewards/judge/failures"] == 0.0


@pytest.mark.parametrize(("raw", "message"), [
    (3.0, "reward 'f' returned float, not a list with one number per completion"),
    ("ab", "reward 'f' returned str, not a list with one number per completion"),
    ({"a": 1, "b": 2}, "reward 'f' returned dict, not a list with one number per completion"),
    ([1.0], "reward 'f' returned 1 values for 2 completions (one per completion)"),
    ([1.0, "2"], "reward 'f' returned '2' (str) for completion 1, not a number or None"),
    ([[1.0], 2.0], "reward 'f' returned [1.0] (list) for completion 0, not a number or None"),
])
def test_a_wrong_result_is_an_error_naming_the_function(raw, message):
    with pytest.raises(ValueError) as err:
        check_result("f", raw, 2)
    assert str(err.value) == message


def test_a_right_result_may_be_any_sequence_of_numbers_and_none():
    torch = pytest.importorskip("torch")
    assert check_result("f", (1, None), 2) == [1.0, None]
    assert check_result("f", torch.tensor([0.5, 2.0]), 2) == [0.5, 2.0]
    got = check_result("f", [float("nan"), True], 2)  # NaN is kept here: the caller gives that sample the fallback
    assert got[0] != got[0] and got[1] == 1.0


# --- isolation --------------------------------------------------------------------------------------------------


def test_a_batch_that_fails_is_retried_a_sample_at_a_time():
    calls = []

    def picky(completions, **kw):
        calls.append(len(completions))
        if "bad" in completions:
            raise KeyError("bad")
        return [float(len(c)) for c in completions]

    reward_set = RewardSet({picky: 1.0}, fallback=-1.0)
    totals, metrics = reward_set([""] * 4, ["a", "bad", "ccc", "dd"])
    assert totals.tolist() == [1.0, -1.0, 3.0, 2.0] and metrics["rewards/picky/failures"] == 1.0
    assert calls == [4, 1, 1, 1, 1] and reward_set.first_errors == {"picky": "KeyError: 'bad'"}


def test_a_per_group_reward_is_retried_a_group_at_a_time():
    @group_reward
    def same_as_first(prompt, completions, **kw):
        if "bad" in completions:
            raise ValueError("bad group")
        return [float(c == completions[0]) for c in completions]

    totals, metrics = RewardSet({same_as_first: 1.0}, fallback=-1.0, max_failure_rate=1.0)(
        [""] * 5, ["x", "x", "y", "bad", "y"], group_ids=[0, 0, 1, 1, 1])
    assert totals.tolist() == [1.0, 1.0, -1.0, -1.0, -1.0]  # group 1 fails as a whole; group 0 keeps its values
    assert metrics["rewards/same_as_first/failures"] == 3.0


def test_the_retries_after_a_failed_batch_share_one_more_timeout():
    release = threading.Event()

    def fails_then_hangs(completions, **kw):
        if len(completions) > 1:
            raise RuntimeError("batch too big")
        release.wait(10)
        return [1.0]

    reward_set = RewardSet({fails_then_hangs: 1.0}, timeout_s=0.2, max_failure_rate=1.0)
    try:
        start = time.perf_counter()
        _, metrics = reward_set([""] * 5, list("abcde"))
        assert time.perf_counter() - start < 0.8  # not 5 timeouts: the first retry used up the one left
        assert metrics["rewards/fails_then_hangs/failures"] == 5.0
        assert reward_set.first_errors == {"fails_then_hangs": "RuntimeError: batch too big"}
    finally:
        release.set()


def test_a_signature_that_does_not_fit_the_call_fails_with_the_arguments_named():
    def old_style(prompt, completion):
        return [1.0]

    reward_set = RewardSet({old_style: 1.0}, max_failure_rate=1.0)
    reward_set(["p"], ["c"])
    assert reward_set.first_errors["old_style"] == (
        "TypeError: reward 'old_style' does not fit TRL's keyword call: missing a required argument: 'prompt' (it "
        "is called as old_style(prompts=, completions=, trainer_state=, log_extra=, log_metric=))")


def test_log_extra_needs_one_value_per_completion():
    def short_log(completions, log_extra, **kw):
        log_extra("note", ["only one"])
        return [1.0] * len(completions)

    reward_set = RewardSet({short_log: 1.0}, max_failure_rate=1.0)
    scores = reward_set.score(["", ""], ["a", "b"])
    assert scores.values["short_log"] == [1.0, 1.0] and scores.extra == [{"note": "only one"}] * 2  # one at a time
    assert reward_set.first_errors["short_log"] == "ValueError: log_extra('note', ...) got 1 values for 2 completions"


# --- the failure policy ---------------------------------------------------------------------------------------


def half_broken(completions, **kw):
    """Fails on every completion holding 'x'."""
    if any("x" in c for c in completions):
        raise ValueError("x")
    return [1.0] * len(completions)


def test_more_failures_than_the_rate_stop_at_the_end_of_the_call():
    seen = []

    def after(completions, **kw):
        seen.append(len(completions))
        return [0.0] * len(completions)

    RewardSet({half_broken: 1.0}, max_failure_rate=0.5)([""] * 4, ["x", "x", "a", "b"])  # 2 of 4: not more
    with pytest.raises(RewardFailed) as err:
        RewardSet({half_broken: 1.0, after: 1.0}, max_failure_rate=0.5)([""] * 4, ["x", "x", "x", "b"])
    assert str(err.value) == ("reward 'half_broken' failed on 3 of 4 samples (more than reward_max_failure_rate "
                              "0.5), first error: ValueError: x")
    assert seen == [4]  # every function ran before the stop


def test_raise_stops_at_the_first_failure_chained_to_its_cause():
    with pytest.raises(RewardFailed) as err:
        RewardSet({half_broken: 1.0}, on_error="raise")([""] * 4, ["x", "a", "b", "c"])
    assert str(err.value) == "reward 'half_broken' failed (reward_on_error: raise): ValueError: x"
    assert isinstance(err.value.__cause__, ValueError)

    def nan(completions, **kw):
        return [1.0, float("nan")]

    with pytest.raises(RewardFailed, match=r"^reward 'nan' failed \(reward_on_error: raise\): reward 'nan' "
                                           r"returned nan for completion 1$"):
        RewardSet({nan: 1.0}, on_error="raise")(["", ""], ["a", "b"])


def test_failure_policy_config_keys_are_checked():
    assert RLConfig().reward_on_error == "fallback" and RLConfig().reward_max_failure_rate == 0.5
    with pytest.raises(ConfigError, match="config key 'reward_on_error' has unknown value 'rasie' \\(did you mean "
                                          "'raise'\\?\\)"):
        load_config(RLConfig, None, ["reward_on_error=rasie"])
    with pytest.raises(ConfigError, match=r"config key 'reward_max_failure_rate' must be in \[0, 1\], got 1.5"):
        load_config(RLConfig, None, ["reward_max_failure_rate=1.5"])


def test_the_task_columns_may_not_hide_the_loops_own_and_prompt_completion_are_left_out():
    class Columns(_Task):
        def __init__(self, extra):
            self.extra = extra

        def columns(self, conv):
            return {"answer": str(conv["p"]), **self.extra}

    seen = {}

    def look(completions, **kw):
        seen.update(kw)
        return [0.0] * len(completions)

    task = Columns({"prompt": "the row's prompt", "completion": "the row's answer", "level": 2})
    Scorer(task, {look: 1.0}, 5.0, 0.0)(*four_rows(task))
    assert "prompt" not in seen and "completion" not in seen and seen["level"] == [2] * 4
    task = Columns({"lengths": 3})
    with pytest.raises(ConfigError, match="the task's column 'lengths' has the name of an argument the reward "
                                          "functions get from the RL loop"):
        Scorer(task, {look: 1.0}, 5.0, 0.0)(*four_rows(task))


# --- rewards by path ----------------------------------------------------------------------------------------


BREVITY = "def brevity(completions, **kwargs):\n    return [-float(len(c)) for c in completions]\nLIMIT = 3\n"


def test_a_reward_by_file_path_relative_or_absolute(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.py").write_text(BREVITY)
    monkeypatch.chdir(tmp_path)
    fn = load_reward("sub/mine.py:brevity")
    assert fn(completions=["abc"]) == [-3.0]
    assert load_reward("./sub/mine.py:brevity") is fn  # the file is loaded once
    assert load_reward(f"{tmp_path}/sub/mine.py:brevity") is fn
    assert RewardSet({"./sub/mine.py:brevity": 1.0}).functions == {"brevity": fn}


def test_a_module_in_the_working_directory_needs_no_pythonpath(tmp_path, monkeypatch):
    (tmp_path / "cwd_rewards_7f3a.py").write_text(BREVITY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    assert load_reward("cwd_rewards_7f3a:brevity")(completions=["ab"]) == [-2.0]


@pytest.mark.parametrize(("spec", "message"), [
    ("./nope.py:f", "cannot load reward './nope.py:f': no file {cwd}/nope.py (./nope.py is relative to the "
                    "working directory {cwd})"),
    ("mine.py:nope", "cannot load reward 'mine.py:nope': mine.py has no 'nope'"),
    ("mine.py:LIMIT", "reward 'mine.py:LIMIT' is not a function (it is a int)"),
    ("broken.py:f", "cannot load reward 'broken.py:f': running {cwd}/broken.py failed: ModuleNotFoundError: No "
                    "module named 'not_installed_pkg_x'"),
    ("no_such_module_q9:f", "cannot load reward 'no_such_module_q9:f': no module named 'no_such_module_q9' "
                            "(looked in the working directory {cwd} and sys.path)"),
    ("brevty", "unknown reward 'brevty' (valid: correctness, exact_match, format_soft, format_strict, "
               "integer_answer, length_penalty, majority_vote, multiple_choice, numeric_match, regex_format, "
               "xml_count); a function of your own is 'package.module:function' or 'path/to/file.py:function'"),
])
def test_a_reward_that_cannot_be_loaded_is_a_one_line_config_error(tmp_path, monkeypatch, spec, message):
    (tmp_path / "mine.py").write_text(BREVITY)
    (tmp_path / "broken.py").write_text("import not_installed_pkg_x\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        check_reward_specs({"task": 1.0, "reward_model": 1.0, spec: 1.0})  # the trainer's own sources are skipped
    assert str(err.value) == "config key 'rewards': " + message.format(cwd=tmp_path)


# --- tiny RL runs through the real config and trainer -----------------------------------------------------------

TINY_RL = ["algorithm=dr_grpo", "steps=2", "prompts_per_step=2", "samples_per_prompt=2", "eval_before=false",
           "eval.every=0", "eval.problems=2", "eval.samples=2", "eval.ks=[1,2]", "eval.max_new_tokens=8",
           "sampling.max_new_tokens=8", "task.test_size=8", "log_samples_every=1", "save_every=0", "threads=1"]

USER_REWARDS = '''
import asyncio


def brevity(completions, **kwargs):
    state = kwargs["trainer_state"]
    kwargs["log_extra"]("progress", [f"{state.global_step}/{state.max_steps}"] * len(completions))
    kwargs["log_metric"]("brevity/calls", 1.0)
    return [-float(len(c)) for c in completions]


async def prompt_length(prompts, completions, answer, **kw):
    await asyncio.sleep(0)
    return [float(len(p)) for p in prompts]


def broken(completions, **kwargs):
    raise KeyError("label")


def old_style(prompt, completion):
    return 1.0
'''


@pytest.fixture(scope="module")
def policy(tok, tmp_path_factory) -> str:
    return str(save_checkpoint(tmp_path_factory.mktemp("policy") / "ckpt", tiny_gpt(tok.vocab_size), tok))


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_REWARDS)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_trl_style_rewards_from_a_file_score_a_real_run(policy, user_dir):
    rewards = "rewards={'./my_rewards.py:brevity': 1.0, 'my_rewards.py:prompt_length': 0.5}"
    train_rl(load_config(RLConfig, None, [f"run_dir={user_dir / 'run'}", f"model={policy}", *TINY_RL, rewards]),
             progress=False)
    samples = read_jsonl(user_dir / "run/samples.jsonl")
    assert len(samples) == 2 * 2  # two steps, the first sample of each of two groups
    for row in samples:
        assert row["rewards"] == {"brevity": -len(row["completion"]), "prompt_length": len(row["prompt"])}
        assert row["reward"] == pytest.approx(-len(row["completion"]) + 0.5 * len(row["prompt"]))
        assert row["extra"] == {"progress": f"{row['step'] - 1}/2"}
    for row in read_jsonl(user_dir / "run/metrics.jsonl"):
        assert row["brevity/calls"] == 1.0
        assert row["rewards/brevity/failures"] == row["rewards/prompt_length/failures"] == 0.0


def test_a_reward_that_always_raises_stops_the_run_at_step_one(policy, user_dir):
    config = load_config(RLConfig, None, [f"run_dir={user_dir / 'run'}", f"model={policy}", *TINY_RL,
                                          "rewards={task: 1.0, 'my_rewards.py:broken': 1.0}"])
    with pytest.raises(RewardFailed) as err:
        train_rl(config, progress=False)
    why = ("reward 'broken' failed on 4 of 4 samples (more than reward_max_failure_rate 0.5), first error: "
           "KeyError: 'label'")
    assert str(err.value) == (f"run stopped at step 1: {why} (see {user_dir / 'run/events.jsonl'}); the last good "
                              "checkpoint is none")
    event = read_jsonl(user_dir / "run/events.jsonl")[-1]
    assert (event["step"], event["check"], event["action"]) == (1, "reward", "stop")
    assert not (user_dir / "run/metrics.jsonl").read_text()  # no step was trained


def test_a_trl_signature_mismatch_exits_6_with_one_line(policy, user_dir):
    result = CliRunner().invoke(app, ["rl", "-", f"run_dir={user_dir / 'run'}", f"model={policy}", *TINY_RL,
                                      "rewards={'my_rewards.py:old_style': 1.0}", "--no-progress"])
    assert result.exit_code == 6, result.output
    assert result.stderr.strip().startswith(
        "run stopped at step 1: reward 'old_style' failed on 4 of 4 samples (more than reward_max_failure_rate 0.5), "
        "first error: TypeError: reward 'old_style' does not fit TRL's keyword call: missing a required argument: "
        "'prompt' (it is called as old_style(prompts=, completions=, ")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_a_reward_file_that_is_missing_is_an_error_before_the_model_loads(user_dir, monkeypatch):
    def no_model(*args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("posttrain.trainers.rl.load_policy", no_model)
    config = load_config(RLConfig, None, [f"run_dir={user_dir / 'run'}", f"model={user_dir / 'no_such_model'}",
                                          "rewards={'./typo_rewards.py:brevity': 1.0}"])
    with pytest.raises(ConfigError, match=r"^config key 'rewards': cannot load reward './typo_rewards.py:brevity': "
                                          r"no file .*typo_rewards.py"):
        train_rl(config, progress=False)
    result = CliRunner().invoke(app, ["rl", "-", f"run_dir={user_dir / 'run2'}", f"model={user_dir / 'nothing'}",
                                      "rewards={'./typo_rewards.py:brevity': 1.0}"])
    assert result.exit_code == 2 and result.stderr.startswith("config error: config key 'rewards': cannot load")
