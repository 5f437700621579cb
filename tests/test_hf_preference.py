"""Preference learning on a Hugging Face model: a tiny random Llama with a local tokenizer (no network)
goes through the reward head under padding, reward-model training (full and LoRA) and reloading, DPO
with LoRA (reference = adapter off), and GRPO rewarded by the trained reward model."""

from __future__ import annotations

import math
import random

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from posttrain.checkpoint import load_policy  # noqa: E402
from posttrain.config import LoraConfig, ModelConfig, RLConfig, load_config  # noqa: E402
from posttrain.metrics import read_jsonl  # noqa: E402
from posttrain.models.heads import RewardModel  # noqa: E402
from posttrain.models.tiny_llama import make_tiny_llama  # noqa: E402
from posttrain.preference_config import DPOConfig, PreferenceDataConfig, RMConfig  # noqa: E402
from posttrain.tasks.arithmetic import ArithmeticTask  # noqa: E402
from posttrain.trainers.dpo import train_dpo  # noqa: E402
from posttrain.trainers.pairs import make_pairs  # noqa: E402
from posttrain.trainers.reward_model import (  # noqa: E402
    RewardScorer,
    load_reward_model,
    pair_metrics,
    train_reward_model,
)
from posttrain.trainers.rl import train_rl  # noqa: E402

DATA = ["data.format=hash", "data.train_size=64", "data.test_size=16"]  # plain-text replies, small


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    texts = ArithmeticTask(test_size=8).corpus(random.Random(0), n=300)
    return make_tiny_llama(tmp_path_factory.mktemp("llama"), texts, vocab_size=400)


def rm_config(llama_dir, run_dir, *extra: str) -> RMConfig:
    return load_config(RMConfig, None, [
        f"model={llama_dir}", f"run_dir={run_dir}", *DATA, "steps=30", "batch_size=16", "micro_batch=16",
        "threads=1", "optim.lr=3e-3", "optim.warmup_steps=2", "eval_every=15", *extra])


@pytest.fixture(scope="module")
def trained_rm(llama_dir, tmp_path_factory):
    """(run dir, the last held-out metrics): 30 steps of full fine-tuning."""
    run_dir = tmp_path_factory.mktemp("rm")
    last_eval = train_reward_model(rm_config(llama_dir, run_dir), progress=False)
    return run_dir, last_eval


def held_out_scores(scorer: RewardScorer) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen (N,), r_rejected (N,)) of the run's held-out pairs (DATA's), scored by ``scorer``."""
    _, test = make_pairs(PreferenceDataConfig(format="hash", train_size=1, test_size=16))
    prompts = [{"messages": p.prompt} for p in test]
    return scorer.score(prompts, [p.chosen for p in test]), scorer.score(prompts, [p.rejected for p in test])


def padded(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` padded to one width (every row gets at least two pads) on the left or the right."""
    width = max(map(len, rows)) + 2
    ids = torch.full((len(rows), width), pad_id)  # (B, T)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row), True
    return ids, mask


def test_hf_reward_head_scores_are_the_same_under_left_and_right_padding(llama_dir):
    policy, tok = load_policy(ModelConfig(str(llama_dir)), LoraConfig())
    model = RewardModel.from_policy(policy).eval()
    torch.manual_seed(1)
    torch.nn.init.normal_(model.head.weight)
    rows = [tok.encode("Ann has 3 apples"), tok.encode("Ben sells 12 pens to Cara and"), tok.encode("7")]
    with torch.no_grad():
        alone = torch.cat([model(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.bool)) for r in rows])
        right, left = (model(*padded(rows, tok.pad_id, left=side)) for side in (False, True))
        last = policy.hidden_states(torch.tensor([rows[1]]))[0, -1]  # (C,)
        by_hand = model.head(last).item()
    torch.testing.assert_close(right, alone, rtol=0, atol=1e-4)
    torch.testing.assert_close(left, alone, rtol=0, atol=1e-4)
    assert alone[1].item() == pytest.approx(by_hand, abs=1e-5)
    assert len({round(s, 4) for s in alone.tolist()}) == 3  # the rows really score differently


def test_reward_model_on_an_hf_model_learns_and_reloads(trained_rm):
    run_dir, last_eval = trained_rm
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # the head starts at 0: every pair ties
    assert sum(r["loss"] for r in rows[-5:]) < 0.8 * sum(r["loss"] for r in rows[:5])
    assert last_eval["eval/accuracy"] > 0.5 and last_eval == {k: v for k, v in rows[-1].items() if k in last_eval}
    final = run_dir / "checkpoints" / "final"
    assert (final / "reward_head.safetensors").exists() and (final / "config.json").exists()

    model, tok = load_reward_model(final)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    # the reloaded model, scoring the held-out replies through RewardScorer, reproduces the trained
    # model's held-out accuracy, margin and score statistics
    reloaded = pair_metrics(*held_out_scores(RewardScorer(model, tok)), prefix="eval/")
    assert reloaded == pytest.approx({k: last_eval[k] for k in reloaded}, abs=1e-4)


