"""Specs for ``posttrain eval``: the tasks' ``grade``, the report as a pure function of per-problem
records, and the command end to end (a tiny local Llama on GSM8K rows, a built-in GPT on arithmetic)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from posttrain.checkpoint import save_checkpoint
from posttrain.cli import app
from posttrain.engine import Engine, SamplingParams
from posttrain.eval_report import problem_record, report_ks, report_table, run_eval, summarize
from posttrain.metrics import read_jsonl
from posttrain.tasks.arithmetic import ArithmeticTask
from posttrain.tasks.gsm8k import GSM8KTask, normalize_number

DATA = Path(__file__).parents[2] / "shared/data/gsm8k"
LABELS = ("Correct format", "Plausibly correct", "Exact correct", "Input tokens", "Output tokens")


def grade(answer, fmt, plausible, exact) -> dict:
    return {"answer": answer, "format": fmt, "plausible": plausible, "exact": exact}


# --- grade ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "completion", "expected"),
    [
        ("hash", "9 * 2 = 18\n#### 18", grade("18", True, True, True)),
        ("hash", "#### 18\nCheck: 3 + 2 = 5", grade("18", True, False, True)),  # right answer, not the last number
        ("hash", "so she makes 18 dollars", grade(None, False, True, False)),  # right number, no '####'
        ("hash", "#### 17", grade("17", True, False, False)),
        ("hash", "#### $18.00.", grade("18", True, True, True)),
        ("hash", "", grade(None, False, False, False)),
        ("xml", "<reasoning>9*2</reasoning>\n<answer>\n18\n</answer>", grade("18", True, True, True)),
        ("xml", "<answer>eighteen</answer>", grade("eighteen", True, False, False)),
        ("xml", "#### 18", grade(None, False, True, False)),  # the xml format wants an <answer> tag
    ],
)
def test_gsm8k_grade(fmt, completion, expected):
    task, conv = GSM8KTask([], [], fmt), {"messages": [], "answer": "18"}
    assert task.grade(conv, completion) == expected
    assert task.reward(conv, completion) == float(expected["exact"])


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<|tool_start|>23+68<|tool_end|><|output_start|>91<|output_end|> #### 91", grade("91", True, True, True)),
        ("#### 91.0", grade("91", True, True, True)),  # normalised, so it votes with "91"
        ("#### 91 #### 90", grade("90", True, False, False)),  # the last '####' counts
        ("#### 91, from 23 and 68", grade("91", True, False, True)),
        ("the answer is 91", grade(None, False, True, False)),
        ("#### abc", grade(None, False, False, False)),
    ],
)
def test_arithmetic_grade(completion, expected):
    task, conv = ArithmeticTask(test_size=1), {"messages": [], "answer": "91"}
    assert task.grade(conv, completion) == expected
    assert task.reward(conv, completion) == float(expected["exact"])


# --- the report -------------------------------------------------------------------------------


def test_report_ks():
    assert [report_ks(k) for k in (1, 2, 3, 4, 6, 8, 16)] == [
        [1], [1, 2], [1, 2, 3], [1, 2, 4], [1, 2, 4, 6], [1, 2, 4, 8], [1, 2, 4, 8, 16]]


def hand_made_records() -> list[dict]:
    a = problem_record("qa", "18", 10, ["a1", "a2", "a3", "a4"], [5, 7, 9, 3], [
        grade("18", True, True, True), grade("18", True, False, True),
        grade("17", True, False, False), grade(None, False, True, False)])
    b = problem_record("qb", "3", 20, ["b1", "b2", "b3", "b4"], [4, 4, 16, 16], [
        grade("4", True, False, False), grade("3", True, True, True),
        grade("4", True, False, False), grade(None, False, False, False)])
    c = problem_record("qc", "7", 30, ["c1", "c2", "c3", "c4"], [16, 16, 16, 16],
                       [grade(None, False, False, False)] * 4)
    return [a, b, c]


def test_problem_record():
    a, b, c = hand_made_records()
    assert a == {
        "question": "qa", "gold": "18", "prompt_tokens": 10, "completions": ["a1", "a2", "a3", "a4"],
        "completion_tokens": [5, 7, 9, 3], "answers": ["18", "18", "17", None],
        "format": [True, True, True, False], "plausible": [True, False, False, True],
        "exact": [True, True, False, False],
        # c = 2 of n = 4: pass@1 = 2/4, pass@2 = 1 − C(2,2)/C(4,2) = 5/6; majority "18" ×2 = gold
        "pass@1": 0.5, "pass@2": pytest.approx(5 / 6), "pass@4": 1.0, "maj@4": 1.0,
    }
    # c = 1: pass@2 = 1 − C(3,2)/C(4,2) = 1/2; majority "4" ×2 beats the gold "3" ×1
    assert {k: b[k] for k in ("pass@1", "pass@2", "pass@4", "maj@4")} == {
        "pass@1": 0.25, "pass@2": pytest.approx(0.5), "pass@4": 1.0, "maj@4": 0.0}
    assert {k: c[k] for k in ("pass@1", "pass@2", "pass@4", "maj@4")} == dict.fromkeys(
        ("pass@1", "pass@2", "pass@4", "maj@4"), 0.0)
    assert json.loads(json.dumps(a)) == a  # a JSON line as is


def test_summarize_exact_numbers():
    report = summarize(hand_made_records())
    assert list(report) == [
        "problems", "samples", "format", "format_pct", "plausible", "plausible_pct", "exact", "exact_pct",
        "input_tokens_avg", "input_tokens_max", "output_tokens_avg", "output_tokens_max",
        "pass@1", "pass@2", "pass@4", "maj@4"]
    assert report == pytest.approx({
        "problems": 3, "samples": 12,
        "format": 6, "format_pct": 50.0,  # 3 + 3 + 0 of 12
        "plausible": 3, "plausible_pct": 25.0,  # 2 + 1 + 0
        "exact": 3, "exact_pct": 25.0,  # 2 + 1 + 0
        "input_tokens_avg": 20.0, "input_tokens_max": 30,  # (10 + 20 + 30) / 3
        "output_tokens_avg": 128 / 12, "output_tokens_max": 16,  # (24 + 40 + 64) / 12
        "pass@1": 0.25,  # (1/2 + 1/4 + 0) / 3
        "pass@2": 4 / 9,  # (5/6 + 1/2 + 0) / 3
        "pass@4": 2 / 3,  # (1 + 1 + 0) / 3
        "maj@4": 1 / 3,  # only the first problem's majority is the gold
    })


def test_summarize_rejects_no_records_and_mixed_sample_counts():
    a, b, _ = hand_made_records()
    with pytest.raises(ValueError, match="at least one"):
        summarize([])
    short = problem_record("q", "1", 3, ["x"], [2], [grade("1", True, True, True)])
    with pytest.raises(ValueError, match=r"same number .* \[4, 4, 1\]"):
        summarize([a, b, short])


def test_report_table_shows_counts_tokens_and_pass_at_k():
    console = Console(file=io.StringIO(), width=100)
    console.print(report_table(summarize(hand_made_records()), "gsm8k test"))
    text = console.file.getvalue()
    for expected in (*LABELS, "6/12", "50.0%", "3/12", "25.0%", "avg 20.0", "max 30", "avg 10.7", "max 16",
                     "pass@1", "0.250", "pass@2", "0.444", "pass@4", "0.667", "maj@4", "0.333"):
        assert expected in text, expected


# --- the command ------------------------------------------------------------------------------


def invoke(*args: str):
    return CliRunner().invoke(app, ["eval", *args])


def test_missing_model_path_is_a_one_line_error(tmp_path):
    missing = tmp_path / "no_such_model"
    result = invoke("--model", str(missing), "--task", "arithmetic", "--problems", "2", "--samples", "2")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: model path '{missing}' does not exist"
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("option", "message"),
    [(("--task", "gsm9k"), "error: config key 'task.name' has unknown value 'gsm9k' (did you mean 'gsm8k'?)"),
     (("--task", "arithmetic", "--split", "tset"), "error: unknown split 'tset' (did you mean 'test'?)"),
     (("--task", "arithmetic", "--split", "train"), "error: task 'arithmetic' has no fixed 'train' split")],
)
def test_bad_task_or_split_is_a_one_line_error(tmp_path, option, message):
    result = invoke("--model", str(tmp_path), *option)
    assert result.exit_code == 2
    assert result.stderr.strip().startswith(message)
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.fixture
def gpt_checkpoint(tmp_path, make_gpt, tok) -> Path:
    return save_checkpoint(tmp_path / "ckpt", make_gpt(), tok)


def test_arithmetic_on_a_builtin_checkpoint_writes_the_default_file(gpt_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ("--model", str(gpt_checkpoint), "--task", "arithmetic", "--problems", "3", "--samples", "2",
            "--max-new-tokens", "8", "--batch", "2", "--device", "cpu", "--no-progress")
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    records = read_jsonl(tmp_path / "eval_arithmetic_test.jsonl")
    assert [r["question"] for r in records] == [p.question for p in ArithmeticTask(test_size=3).test]
    assert all(len(r["completions"]) == 2 and all(1 <= n <= 8 for n in r["completion_tokens"]) for r in records)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == summarize(records) | {"grade_failures": 0}
    assert invoke(*args).exit_code == 0
    assert read_jsonl(tmp_path / "eval_arithmetic_test.jsonl") == records  # same seed, same samples; overwritten


def test_a_problems_samples_do_not_depend_on_the_batch(gpt, tok, tmp_path):
    """Problem p samples from group_seed(seed, p): the records are the same one problem per call or five."""
    task, engine = ArithmeticTask(test_size=5), Engine(gpt, tok)
    params = SamplingParams(temperature=1.0, top_k=10, max_new_tokens=8)
    for batch in (1, 5):
        run_eval(engine, task, task.test, 3, params, batch, seed=4, out=tmp_path / f"{batch}.jsonl", progress=False)
    by_one = read_jsonl(tmp_path / "1.jsonl")
    assert len({c for r in by_one for c in r["completions"]}) > 3  # samples do differ
    assert read_jsonl(tmp_path / "5.jsonl") == by_one


def test_a_grade_that_raises_counts_its_sample_wrong(gpt, tok, tmp_path, capsys):
    task, engine = ArithmeticTask(test_size=4), Engine(gpt, tok)
    calls = []

    def grade(conv, completion):
        calls.append(completion)
        if len(calls) % 2:
            raise RecursionError("maximum recursion depth exceeded")
        return ArithmeticTask.grade(task, conv, completion)

    task.grade = grade
    params = SamplingParams(temperature=1.0, top_k=10, max_new_tokens=8)
    report = run_eval(engine, task, task.test, 2, params, 4, seed=0, out=tmp_path / "e.jsonl", progress=False)
    assert report["grade_failures"] == 4 and report["samples"] == 8
    assert all(r["exact"][0] is False and r["answers"][0] is None for r in read_jsonl(tmp_path / "e.jsonl"))
    assert "grade failed on 4 of 8 samples, counted as wrong (first: RecursionError" in capsys.readouterr().err


@pytest.fixture(scope="module")
def gsm8k_dir(tmp_path_factory) -> Path:
    if not (DATA / "test.jsonl").is_file():
        pytest.skip(f"no GSM8K data at {DATA}")
    rows = (DATA / "test.jsonl").read_text(encoding="utf-8").splitlines()[:5]
    out = tmp_path_factory.mktemp("gsm8k")
    for split in ("train", "test"):  # a data dir needs both; only test is evaluated
        (out / f"{split}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return out


def test_gsm8k_end_to_end_on_a_tiny_llama(gsm8k_dir, tmp_path):
    pytest.importorskip("transformers")
    from posttrain.models.tiny_llama import make_tiny_llama

    rows = [json.loads(line) for line in (gsm8k_dir / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    model = make_tiny_llama(tmp_path / "llama", [r["question"] + r["answer"] for r in rows], vocab_size=400)
    out = tmp_path / "x.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain", "eval", "--model", str(model), "--task", "gsm8k", "--data", str(gsm8k_dir),
         "--split", "test", "--samples", "4", "--problems", "5", "--max-new-tokens", "16", "--threads", "2",
         "--no-progress", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for label in (*LABELS, "pass@1", "pass@2", "pass@4", "maj@4"):
        assert label in proc.stdout, label
    records = read_jsonl(out)
    assert [r["question"] for r in records] == [r["question"] for r in rows]
    assert [r["gold"] for r in records] == [normalize_number(r["answer"].split("####")[-1]) for r in rows]
    task = GSM8KTask([], [], "hash")
    for r in records:
        assert len(r["completions"]) == len(r["completion_tokens"]) == len(r["answers"]) == 4
        assert r["prompt_tokens"] > 0 and all(1 <= n <= 16 for n in r["completion_tokens"])
        regraded = [task.grade({"answer": r["gold"]}, c) for c in r["completions"]]
        assert [g["answer"] for g in regraded] == r["answers"]
        for flag in ("format", "plausible", "exact"):
            assert [g[flag] for g in regraded] == r[flag]
        assert all(f or not e for f, e in zip(r["format"], r["exact"], strict=True))  # exact implies format
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == summarize(records) | {"grade_failures": 0}
