"""Rule rewards and reward shaping: functions of a completion (its text, its length) that give each
sequence a scalar, added to or composed with the task's reward.

Conventions: B = sequences; every function returns a (B,) float tensor and carries no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025), completion lengths (B,) -> penalty (B,).

    With L = completion length, L_max = max_len, L_cache = buffer, f = factor:
        0                                      if L ≤ L_max − L_cache
        ((L_max − L_cache) − L) / L_cache · f  if L_max − L_cache < L ≤ L_max
        −f                                     if L > L_max
    i.e. a linear ramp from 0 down to −factor over the last `buffer` tokens before max_len. It is added
    to the task reward. `factor` is the ramp's depth (verl's penalty_factor); the paper has factor = 1.
    A completion cut off by the generation limit has L = max_len and already gets −factor.
    """
    if not 1 <= buffer <= max_len:
        raise ValueError(f"overlong buffer must be in 1..max_len={max_len}, got {buffer}")
    length = lengths if lengths.is_floating_point() else lengths.to(torch.get_default_dtype())  # (B,)
    start = max_len - buffer  # last length without penalty
    ramp = (start - length) / buffer * factor  # (B,)
    penalty = torch.where(length > max_len, torch.full_like(length, -factor), ramp)  # (B,)
    return torch.where(length <= start, torch.zeros_like(length), penalty)  # (B,)
