"""Verifiable rewards for your own data (the dataset task): the completion's final answer against a gold
answer column, and a format check. TRL's signature: ``f(completions, answer, **kwargs) -> list[float | None]``,
one value per completion (1.0 right, 0.0 wrong, None where the row has no gold answer).

A completion may be a string or, for conversational prompts, a list of messages (read as their contents
joined, :func:`posttrain.rewards.calls.texts`). Its **final answer** (:func:`final_answer`) is the first of
these that it has:

1. the content of the last ``<answer>…</answer>``;
2. the content of the last ``\\boxed{…}`` (braces balanced);
3. the text after the last ``####``, to the end of that line;
4. its last non-empty line.

Every function here runs in time linear in the completion's length (no backtracking regex over it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from posttrain.numbers import NUMBER_IN_TEXT, normalize_number, same_number
from posttrain.rewards.calls import texts

_NUMBER = re.compile(NUMBER_IN_TEXT)
_LETTER_PATTERNS = (  # multiple choice, in order of trust:
    re.compile(r"\(([A-J])\)"),  # (B)
    re.compile(r"(?<![A-Za-z])([A-J])[.):](?!\w)"),  # B)  B.  B:
    re.compile(r"^[^\S\n]*([A-J])[^\S\n]*$", re.MULTILINE),  # a line that is one letter (spaces: not past a line)
    re.compile(r"[Aa]nswer(?: is|:)\s*(?:\*+\s*)?([A-J])(?![A-Za-z])"),  # answer is B, answer: **B
)


def _boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{…}`` whose brace is closed (its first ``}`` with balanced braces
    between), or None. One pass pairs every brace from the left (a ``}`` closes the latest open ``{``)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    closing: dict[int, int] = {}  # position of a '{' -> position of its '}'
    open_: list[int] = []
    for i, char in enumerate(text):
        if char == "{":
            open_.append(i)
        elif char == "}" and open_:
            closing[open_.pop()] = i
    while start >= 0:
        brace = start + len("\\boxed{") - 1
        if brace in closing:
            return text[brace + 1 : closing[brace]]
        start = text.rfind("\\boxed{", 0, start)
    return None


def final_answer(text: str) -> str:
    """The completion's final answer (module doc), stripped; "" when it has no text."""
    close = text.rfind("</answer>")
    if close >= 0:
        open_ = text.rfind("<answer>", 0, close)
        if open_ >= 0:
            return text[open_ + len("<answer>") : close].strip()
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    _, sep, tail = text.rpartition("####")
    if sep:
        return tail.strip().split("\n", 1)[0].strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def normalize_text(text: str) -> str:
    """Case-folded, whitespace runs as one space, without surrounding spaces, quotes, ``**`` and a final period."""
    out = " ".join(text.split()).casefold()
    out = out.strip().strip("*").strip().strip("\"'`").strip()
    return out.removesuffix(".").strip()


def number_in(text: str) -> str | None:
    """The number a text gives, normalised (``numbers.normalize_number``): the whole text if it is one, else its
    last number; None if it has none (or one too long to convert)."""
    whole = normalize_number(text)
    if whole is not None:
        return whole
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def choice_letter(text: str) -> str | None:
    """The multiple-choice letter (A–J) a text gives, by the first pattern that matches (see _LETTER_PATTERNS)."""
    for pattern in _LETTER_PATTERNS:
        found = pattern.findall(text)
        if found:
            return found[-1].upper()
    return None


def _gold(answer: Sequence | None, n: int) -> list[str | None]:
    if answer is None:
        raise ValueError("this reward needs the gold answer column 'answer' (set task.answer to the column that "
                         "holds it)")
    golds = [None if a is None else str(a) for a in answer]
    if len(golds) != n:
        raise ValueError(f"'answer' has {len(golds)} entries for {n} completions")
    return golds


def _judged(completions: list, answer: Sequence | None, right: Callable[[str, str], bool]) -> list[float | None]:
    """1.0 where ``right(final answer, gold)``, else 0.0; None where the row has no gold."""
    return [None if gold is None else float(right(final_answer(c), gold))
            for c, gold in zip(texts(completions), _gold(answer, len(completions)), strict=True)]


def gold_letter(gold: str) -> str | None:
    """A multiple-choice gold as its letter: a letter ("B", "(B)", "b.") or a 0-based option index (1 → "B")."""
    return chr(ord("A") + int(gold)) if gold.strip().isdigit() else choice_letter(gold.strip().upper())


def exact_match(completions: list, answer: Sequence | None = None, **kwargs) -> list[float | None]:
    """1.0 when the final answer equals the gold after :func:`normalize_text` (the gold's text after its last
    ``####`` when it has one), else 0.0."""
    return _judged(completions, answer,
                   lambda final, gold: normalize_text(final) == normalize_text(gold.rpartition("####")[2]))


def numeric_match(completions: list, answer: Sequence | None = None, **kwargs) -> list[float | None]:
    """1.0 when the number the final answer gives (:func:`number_in`) equals the gold's number (its text after
    the last ``####`` when it has one) exactly (``numbers.same_number``: 0.75 and 3/4 are equal), else 0.0."""
    def right(final: str, gold: str) -> bool:
        want = number_in(gold.rpartition("####")[2])
        return want is not None and same_number(number_in(final), want)

    return _judged(completions, answer, right)


def multiple_choice(completions: list, answer: Sequence | None = None, **kwargs) -> list[float | None]:
    """1.0 when the letter the final answer gives (:func:`choice_letter`) is the gold's (:func:`gold_letter`),
    else 0.0."""
    def right(final: str, gold: str) -> bool:
        want = gold_letter(gold)
        return want is not None and choice_letter(final) == want

    return _judged(completions, answer, right)


def regex_format(completions: list, format_regex: Sequence[str] | str | None = None, **kwargs) -> list[float | None]:
    """1.0 when the whole completion matches the pattern (``re.fullmatch``, ``.`` matching newlines too), else
    0.0. The pattern comes from the ``format_regex`` column (the dataset task fills it from
    ``task.format_regex``); the pattern is the user's, so its own running time is theirs."""
    if format_regex is None:
        raise ValueError("regex_format needs the 'format_regex' column (set task.format_regex)")
    patterns = [format_regex] * len(completions) if isinstance(format_regex, str) else list(format_regex)
    compiled: dict[str, re.Pattern] = {}
    out: list[float | None] = []
    for c, pattern in zip(texts(completions), patterns, strict=True):
        regex = compiled.setdefault(pattern, re.compile(pattern, re.DOTALL))
        out.append(float(regex.fullmatch(c) is not None))
    return out


ANSWER_REWARDS = {"exact_match": exact_match, "numeric_match": numeric_match, "multiple_choice": multiple_choice,
                  "regex_format": regex_format}
