"""The reward library: functions of a completion (its text, its length) that give each sequence a scalar.

Two kinds: tensor shaping (`overlong_penalty`: lengths (B,) -> (B,), no gradient) and rule rewards over
texts with TRL's signature (see below; :mod:`posttrain.rewards.calls` is how they are called), combined
with weights by :class:`posttrain.rewards.RewardSet`.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from posttrain.evaluation import majority
from posttrain.rewards.answers import ANSWER_REWARDS
from posttrain.rewards.calls import Completion, Prompt, groups, per_sample, texts
from posttrain.tasks.gsm8k import extract_answer, is_correct, same_number


@torch.no_grad()
def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025), completion lengths (B,) -> penalty (B,).

    With L = completion length, L_max = max_len, L_cache = buffer, f = factor:
        0                                      if L ≤ L_max − L_cache
        ((L_max − L_cache) − L) / L_cache · f  if L_max − L_cache < L ≤ L_max
        −f                                     if L > L_max
    i.e. a linear ramp from 0 down to −factor over the last `buffer` tokens before max_len. It is added
    to the task reward. `factor` is the ramp's depth (verl's penalty_factor); the paper has factor = 1.
    A completion cut off by the generation limit has L = max_len and already gets −factor.
    """
    if not 1 <= buffer <= max_len:
        raise ValueError(f"overlong buffer must be in 1..max_len={max_len}, got {buffer}")
    length = lengths if lengths.is_floating_point() else lengths.to(torch.get_default_dtype())  # (B,)
    start = max_len - buffer  # last length without penalty
    ramp = (start - length) / buffer * factor  # (B,)
    penalty = torch.where(length > max_len, torch.full_like(length, -factor), ramp)  # (B,)
    return torch.where(length <= start, torch.zeros_like(length), penalty)  # (B,)


# --- rule rewards over completion texts ---------------------------------------------------------
#
# TRL's reward-function signature, called with keyword arguments (posttrain.rewards.calls):
# f(prompts, completions, **columns) -> list[float | None], one value per completion, None where the
# function does not apply to that sample. Columns are lists with one
# entry per completion: `answer` (the normalised gold), `group_ids` (samples of one prompt share an
# id), `lengths` (completion tokens), and the task's own columns, e.g. `extract` (its answer extraction
# mode: strict | flexible | xml). Every built-in takes **kwargs so it ignores columns it does not use, and
# reads a conversational completion ([{"role": "assistant", "content": ...}]) as its text (`texts`).
# Without an `extract` column the answer is read in "strict" mode (the number after the last '####').
# A reward that needs the whole group (a vote, a rank) is written per group and wrapped by `group_reward`.

# The completion is the policy's (attacker-controlled) text: every reward here runs in time linear in its length
# (str.find scans, no backtracking regex over it); tests/test_reward_fuzz.py holds them to that.
_XML_TAGS = ("<reasoning>\n", "\n</reasoning>\n", "\n<answer>\n", "\n</answer>")
_TAGS = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")
_INTEGER = re.compile(r"-?\d+")


def _modes(extract: str | Sequence[str] | None, n: int) -> list[str]:
    """Per-sample extraction modes from an `extract` column, a single mode, or None ("strict")."""
    if extract is None or isinstance(extract, str):
        return [extract or "strict"] * n
    return list(extract)


def correctness(
    prompts: list[Prompt],
    completions: list[Completion],
    answer: Sequence[str | None],
    extract: str | Sequence[str] | None = None,
    correct: float = 2.0,
    partial: float = 1.0,
    **kwargs,
) -> list[float | None]:
    """r = `correct` (2.0) if the answer read in the sample's mode equals the gold (`is_correct`);
    `partial` (1.0) if only the last number in the text does (right number, wrong format); else 0.
    None for a sample without a gold answer."""
    out: list[float | None] = []
    for text, gold, mode in zip(texts(completions), answer, _modes(extract, len(completions)), strict=True):
        if gold is None:
            out.append(None)
        elif is_correct(text, gold, mode):
            out.append(correct)
        else:
            out.append(partial if is_correct(text, gold, "flexible") else 0.0)
    return out


def format_strict(prompts: list[Prompt], completions: list[Completion], **kwargs) -> list[float | None]:
    """r = 0.5 if the whole completion is ``<reasoning>\\n…\\n</reasoning>\\n<answer>\\n…\\n</answer>\\n``
    (neither body holding a tag; the final newline may be missing, as when generation stops right
    after the tag), else 0."""
    return [0.5 if _strict_xml(text) else 0.0 for text in texts(completions)]


