"""Short-answer questions: one step of arithmetic, comparison, counting or unit conversion, answered in a short
reply that ends with the number. Made for small pretrained chat models (SmolLM2-135M-Instruct), which can do one
step but ramble: a strict answer format is the first thing RL must teach them, and correctness the second.

**Skills** (``task.skill``), each a generator of questions with an integer answer:

- ``add``: one-digit addition, "What is 7 + 5?";
- ``add2``: two-digit addition, "What is 23 + 48?";
- ``multiply``: one-digit multiplication, "What is 7 × 5?";
- ``subtract``: a two-digit number minus a one-digit one, "What is 43 - 8?";
- ``compare``: "Which number is larger: 37 or 52?";
- ``letters``: "How many letters are in the word "garden"?";
- ``convert``: "How many minutes are in 4 hours?" (one of minutes, seconds, days, centimeters, grams, ...);
- ``word``: a one-step word problem, "Ann has 7 pens and gets 5 more. How many pens does Ann have now?";
- ``mixed``: every skill above;
- a comma-separated list of skills (``add,subtract,multiply,word``).

Each training question's skill is drawn uniformly from the task's skills, then a question of that skill that is
not in the test split. The test split (``test_size`` questions, fixed by ``test_seed``) holds the skills in equal
shares, in turn, except that a skill gives it at most half of its distinct questions (one-digit addition has 81,
multiplication 64): the rest of its share goes to the other skills, and every skill keeps questions to train on.

Every question ends with ``INSTRUCTION`` ("Keep it short and end with the answer.").

**Two graders.** ``strict`` (the task's reward, what RL trains on and ``eval/pass@k`` counts): the reply ends with
a number equal to the gold (a final period allowed; "9 × 3 = 27.", "The answer is 27", "27"; not "27 eggs", not
"27 or 28", not "**27**"). Only the last number counts: listing candidates is no better than committing to the last
one. ``lenient``
(``eval/lenient/pass@k``, reported beside it): the gold is one of the numbers anywhere in the reply. A gain in
the lenient score shows that answers got more often right, not only better formatted; it overstates a rambling
model's skill (the ``compare`` question holds its answer, and a reply may list several numbers), so it is a
ceiling on what the model knows, the strict score a floor.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from posttrain.config import ConfigError, suggest
from posttrain.evaluation import evaluate_task
from posttrain.numbers import NUMBER_IN_TEXT, normalize_number
from posttrain.task_config import SHORT_ANSWER_SKILLS
from posttrain.tasks.arithmetic import ITEMS, NAMES

INSTRUCTION = "Keep it short and end with the answer."
WORDS = ("cat", "sun", "tree", "book", "lamp", "river", "garden", "window", "pencil", "orange", "planet",
         "bottle", "castle", "dragon", "ladder", "market", "silver", "yellow", "chicken", "blanket", "kitchen",
         "library", "mountain", "elephant", "computer", "sandwich", "umbrella", "butterfly", "chocolate",
         "adventure")
UNITS = (  # (big unit, small unit, how many small in one big)
    ("hours", "minutes", 60), ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7),
    ("meters", "centimeters", 100), ("kilometers", "meters", 1000), ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000), ("dozens", "eggs", 12), ("years", "months", 12),
)
_NUMBER = re.compile(NUMBER_IN_TEXT)
_FINAL_NUMBER = re.compile(r"(?<![\w.,$\u2212-])(-?\d[\d,]*)\.?\s*$")  # the number a reply ends with ("... = 27.")
CANDIDATE_DRAWS = 20  # draws per held-out question when listing a skill's candidates for the test split


@dataclass(frozen=True)
class Problem:
    """One question and its gold answer (an integer, as text)."""

    question: str
    answer: str
    skill: str


def _add(r: random.Random) -> Problem:
    a, b = r.randint(1, 9), r.randint(1, 9)
    return Problem(f"What is {a} + {b}?", str(a + b), "add")


def _add2(r: random.Random) -> Problem:
    a, b = r.randint(10, 99), r.randint(10, 99)
    return Problem(f"What is {a} + {b}?", str(a + b), "add2")


def _multiply(r: random.Random) -> Problem:
    a, b = r.randint(2, 9), r.randint(2, 9)
    return Problem(f"What is {a} × {b}?", str(a * b), "multiply")


def _subtract(r: random.Random) -> Problem:
    a, b = r.randint(10, 99), r.randint(1, 9)
    return Problem(f"What is {a} - {b}?", str(a - b), "subtract")


def _compare(r: random.Random) -> Problem:
    a, b = r.sample(range(10, 100), 2)
    return Problem(f"Which number is larger: {a} or {b}?", str(max(a, b)), "compare")


def _letters(r: random.Random) -> Problem:
    word = r.choice(WORDS)
    return Problem(f'How many letters are in the word "{word}"?', str(len(word)), "letters")


def _convert(r: random.Random) -> Problem:
    big, small, factor = r.choice(UNITS)
    n = r.randint(2, 9)
    return Problem(f"How many {small} are in {n} {big}?", str(n * factor), "convert")


def _word(r: random.Random) -> Problem:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(2, 20), r.randint(2, 20)
    if r.random() < 0.5:
        return Problem(f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
                       str(a + b), "word")
    a += b
    return Problem(f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have now?",
                   str(a - b), "word")


SKILLS: dict[str, Callable[[random.Random], Problem]] = {
    "add": _add, "add2": _add2, "multiply": _multiply, "subtract": _subtract, "compare": _compare,
    "letters": _letters, "convert": _convert, "word": _word,
}
assert tuple(SKILLS) == SHORT_ANSWER_SKILLS  # the config checks skill names against that list


def skill_list(skill: str) -> list[str]:
    """The skills named by ``skill`` (one, a comma-separated list, or ``mixed``: all); ConfigError naming a bad one."""
    if skill.strip() == "mixed":
        return list(SKILLS)
    names = [s.strip() for s in skill.split(",")]
    for name in names:
        if name not in SKILLS:
            raise ConfigError(f"unknown short_answer skill '{name}'{suggest(name, [*SKILLS, 'mixed'])}")
    return names


def held_out_split(skills: list[str], size: int, r: random.Random) -> list[Problem]:
    """``size`` distinct questions, the skills in turn, in equal shares where each skill has room: a skill gives at
    most half of the distinct questions found in ``CANDIDATE_DRAWS · size`` draws of it (all of a small skill's
    questions are found, so half of them stay for training; a large one is never capped). ConfigError when the
    skills together have no room for ``size``."""
    candidates = {}
    for skill in skills:
        found: dict[str, Problem] = {}
        for _ in range(CANDIDATE_DRAWS * size):
            p = SKILLS[skill](r)
            found.setdefault(p.question, p)
        candidates[skill] = list(found.values())[: len(found) // 2]
    room = sum(len(c) for c in candidates.values())
    if room < size:
        raise ConfigError(f"task.test_size={size}: the short_answer skills {','.join(skills)} have room for {room} "
                          "held-out questions (half of each skill's questions stay for training); lower it or add "
                          "skills")
    out, turn = [], [iter(c) for c in candidates.values()]
    while len(out) < size:  # round robin; a skill out of room drops out of the turn
        for it in list(turn):
            p = next(it, None)
            if p is None:
                turn.remove(it)
            elif len(out) < size:
                out.append(p)
    return out


def final_number(completion: str) -> str | None:
    """The number the reply ends with (a final period allowed), normalised; None when it ends otherwise."""
    found = _FINAL_NUMBER.search(completion)
    return normalize_number(found.group(1), extended=False) if found else None


def strict_correct(completion: str, gold: str) -> bool:
    """The reply ends with a number equal to ``gold`` ("12", "8 + 4 = 12.", "1,200"; not "12 apples")."""
    return final_number(completion) == gold


def lenient_correct(completion: str, gold: str) -> bool:
    """``gold`` is one of the numbers written anywhere in the reply."""
    return any(normalize_number(n, extended=False) == gold for n in _NUMBER.findall(completion))


class ShortAnswerTask:
    """Generated one-step questions with an integer answer (module doc); reward: the strict grader."""

    name = "short_answer"
    extra_grades = {"lenient": lambda conv, completion: lenient_correct(completion, conv["answer"])}

    def __init__(self, skill: str = "mixed", test_size: int = 256, test_seed: int = 1234):
        self.skill, self.skills = skill, skill_list(skill)
        self.test = held_out_split(self.skills, test_size, random.Random(test_seed))
        self._test_questions = {p.question for p in self.test}

    @classmethod
    def from_config(cls, config) -> ShortAnswerTask:
        """The task described by a TaskConfig (skill, test_size, test_seed)."""
        return cls(skill=config.skill or "mixed", test_size=config.test_size, test_seed=config.test_seed)

    def check(self, stage: str) -> None:
        """Nothing to check: SFT (gold replies), RL and evaluation all work on generated questions, and every skill
        keeps training questions (``held_out_split``)."""

    def train_problem(self, r: random.Random) -> Problem:
        """A question of a skill drawn uniformly, drawn again until it is not in the test split (half of a small
        skill's questions stay out of it)."""
        make = SKILLS[r.choice(self.skills)]
        while True:
            p = make(r)
            if p.question not in self._test_questions:
                return p

    def train_pool(self, size: int, r: random.Random) -> list[Problem] | None:
        """``size`` distinct training questions generated once from ``r``; None for size 0 (fresh ones forever)."""
        if size == 0:
            return None
        problems: dict[str, Problem] = {}
        for _ in range(200 * size):
            p = self.train_problem(r)
            problems.setdefault(p.question, p)
            if len(problems) == size:
                return list(problems.values())
        raise ConfigError(f"prompt_sampling.pool_size={size}: the short_answer skills {self.skill} have only "
                          f"{len(problems)} training questions")

    def difficulty(self, problem: Problem) -> float:
        """The number of digits in the answer (the curriculum's label)."""
        return float(len(problem.answer))

    def prompt(self, problem: Problem) -> dict:
        """The question plus ``INSTRUCTION`` as one user message, carrying the gold answer."""
        return {"messages": [{"role": "user", "content": f"{problem.question} {INSTRUCTION}"}],
                "answer": problem.answer}

    def sft_example(self, r: random.Random) -> dict:
        """A training question answered by the gold number alone (the shortest reply the strict grader takes)."""
        p = self.train_problem(r)
        conv = self.prompt(p)
        return {**conv, "messages": [*conv["messages"], {"role": "assistant", "content": p.answer}]}

    def reward(self, conv: dict, completion: str) -> float:
        """1.0 when the reply ends with the gold number (``strict_correct``), else 0.0."""
        return float(strict_correct(completion, conv["answer"]))

    def grade(self, conv: dict, completion: str) -> dict:
        """For the eval report: ``answer`` (the number the reply ends with), ``format`` (it ends with one),
        ``plausible`` (the lenient grader), ``exact`` (the strict one)."""
        final = final_number(completion)
        return {"answer": final, "format": final is not None,
                "plausible": lenient_correct(completion, conv["answer"]),
                "exact": strict_correct(completion, conv["answer"])}

    def columns(self, conv: dict) -> dict:
        """Columns for reward functions: the gold ``answer``."""
        return {"answer": conv["answer"]}

    def evaluate(self, engine, config, world=None) -> dict[str, float]:
        """pass@k (strict), ``lenient/pass@k``, mean reward and length on the first ``config.problems`` test
        questions (split over the ranks of ``world``, the same numbers on every rank)."""
        return evaluate_task(engine, self, self.test[: config.problems], config, world=world)

    def corpus(self, r: random.Random, n: int = 2000) -> list[str]:
        """Texts to train the built-in tokenizer on: questions and their answers."""
        texts = []
        for _ in range(n):
            conv = self.sft_example(r)
            texts += [m["content"] for m in conv["messages"]]
        return texts
