"""End-to-end specs for the trainers and the CLI: tiny budgets, and a metric that must move."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.config import RL_PRESETS, RLConfig, SFTConfig, load_config
from posttrain.metrics import read_jsonl
from posttrain.trainers.rl import train_rl
from posttrain.trainers.sft import train_sft

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """The demo's SFT stage (about 2 minutes on 2 cores): the built-in GPT learns the task from scratch."""
    torch.set_num_threads(2)
    run_dir = tmp_path_factory.mktemp("sft")
    config = load_config(SFTConfig, CONFIGS / "demo_sft.yaml", [
        f"run_dir={run_dir}", "eval.problems=64", "eval.samples=4", "eval.ks=[1,4]",
    ])
    metrics = train_sft(config, progress=False)
    return run_dir, metrics


def test_sft_loss_falls_and_checkpoint_is_written(sft_run):
    run_dir, metrics = sft_run
    rows = read_jsonl(run_dir / "metrics.jsonl")
    first = sum(r["loss"] for r in rows[:10]) / 10
    last = sum(r["loss"] for r in rows[-10:]) / 10
    assert last < 0.5 * first
    assert metrics["eval/pass@1"] > 0.4  # it learned the task, from scratch
    assert (run_dir / "checkpoints" / "final" / "model.safetensors").exists()


def rl_overrides(sft_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", f"model={sft_dir / 'checkpoints' / 'final'}", "optim.lr=1e-3",
            "optim.warmup_steps=2", "eval.problems=32", "eval.samples=4", "eval.ks=[1,4]", "eval.every=0",
            "sampling.max_new_tokens=48", *extra]


@pytest.mark.parametrize("preset", ["grpo", "rloo", "ppo"])
def test_preset_raises_mean_reward(sft_run, tmp_path, preset):
    run_dir, _ = sft_run
    config = load_config(RLConfig, None, rl_overrides(run_dir, tmp_path, f"algorithm={preset}", "steps=16"))
    result = train_rl(config, progress=False)
    steps = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "reward" in r]
    early = sum(r["reward"] for r in steps[:4]) / 4
    late = sum(r["reward"] for r in steps[-4:]) / 4
    assert late > early + 0.05, (early, late)  # teacher slips get unlearned
    assert result["after"]["eval/reward"] > result["before"]["eval/reward"]
    for key in ("frac_reward_zero_std", "entropy", "grad_norm", "completions/mean_length", "kl_coef",
                "tools/call_frequency", "timing_s/gen", "timing_s/update", "throughput/gen_tokens_per_s",
                "data/pad_fraction"):
        assert key in steps[-1], key
    assert 0 <= steps[-1]["data/pad_fraction"] < 0.5  # packed rows: little padding left
    if preset != "rloo":  # grpo (KL in loss) and ppo (KL in reward) keep a reference model
        assert 0 < steps[-1]["kl"] < 1
    if preset == "ppo":  # the critic learns: its loss falls once it tracks the returns
        assert steps[-1]["value_loss"] < steps[0]["value_loss"]
        assert steps[0].get("policy_loss") is None  # critic warm-up: the policy waits
    samples = read_jsonl(tmp_path / "samples.jsonl")
    assert samples and {"prompt", "completion", "reward"} <= samples[0].keys()


@pytest.mark.parametrize("preset", list(RL_PRESETS))
def test_every_preset_runs(sft_run, tmp_path, preset):
    run_dir, _ = sft_run
    config = load_config(RLConfig, None, rl_overrides(
        run_dir, tmp_path, f"algorithm={preset}", "steps=3", "prompts_per_step=4", "samples_per_prompt=4",
        "eval_before=false", "eval.problems=4", "critic.warmup_steps=1"))
    train_rl(config, progress=False)
    steps = read_jsonl(tmp_path / "metrics.jsonl")
    assert len(steps) == 3
    trained = [r for r in steps if "policy_loss" in r]
    assert trained, "the policy never updated"
    for r in trained:
        for key in ("policy_loss", "entropy", "grad_norm", "clip_ratio/region_mean", "approx_kl"):
            assert r[key] == r[key], key  # not NaN
    if preset == "dapo":
        assert all(r["sampling/groups"] <= 4 for r in steps) and "rewards/overlong_penalty/mean" in steps[0]


def test_cli_rl_takes_a_preset_on_the_command_line(sft_run, tmp_path):
    run_dir, _ = sft_run
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain", "rl", str(CONFIGS / "demo_rl.yaml"), "--no-progress",
         *rl_overrides(run_dir, tmp_path, "algorithm=dapo", "clip_high=0.3", "steps=2", "prompts_per_step=2",
                       "eval_before=false", "eval.problems=2")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = load_config(RLConfig, tmp_path / "config.yaml")
    assert (saved.algorithm, saved.clip_high, saved.dynamic_sampling) == ("dapo", 0.3, True)


def test_cli_demo_quick_writes_summary(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain", "demo", "--quick", "--no-progress", "--run-dir", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"sft", "rl", "wall_s"}
    for stage in ("sft", "rl"):
        assert {"pass@1", "pass@8", "reward"} <= set(summary[stage])
        assert 0.0 <= summary[stage]["pass@1"] <= summary[stage]["pass@8"] <= 1.0
    assert (out / "rl" / "checkpoints" / "final" / "model.safetensors").exists()
    assert "after SFT" in proc.stdout and "after RL" in proc.stdout


def test_cli_rejects_a_misspelled_config_key(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain", "rl", str(CONFIGS / "demo_rl.yaml"), "optim.lrr=1e-3"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "optim.lrr" in proc.stderr and "'lr'" in proc.stderr
