"""Specs for the chunked log-probs and entropy (posttrain/models/logprobs.py): they equal today's full-logits
path, log_softmax(logits/τ)[target] and the entropy of softmax(logits/τ), values and gradients, on the
built-in GPT and on a tiny HF Llama with and without LoRA; the head only ever sees chunks of completion
positions; activation checkpointing leaves the gradients as they were."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.algorithms.losses import entropy_from_logits
from posttrain.models.gpt import token_logprobs
from posttrain.models.logprobs import token_logprobs_from_hidden

ATOL = 1e-5
TEMPERATURES = (0.7, 1.0, 1.3)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch(vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (3, 11) and their next tokens as targets, −1 on a prompt of 1/3/5 tokens and on one gap:
    23 positions with a target, which chunks of 4 or 7 do not divide."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, vocab, (3, 12), generator=g)
    targets = seq[:, 1:].clone()
    for row, prompt in enumerate((1, 3, 5)):
        targets[row, :prompt] = -1
    targets[0, 8] = -1
    return seq[:, :-1], targets


def full_path(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Today's path on the full (B, T, V) logits: log-probs and entropy of softmax(logits/τ), 0 where target −1."""
    z = logits / temperature
    return token_logprobs(z, targets), entropy_from_logits(z) * (targets >= 0)


def weighted(logp: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """A loss that weighs every position differently, so a gradient slip at any position shows."""
    g = torch.Generator().manual_seed(7)
    return (torch.randn(logp.shape, generator=g) * logp + torch.randn(logp.shape, generator=g) * entropy).sum()


def grads(model, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params))


def assert_same(chunked, reference, model, targets):
    (logp, entropy), (ref_logp, ref_entropy) = chunked, reference
    torch.testing.assert_close(logp, ref_logp, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(entropy, ref_entropy, atol=ATOL, rtol=ATOL)
    masked = targets < 0
    assert bool((logp[masked] == 0).all()) and bool((entropy[masked] == 0).all())
    for got, want in zip(grads(model, weighted(logp, entropy)), grads(model, weighted(ref_logp, ref_entropy)),
                         strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)


# --- the built-in GPT --------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("chunk", [4, 7, 1024])
def test_gpt_logprobs_and_entropy_equal_the_full_logits_path_with_gradients(make_gpt, temperature, chunk):
    model = make_gpt()
    idx, targets = batch(model.config.vocab_size)
    chunked = model.logprobs(idx, targets, temperature, entropy=True, chunk_tokens=chunk)
    assert_same(chunked, full_path(model(idx), targets, temperature), model, targets)


def test_gpt_forward_with_targets_is_the_chunked_log_probs_at_temperature_one(make_gpt):
    model = make_gpt()
    idx, targets = batch(model.config.vocab_size)
    logp, entropy = model.logprobs(idx, targets)
    assert entropy is None
    torch.testing.assert_close(model(idx, targets), logp, atol=0, rtol=0)
    torch.testing.assert_close(logp, token_logprobs(model(idx), targets), atol=ATOL, rtol=ATOL)


def test_gpt_packed_rows(make_gpt):
    model = make_gpt()
    idx, targets = batch(model.config.vocab_size)
    doc_ids = torch.tensor([[0] * 5 + [1] * 6, [0] * 11, [0] * 3 + [1] * 3 + [2] * 5])
    logp, entropy = model.logprobs(idx, targets, 0.7, entropy=True, doc_ids=doc_ids, chunk_tokens=4)
    reference = full_path(model(idx, doc_ids=doc_ids), targets, 0.7)
    torch.testing.assert_close((logp, entropy), reference, atol=ATOL, rtol=ATOL)


def test_activation_checkpointing_leaves_gpt_gradients_unchanged(make_gpt):
    idx, targets = batch(make_gpt().config.vocab_size)
    results, calls = [], []
    for checkpointed in (False, True):
        model = make_gpt().train()
        if checkpointed:
            model.enable_activation_checkpointing()
        calls.append(0)
        model.blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__(-1, calls[-1] + 1))
        results.append(grads(model, weighted(*model.logprobs(idx, targets, 1.3, entropy=True, chunk_tokens=7))))
    assert calls == [1, 2]  # checkpointed: the block runs again in backward
    for plain, recomputed in zip(*results, strict=True):
        torch.testing.assert_close(recomputed, plain, atol=1e-6, rtol=1e-6)