def _strict_xml(text: str) -> bool:
    """``<reasoning>\\n B1 \\n</reasoning>\\n<answer>\\n B2 \\n</answer>`` and an optional newline, the bodies B1, B2
    not empty and holding no tag: B1 ends where the first ``</reasoning>`` after the head begins (less its newline),
    B2 where the text's closing ``\\n</answer>`` does."""
    head, middle, tail = "<reasoning>\n", "\n</reasoning>\n<answer>\n", "\n</answer>"
    if not text.startswith(head):
        return False
    end1 = text.find("</reasoning>", len(head)) - 1
    if end1 <= len(head) or not text.startswith(middle, end1):
        return False
    start2 = end1 + len(middle)
    end2 = len(text) - len(tail) - text.endswith("\n")
    if end2 <= start2 or not text.startswith(tail, end2):
        return False
    bodies = (text[len(head) : end1], text[start2:end2])
    return not any(tag in body for body in bodies for tag in _TAGS)


def format_soft(prompts: list[Prompt], completions: list[Completion], **kwargs) -> list[float | None]:
    """r = 0.5 if ``<reasoning>…</reasoning>``, optional whitespace, ``<answer>…</answer>`` appears
    anywhere in the completion (any text inside, newlines included), else 0."""
    return [0.5 if _soft_xml(text) else 0.0 for text in texts(completions)]


def _soft_xml(text: str) -> bool:
    """Whether some ``</reasoning>``, whitespace, ``<answer>`` has a ``<reasoning>`` ending before it and a
    ``</answer>`` beginning after it: the first opening and the last closing tag are the ones to try, so one
    pass over the ``</reasoning>`` tags (and the whitespace after each) decides."""
    first = text.find("<reasoning>")
    last = text.rfind("</answer>")
    if first < 0 or last < 0:
        return False
    at = text.find("</reasoning>", first + len("<reasoning>"))
    while 0 <= at < last:
        k = at + len("</reasoning>")
        while k < len(text) and text[k].isspace():
            k += 1
        if text.startswith("<answer>", k) and k + len("<answer>") <= last:
            return True
        at = text.find("</reasoning>", k)
    return False


def xml_count(prompts: list[Prompt], completions: list[Completion], **kwargs) -> list[float | None]:
    """r = 0.125 · #(tags in place) − 0.001 · len(tail), for the tags ``<reasoning>\\n``,
    ``\\n</reasoning>\\n``, ``\\n<answer>\\n``, ``\\n</answer>`` in that order.

    A tag is in place when it occurs exactly once and after every earlier tag of the list that is in
    place. tail = the text after the last ``</answer>``, stripped of surrounding whitespace (so a
    final newline costs nothing); no ``</answer>``, no tail. Up to 0.5; negative when the tail is long.
    """
    out: list[float | None] = []
    for text in texts(completions):
        placed, last = 0, -1
        for tag in _XML_TAGS:
            at = text.find(tag)
            if at > last and text.count(tag) == 1:
                placed, last = placed + 1, at
        end = text.rfind("</answer>")
        tail = text[end + len("</answer>") :].strip() if end >= 0 else ""
        out.append(0.125 * placed - 0.001 * len(tail))
    return out


def integer_answer(
    prompts: list[Prompt], completions: list[Completion], extract: str | Sequence[str] | None = None, **kwargs
) -> list[float | None]:
    """r = 0.5 if the answer read in the sample's mode is an integer ("7.0" normalises to "7"), else 0."""
    out: list[float | None] = []
    for text, mode in zip(texts(completions), _modes(extract, len(completions)), strict=True):
        got = extract_answer(text, mode)
        out.append(0.5 if got is not None and _INTEGER.fullmatch(got) else 0.0)
    return out


