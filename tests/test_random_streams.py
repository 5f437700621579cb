"""Specs for the counter-based random streams: MurmurHash3 exact values, group seeds, the uniforms'
formula and their statistical quality."""

from __future__ import annotations

import random

import pytest
import torch

from posttrain.random_streams import group_seed, murmur3_32, row_streams, uniforms

# MurmurHash3_x86_32 of the words' little-endian bytes: SMHasher's published vectors, then values of
# the reference implementation (the mmh3 package) for longer inputs
MURMUR3 = [
    ([], 0, 0x00000000),
    ([], 1, 0x514E28B7),
    ([], 0xFFFFFFFF, 0x81F16F39),
    ([0x00000000], 0, 0x2362F9DE),
    ([0xFFFFFFFF], 0, 0x76293B50),
    ([0x87654321], 0, 0xF55B516B),
    ([0x87654321], 0x5082EDEE, 0x2362F9DE),
    ([0x61616161], 0x9747B28C, 0x5A97808A),  # "aaaa"
    ([1, 2, 3, 4], 0, 0x4445AD00),
    ([1, 2, 3, 4], 1, 0x24431F67),
    ([0xDEADBEEF, 7], 42, 0x1311E222),
]


@pytest.mark.parametrize(("words", "seed", "expected"), MURMUR3)
def test_murmur3_32_exact_values(words, seed, expected):
    assert murmur3_32(words, seed) == expected


def test_murmur3_32_on_tensors_equals_it_on_ints():
    r = random.Random(0)
    words = [[r.getrandbits(32) for _ in range(3)] for _ in range(500)] + [[0xFFFFFFFF] * 3, [0] * 3]
    got = murmur3_32(list(torch.tensor(words).T), seed=0xFFFFFFFF)  # (502,), three word columns
    assert got.tolist() == [murmur3_32(w, seed=0xFFFFFFFF) for w in words]


def test_group_seed_exact_values():
    assert group_seed(0) == 12884258122361448654
    assert group_seed(1) == 12541638430054868941
    assert group_seed(-1) == 15945639115356666318  # -1 is the words (2³² − 1, 2³² − 1)
    assert group_seed(7, 3, 1, 0) == 11606874440669989501
    assert group_seed(2**40 + 5, 9) == 17891116317644218761
    assert group_seed(1, 2) == 18217036623117100188 != group_seed(2, 1) == 4275066907591773882
    assert group_seed(-1) == group_seed(2**64 - 1)  # parts are taken mod 2⁶⁴


def test_uniforms_exact_values():
    """u = (⌊h₀ / 2⁵⌋ · 2²⁶ + ⌊h₁ / 2⁶⌋) / 2⁵³, h_l = murmur3_32((s lo, s hi, j, t), seed=l): for the group
    seed s = group_seed(0), row 0 at step 0 and row 3 at step 5 (h from the mmh3 package)."""
    streams = row_streams([group_seed(0)], 4)
    h0, h1 = 0x147E3BC8, 0x45F74C39
    assert uniforms(streams, 0)[0].item() == ((h0 >> 5) * 2**26 + (h1 >> 6)) / 2**53 == 0.08005117083567903
    h0, h1 = 0xBD9A64E8, 0xAB51B648
    assert uniforms(streams, 5)[3].item() == ((h0 >> 5) * 2**26 + (h1 >> 6)) / 2**53 == 0.7406371211202113


def test_a_rows_stream_depends_on_its_key_alone():
    """Row j of the group with seed s draws the same numbers in any batch, order or subset of rows."""
    both = row_streams([5, group_seed(3)], 4)  # (8, 2)
    alone = row_streams([group_seed(3)], 4)  # (4, 2)
    perm = torch.tensor([3, 0, 2])
    for step in (0, 1, 63):
        assert torch.equal(uniforms(both, step)[4:], uniforms(alone, step))
        assert torch.equal(uniforms(alone[perm], step), uniforms(alone, step)[perm])
    assert not torch.equal(uniforms(both, 0)[:4], uniforms(alone, 0))


@pytest.fixture(scope="module")
def draws() -> torch.Tensor:
    """(groups 64, rows 32, steps 100) uniforms; group g has seed group_seed(0, g) (consecutive keys)."""
    streams = row_streams([group_seed(0, g) for g in range(64)], 32)  # (2048, 2)
    return torch.stack([uniforms(streams, t) for t in range(100)], -1).reshape(64, 32, 100)


def _chi2(cells: torch.Tensor, bins: int) -> float:
    """Pearson's χ² of integer cell indices in [0, bins) against the uniform distribution."""
    counts = torch.bincount(cells.flatten(), minlength=bins).double()
    expected = cells.numel() / bins
    return float(((counts - expected) ** 2 / expected).sum())


CHI2_255 = 331.0  # 99.9% quantile of χ² with 255 degrees of freedom


def test_uniforms_are_uniform_on_0_1(draws):
    u = draws.flatten()  # 204 800 draws
    assert u.dtype == torch.float64 and 0 <= u.min() and u.max() < 1
    assert _chi2((u * 256).long(), 256) < CHI2_255
    ks = (torch.arange(1, len(u) + 1, dtype=torch.float64) / len(u) - u.sort().values).abs().max()
    assert ks < 1.95 / len(u) ** 0.5  # Kolmogorov–Smirnov at the 0.1% level


def test_every_one_of_the_53_bits_is_balanced(draws):
    k = (draws.flatten() * 2**53).long()  # the 53-bit integers, exactly
    bits = (k[:, None] >> torch.arange(53)) & 1  # (N, 53)
    assert ((bits.double().mean(0) - 0.5).abs() < 5 * 0.5 / len(k) ** 0.5).all()


@pytest.mark.parametrize("pair", ["steps", "rows", "groups"])
def test_neighbouring_draws_are_independent(draws, pair):
    """(u, u') of consecutive steps of a row, rows of a group, or groups with consecutive seeds fall
    uniformly on a 16 × 16 grid."""
    dim = {"groups": 0, "rows": 1, "steps": 2}[pair]
    a, b = draws.narrow(dim, 0, draws.shape[dim] - 1), draws.narrow(dim, 1, draws.shape[dim] - 1)
    assert _chi2((a * 16).long() * 16 + (b * 16).long(), 256) < CHI2_255
