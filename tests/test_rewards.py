"""Specs for posttrain.rewards: exact values worked out by hand in the comments."""

import threading
import time

import pytest
import torch

from posttrain import rewards
from posttrain.rewards import RewardSet, overlong_penalty
from posttrain.tasks.gsm8k import extract_answer


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=tol, rtol=tol)


def test_overlong_penalty_by_hand():
    # max_len 10, buffer 4: no penalty up to 10 − 4 = 6; ramp (6 − L)/4 on 7..10; −1 beyond 10.
    # L = 3 → 0;  6 → 0;  7 → −1/4;  10 → −4/4 = −1;  11 → −1.
    lengths = torch.tensor([3, 6, 7, 10, 11])
    penalty = overlong_penalty(lengths, max_len=10, buffer=4)
    assert penalty.is_floating_point()
    close(penalty, [0.0, 0.0, -0.25, -1.0, -1.0])
    close(overlong_penalty(lengths, 10, 4, factor=0.5), [0.0, 0.0, -0.125, -0.5, -0.5])
    close(overlong_penalty(lengths.double(), 10, 4), [0.0, 0.0, -0.25, -1.0, -1.0])


def test_overlong_penalty_edges_of_buffer():
    # buffer = max_len: the ramp starts at 0 → L = 5 gives −5/10;  buffer = 1: only L = max_len pays.
    close(overlong_penalty(torch.tensor([0, 5, 10]), 10, 10), [0.0, -0.5, -1.0])
    close(overlong_penalty(torch.tensor([9, 10, 11]), 10, 1), [0.0, -1.0, -1.0])


@pytest.mark.parametrize("buffer", [0, -1, 11])
def test_overlong_penalty_bad_buffer(buffer):
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(torch.tensor([5]), max_len=10, buffer=buffer)


# --- rule rewards (TRL signature: f(prompts, completions, **columns) -> list[float | None]) -------

XML = "<reasoning>\nthink\n</reasoning>\n<answer>\n18\n</answer>\n"
SOFT = "Sure. <reasoning>think</reasoning> <answer>18</answer>"
PLAIN = "The answer is 18."


def call(fn, completions, **columns):
    return fn([""] * len(completions), completions, **columns)


def test_correctness_exact_partial_and_modes():
    completions = ["#### 18", "the answer is 18", "#### 17", "#### 17, no wait: 18", XML, "#### 18"]
    answer = ["18", "18", "18", "18", "18", None]
    # strict: '#### 18' = 2; right number without #### = 1 (partial); wrong = 0; XML has no #### but
    # its last number is 18 -> 1; no gold -> None
    assert call(rewards.correctness, completions, answer=answer) == [2.0, 1.0, 0.0, 1.0, 1.0, None]
    assert call(rewards.correctness, [XML, SOFT, PLAIN], answer=["18"] * 3, extract=["xml"] * 3) == [2.0, 2.0, 1.0]
    assert call(rewards.correctness, [PLAIN, "#### 18"], answer=["18", "18"], extract="flexible") == [2.0, 2.0]
    assert call(rewards.correctness, ["x 18"], answer=["18"], partial=0.25, other_column=[1]) == [0.25]


def test_format_rewards():
    completions = [XML, XML.rstrip("\n"), XML + "more", SOFT, PLAIN, "<reasoning>\na\n</reasoning>\n<answer>\n"
                   "<answer>\n1\n</answer>\n", "<reasoning>\nmulti\nline\n</reasoning>\n<answer>\n7\n</answer>\n"]
    assert call(rewards.format_strict, completions) == [0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.5]
    assert call(rewards.format_soft, completions) == [0.5, 0.5, 0.5, 0.5, 0.0, 0.5, 0.5]


def test_xml_count():
    twice = "<reasoning>\na\n</reasoning>\n<answer>\n1\n</answer>\n<answer>\n2\n</answer>"
    swapped = "\n<answer>\n1\n</answer>\n<reasoning>\na\n</reasoning>\n"
    values = call(rewards.xml_count, [XML, XML + "extra", SOFT, PLAIN, twice, swapped])
    # XML: 4 tags in place, final newline free = 0.5;  + 5 chars after </answer>: 0.5 − 0.005
    # SOFT, PLAIN: no tag with its newlines = 0;  twice: only the two reasoning tags = 0.25
    # swapped: the reasoning tags come last, so the answer tags are out of place = 0.25, and the tail
    # "<reasoning>\na\n</reasoning>" (11 + 3 + 12 = 26 chars) costs 0.026
    assert values == pytest.approx([0.5, 0.495, 0.0, 0.0, 0.25, 0.224], abs=1e-12)


