"""Advantage estimators: sequence-level baselines (GRPO, Dr. GRPO, RLOO, REINFORCE) and token-level
returns (REINFORCE++, GAE).

Conventions: B = sequences, T = tokens. `rewards` is a (B,) float tensor with one scalar per sequence,
`group_ids` a (B,) integer tensor saying which prompt each sample answers (groups need not be
contiguous). `mask` is a float (B, T) tensor, 1.0 on tokens that count (completion tokens the policy
produced), 0.0 on prompt, padding and tool-output tokens.

Advantages and returns are regression/weighting *targets*: every function here runs under
`torch.no_grad()` and returns tensors that carry no gradient.

Sequence-level estimators share the signature `f(rewards, group_ids) -> (B,)` and are registered in
`ADVANTAGES`; pick one by name with `choose(ADVANTAGES, name, "advantage estimator")`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import NamedTuple, TypeVar

import torch
from torch import Tensor

V = TypeVar("V")


def choose(table: Mapping[str, V], name: str, what: str) -> V:
    """Look up variant `name` in `table`; an unknown name raises ValueError naming the valid ones and
    suggesting the closest (difflib)."""
    if name in table:
        return table[name]
    close = difflib.get_close_matches(str(name), list(table), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown {what} {name!r}; valid: {', '.join(sorted(table))}.{hint}")


class GroupStats(NamedTuple):
    """Per-sample statistics of the sample's group, all (B,)."""

    mean: Tensor  # (B,) group mean of the rewards
    std: Tensor  # (B,) group std, Bessel-corrected like torch.std; 0 for a group of size 1
    zero_std: Tensor  # (B,) bool: every reward in the group is equal (the group carries no signal)


def _as_float(x: Tensor) -> Tensor:
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


@torch.no_grad()
def group_stats(rewards: Tensor, group_ids: Tensor) -> GroupStats:
    """Group mean, std and "all rewards equal" flag for every sample, vectorised (no loop over groups).

    mean_g = Σ_{i∈g} r_i / n_g;  std_g = sqrt(Σ_{i∈g} (r_i − mean_g)² / (n_g − 1)) (Bessel, as torch.std).
    Deviation from torch.std: a group of size 1 gets std 0 instead of NaN (it has no spread to
    divide by; its centred reward is 0 anyway). `zero_std` compares the group's max and min exactly,
    so it is robust to float round-off in the std.
    """
    rewards = _as_float(rewards)  # (B,)
    uniq, inv = torch.unique(group_ids, return_inverse=True)  # (G,), (B,) group index 0..G-1
    zeros = rewards.new_zeros(uniq.numel())  # (G,)
    count = zeros.index_add(0, inv, torch.ones_like(rewards))  # (G,)
    mean = zeros.index_add(0, inv, rewards) / count  # (G,)
    sq_dev = zeros.index_add(0, inv, (rewards - mean[inv]) ** 2)  # (G,)
    std = (sq_dev / (count - 1).clamp(min=1)).sqrt()  # (G,)
    g_max = zeros.scatter_reduce(0, inv, rewards, reduce="amax", include_self=False)  # (G,)
    g_min = zeros.scatter_reduce(0, inv, rewards, reduce="amin", include_self=False)  # (G,)
    return GroupStats(mean[inv], std[inv], (g_max == g_min)[inv])


