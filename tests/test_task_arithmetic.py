"""Specs for the arithmetic task: answer extraction, reward, splits and the (imperfect) teacher."""

from __future__ import annotations

import random

import pytest

from posttrain.tasks.arithmetic import (
    TEMPLATES,
    ArithmeticTask,
    Problem,
    conversation,
    extract_answer,
    make_problem,
    solution_parts,
)
from posttrain.tools import calculate

GOLD = {"messages": [], "answer": "91"}


@pytest.fixture(scope="module")
def task() -> ArithmeticTask:
    return ArithmeticTask()


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("#### 91", "91"),
        ("so 23+68 = 91\n#### 91", "91"),
        ("####91", "91"),
        ("#### -7", "-7"),
        ("#### 1,234", "1234"),
        ("#### 3.5", "3.5"),
        ("#### 12 and then #### 13", "13"),  # the last #### wins
        ("#### 12 dollars", "12"),
        ("no answer here: 91", None),
        ("####", None),
        ("#### abc", None),
        ("", None),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize(
    ("completion", "gold", "reward"),
    [
        ("#### 91", "91", 1.0),
        ("<|tool_start|>23+68<|tool_end|><|output_start|>91<|output_end|> #### 91", "91", 1.0),
        ("#### 92", "91", 0.0),  # wrong answer
        ("the answer is 91", "91", 0.0),  # missing ####
        ("#### abc", "91", 0.0),
        ("####", "91", 0.0),
        ("#### 1,234", "1234", 1.0),  # commas are dropped
        ("#### 91.0", "91", 1.0),  # compared as numbers
        ("#### 91 #### 90", "91", 0.0),  # the last #### wins
        ("#### 90 #### 91", "91", 1.0),
    ],
)
def test_reward(task, completion, gold, reward):
    assert task.reward({"messages": [], "answer": gold}, completion) == reward


def test_reward_is_a_float(task):
    assert type(task.reward(GOLD, "#### 91")) is float
    assert type(task.reward(GOLD, "")) is float


def test_test_split_is_deterministic_and_distinct():
    a, b = ArithmeticTask(), ArithmeticTask()
    assert [p.question for p in a.test] == [p.question for p in b.test]
    assert len(a.test) == 256
    assert len({p.question for p in a.test}) == 256
    small = ArithmeticTask(test_size=10)
    assert len({p.question for p in small.test}) == 10
    assert [p.question for p in ArithmeticTask(test_seed=99).test] != [p.question for p in a.test]


def test_training_problems_never_appear_in_the_test_split(task):
    test_questions = {p.question for p in task.test}
    r = random.Random(0)
    drawn = [task.train_problem(r).question for _ in range(2000)]
    assert not test_questions.intersection(drawn)
    # and the check is not vacuous: the raw generator does hit the test split
    r = random.Random(0)
    assert any(make_problem(r).question in test_questions for _ in range(20000))


def test_training_problems_are_reproducible(task):
    a = [task.train_problem(random.Random(3)).question for _ in range(3)]
    assert a[0] == a[1] == a[2]
    r1, r2 = random.Random(5), random.Random(5)
    assert [task.sft_example(r1) for _ in range(5)] == [task.sft_example(r2) for _ in range(5)]


def _completion_text(parts: list[dict]) -> str:
    """The assistant's completion as the model would write it (special tokens as strings)."""
    wrap = {
        "text": "{}",
        "tool_call": "<|tool_start|>{}<|tool_end|>",
        "tool_output": "<|output_start|>{}<|output_end|>",
    }
    return "".join(wrap[p["type"]].format(p["text"]) for p in parts)


def test_perfect_teacher_always_reaches_the_gold_answer(task):
    r = random.Random(1)
    for _ in range(300):
        p = task.train_problem(r)
        parts = solution_parts(p, r, error_rate=0.0)
        assert task.reward(conversation(p), _completion_text(parts)) == 1.0, p


