"""Padding-free micro-batches for the RL scoring passes and update.

Rollout rows differ a lot in length. :class:`~posttrain.trainers.model_engine.ModelEngine` cuts the rows it
runs into micro-batches by a token budget (:func:`group_by_tokens`), and runs each micro-batch's rows packed:
:class:`Packing` lays the micro-batch's r rows (r, w) out as n ≤ r sequences (n, S) by first-fit decreasing
into bins no longer than the micro-batch's longest row, each row a contiguous run of its own ``doc_id``,
attending only to itself with positions counted from its own first token. Bins as long as the longest
row, rather than one sequence of all Σw tokens, because attention costs the square of a sequence's
length: the n bins cost n·max(w)² (the padded rows: r·max(w)²; one sequence of every row: (Σw)²), and
the rest of the model n·max(w) tokens instead of r·max(w).

:class:`PackedModule` is the module seen through a packing: an objective calls it on the micro-batch's
(r, w) rows as it calls the module itself (``logprobs(idx, targets, …)`` for the policy, ``module(idx)``
for the critic); it runs the module on the packed (n, S) sequences with ``doc_ids`` and scatters the
per-token outputs back to (r, w), 0 off the rows' real tokens. So the losses read exactly the tensors
they read from padded rows, and loss and gradient are those of the padded micro-batch.

A module packs when it says so: its ``packing_problem()`` returns None (:func:`packing_problem`). Any
other module, e.g. an HF model whose attention implementation cannot keep packed rows apart, runs its
micro-batches padded (each cut to its widest row), which is exact, only slower.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.sft_data import first_fit


def packing_problem(module) -> str | None:
    """Why ``module`` cannot run packed rows, or None when it can: its own ``packing_problem()`` (the
    built-in GPT: never; HF models: see ``HFPolicy.packing_problem``; heads and the LoRA reference ask
    the model under them). A module without that method is not assumed to keep packed rows apart."""
    ask = getattr(module, "packing_problem", None)
    if ask is None:
        return f"{type(module).__name__} does not say it keeps packed rows apart (it has no packing_problem())"
    return ask()


def group_by_tokens(widths: list[int], budget: int, padded: bool = False) -> list[list[int]]:
    """Consecutive groups of the row indices 0..len(widths)−1, in order, each as large as the token
    ``budget`` allows: a group's tokens are Σ widths when its rows run packed, rows × its widest row when
    they run padded (``padded``). A row whose tokens alone exceed the budget is a group of its own.

    ``group_by_tokens([5, 3, 9, 2], 10)`` → ``[[0, 1], [2], [3]]``;
    ``group_by_tokens([2, 5, 1, 1], 10, padded=True)`` → ``[[0, 1], [2, 3]]``."""
    groups: list[list[int]] = []
    total = widest = 0
    for i, w in enumerate(widths):
        total_i, widest_i = total + w, max(widest, w)
        tokens = (len(groups[-1]) + 1) * widest_i if padded and groups else total_i
        if groups and tokens <= budget:
            groups[-1].append(i)
            total, widest = total_i, widest_i
        else:
            groups.append([i])
            total = widest = w
    return groups


@dataclass
class Packing:
    """The r rows (r, w) of a micro-batch as n packed sequences (n, S): position t of row b (t < widths[b])
    is flat position ``src`` = b·w + t of the rows and ``dst`` = k·S + offset_b + t of the sequences, where
    row b sits in bin k after the rows before it in that bin. ``doc_ids`` (n, S) hold each position's row
    index (−1 on the padding at the end of a bin that is not full)."""

    doc_ids: Tensor  # (n, S) long
    src: Tensor  # (N,) long, N = Σ widths
    dst: Tensor  # (N,) long
    rows: int  # r
    width: int  # w, the rows' (cut) width

    @classmethod
    def of(cls, widths: list[int], width: int, device: torch.device) -> Packing:
        """First-fit decreasing of ``widths`` (:func:`posttrain.sft_data.first_fit`) into bins of the longest
        row's length; ``width`` is the (r, w) layout's w (≥ every row's width)."""
        seq = max(max(widths), 1)  # S: the first bin holds the longest row
        bins = first_fit(widths, seq)
        src, dst, doc = [], [], []  # (N,) each: a token's flat position in the rows, in the sequences, its row
        for k, members in enumerate(bins):
            offset = k * seq
            for b in members:
                src += range(b * width, b * width + widths[b])
                dst += range(offset, offset + widths[b])
                doc += [b] * widths[b]
                offset += widths[b]
        src, dst = torch.tensor(src, dtype=torch.long), torch.tensor(dst, dtype=torch.long)
        doc_ids = torch.full((len(bins) * seq,), -1, dtype=torch.long)
        doc_ids[dst] = torch.tensor(doc, dtype=torch.long)
        doc_ids = doc_ids.view(len(bins), seq)
        return cls(doc_ids.to(device), src.to(device), dst.to(device), len(widths), width)

    @property
    def shape(self) -> tuple[int, int]:
        """(n, S) of the packed sequences."""
        return tuple(self.doc_ids.shape)

    def pack(self, x: Tensor, fill: float | int) -> Tensor:
        """Rows (r, w) → packed sequences (n, S), ``fill`` where no row's token is."""
        n, seq = self.shape
        tokens = x.reshape(-1).index_select(0, self.src)  # (N,)
        return x.new_full((n * seq,), fill).index_copy(0, self.dst, tokens).view(n, seq)

    def unpack(self, y: Tensor) -> Tensor:
        """Packed sequences (n, S) → rows (r, w), 0 past each row's width (differentiable)."""
        rows = y.new_zeros(self.rows * self.width)
        return rows.index_copy(0, self.src, y.reshape(-1).index_select(0, self.dst)).view(self.rows, self.width)


class PackedModule:
    """``module`` called on rows (r, w) but run on their :class:`Packing` (see the module docstring)."""

    def __init__(self, module, packing: Packing):
        self.module, self.packing = module, packing

    def logprobs(self, idx: Tensor, targets: Tensor, temperature: float = 1.0,
                 entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        """The module's (log-probs, entropy or None) of the rows, each (r, w) fp32."""
        p = self.packing
        logp, ent = self.module.logprobs(p.pack(idx, 0), p.pack(targets, -1), temperature=temperature,
                                         entropy=entropy, doc_ids=p.doc_ids)  # (n, S)
        return p.unpack(logp), None if ent is None else p.unpack(ent)

    def __call__(self, idx: Tensor) -> Tensor:
        """The module's per-token output of the rows (the critic's values), (r, w)."""
        return self.packing.unpack(self.module(self.packing.pack(idx, 0), doc_ids=self.packing.doc_ids))
