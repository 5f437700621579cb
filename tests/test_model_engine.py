"""Specs for the model engine: devices and precisions (run here on the CPU; the same code runs on CUDA),
device-independent checkpoints, one-line errors for impossible settings, and the trainer training exactly
the distribution the sampler drew from."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from posttrain.checkpoint import load_checkpoint
from posttrain.cli import app
from posttrain.config import ConfigError, OptimConfig, RLConfig, SFTConfig, load_config
from posttrain.engine import Engine, SamplingParams
from posttrain.metrics import read_jsonl
from posttrain.trainers.model_engine import ModelEngine, OutOfMemory, out_of_memory, resolve_device, resolve_precision
from posttrain.trainers.objectives import PolicyLoss, PolicyObjective
from posttrain.trainers.rl import mismatch, train_rl
from posttrain.trainers.sft import train_sft
from posttrain.trainers.train_batch import layout

TINY_SFT = ["threads=1", "steps=4", "batch_size=4", "save_every=2", "gpt.n_layer=1", "gpt.n_embd=32", "gpt.n_head=2",
            "gpt.n_kv_head=1", "gpt.max_seq_len=128", "optim.warmup_steps=1", "optim.lr=1e-2", "task.test_size=4",
            "eval.every=0", "eval.problems=2", "eval.samples=2", "eval.ks=[1,2]", "eval.max_new_tokens=8"]


def test_device_and_precision_resolution():
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("auto", cpu, "bfloat16") == "bf16-true"
    for name in ("fp32", "bf16-mixed", "fp16-mixed", "bf16-true"):
        assert resolve_precision(name, cpu) == name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_a_config_error(device):
    with pytest.raises(ConfigError, match=f"device' is {device}, but torch finds no CUDA"):
        resolve_device(device)


@pytest.mark.parametrize("overrides, message", [
    (["device=tpu"], "'device' must be auto | cpu | cuda | cuda:N, got 'tpu'"),
    (["precision=bf16mixed"], "unknown value 'bf16mixed' (did you mean 'bf16-mixed'?)"),
    (["precision=fp32", "model.dtype=bfloat16"], "model.dtype' is bfloat16 but precision is fp32"),
    (["model.dtype=float16"], "fp16 weights cannot train"),
])
def test_impossible_device_or_precision_is_named_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_cli_device_cuda_without_cuda_exits_2_with_one_line(tmp_path):
    result = CliRunner().invoke(app, ["rl", "-", "--no-progress", f"run_dir={tmp_path}", "device=cuda"])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "no CUDA device" in result.output
    assert not (tmp_path / "checkpoints").exists()  # nothing was loaded or written


def test_out_of_memory_becomes_one_line_naming_step_phase_and_what_to_lower():
    with pytest.raises(OutOfMemory) as err, out_of_memory(7, "update"):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    assert str(err.value) == ("out of device memory at step 7 during update: lower micro_batch, or set "
                              "activation_checkpointing=true or precision=bf16-true")


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed", "bf16-true"])
def test_every_precision_trains_and_its_checkpoint_reloads_in_fp32(tmp_path, precision):
    result = train_sft(load_config(SFTConfig, None, [f"run_dir={tmp_path}", "device=cpu", f"precision={precision}",
                                                     *TINY_SFT]), progress=False)
    assert "eval/pass@1" in result
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert len(rows) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    saved = load_file(tmp_path / "checkpoints/final/model.safetensors")
    expected = torch.bfloat16 if precision == "bf16-true" else torch.float32  # mixed: fp32 master weights
    assert {t.dtype for t in saved.values()} == {expected}
    model, _, _ = load_checkpoint(tmp_path / "checkpoints/final")  # an fp32 run reads it back
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(model.state_dict()[k].equal(v.float()) for k, v in saved.items())


def test_a_bf16_mixed_run_resumes_in_fp32(tmp_path):
    train_sft(load_config(SFTConfig, None, [f"run_dir={tmp_path}", "precision=bf16-mixed", *TINY_SFT]),
              progress=False)
    longer = [o if not o.startswith("steps=") else "steps=6" for o in TINY_SFT]
    train_sft(load_config(SFTConfig, None, [f"run_dir={tmp_path}", "precision=fp32", *longer]), progress=False)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # went on from step 4, in fp32


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sft")
    train_sft(load_config(SFTConfig, None, [f"run_dir={run_dir}", *TINY_SFT]), progress=False)
    return run_dir / "checkpoints/final"


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed", "bf16-true"])
def test_ppo_with_a_critic_and_a_reference_runs_in_every_precision(tiny_sft, tmp_path, precision):
    """PPO (critic, reference, KL in the reward, packed scoring and update) in each precision on the CPU."""
    config = load_config(RLConfig, None, [
        f"run_dir={tmp_path}", f"model={tiny_sft}", f"precision={precision}", "algorithm=ppo", "threads=1",
        "steps=2", "prompts_per_step=2", "samples_per_prompt=3", "critic.warmup_steps=0", "eval.every=0",
        "eval.problems=2", "eval.samples=2", "eval.ks=[1,2]", "eval.max_new_tokens=8", "sampling.max_new_tokens=12",
        "task.test_size=4", "optim.warmup_steps=1", "mismatch_every=1"])
    train_rl(config, progress=False)
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "value_loss" in r]
    assert len(rows) == 2
    for row in rows:
        assert all(math.isfinite(row[k]) for k in ("kl", "value_loss", "grad_norm", "critic/grad_norm", "entropy"))
        assert row["mismatch/kl"] >= 0  # sampled and trained in the same precision: small, never negative
    if precision == "fp16-mixed":
        assert rows[-1]["precision/loss_scale"] > 0 and "precision/overflows" in rows[-1]
    final = load_file(tmp_path / "checkpoints/final/critic.safetensors")
    assert all(torch.isfinite(v.float()).all() for v in final.values())


def test_fp16_a_non_finite_loss_is_not_taken_for_an_overflow():
    layer = torch.nn.Linear(4, 1)
    engine = ModelEngine(layer, OptimConfig(lr=0.1, grad_clip=0.0), torch.device("cpu"), "fp16-mixed")
    with engine.autocast():
        loss = layer(torch.ones(2, 4)).float().sum() * float("nan")
    engine.backward(loss)
    seen = []
    engine.optim_step(lambda g: seen.append(g) or False, loss=float("nan"))
    assert len(seen) == 1 and engine.overflows == 0  # the health gate saw it (a nonfinite event), not the scaler


def test_fp16_scaler_skips_an_overflowing_update_and_counts_it():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 1)
    engine = ModelEngine(layer, OptimConfig(lr=0.1, grad_clip=0.0), torch.device("cpu"), "fp16-mixed")
    before = layer.weight.detach().clone()
    with engine.autocast():
        loss = layer(torch.full((2, 4), 1e4)).float().sum() * 1e30  # inf once scaled
    engine.backward(loss)
    grad_norm, version = engine.optim_step(lambda g: pytest.fail("an overflow never reaches the health gate"))
    assert version == 0 and engine.overflows == 1 and layer.weight.equal(before)
    assert engine.scaler.get_scale() < 2.0**16  # the scale came down
    with engine.autocast():
        loss = layer(torch.ones(2, 4)).float().mean()  # scaled gradients stay inside fp16's range
    engine.backward(loss)
    assert engine.optim_step()[1] == 1 and not layer.weight.equal(before)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
def test_the_trainer_recomputes_the_sampled_distribution(make_gpt, tok, temperature):
    """Untruncated sampling (no top-k, no top-p) on the CPU in fp32: the trainer's log-probs of the sampled
    tokens, at the sampling temperature, are the sampler's own to 1e-4."""
    model = make_gpt()
    prompts = [tok.encode("what is 3 plus 4"), tok.encode("7 times 8")]
    params = SamplingParams(temperature=temperature, top_k=None, top_p=None, max_new_tokens=12)
    batch = Engine(model, tok).generate(prompts, 3, params, seed=5)
    data = layout(batch, tok.pad_id)
    engine = ModelEngine(model, None, torch.device("cpu"), "fp32")
    found = mismatch(data, engine.score(data, PolicyObjective(PolicyLoss(temperature=temperature))))
    assert found["mismatch/logprob_diff_max"] <= 1e-4 and 0 <= found["mismatch/kl"] <= 1e-4
    untempered = mismatch(data, engine.score(data, PolicyObjective(PolicyLoss(temperature=1.0))))
    if temperature != 1.0:  # training π at T = 1 on samples drawn at T ≠ 1 is the bug this guards
        assert untempered["mismatch/logprob_diff_max"] > 0.05


