"""Counter-based random numbers: one uniform for every (group seed, row, step), with no generator state.

Row j of a group with seed s draws decode step t from

    u = (⌊h₀ / 2⁵⌋ · 2²⁶ + ⌊h₁ / 2⁶⌋) / 2⁵³ ∈ [0, 1)      (53 random bits: a float64 mantissa)
    h_l = murmur3_32((s mod 2³², ⌊s / 2³²⌋ mod 2³², j, t), seed=l)      lanes l = 0, 1

where murmur3_32 is MurmurHash3_x86_32 (Appleby's SMHasher) of the 32-bit words as little-endian bytes.
A row's numbers depend on its key alone: not on the batch it shares, its place in it or the device. They
are plain int64 tensor ops vectorised over rows; every intermediate stays below 2⁴⁸, so nothing
overflows and ``>>`` never meets a negative number (it would shift in ones).

``group_seed(*parts)`` hashes a tuple of ints (run seed, step, prompt index, round, …) into a group seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

M32 = 0xFFFF_FFFF
C1, C2 = 0xCC9E_2D51, 0x1B87_3593  # MurmurHash3_x86_32's block constants
Word = int | Tensor  # an int in [0, 2³²), or an int64 tensor of them


def _mul32(x: Word, c: int) -> Word:
    """x · c mod 2³² for x, c in [0, 2³²): x · c = x · c_lo + 2¹⁶ · x · c_hi with 16-bit halves of c, so no
    product reaches 2⁴⁸."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def _rotl32(x: Word, r: int) -> Word:
    return ((x << r) & M32) | (x >> (32 - r))


def _absorb(h: Word, k: Word) -> Word:
    """MurmurHash3_x86_32's body on one block: state h takes in word k."""
    k = _mul32(_rotl32(_mul32(k, C1), 15), C2)
    h = _rotl32(h ^ k, 13)
    return (h * 5 + 0xE654_6B64) & M32


def _fmix32(h: Word) -> Word:
    """MurmurHash3's finaliser (a bijection of [0, 2³²) with full avalanche)."""
    h = _mul32(h ^ (h >> 16), 0x85EB_CA6B)
    h = _mul32(h ^ (h >> 13), 0xC2B2_AE35)
    return h ^ (h >> 16)


def murmur3_32(words: Sequence[Word], seed: int = 0) -> Word:
    """MurmurHash3_x86_32 of the 4·len(words) bytes of ``words`` (32-bit, little-endian) with ``seed``;
    ints give an int, tensors (broadcast together) a tensor."""
    h = seed
    for k in words:
        h = _absorb(h, k)
    return _fmix32(h ^ (4 * len(words)))


def _split(x: int) -> tuple[int, int]:
    """(x mod 2³², ⌊x / 2³²⌋ mod 2³²) of x mod 2⁶⁴: the two words of any int (negative ones too)."""
    x %= 1 << 64
    return x & M32, x >> 32


def group_seed(*parts: int) -> int:
    """A 64-bit seed for a group from the ints ``parts``; with w the words (p mod 2³², ⌊p / 2³²⌋ mod 2³²)
    of each part p (taken mod 2⁶⁴):

        group_seed = murmur3_32(w, seed=2) + 2³² · murmur3_32(w, seed=3)

    (lanes 2 and 3: apart from the sampling lanes 0 and 1). Order matters: (1, 2) and (2, 1) differ.
    """
    words = [w for p in parts for w in _split(p)]
    return murmur3_32(words, seed=2) | murmur3_32(words, seed=3) << 32



def group_seeds(prompts: int, seed: int | None, seeds: Sequence[int] | None) -> list[int]:
    """One group seed per prompt: ``seeds`` as given, or ``group_seed(seed, i)`` for prompt i (exactly one of
    the two; ValueError otherwise, or when ``seeds`` is not one per prompt)."""
    if (seed is None) == (seeds is None):
        raise ValueError("generate needs exactly one of seed and seeds")
    out = [group_seed(seed, i) for i in range(prompts)] if seeds is None else list(seeds)
    if len(out) != prompts:
        raise ValueError(f"generate needs one seed per prompt: {len(out)} seeds, {prompts} prompts")
    return out

def row_streams(seeds: Sequence[int], n: int, device: torch.device | str = "cpu") -> Tensor:
    """(len(seeds) · n, 2) int64: for row j of group g (row g · n + j) the MurmurHash3 state of lanes
    0 and 1 after the words (s mod 2³², ⌊s / 2³²⌋ mod 2³², j), s = seeds[g]: the part of each step's
    hash that does not depend on the step (see :func:`uniforms`)."""
    s = torch.tensor([_split(x) for x in seeds], dtype=torch.long, device=device).reshape(-1, 2)
    s = s.repeat_interleave(n, dim=0)  # (B, 2)
    j = torch.arange(n, device=device).repeat(len(seeds))  # (B,)
    h = torch.tensor([0, 1], device=device)  # (2,) the lanes' seeds
    for k in (s[:, :1], s[:, 1:], j[:, None]):
        h = _absorb(h, k)  # (B, 2)
    return h


def uniforms(streams: Tensor, step: int) -> Tensor:
    """(B,) float64 in [0, 1): decode step ``step``'s u of each row of ``streams`` (row_streams' rows,
    in any order or subset), u = (⌊h₀ / 2⁵⌋ · 2²⁶ + ⌊h₁ / 2⁶⌋) / 2⁵³ as in the module doc."""
    h = _fmix32(_absorb(streams, step) ^ 16)  # (B, 2): murmur3_32 of the 4 words (16 bytes), lanes 0, 1
    return ((h[:, 0] >> 5) * (1 << 26) + (h[:, 1] >> 6)).double() / (1 << 53)
