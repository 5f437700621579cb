"""Specs for the GSM8K task: number normalisation, answer extraction, the three formats on real rows,
loading errors, and the task interface the trainers use."""

from __future__ import annotations

import json
import random
import re
import sys
import types
from pathlib import Path

import pytest

from posttrain.config import TaskConfig
from posttrain.tasks import TASKS, make_task
from posttrain.tasks.arithmetic import ArithmeticTask
from posttrain.tasks.gsm8k import (
    HASH_INSTRUCTION,
    XML_SYSTEM,
    GSM8KTask,
    Problem,
    conversation,
    extract_answer,
    is_correct,
    load_splits,
    normalize_number,
    read_file,
    same_number,
    strip_annotations,
    tool_parts,
)
from posttrain.tools import calculate

DATA = Path(__file__).parents[2] / "shared/data/gsm8k"
needs_data = pytest.mark.skipif(not (DATA / "test.jsonl").is_file(), reason=f"no GSM8K data at {DATA}")
ROW = {"question": "Ann has 3 bags of 4 eggs. How many eggs?", "answer": "3*4=<<3*4=12>>12 eggs\n#### 12"}


def completion_text(content: str | list[dict]) -> str:
    """The assistant turn as the model writes it (tool parts with their special-token strings)."""
    if isinstance(content, str):
        return content
    wrap = {
        "text": "{}",
        "tool_call": "<|tool_start|>{}<|tool_end|>",
        "tool_output": "<|output_start|>{}<|output_end|>",
    }
    return "".join(wrap[p["type"]].format(p["text"]) for p in content)


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def real_test() -> list[Problem]:
    if not (DATA / "test.jsonl").is_file():
        pytest.skip(f"no GSM8K data at {DATA}")
    return read_file(DATA / "test.jsonl")


# --- numbers and extraction ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,000.00", "1000"),
        ("$5", "5"),
        ("-3.50", "-3.5"),
        ("7.0", "7"),
        ("12%", "12"),
        (" 18. ", "18"),
        ("-$5", "-5"),
        ("+4", "4"),
        ("-0", "0"),
        ("0.250", "0.25"),
        (".50", "0.5"),
        ("1,450,000", "1450000"),
        ("12,34", None),  # commas must group thousands
        ("5 dollars", None),
        ("abc", None),
        ("", None),
        ("1e5", "100000"),  # scientific notation is its value
        ("2.5E-2", "0.025"),
        ("3/4", "0.75"),  # a fraction: its decimal when finite,
        ("-2/6", "-1/3"),  # else in lowest terms
        ("10 / 4", "2.5"),
        ("5/0", None),
        ("1e99999", None),  # past the digit limit
    ],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [("72", "72", True), ("72", "72.0", True), ("72", "72.0000001", False), ("72", "72.001", False), ("0", "0", True),
     ("-3.5", "3.5", False), (None, "1", False), ("1", "x", False),
     ("1000001", "1000000", False), ("17.99999", "18", False), ("0.75", "3/4", True), ("1e3", "1000", True),
     ("1/3", "0.333333", False), ("2/6", "1/3", True)],  # exact: no tolerance
)
def test_same_number(a, b, expected):
    assert same_number(a, b) is expected


@pytest.mark.parametrize(
    ("text", "strict", "flexible", "xml"),
    [
        ("so she makes 18 a day\n#### 18", "18", "18", None),
        ("#### -7", "-7", "-7", None),
        ("####-7", "-7", "-7", None),
        ("#### 1,234.50", "1234.5", "1234.5", None),
        ("#### $5 per egg", "5", "5", None),
        ("#### 12 and then #### 13", "13", "13", None),  # the last #### wins
        ("#### 12 and then #### abc", None, "12", None),  # the last #### has no number
        ("it costs $20, then 3 more: 23", None, "23", None),  # last number wins
        ("16-3-4=9", None, "9", None),
        ("the answer is 5-3", None, "3", None),  # a minus between numbers is not a sign
        ("the answer is 45%.", None, "45", None),
        ("#### .5", "0.5", "0.5", None),
        ("#### 3/4", "0.75", "4", None),  # after ####, a fraction counts whole (flexible: the last number)
        ("#### 1e3", "1000", "3", None),  # and so does scientific notation
        ("#### 3/4 of them", "0.75", "4", None),
        ("<answer>3/4</answer>", None, "4", "0.75"),
        ("no answer here", None, None, None),
        ("", None, None, None),
        ("<reasoning>\n2*9=18\n</reasoning>\n<answer>\n$18\n</answer>\n", None, "18", "18"),
        ("<answer>3</answer> wait <answer> 4.0 </answer>", None, "4", "4"),  # last tag wins
        ("<answer>18 dollars</answer>", None, "18", "18 dollars"),  # not a number: the text as written
        ("<answer>  </answer>", None, None, None),
        ("<answer>7", None, "7", None),  # unclosed tag
    ],
)
def test_extract_answer(text, strict, flexible, xml):
    assert extract_answer(text) == strict
    assert extract_answer(text, "strict") == strict
    assert extract_answer(text, "flexible") == flexible
    assert extract_answer(text, "xml") == xml