def group_reward(fn: Callable[..., list[float | None]]) -> Callable[..., list[float | None]]:
    """Make a reward that looks at a whole group (the G samples of one prompt) usable as a batch reward.

    ``fn(prompt=..., completions=..., **columns) -> list[float | None]`` is called once per group with
    that group's prompt, its completions and every per-sample column (a list or tensor with one entry per
    completion) cut down to the group's rows, as a list; other columns, such as a single ``extract``
    mode, are passed as is; ``log_extra`` takes the group's values. The result has TRL's batch signature
    and needs the ``group_ids`` column, which the RL loop always passes. Use it for rewards that compare
    samples: a majority vote, a length rank. ValueError when ``fn`` returns the wrong number of values for
    a group.
    """

    @functools.wraps(fn)
    def per_batch(prompts: list[Prompt], completions: list[Completion], group_ids: Sequence | None = None,
                  **columns) -> list[float | None]:
        if group_ids is None:
            raise ValueError(f"{fn.__name__} is a per-group reward: it needs the group_ids column")
        n = len(completions)
        out: list[float | None] = [None] * n
        logged: dict[str, list] = {}  # log_extra column -> its values, assembled over the groups

        def log_group(rows: list[int]) -> Callable[[str, Sequence], None]:
            def log_extra(column: str, values: Sequence) -> None:
                values = list(values)
                if len(values) != len(rows):
                    raise ValueError(f"log_extra('{column}', ...) got {len(values)} values for a group of {len(rows)}")
                for i, v in zip(rows, values, strict=True):
                    logged.setdefault(column, [None] * n)[i] = v

            return log_extra

        for rows in groups(group_ids).values():
            cut = {k: [v[i] for i in rows] if per_sample(v, n) else v for k, v in columns.items()}
            if "log_extra" in columns:
                cut["log_extra"] = log_group(rows)
            values = list(fn(prompt=prompts[rows[0]], completions=[completions[i] for i in rows], **cut))
            if len(values) != len(rows):
                raise ValueError(f"{fn.__name__} returned {len(values)} values for a group of {len(rows)}")
            for i, v in zip(rows, values, strict=True):
                out[i] = v
        for column, values in logged.items():
            columns["log_extra"](column, values)
        return out

    per_batch.per_group = True  # type: ignore[attr-defined]
    return per_batch


@group_reward
def length_penalty(
    prompt: Prompt,
    completions: list[Completion],
    answer: Sequence[str | None],
    lengths: Sequence,
    extract: str | Sequence[str] | None = None,
    **kwargs,
) -> list[float | None]:
    """Kimi k1.5's length reward (Kimi Team 2025), within each group of samples of one prompt:

        λ_i = 0.5 − (len_i − min_len) / (max_len − min_len)     (λ_i = 0 when all lengths are equal)
        r_i = λ_i if sample i is correct (`is_correct` in its mode) else min(0, λ_i)

    so among right answers shorter is better, and a wrong answer is never rewarded for being short.
    """
    modes = _modes(extract, len(completions))
    size = [float(n) for n in lengths]
    lo, hi = min(size), max(size)
    out: list[float | None] = []
    for text, gold, mode, n in zip(texts(completions), answer, modes, size, strict=True):
        lam = 0.5 - (n - lo) / (hi - lo) if hi > lo else 0.0
        ok = gold is not None and is_correct(text, gold, mode)
        out.append(lam if ok else min(0.0, lam))
    return out


@group_reward
def majority_vote(
    prompt: Prompt,
    completions: list[Completion],
    answer: Sequence[str | None],
    extract: str | Sequence[str] | None = None,
    min_votes: int = 1,
    exact: float = 2.0,
    near: float = 1.0,
    **kwargs,
) -> list[float | None]:
    """Group majority vote with partial credit.

    In each group the answers read in each sample's mode vote (a sample with no readable answer has
    no vote); ties go to the answer seen first. The vote scores `exact` (2.0) when it equals the gold
    (`same_number`), `near` (1.0) when it is off by one, else 0. A sample gets that score when its own
    answer is the voted one, 0 otherwise; everyone in the group gets 0 when the winner has fewer than
    `min_votes` votes or nobody voted.
    """
    votes = [extract_answer(text, mode) for text, mode in zip(texts(completions), _modes(extract, len(completions)),
                                                                      strict=True)]
    winner, gold = majority(votes), answer[0]
    if winner is None or gold is None or votes.count(winner) < min_votes:
        return [0.0] * len(completions)
    score = exact if same_number(winner, gold) else near if _off_by_one(winner, gold) else 0.0
    return [score if vote == winner else 0.0 for vote in votes]


def _off_by_one(a: str, b: str) -> bool:
    """|a − b| = 1 (relative tolerance 1e-6) for two number strings; False if either is not a number."""
    try:
        return math.isclose(abs(float(a) - float(b)), 1.0, rel_tol=1e-6)
    except ValueError:
        return False


REWARDS: dict[str, Callable[..., list[float | None]]] = {
    "correctness": correctness,
    "format_strict": format_strict,
    "format_soft": format_soft,
    "xml_count": xml_count,
    "integer_answer": integer_answer,
    "length_penalty": length_penalty,
    "majority_vote": majority_vote,
    **ANSWER_REWARDS,  # the dataset task's: exact_match, numeric_match, multiple_choice, regex_format
}
