"""The dataset task (your own prompts): readers, prompts, answers, held-out rows, errors before the model
loads, the answer rewards, the epoch sampler, and RL/SFT runs on a user's JSONL."""

from __future__ import annotations

import json
import random

import pytest

from posttrain.config import ConfigError, TaskConfig
from posttrain.prompt_sampling import EpochSampler, PromptSamplingConfig, make_sampler
from posttrain.rewards.answers import (
    choice_letter,
    exact_match,
    final_answer,
    multiple_choice,
    number_in,
    numeric_match,
    regex_format,
)
from posttrain.tasks import make_task
from posttrain.tasks.files import DataError

ROWS = [{"question": f"What is {a}+{b}?", "answer": str(a + b), "level": a % 3} for a, b in
        [(1, 2), (3, 4), (5, 6), (7, 8), (9, 1), (2, 2)]]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def task(data, **fields):
    return make_task(TaskConfig(name="dataset", data=str(data), **fields))


# --- reading ---------------------------------------------------------------------------------


def test_every_file_format_gives_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_jsonl(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    (tmp_path / "d.csv").write_text("question,answer,level\n" + "".join(
        f'"{r["question"]}",{r["answer"]},{r["level"]}\n' for r in ROWS))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    prompts = {}
    for suffix in ("jsonl", "json", "csv", "parquet"):
        t = task(tmp_path / f"d.{suffix}", prompt="{question}", test_size=0, reward="numeric_match")
        prompts[suffix] = [(e.messages, e.answer) for e in t.train]
    assert prompts["jsonl"] == prompts["json"] == prompts["csv"] == prompts["parquet"]
    assert prompts["jsonl"][1] == ([{"role": "user", "content": "What is 3+4?"}], "7")
    assert task(jsonl, prompt="{question}", test_size=0).train[0].where == f"{jsonl}:1"


def test_a_saved_datasets_dict_and_a_directory_of_split_files_read_by_split(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(ROWS[:4]), "test": Dataset.from_list(ROWS[4:])}).save_to_disk(
        tmp_path / "saved")
    t = task(tmp_path / "saved", prompt="{question}", test_split="test", test_size=0)
    assert [e.answer for e in t.train] == ["3", "7", "11", "15"] and [e.answer for e in t.test] == ["10", "4"]
    write_jsonl((tmp_path / "dir").mkdir() or tmp_path / "dir" / "train.jsonl", ROWS[:5])
    (tmp_path / "dir" / "valid.json").write_text(json.dumps(ROWS[5:]))
    t = task(tmp_path / "dir", prompt="{question}", test_split="valid", test_size=0)
    assert len(t.train) == 5 and [e.answer for e in t.test] == ["4"]


def test_held_out_rows_are_drawn_with_the_seed_and_leave_the_rest_in_order(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    a = task(data, prompt="{question}", test_size=2, test_seed=7)
    b = task(data, prompt="{question}", test_size=2, test_seed=7)
    assert [e.where for e in a.test] == [e.where for e in b.test] and len(a.train) == 4
    lines = [int(e.where.rsplit(":", 1)[1]) for e in a.train]
    assert lines == sorted(lines) and not {e.where for e in a.train} & {e.where for e in a.test}


def test_verl_parquet_loads_as_is(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"data_source": "gsm8k", "prompt": [{"role": "user", "content": f"Compute {i}*2."}], "ability": "math",
             "reward_model": {"style": "rule", "ground_truth": str(2 * i)}, "extra_info": {"index": i}}
            for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    t = task(tmp_path / "train.parquet", test_size=1, reward="numeric_match", system="Be brief.")
    e = t.train[0]
    assert e.conversational and e.messages[0] == {"role": "system", "content": "Be brief."}
    assert e.messages[1]["content"].startswith("Compute ") and e.answer == str(2 * int(e.messages[1]["content"][8]))
    conv = t.prompt(e)
    cols = t.columns(conv)
    assert cols["data_source"] == "gsm8k" and cols["extra_info"]["index"] >= 0 and "prompt" not in cols
    assert t.reward(conv, f"so #### {e.answer}") == 1.0 and t.reward(conv, "#### -1") == 0.0


def test_sft_rows_give_prompts_and_conversations(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"prompt": "2+2?", "completion": "4"}]
    t = task(write_jsonl(tmp_path / "d.jsonl", rows), test_size=0)
    assert t.train[0].messages == [{"role": "user", "content": "hi"}]
    assert t.train[1].sft == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert t.sft_example(random.Random(0))["messages"][-1]["role"] == "assistant"
    with pytest.raises(DataError, match="needs rows with 'messages'"):
        task(write_jsonl(tmp_path / "p.jsonl", ROWS), prompt="{question}", test_size=0).sft_example(random.Random(0))