def test_extract_answer_unknown_mode():
    with pytest.raises(ValueError, match="did you mean 'strict'"):
        extract_answer("#### 1", "strikt")


@pytest.mark.parametrize(
    ("completion", "gold", "mode", "expected"),
    [
        ("#### 72", "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "strict", True),  # the dataset field
        ("#### 72", "72", "strict", True),
        ("#### 72.0", "72", "strict", True),
        ("#### 1000001", "1000000", "strict", False),  # compared exactly, not to a relative 1e-6
        ("#### 17.99999", "18", "strict", False),
        ("#### 3/4", "3", "strict", False),  # 3/4 is not 3
        ("#### 1e3", "1000", "strict", True),
        ("#### 1,000", "1000", "strict", True),
        ("#### 2125", "#### 2,125", "strict", True),
        ("the answer is 72", "72", "strict", False),  # no ####
        ("the answer is 72", "72", "flexible", True),
        ("#### 72 (or 73)", "72", "flexible", False),  # flexible: the last number
        ("#### 71", "72", "flexible", False),
        ("<answer>\n72\n</answer>", "72", "xml", True),
        ("<answer>\n\\frac{1}{2}\n</answer>", "0.5", "xml", False),  # not a number, no math-verify asked
        ("", "72", "flexible", False),
    ],
)
def test_is_correct(completion, gold, mode, expected):
    assert is_correct(completion, gold, mode) is expected


def test_is_correct_math_verify():
    """With math-verify an equivalent non-numeric answer in the <answer> tag counts."""
    pytest.importorskip("math_verify")
    assert is_correct("<answer>\\frac{1}{2}</answer>", "0.5", "xml", math_verify=True) is True
    assert is_correct("<answer>\\frac{1}{3}</answer>", "0.5", "xml", math_verify=True) is False
    assert is_correct("<answer>0.5</answer>", "#### 0.5", "xml", math_verify=True) is True


def test_is_correct_math_verify_missing_falls_back_to_numbers(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # as if not installed
    assert is_correct("<answer>\\frac{1}{2}</answer>", "0.5", "xml", math_verify=True) is False
    assert is_correct("<answer>1/2</answer> or 0.5", "0.5", "flexible", math_verify=True) is True


# --- formats ----------------------------------------------------------------------------------


def test_strip_annotations():
    assert strip_annotations("2*3=<<2*3=6>>6 and <<6+1=7>>7.") == "2*3=6 and 7."


def test_tool_parts_exact():
    assert tool_parts("She makes 9 * 2 = $<<9*2=18>>18 a day, <<18-20=-2>>-2 left.\n#### -2") == [
        {"type": "text", "text": "She makes 9 * 2 = $"},
        {"type": "tool_call", "text": "9*2"},
        {"type": "tool_output", "text": "18"},
        {"type": "text", "text": " a day, "},
        {"type": "tool_call", "text": "18-20"},
        {"type": "tool_output", "text": "-2"},
        {"type": "text", "text": " left.\n#### -2"},
    ]


def test_tool_parts_output_is_the_calculators_and_repeated_number_with_commas_is_dropped():
    assert tool_parts("<<80000+50000=130000>>130,000 total") == [
        {"type": "tool_call", "text": "80000+50000"},
        {"type": "tool_output", "text": "130000"},
        {"type": "text", "text": " total"},
    ]
    assert tool_parts("<<5*.01=.05>>.05 each") == [
        {"type": "tool_call", "text": "5*.01"},
        {"type": "tool_output", "text": "0.05"},
        {"type": "text", "text": " each"},
    ]


@pytest.mark.parametrize(
    "solution",
    ["half is <<3/4=3/4>>3/4 cup", "x is <<2*x=10>>10", "no equals <<42>>42", "wrong <<2+2=5>>5"],
)
def test_tool_parts_keeps_unconfirmed_annotations_as_plain_text(solution):
    assert tool_parts(solution) == [{"type": "text", "text": strip_annotations(solution)}]


def test_conversations_in_each_format_exact():
    p = Problem("How many?", "3*4=<<3*4=12>>12 eggs", "12")
    assert conversation(p, "hash", solution=True) == {
        "messages": [
            {"role": "user", "content": f"How many?\n{HASH_INSTRUCTION}"},
            {"role": "assistant", "content": "3*4=12 eggs\n#### 12"},
        ],
        "answer": "12",
    }
    assert conversation(p, "xml", solution=True)["messages"] == [
        {"role": "system", "content": XML_SYSTEM},
        {"role": "user", "content": "How many?"},
        {"role": "assistant", "content": "<reasoning>\n3*4=12 eggs\n</reasoning>\n<answer>\n12\n</answer>\n"},
    ]
    assert conversation(p, "tool", solution=True)["messages"][1]["content"] == [
        {"type": "text", "text": "3*4="},
        {"type": "tool_call", "text": "3*4"},
        {"type": "tool_output", "text": "12"},
        {"type": "text", "text": " eggs\n#### 12"},
    ]
    assert conversation(p, "tool") == {"messages": [{"role": "user", "content": f"How many?\n{HASH_INSTRUCTION}"}],
                                       "answer": "12"}


@pytest.mark.parametrize("fmt", ["hash", "xml", "tool"])
def test_gold_solutions_of_real_rows_score_in_every_format(real_test, fmt):
    task = GSM8KTask([], real_test[:200], fmt)
    for p in task.test:
        conv = conversation(p, fmt, solution=True)
        completion = completion_text(conv["messages"][-1]["content"])
        assert task.reward(task.prompt(p), completion) == 1.0, (p, completion)
        assert is_correct(completion, p.answer), p  # flexible
        assert is_correct(completion, p.answer, task.extract), p


def test_tool_format_on_the_whole_real_test_split(real_test):
    """Every tool output is the calculator's result on its call; all annotations but the one malformed
    ``<<3/4=3/4>>`` become calls; the text of the solution is the hash solution minus the repeated results."""
    calls = annotations = 0
    for p in real_test:
        parts = tool_parts(p.solution)
        for call, out in zip(parts[:-1], parts[1:], strict=True):
            if call["type"] == "tool_call":
                assert out == {"type": "tool_output", "text": calculate(call["text"])}
        calls += sum(part["type"] == "tool_call" for part in parts)
        annotations += len(re.findall(r"<<.*?>>", p.solution))
    assert annotations == 4282
    assert calls == annotations - 1
    fraction = next(p for p in real_test if "<<3/4=3/4>>" in p.solution)
    texts = "".join(part["text"] for part in tool_parts(fraction.solution) if part["type"] == "text")
    assert "<<" not in texts and "3/4" in texts


# --- loading ----------------------------------------------------------------------------------


@needs_data
def test_load_real_splits():
    train, test = load_splits(str(DATA), test_size=0)
    assert (len(train), len(test)) == (7473, 1319)
    assert test[0].answer == "18" and test[0].question.startswith("Janet")
    assert "<<16-3-4=9>>" in test[0].solution and "####" not in test[0].solution
    _, first = load_splits(str(DATA), test_size=5)
    assert first == test[:5]
    assert sum(p.answer == "2125" for p in test) >= 1  # "#### 2,125" in the data


def test_load_directory_and_single_file(tmp_path):
    rows = [json.dumps({"question": f"q{i}", "answer": f"r\n#### {i}"}) for i in range(5)]
    write_jsonl(tmp_path / "train.jsonl", rows[:3])
    write_jsonl(tmp_path / "test.jsonl", rows[3:])
    train, test = load_splits(str(tmp_path))
    assert [p.answer for p in train] == ["0", "1", "2"] and [p.answer for p in test] == ["3", "4"]
    single = write_jsonl(tmp_path / "all.jsonl", ["", *rows, "  "])  # blank lines are skipped
    train, test = load_splits(str(single), test_size=2)
    assert [p.answer for p in test] == ["0", "1"] and [p.answer for p in train] == ["2", "3", "4"]
    train, test = load_splits(str(single), test_size=0)
    assert train == [] and len(test) == 5


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"question": "q", "answer": "#### 1"', "malformed JSON"),
        ('{"answer": "#### 1"}', "no 'question'"),
        ('{"question": "q"}', "no 'answer'"),
        ('{"question": "q", "answer": null}', "row has no 'answer'"),
        ('{"question": "q", "answer": 7}', "'answer' must be a string, got int 7"),
        ('{"question": ["q"], "answer": "#### 1"}', "'question' must be a string, got list ['q']"),
        ('{"question": "  ", "answer": "#### 1"}', "'question' is empty"),
        ('{"question": "q", "answer": "just 7"}', "does not end with '#### <number>'"),
        ('["q", "#### 1"]', "expected an object with 'question' and 'answer', got list"),
        ("null", "expected an object with 'question' and 'answer', got NoneType"),
        ("3", "expected an object with 'question' and 'answer', got int"),
        ("question: q", "malformed JSON (Expecting value)"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "test.jsonl", [json.dumps(ROW), "", line])
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(message)):
        read_file(path)


def test_a_line_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_bytes(json.dumps(ROW).encode() + b"\n" + b'{"question": "caf\xe9", "answer": "#### 1"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not UTF-8 text (invalid continuation byte at byte 17)")):
        read_file(path)


def test_a_split_with_no_rows_is_an_error_before_training(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [json.dumps(ROW)])
    test = write_jsonl(tmp_path / "test.jsonl", ["", "   "])  # blank lines only
    with pytest.raises(ValueError, match=f"^gsm8k data file {re.escape(str(test))} has no rows$"):
        load_splits(str(tmp_path))
    with pytest.raises(ValueError, match=f"{re.escape(str(test))} has no rows"):
        make_task(TaskConfig(name="gsm8k", data=str(tmp_path)))


def test_empty_file_and_missing_paths(tmp_path):
    empty = write_jsonl(tmp_path / "test.jsonl", [""])
    with pytest.raises(ValueError, match=f"{re.escape(str(empty))} has no rows"):
        load_splits(str(empty))
    with pytest.raises(FileNotFoundError, match="has no train.jsonl, train.json, train.csv or train.parquet"):
        load_splits(str(tmp_path))
    with pytest.raises(ValueError, match="must be .jsonl, .json, .csv or .parquet"):
        read_file(write_jsonl(tmp_path / "rows.txt", ["a,b"]))


def test_missing_path_without_datasets_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(FileNotFoundError, match=r"no/such/dir.*pip install 'posttrain\[hf\]'"):
        load_splits(str(tmp_path / "no/such/dir"))


def test_missing_path_is_loaded_as_a_hub_dataset(monkeypatch):
    seen = []

    def load_dataset(name, config):
        seen.append((name, config))
        return {"train": [ROW], "test": [ROW, {"question": "q", "answer": "#### 5"}]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    train, test = load_splits("openai/gsm8k", test_size=1)
    assert seen == [("openai/gsm8k", "main")]
    assert [p.answer for p in train] == ["12"] and [p.answer for p in test] == ["12"]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(
        load_dataset=lambda name, config: {"train": [ROW], "test": [{"question": "q"}]}))
    with pytest.raises(ValueError, match=r"openai/gsm8k\[test\] row 0: row has no 'answer'"):
        load_splits("openai/gsm8k")
    for empty in ("train", "test"):
        monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(
            load_dataset=lambda name, config, empty=empty: {"train": [ROW], "test": [ROW], empty: []}))
        with pytest.raises(ValueError, match=f"^gsm8k dataset 'openai/gsm8k' split '{empty}' has no rows$"):
            load_splits("openai/gsm8k")


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [ROW, {"question": "q2", "answer": "a\n#### 1,000"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test.parquet")
    assert read_file(tmp_path / "test.parquet") == [
        Problem(ROW["question"], "3*4=<<3*4=12>>12 eggs", "12"), Problem("q2", "a", "1000")
    ]
    pq.write_table(pa.Table.from_pylist([ROW, {"question": "q2"}]), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet row 1: row has no 'answer'"):
        read_file(tmp_path / "bad.parquet")
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": 5}]), tmp_path / "int.parquet")
    with pytest.raises(ValueError, match=r"int.parquet row 0: 'answer' must be a string, got int 5"):
        read_file(tmp_path / "int.parquet")
    pq.write_table(pa.table({"question": pa.array([], pa.string()), "answer": pa.array([], pa.string())}),
                   tmp_path / "empty.parquet")
    with pytest.raises(ValueError, match=r"empty.parquet has no rows"):
        read_file(tmp_path / "empty.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"junk.parquet.*not a parquet file"):
        read_file(tmp_path / "junk.parquet")


# --- the task ---------------------------------------------------------------------------------


@pytest.fixture
def small(tmp_path) -> GSM8KTask:
    rows = [json.dumps({"question": f"q{i}", "answer": f"{i}+1=<<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"})
            for i in range(6)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    return make_task(TaskConfig(name="gsm8k", data=str(path), test_size=2, format="tool"))


def test_make_task_builds_each_task_from_its_config(small):
    assert set(TASKS) == {"arithmetic", "gsm8k", "dataset", "short_answer"}
    assert isinstance(small, GSM8KTask) and small.name == "gsm8k"
    assert (small.format, small.extract, small.math_verify) == ("tool", "strict", False)
    assert [p.question for p in small.test] == ["q0", "q1"]
    arith = make_task(TaskConfig(test_size=7, test_seed=3, teacher_error=0.0))
    assert isinstance(arith, ArithmeticTask) and len(arith.test) == 7 and arith.teacher_error == 0.0
    assert [p.question for p in arith.test] == [p.question for p in ArithmeticTask(7, 3, 0.0).test]


@pytest.mark.parametrize(("fmt", "extract"), [("hash", "strict"), ("xml", "xml"), ("tool", "strict")])
def test_default_extraction_follows_the_format(fmt, extract):
    assert GSM8KTask([], [], fmt).extract == extract
    assert GSM8KTask([], [], fmt, extract="flexible").extract == "flexible"


def test_bad_format_and_extract_names():
    with pytest.raises(ValueError, match="did you mean 'xml'"):
        GSM8KTask([], [], "xlm")
    with pytest.raises(ValueError, match="did you mean 'flexible'"):
        GSM8KTask([], [], "hash", extract="flexibel")


def test_task_interface(small):
    r1, r2 = random.Random(0), random.Random(0)
    assert [small.sft_example(r1) for _ in range(4)] == [small.sft_example(r2) for _ in range(4)]
    assert {small.train_problem(random.Random(s)).question for s in range(40)} == {"q2", "q3", "q4", "q5"}
    conv = small.prompt(small.test[0])
    assert conv["answer"] == "1" and [m["role"] for m in conv["messages"]] == ["user"]
    assert small.columns(conv) == {"answer": "1", "extract": "strict"}
    assert small.reward(conv, "<|tool_start|>0+1<|tool_end|><|output_start|>1<|output_end|>\n#### 1") == 1.0
    assert type(small.reward(conv, "#### 2")) is float and small.reward(conv, "#### 2") == 0.0
    texts = small.corpus(random.Random(0), n=3)
    assert all(isinstance(t, str) for t in texts) and sum(t.endswith(HASH_INSTRUCTION) for t in texts) == 3


def test_no_training_rows_is_a_clear_error():
    with pytest.raises(ValueError, match=r"^gsm8k: no training rows \(1 test rows; .*test_size 0 makes every row"):
        GSM8KTask([], [Problem("q", "", "1")]).train_problem(random.Random(0))


def test_evaluate_delegates_to_evaluate_task(small, monkeypatch):
    seen = {}

    def fake(engine, task, problems, config, world=None):
        seen.update(engine=engine, task=task, problems=problems, world=world)
        return {"eval/pass@1": 0.5}

    monkeypatch.setattr("posttrain.tasks.gsm8k.evaluate_task", fake)
    config = type("EvalConfig", (), {"problems": 1})()
    assert small.evaluate("engine", config) == {"eval/pass@1": 0.5}
    assert seen == {"engine": "engine", "task": small, "problems": small.test[:1], "world": None}
    small.evaluate("engine", config, world="the ranks")
    assert seen["world"] == "the ranks"  # a data-parallel run's world goes through


def test_samples_log_the_question_not_the_system_prompt_for_the_xml_format():
    """samples.jsonl's prompt is the conversation's last message: the question (xml puts a system turn first)."""
    from types import SimpleNamespace

    import torch

    from posttrain.tasks.gsm8k import conversation
    from posttrain.trainers.rl import log_samples

    problem = Problem("Tom has 3 apples and buys 4 more. How many now?", "3 + 4 = 7", "7")
    logged = []
    ro = SimpleNamespace(convs=[conversation(problem, "xml")], texts=["<answer>7</answer>", "x"],
                         breakdown=[{"task": 1.0}, {"task": 0.0}], extra=[{}, {}])
    log_samples(SimpleNamespace(sample=logged.append), 3, ro, torch.tensor([1.0, 0.0]), torch.ones(2, 4),
                torch.ones(2, 4), group_size=2)
    assert conversation(problem, "xml")["messages"][0]["role"] == "system"
    assert [row["prompt"] for row in logged] == [problem.question]
