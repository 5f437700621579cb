"""Specs for posttrain.algorithms.losses: exact values worked out by hand in the comments."""

import math

import pytest
import torch

from posttrain.algorithms import losses as L

LN2 = math.log(2)


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=tol, rtol=tol)


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


X13 = torch.tensor([[6.0, 9.0, 9.0], [1.0, 2.0, 3.0]])
MASK13 = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])  # lengths 1 and 3


def test_aggregate_lengths_1_and_3_and_policy_loss_on_policy():
    # valid: row 0 = {6} (sum 6, mean 6), row 1 = {1, 2, 3} (sum 6, mean 2); 4 tokens, B·T = 6.
    expected = {
        "token-mean": 12 / 4,  # 3: every token weighs the same
        "seq-mean-token-mean": (6 + 2) / 2,  # 4: every sequence weighs the same
        "seq-mean-token-sum": (6 + 6) / 2,  # 6
        "seq-mean-token-sum-norm": 12 / 6,  # 2: ÷ B·T
    }
    for mode, value in expected.items():
        close(L.aggregate(X13, MASK13, mode), value)
        # On-policy ρ = 1, so ℓ_t = −A_t: per-token advantages −X give the same aggregate.
        loss, _ = L.policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), -X13, MASK13, agg=mode)
        close(loss, value)
    close(L.aggregate(X13, MASK13, "seq-mean-token-sum-norm", max_len=4), 1.5)  # 12 / (2·4)


def test_a_fully_masked_row_counts_in_no_sequence_mean_and_an_empty_batch_is_zero_not_nan():
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # row 2: truncated under overlong=mask
    close(L.aggregate(X, mask, "seq-mean-token-mean"), 1.5)  # (1 + 2) / 2 over the one row with tokens
    close(L.aggregate(X, mask, "seq-mean-token-sum"), 3.0)  # 3 / 1
    close(L.aggregate(X, mask, "seq-mean-token-sum-norm", max_len=4), 0.75)  # 3 / (1 · 4)
    for mode in L.AGGREGATIONS:
        close(L.aggregate(X, torch.zeros_like(X), mode), 0.0)


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
    close(loss, L.aggregate(-adv[:, None].expand(3, 5), mask, agg).item())  # ρ = 1: loss = agg(−A·m)
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


def test_clipped_tokens_get_zero_gradient_others_minus_a_rho():
    # ∂ℓ_t/∂log π_t = −A·ρ / N on tokens inside the clip region (or outside it against the advantage),
    # exactly 0 where ρ left [1 − 0.2, 1 + 0.28] in the direction of A; N = valid tokens (token-mean).
    g = torch.Generator().manual_seed(0)
    ratio = 0.5 + torch.rand(8, 8, generator=g)  # ρ in [0.5, 1.5)
    adv = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 1.0, -1.0])
    mask = (torch.rand(8, 8, generator=g) < 0.8).float()
    logp = ratio.log().requires_grad_()
    loss, stats = L.policy_loss(logp, torch.zeros(8, 8), adv, mask, clip_low=0.2, clip_high=0.28)
    (grad,) = torch.autograd.grad(loss, logp)
    a = adv[:, None].expand(8, 8)
    clipped = ((a > 0) & (ratio > 1.28)) | ((a < 0) & (ratio < 0.8))
    assert clipped.any() and (~clipped).any()
    close(grad, torch.where(clipped, 0.0, -a * ratio) * mask / mask.sum())
    close(stats["clip_ratio/region_mean"], (clipped * mask).sum() / mask.sum())


