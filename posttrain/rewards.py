"""Rule rewards and reward shaping: functions of a completion (its text, its length) that give each
sequence a scalar, added to or composed with the task's reward.

Two kinds: tensor shaping (`overlong_penalty`: lengths (B,) -> (B,), no gradient) and rule rewards
over texts with TRL's signature (see below), combined with weights by `RewardSet`.
"""

from __future__ import annotations

import functools
import importlib
import math
import re
import threading
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from posttrain.config import suggest
from posttrain.evaluation import majority
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
# TRL's reward-function signature: f(prompts, completions, **columns) -> list[float | None], one value
# per completion, None where the function does not apply to that sample. Columns are lists with one
# entry per completion: `answer` (the normalised gold), `group_ids` (samples of one prompt share an
# id), `lengths` (completion tokens), and the task's own columns, e.g. `extract` (its answer extraction
# mode: strict | flexible | xml). Every built-in takes **kwargs so it ignores columns it does not use.
# Without an `extract` column the answer is read in "strict" mode (the number after the last '####').
# A reward that needs the whole group (a vote, a rank) is written per group and wrapped by `group_reward`.

_XML_TAGS = ("<reasoning>\n", "\n</reasoning>\n", "\n<answer>\n", "\n</answer>")
_XML_BODY = r"(?:(?!</?(?:reasoning|answer)>).)+"  # any text holding no reasoning/answer tag
_XML_STRICT = re.compile(rf"<reasoning>\n{_XML_BODY}\n</reasoning>\n<answer>\n{_XML_BODY}\n</answer>\n?", re.DOTALL)
_XML_SOFT = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)
_INTEGER = re.compile(r"-?\d+")


def _modes(extract: str | Sequence[str] | None, n: int) -> list[str]:
    """Per-sample extraction modes from an `extract` column, a single mode, or None ("strict")."""
    if extract is None or isinstance(extract, str):
        return [extract or "strict"] * n
    return list(extract)


def correctness(
    prompts: list[str],
    completions: list[str],
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
    for text, gold, mode in zip(completions, answer, _modes(extract, len(completions)), strict=True):
        if gold is None:
            out.append(None)
        elif is_correct(text, gold, mode):
            out.append(correct)
        else:
            out.append(partial if is_correct(text, gold, "flexible") else 0.0)
    return out


def format_strict(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]:
    """r = 0.5 if the whole completion is ``<reasoning>\\n…\\n</reasoning>\\n<answer>\\n…\\n</answer>\\n``
    (neither body holding a tag; the final newline may be missing, as when generation stops right
    after the tag), else 0."""
    return [0.5 if _XML_STRICT.fullmatch(text) else 0.0 for text in completions]


def format_soft(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]:
    """r = 0.5 if ``<reasoning>…</reasoning>``, optional whitespace, ``<answer>…</answer>`` appears
    anywhere in the completion (any text inside, newlines included), else 0."""
    return [0.5 if _XML_SOFT.search(text) else 0.0 for text in completions]


def xml_count(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]:
    """r = 0.125 · #(tags in place) − 0.001 · len(tail), for the tags ``<reasoning>\\n``,
    ``\\n</reasoning>\\n``, ``\\n<answer>\\n``, ``\\n</answer>`` in that order.

    A tag is in place when it occurs exactly once and after every earlier tag of the list that is in
    place. tail = the text after the last ``</answer>``, stripped of surrounding whitespace (so a
    final newline costs nothing); no ``</answer>``, no tail. Up to 0.5; negative when the tail is long.
    """
    out: list[float | None] = []
    for text in completions:
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
    prompts: list[str], completions: list[str], extract: str | Sequence[str] | None = None, **kwargs
) -> list[float | None]:
    """r = 0.5 if the answer read in the sample's mode is an integer ("7.0" normalises to "7"), else 0."""
    out: list[float | None] = []
    for text, mode in zip(completions, _modes(extract, len(completions)), strict=True):
        got = extract_answer(text, mode)
        out.append(0.5 if got is not None and _INTEGER.fullmatch(got) else 0.0)
    return out


def _groups(group_ids: Sequence) -> dict[int, list[int]]:
    """group id -> indices of its samples, in order."""
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(int(g), []).append(i)
    return groups


def _per_sample(column: object, n: int) -> bool:
    """A column with one entry per completion: a sequence or tensor of length n, not a string."""
    return not isinstance(column, str | bytes) and hasattr(column, "__len__") and len(column) == n


