"""End-to-end specs for the preference trainers on a tiny built-in GPT: tiny budgets, a metric that must move,
exact resume, and the reward model driving PPO."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import RLConfig, SFTConfig, load_config
from posttrain.metrics import read_jsonl
from posttrain.preference_config import DPOConfig, RMConfig
from posttrain.trainers.dpo import train_dpo
from posttrain.trainers.reward_model import RewardScorer, load_reward_model, train_reward_model
from posttrain.trainers.rl import train_rl
from posttrain.trainers.sft import train_sft

TINY_SFT = ["steps=30", "batch_size=16", "gpt.n_layer=1", "gpt.n_embd=32", "gpt.n_head=2", "gpt.n_kv_head=1",
            "gpt.max_seq_len=128", "optim.warmup_steps=2", "optim.lr=1e-2", "task.test_size=8", "eval.every=0",
            "eval.problems=4", "eval.samples=2", "eval.ks=[1,2]", "eval.max_new_tokens=16", "threads=1"]
PAIRS = ["data.train_size=128", "data.test_size=32", "batch_size=16", "threads=1"]


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> str:
    run_dir = tmp_path_factory.mktemp("sft")
    train_sft(load_config(SFTConfig, None, [f"run_dir={run_dir}", *TINY_SFT]), progress=False)
    return str(run_dir / "checkpoints" / "final")


@pytest.fixture(scope="module")
def reward_model(policy, tmp_path_factory) -> tuple[str, dict]:
    run_dir = tmp_path_factory.mktemp("rm")
    config = load_config(RMConfig, None, [f"run_dir={run_dir}", f"model={policy}", "steps=30", "eval_every=0",
                                          "optim.lr=3e-3", "optim.warmup_steps=2", *PAIRS])
    return str(run_dir), train_reward_model(config, progress=False)


def test_reward_model_learns_the_preference(reward_model):
    run_dir, result = reward_model
    rows = [r for r in read_jsonl(f"{run_dir}/metrics.jsonl") if "loss" in r]
    assert len(rows) == 30
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert result["eval/accuracy"] > 0.6 and result["eval/accuracy/ramble"] > 0.8
    for key in ("accuracy", "margin", "rewards/chosen/mean", "rewards/rejected/std", "grad_norm", "learning_rate"):
        assert key in rows[-1]


def test_reward_model_checkpoint_reloads_as_a_scorer(reward_model):
    run_dir, _ = reward_model
    final = f"{run_dir}/checkpoints/final"
    model, tok = load_reward_model(final)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    head = load_file(f"{final}/reward_head.safetensors")
    assert torch.equal(model.head.weight, head["weight"])
    scorer = RewardScorer(model, tok, batch_size=4)
    scores = scorer(["Ann has 3 apples"] * 2, [" 5", " 5 5 5 5 5"])
    assert len(scores) == 2 and all(abs(s) < 10 for s in scores)


def dpo_config(policy: str, run_dir, *extra: str) -> DPOConfig:
    return load_config(DPOConfig, None, [f"run_dir={run_dir}", f"model={policy}", "optim.lr=3e-3",
                                         "optim.warmup_steps=1", "eval.every=0", *PAIRS, *extra])


@pytest.mark.parametrize("precompute", [False, True])
def test_dpo_separates_held_out_pairs(policy, tmp_path, precompute):
    result = train_dpo(dpo_config(policy, tmp_path, "steps=12", f"precompute_ref={precompute}"), progress=False)
    before, after = result["before"], result["after"]
    assert before["eval/rewards/margins"] == 0 and before["eval/loss"] == pytest.approx(0.6931, abs=1e-4)
    assert after["eval/rewards/margins"] > 0 and after["eval/rewards/accuracies"] > 0.6
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert rows[0]["step"] == 0 and rows[1]["rewards/margins"] == 0  # step 1 is measured at π = π_ref
    assert rows[-1]["rewards/margins"] > 0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert key in rows[-1]


def test_dpo_reference_lives_where_and_as_the_policy_does(policy, tmp_path):
    """bf16-true: the frozen reference is cast and placed by its own model engine as the policy is, so at the start
    π = π_ref exactly (an fp32 reference beside a bf16 policy would give nonzero implicit rewards)."""
    result = train_dpo(dpo_config(policy, tmp_path, "steps=1", "precision=bf16-true"), progress=False)
    assert result["before"]["eval/rewards/margins"] == 0 and result["before"]["eval/rewards/chosen"] == 0
    assert read_jsonl(tmp_path / "metrics.jsonl")[1]["rewards/chosen"] == 0


def test_dpo_resumed_mid_way_ends_with_the_same_weights(policy, tmp_path):
    straight = tmp_path / "straight"
    train_dpo(dpo_config(policy, straight, "steps=6", "save_every=3"), progress=False)
    resumed = tmp_path / "resumed"  # starts from the straight run's step-3 checkpoint, as after a kill there
    train_dpo(dpo_config(policy, resumed, "steps=6", "save_every=3",
                         f"resume={straight / 'checkpoints' / 'step_000003'}"), progress=False)
    a = load_file(straight / "checkpoints" / "final" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_jsonl(resumed / "metrics.jsonl")] == [4, 5, 6]
    assert read_jsonl(resumed / "metrics.jsonl")[-1]["loss"] == read_jsonl(straight / "metrics.jsonl")[-1]["loss"]


def test_ppo_against_the_reward_model_raises_its_score(policy, reward_model, tmp_path):
    run_dir, _ = reward_model
    config = load_config(RLConfig, None, [
        f"run_dir={tmp_path}", f"model={policy}", f"reward_model.path={run_dir}/checkpoints/final",
        "rewards={reward_model: 1.0, task: 0.0}", "algorithm=ppo", "steps=10", "prompts_per_step=8",
        "samples_per_prompt=4", "critic.warmup_steps=1", "optim.lr=1e-2", "optim.warmup_steps=1",
        "sampling.max_new_tokens=24", "eval_before=false", "eval.problems=4", "eval.samples=2", "eval.ks=[1,2]",
        "task.test_size=8", "threads=1"])
    train_rl(config, progress=False)
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "reward" in r]
    early = sum(r["rewards/reward_model/mean"] for r in rows[:3]) / 3
    late = sum(r["rewards/reward_model/mean"] for r in rows[-3:]) / 3
    assert late > early, (early, late)
    assert [r["reward"] for r in rows] == pytest.approx([r["rewards/reward_model/mean"] for r in rows], abs=1e-4)
    assert all("rewards/task/mean" in r and "kl" in r for r in rows)  # k1 KL estimates may be < 0
