"""RL's reward shaping and advantage estimation, between the scored rollout and the update: the KL penalty
folded into the reward, the estimator ``config.advantage`` names, and the statistics the step logs."""

from __future__ import annotations

from torch import Tensor

from posttrain.algorithms import advantages as adv_fns
from posttrain.config import RLConfig
from posttrain.trainers.train_batch import last_token


def kl_shaped_rewards(rewards: Tensor, kl_tok: Tensor, mask: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """The task reward with the KL penalty folded in (RLHF's KL-in-reward), in both shapes:

    sequence (B,):  r − β·Σ_t KL_t                                  (RLOO, Ahmadian et al. 2024)
    token (B, L):   −β·KL_t on every valid token, + r on the last one (PPO, Ouyang et al. 2022)

    ``kl_tok`` (B, L) is the per-token KL estimate, 0 off the mask; β = 0 gives the plain reward.
    """
    seq = rewards - beta * kl_tok.sum(-1)  # (B,)
    tok = -beta * kl_tok + rewards[:, None] * last_token(mask)  # (B, L)
    return seq, tok


def estimate_advantages(config: RLConfig, seq_rewards: Tensor, token_rewards: Tensor, group_ids: Tensor,
                        mask: Tensor, values: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Advantages (B, L) from the estimator named by ``config.advantage``, and returns (B, L) for the critic
    (GAE only). Sequence-level estimators give one A per completion, broadcast over its valid tokens."""
    if config.advantage == "gae":
        return adv_fns.gae(token_rewards, values, mask, config.gamma, config.lam)
    if config.advantage == "reinforce_pp":
        return adv_fns.reinforce_pp(token_rewards, mask, config.gamma), None
    kwargs = {"scale": config.adv_scale} if config.advantage == "grpo" else {}
    per_seq = adv_fns.ADVANTAGES[config.advantage](seq_rewards, group_ids, **kwargs)  # (B,)
    return per_seq[:, None] * mask, None


def advantage_metrics(advantages: Tensor, mask: Tensor, values: Tensor | None, returns: Tensor | None) -> dict:
    """Masked mean/std of the advantages (and the critic's values and returns, for PPO)."""
    def stats(name: str, x: Tensor) -> dict:
        n = mask.sum().clamp(min=1)
        mean = (x * mask).sum() / n
        std = (((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)).sqrt()
        return {f"{name}/mean": mean.item(), f"{name}/std": std.item()}

    out = stats("advantages", advantages)
    if values is not None:
        out |= stats("values", values) | stats("returns", returns)
    return out
