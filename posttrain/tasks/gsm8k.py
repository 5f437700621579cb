"""GSM8K (Cobbe et al. 2021): grade-school math word problems with a numeric final answer.

A row is ``{"question": ..., "answer": ...}``; the answer is a worked solution with calculator
annotations and a final line, e.g. ``"She makes 9 * 2 = $<<9*2=18>>18 a day.\\n#### 18"``.

**Formats** (``TaskConfig.format``) decide what the model is asked for and what SFT teaches:

- ``hash``: the question plus an instruction; the solution is the dataset's reasoning without the
  ``<<...>>`` annotations, ending ``#### N``.
- ``xml``: a system prompt asks for ``<reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>``
  (the GRPO-on-GSM8K practice); the solution has that shape.
- ``tool``: as ``hash``, but each annotation ``<<expr=result>>`` becomes a calculator call: a
  ``tool_call`` part (expr) and a ``tool_output`` part (what ``posttrain.tools.calculate`` says, which
  is what the engine will insert at rollout). The number the dataset repeats right after an
  annotation is dropped, as the tool output already says it. An annotation whose expression the
  calculator does not evaluate to the annotated result (in the real data: ``<<3/4=3/4>>`` in one
  test row) is dropped and its surrounding text kept, exactly as in the ``hash`` format.

**Answer extraction** (``extract_answer`` modes; ``TaskConfig.extract``, default: the format's own,
hash → strict, xml → xml, tool → strict):

- ``strict``: the number right after the last ``####`` (None when that ``####`` has no number);
- ``flexible``: the last number anywhere in the text;
- ``xml``: the content of the last ``<answer>...</answer>``: normalised when it is a number, else the
  stripped text as written (it then only matches the gold through math-verify).

Numbers are normalised by ``normalize_number`` (after ``####`` a fraction or scientific notation counts whole:
"#### 3/4" is 0.75, "#### 1e3" is 1000) and compared exactly (``same_number``: "#### 1000001" is not 1000000,
"#### 17.99999" is not 18). Only the check of a solution's ``<<expr=claimed>>`` annotations against the
calculator allows a relative 1e-6 (``close_number``: the calculator returns floats).
"""

from __future__ import annotations

import random
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from posttrain.config import suggest
from posttrain.evaluation import evaluate_task
from posttrain.numbers import ANSWER_NUMBER, DIGITS, NUMBER_IN_TEXT, close_number, normalize_number, same_number
from posttrain.task_config import GSM8K_DATA
from posttrain.tasks.files import file_rows, hub_rows, load_hub, split_file
from posttrain.tools import DATA_TIMEOUT_S, calculate

FORMATS = ("hash", "xml", "tool")
EXTRACT_MODES = ("strict", "flexible", "xml")
DEFAULT_EXTRACT = {"hash": "strict", "xml": "xml", "tool": "strict"}
HASH_INSTRUCTION = "Solve it step by step, then give the final answer on its own line as '#### <number>'."
XML_SYSTEM = "Respond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>"

_NUMBER = re.compile(NUMBER_IN_TEXT)
_AFTER_HASH = re.compile(r"\s*(" + ANSWER_NUMBER + ")")  # "#### 3/4" is 3/4 and "#### 1e3" 1000, not 3 and 1
_ANNOTATION = re.compile(r"<<(.*?)>>")
_LEADING_NUMBER = re.compile(r"-?" + DIGITS)


@dataclass(frozen=True)
class Problem:
    """One GSM8K row."""

    question: str
    solution: str  # the worked solution before the final '####', calculator annotations included
    answer: str  # the final answer, normalised (see normalize_number)


# --- numbers and answers ----------------------------------------------------------------------


def extract_answer(text: str, mode: str = "strict") -> str | None:
    """The answer in a completion, normalised; None when there is none. Modes: see the module doc."""
    if mode == "strict":
        _, sep, tail = text.rpartition("####")
        found = _AFTER_HASH.match(tail) if sep else None
        return normalize_number(found.group(1)) if found else None
    if mode == "flexible":
        numbers = _NUMBER.findall(text)
        return normalize_number(numbers[-1]) if numbers else None
    if mode == "xml":
        content = _last_answer_tag(text).strip()
        return (normalize_number(content) or content) if content else None
    raise ValueError(f"unknown extract mode '{mode}'{suggest(mode, list(EXTRACT_MODES))}")


