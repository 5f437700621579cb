"""Per-token log-probs and entropy read from the last hidden states, never the full (B, T, V) logits.

At each position with a target (``targets >= 0``: the completion tokens), with temperature τ:

    z = head(h) / τ                                  the logits the sampler drew from, (V,)
    logp = log softmax(z)[target] = z[target] − logsumexp(z)
    H    = −Σ_v p_v log p_v,   p = softmax(z)

Positions whose target is −1 get 0 in both. Only the selected positions reach the head, ``chunk_tokens``
at a time, so at most (chunk_tokens, V) logits exist at once, in forward and in backward:

* the softmax statistics of a chunk are one autograd Function (:class:`_SoftmaxStats`) with the
  gradient written out, ∂logp/∂z = onehot(target) − p and ∂H/∂z = −p ⊙ (log p + H): its backward
  needs two (chunk, V) buffers where the composed log_softmax → exp → mul graph keeps about six;
* when grad is enabled, each chunk (head + statistics) runs under non-reentrant
  ``torch.utils.checkpoint``: the graph keeps only the chunk's hidden rows (chunk, C) and backward
  recomputes the chunk's logits. Checkpointing rather than a Function around the head too, because the
  head is any callable (a Linear, a LoRA-wrapped Linear, a softcapped head) that autograd must trace;
  the price is one more head matmul per chunk (4 instead of 3), paid on completion positions only.
  With grad off the chunks run plainly: no checkpoint overhead.

The softmax math is fp32 whatever dtype the head returns (bf16 logits are upcast per chunk); the
gradient goes back to the head in its own dtype. The head's logits are assumed finite (no −inf).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


class _SoftmaxStats(torch.autograd.Function):
    """(logits (N, V), targets (N,) ≥ 0, τ, entropy) → (N, 1) log p(target), or (N, 2) with H beside it.

    Saves only the logits (and the (N,) logsumexp); backward recomputes p from them."""

    @staticmethod
    def forward(ctx, logits, targets, temperature: float, entropy: bool):
        logp = logits.float() / temperature  # (N, V), a new fp32 buffer that becomes log p in place
        lse = torch.logsumexp(logp, dim=-1, keepdim=True)  # (N, 1)
        logp.sub_(lse)
        picked = logp.gather(1, targets[:, None])  # (N, 1)
        if entropy:
            p = logp.exp()  # (N, V)
            stats = torch.cat([picked, -p.mul_(logp).sum(-1, keepdim=True)], dim=1)  # (N, 2)
        else:
            stats = picked
        ctx.save_for_backward(logits, targets, lse, stats)
        ctx.temperature = temperature
        return stats

    @staticmethod
    def backward(ctx, grad):  # grad: (N, 1 or 2)
        logits, targets, lse, stats = ctx.saved_tensors
        logp = (logits.float() / ctx.temperature).sub_(lse)  # (N, V) log p
        p = logp.exp()  # (N, V)
        g_logp = grad[:, :1]  # (N, 1)
        if stats.shape[1] == 2:  # ∂L/∂z = g_logp·(onehot − p) − g_H·p·(log p + H), in the log p buffer
            dz = logp.add_(stats[:, 1:]).mul_(grad[:, 1:]).add_(g_logp).mul_(p).neg_()
        else:  # ∂L/∂z = g_logp·(onehot − p)
            dz = p.mul_(-g_logp)
        dz.scatter_add_(1, targets[:, None], g_logp)
        return dz.div_(ctx.temperature).to(logits.dtype), None, None, None


def _chunk_stats(head: Callable, h: torch.Tensor, targets: torch.Tensor, temperature: float,
                 entropy: bool) -> torch.Tensor:
    """Hidden rows (n, C) → statistics (n, 1 or 2), through the head's (n, V) logits."""
    return _SoftmaxStats.apply(head(h), targets, temperature, entropy)


def token_logprobs_from_hidden(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                               targets: torch.Tensor, temperature: float = 1.0, entropy: bool = False,
                               chunk_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(head(h)/τ)[target] (B, T) fp32 and, with ``entropy``, H(softmax(head(h)/τ)) (B, T) fp32
    (else None), from ``hidden`` (B, T, C) and ``targets`` (B, T); target −1 → 0 in both. The head sees
    only positions with a target, at most ``chunk_tokens`` rows per call (see the module docstring)."""
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    B, T, C = hidden.shape
    flat_targets = targets.reshape(B * T)
    rows = (flat_targets >= 0).nonzero().squeeze(1)  # (N,) positions with a target
    h = hidden.reshape(B * T, C).index_select(0, rows)  # (N, C)
    picked = flat_targets.index_select(0, rows)  # (N,)
    record = torch.is_grad_enabled()
    parts = []
    for h_chunk, t_chunk in zip(h.split(chunk_tokens), picked.split(chunk_tokens), strict=True):
        if record:  # the graph keeps h_chunk only; backward recomputes the chunk's logits
            parts.append(checkpoint(_chunk_stats, head, h_chunk, t_chunk, temperature, entropy, use_reentrant=False))
        else:
            parts.append(_chunk_stats(head, h_chunk, t_chunk, temperature, entropy))
    stats = torch.cat(parts)  # (N, 1 or 2)
    out = stats.new_zeros(B * T, stats.shape[1]).index_copy(0, rows, stats).view(B, T, -1)  # (B, T, 1 or 2)
    return out[..., 0], out[..., 1] if entropy else None
