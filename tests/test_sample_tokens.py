"""Specs for ``sample_tokens`` (inverse-CDF sampling of the tempered, truncated distribution, and its
log-probs) and ``left_pad``."""

from __future__ import annotations

import pytest
import torch

from posttrain.engine import SamplingParams, left_pad, sample_tokens
from posttrain.random_streams import group_seed, row_streams, uniforms

# --- sample_tokens and left_pad ------------------------------------------------------------------


def _logits(seed=0, rows=4, vocab=50):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 2


def _u(rows, seed=0):
    """(rows,) float64 uniforms in [0, 1) for sample_tokens."""
    return torch.rand(rows, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _truncated(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(B, V) the distribution sample_tokens must draw from, token by token best first (float64):
    p = softmax(logits / T); keep the top_k best; of those keep each while the renormalised mass before
    it is below top_p; q = p on the kept tokens, renormalised."""
    p = torch.softmax(logits.double() / params.temperature, -1)
    q = torch.zeros_like(p)
    for b in range(len(p)):
        kept = p[b].argsort(descending=True).tolist()[: params.top_k]  # [:None] keeps all
        if params.top_p is not None:
            mass_k, before, nucleus = sum(p[b, v] for v in kept), 0.0, []
            for v in kept:
                if before >= params.top_p:
                    break
                nucleus.append(v)
                before += p[b, v] / mass_k
            kept = nucleus
        total = sum(p[b, v] for v in kept)
        for v in kept:
            q[b, v] = p[b, v] / total
    return q


TRUNCATED = [
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=0.5, top_k=None, top_p=0.9),
    SamplingParams(temperature=1.0, top_k=10, top_p=0.8),
]


def test_small_top_p_keeps_only_the_argmax():
    logits = _logits().repeat(50, 1)  # 50 draws of each row
    params = SamplingParams(temperature=1.0, top_k=None, top_p=1e-6)
    tokens, logp = sample_tokens(logits, params, _u(len(logits)))
    assert torch.equal(tokens, logits.argmax(-1))
    torch.testing.assert_close(logp, torch.zeros(len(logits)), atol=1e-6, rtol=0)  # a point mass


def test_top_k_restricts_samples_to_the_k_best():
    logits = _logits(vocab=30).repeat(50, 1)  # 50 draws of each row
    best3 = logits.topk(3, -1).indices
    params = SamplingParams(temperature=2.0, top_k=3)
    tokens, _ = sample_tokens(logits, params, _u(len(logits)))
    assert (best3 == tokens[:, None]).any(-1).all()
    assert len(set(tokens[0::4].tolist())) > 1  # but not only the best one


def test_top_p_keeps_the_smallest_set_with_that_mass():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5, 0.3 | 0.15, 0.05 (0.8 ≥ 0.7 after two)
    logits = probs.log().repeat(200, 1)
    params = SamplingParams(temperature=1.0, top_k=None, top_p=0.7)
    tokens, logp = sample_tokens(logits, params, _u(len(logits)))
    assert set(tokens.tolist()) == {1, 3}
    torch.testing.assert_close(logp, torch.where(tokens == 1, 0.5 / 0.8, 0.3 / 0.8).log())


def test_untruncated_logprob_is_log_softmax_of_scaled_logits():
    logits = _logits(seed=1)
    params = SamplingParams(temperature=0.7, top_k=None)
    tokens, logp = sample_tokens(logits, params, _u(len(logits)))
    expected = torch.log_softmax(logits / params.temperature, -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(logp, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("params", TRUNCATED)
def test_truncated_logprob_is_the_log_of_the_renormalised_probability(params):
    logits = _logits(seed=1)
    tokens, logp = sample_tokens(logits, params, _u(len(logits)))
    expected = _truncated(logits, params).gather(-1, tokens[:, None]).squeeze(-1).log()
    torch.testing.assert_close(logp.double(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.8, top_k=None), *TRUNCATED])
def test_inverse_cdf_gives_each_candidate_its_share_of_u(params):
    """N evenly spaced u = (i + ½) / N: each token is drawn N · q(token) times, up to rounding."""
    n = 10_000
    logits = _logits(seed=4, rows=1, vocab=20)
    tokens, _ = sample_tokens(logits.repeat(n, 1), params, (torch.arange(n, dtype=torch.float64) + 0.5) / n)
    counts = torch.bincount(tokens, minlength=20).double()  # (V,)
    assert (counts - n * _truncated(logits, params)[0]).abs().max() <= 1.001


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.8, top_k=None), *TRUNCATED])
def test_draws_from_the_random_streams_follow_the_truncated_distribution(params):
    """20 000 rows of one group at step 0: never a token outside the candidates, and Pearson's χ² over
    the candidates below its 99.9% quantile (at most 19 degrees of freedom: 43.8)."""
    n = 20_000
    logits = _logits(seed=5, rows=1, vocab=20)
    u = uniforms(row_streams([group_seed(5)], n), step=0)
    tokens, _ = sample_tokens(logits.repeat(n, 1), params, u)
    counts = torch.bincount(tokens, minlength=20).double()  # (V,)
    expected = n * _truncated(logits, params)[0]  # (V,)
    assert (counts[expected == 0] == 0).all()
    kept = expected > 0
    assert ((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum() < 43.8


def test_greedy_sample_is_argmax_with_log_prob_zero():
    logits = _logits(seed=2)
    tokens, logp = sample_tokens(logits, SamplingParams(temperature=0.0), _u(len(logits)))
    assert torch.equal(tokens, logits.argmax(-1))
    assert logp.tolist() == [0.0] * len(logits)


def test_sample_tokens_is_a_function_of_u():
    logits = _logits(seed=3, vocab=1000)
    params = SamplingParams(temperature=1.0, top_k=None)
    a, _ = sample_tokens(logits, params, _u(len(logits), seed=11))
    b, _ = sample_tokens(logits, params, _u(len(logits), seed=11))
    c, _ = sample_tokens(logits, params, _u(len(logits), seed=12))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_left_pad_exact_layout():
    ids, real = left_pad([[5, 6], [7, 8, 9, 10], [11]], pad_id=0)
    assert ids.tolist() == [[0, 0, 5, 6], [7, 8, 9, 10], [0, 0, 0, 11]]
    assert real.tolist() == [
        [False, False, True, True],
        [True, True, True, True],
        [False, False, False, True],
    ]


def test_zero_top_p_keeps_the_argmax_or_is_rejected():
    logits = _logits()
    try:
        tokens, _ = sample_tokens(logits, SamplingParams(top_k=None, top_p=0.0), _u(len(logits)))
    except ValueError as err:
        assert "top_p" in str(err)
    else:
        assert torch.equal(tokens, logits.argmax(-1))