def _last_answer_tag(text: str) -> str:
    """The content of the last ``<answer>...</answer>`` pair, the pairs taken from the left, each opening tag
    with the first closing tag after it (as ``re.findall(r"<answer>(.*?)</answer>")`` would, in linear time);
    "" when there is none."""
    content, at = "", 0
    while (start := text.find("<answer>", at)) >= 0:
        end = text.find("</answer>", start + len("<answer>"))
        if end < 0:
            break
        content, at = text[start + len("<answer>") : end], end + len("</answer>")
    return content


def is_correct(completion: str, gold: str, mode: str = "flexible", math_verify: bool = False) -> bool:
    """Whether the completion's answer (``extract_answer(completion, mode)``) equals the gold.

    ``gold`` is a dataset answer field (its text after the last ``####`` is used) or a bare answer.
    Equal means ``same_number`` after normalising both. With ``math_verify`` the answer also counts
    when math-verify (the ``math-verify`` package, ``pip install 'posttrain[hf]'``) finds it
    equivalent to the gold, e.g. ``\\frac{1}{2}`` for 0.5 in an ``<answer>`` tag; if the package is not
    installed this silently falls back to the numeric comparison alone.
    """
    answer = extract_answer(completion, mode)
    if answer is None:
        return False
    gold_text = gold.rpartition("####")[2].strip()
    if same_number(answer, normalize_number(gold_text)):
        return True
    return math_verify and _math_verify_equal(gold_text, answer)


def _math_verify_equal(gold: str, answer: str) -> bool:
    """``math_verify.verify(parse(gold), parse(answer))``; False if the package is missing or fails."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return False
    # its timeouts use SIGALRM, which only works on the main thread: off it (a reward in a thread), turn them off
    on_main = threading.current_thread() is threading.main_thread()
    parse_kw = {} if on_main else {"parsing_timeout": None}
    verify_kw = {} if on_main else {"timeout_seconds": None}
    try:
        return bool(verify(parse(gold, **parse_kw), parse(answer, **parse_kw), **verify_kw))
    except Exception:  # an answer it cannot parse is not a correct one
        return False


# --- solutions in each format -----------------------------------------------------------------


def strip_annotations(solution: str) -> str:
    """The solution without its calculator annotations: "2*3=<<2*3=6>>6" → "2*3=6"."""
    return _ANNOTATION.sub("", solution)


def tool_parts(solution: str) -> list[dict]:
    """The solution as assistant parts, each annotation a calculator call and its output.

    ``"9 * 2 = $<<9*2=18>>18 a day"`` → text ``"9 * 2 = $"``, tool_call ``"9*2"``, tool_output ``"18"``,
    text ``" a day"``. An annotation the calculator does not confirm is dropped (text kept as is).
    """
    parts: list[dict] = []
    text, pos = "", 0
    for found in _ANNOTATION.finditer(solution):
        text += solution[pos : found.start()]
        pos = found.end()
        expr, _, claimed = found.group(1).rpartition("=")
        result = calculate(expr, timeout_s=DATA_TIMEOUT_S)
        if not close_number(result, normalize_number(claimed, extended=False)):  # a float against the text's
            continue
        if text:
            parts.append({"type": "text", "text": text})
        parts += [{"type": "tool_call", "text": expr.strip()}, {"type": "tool_output", "text": result}]
        text = ""
        repeated = _LEADING_NUMBER.match(solution, pos)  # "<<9*2=18>>18": the output already says 18
        if repeated and close_number(normalize_number(repeated.group()), result):
            pos = repeated.end()
    text += solution[pos:]
    if text:
        parts.append({"type": "text", "text": text})
    return parts


def solution_content(problem: Problem, fmt: str) -> str | list[dict]:
    """The assistant's worked solution in ``fmt``: a string (hash, xml) or a list of parts (tool)."""
    if fmt == "hash":
        return f"{strip_annotations(problem.solution)}\n#### {problem.answer}"
    if fmt == "xml":
        reasoning = strip_annotations(problem.solution)
        return f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{problem.answer}\n</answer>\n"
    if fmt == "tool":
        return tool_parts(f"{problem.solution}\n#### {problem.answer}")
    raise ValueError(f"unknown gsm8k format '{fmt}'{suggest(fmt, list(FORMATS))}")


