"""Specs for posttrain.algorithms.losses: exact values worked out by hand in the comments."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.algorithms import losses as L

LN2 = math.log(2)


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=tol, rtol=tol)


# --- KL ------------------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    # logp − ref = [1, −1].  k1 = [1, −1];  k2 = ½·d² = [0.5, 0.5];  abs = [1, 1];
    # k3 = e^{ref−logp} − (ref−logp) − 1 = [e^{-1} + 1 − 1, e^{1} − 1 − 1] = [0.367879, 0.718282].
    logp, ref = torch.tensor([[0.0, -1.0]]), torch.tensor([[-1.0, 0.0]])
    close(L.kl(logp, ref, "k1"), [[1.0, -1.0]])
    close(L.kl(logp, ref, "k2"), [[0.5, 0.5]])
    close(L.kl(logp, ref, "k3"), [[math.exp(-1), math.e - 2]])
    close(L.kl(logp, ref), [[0.367879, 0.718282]])  # k3 is the default
    close(L.kl(logp, ref, "abs"), [[1.0, 1.0]])


def test_kl_bad_kind():
    with pytest.raises(ValueError, match=r"'k4'.*abs, k1, k2, k3"):
        L.kl(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(-20, 0), st.floats(-20, 0)), min_size=1, max_size=16))
def test_k3_and_k2_are_nonnegative_and_zero_iff_equal(pairs):
    logp = torch.tensor([p for p, _ in pairs], dtype=torch.float64)
    ref = torch.tensor([q for _, q in pairs], dtype=torch.float64)
    k3 = L.kl(logp, ref, "k3")
    assert (k3 >= 0).all() and (L.kl(logp, ref, "k2") >= 0).all()
    assert (L.kl(logp, logp, "k3") == 0).all()


def test_k1_and_k3_are_unbiased_for_kl():
    # Samples from π; mean of k1 and k3 → KL(π ‖ ref) = Σ π log(π/ref).
    g = torch.Generator().manual_seed(0)
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.3, 0.5])
    true_kl = (p * (p / q).log()).sum()
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, ref = p.log()[x], q.log()[x]
    for kind in ("k1", "k3"):
        assert L.kl(logp, ref, kind).mean().item() == pytest.approx(true_kl.item(), abs=0.01)


# --- aggregation ---------------------------------------------------------------------------------

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_aggregate_four_modes():
    # valid: row 0 = {1, 2}, row 1 = {4}.
    close(L.aggregate(X, MASK, "token-mean"), 7 / 3)  # (1+2+4) / 3 tokens
    close(L.aggregate(X, MASK), 7 / 3)  # token-mean is the default
    close(L.aggregate(X, MASK, "seq-mean-token-mean"), 2.75)  # (1.5 + 4) / 2
    close(L.aggregate(X, MASK, "seq-mean-token-sum"), 3.5)  # (3 + 4) / 2
    close(L.aggregate(X, MASK, "seq-mean-token-sum-norm"), 7 / 6)  # 7 / (B·T = 2·3)
    close(L.aggregate(X, MASK, "seq-mean-token-sum-norm", max_len=7), 0.5)  # 7 / (2·7)


def test_aggregate_all_masked_row_is_zero_not_nan():
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    close(L.aggregate(X, mask, "seq-mean-token-mean"), 0.75)  # (1.5 + 0) / 2
    close(L.aggregate(X, torch.zeros_like(X), "token-mean"), 0.0)


def test_aggregate_bad_mode_suggests():
    with pytest.raises(ValueError, match="Did you mean 'token-mean'"):
        L.aggregate(X, MASK, "token_mean")


# --- policy loss ---------------------------------------------------------------------------------


def one_token_batch(ratios, advantages):
    """(B, 1) logprobs with the given ratios against old_logprobs = 0."""
    logp = torch.tensor(ratios).log().unsqueeze(1).requires_grad_()
    return logp, torch.zeros_like(logp), torch.tensor(advantages), torch.ones(len(ratios), 1)


@pytest.mark.parametrize("agg", list(L.AGGREGATIONS))
def test_on_policy_gradient_is_vanilla_policy_gradient(agg):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, requires_grad=True)
    tokens = torch.randint(0, 7, (3, 5))
    mask = torch.tensor([[1.0] * 5, [1.0, 1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0, 0.0]])
    adv = torch.randn(3)

    def logprobs():
        return torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)

    logp = logprobs()
    loss, stats = L.policy_loss(logp, logp.detach(), adv, mask, agg=agg)
    (grad_ppo,) = torch.autograd.grad(loss, logits)
    vanilla = L.aggregate(-adv[:, None] * logprobs(), mask, agg)  # −A·log π
    (grad_pg,) = torch.autograd.grad(vanilla, logits)
    torch.testing.assert_close(grad_ppo, grad_pg)
    assert float(stats["ratio_mean"]) == pytest.approx(1.0)
    assert float(stats["clipfrac"]) == 0.0 and float(stats["approx_kl"]) == pytest.approx(0.0, abs=1e-7)


def test_clipping_by_hand():
    # clip 0.2 → range [0.8, 1.2]. Per token ℓ = max(−Aρ, −A·clip(ρ)):
    #   ρ=1.5, A=+1: max(−1.5, −1.2) = −1.2 (clipped, no gradient)
    #   ρ=1.5, A=−1: max( 1.5,  1.2) =  1.5 (unclipped: pessimistic bound keeps the big ratio)
    #   ρ=0.5, A=+1: max(−0.5, −0.8) = −0.5 (unclipped)
    #   ρ=0.5, A=−1: max( 0.5,  0.8) =  0.8 (clipped, no gradient)
    # token-mean = (−1.2 + 1.5 − 0.5 + 0.8) / 4 = 0.15.
    logp, old, adv, mask = one_token_batch([1.5, 1.5, 0.5, 0.5], [1.0, -1.0, 1.0, -1.0])
    loss, stats = L.policy_loss(logp, old, adv, mask)
    close(loss, 0.15)
    # ∂ℓ/∂log π = −A·ρ on unclipped tokens, 0 on clipped ones; ÷ 4 tokens: [0, 1.5, −0.5, 0] / 4.
    (grad,) = torch.autograd.grad(loss, logp)
    close(grad, [[0.0], [0.375], [-0.125], [0.0]])
    close(stats["clipfrac"], 0.5)  # tokens 0 and 3
    close(stats["clip_ratio/low_mean"], 0.25)  # ρ < 0.8 and A < 0: token 3
    close(stats["clip_ratio/high_mean"], 0.25)  # ρ > 1.2 and A > 0: token 0
    close(stats["clip_ratio/region_mean"], 0.5)
    close(stats["ratio_mean"], 1.0)  # (1.5 + 1.5 + 0.5 + 0.5) / 4
    # approx_kl = mean(ρ − 1 − log ρ) = (2·(0.5 − 0.405465) + 2·(−0.5 + 0.693147)) / 4 = 0.143841
    close(stats["approx_kl"], 0.143841)
    assert not stats["clipfrac"].requires_grad


def test_advantages_per_token_equal_broadcast_per_sequence():
    logp = torch.tensor([[0.1, -0.3], [0.4, 0.0]])
    old = torch.zeros(2, 2)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    a, _ = L.policy_loss(logp, old, adv, mask)
    b, _ = L.policy_loss(logp, old, adv[:, None].expand(2, 2), mask)
    close(a, b.item())


def test_clip_higher_is_asymmetric():
    # clip_low 0.2, clip_high 0.28 (DAPO): ρ=1.25, A=+1 is inside [0.8, 1.28] → −1.25 (symmetric: −1.2).
    # ρ=0.75, A=−1 is still clipped at 0.8 → 0.8.
    logp, old, adv, mask = one_token_batch([1.25, 0.75], [1.0, -1.0])
    loss, stats = L.policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, agg="seq-mean-token-sum")
    close(loss, (-1.25 + 0.8) / 2)
    close(stats["clip_ratio/high_mean"], 0.0)
    close(stats["clip_ratio/low_mean"], 0.5)
    sym, _ = L.policy_loss(logp, old, adv, mask, agg="seq-mean-token-sum")
    close(sym, (-1.2 + 0.8) / 2)


def test_dual_clip_bounds_negative_advantages():
    # dual_clip 3: for A<0, ℓ = min(max(−Aρ, −A·clip ρ), −A·3).
    #   ρ=5, A=−1: max(5, 1.2) = 5 → min(5, 3) = 3 (dual clip active)
    #   ρ=2, A=−1: max(2, 1.2) = 2 → min(2, 3) = 2
    #   ρ=5, A=+1: max(−5, −1.2) = −1.2 (A>0: untouched)
    logp, old, adv, mask = one_token_batch([5.0, 2.0, 5.0], [-1.0, -1.0, 1.0])
    loss, stats = L.policy_loss(logp, old, adv, mask, dual_clip=3.0, agg="seq-mean-token-sum")
    close(loss, (3.0 + 2.0 - 1.2) / 3)
    close(stats["dual_clipfrac"], 1 / 3)
    without, _ = L.policy_loss(logp, old, adv, mask, agg="seq-mean-token-sum")
    close(without, (5.0 + 2.0 - 1.2) / 3)
    with pytest.raises(ValueError, match="dual_clip"):
        L.policy_loss(logp, old, adv, mask, dual_clip=0.5)


def test_policy_loss_ignores_masked_tokens():
    # The masked token has a huge ratio; it must change neither the loss nor clipfrac.
    logp = torch.tensor([[0.0, 5.0]])
    loss, stats = L.policy_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.tensor([[1.0, 0.0]]))
    close(loss, -1.0)
    close(stats["clipfrac"], 0.0)


# --- value loss ----------------------------------------------------------------------------------

VALUES = torch.tensor([[1.0, 1.0, 1.0]])
OLD_VALUES = torch.tensor([[0.5, 0.5, 1.1]])
RETURNS = torch.tensor([[2.0, 0.0, 1.5]])


def test_value_loss_clipped_by_hand():
    # c = 0.2.  t0: clip(1.0, 0.3, 0.7) = 0.7 → (0.7−2)² = 1.69 > (1−2)² = 1 → ½·1.69 = 0.845 (clipped)
    #           t1: clipped 0.7 → (0.7−0)² = 0.49 < (1−0)² = 1 → ½·1 = 0.5
    #           t2: 1.0 inside [0.9, 1.3] → (1−1.5)² = 0.25 → 0.125
    # token-mean = (0.845 + 0.5 + 0.125) / 3 = 0.49;  vf_clipfrac = 1/3.
    loss, stats = L.value_loss(VALUES, OLD_VALUES, RETURNS, torch.ones(1, 3), clip=0.2)
    close(loss, 0.49)
    close(stats["vf_clipfrac"], 1 / 3)


def test_value_loss_unclipped_by_hand():
    # ½·[(1−2)², (1−0)², (1−1.5)²] = [0.5, 0.5, 0.125] → mean 0.375.
    loss, stats = L.value_loss(VALUES, OLD_VALUES, RETURNS, torch.ones(1, 3), clip=None)
    close(loss, 0.375)
    close(stats["vf_clipfrac"], 0.0)


# --- entropy -------------------------------------------------------------------------------------


def test_entropy_uniform_is_log_v_and_matches_categorical():
    close(L.entropy_from_logits(torch.zeros(2, 3, 4)), torch.full((2, 3), math.log(4)))
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11) * 5
    close(L.entropy_from_logits(logits), torch.distributions.Categorical(logits=logits).entropy())


def test_entropy_is_stable_for_huge_and_masked_logits():
    logits = torch.tensor([[[1000.0, 1000.0, -float("inf")], [1e4, 0.0, 0.0]]])
    # two equal survivors → log 2;  one dominant logit → 0.
    close(L.entropy_from_logits(logits), [[LN2, 0.0]])


# --- DPO and Bradley–Terry -----------------------------------------------------------------------


def dpo_at(h, **kw):
    """chosen − ref_chosen = h, rejected − ref_rejected = 0."""
    return L.dpo_loss(
        torch.tensor([-2.0 + h]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-3.0]), **kw
    )


def test_dpo_at_h_zero():
    # βh = 0: σ(0) = ½.  sigmoid: −(1−ε)·log ½ − ε·log ½ = log 2 for every ε.
    close(dpo_at(0.0), [LN2])
    close(dpo_at(0.0, label_smoothing=0.3), [LN2])
    close(dpo_at(0.0, beta=0.1, kind="ipo"), [25.0])  # (0 − 1/(2·0.1))² = 5² = 25
    close(dpo_at(0.0, kind="hinge"), [1.0])  # relu(1 − 0)
    close(dpo_at(0.0, kind="robust", label_smoothing=0.1), [LN2])  # (0.9·log2 − 0.1·log2) / 0.8


def test_dpo_at_h_ln3():
    # β = 1, h = ln 3: σ(βh) = 3/4, σ(−βh) = 1/4.
    h = math.log(3)
    close(dpo_at(h, beta=1.0), [-math.log(0.75)])  # 0.287682
    # cDPO ε=0.1: −0.9·log ¾ − 0.1·log ¼ = 0.258914 + 0.138629 = 0.397543
    close(dpo_at(h, beta=1.0, label_smoothing=0.1), [0.397543])
    # robust ε=0.1: (0.258914 + 0.1·log ¼) / 0.8 = (0.258914 − 0.138629) / 0.8 = 0.150356
    close(dpo_at(h, beta=1.0, kind="robust", label_smoothing=0.1), [0.150356])
    close(dpo_at(h, beta=1.0, kind="ipo"), [(h - 0.5) ** 2])  # 0.358336
    close(dpo_at(h, beta=1.0, kind="hinge"), [0.0])  # relu(1 − 1.0986) = 0
    close(dpo_at(h, beta=0.5, kind="hinge"), [1 - 0.5 * h])  # 0.450694


def test_dpo_gradient_and_reference_is_frozen():
    # ∂/∂π_c of −log σ(βh) = −β·σ(−βh) = −0.1·½ = −0.05 at h = 0; refs get no gradient.
    chosen = torch.tensor([-2.0], requires_grad=True)
    ref_c = torch.tensor([-2.0], requires_grad=True)
    L.dpo_loss(chosen, torch.tensor([-3.0]), ref_c, torch.tensor([-3.0])).sum().backward()
    close(chosen.grad, [-0.05])
    assert ref_c.grad is None


def test_dpo_bad_kind_and_bad_robust_eps():
    with pytest.raises(ValueError, match="Did you mean 'sigmoid'"):
        dpo_at(0.0, kind="sigmod")
    with pytest.raises(ValueError, match="robust"):
        dpo_at(0.0, kind="robust", label_smoothing=0.5)


def test_bradley_terry_by_hand():
    equal = torch.tensor([0.7, -1.0])
    close(L.bradley_terry_loss(equal, equal), LN2)  # −log σ(0) = log 2
    # −log σ(2) = log(1 + e^{−2}) = 0.126928
    close(L.bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0])), math.log1p(math.exp(-2)))
    close(L.bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0]), margin=2.0), LN2)
    # centering: log 2 + 0.01·(1 + 1)² = 0.693147 + 0.04 = 0.733147
    close(L.bradley_terry_loss(torch.tensor([1.0]), torch.tensor([1.0]), center_coef=0.01), 0.733147)
