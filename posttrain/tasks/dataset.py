"""Your own prompts (``task: {name: dataset, data: ...}``): any prompt dataset for RL, SFT and evaluation.

**Data** (``task.data``): a ``.jsonl``, ``.json`` (a list of rows), ``.csv`` or ``.parquet`` file; a directory
of such files named by split (``train.jsonl``, ``test.parquet``, ...); a ``datasets`` ``save_to_disk``
directory; or a Hugging Face hub id (needs the hub). ``task.split`` is trained on. The held-out rows are
``task.test_split`` (a split name, or a file), cut to its first ``test_size`` rows (0: all); without one,
``test_size`` rows drawn with ``test_seed`` from the training data are held out and the rest trained on.

**A row's prompt** (``task.prompt``): the named column, either a string (one user message) or a list of
chat messages (``{"role": ..., "content": ...}``: a *conversational* prompt, as verl's parquet and TRL's
conversational datasets have it); or a template naming columns in braces (``"Q: {question}"``, a user
message; other braces stay as written). A row without that column but with ``messages`` (an SFT row) is
prompted with its messages before the last assistant turn. ``task.system`` goes first when the prompt has
no system message. The model's chat template renders the messages.

**The gold answer** (``task.answer``): the named column (dotted for nested fields), else ``answer``, else
verl's ``reward_model.ground_truth``; a row may lack it (its rewards are then None, not applicable).

**Columns for rewards**: every column of the row but the prompt column, as TRL passes them, plus ``answer``
(the gold as configured) and ``format_regex`` (when set). A row column with the name of one posttrain
passes itself (``conv``, ``group_ids``, ``lengths``, ``token_ids``, ...) is an error: rename it.

**SFT** teaches each row's ``messages`` (ending with the assistant's turn), or its prompt followed by its
``completion`` column (a string, or a list of messages).

Every row is read and checked when the task is built, before any model loads: an error names the file and
line (or row) and the columns the row has.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.evaluation import evaluate_task
from posttrain.rewards.answers import (
    ANSWER_REWARDS,
    choice_letter,
    final_answer,
    gold_letter,
    normalize_text,
    number_in,
)
from posttrain.rewards.calls import CALL_ARGS
from posttrain.tasks.files import DataError, Row, file_rows, hub_rows, load_hub, saved_dataset, split_file

WHAT = "dataset"
RESERVED = (*CALL_ARGS, "conv", "group_ids", "lengths", "token_ids")  # what posttrain passes to rewards itself
_FIELD = re.compile(r"\{(\w+)\}")  # {column} in a prompt template


@dataclass
class Example:
    """One row of the data, as the task uses it."""

    where: str  # file:line or 'dataset[split] row I', for messages
    messages: list[dict]  # the prompt: chat messages, system first when there is one
    conversational: bool  # the data gave the prompt as messages (rewards then get messages, as in TRL)
    answer: str | None  # the gold answer, or None
    columns: dict = field(default_factory=dict)  # the row's other columns, for reward functions
    sft: list[dict] | None = None  # the whole conversation to teach (None: the row has none)

    @property
    def question(self) -> str:
        """The prompt's last message as text (the eval report's 'question')."""
        content = self.messages[-1]["content"]
        return content if isinstance(content, str) else str(content)


def _lookup(row: dict, dotted: str):
    """``row[a][b]`` for ``'a.b'``; KeyError when a part is missing."""
    value = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def _is_messages(value) -> bool:
    return (isinstance(value, list | tuple) and len(value) > 0
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def _messages(value, where: str, column: str) -> list[dict]:
    """A column's value as chat messages: a list of messages as is, a string as one user message."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: '{column}' is empty")
        return [{"role": "user", "content": value}]
    if _is_messages(value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(f"{where}: '{column}' must be a string or a list of chat messages ({{'role', 'content'}}), "
                    f"got {type(value).__name__} {value!r:.60}")


class DatasetTask:
    """Prompts, gold answers and columns from your own data (module doc); the reward is ``task.reward``, one of
    posttrain.rewards.answers."""

    name = "dataset"
    default_sampling = "epoch"  # RL passes over the training rows, reshuffled each pass

    def __init__(self, train: list[Example], test: list[Example], reward: str = "exact_match",
                 format_regex: str | None = None):
        if reward not in ANSWER_REWARDS:
            raise ValueError(f"unknown dataset reward '{reward}' (valid: {', '.join(ANSWER_REWARDS)})")
        self.train, self.test = train, test
        keys = list(dict.fromkeys(k for e in train + test for k in e.columns))  # every column, first seen first
        for e in train + test:  # a row without a column gets None there, as in a datasets.Dataset
            e.columns = {k: e.columns.get(k) for k in keys}
        self.reward_name, self.reward_fn, self.format_regex = reward, ANSWER_REWARDS[reward], format_regex
        self.data, self.columns_seen = "the data", "unknown"  # for messages (from_config sets them)
        self._sft_rows: list[dict] | None = None  # sft_rows(), built once

    @classmethod
    def from_config(cls, config) -> DatasetTask:
        """Read and check every row of ``config.data`` (DataError naming the file and line on a bad one)."""
        read = _RowReader(config)
        train = read.split_rows(config.split)
        if config.test_split is not None:
            test = read.split_rows(config.test_split)
            test = test[: config.test_size] if config.test_size else test
        elif config.test_size:
            if config.test_size >= len(train):
                raise DataError(f"task.test_size={config.test_size} holds out every one of the {len(train)} rows of "
                                f"{config.data}: lower it, or name a test_split")
            held = set(random.Random(config.test_seed).sample(range(len(train)), config.test_size))
            train, test = [e for i, e in enumerate(train) if i not in held], [train[i] for i in sorted(held)]
        else:
            test = []
        task = cls(train, test, config.reward, config.format_regex)
        task.data, task.columns_seen = config.data, read.first_columns
        return task

    # --- what the trainers call -----------------------------------------------------------------

    def check(self, stage: str) -> None:
        """DataError when the data cannot serve ``stage`` (before any model loads): ``sft`` needs rows with a
        conversation to teach; ``rl`` and ``eval`` need gold answers for the task's reward (regex_format
        needs none)."""
        if stage in ("sft", "rl") and not (self.test and self._judgeable()):
            print(f"dataset: no held-out rows {'with a gold answer ' if self.test else ''}in {self.data}, so the "
                  "run has no evaluation (set task.test_split or task.test_size)")
        if stage == "sft":
            self.sft_rows()
        elif stage == "eval" and not self.test:
            raise DataError(f"{self.data}: no held-out rows to evaluate (set task.test_split, or task.test_size)")
        elif self.reward_name != "regex_format" and all(e.answer is None for e in self.train + self.test):
            raise DataError(f"{self.data}: no row has a gold answer for task.reward '{self.reward_name}' (it looks "
                            f"in task.answer, else 'answer', else 'reward_model.ground_truth'; columns: "
                            f"{self.columns_seen})")

    def train_problem(self, r: random.Random) -> Example:
        """A training row drawn uniformly at random."""
        self._check_train()
        return r.choice(self.train)

    def train_pool(self, size: int, r: random.Random) -> list[Example]:
        """The rows RL's prompt sampling draws from: every training row (``size`` 0), or ``size`` of them picked
        with ``r``, in data order."""
        self._check_train()
        if size > len(self.train):
            raise ValueError(f"prompt_sampling.pool_size={size} is larger than the dataset's training rows "
                             f"({len(self.train)})")
        if size == 0:
            return list(self.train)
        return [self.train[i] for i in sorted(r.sample(range(len(self.train)), size))]

    def difficulty(self, problem: Example) -> float:
        """No difficulty label: every row ties, so a label curriculum keeps the data's own order."""
        return 0.0

    def sft_rows(self) -> list[dict]:
        """The conversations SFT teaches, one per training row that has one, in data order (SFT passes over
        them by epochs; DataError if the data has none)."""
        if self._sft_rows is None:
            self._sft_rows = [{"messages": e.sft} for e in self.train if e.sft is not None]
        rows = self._sft_rows
        if not rows:
            raise DataError("SFT on the dataset task needs rows with 'messages' (ending with the assistant's turn) "
                            "or a 'completion' column next to the prompt")
        return rows

    def sft_example(self, r: random.Random) -> dict:
        """A training row's conversation to teach, drawn uniformly at random (DataError if the data has none)."""
        return r.choice(self.sft_rows())

    def prompt(self, problem: Example) -> dict:
        """The conversation the model answers, carrying the gold answer and the row's columns."""
        return {"messages": problem.messages, "answer": problem.answer, "conversational": problem.conversational,
                "row": problem.columns}

    def columns(self, conv: dict) -> dict:
        """Columns for reward functions: the row's own, the gold ``answer`` and ``format_regex`` when set."""
        extra = {"format_regex": self.format_regex} if self.format_regex is not None else {}
        return {**conv["row"], "answer": conv["answer"], **extra}

    def reward(self, conv: dict, completion: str) -> float:
        """The configured answer reward of one completion (None, not applicable, counts as 0.0)."""
        value = self.reward_fn([completion], **{k: [v] for k, v in self.columns(conv).items()})[0]
        return 0.0 if value is None else float(value)

    def grade(self, conv: dict, completion: str) -> dict:
        """For the eval report: ``answer`` (the final answer as the reward reads it: its number, its letter,
        or its normalised text), ``format`` (there is one), ``plausible`` and ``exact`` (the reward is 1), and
        ``gold`` (the gold read the same way, for maj@k)."""
        final = final_answer(completion)
        read = self._read(final) if final else None
        gold = conv["answer"]
        exact = self.reward(conv, completion) >= 1.0
        return {"answer": read or None, "format": bool(read), "plausible": exact, "exact": exact,
                "gold": self._read(gold.rpartition("####")[2], gold=True) if gold is not None else None}

    def _read(self, text: str, gold: bool = False) -> str | None:
        """An answer as the reward compares it: its number, its letter (a gold one may be lower case or an
        option index), or its normalised text."""
        if self.reward_name == "numeric_match":
            return number_in(text)
        if self.reward_name == "multiple_choice":
            if not gold:
                return choice_letter(text)
            return gold_letter(text)
        return normalize_text(text)

    def evaluate(self, engine, config, world=None) -> dict[str, float]:
        """pass@k, mean reward and completion length on the first ``config.problems`` held-out rows, a sample
        right when ``config.correct`` (a reward name or path; None: the task's reward) gives it at least
        ``config.correct_threshold``; {} (no evaluation; :meth:`check` said so) when nothing is held out or no
        held-out row has a gold answer for the task's reward (``posttrain eval`` checks for rows first). Split over
        the ranks of ``world``, the same numbers on every rank."""
        if not self.test:
            return {}
        if config.correct is not None:
            return evaluate_task(engine, _Judged(self, config.correct), self.test[: config.problems], config,
                                 threshold=config.correct_threshold, world=world)
        if not self._judgeable():  # nothing to check the held-out rows against
            return {}
        return evaluate_task(engine, self, self.test[: config.problems], config, world=world)

    def _judgeable(self) -> bool:
        """Whether the task's reward can judge the held-out rows (regex_format needs no gold answer)."""
        return self.reward_name == "regex_format" or any(e.answer is not None for e in self.test)

    def corpus(self, r: random.Random, n: int = 2000) -> list[str]:
        """Texts to train the built-in tokenizer on: the messages of up to ``n`` rows."""
        texts = []
        for e in r.sample(self.train, min(n, len(self.train))):
            for m in e.sft or e.messages:
                texts.append(m["content"] if isinstance(m["content"], str) else str(m["content"]))
        return texts

    def _check_train(self) -> None:
        if not self.train:
            raise ValueError("dataset: no training rows")


class _Judged:
    """The task seen by evaluation with another reward as its judge (``eval.correct``): each completion is
    scored by that function, called as the RL loop calls rewards (TRL's keywords, the row's columns, isolated
    per sample; a failure or None counts as 0)."""

    def __init__(self, task: DatasetTask, correct: str, timeout_s: float = 30.0):
        from posttrain.rewards import RewardSet  # here: the rewards import the tasks

        self.task, self.name = task, task.name
        self.judge = RewardSet({correct: 1.0}, timeout_s, fallback=0.0, max_failure_rate=1.0)

    def prompt(self, problem: Example) -> dict:
        return self.task.prompt(problem)

    def reward(self, conv: dict, completion: str) -> float:
        prompt = conv["messages"] if conv["conversational"] else conv["messages"][-1]["content"]
        reply = [{"role": "assistant", "content": completion}] if conv["conversational"] else completion
        columns = {k: [v] for k, v in self.task.columns(conv).items() if k not in ("prompt", "completion")}
        return float(self.judge.score([prompt], [reply], **columns).totals[0])


class _RowReader:
    """Reads the rows of ``config.data`` by split and turns each into an Example (module doc)."""

    def __init__(self, config):
        self.config = config
        self.path = Path(config.data).expanduser()
        self.first_columns = "none"  # the first row's columns, for messages
        self._hub = None

    def split_rows(self, split: str) -> list[Example]:
        return [self.example(row, where) for where, row in self._rows(split)]

    def _rows(self, split: str) -> Iterable[Row]:
        file = Path(split).expanduser()
        if split != self.config.split and file.suffix and file.is_file():  # a test_split given as a file
            return file_rows(file, WHAT)
        if self.path.is_file():
            if split != self.config.split:
                raise DataError(f"task.data {self.path} is one file, so it has no split '{split}': give "
                                "task.test_split as a file, or hold rows out with task.test_size")
            return file_rows(self.path, WHAT)
        if self.path.is_dir():
            saved = saved_dataset(self.path)
            return hub_rows(saved, str(self.path), split, WHAT) if saved is not None else \
                file_rows(split_file(self.path, split, WHAT), WHAT)
        if self._hub is None:
            self._hub = load_hub(self.config.data, None, WHAT)
        return hub_rows(self._hub, self.config.data, split, WHAT)

    def example(self, row: object, where: str) -> Example:
        """One row as an Example; DataError naming ``where`` and the row's columns when it does not fit."""
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a row with named columns, got {type(row).__name__}")
        if self.first_columns == "none":
            self.first_columns = ", ".join(row) or "none"
        c = self.config
        have = f"(columns: {', '.join(row) or 'none'})"
        clash = [k for k in row if k in RESERVED]
        if clash:
            raise DataError(f"{where}: column '{clash[0]}' has the name of a column posttrain passes to reward "
                            f"functions itself: rename it")
        taught = self._messages_column(row, where)
        used = None  # the column the prompt came from (not passed to rewards again)
        if _FIELD.search(c.prompt):  # a template
            missing = [name for name in _FIELD.findall(c.prompt) if name not in row]
            if missing:
                raise DataError(f"{where}: the prompt template needs column '{missing[0]}', which the row lacks {have}")
            messages = [{"role": "user", "content": _FIELD.sub(lambda m: str(row[m.group(1)]), c.prompt)}]
            conversational = False
        elif row.get(c.prompt) is not None:
            messages, conversational, used = _messages(row[c.prompt], where, c.prompt), _is_messages(row[c.prompt]), \
                c.prompt
        elif taught is not None and len(taught) > 1:  # an SFT row: prompted with what precedes the last reply
            messages, conversational = taught[:-1], True
        else:
            raise DataError(f"{where}: the row has no prompt column '{c.prompt}' {have}; set task.prompt to the "
                            "column that holds the prompt, or to a template like 'Q: {question}'")
        if c.system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": c.system}, *messages]
        sft = taught
        if sft is None and row.get("completion") is not None:
            completion = row["completion"]
            reply = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else \
                _messages(completion, where, "completion")
            sft = messages + reply
        return Example(where, messages, conversational, self._answer(row, where, have),
                       {k: v for k, v in row.items() if k != used}, sft)

    def _answer(self, row: dict, where: str, have: str) -> str | None:
        names = [self.config.answer] if self.config.answer else ["answer", "reward_model.ground_truth"]
        for name in names:
            try:
                value = _lookup(row, name)
            except KeyError:
                continue
            return None if value is None else str(value)
        if self.config.answer:
            raise DataError(f"{where}: the row has no answer column '{self.config.answer}' {have}")
        return None

    @staticmethod
    def _messages_column(row: dict, where: str) -> list[dict] | None:
        """The row's ``messages`` (an SFT conversation, ending with the assistant's turn), or None."""
        if not _is_messages(row.get("messages")):
            return None
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: 'messages' must end with the assistant's turn, ends with "
                            f"'{messages[-1]['role']}'")
        return messages
