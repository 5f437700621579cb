"""Specs for the built-in GPT: KV-cache decoding equals full recompute, left padding, log-probs, GQA."""

from __future__ import annotations

import pytest
import torch

from posttrain.engine import left_pad
from posttrain.models.gpt import GPTConfig, KVCache, token_logprobs

ATOL = 1e-4


def _random_ids(vocab: int, shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g)


@torch.no_grad()
def test_cache_decoding_matches_full_recompute(gpt):
    seq = _random_ids(gpt.config.vocab_size, (2, 14))
    prefill = 5
    cache = gpt.new_cache(2, seq.shape[1])
    logits = gpt(seq[:, :prefill], cache=cache)
    torch.testing.assert_close(logits, gpt(seq[:, :prefill]), atol=ATOL, rtol=0)
    assert cache.length == prefill
    for t in range(prefill, seq.shape[1]):
        step = gpt(seq[:, t : t + 1], cache=cache)  # (B, 1, V): logits of the new position only
        assert step.shape == (2, 1, gpt.config.vocab_size)
        torch.testing.assert_close(step[:, -1], gpt(seq[:, : t + 1])[:, -1], atol=ATOL, rtol=0)
    assert cache.length == seq.shape[1]


@torch.no_grad()
def test_cache_multi_token_append_matches_full_recompute(gpt):
    """Appending several tokens at once after a prefill is also exact (causal inside the chunk)."""
    seq = _random_ids(gpt.config.vocab_size, (1, 12))
    cache = gpt.new_cache(1, 12)
    gpt(seq[:, :4], cache=cache)
    chunk = gpt(seq[:, 4:12], cache=cache)
    torch.testing.assert_close(chunk, gpt(seq)[:, 4:12], atol=ATOL, rtol=0)


@torch.no_grad()
def test_left_padded_rows_decode_as_if_alone(gpt, tok):
    vocab = gpt.config.vocab_size
    prompts = [_random_ids(vocab, (3,), seed=2).tolist(), _random_ids(vocab, (8,), seed=3).tolist()]
    continuations = _random_ids(vocab, (2, 6), seed=4)
    ids, real = left_pad(prompts, tok.pad_id)
    assert real.tolist()[0] == [False] * 5 + [True] * 3
    cache = gpt.new_cache(2, ids.shape[1] + continuations.shape[1])
    last = gpt(ids, cache=cache, pad_mask=real)[:, -1]
    for row, prompt in enumerate(prompts):
        alone = gpt(torch.tensor([prompt]))[0, -1]
        torch.testing.assert_close(last[row], alone, atol=ATOL, rtol=0)
    for t in range(continuations.shape[1]):
        step = gpt(continuations[:, t : t + 1], cache=cache)[:, -1]
        for row, prompt in enumerate(prompts):
            full = torch.tensor([prompt + continuations[row, : t + 1].tolist()])
            torch.testing.assert_close(step[row], gpt(full)[0, -1], atol=ATOL, rtol=0)


@torch.no_grad()
def test_pad_mask_only_allowed_on_empty_cache(gpt):
    ids = _random_ids(gpt.config.vocab_size, (1, 4))
    cache = gpt.new_cache(1, 8)
    gpt(ids, cache=cache)
    with pytest.raises(ValueError, match="pad_mask"):
        gpt(ids[:, :1], cache=cache, pad_mask=torch.ones(1, 1, dtype=torch.bool))


@torch.no_grad()
def test_targets_give_log_softmax_of_targets(gpt):
    idx = _random_ids(gpt.config.vocab_size, (2, 7))
    targets = _random_ids(gpt.config.vocab_size, (2, 7), seed=5)
    expected = torch.log_softmax(gpt(idx), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    got = gpt(idx, targets)
    assert got.shape == (2, 7)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got < 0).all()


@torch.no_grad()
def test_target_minus_one_gives_zero(gpt):
    idx = _random_ids(gpt.config.vocab_size, (2, 5))
    targets = _random_ids(gpt.config.vocab_size, (2, 5), seed=6)
    targets[0, :2] = -1
    targets[1, 4] = -1
    got = gpt(idx, targets)
    ignored = targets == -1
    assert (got[ignored] == 0).all()
    assert (got[~ignored] < 0).all()