# --- the function itself ------------------------------------------------------------------------------


class CountingHead(torch.nn.Module):
    """A linear head that records how many rows each call sees."""

    def __init__(self, width: int, vocab: int):
        super().__init__()
        self.linear = torch.nn.Linear(width, vocab)
        self.rows: list[int] = []

    def forward(self, h):
        self.rows.append(h.shape[0])
        return self.linear(h)


def test_the_head_sees_only_completion_positions_in_chunks_forward_and_backward():
    torch.manual_seed(0)
    head, hidden = CountingHead(16, 50), torch.randn(3, 11, 16, requires_grad=True)
    _, targets = batch(50)
    logp, entropy = token_logprobs_from_hidden(hidden, head, targets, entropy=True, chunk_tokens=7)
    assert head.rows == [7, 7, 7, 2]  # 23 positions with a target, never a (B·T, V) call
    weighted(logp, entropy).backward()
    assert head.rows == [7, 7, 7, 2] + [2, 7, 7, 7]  # backward recomputes each chunk's logits once
    with torch.no_grad():  # no graph: no recompute
        token_logprobs_from_hidden(hidden, head, targets, entropy=True, chunk_tokens=7)
    assert head.rows[8:] == [7, 7, 7, 2]


def test_bf16_hidden_and_head_give_fp32_results_of_the_upcast_logits():
    torch.manual_seed(0)
    head, hidden = torch.nn.Linear(16, 50).bfloat16(), torch.randn(3, 11, 16, dtype=torch.bfloat16)
    _, targets = batch(50)
    logp, entropy = token_logprobs_from_hidden(hidden, head, targets, 1.3, entropy=True, chunk_tokens=4)
    assert logp.dtype == entropy.dtype == torch.float32
    reference = full_path(head(hidden).float(), targets, 1.3)
    torch.testing.assert_close((logp, entropy), reference, atol=ATOL, rtol=ATOL)
    weighted(logp, entropy).backward()
    assert head.weight.grad.dtype == torch.bfloat16 and bool(head.weight.grad.isfinite().all())


def test_no_target_at_all_gives_zeros_and_a_zero_gradient():
    head, hidden = torch.nn.Linear(16, 50), torch.randn(2, 5, 16, requires_grad=True)
    logp, entropy = token_logprobs_from_hidden(hidden, head, torch.full((2, 5), -1), entropy=True)
    assert logp.tolist() == entropy.tolist() == [[0.0] * 5] * 2
    (logp.sum() + entropy.sum()).backward()
    assert bool((hidden.grad == 0).all()) and bool((head.weight.grad == 0).all())


@pytest.mark.parametrize("bad", [{"temperature": 0.0}, {"temperature": float("inf")}, {"chunk_tokens": 0}])
def test_bad_temperature_or_chunk_size_is_refused(bad):
    with pytest.raises(ValueError):
        token_logprobs_from_hidden(torch.randn(1, 2, 4), torch.nn.Linear(4, 8), torch.zeros(1, 2, dtype=torch.long),
                                   **bad)


# --- a tiny HF Llama, with and without LoRA -----------------------------------------------------------


def tiny_llama(lora: bool, seed: int = 0, **config):
    """A random 2-layer Llama as an HFPolicy; with LoRA, the adapter's B matrices are random (not 0) so
    the adapter changes the outputs, and only the adapter trains."""
    transformers = pytest.importorskip("transformers")
    from posttrain.config import LoraConfig
    from posttrain.models.hf import HFPolicy, apply_lora

    sizes = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    sizes.update(config)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes))
    if lora:
        pytest.importorskip("peft")
        model = apply_lora(model, LoraConfig(rank=4, alpha=8.0))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.2)
    return HFPolicy(model)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_hf_logprobs_and_entropy_equal_the_full_logits_path_with_gradients(lora, temperature):
    policy = tiny_llama(lora)
    idx, targets = batch(97)
    chunked = policy.logprobs(idx, targets, temperature, entropy=True, chunk_tokens=7)
    assert_same(chunked, full_path(policy(idx), targets, temperature), policy, targets)
    torch.testing.assert_close(policy(idx, targets), token_logprobs(policy(idx), targets), atol=ATOL, rtol=ATOL)


