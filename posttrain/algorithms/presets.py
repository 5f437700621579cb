"""The RL recipes by name (``RLConfig.algorithm``): each preset fills the RLConfig fields left at None.

Fields a preset does not name get ``RL_FALLBACK``'s value, or keep the dataclass default. A ``.inf``
clip means no clipping.
"""

from __future__ import annotations

from typing import Any

# Named presets of RLConfig: the published recipes, as defaults for the fields left at None.
# Fields not named here keep the dataclass default. `.inf` clip = no clipping.
RL_PRESETS: dict[str, dict[str, Any]] = {
    # nanochat chat_rl: r − group mean, token-mean PG, no KL, no clip (one on-policy update).
    "nanochat": dict(advantage="reinforce", loss_agg="token-mean", clip_low=float("inf"), clip_high=float("inf"),
                     kl_coef=0.0, kl_in="loss"),
    # DeepSeekMath GRPO: group-std advantage, per-sequence mean of token losses, clip 0.2, k3 KL (β 0.04) in loss.
    "grpo": dict(advantage="grpo", adv_scale="group", loss_agg="seq-mean-token-mean", kl_coef=0.04, kl_kind="k3",
                 kl_in="loss"),
    # Dr. GRPO (Liu et al. 2025): no std division, constant length normaliser, no KL.
    "dr_grpo": dict(advantage="dr_grpo", loss_agg="seq-mean-token-sum-norm", kl_coef=0.0),
    # DAPO (Yu et al. 2025): clip-higher, token-mean, dynamic sampling, soft overlong penalty, no KL.
    "dapo": dict(advantage="grpo", adv_scale="group", loss_agg="token-mean", clip_high=0.28, kl_coef=0.0,
                 dynamic_sampling=True, overlong="penalty"),
    # RLOO (Ahmadian et al. 2024): leave-one-out baseline, the completion is one action (token sum).
    "rloo": dict(advantage="rloo", loss_agg="seq-mean-token-sum", kl_coef=0.0, kl_kind="k1", kl_in="reward"),
    # REINFORCE++ (Hu 2025): k1 KL per token in the reward, discounted return whitened over the batch.
    "reinforce_pp": dict(advantage="reinforce_pp", loss_agg="token-mean", kl_coef=0.01, kl_kind="k1",
                         kl_in="reward"),
    # PPO for RLHF (Ouyang et al. 2022): critic + GAE, −β·k1 per token in the reward, several PPO updates.
    "ppo": dict(advantage="gae", loss_agg="token-mean", kl_coef=0.05, kl_kind="k1", kl_in="reward",
                ppo_epochs=2, minibatches=2, entropy_coef=0.001),
}
# What a field left at None gets when the preset does not name it.
RL_FALLBACK: dict[str, Any] = dict(adv_scale="group", clip_low=0.2, clip_high=0.2, kl_kind="k3", kl_in="loss",
                                   ppo_epochs=1, minibatches=1, entropy_coef=0.0, dynamic_sampling=False,
                                   overlong="none")
