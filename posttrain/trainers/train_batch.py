"""A rollout laid out as training tensors: prompt + completion of every row, right-padded, aligned for a
forward pass, plus the per-token inputs of the losses (old / reference / behaviour log-probs, advantages,
values, returns) as they become known during an RL step.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from posttrain.engine import RolloutBatch


@dataclass
class TrainBatch:
    """``inputs[b, t]`` predicts ``targets[b, t]``; ``mask`` is 1 on sampled completion tokens (forced tool
    outputs and padding stay 0), so every per-token tensor shares the (B, L) layout of ``mask``."""

    inputs: Tensor  # (B, L) long
    targets: Tensor  # (B, L) long, −1 outside completions
    mask: Tensor  # (B, L) float
    widths: Tensor  # (B,) positions that hold real tokens
    behaviour: Tensor | None = None  # (B, L) log-probs the sampler gave its tokens (0 off the mask)
    old_logp: Tensor | None = None  # (B, L) the trainer's log-probs before this step's updates (None: on-policy)
    ref_logp: Tensor | None = None  # (B, L) the reference policy's log-probs (KL in the loss)
    advantages: Tensor | None = None  # (B, L)
    values: Tensor | None = None  # (B, L) the critic's values before this step's updates
    returns: Tensor | None = None  # (B, L) the critic's targets
    is_weight: Tensor | None = None  # (B, L) the sampler/trainer correction's weight of each token's loss

    @property
    def width(self) -> int:
        return self.inputs.shape[1]

    def take(self, rows: Tensor, width: int | None = None) -> TrainBatch:
        """The sub-batch of ``rows``, cut to their widest real length ``width`` (less padding to run; None:
        read from ``widths``, a host synchronisation when they are on a device)."""
        w = int(self.widths[rows].max()) if width is None else width
        cut = {f.name: getattr(self, f.name) for f in fields(self)}
        cut = {k: (v[rows] if k == "widths" else v[rows, :w]) if v is not None else None for k, v in cut.items()}
        return TrainBatch(**cut)

    def to(self, device: torch.device) -> TrainBatch:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if getattr(self, f.name) is not None})


def layout(batch: RolloutBatch, pad_id: int) -> TrainBatch:
    """The rollout as (B, L) training tensors on the CPU, behaviour log-probs included (see :class:`TrainBatch`)."""
    full = [batch.prompt_ids[r] + batch.completion_tokens(r) for r in range(len(batch.prompt_ids))]
    width = max(len(s) for s in full)
    ids = torch.full((len(full), width), pad_id, dtype=torch.long)  # (B, L+1)
    targets = torch.full((len(full), width - 1), -1, dtype=torch.long)  # (B, L)
    mask = torch.zeros(len(full), width - 1)  # (B, L)
    behaviour = torch.zeros(len(full), width - 1)  # (B, L)
    completion_ids, sampled, logprobs = batch.completion_ids.cpu(), batch.mask.cpu(), batch.logprobs.cpu()
    for r, seq in enumerate(full):
        start, n = len(batch.prompt_ids[r]), int(batch.lengths[r])
        ids[r, : len(seq)] = torch.tensor(seq)
        targets[r, start - 1 : start - 1 + n] = completion_ids[r, :n]
        mask[r, start - 1 : start - 1 + n] = sampled[r, :n]
        behaviour[r, start - 1 : start - 1 + n] = logprobs[r, :n].float()
    widths = torch.tensor([len(s) - 1 for s in full])
    return TrainBatch(ids[:, :-1], targets, mask, widths, behaviour=behaviour * mask)


def last_token(mask: Tensor) -> Tensor:
    """One-hot (B, L) of each row's last valid token (all zero for an all-masked row)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # (B, L)
    last = torch.where(mask > 0, positions, -1).max(dim=1).values  # (B,)
    return (positions == last[:, None]).to(mask.dtype) * (last[:, None] >= 0)