@pytest.mark.parametrize("correction", ["tis", "icepop"])
def test_the_sampler_trainer_correction_is_one_without_truncation_and_bites_with_it(tiny_sft, tmp_path, correction):
    """The local engine samples what the trainer computes (fp32, no top-k): every weight is 1 to 1e-5. With top-k
    truncation the sampler's renormalised probabilities exceed the trainer's, ρ < 1, and a tight C acts."""
    common = [f"model={tiny_sft}", "algorithm=dr_grpo", "threads=1", "steps=2", "prompts_per_step=2",
              "samples_per_prompt=3", "eval.every=0", "eval_before=false", "eval.problems=2", "eval.samples=1",
              "eval.ks=[1]", "eval.max_new_tokens=4", "sampling.max_new_tokens=10", "task.test_size=4",
              f"is_correction={correction}"]
    exact = tmp_path / "exact"
    train_rl(load_config(RLConfig, None, [*common, f"run_dir={exact}", "sampling.top_k=null"]), progress=False)
    for row in [r for r in read_jsonl(exact / "metrics.jsonl") if r["step"] > 0]:
        assert abs(row["is/ratio_max"] - 1) <= 1e-5 and abs(row["is/ratio_mean"] - 1) <= 1e-5
        assert row["is/masked_frac"] == 0 and row["is/truncated_frac"] == 0
    cut = tmp_path / "cut"
    train_rl(load_config(RLConfig, None, [*common, f"run_dir={cut}", "sampling.top_k=2", "is_clip=1.01"]),
             progress=False)
    rows = [r for r in read_jsonl(cut / "metrics.jsonl") if r["step"] > 0]
    assert len(rows) == 2 and all(0 < r["is/ratio_mean"] < 1 for r in rows)
    if correction == "icepop":
        assert all(r["is/masked_frac"] > 0 for r in rows)  # tokens whose ρ < 1/C get no loss