def group_reward(fn: Callable[..., list[float | None]]) -> Callable[..., list[float | None]]:
    """Make a reward that looks at a whole group (the G samples of one prompt) usable as a batch reward.

    ``fn(prompt, completions, **columns) -> list[float | None]`` is called once per group with that
    group's prompt, its completions and every per-sample column (a list or tensor with one entry per
    completion) cut down to the group's rows, as a list; other columns, such as a single ``extract``
    mode, are passed as is. The result has TRL's batch signature and needs the ``group_ids`` column, which
    the RL loop always passes. Use it for rewards that compare samples: a majority vote, a length
    rank. ValueError when ``fn`` returns the wrong number of values for a group.
    """

    @functools.wraps(fn)
    def per_batch(prompts: list[str], completions: list[str], group_ids: Sequence | None = None,
                  **columns) -> list[float | None]:
        if group_ids is None:
            raise ValueError(f"{fn.__name__} is a per-group reward: it needs the group_ids column")
        n = len(completions)
        out: list[float | None] = [None] * n
        for rows in _groups(group_ids).values():
            cut = {k: [v[i] for i in rows] if _per_sample(v, n) else v for k, v in columns.items()}
            values = list(fn(prompts[rows[0]], [completions[i] for i in rows], **cut))
            if len(values) != len(rows):
                raise ValueError(f"{fn.__name__} returned {len(values)} values for a group of {len(rows)}")
            for i, v in zip(rows, values, strict=True):
                out[i] = v
        return out

    per_batch.per_group = True  # type: ignore[attr-defined]
    return per_batch


