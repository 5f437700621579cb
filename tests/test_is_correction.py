"""The sampler/trainer correction (losses.is_weights) and the per-token weights of the policy loss, by hand."""

import pytest
import torch

from posttrain.algorithms import losses as L


def test_importance_weights_by_hand():
    """ρ = π_old / π_behaviour per token: 2, 0.5, 1.2 and a masked 9 (ignored); C = 1.5."""
    old = torch.log(torch.tensor([[0.4, 0.1, 0.6, 0.9]]))
    behaviour = torch.log(torch.tensor([[0.2, 0.2, 0.5, 0.1]]))
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    tis, stats = L.is_weights(old, behaviour, mask, "tis", 1.5)
    torch.testing.assert_close(tis[0, :3], torch.tensor([1.5, 0.5, 1.2]))
    assert stats["is/ratio_mean"].item() == pytest.approx((2 + 0.5 + 1.2) / 3)
    assert stats["is/ratio_max"].item() == pytest.approx(2.0)  # the masked 9 does not count
    assert stats["is/truncated_frac"].item() == pytest.approx(1 / 3) and stats["is/masked_frac"].item() == 0
    icepop, stats = L.is_weights(old, behaviour, mask, "icepop", 1.5)
    torch.testing.assert_close(icepop[0, :3], torch.tensor([0.0, 0.0, 1.0]))  # 2 > C, 0.5 < 1/C
    assert stats["is/masked_frac"].item() == pytest.approx(2 / 3) and stats["is/truncated_frac"].item() == 0
    none, _ = L.is_weights(old, behaviour, mask, "none", 1.5)
    assert none is None
    with pytest.raises(ValueError, match="tis"):
        L.is_weights(old, behaviour, mask, "tsi", 1.5)


def test_token_weights_scale_each_tokens_loss_and_gradient():
    torch.manual_seed(0)
    logp = torch.randn(2, 5, requires_grad=True)
    adv, mask = torch.tensor([1.0, -2.0]), torch.ones(2, 5)
    weights = torch.tensor([[1.0, 0.0, 2.0, 1.0, 0.5], [0.0, 1.0, 1.0, 3.0, 1.0]])
    plain, _ = L.policy_loss(logp, logp.detach(), adv, mask, agg="token-mean")
    ones, _ = L.policy_loss(logp, logp.detach(), adv, mask, agg="token-mean", token_weights=torch.ones(2, 5))
    assert ones.item() == plain.item()
    weighted, _ = L.policy_loss(logp, logp.detach(), adv, mask, agg="token-mean", token_weights=weights)
    (grad,) = torch.autograd.grad(weighted, logp)
    # on-policy ρ = 1: ℓ_t = −A·ρ_t, so ∂/∂log π_t of the token mean is −A_b · w_t / (B·T)
    torch.testing.assert_close(grad, -adv[:, None] * weights / 10)
