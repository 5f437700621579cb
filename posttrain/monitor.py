"""Run health: checks on every step's numbers, each with a bound from config and an action.

Actions, weakest first: ``warn`` (log the event, go on), ``skip_step`` (the update is not applied),
``rollback`` (restore the last good checkpoint and lower the learning rate), ``stop`` (end the run).
"""

from __future__ import annotations

from dataclasses import dataclass

ACTIONS = ("warn", "skip_step", "rollback", "stop")


@dataclass
class MonitorConfig:
    """Health checks (bounds and actions). Relative checks compare with a running median of past steps."""

    enabled: bool = True  # run the checks at all
    window: int = 20  # past values in each running median
    min_history: int = 5  # past values a relative ('rising/falling fast', 'spike') check needs before it fires
    kl_max: float = 1.0  # mean per-token KL to the reference above this fires 'kl'
    kl_rise: float = 5.0  # ... as does KL above this × its running median (and above kl_rise_floor)
    kl_rise_floor: float = 0.05  # KL below this never counts as rising fast (noise around 0)
    kl_action: str = "warn"  # action of 'kl'
    grad_spike: float = 10.0  # grad norm (before clipping) above this × its running median fires 'grad_norm'
    grad_action: str = "skip_step"  # action of 'grad_norm'
    nonfinite_action: str = "skip_step"  # a NaN/inf loss or gradient ('nonfinite'): never applied; then this
    entropy_min: float = 0.0  # mean token entropy below this fires 'entropy' (0: off)
    entropy_drop: float = 0.5  # ... as does entropy below this × its running median (0: off)
    entropy_action: str = "warn"  # action of 'entropy'
    length_rise: float = 3.0  # mean completion length above this × its running median fires 'length' (0: off)
    clipped_ratio_max: float = 0.5  # share of completions cut at max_new_tokens above this fires 'length'
    length_action: str = "warn"  # action of 'length'
    zero_std_max: float = 0.95  # frac_reward_zero_std at or above this (no learning signal) fires 'zero_std'
    zero_std_action: str = "warn"  # action of 'zero_std'
    rollback_lr_factor: float = 0.5  # a rollback multiplies the learning rate by this
    max_rollbacks: int = 3  # a rollback beyond this many becomes 'stop'