def test_solution_parts_without_rng_is_the_correct_solution(task):
    p = task.test[0]
    parts = solution_parts(p)
    assert parts[-1] == {"type": "text", "text": f"#### {p.answer}"}
    assert task.reward(conversation(p), _completion_text(parts)) == 1.0


def test_worked_solution_exact_parts():
    p = Problem("q", ("4*17", "23+{0}"), "91")
    assert solution_parts(p) == [
        {"type": "tool_call", "text": "4*17"},
        {"type": "tool_output", "text": "68"},
        {"type": "text", "text": " "},
        {"type": "tool_call", "text": "23+68"},
        {"type": "tool_output", "text": "91"},
        {"type": "text", "text": " "},
        {"type": "text", "text": "#### 91"},
    ]


def test_always_wrong_teacher_gets_it_wrong(task):
    r = random.Random(2)
    wrong = 0
    for _ in range(300):
        p = task.train_problem(r)
        parts = solution_parts(p, r, error_rate=1.0)
        wrong += task.reward(conversation(p), _completion_text(parts)) == 0.0
    assert wrong >= 270


def test_teacher_outputs_are_what_the_calculator_says(task):
    """A slip carries through: every tool output is the calculator's result on the (slipped) call."""
    r = random.Random(4)
    for _ in range(100):
        parts = solution_parts(task.train_problem(r), r, error_rate=1.0)
        for call, out in zip(parts[:-1:3], parts[1::3], strict=True):
            assert call["type"] == "tool_call" and out["type"] == "tool_output"
            assert out["text"] == calculate(call["text"])


def test_teacher_error_rate_is_respected():
    task = ArithmeticTask(test_size=8, teacher_error=0.3)
    r = random.Random(6)
    rewards = []
    for _ in range(600):
        conv = task.sft_example(r)
        rewards.append(task.reward(conv, _completion_text(conv["messages"][1]["content"])))
    wrong = 1 - sum(rewards) / len(rewards)
    assert 0.22 < wrong < 0.38


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda t: t.__name__)
def test_every_template_gives_a_non_negative_integer_answer(template):
    r = random.Random(7)
    for _ in range(300):
        p = template(r)
        assert p.answer.isdigit(), p  # non-negative integer string, no sign, no decimals
        assert str(int(p.answer)) == p.answer  # no leading zeros
        # the steps, run through the calculator, give the answer
        results: list[str] = []
        for step in p.steps:
            results.append(calculate(step.format(*results)))
        assert results[-1] == p.answer, p


def test_prompt_carries_the_gold_answer_and_only_the_user_turn(task):
    p = task.test[0]
    conv = task.prompt(p)
    assert conv == {"messages": [{"role": "user", "content": p.question}], "answer": p.answer}


def test_sft_example_is_a_user_assistant_conversation(task):
    conv = task.sft_example(random.Random(0))
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant"]
    assert conv["messages"][1]["content"][-1]["text"].startswith("#### ")
    assert conv["messages"][0]["content"] not in {p.question for p in task.test}


def test_corpus_is_questions_and_solution_texts(task):
    texts = task.corpus(random.Random(0), n=5)
    assert all(isinstance(t, str) for t in texts)
    assert sum(t.startswith("#### ") for t in texts) == 5


def test_hash_format_asks_for_the_answer_line_and_writes_steps_as_text():
    task = ArithmeticTask(test_size=4, teacher_error=0.0, format="hash")
    conv = task.sft_example(random.Random(0))
    assert conv["messages"][0]["content"].endswith("on its own line as '#### <number>'.")
    solution = conv["messages"][1]["content"]
    assert isinstance(solution, str) and "<|" not in solution
    steps = solution.split(" #### ")[0].split(" ")
    assert all(calculate(step.split("=")[0]) == step.split("=")[1] for step in steps)  # '24*7=168'
    assert task.reward(conv, solution) == 1.0
    assert any("####" in text for text in task.corpus(random.Random(0), n=5))  # whole solutions, as text
    with pytest.raises(ValueError, match="unknown arithmetic format 'xml'"):
        ArithmeticTask(test_size=4, format="xml")