def test_no_clip_when_bounds_are_none():
    # ρ = 10, A = +1 and ρ = 0.1, A = −1: far outside [0.8, 1.2] but no bounds → ℓ = −Aρ = [−10, 0.1],
    # token-mean −4.95; ∂/∂log π = −Aρ / 2 = [−5, 0.05]; every clip fraction 0.
    logp, old, adv, mask = one_token_batch([10.0, 0.1], [1.0, -1.0])
    loss, stats = L.policy_loss(logp, old, adv, mask, clip_low=None, clip_high=None)
    close(loss, -4.95)
    (grad,) = torch.autograd.grad(loss, logp)
    close(grad, [[-5.0], [0.05]])
    for key in ("clipfrac", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        close(stats[key], 0.0)
    # One side only: clip_high 0.2 clips ρ = 10 (→ −1.2, no gradient); the low side stays open.
    loss, stats = L.policy_loss(logp, old, adv, mask, clip_low=None, clip_high=0.2)
    close(loss, (-1.2 + 0.1) / 2)
    (grad,) = torch.autograd.grad(loss, logp)
    close(grad, [[0.0], [0.05]])
    close(stats["clip_ratio/high_mean"], 0.5)
    close(stats["clip_ratio/low_mean"], 0.0)


def test_log_ratio_is_clamped_before_exp():
    # log π − log π_old = 100: e^100 overflows fp32 to inf. Clamped to 20: ρ = e^20, with A = −1 and no
    # clip ℓ = e^20 = 4.85e8, finite; the clamp passes no gradient, so the gradient is 0, finite too.
    logp = torch.tensor([[100.0]], requires_grad=True)
    loss, stats = L.policy_loss(logp, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1), None, None)
    close(loss, math.exp(20), tol=1e-5)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(grad).all() and torch.isfinite(stats["approx_kl"])
    loss, _ = L.policy_loss(
        logp, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1), None, None, log_ratio_clamp=math.inf
    )
    assert torch.isinf(loss)  # what the clamp prevents


# --- GSPO: sequence-level ratio --------------------------------------------------------------------


@pytest.mark.parametrize("agg", list(L.AGGREGATIONS))
def test_gspo_on_policy_equals_token_level(agg):
    torch.manual_seed(0)
    logp = torch.randn(3, 4, requires_grad=True)
    mask = torch.tensor([[1.0] * 4, [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, -2.0, 0.5])
    token, _ = L.policy_loss(logp, logp.detach(), adv, mask, agg=agg)
    seq, stats = L.policy_loss(logp, logp.detach(), adv, mask, agg=agg, ratio_level="sequence")
    close(seq, token.item())
    torch.testing.assert_close(torch.autograd.grad(seq, logp)[0], torch.autograd.grad(token, logp)[0])
    close(stats["ratio_mean"], 1.0)


def test_gspo_clips_whole_sequences_by_hand():
    # old = 0, so log-ratios = logp. Row 0 (3 tokens, A = +1): [0.5, 0, 0.1], s₀ = 0.6/3 = 0.2 > log 1.2
    # = 0.182322 → ρ = e^0.2 = 1.221403 on every token, all clipped: ℓ = −1.2 ×3, zero gradient.
    # Token level would clip only token 0 (e^0.5 = 1.648721; e^0 and e^0.1 = 1.105171 are inside).
    # Row 1 (2 valid tokens, A = −0.5; the masked 7.0 must not enter the mean): s₁ = (0.2 − 0.1)/2 = 0.05,
    # ρ = e^0.05 = 1.051271, unclipped: ℓ = 0.5·1.051271 = 0.525636 ×2.
    # token-mean over 5 tokens: (−3.6 + 1.051271) / 5 = −0.509746;
    # ∂/∂log π_t = −A·e^{s_i} / 5: row 1 → 0.5·1.051271/5 = 0.105127.
    logp = torch.tensor([[0.5, 0.0, 0.1], [0.2, -0.1, 7.0]], requires_grad=True)
    old, mask, adv = torch.zeros(2, 3), torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]), torch.tensor([1.0, -0.5])
    loss, stats = L.policy_loss(logp, old, adv, mask, ratio_level="sequence")
    close(loss, -0.509746)
    (grad,) = torch.autograd.grad(loss, logp)
    close(grad, [[0.0, 0.0, 0.0], [0.105127, 0.105127, 0.0]])
    close(stats["clip_ratio/high_mean"], 3 / 5)
    close(stats["clipfrac"], 3 / 5)
    close(stats["ratio_mean"], (3 * 1.221403 + 2 * 1.051271) / 5)
    # Token level on the same batch: row 0 token 0 clipped only; ∂ = −A·ρ_t/5 = [0, −0.2, −0.221034].
    token, token_stats = L.policy_loss(logp, old, adv, mask)
    (token_grad,) = torch.autograd.grad(token, logp)
    close(token_grad[0], [0.0, -0.2, -0.221034])
    close(token_stats["clip_ratio/high_mean"], 1 / 5)


