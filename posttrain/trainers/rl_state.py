"""The RL trainer's resumable state besides weights, optimizers and RNGs: what the next step depends on."""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.trainers.run import TrainerState


@dataclass
class RLState(TrainerState):
    """Saved in every RL checkpoint (``trainer_state.json``'s ``extra``) and restored on resume or rollback."""

    kl_coef: float = 0.0  # β of the KL term now (the adaptive controller moves it)
    before: dict = field(default_factory=dict)  # the initial policy's evaluation
    prompt_sampling: dict = field(default_factory=dict)  # the prompt sampler's state (running success, ...)
    policy_steps: dict = field(default_factory=dict)  # policy version (str) -> training steps that had changed the
    # weights when it first generated (the unit of rollout staleness: posttrain/trainers/rl_rollouts.py)