def test_integer_answer():
    completions = ["#### 7", "#### 7.0", "#### -3", "#### 7.5", "no answer", "<answer>7</answer>"]
    assert call(rewards.integer_answer, completions) == [0.5, 0.5, 0.5, 0.0, 0.0, 0.0]
    assert call(rewards.integer_answer, ["<answer>7</answer>", "<answer>x</answer>"], extract="xml") == [0.5, 0.0]


def test_length_penalty_kimi():
    # group 0 lengths 10, 10, 30, 20 → λ = 0.5 − (L − 10)/20 = 0.5, 0.5, −0.5, 0
    #   right → λ, wrong → min(0, λ):  0.5 (right), 0 (wrong), −0.5 (right), 0 (wrong)
    # group 1: equal lengths → λ = 0 → 0, 0
    # group 2 lengths 8, 4 → λ = −0.5, 0.5:  right → −0.5, wrong → min(0, 0.5) = 0
    completions = ["#### 18", "#### 1", "#### 18", "#### 2", "#### 5", "#### 6", "#### 3", "#### 4"]
    answer = ["18"] * 4 + ["5"] * 2 + ["3"] * 2
    values = call(rewards.length_penalty, completions, answer=answer, group_ids=[0, 0, 0, 0, 1, 1, 2, 2],
                  lengths=torch.tensor([10, 10, 30, 20, 5, 5, 8, 4]))
    assert values == [0.5, 0.0, -0.5, 0.0, 0.0, 0.0, -0.5, 0.0]


@pytest.mark.parametrize(
    ("answers", "kwargs", "expected"),
    [
        (["18", "18", "17", None], {}, [2.0, 2.0, 0.0, 0.0]),  # exact: +2 to the samples that voted 18
        (["19", "19", "18"], {}, [1.0, 1.0, 0.0]),  # off by one: +1
        (["5", "5", "18"], {}, [0.0, 0.0, 0.0]),  # wrong vote
        (["18", "18", "17"], {"min_votes": 3}, [0.0, 0.0, 0.0]),  # too few votes for the winner
        (["18", "18", "17"], {"min_votes": 2}, [2.0, 2.0, 0.0]),
        ([None, None, None, "18"], {}, [0.0, 0.0, 0.0, 2.0]),  # badly formatted answers cast no vote
        (["17", "18"], {}, [1.0, 0.0]),  # a tie goes to the answer seen first
        ([None, None], {}, [0.0, 0.0]),  # nobody voted
        (["18.0", "$18", "18"], {"exact": 3.0}, [3.0, 3.0, 3.0]),  # normalised, the three are one answer
    ],
)
def test_majority_vote(answers, kwargs, expected):
    completions = ["no answer" if a is None else f"#### {a}" for a in answers]
    values = call(rewards.majority_vote, completions, answer=["18"] * len(answers), group_ids=[0] * len(answers),
                  **kwargs)
    assert values == expected


def test_majority_vote_groups_are_separate_and_modes_per_sample():
    completions = ["#### 18", "#### 18", "<answer>4</answer>", "<answer>4</answer>", "#### 4"]
    values = call(rewards.majority_vote, completions, answer=["18", "18", "5", "5", "5"], group_ids=[3, 3, 7, 7, 7],
                  extract=["strict", "strict", "xml", "xml", "xml"])
    assert values == [2.0, 2.0, 1.0, 1.0, 0.0]  # group 7: '#### 4' has no <answer>, so no vote


@rewards.group_reward
def unique_answer(prompt, completions, answer, lengths, extract="strict", **kw):
    """1 for a sample whose answer no other sample of its group gave; records what it was given."""
    seen.append((prompt, list(completions), list(answer), [int(n) for n in lengths], extract))
    votes = [extract_answer(c, extract) for c in completions]
    return [float(votes.count(v) == 1) for v in votes]


seen: list = []


def test_group_reward_gets_each_group_with_its_columns_cut():
    seen.clear()
    completions = ["#### 1", "#### 2", "#### 1", "#### 3", "#### 3"]
    assert unique_answer.per_group and unique_answer.__name__ == "unique_answer"  # a batch function, named as before
    out = unique_answer(["p0", "p1", "p0", "p1", "p1"], completions, group_ids=torch.tensor([0, 1, 0, 1, 1]),
                        answer=["1", "2", "1", "2", "2"], lengths=torch.tensor([4, 5, 6, 7, 8]), extract="strict")
    # group 0 = rows 0, 2 (answers 1, 1: neither unique); group 1 = rows 1, 3, 4 (2 unique; 3, 3 not)
    assert out == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert seen == [("p0", ["#### 1", "#### 1"], ["1", "1"], [4, 6], "strict"),
                    ("p1", ["#### 2", "#### 3", "#### 3"], ["2", "2", "2"], [5, 7, 8], "strict")]