# --- bad input: one line, naming file:line and the columns --------------------------------------


@pytest.mark.parametrize("content, fields, message", [
    ('{"question": "a", "answer": "1"}\n{"question": "b"\n', {"prompt": "{question}"}, r"d\.jsonl:2: malformed JSON"),
    ('{"q": "a", "answer": "1"}\n', {}, r"d\.jsonl:1: the row has no prompt column 'prompt' \(columns: q, answer\)"),
    ('{"q": "a", "answer": "1"}\n', {"prompt": "Q: {question}"}, r"needs column 'question'.*\(columns: q, answer\)"),
    ('{"prompt": "a", "sol": "1"}\n', {"answer": "solution"}, r"no answer column 'solution' \(columns: prompt, sol\)"),
    ('{"prompt": "a", "lengths": 3, "answer": "1"}\n', {}, r"column 'lengths' has the name of a column posttrain"),
    ("\n\n", {}, r"has no rows"),
])
def test_a_bad_data_file_is_one_line_naming_where(tmp_path, content, fields, message):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        task(tmp_path / "d.jsonl", test_size=0, **fields)


def test_rl_on_rows_without_gold_answers_is_an_error_sft_is_not(tmp_path):
    t = task(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}]), test_size=0)
    t.check("sft")
    with pytest.raises(DataError, match=r"no row has a gold answer for task.reward 'exact_match'.*columns: prompt"):
        t.check("rl")


def test_fields_of_another_task_are_config_errors():
    with pytest.raises(ConfigError, match="'task.data' does not apply to the arithmetic task"):
        TaskConfig(data="mine.jsonl")
    with pytest.raises(ConfigError, match="'task.prompt' does not apply to the gsm8k task"):
        TaskConfig(name="gsm8k", prompt="q")
    with pytest.raises(ConfigError, match="needs task.data"):
        TaskConfig(name="dataset")
    with pytest.raises(ConfigError, match="needs task.format_regex"):
        TaskConfig(name="dataset", data="x", reward="regex_format")


def test_the_cli_stops_on_bad_data_before_the_model_loads(tmp_path):
    from typer.testing import CliRunner

    from posttrain.cli import app

    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "answer": "1"}\n{"prompt": 5, "answer": "2"}\n')
    result = CliRunner().invoke(app, ["rl", "-", "task.name=dataset", f"task.data={tmp_path / 'd.jsonl'}",
                                      "task.test_size=0", f"model={tmp_path / 'no-such-model'}",
                                      f"run_dir={tmp_path / 'run'}", "--no-progress"])
    assert result.exit_code == 2
    assert "data error:" in result.output and "d.jsonl:2: 'prompt' must be a string or a list" in result.output
    assert "Traceback" not in result.output and "no-such-model" not in result.output


# --- the answer rewards --------------------------------------------------------------------------


