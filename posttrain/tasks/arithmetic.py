"""The built-in task: multi-step arithmetic word problems solved with the calculator tool.

Problems come from a handful of templates (2–3 steps: buy packs and add, sell twice and subtract,
earn and spend, share equally, legs on a farm, ...). A worked solution writes each step as a
calculator call and ends with ``#### answer``::

    <|tool_start|>4*17<|tool_end|><|output_start|>68<|output_end|> <|tool_start|>23+68<|tool_end|>...
    #### 91

Everything is a pure function of its seed. The test split is fixed (seed ``test_seed``) and the
training generator skips any question that is in it.

**The imperfect teacher.** Real SFT data has mistakes. ``teacher_error`` is the share of training
solutions with one wrong step: a mistyped operand, a wrong operator, or a slip copying the final
answer. A model trained by imitation learns to make those slips at the same rate; the verifiable
reward lets RL unlearn them. That is the point the demo makes.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from posttrain.config import suggest
from posttrain.evaluation import evaluate_task
from posttrain.tasks.gsm8k import HASH_INSTRUCTION, is_correct, normalize_number
from posttrain.tasks.preference import PreferencePair
from posttrain.tools import DATA_TIMEOUT_S, calculate

NAMES = ("Ann", "Ben", "Cara", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivy", "Jon", "Kim", "Leo", "Mia")
ITEMS = ("apples", "pens", "cards", "books", "eggs", "shells", "stamps", "beads", "coins", "cups")
_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


@dataclass(frozen=True)
class Problem:
    """One word problem: the question, its calculator steps and the gold answer."""

    question: str
    steps: tuple[str, ...]  # calculator expressions; "{0}" is the first step's result
    answer: str


def _buy_packs(r: random.Random) -> Problem:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    a, b, c = r.randint(2, 60), r.randint(2, 9), r.randint(2, 25)
    q = f"{name} has {a} {item}. {name} buys {b} packs of {c} {item}. How many {item} does {name} have now?"
    return Problem(q, (f"{b}*{c}", f"{a}+{{0}}"), str(a + b * c))


def _sell_twice(r: random.Random) -> Problem:
    item = r.choice(ITEMS)
    b, c = r.randint(2, 40), r.randint(2, 40)
    a = b + c + r.randint(1, 60)
    q = f"A shop had {a} {item}. It sold {b} in the morning and {c} in the afternoon. How many {item} are left?"
    return Problem(q, (f"{b}+{c}", f"{a}-{{0}}"), str(a - b - c))


def _earn_spend(r: random.Random) -> Problem:
    name = r.choice(NAMES)
    a, b = r.randint(3, 30), r.randint(2, 9)
    c = r.randint(1, a * b - 1)
    q = f"{name} earns {a} dollars a day for {b} days, then spends {c} dollars. How many dollars are left?"
    return Problem(q, (f"{a}*{b}", f"{{0}}-{c}"), str(a * b - c))


def _share(r: random.Random) -> Problem:
    item = r.choice(ITEMS)
    while True:
        a, b = r.randint(2, 40), r.randint(2, 9)
        divisors = [c for c in range(2, 10) if (a * b) % c == 0]
        if divisors:
            break
    c = r.choice(divisors)
    q = (f"There are {a} boxes with {b} {item} in each. The {item} are shared equally by {c} kids. "
         f"How many {item} does each kid get?")
    return Problem(q, (f"{a}*{b}", f"{{0}}/{c}"), str(a * b // c))


def _pages_left(r: random.Random) -> Problem:
    name = r.choice(NAMES)
    a, c = r.randint(3, 30), r.randint(2, 9)
    b = a * c + r.randint(5, 150)
    q = f"{name} reads {a} pages a day. The book has {b} pages. How many pages are left after {c} days?"
    return Problem(q, (f"{a}*{c}", f"{b}-{{0}}"), str(b - a * c))


def _farm_legs(r: random.Random) -> Problem:
    a, b = r.randint(2, 40), r.randint(2, 40)
    q = f"A farm has {a} cows and {b} hens. How many legs do the animals have in total?"
    return Problem(q, (f"{a}*4", f"{b}*2", "{0}+{1}"), str(a * 4 + b * 2))


TEMPLATES: tuple[Callable[[random.Random], Problem], ...] = (
    _buy_packs, _sell_twice, _earn_spend, _share, _pages_left, _farm_legs,
)


def make_problem(r: random.Random) -> Problem:
    return r.choice(TEMPLATES)(r)


def _corrupt(step: str, r: random.Random) -> str:
    """One realistic slip in an expression: a mistyped operand or the wrong operator."""
    operands = re.findall(r"\d+", step)
    if r.random() < 0.5:
        i = r.randrange(len(operands))
        wrong = str(max(0, int(operands[i]) + r.choice((-10, -2, -1, 1, 2, 10))))
        parts = re.split(r"(\d+)", step)
        parts[2 * i + 1] = wrong
        return "".join(parts)
    op = re.search(r"[-+*/]", step).group()
    return step.replace(op, r.choice([o for o in "+-*" if o != op]), 1)


def solution_parts(problem: Problem, r: random.Random | None = None, error_rate: float = 0.0) -> list[dict]:
    """The worked solution as assistant parts; with prob. ``error_rate`` it contains one slip.

    A slip in a step carries through: later steps use the (wrong) result the calculator gave.
    """
    slip = r is not None and r.random() < error_rate
    bad_step = r.randrange(len(problem.steps) + 1) if slip else -1  # == len(steps): final copy slips
    results: list[str] = []
    parts: list[dict] = []
    for i, template in enumerate(problem.steps):
        step = template.format(*results)
        if i == bad_step:
            step = _corrupt(step, r)
        results.append(calculate(step, timeout_s=DATA_TIMEOUT_S))
        parts += [
            {"type": "tool_call", "text": step},
            {"type": "tool_output", "text": results[-1]},
            {"type": "text", "text": " "},
        ]
    final = results[-1]
    if bad_step == len(problem.steps):
        final = str(int(final) + r.choice((-10, -1, 1, 10)))
    parts.append({"type": "text", "text": f"#### {final}"})
    return parts


def rambling_parts(parts: list[dict], r: random.Random) -> list[dict]:
    """A right but rambling solution: one or two of its steps done again, right after themselves."""
    steps = [i for i, p in enumerate(parts) if p["type"] == "tool_call"]  # each step: call, output, " "
    out = list(parts)
    for i in sorted(r.sample(steps, min(len(steps), r.choice((1, 2)))), reverse=True):
        out[i + 3 : i + 3] = parts[i : i + 3]
    return out


def preference_pair(problem: Problem, r: random.Random, ramble_share: float, fmt: str = "tool") -> PreferencePair:
    """Chosen: the right, concise worked solution. Rejected: with probability ``ramble_share`` the same
    solution with repeated steps (``meta['rejected'] = 'ramble'``), else one with a slip whose final
    answer is wrong ('slip'). The preferred behaviour is checkable (right answer, no repeated step)."""
    chosen = solution_parts(problem)
    if r.random() < ramble_share:
        rejected, why = rambling_parts(chosen, r), "ramble"
    else:
        rejected, why = solution_parts(problem, r, error_rate=1.0), "slip"
        while _same_number(extract_answer(rejected[-1]["text"]) or "", problem.answer):  # a slip that cancels out
            rejected = solution_parts(problem, r, error_rate=1.0)
    content = (lambda parts: parts) if fmt == "tool" else as_text
    return PreferencePair(conversation(problem, fmt=fmt)["messages"], content(chosen), content(rejected),
                          where=f"generated:{problem.question[:40]}", meta={"answer": problem.answer, "rejected": why})


FORMATS = ("tool", "hash")  # hash: for models that never saw the built-in chat format (HF chat models)


def conversation(problem: Problem, parts: list[dict] | None = None, fmt: str = "tool") -> dict:
    """A conversation for the problem; with ``parts`` it includes the assistant's solution.

    tool: the bare question, solutions with calculator calls; hash: the question plus an instruction
    to end with '#### <number>', and the solution as plain text ``24*7=168 305-168=137 #### 137``.
    """
    question = problem.question if fmt == "tool" else f"{problem.question}\n{HASH_INSTRUCTION}"
    messages = [{"role": "user", "content": question}]
    if parts is not None:
        messages.append({"role": "assistant", "content": parts if fmt == "tool" else as_text(parts)})
    return {"messages": messages, "answer": problem.answer}


def as_text(parts: list[dict]) -> str:
    """Tool-call parts written out as text: a call and its output become ``expr=result``."""
    return "".join("=" + p["text"] if p["type"] == "tool_output" else p["text"] for p in parts)


def extract_answer(completion: str) -> str | None:
    """The number after the last ``####`` with commas removed, or None."""
    found = _ANSWER.findall(completion)
    return found[-1].replace(",", "") if found else None


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return False