def test_reward_model_with_lora_saves_a_checkpoint_that_loads(llama_dir, tmp_path):
    config = rm_config(llama_dir, tmp_path, "lora.rank=8", "lora.alpha=16", "steps=4", "eval_every=0")
    last_eval = train_reward_model(config, progress=False)
    final = tmp_path / "checkpoints" / "final"
    assert (final / "adapter" / "adapter_model.safetensors").exists()
    reloaded = pair_metrics(*held_out_scores(RewardScorer(*load_reward_model(final))), prefix="eval/")
    assert reloaded == pytest.approx({k: last_eval[k] for k in reloaded}, abs=1e-4)  # the merged adapter, as trained
    assert reloaded["eval/margin"] != 0  # the head and adapter did train


def dpo_config(llama_dir, run_dir, *extra: str) -> DPOConfig:
    return load_config(DPOConfig, None, [
        f"model={llama_dir}", "lora.rank=8", "lora.alpha=16", f"run_dir={run_dir}", *DATA, "steps=6",
        "batch_size=8", "micro_batch=8", "threads=1", "beta=0.5", "optim.lr=1e-2", "optim.warmup_steps=0",
        "eval.every=3", *extra])


@pytest.fixture(scope="module")
def dpo_run(llama_dir, tmp_path_factory):
    """(run dir, train_dpo's result): 6 steps, the reference being the adapter off."""
    run_dir = tmp_path_factory.mktemp("dpo")
    return run_dir, train_dpo(dpo_config(llama_dir, run_dir), progress=False)


def step_rows(run_dir) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["step"] > 0]


def test_dpo_with_lora_on_an_hf_model_separates_the_pairs(dpo_run):
    run_dir, result = dpo_run
    rows = step_rows(run_dir)
    before, after = result["before"], result["after"]
    assert before["eval/rewards/margins"] == 0.0 and before["eval/rewards/accuracies"] == 0.0  # π = π_ref: ties
    assert rows[0]["rewards/margins"] == 0.0 and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert all(r["rewards/margins"] > 0 for r in rows[1:]) and rows[-1]["loss"] < rows[0]["loss"]
    assert after["eval/rewards/margins"] > 0 and after["eval/rewards/accuracies"] > 0.5
    assert (run_dir / "checkpoints" / "final" / "adapter" / "adapter_model.safetensors").exists()


def test_dpo_with_a_precomputed_reference_takes_the_same_steps(llama_dir, dpo_run, tmp_path):
    train_dpo(dpo_config(llama_dir, tmp_path, "precompute_ref=true", "steps=2", "eval.every=0"), progress=False)
    rows, live = step_rows(tmp_path), step_rows(dpo_run[0])[:2]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and rows[0]["rewards/margins"] == 0.0
    # step 2 follows one update at the same (first) learning rate, so it matches the live-reference run
    for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert rows[1][key] == pytest.approx(live[1][key], abs=1e-4), key


def test_grpo_on_an_hf_model_is_rewarded_by_the_trained_reward_model(llama_dir, trained_rm, tmp_path):
    rm_final = trained_rm[0] / "checkpoints" / "final"
    config = load_config(RLConfig, None, [
        f"model={llama_dir}", f"reward_model.path={rm_final}", f"run_dir={tmp_path}", "algorithm=grpo",
        "task.format=hash", "steps=2", "prompts_per_step=2", "samples_per_prompt=3", "threads=1",
        "sampling.max_new_tokens=12", "eval_before=false", "eval.every=0", "eval.problems=2", "eval.samples=1",
        "eval.ks=[1]", "eval.max_new_tokens=4"])
    assert config.rewards == {"reward_model": 1.0}
    train_rl(config, progress=False)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["rewards/reward_model/mean"]) for r in rows)
    # the policy shares the reward model's vocabulary, so the sampled ids are scored as they are (a text
    # round trip through the tokenizer need not give back the same ids): the logged rewards are its scores
    samples = read_jsonl(tmp_path / "samples.jsonl")
    assert len(samples) == 2 and all(math.isfinite(s["reward"]) for s in samples)
    scorer = RewardScorer(*load_reward_model(rm_final), policy_tokenizer=load_reward_model(rm_final)[1])
    assert scorer.same_vocab