def test_final_answer_reads_tags_boxes_hashes_then_the_last_line():
    assert final_answer("x <answer> 7 </answer> y") == "7"
    assert final_answer(r"so \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert final_answer("work\n#### 1,234\nbye") == "1,234"
    assert final_answer("first\n\nThe answer: B.\n") == "The answer: B."
    assert final_answer("") == ""
    assert final_answer(r"\boxed{open then \boxed{3}") == "3"


def test_answer_rewards_exact_values():
    done = ["The result is 42.", "#### 42.0", "<answer>forty-two</answer>", "#### 41"]
    assert numeric_match(done, answer=["42"] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert exact_match(["<answer> Paris. </answer>", "paris", "Lyon"], answer=["Paris"] * 3) == [1.0, 1.0, 0.0]
    assert exact_match(["x"], answer=[None]) == [None]
    mc = ["The answer is (C)", "C.", "Option B) fits", "answer: c"]
    assert multiple_choice(mc, answer=["C", "(c)", "1", "C"]) == [1.0, 1.0, 1.0, 0.0]
    assert regex_format(["<think>a</think>\n42", "42"], format_regex=r"<think>.*</think>\n\d+") == [1.0, 0.0]
    conversational = [[{"role": "assistant", "content": "#### 5"}]]
    assert numeric_match(conversational, answer=["5"]) == [1.0]
    assert number_in("9" * 5000) is None and choice_letter("no letter here") is None
    with pytest.raises(ValueError, match="needs the gold answer column"):
        exact_match(["x"])


# --- the epoch sampler -----------------------------------------------------------------------------


def test_epoch_sampling_draws_every_row_once_per_pass_and_resumes(tmp_path):
    t = task(write_jsonl(tmp_path / "d.jsonl", ROWS), prompt="{question}", test_size=0)
    sampler = make_sampler(PromptSamplingConfig(), t)  # the dataset task's default
    assert isinstance(sampler, EpochSampler)
    rng = random.Random(0)
    first = [sampler.draw(rng)[0] for _ in range(6)]
    second = [sampler.draw(rng)[0] for _ in range(3)]
    assert sorted(first) == list(range(6)) and first != list(range(6))
    saved = sampler.state_dict()
    rest = [sampler.draw(rng)[0] for _ in range(3)]
    assert sorted(second + rest) == list(range(6)) and second + rest != first
    again = make_sampler(PromptSamplingConfig(), t)
    again.load_state_dict(saved)
    assert [again.draw(rng)[0] for _ in range(3)] == rest
    assert sampler.metrics(0.0)["sampling/epoch"] == 2.0


# --- end to end ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from posttrain.models.tiny_llama import make_tiny_llama

    texts = [r["question"] + " " + r["answer"] for r in ROWS] * 20
    return make_tiny_llama(tmp_path_factory.mktemp("llama"), texts, vocab_size=300, hidden_size=32)


def test_rl_on_your_own_jsonl_draws_its_rows_and_scores_them(tmp_path, llama_dir):
    from posttrain.config import RLConfig, load_config
    from posttrain.metrics import read_jsonl
    from posttrain.trainers.rl import train_rl

    data = write_jsonl(tmp_path / "mine.jsonl", ROWS)
    config = load_config(RLConfig, None, [
        f"model={llama_dir}", f"run_dir={tmp_path / 'rl'}", "algorithm=grpo", "steps=3", "prompts_per_step=2",
        "samples_per_prompt=2", "sampling.max_new_tokens=6", "eval_before=false", "eval.problems=2",
        "eval.samples=1", "eval.ks=[1]", "eval.max_new_tokens=4", "threads=2", "log_samples_every=1",
        "task.name=dataset", f"task.data={data}", "task.prompt=Q: {question}", "task.test_size=2",
        "task.reward=numeric_match"])
    result = train_rl(config, progress=False)
    metrics = read_jsonl(tmp_path / "rl" / "metrics.jsonl")
    assert [m["sampling/epoch"] for m in metrics if "sampling/epoch" in m] == [0.5, 1.0, 1.5]  # 4 training rows
    samples = read_jsonl(tmp_path / "rl" / "samples.jsonl")
    questions = {f"Q: {r['question']}" for r in ROWS}
    assert samples and all(s["prompt"] in questions for s in samples)
    assert "rewards/task/mean" in metrics[-1] and metrics[-1]["rewards/task/failures"] == 0
    assert "eval/pass@1" in result["after"]


def test_posttrain_eval_scores_a_dataset_file(tmp_path, llama_dir):
    from typer.testing import CliRunner

    from posttrain.cli import app

    data = write_jsonl(tmp_path / "test.jsonl", ROWS[:3])
    out = tmp_path / "eval.jsonl"
    result = CliRunner().invoke(app, [
        "eval", "--model", str(llama_dir), "--task", "dataset", "--data", str(data), "--task-option",
        "prompt=Q: {question}", "--task-option", "reward=numeric_match", "--samples", "2", "--max-new-tokens", "4",
        "--out", str(out), "--no-progress", "--threads", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["problems"] == 3 and "pass@1" in report and "maj@2" in report
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question"] for r in records] == [f"Q: {r['question']}" for r in ROWS[:3]]
    assert [r["gold"] for r in records] == ["3", "7", "11"]


def test_sft_on_a_messages_dataset_learns(tmp_path, llama_dir):
    from posttrain.config import SFTConfig, load_config
    from posttrain.metrics import read_jsonl
    from posttrain.trainers.sft import train_sft

    rows = [{"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}],
             "answer": r["answer"]} for r in ROWS]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    config = load_config(SFTConfig, None, [
        f"model={llama_dir}", f"run_dir={tmp_path / 'sft'}", "epochs=16", "batch_size=3", "threads=2",
        "optim.lr=1e-2", "optim.warmup_steps=0", "eval.problems=2", "eval.samples=1", "eval.ks=[1]",
        "eval.max_new_tokens=4", "task.name=dataset", f"task.data={data}", "task.test_size=2",
        "task.reward=numeric_match"])
    train_sft(config, progress=False)
    assert config.steps == 22  # ⌈16 epochs · 4 training rows / 3 per step⌉
    metrics = read_jsonl(tmp_path / "sft" / "metrics.jsonl")
    assert [r["data/epoch"] for r in metrics if "data/epoch" in r][:3] == [0.75, 1.5, 2.25]  # each row once a pass
    loss = [r["loss"] for r in metrics if "loss" in r]
    assert sum(loss[-3:]) < 0.6 * sum(loss[:3])


def test_your_jsonl_and_a_trl_style_reward_file_train_with_one_command(tmp_path, llama_dir, monkeypatch):
    """The day-one path: a JSONL of your own and a reward written for TRL (keyword arguments, a dataset column),
    in a file in the working directory, one `posttrain rl` command, no PYTHONPATH."""
    from typer.testing import CliRunner

    from posttrain.cli import app
    from posttrain.metrics import read_jsonl

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "mine.jsonl", ROWS)
    (tmp_path / "my_rewards.py").write_text(
        "def level_bonus(completions, level, **kwargs):\n"
        "    return [float(x) / 2 for x in level]\n")
    result = CliRunner().invoke(app, [
        "rl", "-", f"model={llama_dir}", "run_dir=run", "algorithm=grpo", "steps=2", "prompts_per_step=2",
        "samples_per_prompt=2", "sampling.max_new_tokens=4", "eval_before=false", "eval.problems=1",
        "eval.samples=1", "eval.ks=[1]", "eval.max_new_tokens=2", "threads=2", "log_samples_every=1",
        "task.name=dataset", "task.data=mine.jsonl", "task.prompt={question}", "task.test_size=1",
        "rewards={./my_rewards.py:level_bonus: 1.0, task: 0.0}", "--no-progress"])
    assert result.exit_code == 0, result.output
    level = {r["question"]: r["level"] for r in ROWS}
    samples = read_jsonl(tmp_path / "run" / "samples.jsonl")
    assert len(samples) == 4 and all(s["rewards"]["level_bonus"] == level[s["prompt"]] / 2 for s in samples)
    assert all(m["rewards/level_bonus/failures"] == 0 for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")
               if "rewards/level_bonus/failures" in m)


def test_eval_correct_counts_a_sample_right_by_a_named_reward(tmp_path, llama_dir, monkeypatch):
    from posttrain.checkpoint import load_policy
    from posttrain.config import EvalConfig, LoraConfig, ModelConfig
    from posttrain.engine import Engine

    monkeypatch.chdir(tmp_path)
    (tmp_path / "judge.py").write_text("def by_level(completions, level, **kw):\n"
                                       "    return [float(x) for x in level]\n")
    t = task(write_jsonl(tmp_path / "d.jsonl", ROWS), prompt="{question}", test_split=str(tmp_path / "d.jsonl"),
             test_size=0)
    policy, tok = load_policy(ModelConfig(str(llama_dir)), LoraConfig())
    engine = Engine(policy.eval(), tok)
    small = dict(problems=6, samples=2, ks=(1,), max_new_tokens=2)
    share = sum(r["level"] >= 1 for r in ROWS) / len(ROWS)
    got = t.evaluate(engine, EvalConfig(**small, correct="./judge.py:by_level"))
    assert got["eval/pass@1"] == pytest.approx(share)
    assert got["eval/reward"] == pytest.approx(sum(r["level"] for r in ROWS) / len(ROWS))
    strict = t.evaluate(engine, EvalConfig(**small, correct="./judge.py:by_level", correct_threshold=2.0))
    assert strict["eval/pass@1"] == pytest.approx(sum(r["level"] >= 2 for r in ROWS) / len(ROWS))
    with pytest.raises(ConfigError, match="config key 'eval.correct': unknown reward 'no_such'"):
        EvalConfig(correct="no_such")
    from posttrain.config import RLConfig, load_config

    with pytest.raises(ConfigError, match="'eval.correct' applies to the dataset task"):
        load_config(RLConfig, None, ["eval.correct=numeric_match"])


def test_long_prompts_are_truncated_or_skipped_and_counted(tmp_path, llama_dir):
    from posttrain.checkpoint import load_policy
    from posttrain.config import LoraConfig, ModelConfig
    from posttrain.trainers.rollout import PromptLimit, draw_prompts

    rows = [{"prompt": "word " * n, "answer": "1"} for n in (2, 40, 3, 50)]
    t = task(write_jsonl(tmp_path / "d.jsonl", rows), test_size=0)
    _, tok = load_policy(ModelConfig(str(llama_dir)), LoraConfig())
    lengths = [len(tok.render_for_completion(t.prompt(e))) for e in t.train]
    limit = sorted(lengths)[1] + 1  # the two short prompts fit
    draw = make_sampler(PromptSamplingConfig(strategy="uniform"), t).draw

    def in_order():
        counter = iter(range(100))
        return lambda rng: (i := next(counter) % 4, t.train[i])

    picked, _, ids, truncated, skipped = draw_prompts(in_order(), random.Random(0), t, tok, 4, PromptLimit(limit))
    assert [i for i, _ in picked] == [0, 1, 2, 3] and (truncated, skipped) == (2, 0)
    assert [len(x) for x in ids] == [min(n, limit) for n in lengths] and ids[1] == tok.render_for_completion(
        t.prompt(t.train[1]))[-limit:]
    picked, _, ids, truncated, skipped = draw_prompts(in_order(), random.Random(0), t, tok, 3,
                                                      PromptLimit(limit, skip=True))
    assert [i for i, _ in picked] == [0, 2, 0] and (truncated, skipped) == (0, 2)
    with pytest.raises(ConfigError, match="100 prompts in a row were longer than max_prompt_length=1"):
        draw_prompts(draw, random.Random(0), t, tok, 1, PromptLimit(1, skip=True))


def test_a_task_of_your_own_is_named_by_path(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from posttrain.cli import app
    from posttrain.tasks.arithmetic import ArithmeticTask

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mytask.py").write_text(
        "from posttrain.tasks.arithmetic import ArithmeticTask\n"
        "class Doubled(ArithmeticTask):\n"
        "    name = 'doubled'\n"
        "class Broken:\n"
        "    def __init__(self, config):\n"
        "        pass\n")
    built = make_task(TaskConfig(name="./mytask.py:Doubled", test_size=3))
    assert isinstance(built, ArithmeticTask) and built.name == "doubled" and len(built.test) == 3
    with pytest.raises(ConfigError, match=r"task './mytask.py:Broken' lacks check, train_problem, .*corpus"):
        make_task(TaskConfig(name="./mytask.py:Broken"))
    with pytest.raises(ConfigError, match=r"cannot load task 'nope.py:T': no file"):
        make_task(TaskConfig(name="nope.py:T"))
    result = CliRunner().invoke(app, ["rl", "-", "task=./mytask.py:Doubled", "model=none", "--dry-run"])
    assert result.exit_code == 0, result.output


def test_model_chat_template_replaces_the_tokenizers(tmp_path, llama_dir):
    from posttrain.checkpoint import load_policy
    from posttrain.config import LoraConfig, ModelConfig

    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
               "{% if add_generation_prompt %}[assistant] {% endif %}"
    (tmp_path / "t.jinja").write_text(template)
    conv = {"messages": [{"role": "user", "content": "What is 1+2?"}]}
    for given in (template, str(tmp_path / "t.jinja")):
        _, tok = load_policy(ModelConfig(str(llama_dir), chat_template=given), LoraConfig())
        assert tok.decode(tok.render_for_completion(conv)) == "[user] What is 1+2?\n[assistant] "
    with pytest.raises(ConfigError, match=r"'model.chat_template' is neither a Jinja template .* nor an existing "
                                          r"file: t\.jinjaa"):
        load_policy(ModelConfig(str(llama_dir), chat_template="t.jinjaa"), LoraConfig())


def test_a_run_without_held_out_rows_says_it_has_no_evaluation(tmp_path, capsys):
    t = task(write_jsonl(tmp_path / "d.jsonl", ROWS), prompt="{question}", test_size=0)
    t.check("rl")
    assert "dataset: no held-out rows in " in capsys.readouterr().out
    assert t.evaluate(None, None) == {}
    rx = task(write_jsonl(tmp_path / "r.jsonl", [{"prompt": "a"}, {"prompt": "b"}]), test_size=1,
              reward="regex_format", format_regex=r"\d+")
    rx.check("rl")
    assert capsys.readouterr().out == ""  # regex_format judges held-out rows without gold answers
