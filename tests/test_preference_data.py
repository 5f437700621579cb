"""Specs for preference data: the three row shapes, validation naming file:line, files, splits, the hub."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest

from posttrain.tasks.files import file_rows
from posttrain.tasks.preference import PreferencePair, load_preferences, read_pairs, to_pair

USER = {"role": "user", "content": "2+2?"}
GOOD = {"role": "assistant", "content": "4"}
BAD = {"role": "assistant", "content": "5"}
TEXT = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}


def write_jsonl(path: Path, rows: list[object]) -> Path:
    """Rows as JSON lines; a str is written as the line itself (for blank and broken lines)."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def text_rows(n: int) -> list[dict]:
    """``n`` distinct text rows: prompt 'qI', chosen 'yesI', rejected 'noI'."""
    return [{"prompt": f"q{i}", "chosen": f"yes{i}", "rejected": f"no{i}"} for i in range(n)]


# --- the three shapes -----------------------------------------------------------------------------


def test_text_row_with_prompt_or_question():
    assert to_pair(TEXT, "f.jsonl:1") == PreferencePair([USER], "4", "5", 0.0, "f.jsonl:1")
    question = {"question": "2+2?", "chosen": "4", "rejected": "5"}
    assert to_pair(question, "f.jsonl:2") == PreferencePair([USER], "4", "5", 0.0, "f.jsonl:2")


def test_conversational_row_with_explicit_prompt_keeps_role_and_content_only():
    row = {
        "prompt": [{"role": "system", "content": "Be brief."}, {**USER, "name": "ann"}],
        "chosen": [{**GOOD, "weight": 1}],
        "rejected": [BAD],
    }
    assert to_pair(row, "w") == PreferencePair([{"role": "system", "content": "Be brief."}, USER], "4", "5", 0.0, "w")


def test_conversational_row_with_implicit_prompt_splits_off_the_shared_prefix():
    earlier = [USER, {"role": "assistant", "content": "4"}, {"role": "user", "content": "times 3?"}]
    row = {"chosen": [*earlier, {"role": "assistant", "content": "12"}],
           "rejected": [*earlier, {"role": "assistant", "content": "13"}]}
    assert to_pair(row, "w") == PreferencePair(earlier, "12", "13", 0.0, "w")


def test_margin_and_system_columns():
    pair = to_pair({**TEXT, "system": "Be brief.", "margin": 2}, "w")
    assert pair.prompt == [{"role": "system", "content": "Be brief."}, USER]
    assert pair.margin == 2.0 and isinstance(pair.margin, float)
    assert to_pair({**TEXT, "margin": -0.5}, "w").margin == -0.5
    assert to_pair({**TEXT, "margin": None, "system": None}, "w") == PreferencePair([USER], "4", "5", 0.0, "w")
    implicit = {"chosen": [USER, GOOD], "rejected": [USER, BAD], "system": "S"}
    assert to_pair(implicit, "w").prompt == [{"role": "system", "content": "S"}, USER]


def test_conversation_puts_the_reply_after_the_prompt():
    pair = to_pair({**TEXT, "system": "S"}, "w")
    system = {"role": "system", "content": "S"}
    assert pair.conversation("chosen") == {"messages": [system, USER, {"role": "assistant", "content": "4"}]}
    assert pair.conversation("rejected") == {"messages": [system, USER, {"role": "assistant", "content": "5"}]}


