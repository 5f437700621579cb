"""Objectives: KL estimators, loss aggregation, PPO-family policy and value losses (token- or
sequence-level ratio), entropy, KL coefficient control, DPO and Bradley–Terry.

Conventions: B = sequences, T = tokens, V = vocabulary. `logprobs` are per-token log-probabilities of
the sampled tokens, (B, T). `mask` is a float (B, T) tensor, 1.0 on tokens that count. Variants are
small functions registered in dicts (`KL_ESTIMATORS`, `AGGREGATIONS`, `RATIO_LEVELS`, `IS_CORRECTIONS`,
`KL_CONTROLLERS`, `DPO_LOSSES`) and picked by name; an unknown name raises ValueError with the valid names
and the closest match.

Stats dicts hold detached 0-dim tensors (no host sync inside the step); call `float()` to log them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from posttrain.algorithms.advantages import choose

# --- KL estimators (Schulman, "Approximating KL Divergence", 2020) -------------------------------
# Each estimates KL(π ‖ π_ref) per token from samples of π; all (B, T) -> (B, T).


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = log π − log π_ref. Unbiased, high variance, can be negative. As a loss term its expected gradient is
    0 (E_π[∇ log π] = 0): it belongs in the reward (``kl_in: reward``), and the config refuses it in the loss."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = ½ (log π − log π_ref)². Biased, low variance, ≥ 0. As a loss term (samples of π, no score-function
    term) its expected gradient is E_π[(log π − log π_ref) ∇ log π] = ∇ KL(π ‖ π_ref): the reverse KL's."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = exp(ref − logp) − (ref − logp) − 1. Unbiased, low variance, always ≥ 0 (GRPO's choice). As a loss
    term its expected gradient is E_π[(1 − π_ref/π) ∇ log π] = ∇ KL(π_ref ‖ π): the forward KL's, not the reverse
    one it estimates (Tang & Munos 2025); k2 gives the reverse KL's.

    No clamping of the log-ratio (verl's "low_var_kl" clamps to ±20 / ±10); keep log-ratios sane upstream.
    """
    log_ratio = ref_logprobs - logprobs  # (B, T)
    return (torch.expm1(log_ratio) - log_ratio).clamp(min=0.0)  # expm1: no rounding below 0 near log_ratio = 0


def kl_abs(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """|log π − log π_ref| (a diagnostic, not an unbiased estimator)."""
    return (logprobs - ref_logprobs).abs()


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
    "abs": kl_abs,
}


