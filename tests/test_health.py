"""The health monitor in real runs: each failure is provoked (a reward that pays for repetition, a huge
learning rate, an injected NaN, an injected gradient spike, a reward with no signal) and the action
its check is configured with must be the one taken."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import RLConfig, SFTConfig, load_config
from posttrain.metrics import read_jsonl
from posttrain.models.gpt import GPT
from posttrain.trainers.rl import train_rl
from posttrain.trainers.run import RunStopped
from posttrain.trainers.sft import train_sft

TINY_SFT = ["steps=12", "batch_size=8", "gpt.n_layer=1", "gpt.n_embd=32", "gpt.n_head=2", "gpt.n_kv_head=1",
            "gpt.max_seq_len=128", "optim.warmup_steps=2", "optim.lr=1e-2", "task.test_size=8", "eval.every=0",
            "eval.problems=4", "eval.samples=2", "eval.ks=[1,2]", "eval.max_new_tokens=16"]


def repetition(prompts, completions, **_):
    """Pays for repetition: the share of characters that already appeared earlier in the completion."""
    return [1 - len(set(c)) / len(c) if c else 0.0 for c in completions]


def nothing(prompts, completions, **_):
    return [0.0] * len(completions)


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> str:
    run_dir = tmp_path_factory.mktemp("sft")
    train_sft(load_config(SFTConfig, None, [f"run_dir={run_dir}", *TINY_SFT]), progress=False)
    return str(run_dir / "checkpoints" / "final")


def rl_config(policy: str, run_dir, *extra: str) -> RLConfig:
    return load_config(RLConfig, None, [
        f"run_dir={run_dir}", f"model={policy}", "algorithm=dr_grpo", "prompts_per_step=4", "samples_per_prompt=4",
        "rewards={'test_health:repetition': 1.0}", "optim.lr=5e-2", "optim.warmup_steps=1",
        "optim.schedule=constant", "sampling.max_new_tokens=24", "eval_before=false", "eval.every=0",
        "eval.problems=4", "eval.samples=2", "eval.ks=[1,2]", "task.test_size=8", "save_every=1",
        "monitor.zero_std_max=1.0", *extra])


def events(run_dir) -> list[dict]:
    return read_jsonl(run_dir / "events.jsonl")


def test_a_reward_paying_for_repetition_collapses_entropy_and_the_run_stops(policy, tmp_path):
    config = rl_config(policy, tmp_path, "steps=20", "monitor.entropy_action=stop", "monitor.length_action=warn")
    with pytest.raises(RunStopped, match="stopped at step"):
        train_rl(config, progress=False)
    found = events(tmp_path)
    assert any(e["check"] == "length" and e["action"] == "warn" for e in found)  # completions grow to the cap
    entropy = [e for e in found if e["check"] == "entropy"]
    assert len(entropy) == 1 and entropy[0]["action"] == "stop"
    assert entropy[0]["values"]["value"] < 0.5 * entropy[0]["values"]["median"]
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert rows[-1]["step"] == entropy[0]["step"] and rows[-1]["reward"] > rows[0]["reward"] + 0.3  # it hacked
    assert found[-1]["check"] == "stop"
    assert not (tmp_path / "checkpoints" / "final").exists()  # no checkpoint of the collapsed policy
    assert f"the last good checkpoint is {tmp_path / 'checkpoints'}/step_{entropy[0]['step'] - 2:06d}" in \
        " ".join(found[-1]["message"].split())


def test_a_huge_learning_rate_blows_up_the_kl_and_rolls_back_with_a_lower_lr(policy, tmp_path):
    config = rl_config(policy, tmp_path, "steps=6", "optim.lr=1.0", "kl_coef=0.04", "monitor.kl_max=0.5",
                       "monitor.kl_action=rollback", "monitor.max_rollbacks=2", "monitor.rollback_lr_factor=0.5",
                       "monitor.entropy_drop=0", "monitor.clipped_ratio_max=1")
    with pytest.raises(RunStopped, match="rollbacks|stop"):
        train_rl(config, progress=False)
    kl = [e for e in events(tmp_path) if e["check"] == "kl"]
    rollbacks = [e for e in events(tmp_path) if e["check"] == "rollback"]
    assert [e["values"]["lr_scale"] for e in rollbacks] == pytest.approx([0.5, 0.25])
    # step 2's rollout shows step 1's update, which checkpoint 1 holds: go back to step 0, before it
    assert (kl[0]["step"], rollbacks[0]["values"]["restored_step"]) == (2, 0)
    assert all(e["values"]["value"] > 0.5 for e in kl) and len(kl) == 3
    assert [e["action"] for e in kl] == ["rollback", "rollback", "stop"]  # past max_rollbacks: stop
    lrs = [r["learning_rate"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r["step"] == 1]
    assert lrs[:2] == pytest.approx([1.0, 0.5])  # step 1 re-run after the first rollback with the lower lr


def scale_training_batch(monkeypatch, at: int, factor: float) -> None:
    """Multiply the log-probs of the ``at``-th training forward (one with targets) by ``factor``."""
    calls = {"n": 0}
    forward = GPT.forward

    def scaled(self, idx, targets=None, **kwargs):
        out = forward(self, idx, targets, **kwargs)
        if targets is not None:
            calls["n"] += 1
            if calls["n"] == at:
                return out * factor
        return out

    monkeypatch.setattr(GPT, "forward", scaled)


@pytest.mark.parametrize("monitor", ["monitor.enabled=true", "monitor.enabled=false"])
def test_an_injected_nan_is_never_applied(tmp_path, monkeypatch, monitor):
    scale_training_batch(monkeypatch, 3, float("nan"))
    train_sft(load_config(SFTConfig, None, [f"run_dir={tmp_path}", *TINY_SFT, "steps=5", "save_every=1",
                                            "keep_last=5", monitor]), progress=False)
    found = events(tmp_path)
    expected = [(3, "nonfinite", "skip_step")] if monitor.endswith("true") else []  # off: silent, still not applied
    assert [(e["step"], e["check"], e["action"]) for e in found] == expected
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["health/skipped_update"] for r in rows] == [0, 0, 1, 0, 0]
    step2, step3 = (load_file(tmp_path / f"checkpoints/step_00000{s}/model.safetensors") for s in (2, 3))
    assert all(step2[k].equal(step3[k]) for k in step2)  # the weights stayed as they were
    final = load_file(tmp_path / "checkpoints/final/model.safetensors")
    assert all(torch.isfinite(v).all() for v in final.values()) and not final["wte.weight"].equal(step3["wte.weight"])


def test_a_gradient_spike_skips_its_update(tmp_path, monkeypatch):
    scale_training_batch(monkeypatch, 9, 1e4)  # the loss, and so every gradient, 10^4 times larger
    train_sft(load_config(SFTConfig, None, [f"run_dir={tmp_path}", *TINY_SFT, "monitor.grad_spike=10"]),
              progress=False)
    found = events(tmp_path)
    assert [(e["step"], e["check"], e["action"]) for e in found] == [(9, "grad_norm", "skip_step")]
    assert found[0]["values"]["value"] > 1e3 * found[0]["values"]["median"]


def test_a_reward_with_no_signal_warns_and_the_run_goes_on(policy, tmp_path):
    config = rl_config(policy, tmp_path, "steps=3", "rewards={'test_health:nothing': 1.0}",
                       "monitor.zero_std_max=0.95")
    train_rl(config, progress=False)
    found = events(tmp_path)
    assert [(e["step"], e["check"], e["action"]) for e in found] == [(1, "zero_std", "warn"), (2, "zero_std", "warn"),
                                                                       (3, "zero_std", "warn")]
    assert "frac_reward_zero_std 1 >= zero_std_max 0.95" in found[0]["message"]
    assert (tmp_path / "checkpoints" / "final").exists()


def test_a_rollback_with_nothing_before_the_failure_stops_with_a_clear_message(policy, tmp_path):
    config = rl_config(policy, tmp_path, "steps=3", "rewards={'test_health:nothing': 1.0}",
                       "monitor.zero_std_action=rollback", "monitor.zero_std_max=0.95")
    with pytest.raises(RunStopped, match="no checkpoint from before step 0 to roll back to"):
        train_rl(config, progress=False)  # step 1 already fails: its start is the step-0 checkpoint itself