def test_the_correction_weights_reach_the_policy_gradient(make_gpt, tok):
    """is_weight 0 on every token: no policy gradient at all; 1: the plain one."""
    model = make_gpt()
    prompts = [tok.encode("what is 3 plus 4"), tok.encode("7 times 8")]
    batch = Engine(model, tok).generate(prompts, 3, SamplingParams(temperature=1.0, max_new_tokens=8), seed=5)
    data = layout(batch, tok.pad_id)
    data.advantages = torch.ones_like(data.mask)
    engine = ModelEngine(model, OptimConfig(lr=0.1), torch.device("cpu"), "fp32")
    objective, rows = PolicyObjective(PolicyLoss()), torch.arange(len(data.mask))
    for weight in (0.0, 1.0):
        data.is_weight = torch.full_like(data.mask, weight)
        engine.forward_backward(data, rows, data.mask.sum(), objective)
        total = sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None)
        assert (total > 0) == (weight > 0)
        engine.zero_grad()


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_a_fully_masked_row_changes_no_sequence_mean_gradient(make_gpt, tok, agg):
    """A row truncated under overlong=mask (mask all 0) adds nothing and shrinks nothing: the gradient of a batch
    with it equals the gradient without it (it used to count in the number of sequences)."""
    model = make_gpt()
    prompts = [tok.encode("what is 3 plus 4"), tok.encode("7 times 8")]
    batch = Engine(model, tok).generate(prompts, 3, SamplingParams(temperature=1.0, max_new_tokens=8), seed=5)
    data = layout(batch, tok.pad_id)
    data.advantages = torch.linspace(-1, 1, data.mask.numel()).reshape(data.mask.shape)
    data.mask[-1] = 0.0  # the truncated row
    engine = ModelEngine(model, OptimConfig(lr=0.1), torch.device("cpu"), "fp32", max_tokens_per_micro_batch=24)
    objective = PolicyObjective(PolicyLoss(agg=agg, max_len=8))
    grads = []
    for rows in (torch.arange(len(data.mask)), torch.arange(len(data.mask) - 1)):
        engine.forward_backward(data, rows, objective.share(data.mask[rows]).clamp(min=1), objective)
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        engine.zero_grad()
    for with_row, without in zip(*grads, strict=True):
        torch.testing.assert_close(with_row, without, rtol=1e-5, atol=1e-7)