def test_token_logprobs_exact_values():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]]))
    got = token_logprobs(logits, torch.tensor([[0, -1]]))
    torch.testing.assert_close(got, torch.tensor([[torch.log(torch.tensor(0.5)).item(), 0.0]]))
    got = token_logprobs(logits, torch.tensor([[1, 2]]))
    torch.testing.assert_close(got, torch.log(torch.tensor([[0.25, 0.7]])))


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
@torch.no_grad()
def test_grouped_query_attention_shapes_and_cache(make_gpt, n_kv_head):
    model = make_gpt(n_head=4, n_kv_head=n_kv_head)
    head_dim = 32 // 4
    assert model.blocks[0].attn.kv.weight.shape == (2 * n_kv_head * head_dim, 32)
    cache = model.new_cache(2, 9)
    assert cache.k.shape == (2, 2, n_kv_head, 9, head_dim)
    seq = _random_ids(model.config.vocab_size, (2, 9))
    assert model(seq).shape == (2, 9, model.config.vocab_size)
    model(seq[:, :6], cache=cache)
    for t in range(6, 9):
        step = model(seq[:, t : t + 1], cache=cache)[:, -1]
        torch.testing.assert_close(step, model(seq[:, : t + 1])[:, -1], atol=ATOL, rtol=0)


@torch.no_grad()
def test_sequence_longer_than_max_seq_len_raises(make_gpt):
    model = make_gpt(max_seq_len=16)
    assert model(torch.zeros(1, 16, dtype=torch.long)).shape == (1, 16, model.config.vocab_size)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


@torch.no_grad()
def test_cache_decoding_past_max_seq_len_raises(make_gpt):
    model = make_gpt(max_seq_len=16)
    cache = model.new_cache(1, 20)
    model(torch.zeros(1, 16, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_kv_cache_select_keeps_selected_rows_in_order():
    cfg = GPTConfig(vocab_size=11, n_layer=2, n_head=4, n_kv_head=2, n_embd=16, max_seq_len=32)
    cache = KVCache(cfg, batch=3, max_len=5, device="cpu", dtype=torch.float32)
    for row in range(3):
        cache.k[:, row] = row + 1.0
        cache.v[:, row] = -(row + 1.0)
        cache.valid[row, row:] = True
    cache.offset = torch.tensor([0, 1, 2])
    cache.length = 4
    cache.select(torch.tensor([2, 0, 0]))
    assert cache.batch == 3
    assert [cache.k[:, i].unique().item() for i in range(3)] == [3.0, 1.0, 1.0]
    assert [cache.v[:, i].unique().item() for i in range(3)] == [-3.0, -1.0, -1.0]
    assert cache.valid.tolist() == [[False, False, True, True, True], [True] * 5, [True] * 5]
    assert cache.offset.tolist() == [2, 0, 0]
    assert cache.length == 4  # positions filled are the same for every row
    cache.select(torch.tensor([0]))
    assert cache.batch == 1 and cache.k.shape[1] == 1 and cache.offset.tolist() == [2]


@torch.no_grad()
def test_selected_cache_rows_keep_decoding_correctly(gpt):
    """Compaction (drop a row) and replication (repeat a row) keep each row's decoding exact."""
    seq = _random_ids(gpt.config.vocab_size, (3, 8))
    cache = gpt.new_cache(3, 8)
    gpt(seq[:, :5], cache=cache)
    cache.select(torch.tensor([2, 0, 2]))
    kept = seq[[2, 0, 2]]
    for t in range(5, 8):
        step = gpt(kept[:, t : t + 1], cache=cache)[:, -1]
        torch.testing.assert_close(step, gpt(kept[:, : t + 1])[:, -1], atol=ATOL, rtol=0)


def test_default_init_residual_branches_start_as_identity(make_gpt):
    model = make_gpt(randomize=False)
    for block in model.blocks:
        assert (block.attn.proj.weight == 0).all() and (block.out.weight == 0).all()
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert model.config_dict()["n_kv_head"] == 2


@pytest.mark.parametrize(("n_embd", "n_head"), [(30, 4), (36, 4)])  # head dim 7.5, 9 (odd)
def test_bad_head_dim_is_rejected_at_construction(make_gpt, n_embd, n_head):
    with pytest.raises((ValueError, AssertionError)):
        make_gpt(n_embd=n_embd, n_head=n_head, n_kv_head=2)