def kl(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k3", mask: Tensor | None = None) -> Tensor:
    """Per-token KL(π ‖ π_ref) estimate, (B, T), with estimator `kind` in KL_ESTIMATORS (k1|k2|k3|abs); with
    ``mask`` (B, T), computed only where it is 1 and 0 elsewhere (k3's exp of a padding position's arbitrary
    log-ratio can overflow to inf, and inf · 0 is NaN)."""
    estimate = choose(KL_ESTIMATORS, kind, "kl estimator")
    if mask is None:
        return estimate(logprobs, ref_logprobs)
    keep = mask.bool()
    return estimate(torch.where(keep, logprobs, 0.0), torch.where(keep, ref_logprobs, 0.0)) * mask


# --- aggregation: per-token (B, T) -> scalar ---------------------------------------------------------
# Denominators are clamped to ≥ 1 so an all-masked batch gives 0, not NaN. The sequence means count only the
# rows with a token on the mask (B' below; as verl): a fully masked row (a truncated one under overlong=mask)
# would otherwise shrink every other row's weight.


def rows_with_tokens(mask: Tensor) -> Tensor:
    """B' = the number of rows with at least one token on ``mask`` (B, T), as a float (≥ 0)."""
    return (mask.sum(-1) > 0).sum().float()


def token_mean(x: Tensor, mask: Tensor, max_len: int | None = None) -> Tensor:
    """Σ x·m / Σ m over the whole batch: every token weighs the same (DAPO)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def seq_mean_token_mean(x: Tensor, mask: Tensor, max_len: int | None = None) -> Tensor:
    """Σ_b (Σ_t x·m / Σ_t m) / B': every sequence weighs the same (original GRPO)."""
    per_seq = (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
    return per_seq.sum() / rows_with_tokens(mask).clamp(min=1)


def seq_mean_token_sum(x: Tensor, mask: Tensor, max_len: int | None = None) -> Tensor:
    """Σ_b Σ_t x·m / B': sum over tokens, mean over sequences."""
    return (x * mask).sum() / rows_with_tokens(mask).clamp(min=1)


def seq_mean_token_sum_norm(x: Tensor, mask: Tensor, max_len: int | None = None) -> Tensor:
    """Σ x·m / (B' · max_len): a constant normaliser per sequence, no length bias (Dr. GRPO). max_len defaults
    to T."""
    return (x * mask).sum() / (rows_with_tokens(mask).clamp(min=1) * (max_len or x.shape[-1]))


AGGREGATIONS: dict[str, Callable[[Tensor, Tensor, int | None], Tensor]] = {
    "token-mean": token_mean,
    "seq-mean-token-mean": seq_mean_token_mean,
    "seq-mean-token-sum": seq_mean_token_sum,
    "seq-mean-token-sum-norm": seq_mean_token_sum_norm,
}


def aggregate(
    per_token: Tensor, mask: Tensor, mode: str = "token-mean", max_len: int | None = None
) -> Tensor:
    """Reduce a per-token (B, T) loss to a scalar with `mode` in AGGREGATIONS:
    token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm (÷ B'·max_len;
    B': the rows with a token on the mask)."""
    return choose(AGGREGATIONS, mode, "loss aggregation")(per_token, mask, max_len)


# --- ratio levels: (logprobs, old_logprobs, mask) -> log ρ, all (B, T) --------------------------------


def ratio_token(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Token-level importance ratio (PPO, GRPO): log ρ_t = log π_t − log π_old,t."""
    return logprobs - old_logprobs  # (B, T)


def ratio_sequence(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Sequence-level importance ratio, GSPO-token form (Zheng et al. 2025):

    s_i = Σ_t m_t (log π_t − log π_old,t) / Σ_t m_t   (log of the length-normalised sequence ratio)
    log ρ_{i,t} = sg[s_i] + log π_t − sg[log π_t]

    In value every token of sequence i has ρ = exp(s_i), so clipping acts on whole sequences; the gradient
    of log ρ_{i,t} is ∇log π_t. Masked tokens do not count in the mean; an all-masked row gets s_i = 0.
    """
    diff = torch.where(mask > 0, logprobs - old_logprobs, 0.0)  # (B, T); where, not ×, so padding NaN/inf stays out
    s = diff.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
    return s.detach() + logprobs - logprobs.detach()  # (B, T)


RATIO_LEVELS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "token": ratio_token,
    "sequence": ratio_sequence,
}


# --- the sampler/trainer mismatch: weights (ρ = π_old / π_behaviour, C) -> (B, T) --------------------


def is_tis(ratio: Tensor, clip: float) -> Tensor:
    """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"): w_t = min(ρ_t, C)."""
    return ratio.clamp(max=clip)


def is_icepop(ratio: Tensor, clip: float) -> Tensor:
    """IcePop (Ling Team 2025): w_t = 1 when 1/C ≤ ρ_t ≤ C, else 0 (a token the two engines disagree on too
    much gets no loss at all, in either direction)."""
    return ((ratio >= 1.0 / clip) & (ratio <= clip)).to(ratio.dtype)


IS_CORRECTIONS: dict[str, Callable[[Tensor, float], Tensor] | None] = {"none": None, "tis": is_tis,
                                                                       "icepop": is_icepop}


def is_weights(old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, mode: str, clip: float,
               log_ratio_clamp: float = 20.0) -> tuple[Tensor | None, dict[str, Tensor]]:
    """Per-token weights (B, T) that correct the policy loss for tokens sampled by another engine than the one
    that trains (vLLM, another precision, stale weights):

    ρ_t = π_old,t / π_behaviour,t = exp(clamp(log π_old,t − log π_behaviour,t, −c, c)),  w_t = mode(ρ_t, C)

    with π_old the trainer's probability at the weights that sampled (the PPO anchor) and π_behaviour the
    sampler's (IS_CORRECTIONS: tis, icepop; none gives no weights). The weights are detached: they scale each
    token's policy-gradient term, ℓ_t ← w_t · ℓ_t (:func:`policy_loss`'s ``token_weights``; the KL and entropy
    terms are not weighted, as in verl). Stats over the masked tokens: ``is/ratio_mean``, ``is/ratio_max``,
    ``is/weight_mean`` (how much the correction shrinks the loss), ``is/masked_frac`` (weight 0: icepop) and
    ``is/truncated_frac`` (ρ > C, kept at weight C: tis)."""
    fn = choose(IS_CORRECTIONS, mode, "importance-sampling correction")
    with torch.no_grad():
        ratio = torch.exp((old_logprobs - behaviour_logprobs).clamp(-log_ratio_clamp, log_ratio_clamp))  # (B, T)
        ratio = torch.where(mask > 0, ratio, 1.0)  # (B, T); padding and forced tokens weigh 1 and are masked anyway
        weights = fn(ratio, clip) if fn is not None else torch.ones_like(ratio)  # (B, T)
        stats = {"is/ratio_mean": token_mean(ratio, mask),
                 "is/ratio_max": torch.where(mask > 0, ratio, 0.0).max() if mask.numel() else ratio.new_zeros(()),
                 "is/weight_mean": token_mean(weights, mask),
                 "is/masked_frac": token_mean((weights == 0).to(mask.dtype), mask),
                 "is/truncated_frac": token_mean(((weights > 0) & (ratio > clip)).to(mask.dtype), mask)}
    return (weights if fn is not None else None), stats


# --- PPO-family losses -----------------------------------------------------------------------------


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float | None = 0.2,
    clip_high: float | None = 0.2,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    max_len: int | None = None,
    ratio_level: str = "token",
    log_ratio_clamp: float = 20.0,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate policy loss (PPO, Schulman et al. 2017) -> (scalar loss, stats).

    ρ = exp(clamp(log ρ, −c, c)), c = log_ratio_clamp;  ℓ_t = max(−A·ρ, −A·clip(ρ, 1 − clip_low, 1 + clip_high)).
    clip_high > clip_low is DAPO's clip-higher; clip_low / clip_high = None means no bound on that side.
    Dual clip (Ye et al. 2020), for A < 0 only: ℓ_t = min(ℓ_t, −A·dual_clip) with dual_clip > 1, which
    bounds the loss when ρ ≫ 1. `advantages` is (B,) (broadcast over tokens) or (B, T); it is detached.
    Tokens reduce with `agg` (AGGREGATIONS).

    `ratio_level` (RATIO_LEVELS) picks log ρ: "token" = log π_t − log π_old,t (PPO/GRPO); "sequence" =
    GSPO (Zheng et al. 2025) in its GSPO-token form: every token of sequence i has ρ = exp(mean_t of
    the sequence's log-ratios) in value and ∇log ρ_t = ∇log π_t, so a sequence is clipped as a whole.
    GSPO as in the paper pairs it with agg="seq-mean-token-mean" and much tighter clips (≈ 3e-4 / 4e-4);
    both are left to the caller.

    Deviation from the papers (as verl): log ρ is clamped to [−c, c] before exp so that a stale or
    broken old log-prob cannot overflow ρ to inf; clamped tokens get no gradient through ρ.
    c = math.inf turns the clamp off.

    Stats (masked token means): clipfrac (the clipped term is the active max), clip_ratio/low_mean
    (ρ < 1 − clip_low and A < 0), clip_ratio/high_mean (ρ > 1 + clip_high and A > 0),
    clip_ratio/region_mean (their sum), dual_clipfrac, ratio_mean (of the ρ used, so sequence ρ for GSPO),
    and approx_kl = k3 estimate of KL(π_old ‖ π) from the clamped *token* log-ratio r: e^r − 1 − r
    (as cleanrl's approx_kl), whatever the ratio level.

    On-policy (old_logprobs = logprobs.detach()) ρ = 1 and ∇ℓ = −A·∇log π: vanilla policy gradient,
    at either ratio level.

    ``token_weights`` (B, T), detached: each token's loss is multiplied by its weight before aggregation,
    ℓ_t ← w_t · ℓ_t (the sampler/trainer correction of :func:`is_weights`); the stats do not see them.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (e.g. 3.0), got {dual_clip}")
    ratio_fn = choose(RATIO_LEVELS, ratio_level, "ratio level")
    lo = -math.inf if clip_low is None else 1.0 - clip_low
    hi = math.inf if clip_high is None else 1.0 + clip_high
    adv = advantages.detach().reshape(advantages.shape[0], -1).expand_as(logprobs)  # (B, T)
    log_ratio = ratio_fn(logprobs, old_logprobs, mask).clamp(-log_ratio_clamp, log_ratio_clamp)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    pg = -adv * ratio  # (B, T)
    pg_clipped = -adv * ratio.clamp(lo, hi)  # (B, T)
    per_token = torch.maximum(pg, pg_clipped)  # (B, T)
    dual_active = torch.zeros_like(mask, dtype=torch.bool)  # (B, T)
    if dual_clip is not None:
        bound = -adv * dual_clip  # (B, T)
        dual_active = (adv < 0) & (per_token > bound)
        per_token = torch.where(dual_active, bound, per_token)
    if token_weights is not None:
        per_token = per_token * token_weights.detach()
    loss = aggregate(per_token, mask, agg, max_len)

    with torch.no_grad():
        low = ((ratio < lo) & (adv < 0)).to(mask.dtype)  # (B, T)
        high = ((ratio > hi) & (adv > 0)).to(mask.dtype)  # (B, T)
        token_lr = (logprobs - old_logprobs).clamp(-log_ratio_clamp, log_ratio_clamp)  # (B, T)
        stats = {
            "clipfrac": token_mean((pg_clipped > pg).to(mask.dtype), mask),
            "clip_ratio/low_mean": token_mean(low, mask),
            "clip_ratio/high_mean": token_mean(high, mask),
            "clip_ratio/region_mean": token_mean(low + high, mask),
            "dual_clipfrac": token_mean(dual_active.to(mask.dtype), mask),
            "approx_kl": token_mean(torch.exp(token_lr) - 1 - token_lr, mask),
            "ratio_mean": token_mean(ratio, mask),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip: float | None = 0.2,
    agg: str = "token-mean",
    max_len: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (PPO2 / OpenAI baselines) -> (scalar loss, stats), all inputs (B, T).

    ℓ_t = ½ · max((V − R)², (clip(V, V_old − c, V_old + c) − R)²); clip=None gives ½ (V − R)².
    Stats: vf_clipfrac = fraction of valid tokens where the clipped term is the larger one.
    """
    c = math.inf if clip is None else clip
    old_values, returns = old_values.detach(), returns.detach()
    clipped = torch.clamp(values, old_values - c, old_values + c)  # (B, T)
    unclipped_sq = (values - returns) ** 2  # (B, T)
    clipped_sq = (clipped - returns) ** 2  # (B, T)
    per_token = 0.5 * torch.maximum(unclipped_sq, clipped_sq)  # (B, T)
    loss = aggregate(per_token, mask, agg, max_len)
    with torch.no_grad():
        stats = {"vf_clipfrac": token_mean((clipped_sq > unclipped_sq).to(mask.dtype), mask)}
    return loss, stats


# --- entropy -----------------------------------------------------------------------------------------


def _entropy_rows(rows: Tensor) -> Tensor:
    """H = −Σ_v p_v log p_v for each row, (N, V) -> (N,), in at least fp32; p_v = 0 terms count 0."""
    dtype = torch.promote_types(rows.dtype, torch.float32)  # bf16 logits: compute in fp32
    logp = torch.log_softmax(rows.to(dtype), dim=-1)  # (N, V)
    p = logp.exp()  # (N, V)
    return -(p * torch.where(p > 0, logp, 0.0)).sum(-1)  # (N,)


def entropy_from_logits(logits: Tensor, chunk_size: int = 4096) -> Tensor:
    """Entropy of the next-token distribution, (B, T, V) -> (B, T) (any leading shape works).

    H = −Σ_v p_v log p_v with log p = log_softmax(logits) (logsumexp-stable), computed in at least fp32;
    terms with p_v = 0 (e.g. logits set to −inf by top-k) count 0 rather than NaN.

    Memory: the (B·T, V) rows are processed `chunk_size` at a time, so the fp32 softmax temporaries are
    (chunk_size, V), never a second full (B, T, V). When autograd records (grad enabled and logits
    require grad, e.g. an entropy bonus) each chunk runs under non-reentrant activation checkpointing:
    the graph keeps only the chunk inputs (views of `logits`) and recomputes the softmax in backward,
    trading one extra softmax per chunk for memory.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    try:
        flat = logits.view(-1, logits.shape[-1])  # (B·T, V), a view: no copy
    except RuntimeError:  # strides allow no flat view (e.g. logits[:, :-1]): one leading row at a time
        return torch.stack([entropy_from_logits(row, chunk_size) for row in logits.unbind(0)])
    record = torch.is_grad_enabled() and logits.requires_grad
    parts = []
    for chunk in flat.split(chunk_size):  # (≤ chunk_size, V) views
        if record:  # the function draws no random numbers, so no RNG state to stash
            parts.append(checkpoint(_entropy_rows, chunk, use_reentrant=False, preserve_rng_state=False))
        else:
            parts.append(_entropy_rows(chunk))
    return torch.cat(parts).view(logits.shape[:-1])  # (B, T)


# --- KL coefficient controllers: (coef, observed_kl, n_samples, target, horizon) -> new coef ---------


def kl_coef_fixed(coef: float, observed_kl: float, n_samples: int, target: float, horizon: int) -> float:
    """β stays as it is."""
    return coef


def kl_coef_adaptive(coef: float, observed_kl: float, n_samples: int, target: float, horizon: int) -> float:
    """Adaptive KL controller (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"):

    e = clip(KL_observed / KL_target − 1, −0.2, 0.2);   β ← β · (1 + e · n_samples / horizon).

    The paper writes the step as K_β·e; as in its released code (and TRL, verl) K_β = n_samples / horizon,
    where n_samples is how many samples the update saw, so β moves at most 20 % per `horizon` samples.
    """
    if target <= 0 or horizon <= 0:
        raise ValueError(f"adaptive KL control needs target > 0 and horizon > 0, got {target}, {horizon}")
    e = min(max(observed_kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + e * n_samples / horizon)


KL_CONTROLLERS: dict[str, Callable[[float, float, int, float, int], float]] = {
    "fixed": kl_coef_fixed,
    "adaptive": kl_coef_adaptive,
}


def update_kl_coef(kind: str, coef: float, observed_kl: float, n_samples: int, target: float, horizon: int) -> float:
    """New KL coefficient β from the controller `kind` in KL_CONTROLLERS (fixed | adaptive); pure."""
    return choose(KL_CONTROLLERS, kind, "kl controller")(coef, observed_kl, n_samples, target, horizon)


# --- preference losses ---------------------------------------------------------------------------
# DPO variants take h = (log π_c − log π_ref,c) − (log π_r − log π_ref,r), (B,) -> (B,).


def dpo_sigmoid(h: Tensor, beta: float, eps: float) -> Tensor:
    """DPO (Rafailov et al. 2023) with cDPO label smoothing ε: −(1−ε) log σ(βh) − ε log σ(−βh)."""
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def dpo_ipo(h: Tensor, beta: float, eps: float) -> Tensor:
    """IPO (Azar et al. 2023): (h − 1/(2β))². Deviation: h uses the log-probs as given (TRL averages
    them over tokens for IPO; pass length-normalised log-probs to get that). ε is unused."""
    return (h - 1 / (2 * beta)) ** 2


def dpo_hinge(h: Tensor, beta: float, eps: float) -> Tensor:
    """SLiC hinge (Zhao et al. 2023): relu(1 − βh). ε is unused."""
    return torch.relu(1 - beta * h)


def dpo_robust(h: Tensor, beta: float, eps: float) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024), unbiased under label-flip rate ε < ½:
    (−(1−ε) log σ(βh) + ε log σ(−βh)) / (1 − 2ε)."""
    if not 0 <= eps < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {eps}")
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


DPO_LOSSES: dict[str, Callable[[Tensor, float, float], Tensor]] = {
    "sigmoid": dpo_sigmoid,
    "ipo": dpo_ipo,
    "hinge": dpo_hinge,
    "robust": dpo_robust,
}


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Per-pair DPO-family loss, (B,) sequence log-probs -> (B,); average it yourself.

    h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)); `kind` in DPO_LOSSES:
    sigmoid: −(1−ε) log σ(βh) − ε log σ(−βh);  ipo: (h − 1/(2β))²;  hinge: relu(1 − βh);
    robust: (−(1−ε) log σ(βh) + ε log σ(−βh)) / (1 − 2ε).  ε = label_smoothing.
    The reference log-probs are detached.
    """
    fn = choose(DPO_LOSSES, kind, "dpo loss")
    h = (chosen_logps - ref_chosen_logps.detach()) - (rejected_logps - ref_rejected_logps.detach())  # (B,)
    return fn(h, beta, label_smoothing)


def bradley_terry_loss(
    r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | float | None = None, center_coef: float = 0.0
) -> Tensor:
    """Reward-model loss (Bradley–Terry; margin as in Llama 2), (B,) scores -> scalar.

    L = mean(−log σ(r_c − r_r − margin)) + center_coef · mean((r_c + r_r)²)
    The second term is the reward-centering auxiliary loss (Eisenstein et al. 2023, TRL's
    center_rewards_coefficient): it pins the scores' mean near 0. margin=None means 0.
    """
    margin = 0.0 if margin is None else margin
    nll = -F.logsigmoid(r_chosen - r_rejected - margin).mean()
    return nll + center_coef * ((r_chosen + r_rejected) ** 2).mean()
