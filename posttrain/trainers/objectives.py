"""What the model engine computes on a micro-batch of an RL step: the policy's and the critic's losses, each
configured by a small dataclass instead of the whole RLConfig.

An objective has three methods the engine calls (see ``ModelEngine.score`` / ``forward_backward``):
``score(module, micro)`` (B, L) under no grad, ``loss(module, micro) -> (loss, stats)`` with the loss
aggregated over the micro-batch, and ``share(mask)``, the micro-batch's part of the global normaliser
(its valid tokens for token-mean, its rows with a valid token otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.algorithms import losses
from posttrain.trainers.train_batch import TrainBatch


def share(mask: Tensor, agg: str) -> Tensor:
    """A micro-batch's share of the loss normaliser: its tokens for token-mean, otherwise its rows with a token on
    the mask (``losses.rows_with_tokens``: a fully masked row counts in no sequence mean)."""
    return mask.sum() if agg == "token-mean" else losses.rows_with_tokens(mask)


@dataclass
class PolicyLoss:
    """The policy's loss: PPO's clipped surrogate (+ β·KL to the reference when it is in the loss)
    − entropy_coef · entropy, every term aggregated with ``agg``, log-probs of logits / ``temperature``."""

    agg: str = "token-mean"  # losses.AGGREGATIONS
    max_len: int | None = None  # the constant length of seq-mean-token-sum-norm (Dr. GRPO)
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    ratio_level: str = "token"
    kl_kind: str = "k3"
    kl_coef: float = 0.0  # β of the KL in the loss (0: none)
    entropy_coef: float = 0.0
    temperature: float = 1.0  # the sampling temperature: the trainer trains the distribution it sampled


class PolicyObjective:
    """The policy's :class:`PolicyLoss` on micro-batches. While ``mismatch`` is set, every micro-batch's
    trainer log-probs are compared with the sampler's (behaviour) log-probs of the same tokens."""

    def __init__(self, config: PolicyLoss):
        self.config = config
        self.mismatch: Mismatch | None = None

    def share(self, mask: Tensor) -> Tensor:
        return share(mask, self.config.agg)

    def score(self, module, micro: TrainBatch) -> Tensor:
        return module.logprobs(micro.inputs, micro.targets, temperature=self.config.temperature)[0]  # (r, w)

    def loss(self, module, micro: TrainBatch) -> tuple[Tensor, dict[str, Tensor]]:
        c, m = self.config, micro.mask
        logp, entropy = module.logprobs(micro.inputs, micro.targets, temperature=c.temperature, entropy=True)  # (r, w)
        old = micro.old_logp if micro.old_logp is not None else logp.detach()
        loss, stats = losses.policy_loss(logp, old, micro.advantages, m, c.clip_low, c.clip_high,
                                         dual_clip=c.dual_clip, agg=c.agg, max_len=c.max_len,
                                         ratio_level=c.ratio_level, token_weights=micro.is_weight)
        stats["policy_loss"] = loss.detach()
        if c.kl_coef > 0 and micro.ref_logp is not None:
            kl_tok = losses.kl(logp, micro.ref_logp, c.kl_kind, m)  # (B, T), 0 off the mask
            loss = loss + c.kl_coef * losses.aggregate(kl_tok, m, c.agg, c.max_len)
        if c.entropy_coef > 0:
            loss = loss - c.entropy_coef * losses.aggregate(entropy, m, c.agg, c.max_len)
        stats["entropy"] = losses.token_mean(entropy.detach(), m)
        if self.mismatch is not None and micro.behaviour is not None:
            self.mismatch.add(micro.behaviour, logp.detach(), m)
        return loss, stats


@dataclass
class ValueLoss:
    """The critic's clipped value loss (PPO2), aggregated like the policy loss."""

    agg: str = "token-mean"
    max_len: int | None = None
    clip: float | None = 0.2  # V within V_old ± clip (None: no clipping)


class ValueObjective:
    """The critic's :class:`ValueLoss` on micro-batches; its scores are the values (B, L)."""

    def __init__(self, config: ValueLoss):
        self.config = config

    def share(self, mask: Tensor) -> Tensor:
        return share(mask, self.config.agg)

    def score(self, module, micro: TrainBatch) -> Tensor:
        return module(micro.inputs)  # (r, w)

    def loss(self, module, micro: TrainBatch) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.config
        return losses.value_loss(module(micro.inputs), micro.values, micro.returns, micro.mask, c.clip, c.agg,
                                 c.max_len)


class Mismatch:
    """Behaviour (sampler) vs trainer log-probs of the same sampled tokens, accumulated over micro-batches:

    ``mismatch/logprob_diff_max`` = max_t |log π_trainer − log π_behaviour| and ``mismatch/kl`` = the token
    mean of k3 = e^d − d − 1 with d = log π_trainer − log π_behaviour, an estimate of KL(behaviour ‖ trainer)
    from the behaviour's own samples. Both are 0 when the trainer recomputes exactly what the sampler drew
    from; top-k / top-p truncation makes them differ by design (the sampler's distribution is renormalised
    over the kept tokens, the trainer's is the whole tempered policy)."""

    def __init__(self):
        self.kl_sum = self.count = self.diff_max = None

    def add(self, behaviour: Tensor, logp: Tensor, mask: Tensor) -> None:
        d = (logp.float() - behaviour.float()) * mask  # (B, T)
        kl_sum = losses.kl(behaviour.float(), logp.float(), "k3", mask).sum()
        diff_max = d.abs().max() if d.numel() else torch.zeros((), device=d.device)
        self.kl_sum = kl_sum if self.kl_sum is None else self.kl_sum + kl_sum
        self.count = mask.sum() if self.count is None else self.count + mask.sum()
        self.diff_max = diff_max if self.diff_max is None else torch.maximum(self.diff_max, diff_max)

    def metrics(self) -> dict[str, float]:
        if self.count is None or float(self.count) == 0:
            return {}
        return {"mismatch/logprob_diff_max": float(self.diff_max), "mismatch/kl": float(self.kl_sum / self.count)}

    def combined(self, world) -> dict[str, float]:
        """:meth:`metrics` over every rank's tokens (data parallel: each rank ran its share of the rows)."""
        if world.size == 1:
            return self.metrics()
        kl_sum, count = world.sum([float(self.kl_sum or 0.0), float(self.count or 0.0)])
        diff_max = max(world.gather([float(self.diff_max) if self.diff_max is not None else 0.0]))
        if count == 0:
            return {}
        return {"mismatch/logprob_diff_max": diff_max, "mismatch/kl": kl_sum / count}