class ArithmeticTask:
    """Arithmetic word problems with a fixed held-out test split and a 0/1 reward."""

    name = "arithmetic"

    def __init__(self, test_size: int = 256, test_seed: int = 1234, teacher_error: float = 0.3, format: str = "tool"):
        if format not in FORMATS:
            raise ValueError(f"unknown arithmetic format '{format}'{suggest(format, list(FORMATS))}")
        self.teacher_error, self.format = teacher_error, format
        r = random.Random(test_seed)
        problems: dict[str, Problem] = {}
        while len(problems) < test_size:
            p = make_problem(r)
            problems.setdefault(p.question, p)
        self.test: list[Problem] = list(problems.values())
        self._test_questions = set(problems)

    @classmethod
    def from_config(cls, config) -> ArithmeticTask:
        """The task described by a TaskConfig (test_size, test_seed, teacher_error, format)."""
        return cls(test_size=config.test_size, test_seed=config.test_seed, teacher_error=config.teacher_error,
                   format=config.format or "tool")

    def check(self, stage: str) -> None:
        """Nothing to check: every stage (sft, rl, eval) can use this task's problems."""

    def train_problem(self, r: random.Random) -> Problem:
        """A fresh training problem that is not in the test split."""
        while True:
            p = make_problem(r)
            if p.question not in self._test_questions:
                return p

    def train_pool(self, size: int, r: random.Random) -> list[Problem] | None:
        """``size`` distinct training problems (distinct questions, none in the test split), generated once
        from ``r``, for RL's prompt sampling; None for size 0: no pool, fresh problems forever."""
        if size == 0:
            return None
        problems: dict[str, Problem] = {}
        while len(problems) < size:
            p = self.train_problem(r)
            problems.setdefault(p.question, p)
        return list(problems.values())

    def difficulty(self, problem: Problem) -> float:
        """The difficulty label the curriculum orders by: the number of calculator steps (2 or 3)."""
        return float(len(problem.steps))

    def sft_example(self, r: random.Random) -> dict:
        """A training conversation with a teacher solution (imperfect at rate ``teacher_error``)."""
        p = self.train_problem(r)
        return conversation(p, solution_parts(p, r, self.teacher_error), self.format)

    def reward(self, conv: dict, completion: str) -> float:
        """1.0 when the completion's final ``#### N`` equals the gold answer, else 0.0:
        ``float(grade(conv, completion)["exact"])``."""
        got = extract_answer(completion)
        return float(got is not None and _same_number(got, conv["answer"]))

    def grade(self, conv: dict, completion: str) -> dict:
        """How a completion fares, for the eval report:

        - ``answer``: the number after the last ``####``, normalised (``gsm8k.normalize_number``, so
          "91.0" and "91" vote together in maj@k), None when there is none;
        - ``format``: there is a ``#### N`` answer;
        - ``plausible``: the gold is the completion's last number (``gsm8k`` flexible extraction);
        - ``exact``: the ``#### N`` answer equals the gold: the reward.
        """
        got = extract_answer(completion)
        return {
            "answer": None if got is None else normalize_number(got) or got,
            "format": got is not None,
            "plausible": is_correct(completion, conv["answer"], "flexible"),
            "exact": got is not None and _same_number(got, conv["answer"]),
        }

    def columns(self, conv: dict) -> dict:
        """Dataset columns for reward functions: the gold ``answer`` and the ``extract`` mode ('####')."""
        return {"answer": conv["answer"], "extract": "strict"}

    def evaluate(self, engine, config, world=None) -> dict[str, float]:
        """pass@k, mean reward and completion length on the first ``config.problems`` test problems (split
        over the ranks of ``world``, the same numbers on every rank)."""
        return evaluate_task(engine, self, self.test[: config.problems], config, world=world)

    def prompt(self, problem: Problem) -> dict:
        """The conversation the model answers (user turn only), carrying the gold answer."""
        return conversation(problem, fmt=self.format)

    def corpus(self, r: random.Random, n: int = 2000) -> list[str]:
        """Texts to train the built-in tokenizer on: questions and teacher solutions."""
        texts = []
        for _ in range(n):
            conv = self.sft_example(r)
            texts.append(conv["messages"][0]["content"])
            solution = conv["messages"][1]["content"]  # parts (tool format) or a string (hash format)
            texts += [solution] if isinstance(solution, str) else [part["text"] for part in solution]
        return texts
