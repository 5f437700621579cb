"""Scalar heads on a language-model trunk: the PPO critic (one value per token) and the reward model
(one score per sequence).

The trunk is any module with ``hidden_states(idx) -> (B, T, C)`` (``doc_ids=`` for packed rows, ``pad_mask=``
for padded ones) and ``packing_problem()``: the built-in GPT and :class:`~posttrain.models.hf.HFPolicy`. The
critic starts as a copy of the policy's trunk, as in RLHF practice (InstructGPT, verl, OpenRLHF
initialise the critic from the policy or reward model), so it reads the same features the policy
learned; its LM head is dropped and a zero-initialised linear head gives V = 0 at the start. The
reward model starts the same way from the SFT policy (InstructGPT), and reads its score at each
sequence's last real token.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class ScalarHead(nn.Module):
    """A trunk and a zero-initialised linear head C → 1 (the output starts at 0)."""

    def __init__(self, trunk: nn.Module, n_embd: int):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(n_embd, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def scalar(self, h: torch.Tensor) -> torch.Tensor:
        """(..., C) hidden states → (...) fp32; the head runs in its own dtype (fp32 unless bf16-true), outside
        autocast, so values and scores are not rounded to bf16/fp16 under mixed precision."""
        with torch.autocast(h.device.type, enabled=False):
            return self.head(h.to(self.head.weight.dtype)).squeeze(-1).float()

    def enable_activation_checkpointing(self) -> None:
        self.trunk.enable_activation_checkpointing()

    def packing_problem(self) -> str | None:
        """The trunk's: why packed rows (``doc_ids``) would not compute what each example computes alone."""
        return self.trunk.packing_problem()


class ValueModel(ScalarHead):
    """V(s_t) for every position: ``model(idx)`` (B, T) → values (B, T), fp32.

    Position t's value is the expected return from the state whose next token is predicted at t, so
    values line up with the per-token log-probs and the loss mask of the same forward. ``doc_ids`` (B, T):
    packed rows, as the trunk's ``hidden_states`` takes them (each example attends only to itself).
    """

    @classmethod
    def from_policy(cls, policy: nn.Module) -> ValueModel:
        """A copy of ``policy``'s trunk (its LM head removed) with a fresh value head: every weight trainable, or
        for a LoRA policy (``critic_trunk``) the frozen base with an adapter of its own, as lean as the policy."""
        if hasattr(policy, "critic_trunk"):
            return cls(policy.critic_trunk(), policy.hidden_size)
        trunk = copy.deepcopy(policy).requires_grad_(True)
        trunk.lm_head = nn.Identity()  # unused by hidden_states; frees its weights
        return cls(trunk, policy.hidden_size)

    def forward(self, idx: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.scalar(self.trunk.hidden_states(idx, doc_ids=doc_ids))  # (B, T, C) -> (B, T)


class RewardModel(ScalarHead):
    """r(x, y): ``model(idx, pad_mask)`` (B, T) → one score per row (B,), fp32, read at the row's last
    real token (the last True of ``pad_mask``), so left and right padding give the same scores.

    The trunk keeps its LM head (unused) so that it saves and loads as an ordinary model checkpoint;
    the head is saved beside it (``reward_head.safetensors``).
    """

    @classmethod
    def from_policy(cls, policy: nn.Module) -> RewardModel:
        """A reward model on ``policy``'s trunk (the policy itself, trainable as it is: all weights, or its
        LoRA adapter; pass a copy to keep the policy)."""
        return cls(policy, policy.hidden_size)

    def forward(self, idx: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        pad_mask = pad_mask.bool()
        h = self.trunk.hidden_states(idx, pad_mask=pad_mask)  # (B, T, C)
        positions = torch.arange(idx.shape[1], device=idx.device).expand_as(pad_mask)  # (B, T)
        last = torch.where(pad_mask, positions, -1).max(dim=1).values  # (B,)
        if bool((last < 0).any()):
            raise ValueError("reward model: a row has no real token")
        picked = h[torch.arange(len(idx), device=idx.device), last]  # (B, C)
        return self.scalar(picked)  # (B,)
