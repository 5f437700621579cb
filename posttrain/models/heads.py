"""Scalar heads on a language-model trunk: the PPO critic (one value per token).

The trunk is any module with ``hidden_states(idx) -> (B, T, C)`` (the built-in GPT has it). The
critic starts as a copy of the policy's trunk, as in RLHF practice (InstructGPT, verl, OpenRLHF
initialise the critic from the policy or reward model), so it reads the same features the policy
learned; its LM head is dropped and a zero-initialised linear head gives V = 0 at the start.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class ValueModel(nn.Module):
    """V(s_t) for every position: ``model(idx)`` (B, T) → values (B, T), fp32.

    Position t's value is the expected return from the state whose next token is predicted at t, so
    values line up with the per-token log-probs and the loss mask of the same forward.
    """

    def __init__(self, trunk: nn.Module, n_embd: int):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(n_embd, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_policy(cls, policy: nn.Module) -> ValueModel:
        """A trainable copy of ``policy``'s trunk (its LM head removed) with a fresh value head."""
        trunk = copy.deepcopy(policy).requires_grad_(True)
        trunk.lm_head = nn.Identity()  # unused by hidden_states; frees its weights
        return cls(trunk, policy.hidden_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.trunk.hidden_states(idx)  # (B, T, C)
        return self.head(h).squeeze(-1).float()  # (B, T)