def group_sizes(group_ids: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Size n_g of each sample's group, (B,) float."""
    _, inv, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return counts[inv].to(dtype or torch.get_default_dtype())  # (B,)


# --- GRPO scaling variants: centred (B,), rewards (B,), stats, eps -> (B,) -----------------------


def _scale_by_group_std(centered: Tensor, rewards: Tensor, stats: GroupStats, eps: float) -> Tensor:
    """GRPO (Shao et al. 2024): divide by the group std."""
    return centered / (stats.std + eps)


def _scale_by_batch_std(centered: Tensor, rewards: Tensor, stats: GroupStats, eps: float) -> Tensor:
    """Divide by the std of the rewards over the whole batch (TRL's scale_rewards="batch")."""
    return centered / (rewards.std() + eps)


def _no_scale(centered: Tensor, rewards: Tensor, stats: GroupStats, eps: float) -> Tensor:
    """Dr. GRPO (Liu et al. 2025) / nanochat: no division, which removes the question-difficulty bias."""
    return centered


GRPO_SCALES: dict[str, Callable[[Tensor, Tensor, GroupStats, float], Tensor]] = {
    "group": _scale_by_group_std,
    "batch": _scale_by_batch_std,
    "none": _no_scale,
}


@torch.no_grad()
def grpo(rewards: Tensor, group_ids: Tensor, scale: str = "group", eps: float = 1e-6) -> Tensor:
    """GRPO outcome advantage, one per sequence: (B,) -> (B,).

    A_i = (r_i − mean_g(r)) / (std_g(r) + eps)      scale="group" (GRPO, std = torch.std, Bessel)
    A_i = (r_i − mean_g(r)) / (std_batch(r) + eps)  scale="batch" (std of the rewards over the batch)
    A_i =  r_i − mean_g(r)                          scale="none"  (Dr. GRPO, nanochat)

    Deviations: a group of size 1 gets A = 0 (no std exists). "batch" divides by the batch std of the
    raw rewards, as TRL does; REINFORCE++-baseline instead whitens the group-centred values.
    """
    rewards = _as_float(rewards)  # (B,)
    scaler = choose(GRPO_SCALES, scale, "grpo scale")
    stats = group_stats(rewards, group_ids)
    centered = rewards - stats.mean  # (B,)
    return scaler(centered, rewards, stats, eps)  # (B,)


@torch.no_grad()
def dr_grpo(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Dr. GRPO (Liu et al. 2025): A_i = r_i − mean_g(r), no std division. Same as grpo(scale="none")."""
    return grpo(rewards, group_ids, scale="none")


@torch.no_grad()
def rloo(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """RLOO (Ahmadian et al. 2024): A_i = r_i − (Σ_{j∈g, j≠i} r_j) / (n_g − 1), (B,) -> (B,).

    Computed as n_g / (n_g − 1) · (r_i − mean_g), which is the same quantity. A group of size 1 has
    no "others" and gets A = 0.
    """
    rewards = _as_float(rewards)  # (B,)
    n = group_sizes(group_ids, rewards.dtype)  # (B,)
    return (rewards - group_stats(rewards, group_ids).mean) * n / (n - 1).clamp(min=1)  # (B,)


@torch.no_grad()
def reinforce(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """REINFORCE with the group-mean baseline (nanochat chat_rl): A_i = r_i − mean_g(r), (B,) -> (B,)."""
    rewards = _as_float(rewards)  # (B,)
    return rewards - group_stats(rewards, group_ids).mean  # (B,)


ADVANTAGES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "grpo": grpo,
    "dr_grpo": dr_grpo,
    "rloo": rloo,
    "reinforce": reinforce,
}


# --- token-level estimators ------------------------------------------------------------------------


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x − mean) / (std + eps) over the valid tokens of the whole batch, then × mask.

    mean = Σ x·m / Σ m;  std = sqrt(Σ (x − mean)²·m / (Σ m − 1)) (Bessel, as torch.std; the
    denominator is clamped to ≥ 1 so one valid token gives std 0 instead of NaN).
    """
    n = mask.sum()
    mean = (x * mask).sum() / n.clamp(min=1)
    var = (((x - mean) ** 2) * mask).sum() / (n - 1).clamp(min=1)
    return (x - mean) / (var.sqrt() + eps) * mask  # (B, T)


@torch.no_grad()
def reinforce_pp(token_rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """REINFORCE++ (Hu 2025) advantage: discounted return-to-go, whitened over the batch, (B,T) -> (B,T).

    G_t = Σ_{s ≥ t, s valid} γ^{k(s) − k(t)} r_s   where k(·) counts valid tokens only,
    A = (G − mean) / (std + 1e-8) over all valid tokens of the batch, × mask.

    Masked positions contribute no reward and get 0. Gaps in the mask (tool-output tokens inside a
    completion) are skipped: discounting runs over the sequence of valid tokens, so a tool call does
    not cost γ per tool token. (The KL penalty of REINFORCE++ is expected to be folded into
    `token_rewards` by the caller.) std is Bessel-corrected (see `masked_whiten`).
    """
    rewards = _as_float(token_rewards) * mask  # (B, T)
    returns = torch.zeros_like(rewards)  # (B, T)
    running = rewards.new_zeros(rewards.shape[0])  # (B,) return of the next valid token
    for t in reversed(range(rewards.shape[1])):
        valid = mask[:, t] > 0  # (B,)
        running = torch.where(valid, rewards[:, t] + gamma * running, running)
        returns[:, t] = running * mask[:, t]
    return masked_whiten(returns, mask)  # (B, T)


@torch.no_grad()
def gae(
    token_rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016) -> (advantages, returns), both (B, T).

    δ_t = r_t + γ V_{t+1} − V_t,   A_t = δ_t + γλ A_{t+1},   returns_t = A_t + V_t (before whitening),
    with V and A after the last valid token = 0 (the episode ends there).

    "t + 1" means the next *valid* token: gaps in the mask (tool-output tokens inside a completion)
    are skipped, so the time axis is the sequence of tokens the policy produced. If `whiten`, the
    advantages are whitened over the valid tokens of the batch (masked mean, Bessel std, + 1e-8);
    returns are not. Masked positions are 0 in both outputs.
    """
    rewards = _as_float(token_rewards)  # (B, T)
    values = _as_float(values)  # (B, T)
    advantages = torch.zeros_like(rewards)  # (B, T)
    next_value = rewards.new_zeros(rewards.shape[0])  # (B,) V of the next valid token
    next_adv = rewards.new_zeros(rewards.shape[0])  # (B,) A of the next valid token
    for t in reversed(range(rewards.shape[1])):
        valid = mask[:, t] > 0  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        adv = delta + gamma * lam * next_adv  # (B,)
        advantages[:, t] = adv * mask[:, t]
        next_value = torch.where(valid, values[:, t], next_value)
        next_adv = torch.where(valid, adv, next_adv)
    returns = (advantages + values) * mask  # (B, T)
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns
