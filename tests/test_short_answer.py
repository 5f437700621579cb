"""The short_answer task: its graders, its splits, its config, and evaluation's extra graders."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest
import torch

from posttrain.config import ConfigError, EvalConfig, RLConfig, load_config
from posttrain.engine import RolloutBatch
from posttrain.evaluation import evaluate_task
from posttrain.tasks import make_task
from posttrain.tasks.short_answer import (
    INSTRUCTION,
    SKILLS,
    ShortAnswerTask,
    final_number,
    held_out_split,
    lenient_correct,
    skill_list,
    strict_correct,
)


@pytest.mark.parametrize(("reply", "strict", "lenient"), [
    ("27", True, True),
    ("27.", True, True),
    (" 27. \n", True, True),
    ("9 × 3 = 27.", True, True),
    ("The answer is 27", True, True),
    ("1,027", False, False),  # another number
    ("27 eggs", False, True),  # ends with a word
    ("27 or 28", False, True),  # only the last number counts
    ("It is 2.27", False, False),
    ("x-27", False, True),  # strict: glued to a word by a dash is no final answer; lenient reads 27
    ("28 or 27", True, True),  # the last number is the answer
    ("-$27", False, False),  # minus 27 dollars
    ("\u221227", False, True),  # a Unicode minus: strict sees no plain 27; lenient reads "27"
    ("**27**", False, True),  # markdown around the answer is not the format
    ("twenty-seven", False, False),
    ("", False, False),
])
def test_graders(reply, strict, lenient):
    assert strict_correct(reply, "27") is strict
    assert lenient_correct(reply, "27") is lenient


def test_final_number_reads_thousands_and_signs():
    assert final_number("so the total is 1,200.") == "1200"
    assert final_number("it drops to -5") == "-5"
    assert final_number("no number here") is None


def _solve(question: str) -> int:
    """The answer of a generated question, worked out from its text independently of the generators."""
    if question.startswith("What is "):
        a, op, b = question.removeprefix("What is ").removesuffix("?").split()
        return {"+": int(a) + int(b), "-": int(a) - int(b), "×": int(a) * int(b)}[op]
    if question.startswith("Which number is larger"):
        return max(map(int, re.findall(r"\d+", question)))
    if question.startswith("How many letters"):
        return len(re.search(r'"(\w+)"', question).group(1))
    if question.startswith("How many "):
        small, n, big = re.match(r"How many (\w+) are in (\d+) (\w+)\?", question).groups()
        per = {("hours", "minutes"): 60, ("minutes", "seconds"): 60, ("days", "hours"): 24, ("weeks", "days"): 7,
               ("meters", "centimeters"): 100, ("kilometers", "meters"): 1000, ("kilograms", "grams"): 1000,
               ("liters", "milliliters"): 1000, ("dozens", "eggs"): 12, ("years", "months"): 12}
        return int(n) * per[(big, small)]
    a, b = map(int, re.findall(r"\d+", question))
    return a + b if "gets" in question else a - b


@pytest.mark.parametrize("skill", list(SKILLS))
def test_every_skill_makes_right_integer_answers(skill):
    r = random.Random(0)
    for _ in range(100):
        p = SKILLS[skill](r)
        assert p.skill == skill and p.question.endswith("?")
        assert int(p.answer) == _solve(p.question) >= 0


def test_splits_are_fixed_distinct_disjoint_and_balanced():
    task = ShortAnswerTask("add,subtract,multiply,word", test_size=256)
    assert len(task.test) == len({p.question for p in task.test}) == 256
    assert [p.question for p in ShortAnswerTask("add,subtract,multiply,word", test_size=256).test] == \
        [p.question for p in task.test]
    assert [p.skill for p in task.test[:8]] == ["add", "subtract", "multiply", "word"] * 2  # in turn
    shares = Counter(p.skill for p in task.test)  # multiply has 64 questions: it gives 32, add 40 of its 81
    assert shares == {"multiply": 32, "add": 40, "subtract": 92, "word": 92}
    r = random.Random(0)
    test = {p.question for p in task.test}
    drawn = [task.train_problem(r) for _ in range(2000)]
    assert not any(p.question in test for p in drawn)
    assert all(400 < n < 600 for n in Counter(p.skill for p in drawn).values())  # skills drawn uniformly
    assert len({p.question for p in drawn if p.skill == "multiply"}) == 32  # the half left to train on


def test_a_test_split_larger_than_the_skills_leave_room_for_is_a_config_error():
    assert len(held_out_split(["add"], 40, random.Random(0))) == 40
    with pytest.raises(ConfigError, match=r"task.test_size=41: the short_answer skills add have room for 40"):
        ShortAnswerTask("add", test_size=41)
    with pytest.raises(ConfigError, match=r"^config key 'task.test_size' must be >= 1.*short_answer"):
        load_config(RLConfig, overrides=["task=short_answer", "task.test_size=0"])


def test_skill_names_are_checked_with_the_closest_valid_one():
    assert skill_list("mixed") == skill_list(" mixed ") == list(SKILLS)
    assert skill_list("add, word") == ["add", "word"]
    with pytest.raises(ConfigError, match="unknown short_answer skill 'multiplY'"):
        skill_list("add,multiplY")
    with pytest.raises(ConfigError, match=r"^config key 'task.skill' has unknown value 'ad'.*'add'"):
        load_config(RLConfig, overrides=["task=short_answer", "task.skill=ad"])
    with pytest.raises(ConfigError, match=r"'mixed' already means every skill"):
        load_config(RLConfig, overrides=["task=short_answer", "task.skill=add,mixed"])
    with pytest.raises(ConfigError, match="task.skill"):  # not a field of another task
        load_config(RLConfig, overrides=["task=arithmetic", "task.skill=add"])


def test_prompt_reward_and_sft_example():
    task = make_task(load_config(RLConfig, overrides=["task=short_answer", "task.skill=multiply",
                                                      "task.test_size=8"]).task)
    conv = task.prompt(task.test[0])
    assert conv["messages"][0]["content"].endswith(INSTRUCTION)
    gold = conv["answer"]
    assert task.reward(conv, f"That is {gold}.") == 1.0 and task.reward(conv, f"{gold} apples") == 0.0
    assert task.grade(conv, f"so {gold}") == {"answer": gold, "format": True, "plausible": True, "exact": True}
    example = task.sft_example(random.Random(0))
    assert task.reward(example, example["messages"][-1]["content"]) == 1.0


class _Engine:
    """Replies with fixed token ids for every row; a row ends with the stop token when ``finished``."""

    def __init__(self, tok, reply: list[int], finished: bool):
        self.tokenizer, self.reply, self.finished = tok, reply, finished

    def generate(self, prompts, n, params, seeds=None):
        rows = len(prompts) * n
        ids = self.reply + ([self.tokenizer.stop_ids[0]] if self.finished else [])
        return RolloutBatch(prompt_ids=[p for p in prompts for _ in range(n)],
                            completion_ids=torch.tensor([ids] * rows), logprobs=torch.zeros(rows, len(ids)),
                            mask=torch.ones(rows, len(ids)), lengths=torch.full((rows,), len(ids)),
                            finished=torch.full((rows,), self.finished),
                            group_ids=torch.arange(len(prompts)).repeat_interleave(n))


def test_evaluation_grades_the_reply_without_its_stop_token_and_reports_the_extra_grader(tok):
    """Training's rewards read a completion without the stop token that ended it; evaluation must read the same
    text (with it, a grader that wants the reply to end with the answer failed every finished sample)."""
    task = ShortAnswerTask("multiply", test_size=4)
    config = EvalConfig(problems=4, samples=2, ks=(1, 2), max_new_tokens=8)
    task.test = [task.test[0]] * 4
    gold = task.test[0].answer
    reply = tok.encode(f"so it is {gold}")
    out = evaluate_task(_Engine(tok, reply, finished=True), task, task.test, config)
    assert out["eval/pass@1"] == out["eval/lenient/pass@1"] == out["eval/lenient/pass@2"] == 1.0
    wrong = tok.encode(f"{gold} or 1")
    out = evaluate_task(_Engine(tok, wrong, finished=False), task, task.test, config)
    assert out["eval/pass@1"] == 0.0 and out["eval/lenient/pass@1"] == 1.0


def test_rl_on_short_answer_logs_both_graders_before_and_after(tmp_path):
    """The demo's metrics: eval/pass@1 (strict) and eval/lenient/pass@1 before the first step and at the end, in
    metrics.jsonl; the strict grader never passes a sample the lenient one fails."""
    pytest.importorskip("transformers")
    from posttrain.metrics import read_jsonl
    from posttrain.models.tiny_llama import make_tiny_llama
    from posttrain.trainers.rl import train_rl

    task = ShortAnswerTask("add,word", test_size=8)
    llama = make_tiny_llama(tmp_path / "llama", task.corpus(random.Random(0), n=200), vocab_size=300, hidden_size=32)
    config = load_config(RLConfig, None, [
        f"model={llama}", f"run_dir={tmp_path / 'rl'}", "algorithm=dr_grpo", "steps=2", "prompts_per_step=2",
        "samples_per_prompt=2", "sampling.max_new_tokens=6", "eval.problems=8", "eval.samples=2", "eval.ks=[1, 2]",
        "eval.max_new_tokens=6", "threads=2", "task.name=short_answer", "task.skill=add,word", "task.test_size=8"])
    train_rl(config, progress=False)
    evals = [m for m in read_jsonl(tmp_path / "rl" / "metrics.jsonl") if "eval/pass@1" in m]
    assert [m["step"] for m in evals] == [0, 2]
    for m in evals:
        assert 0.0 <= m["eval/pass@1"] <= m["eval/lenient/pass@1"] <= m["eval/lenient/pass@2"] <= 1.0


def test_a_failing_extra_grader_is_counted_apart_from_the_reward(tok, capsys):
    task = ShortAnswerTask("multiply", test_size=4)
    task.extra_grades = {"flaky": lambda conv, completion: 1 / 0}
    config = EvalConfig(problems=4, samples=2, ks=(1,), max_new_tokens=8)
    out = evaluate_task(_Engine(tok, tok.encode(task.test[0].answer), finished=True), task, task.test, config)
    assert out["eval/flaky/failures"] == 8 and out["eval/flaky/pass@1"] == 0.0 and out["eval/reward_failures"] == 0
    assert "the flaky grader failed on 8 of 8 samples" in capsys.readouterr().err