# --- validation: every error starts with file:line ------------------------------------------------


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (["2+2?", "4", "5"], "expected an object with 'chosen' and 'rejected', got list"),
        (None, "expected an object with 'chosen' and 'rejected', got NoneType"),
        ({"prompt": "q", "rejected": "5"}, "row has no 'chosen'"),
        ({"prompt": "q", "chosen": "4"}, "row has no 'rejected'"),
        ({"prompt": "q", "chosen": "4", "rejected": None}, "row has no 'rejected'"),
        ({"chosen": "4", "rejected": "5"}, "row has no 'prompt' (or 'question')"),
        ({"prompt": None, "chosen": "4", "rejected": "5"}, "row has no 'prompt' (or 'question')"),
        ({"prompt": "q", "chosen": 4, "rejected": "5"}, "'chosen' must be a string or a list of messages, got int 4"),
        ({"prompt": "q", "chosen": "4", "rejected": [BAD]}, "'rejected' must be a string, got list"),
        ({"prompt": [USER], "chosen": "4", "rejected": "5"}, "'prompt' must be a string, got list"),
        ({"prompt": "q", "chosen": "4", "rejected": "5", "system": 3}, "'system' must be a string, got int 3"),
        ({"prompt": "  ", "chosen": "4", "rejected": "5"}, "'prompt' is empty"),
        ({"question": "q", "chosen": "\n", "rejected": "5"}, "'chosen' is empty"),
        ({"prompt": "q", "chosen": "4", "rejected": "5", "system": " "}, "'system' is empty"),
        ({"prompt": "q", "chosen": "4", "rejected": "4"}, "chosen and rejected are the same reply"),
        ({"prompt": [USER], "chosen": [GOOD], "rejected": [GOOD]}, "chosen and rejected are the same reply"),
        ({"prompt": "q", "chosen": "4", "rejected": "5", "margin": True}, "'margin' must be a number, got bool True"),
        ({"prompt": "q", "chosen": "4", "rejected": "5", "margin": "1"}, "'margin' must be a number, got str '1'"),
        ({"prompt": "q", "chosen": "4", "rejected": "5", "margin": 1e999}, "'margin' must be finite, got inf"),
        ({"prompt": "q", "chosen": [GOOD], "rejected": [BAD]}, "'prompt' must be a list of messages, got str 'q'"),
        ({"prompt": [], "chosen": [GOOD], "rejected": [BAD]}, "'prompt' has no messages"),
        ({"prompt": [USER], "chosen": [GOOD], "rejected": "5"}, "'rejected' must be a list of messages, got str '5'"),
        ({"prompt": [USER], "chosen": [GOOD, BAD], "rejected": [BAD]},
         "'chosen' must be one assistant message, got roles ['assistant', 'assistant']"),
        ({"prompt": [USER], "chosen": [USER], "rejected": [BAD]},
         "'chosen' must be one assistant message, got roles ['user']"),
        ({"prompt": [{"content": "q"}], "chosen": [GOOD], "rejected": [BAD]}, "'prompt' message 0 has no 'role'"),
        ({"prompt": [USER], "chosen": [{"role": "assistant"}], "rejected": [BAD]},
         "'chosen' message 0 has no 'content'"),
        ({"prompt": [USER, "hi"], "chosen": [GOOD], "rejected": [BAD]},
         "'prompt' message 1 must be an object with 'role' and 'content', got str 'hi'"),
        ({"prompt": [{"role": "user", "content": [{"type": "text", "text": "q"}]}], "chosen": [GOOD],
          "rejected": [BAD]}, "'prompt' message 0 'content' must be a string, got list"),
        ({"prompt": [{"role": "user", "content": ""}], "chosen": [GOOD], "rejected": [BAD]},
         "'prompt' message 0 'content' is empty"),
        ({"chosen": [USER, GOOD], "rejected": [{"role": "user", "content": "3+3?"}, BAD]},
         "'chosen' and 'rejected' must agree on every message but the last (the prompt); they differ at message 0"),
        ({"chosen": [USER, GOOD, USER, GOOD], "rejected": [USER, BAD]}, "they differ at message 1"),
        ({"chosen": [USER, GOOD, USER], "rejected": [USER, GOOD, {"role": "user", "content": "x"}]},
         "the last message of 'chosen' must be from the assistant, got role 'user'"),
        ({"chosen": [GOOD], "rejected": [BAD]}, "'chosen' has no prompt before its reply (no 'prompt' column either)"),
        ({"chosen": [{"role": "system", "content": "S"}, USER, GOOD],
          "rejected": [{"role": "system", "content": "S"}, USER, BAD], "system": "T"},
         "row has both a 'system' column and a system message; keep one"),
    ],
)
def test_invalid_rows_name_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "pairs.jsonl", [TEXT, "", row])
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}:3: ") + ".*" + re.escape(message)):
        read_pairs(path)