@group_reward
def length_penalty(
    prompt: str,
    completions: list[str],
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
    for text, gold, mode, n in zip(completions, answer, modes, size, strict=True):
        lam = 0.5 - (n - lo) / (hi - lo) if hi > lo else 0.0
        ok = gold is not None and is_correct(text, gold, mode)
        out.append(lam if ok else min(0.0, lam))
    return out


@group_reward
def majority_vote(
    prompt: str,
    completions: list[str],
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
    votes = [extract_answer(text, mode) for text, mode in zip(completions, _modes(extract, len(completions)),
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
}


def load_reward(spec: str | Callable) -> Callable[..., list[float | None]]:
    """A reward function: a built-in name (REWARDS), an import path "package.module:function", or a
    callable (returned as is). ValueError naming the spec if it cannot be found."""
    if callable(spec):
        return spec
    if spec in REWARDS:
        return REWARDS[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise ValueError(
            f"unknown reward '{spec}'{suggest(spec, list(REWARDS))}; "
            "a function of your own is given as 'package.module:function'"
        )
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load reward '{spec}': {exc}") from exc
    if not callable(fn):
        raise ValueError(f"reward '{spec}' is not a function")
    return fn


def reward_name(spec: str | Callable) -> str:
    """The name in metrics: a built-in's name, the function part of "module:function", or __name__."""
    if callable(spec):
        return getattr(spec, "__name__", type(spec).__name__)
    return spec.rpartition(":")[2]


# --- composition with isolation -----------------------------------------------------------------


def call_with_timeout(fn: Callable, timeout_s: float, *args, **kwargs):
    """fn(*args, **kwargs) in a fresh daemon thread: its result, its exception re-raised, or
    TimeoutError after `timeout_s` seconds.

    Python cannot kill a thread, so a function that hangs is abandoned: it runs on in the background
    (a daemon, so it never holds up the interpreter's exit) and whatever it returns is dropped. A
    busy-looping one keeps taking CPU time; each call gets a new thread, so later calls never wait on it.
    """
    box: dict[str, object] = {}

    def work() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # SystemExit in a reward function must not end the run
            box["error"] = exc

    worker = threading.Thread(target=work, name=f"reward-{getattr(fn, '__name__', 'fn')}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise TimeoutError(f"timed out after {timeout_s:g} s")
    if "error" in box:
        exc = box["error"]
        raise exc if isinstance(exc, Exception) else RuntimeError(f"{type(exc).__name__}: {exc}")
    return box["value"]


def checked_values(raw: object, n: int, fallback: float | None) -> tuple[list[float | None], int, str | None]:
    """A reward function's output as n values: (values, samples that got `fallback`, first problem).

    Not a sequence of length n: every sample gets the fallback. An entry that is not None and not a
    finite real number (NaN, inf, text): that sample gets the fallback.
    """
    try:
        values = list(raw)  # type: ignore[call-overload]
    except TypeError:
        return [fallback] * n, n, f"returned {type(raw).__name__}, not a list"
    if len(values) != n:
        return [fallback] * n, n, f"returned {len(values)} values for {n} completions"
    out: list[float | None] = []
    failed, problem = 0, None
    for v in values:
        try:
            x = None if v is None else float(v)
        except (TypeError, ValueError):
            x = math.nan
        if x is not None and not math.isfinite(x):
            x, failed, problem = fallback, failed + 1, problem or f"returned {v!r}"
        out.append(x)
    return out, failed, problem


class RewardSet:
    """A weighted sum of reward functions, each isolated from the others' failures.

    total_i = Σ_f w_f · r_f,i over the functions f with r_f,i not None (0 if every function gave
    None). A function that raises, returns the wrong length or a non-sequence, or runs past
    `timeout_s` gives `fallback` to every sample of the call; a NaN/inf/non-number entry gives it to
    that sample (fallback None: those samples count as not applicable). The call always returns.

    Metrics per function (named as in `reward_name`): ``rewards/<name>/mean`` and ``/std`` (Bessel;
    0 for one sample) over the samples with a value, fallbacks included (absent when none has one),
    and ``rewards/<name>/failures`` = samples that got the fallback in this call. The first error of
    each function is kept in `first_errors[name]` for the trainer to print once. A weight of 0 keeps
    a function for its metrics only. Functions run one after another, each in its own thread, except
    those marked ``inline = True`` (a learned reward model: its time is compute, not a hang, and a
    thread abandoned mid-forward would compete with the next step), which run in the caller's thread
    with no timeout; their exceptions are still isolated.
    """

    def __init__(self, weights: Mapping[str | Callable, float], timeout_s: float = 30.0, fallback: float | None = 0.0):
        if not weights:
            raise ValueError("a RewardSet needs at least one reward function")
        self.functions: dict[str, Callable[..., list[float | None]]] = {}
        self.weights: dict[str, float] = {}
        for spec, weight in weights.items():
            name = reward_name(spec)
            if name in self.functions:
                raise ValueError(f"two reward functions are named '{name}'")
            self.functions[name], self.weights[name] = load_reward(spec), float(weight)
        self.timeout_s, self.fallback = timeout_s, fallback
        self.first_errors: dict[str, str] = {}

    def __call__(self, prompts: list[str], completions: list[str], **columns) -> tuple[Tensor, dict[str, float]]:
        """(totals (B,), metrics) for B completions; see the class doc."""
        totals, metrics, _ = self.score(prompts, completions, **columns)
        return totals, metrics

    def score(self, prompts: list[str], completions: list[str], **columns
              ) -> tuple[Tensor, dict[str, float], dict[str, list[float | None]]]:
        """(totals (B,), metrics, each function's value per completion, fallbacks included)."""
        n = len(completions)
        totals = [0.0] * n
        metrics: dict[str, float] = {}
        breakdown: dict[str, list[float | None]] = {}
        for name, fn in self.functions.items():
            # copies: a function that edits its inputs (or still runs, abandoned) cannot touch the next one's
            args = (list(prompts), list(completions))
            kwargs = {k: list(v) if isinstance(v, list) else v for k, v in columns.items()}
            try:
                values, failed, problem = checked_values(
                    (fn(*args, **kwargs) if getattr(fn, "inline", False) else
                     call_with_timeout(fn, self.timeout_s, *args, **kwargs)), n, self.fallback
                )
            except Exception as exc:
                values, failed, problem = [self.fallback] * n, n, f"{type(exc).__name__}: {exc}"
            if problem is not None:
                self.first_errors.setdefault(name, problem)
            breakdown[name] = values
            given = [v for v in values if v is not None]
            for i, v in enumerate(values):
                if v is not None:
                    totals[i] += self.weights[name] * v
            if given:
                metrics[f"rewards/{name}/mean"] = sum(given) / len(given)
                metrics[f"rewards/{name}/std"] = torch.tensor(given).std().item() if len(given) > 1 else 0.0
            metrics[f"rewards/{name}/failures"] = float(failed)
        return torch.tensor(totals, dtype=torch.get_default_dtype()), metrics, breakdown