def conversation(problem: Problem, fmt: str, solution: bool = False) -> dict:
    """The prompt in ``fmt`` (xml: a system turn; hash, tool: an instruction after the question),
    with the worked solution as the assistant turn when ``solution``; carries the gold answer."""
    if fmt == "xml":
        messages = [{"role": "system", "content": XML_SYSTEM}, {"role": "user", "content": problem.question}]
    else:
        messages = [{"role": "user", "content": f"{problem.question}\n{HASH_INSTRUCTION}"}]
    if solution:
        messages.append({"role": "assistant", "content": solution_content(problem, fmt)})
    return {"messages": messages, "answer": problem.answer}


# --- loading ----------------------------------------------------------------------------------


def to_problem(row: object, where: str) -> Problem:
    """A dataset row as a Problem; ValueError naming ``where`` if it is not an object, if ``question`` or
    ``answer`` is missing (or null), not a string or blank, or if the answer has no final ``#### N``."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with 'question' and 'answer', got {type(row).__name__}")
    for key in ("question", "answer"):
        value = row.get(key)
        if value is None:
            raise ValueError(f"{where}: row has no '{key}'")
        if not isinstance(value, str):
            raise ValueError(f"{where}: '{key}' must be a string, got {type(value).__name__} {value!r:.40}")
        if not value.strip():
            raise ValueError(f"{where}: '{key}' is empty")
    solution, sep, final = row["answer"].rpartition("####")
    answer = normalize_number(final) if sep else None
    if answer is None:
        raise ValueError(f"{where}: the answer does not end with '#### <number>'")
    return Problem(row["question"], solution.rstrip(), answer)


def read_file(path: Path) -> list[Problem]:
    """The problems in a .jsonl or .parquet file; ValueError if it has none (see ``files.file_rows``)."""
    return [to_problem(row, where) for where, row in file_rows(path, "gsm8k")]


def _read_hub(dataset_id: str) -> tuple[list[Problem], list[Problem]]:
    """(train, test) problems of hub dataset ``dataset_id``, config ``main``."""
    loaded = load_hub(dataset_id, "main", "gsm8k")
    train, test = ([to_problem(row, where) for where, row in hub_rows(loaded, dataset_id, split, "gsm8k")]
                   for split in ("train", "test"))
    return train, test


def load_splits(data: str, test_size: int = 0) -> tuple[list[Problem], list[Problem]]:
    """(train, test) problems from ``data``; the test split is cut to its first ``test_size`` rows (0: all).

    ``data`` is a directory holding ``train`` and ``test`` .jsonl/.parquet files; or one such file,
    whose first ``test_size`` rows are the test split and the rest the training split (test_size 0:
    every row is test, nothing to train on); or, when no such path exists, a Hugging Face hub dataset
    id (e.g. ``openai/gsm8k``, config ``main``), which needs ``datasets``.
    """
    path = Path(data).expanduser()
    if path.is_dir():
        train, test = (read_file(split_file(path, split, "gsm8k")) for split in ("train", "test"))
    elif path.is_file():
        rows = read_file(path)
        cut = test_size or len(rows)
        return rows[cut:], rows[:cut]
    else:
        train, test = _read_hub(data)
    return train, test[:test_size] if test_size else test


# --- the task ---------------------------------------------------------------------------------


class GSM8KTask:
    """GSM8K word problems in one prompt format, with a 0/1 reward from the configured extraction."""

    name = "gsm8k"

    def __init__(
        self,
        train: list[Problem],
        test: list[Problem],
        format: str = "hash",
        extract: str | None = None,
        math_verify: bool = False,
    ):
        if format not in FORMATS:
            raise ValueError(f"unknown gsm8k format '{format}'{suggest(format, list(FORMATS))}")
        if extract is not None and extract not in EXTRACT_MODES:
            raise ValueError(f"unknown gsm8k extract mode '{extract}'{suggest(extract, list(EXTRACT_MODES))}")
        self.train, self.test = train, test
        self.format = format
        self.extract = extract or DEFAULT_EXTRACT[format]
        self.math_verify = math_verify

    @classmethod
    def from_config(cls, config) -> GSM8KTask:
        """The task described by a TaskConfig (data, test_size, format, extract, math_verify)."""
        train, test = load_splits(config.data or GSM8K_DATA, config.test_size)
        return cls(train, test, config.format or "hash", config.extract, config.math_verify)

    def check(self, stage: str) -> None:
        """Nothing to check: every stage (sft, rl, eval) can use this task's problems."""

    def train_problem(self, r: random.Random) -> Problem:
        """A training problem drawn uniformly at random."""
        self._check_train()
        return r.choice(self.train)

    def train_pool(self, size: int, r: random.Random) -> list[Problem]:
        """The problems RL's prompt sampling draws from: the train split (``size`` 0), or ``size`` of its
        rows picked with ``r``, in split order."""
        self._check_train()
        if size > len(self.train):
            raise ValueError(f"prompt_sampling.pool_size={size} is larger than the gsm8k train split "
                             f"({len(self.train)} rows)")
        if size == 0:
            return list(self.train)
        return [self.train[i] for i in sorted(r.sample(range(len(self.train)), size))]

    def difficulty(self, problem: Problem) -> float:
        """The difficulty label the curriculum orders by: the number of ``<<…>>`` calculator annotations
        in the dataset's solution (its calculation steps)."""
        return float(len(_ANNOTATION.findall(problem.solution)))

    def _check_train(self) -> None:
        if not self.train:
            raise ValueError(f"gsm8k: no training rows ({len(self.test)} test rows; a single data file trains on the "
                             "rows after the first task.test_size, and test_size 0 makes every row a test row)")

    def sft_example(self, r: random.Random) -> dict:
        """A training conversation with the dataset's worked solution in this format."""
        return conversation(self.train_problem(r), self.format, solution=True)

    def prompt(self, problem: Problem) -> dict:
        """The conversation the model answers (no assistant turn), carrying the gold answer."""
        return conversation(problem, self.format)

    def reward(self, conv: dict, completion: str) -> float:
        """1.0 when the completion's answer (this task's extraction mode) equals the gold, else 0.0:
        ``float(grade(conv, completion)["exact"])``."""
        return float(is_correct(completion, conv["answer"], self.extract, self.math_verify))

    def grade(self, conv: dict, completion: str) -> dict:
        """How a completion fares, for the eval report:

        - ``answer``: ``extract_answer(completion, self.extract)``, None when it has none;
        - ``format``: the answer can be read in the required format (``answer`` is not None);
        - ``plausible``: the gold is the completion's last number (flexible extraction matches);
        - ``exact``: the required-format answer equals the gold (math-verify too when on): the reward.
        """
        answer = extract_answer(completion, self.extract)
        return {
            "answer": answer,
            "format": answer is not None,
            "plausible": is_correct(completion, conv["answer"], "flexible"),
            "exact": is_correct(completion, conv["answer"], self.extract, self.math_verify),
        }

    def columns(self, conv: dict) -> dict:
        """Dataset columns for reward functions: the gold ``answer`` and the ``extract`` mode."""
        return {"answer": conv["answer"], "extract": self.extract}

    def evaluate(self, engine, config, world=None) -> dict[str, float]:
        """pass@k, mean reward and completion length on the first ``config.problems`` test problems (split
        over the ranks of ``world``, the same numbers on every rank)."""
        return evaluate_task(engine, self, self.test[: config.problems], config, world=world)

    def corpus(self, r: random.Random, n: int = 2000) -> list[str]:
        """Texts to train the built-in tokenizer on: every text of ``n`` training conversations."""
        texts = []
        for _ in range(n):
            for message in self.sft_example(r)["messages"]:
                content = message["content"]
                texts += [content] if isinstance(content, str) else [part["text"] for part in content]
        return texts