def test_malformed_json_and_non_utf8_lines_name_the_line(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [TEXT, TEXT, '{"prompt": "q", "chosen": "4"'])
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}:3: malformed JSON (")):
        read_pairs(path)
    path.write_bytes(json.dumps(TEXT).encode() + b'\n{"prompt": "caf\xe9", "chosen": "4", "rejected": "5"}\n')
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}:2: not UTF-8 text (invalid continuation byte")):
        read_pairs(path)


def test_file_errors_name_the_file(tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match=f"^preference data file {re.escape(str(empty))} has no rows$"):
        read_pairs(empty)
    with pytest.raises(ValueError, match=r"^preference data file .*pairs\.txt must be \.jsonl, \.json, \.csv or "
                                         r"\.parquet$"):
        read_pairs(write_jsonl(tmp_path / "pairs.txt", ["a,b"]))
    write_jsonl(tmp_path / "train.jsonl", [TEXT])
    with pytest.raises(FileNotFoundError, match="directory .* has no test.jsonl, test.json, test.csv or test.parquet"):
        load_preferences(str(tmp_path))


def test_file_rows_yield_where_each_row_is(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"a": 1}, "", {"a": 2}])
    assert list(file_rows(path, "x")) == [(f"{path}:1", {"a": 1}), (f"{path}:3", {"a": 2})]


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{**TEXT, "margin": 1.5}, {"prompt": "3+3?", "chosen": "6", "rejected": "7", "margin": None}]
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert read_pairs(path) == [
        PreferencePair([USER], "4", "5", 1.5, f"{path} row 0"),
        PreferencePair([{"role": "user", "content": "3+3?"}], "6", "7", 0.0, f"{path} row 1"),
    ]
    conversational = [{"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}, {"chosen": [USER, GOOD],
                                                                               "rejected": [USER, GOOD]}]
    pq.write_table(pa.Table.from_pylist(conversational), tmp_path / "conv.parquet")
    with pytest.raises(ValueError, match=r"conv\.parquet row 1: chosen and rejected are the same reply"):
        read_pairs(tmp_path / "conv.parquet")


# --- splits ---------------------------------------------------------------------------------------


def test_directory_with_train_and_test_files(tmp_path):
    rows = text_rows(5)
    write_jsonl(tmp_path / "train.jsonl", rows[:2])
    write_jsonl(tmp_path / "test.jsonl", rows[2:])
    train, test = load_preferences(str(tmp_path))
    assert [p.chosen for p in train] == ["yes0", "yes1"] and [p.chosen for p in test] == ["yes2", "yes3", "yes4"]
    assert train[1].where == f"{tmp_path / 'train.jsonl'}:2"
    train, test = load_preferences(str(tmp_path), test_size=2)
    assert len(train) == 2 and [p.chosen for p in test] == ["yes2", "yes3"]


def test_single_file_holds_out_its_first_test_size_rows(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", text_rows(5))
    train, test = load_preferences(str(path), test_size=2)
    assert [p.chosen for p in test] == ["yes0", "yes1"] and [p.chosen for p in train] == ["yes2", "yes3", "yes4"]
    train, test = load_preferences(str(path))
    assert test == [] and [p.chosen for p in train] == ["yes0", "yes1", "yes2", "yes3", "yes4"]
    with pytest.raises(ValueError, match="^test_size must be 0 or more, got -1$"):
        load_preferences(str(path), test_size=-1)


def test_missing_path_without_datasets_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(FileNotFoundError, match=r"^preference data '.*no/such' is not a local .*posttrain\[hf\]'"):
        load_preferences(str(tmp_path / "no/such"))


def test_missing_path_is_loaded_as_a_hub_dataset(monkeypatch):
    seen = []

    def fake_hub(splits: dict):
        def load_dataset(name, config):
            seen.append((name, config))
            return splits
        monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))

    rows = text_rows(4)
    fake_hub({"train": rows[:2], "test": rows[2:]})
    train, test = load_preferences("org/pairs", test_size=1)
    assert seen == [("org/pairs", None)]
    assert [p.chosen for p in train] == ["yes0", "yes1"] and [p.chosen for p in test] == ["yes2"]
    assert test[0].where == "org/pairs[test] row 0"
    fake_hub({"train": rows})  # no test split: the first test_size train rows are held out
    train, test = load_preferences("org/pairs", test_size=1)
    assert [p.chosen for p in test] == ["yes0"] and [p.chosen for p in train] == ["yes1", "yes2", "yes3"]
    fake_hub({"train": [rows[0], {"prompt": "q"}]})
    with pytest.raises(ValueError, match=r"^org/pairs\[train\] row 1: row has no 'chosen'$"):
        load_preferences("org/pairs")
    fake_hub({"train": [], "test": rows})
    with pytest.raises(ValueError, match=r"^preference dataset 'org/pairs' split 'train' has no rows$"):
        load_preferences("org/pairs")
    fake_hub({"validation": rows})
    no_train = r"^preference dataset 'org/pairs' has no split 'train' \(it has: validation\)$"
    with pytest.raises(ValueError, match=no_train):
        load_preferences("org/pairs")
