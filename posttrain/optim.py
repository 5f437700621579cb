"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch

from posttrain.config import OptimConfig


def make_optimizer(model: torch.nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW; weight decay applies to 2-D weights except embeddings (the usual GPT split)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "wte" not in name else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), fused=False)


def lr_at(step: int, total: int, config: OptimConfig) -> float:
    """Learning rate for 0-based ``step`` of ``total``: linear warm-up, then the schedule.

    cosine: lr_min + (lr − lr_min)·½(1 + cos(π·p)); linear: lr − (lr − lr_min)·p; constant: lr;
    p = progress through the post-warm-up steps, lr_min = min_lr_ratio·lr.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    p = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    lo = config.min_lr_ratio * config.lr
    if config.schedule == "cosine":
        return lo + (config.lr - lo) * 0.5 * (1 + math.cos(math.pi * p))
    if config.schedule == "linear":
        return config.lr - (config.lr - lo) * p
    if config.schedule == "constant":
        return config.lr
    raise ValueError(f"unknown schedule '{config.schedule}' (valid: cosine, linear, constant)")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad(model: torch.nn.Module, max_norm: float, norm: torch.Tensor | None = None) -> float:
    """Clip the global grad norm (when ``max_norm`` > 0) and return the norm before clipping; ``norm``: that
    norm when the caller computed it (FSDP2's sharded gradients: posttrain/fsdp.py)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if norm is not None:
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return float(norm)
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
