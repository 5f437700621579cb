"""Fuzz specs for the built-in rewards on hostile completions (the policy writes them): tag spam, huge numbers,
deep nesting, long strings, lone surrogates. Each reward returns one number or None per completion without
raising, in time linear in the text: 100 kB of any of these takes well under 0.2 s (a backtracking regex took
minutes to hours on some of them)."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posttrain.rewards import REWARDS

MODES = ("strict", "flexible", "xml")
PIECES = ("<reasoning>", "</reasoning>", "<answer>", "</answer>", "<reasoning>\n", "\n</reasoning>\n", "\n<answer>\n",
          "\n</answer>", "\\boxed{", "{", "}", "####", "#### ", "9" * 5000, "1,000", "-", ".", "$", "%", " ", "\n",
          "\t", "answer:", "Answer is", "(B)", "B.", "**", "\ud800", "\udfff", "x", "A")


def score_all(completions: list[str], mode: str) -> dict[str, list]:
    n = len(completions)
    columns = {"answer": ["18"] * n, "extract": mode, "group_ids": [0] * n, "lengths": [len(c) for c in completions],
               "format_regex": r"\d+"}
    return {name: fn(prompts=[""] * n, completions=completions, **columns) for name, fn in REWARDS.items()}


@settings(max_examples=40, deadline=2000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.lists(st.tuples(st.sampled_from(PIECES), st.integers(1, 400)), max_size=6).map(
    lambda parts: "".join(piece * k for piece, k in parts)), min_size=1, max_size=3), st.sampled_from(MODES))
def test_every_built_in_gives_a_number_or_none_per_hostile_completion(completions, mode):
    for name, values in score_all(completions, mode).items():
        assert len(values) == len(completions), name
        assert all(v is None or isinstance(v, float) for v in values), (name, values)


def fill(piece: str, size: int = 100_000) -> str:
    return (piece * (size // len(piece) + 1))[:size]


HOSTILE = {  # 100 kB each
    "reasoning tags": fill("<reasoning>"), "reasoning tags with newlines": fill("<reasoning>\n"),
    "closed reasoning tags": fill("<reasoning></reasoning>"), "closing reasoning tags": "<reasoning>" + fill(
        "</reasoning> "), "answer pairs": fill("<answer></answer>"), "open answer tags": fill("<answer>"),
    "huge number": fill("9"), "huge number after ####": "#### " + fill("9"), "thousands": fill("1,000"),
    "nested boxes": fill("\\boxed{"), "blank lines": "x" + fill("\n") + "y", "answer in blank lines":
        "<answer>x" + fill("\n") + "y</answer>", "answer: then spaces": "answer:" + fill(" "),
    "lone surrogates": fill("\ud800"), "decimals": fill(".5"), "signs": fill("-1"),
}


@pytest.mark.parametrize("text", HOSTILE.values(), ids=HOSTILE.keys())
def test_every_built_in_takes_linear_time_on_100_kB(text):
    for mode in MODES:
        for name, fn in REWARDS.items():
            best = float("inf")
            for _ in range(3):  # the best of three: the machine's noise is not the function's time
                start = time.perf_counter()
                fn(prompts=[""], completions=[text], answer=["18"], extract=mode, group_ids=[0], lengths=[1],
                   format_regex=r"\d+")
                best = min(best, time.perf_counter() - start)
                if best < 0.2:
                    break
            assert best < 0.2, f"{name} ({mode}) took {best:.2f} s on 100 kB"


def test_a_million_digit_answer_is_no_number_not_an_overflow():
    """Hypothesis found it: '-' then a million 9s overflowed Decimal's context (decimal.Overflow)."""
    from posttrain.numbers import normalize_number

    huge = "-" + "9" * 1_000_000
    assert normalize_number(huge) is None and normalize_number("9" * 4300) == "9" * 4300
    assert normalize_number("-" + "9" * 4301) is None