def test_gspo_gradient_is_minus_a_times_sequence_ratio():
    # No clipping, token-mean: ∂ℓ/∂log π_{i,t} = −A_i·exp(s_i) / N, s_i = mean log-ratio of row i, N = Σ m.
    g = torch.Generator().manual_seed(1)
    logp = (0.3 * torch.randn(3, 5, generator=g)).requires_grad_()
    old = 0.3 * torch.randn(3, 5, generator=g)
    mask = torch.tensor([[1.0] * 5, [1.0, 1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0, 1.0]])
    adv = torch.tensor([1.5, -1.0, 0.25])
    loss, _ = L.policy_loss(logp, old, adv, mask, clip_low=None, clip_high=None, ratio_level="sequence")
    (grad,) = torch.autograd.grad(loss, logp)
    s = ((logp.detach() - old) * mask).sum(-1) / mask.sum(-1)  # (B,)
    close(grad, (-adv * s.exp())[:, None] * mask / mask.sum())


def test_sequence_log_ratio_ignores_masked_tokens_and_empty_rows():
    logp = torch.tensor([[0.3, 0.1, 50.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    # row 0: (0.3 + 0.1)/2 = 0.2 on every position; row 1 is all masked → 0.
    close(L.RATIO_LEVELS["sequence"](logp, torch.zeros(2, 3), mask), [[0.2, 0.2, 0.2], [0.0, 0.0, 0.0]])
    close(L.RATIO_LEVELS["token"](logp, torch.ones(2, 3), mask), logp - 1)
    with pytest.raises(ValueError, match="Did you mean 'sequence'"):
        L.policy_loss(logp, logp, torch.ones(2), mask, ratio_level="sequense")


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


def naive_entropy(logits):
    """The unchunked reference: full (B, T, V) fp32 softmax."""
    logp = torch.log_softmax(logits.float(), -1)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, 0.0)).sum(-1)


@pytest.mark.parametrize("chunk_size", [1, 3, 100])  # 100 > B·T = 6
def test_chunked_entropy_matches_naive_value_and_gradient(chunk_size):
    torch.manual_seed(0)
    logits = (3 * torch.randn(2, 3, 11)).requires_grad_()
    with torch.no_grad():
        top_k_cut = logits.detach().clone()
        top_k_cut[0, 1, :5] = -float("inf")
    close(L.entropy_from_logits(top_k_cut, chunk_size), naive_entropy(top_k_cut), tol=1e-6)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    (grad,) = torch.autograd.grad((L.entropy_from_logits(logits, chunk_size) * mask).sum(), logits)
    (ref,) = torch.autograd.grad((naive_entropy(logits) * mask).sum(), logits)
    close(grad, ref, tol=1e-6)


def test_chunked_entropy_graph_keeps_only_views_of_the_logits():
    # Under checkpointing the autograd graph saves the chunk inputs (views of `logits`) and nothing else:
    # no per-chunk softmax or fp32 copy stays alive until backward.
    logits = torch.randn(4, 5, 7, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        entropy = L.entropy_from_logits(logits, chunk_size=6)
    assert saved and all(t.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr() for t in saved)
    entropy.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_chunked_entropy_bf16_and_non_contiguous_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 9, dtype=torch.bfloat16)
    h = L.entropy_from_logits(logits, chunk_size=3)
    assert h.dtype == torch.float32 and h.shape == (2, 4)
    close(h, naive_entropy(logits), tol=1e-6)
    shifted = logits[:, :-1]  # no flat (B·T, V) view exists: handled row by row, still no copy
    close(L.entropy_from_logits(shifted, chunk_size=2), naive_entropy(shifted), tol=1e-6)
    with pytest.raises(ValueError, match="chunk_size"):
        L.entropy_from_logits(logits, chunk_size=0)


# --- KL coefficient controllers --------------------------------------------------------------------


def test_kl_controllers_by_hand():
    assert L.update_kl_coef("fixed", 0.1, 12.0, 64, 6.0, 10_000) == 0.1
    # observed 12, target 6: e = clip(12/6 − 1 = 1, ±0.2) = 0.2 → 0.1·(1 + 0.2·64/10000) = 0.100128.
    assert L.update_kl_coef("adaptive", 0.1, 12.0, 64, 6.0, 10_000) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10_000))
    assert L.update_kl_coef("adaptive", 0.1, 6.0, 64, 6.0, 10_000) == pytest.approx(0.1)  # e = 0
    # observed 0: e = clip(−1) = −0.2 → 0.1·(1 − 0.00128) = 0.099872.
    assert L.update_kl_coef("adaptive", 0.1, 0.0, 64, 6.0, 10_000) == pytest.approx(0.099872)
    assert L.KL_CONTROLLERS["adaptive"](0.1, 7.5, 100, 6.0, 1000) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    with pytest.raises(ValueError, match="Did you mean 'adaptive'"):
        L.update_kl_coef("adaptiv", 0.1, 0.0, 64, 6.0, 10_000)


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