def test_hf_hidden_states_are_what_the_lm_head_reads():
    policy = tiny_llama(lora=False)
    idx, _ = batch(97)
    with torch.no_grad():
        torch.testing.assert_close(policy.logits_head()(policy.hidden_states(idx)), policy(idx), atol=ATOL, rtol=0)


def test_lora_reference_logprobs_are_the_base_model_without_grad():
    base = tiny_llama(lora=False)
    policy = tiny_llama(lora=True)
    idx, targets = batch(97)
    logp, entropy = policy.reference().logprobs(idx, targets, 0.7, entropy=True, chunk_tokens=4)
    assert not logp.requires_grad and not entropy.requires_grad
    with torch.no_grad():
        expected = base.logprobs(idx, targets, 0.7, entropy=True)
        adapted = policy.logprobs(idx, targets, 0.7)[0]
    torch.testing.assert_close((logp, entropy), expected, atol=ATOL, rtol=ATOL)
    assert (adapted - logp).abs().max() > 1e-3  # the adapter is back on afterwards


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_activation_checkpointing_leaves_hf_gradients_unchanged(lora):
    idx, targets = batch(97)
    results, calls = [], []
    for checkpointed in (False, True):
        policy = tiny_llama(lora).train()
        if checkpointed:
            policy.enable_activation_checkpointing()
        calls.append(0)
        mlp = policy._decoder().layers[0].mlp  # inside the layer: transformers checkpoints its forward, not hooks
        mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(-1, calls[-1] + 1))
        results.append(grads(policy, weighted(*policy.logprobs(idx, targets, 0.7, entropy=True, chunk_tokens=4))))
    assert calls == [1, 2]  # checkpointed: the layer runs again in backward
    for plain, recomputed in zip(*results, strict=True):
        torch.testing.assert_close(recomputed, plain, atol=1e-6, rtol=1e-6)


def test_final_logit_softcapping_is_applied_as_the_model_does():
    transformers = pytest.importorskip("transformers")
    from posttrain.models.hf import HFPolicy

    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                       final_logit_softcapping=0.5)
    policy = HFPolicy(transformers.Gemma2ForCausalLM(config))
    idx, targets = batch(97)
    logits = policy(idx)  # the model's own forward: softcapped
    assert logits.abs().max() < 0.5
    assert_same(policy.logprobs(idx, targets, 1.3, entropy=True, chunk_tokens=7), full_path(logits, targets, 1.3),
                policy, targets)


def test_a_model_that_scales_its_logits_otherwise_is_refused():
    policy = tiny_llama(lora=False)
    policy.hf.config.logits_scaling = 8.0  # as Granite's config has it
    idx, targets = batch(97)
    with pytest.raises(ValueError, match="logits_scaling"):
        policy.logprobs(idx, targets)


# --- the benchmark ------------------------------------------------------------------------------------


def test_update_memory_bench_measures_each_variant_in_process():
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("update_memory", ROOT / "bench" / "update_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for variant in bench.VARIANTS:
        row = bench.run_variant(variant, bench.QUICK, batch=2, seq=32, completion=24, device="cpu")
        assert row["variant"] == variant and row["peak_mib"] > 0 and row["update_s"] > 0


@pytest.mark.slow  # three fresh processes, each importing transformers: ~25 s
def test_update_memory_bench_quick_prints_each_variant_and_the_ratio_last():
    pytest.importorskip("transformers")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # this checkout's posttrain
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "update_memory.py"), "--quick", "--threads", "1"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True).stdout
    lines = out.strip().splitlines()
    for variant in ("full", "chunked", "chunked+ckpt"):
        assert any(line.startswith(f"{variant} ") for line in lines), out
    assert lines[-1].startswith("RESULT memory_ratio=") and float(lines[-1].split("=")[1]) > 0
