"""Specs for posttrain.algorithms.advantages: exact values worked out by hand in the comments."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.algorithms import advantages as A

# Two groups of four: group 0 has signal, group 1 is all-correct (no signal).
REWARDS = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=tol, rtol=tol)


def test_group_stats():
    # group 0: mean 0.5, Σ(r−mean)² = 4·0.25 = 1, Bessel var = 1/3, std = 0.577350; group 1: mean 1, std 0.
    stats = A.group_stats(REWARDS, GROUPS)
    close(stats.mean, [0.5] * 4 + [1.0] * 4)
    close(stats.std, [math.sqrt(1 / 3)] * 4 + [0.0] * 4)
    assert stats.zero_std.tolist() == [False] * 4 + [True] * 4


def test_grpo_scale_group():
    # ±0.5 / (0.577350 + 1e-6) = ±0.866024; group 1 centred rewards are 0.
    close(A.grpo(REWARDS, GROUPS), [0.866024, -0.866024, 0.866024, -0.866024, 0, 0, 0, 0])


def test_grpo_scale_none():
    # Dr. GRPO / nanochat: r − group mean, no division.
    expected = [0.5, -0.5, 0.5, -0.5, 0, 0, 0, 0]
    close(A.grpo(REWARDS, GROUPS, scale="none"), expected)
    close(A.dr_grpo(REWARDS, GROUPS), expected)


def test_grpo_scale_batch():
    # batch: mean 0.75, Σ(r−0.75)² = 6·0.0625 + 2·0.5625 = 1.5, Bessel var 1.5/7, std = 0.462910;
    # ±0.5 / 0.462910 = ±sqrt(7/6) = ±1.080123.
    a = math.sqrt(7 / 6)
    close(A.grpo(REWARDS, GROUPS, scale="batch"), [a, -a, a, -a, 0, 0, 0, 0])


def test_grpo_non_contiguous_groups_and_arbitrary_ids():
    # group 7 = {1, 3}: mean 2, std sqrt(2); group 3 = {2, 6}: mean 4, std sqrt(8).
    # A = [-1/√2, -2/√8, 1/√2, 2/√8] = [-0.707107, -0.707107, 0.707107, 0.707107].
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0])
    groups = torch.tensor([7, 3, 7, 3])
    close(A.grpo(rewards, groups), [-0.707107, -0.707107, 0.707107, 0.707107])


def test_grpo_singleton_group_is_zero_not_nan():
    a = A.grpo(torch.tensor([5.0, 1.0, 0.0]), torch.tensor([0, 1, 1]))
    assert a[0].item() == 0.0 and not torch.isnan(a).any()


def test_grpo_accepts_integer_rewards():
    close(A.grpo(torch.tensor([1, 0]), torch.tensor([0, 0]), scale="none"), [0.5, -0.5])


def test_grpo_bad_scale_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"'gruop'.*batch, group, none.*Did you mean 'group'"):
        A.grpo(REWARDS, GROUPS, scale="gruop")


def test_rloo_by_hand():
    # group 0 = [1,0,1,0]: 1 − mean(0,1,0) = 2/3;  0 − mean(1,1,0) = −2/3.
    # group 1 = [3,0,0]:   3 − mean(0,0) = 3;      0 − mean(3,0) = −1.5.
    # group 2 = [5] alone: no others → 0.
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 3.0, 0.0, 0.0, 5.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])
    close(A.rloo(rewards, groups), [2 / 3, -2 / 3, 2 / 3, -2 / 3, 3.0, -1.5, -1.5, 0.0])


def test_rloo_baseline_excludes_the_sample_itself():
    # The baseline used for i is r_i − A_i; it must equal the mean of the *others* and so must not move
    # when r_i does. Group = [r, 1, 2, 6]: baseline of sample 0 = (1 + 2 + 6)/3 = 3 for any r.
    groups = torch.zeros(4, dtype=torch.long)
    for r in (-5.0, 0.0, 3.0, 100.0):
        rewards = torch.tensor([r, 1.0, 2.0, 6.0])
        close(rewards[0] - A.rloo(rewards, groups)[0], 3.0)
        for i in range(4):  # A_i + mean of the others = r_i for every sample
            others = torch.cat([rewards[:i], rewards[i + 1 :]]).mean()
            close(A.rloo(rewards, groups)[i] + others, rewards[i].item())


def test_reinforce_is_r_minus_group_mean():
    close(A.reinforce(REWARDS, GROUPS), [0.5, -0.5, 0.5, -0.5, 0, 0, 0, 0])


def test_registry_has_the_sequence_level_estimators():
    assert {"grpo", "rloo", "reinforce", "dr_grpo"} <= set(A.ADVANTAGES)
    close(A.choose(A.ADVANTAGES, "rloo", "advantage")(REWARDS, GROUPS), A.rloo(REWARDS, GROUPS))
    with pytest.raises(ValueError, match="Did you mean 'rloo'"):
        A.choose(A.ADVANTAGES, "rlo", "advantage estimator")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-10, 10), min_size=2, max_size=12), st.integers(1, 4))
def test_grpo_matches_a_loop_over_groups(values, num_groups):
    rewards = torch.tensor(values, dtype=torch.float64)
    groups = torch.arange(len(values)) % num_groups
    got = A.grpo(rewards, groups)
    for g in groups.unique():
        sel = groups == g
        r = rewards[sel]
        std = r.std() if r.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
        torch.testing.assert_close(got[sel], (r - r.mean()) / (std + 1e-6))


# --- REINFORCE++ ---------------------------------------------------------------------------------

TOKEN_REWARDS = torch.tensor([[1.0, 9.0, 2.0, 3.0], [0.0, 0.0, 4.0, 0.0]])
TOKEN_MASK = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])  # row 0 has a gap at t=1


def whiten_by_hand(valid):
    n = len(valid)
    mean = sum(valid) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in valid) / (n - 1))
    return [(v - mean) / (std + 1e-8) for v in valid]


def test_reinforce_pp_gamma_1_skips_the_gap():
    # γ = 1. Row 0 valid tokens t=0,2,3 with rewards 1,2,3 (the 9 at the gap is ignored):
    #   G = [1+2+3, –, 2+3, 3] = [6, –, 5, 3].  Row 1 valid t=0,1,2: G = [4, 4, 4, –].
    # Valid G = 6,5,3,4,4,4: mean 13/3, Σdev² = 16/3, Bessel var 16/15, std 1.032796 →
    #   [1.613743, 0, 0.645497, -1.290994], [-0.322749, -0.322749, -0.322749, 0].
    w = whiten_by_hand([6, 5, 3, 4, 4, 4])
    expected = [[w[0], 0, w[1], w[2]], [w[3], w[4], w[5], 0]]
    close(A.reinforce_pp(TOKEN_REWARDS, TOKEN_MASK), expected)
    close(torch.tensor(w), [1.613743, 0.645497, -1.290994, -0.322749, -0.322749, -0.322749])


def test_reinforce_pp_gamma_half():
    # γ = ½, discounting over valid tokens only. Row 0: G3 = 3, G2 = 2 + ½·3 = 3.5, G0 = 1 + ½·3.5 = 2.75.
    # Row 1: G2 = 4, G1 = 0 + ½·4 = 2, G0 = 0 + ½·2 = 1.
    # Valid G = 2.75, 3.5, 3, 1, 2, 4: mean 2.708333, Bessel std 1.077226.
    w = whiten_by_hand([2.75, 3.5, 3.0, 1.0, 2.0, 4.0])
    expected = [[w[0], 0, w[1], w[2]], [w[3], w[4], w[5], 0]]
    close(A.reinforce_pp(TOKEN_REWARDS, TOKEN_MASK, gamma=0.5), expected)
    assert w[0] == pytest.approx(0.038680, abs=1e-5)


# --- GAE -----------------------------------------------------------------------------------------

R3 = torch.tensor([[0.0, 0.0, 1.0]])
V3 = torch.tensor([[0.5, 0.6, 0.7]])
M3 = torch.ones(1, 3)


def test_gae_gamma1_lam1_returns_are_reward_to_go():
    # γ = λ = 1: A_t = Σ_{s≥t} r_s − V_t = [1−0.5, 1−0.6, 1−0.7]; returns = A + V = [1, 1, 1].
    adv, ret = A.gae(R3, V3, M3, gamma=1.0, lam=1.0, whiten=False)
    close(adv, [[0.5, 0.4, 0.3]])
    close(ret, [[1.0, 1.0, 1.0]])


def test_gae_gamma1_lam1_zero_values_is_reward_to_go():
    # V = 0, γ = λ = 1: δ_t = r_t, A_t = Σ_{s≥t, valid} r_s (reward-to-go), returns = A.
    # Row 0: r = [1, 2, 3, 0] → [6, 5, 3, 0]. Row 1: r = [0.5, 0, 9, 9] with mask [1, 1, 0, 0] → [0.5, 0, 0, 0].
    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.5, 0.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    adv, ret = A.gae(rewards, torch.zeros(2, 4), mask, gamma=1.0, lam=1.0, whiten=False)
    close(adv, [[6.0, 5.0, 3.0, 0.0], [0.5, 0.0, 0.0, 0.0]])
    close(ret, adv)


def test_gae_gamma09_lam08():
    # δ2 = 1 + 0 − 0.7 = 0.3;  δ1 = 0 + 0.9·0.7 − 0.6 = 0.03;  δ0 = 0 + 0.9·0.6 − 0.5 = 0.04.
    # γλ = 0.72: A2 = 0.3;  A1 = 0.03 + 0.72·0.3 = 0.246;  A0 = 0.04 + 0.72·0.246 = 0.21712.
    # returns = A + V = [0.71712, 0.846, 1.0].
    adv, ret = A.gae(R3, V3, M3, gamma=0.9, lam=0.8, whiten=False)
    close(adv, [[0.21712, 0.246, 0.3]])
    close(ret, [[0.71712, 0.846, 1.0]])


def test_gae_gap_uses_next_valid_token():
    # t=1 is a tool-output token (mask 0, its value 99 ignored): time axis is t=0 → t=2.
    # δ2 = 1 − 0.7 = 0.3;  δ0 = 0 + 0.9·0.7 − 0.5 = 0.13;  A0 = 0.13 + 0.72·0.3 = 0.346.
    adv, ret = A.gae(R3, torch.tensor([[0.5, 99.0, 0.7]]), torch.tensor([[1.0, 0.0, 1.0]]), 0.9, 0.8, False)
    close(adv, [[0.346, 0.0, 0.3]])
    close(ret, [[0.846, 0.0, 1.0]])


def test_gae_padding_value_after_last_valid_token_is_zero():
    # Padding at t=2 (value 5 must not bootstrap): γ = λ = 1, r = [0, 1], V = [0.5, 0.6]:
    # A1 = 1 − 0.6 = 0.4, A0 = 0 + 0.6 − 0.5 + 0.4 = 0.5.
    adv, ret = A.gae(
        R3.roll(-1, 1), torch.tensor([[0.5, 0.6, 5.0]]), torch.tensor([[1.0, 1.0, 0.0]]), 1, 1, False
    )
    close(adv, [[0.5, 0.4, 0.0]])
    close(ret, [[1.0, 1.0, 0.0]])


def test_gae_whiten():
    # A = [0.5, 0.4, 0.3]: mean 0.4, Bessel std sqrt(0.02/2) = 0.1 → [1, 0, −1]; returns unwhitened.
    adv, ret = A.gae(R3, V3, M3, gamma=1.0, lam=1.0, whiten=True)
    close(adv, [[1.0, 0.0, -1.0]])
    close(ret, [[1.0, 1.0, 1.0]])


def test_advantages_carry_no_gradient():
    values = V3.clone().requires_grad_()
    adv, ret = A.gae(R3, values, M3)
    assert not adv.requires_grad and not ret.requires_grad