def test_group_reward_errors_are_isolated_by_the_reward_set():
    @rewards.group_reward
    def too_few(prompt, completions, **kw):
        return [1.0]

    with pytest.raises(ValueError, match="needs the group_ids column"):
        too_few(["p"], ["a"])
    with pytest.raises(ValueError, match="returned 1 values for a group of 2"):
        too_few(["p", "p"], ["a", "b"], group_ids=[0, 0])
    totals, metrics = RewardSet({too_few: 1.0, "correctness": 1.0}, fallback=-1.0, max_failure_rate=1.0)(
        ["p", "p"], ["#### 18", "#### 1"], group_ids=[0, 0], answer=["18", "18"])
    close(totals, [-1.0 + 2.0, -1.0 + 0.0])  # the broken group function gives the fallback; correctness still counts
    assert metrics["rewards/too_few/failures"] == 2.0


def test_registry_and_loader(tmp_path, monkeypatch):
    assert set(rewards.REWARDS) == {"correctness", "format_strict", "format_soft", "xml_count", "integer_answer",
                                    "length_penalty", "majority_vote", "exact_match", "numeric_match",
                                    "multiple_choice", "regex_format"}
    assert rewards.load_reward("xml_count") is rewards.xml_count
    (tmp_path / "my_rewards.py").write_text("def brevity(prompts, completions, **kw):\n"
                                            "    return [1.0 / len(c) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert rewards.load_reward("my_rewards:brevity")(["p"], ["abcd"]) == [0.25]
    assert rewards.reward_name("my_rewards:brevity") == "brevity"
    with pytest.raises(ValueError, match="did you mean 'correctness'"):
        rewards.load_reward("corectness")
    with pytest.raises(ValueError, match="cannot load reward 'my_rewards:nope'"):
        rewards.load_reward("my_rewards:nope")
    with pytest.raises(ValueError, match="cannot load reward 'no_such_module_xyz:f'"):
        rewards.load_reward("no_such_module_xyz:f")


# --- RewardSet: weighted sum, metrics, isolation ---------------------------------------------


def trl_style(prompts, completions, **kwargs):
    """A user function written for TRL: None where it does not apply."""
    return [None if "skip" in c else float(len(p)) for p, c in zip(prompts, completions, strict=True)]


def test_reward_set_weighted_sum_and_metrics():
    reward_set = RewardSet({"correctness": 1.0, "format_soft": 2.0, trl_style: 0.5})
    prompts, completions = ["ab", "abcd", "abcdef"], [SOFT, "#### 18 skip", "skip"]
    totals, metrics = reward_set(prompts, completions, answer=["18", "18", None], group_ids=[0, 0, 1])
    # correctness (strict): SOFT has no #### but ends in 18 → 1; '#### 18 skip' → 2; no gold → None
    # format_soft: 0.5, 0, 0;  trl_style: len(prompt) = 2, None, None
    # totals: 1·1 + 2·0.5 + 0.5·2 = 3;  1·2 + 0 = 2;  2·0 = 0
    close(totals, [3.0, 2.0, 0.0])
    assert totals.dtype == torch.get_default_dtype()
    assert metrics == pytest.approx({
        "rewards/correctness/mean": 1.5, "rewards/correctness/std": 0.5 ** 0.5, "rewards/correctness/failures": 0.0,
        "rewards/format_soft/mean": 0.5 / 3, "rewards/format_soft/std": (1 / 12) ** 0.5,
        "rewards/format_soft/failures": 0.0,
        "rewards/trl_style/mean": 2.0, "rewards/trl_style/std": 0.0, "rewards/trl_style/failures": 0.0,
    })
    assert reward_set.first_errors == {}


def test_reward_set_sample_with_no_applicable_function_gets_zero():
    totals, metrics = RewardSet({trl_style: 3.0})(["abc"], ["skip"])
    close(totals, [0.0])
    assert metrics == {"rewards/trl_style/failures": 0.0}  # no sample had a value: no mean/std


def test_reward_set_names_must_be_distinct():
    with pytest.raises(ValueError, match="two reward functions are named 'correctness'"):
        RewardSet({"correctness": 1.0, "mod:correctness": 1.0})


def raises(prompts, completions, **kwargs):
    raise ValueError("boom")


def nan_inf(completions, **kwargs):
    return [{"a": 1.0, "b": float("nan"), "c": float("inf")}.get(c) for c in completions]


def text_for_bad(completions, **kwargs):
    return ["x" if c == "bad" else 1.0 for c in completions]


def too_short(completions, **kwargs):
    return [1.0]


def not_a_list(completions, **kwargs):
    return 3.0


def exits(completions, **kwargs):
    raise SystemExit(3)


def test_reward_set_isolation_raise_nan_wrong_result():
    reward_set = RewardSet({raises: 1.0, nan_inf: 1.0, text_for_bad: 1.0, too_short: 1.0, not_a_list: 1.0,
                            exits: 1.0}, fallback=-1.0, max_failure_rate=1.0)
    totals, metrics = reward_set([""] * 5, ["a", "b", "c", "bad", "e"])
    # raises, not_a_list, exits: −1 for every sample, also when called one sample at a time (3 · −1 = −3);
    # nan_inf: 1, −1 (nan), −1 (inf), None, None; text_for_bad: the batch call's 'x' is a wrong result, so each
    # sample is scored alone: 1 everywhere but 'bad' (−1); too_short: wrong length for 5, right for 1 alone: 1
    close(totals, [-3 + 1 + 1 + 1, -3 - 1 + 1 + 1, -3 - 1 + 1 + 1, -3 - 1 + 1, -3 + 1 + 1])
    assert {k: v for k, v in metrics.items() if k.endswith("failures")} == {
        "rewards/raises/failures": 5.0, "rewards/nan_inf/failures": 2.0, "rewards/text_for_bad/failures": 1.0,
        "rewards/too_short/failures": 0.0, "rewards/not_a_list/failures": 5.0, "rewards/exits/failures": 5.0,
    }
    assert metrics["rewards/nan_inf/mean"] == pytest.approx(-1 / 3)  # over 1, −1, −1 (fallbacks included)
    assert reward_set.first_errors == {
        "raises": "ValueError: boom",
        "nan_inf": "reward 'nan_inf' returned nan for completion 1",
        "text_for_bad": "ValueError: reward 'text_for_bad' returned 'x' (str) for completion 3, not a number or None",
        "too_short": "ValueError: reward 'too_short' returned 1 values for 5 completions (one per completion)",
        "not_a_list": "ValueError: reward 'not_a_list' returned float, not a list with one number per completion",
        "exits": "RuntimeError: SystemExit: 3",
    }
    # the first error is kept; later calls still run and count their failures
    _, again = reward_set(["", ""], ["a", "b"])
    assert again["rewards/raises/failures"] == 2.0 and reward_set.first_errors["raises"] == "ValueError: boom"


def test_reward_set_fallback_none_means_not_applicable():
    totals, metrics = RewardSet({raises: 1.0, "format_soft": 1.0}, fallback=None, max_failure_rate=1.0)(
        ["", ""], [SOFT, PLAIN])
    close(totals, [0.5, 0.0])
    assert metrics["rewards/raises/failures"] == 2.0 and "rewards/raises/mean" not in metrics


def test_reward_set_timeout_abandons_a_hung_function_and_the_next_call_works():
    release = threading.Event()
    calls = []

    def hangs_once(prompts, completions, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            release.wait(10)  # hangs until the test lets it go
        return [1.0] * len(completions)

    reward_set = RewardSet({hangs_once: 1.0, "format_soft": 1.0}, timeout_s=0.2, fallback=0.0, max_failure_rate=1.0)
    try:
        start = time.perf_counter()
        totals, metrics = reward_set(["", ""], [SOFT, PLAIN])
        assert time.perf_counter() - start < 1.0
        close(totals, [0.5, 0.0])  # fallback 0 for the hung function; format_soft still counted
        assert metrics["rewards/hangs_once/failures"] == 2.0
        assert reward_set.first_errors == {"hangs_once": "RewardTimeout: timed out after 0.2 s"}  # not retried
        totals, metrics = reward_set(["", ""], [SOFT, PLAIN])  # a fresh worker: not blocked by the hung one
        close(totals, [1.5, 1.0])
        assert metrics["rewards/hangs_once/failures"] == 0.0
    finally:
        release.set()


def test_reward_set_gives_each_function_its_own_copy_of_the_inputs():
    def vandal(prompts, completions, **kwargs):
        completions[0] = PLAIN
        kwargs["answer"][0] = "99"
        return [0.0] * len(completions)

    totals, _ = RewardSet({vandal: 1.0, "correctness": 1.0, "format_soft": 1.0})(["p"], [SOFT], answer=["18"])
    close(totals, [1.5])  # correctness 1 (partial) + format 0.5, as if vandal had not run
