"""The Python API in TRL's shape: GRPOTrainer, SFTTrainer, DPOTrainer, RewardTrainer over objects."""

from __future__ import annotations

import pytest

from posttrain.config import ConfigError
from posttrain.metrics import read_jsonl

ROWS = [{"prompt": f"What is {a}+{b}?", "answer": str(a + b), "level": a % 3} for a, b in
        [(1, 2), (3, 4), (5, 6), (7, 8), (9, 1), (2, 2)]]
SMALL = {"steps": 2, "prompts_per_step": 2, "samples_per_prompt": 2, "sampling.max_new_tokens": 4, "threads": 2,
         "eval_before": False, "eval.problems": 1, "eval.samples": 1, "eval.ks": [1], "eval.max_new_tokens": 2,
         "log_samples_every": 1}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from posttrain.models.tiny_llama import make_tiny_llama

    texts = [r["prompt"] + " " + r["answer"] for r in ROWS] * 20
    return make_tiny_llama(tmp_path_factory.mktemp("llama"), texts, vocab_size=300, hidden_size=32)


def test_grpo_trainer_takes_a_list_of_dicts_and_callable_rewards_like_trl(tmp_path, llama_dir):
    from posttrain import GRPOTrainer

    seen = []

    def level_bonus(completions, level, trainer_state, **kwargs):  # a closure: runs in this process
        seen.append(trainer_state.global_step)
        return [x / 2 for x in level]

    trainer = GRPOTrainer(model=str(llama_dir), reward_funcs=[level_bonus, "numeric_match"], reward_weights=[1.0, 0.5],
                          train_dataset=ROWS[:4], eval_dataset=ROWS[4:], args={**SMALL, "run_dir": str(tmp_path / "r")})
    assert trainer.config.rewards == {"api:level_bonus": 1.0, "numeric_match": 0.5}
    assert trainer.config.task.name == "dataset" and trainer.config.algorithm == "grpo"
    result = trainer.train(progress=False)
    assert "eval/pass@1" in result["after"]
    level = {r["prompt"]: r["level"] for r in ROWS}
    samples = read_jsonl(tmp_path / "r" / "samples.jsonl")
    assert samples and all(s["rewards"]["level_bonus"] == level[s["prompt"]] / 2 for s in samples)
    assert sorted(set(seen)) == [0, 1]
    out = trainer.save_model(tmp_path / "model")
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()


def test_grpo_trainer_takes_an_hf_model_object_and_a_datasets_dataset(tmp_path, llama_dir):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain import GRPOTrainer

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    trainer = GRPOTrainer(model=model, processing_class=AutoTokenizer.from_pretrained(llama_dir),
                          reward_funcs="numeric_match", train_dataset=Dataset.from_list(ROWS),
                          args={**SMALL, "run_dir": str(tmp_path / "r"), "task.test_size": 2})
    trainer.train(progress=False)
    assert (tmp_path / "r" / "start_model" / "config.json").exists()
    assert len(read_jsonl(tmp_path / "r" / "data" / "train.jsonl")) == 6
    assert [m["step"] for m in read_jsonl(tmp_path / "r" / "metrics.jsonl") if "reward" in m] == [1, 2]


def test_an_hf_sequence_classifier_is_a_reward_function_as_in_trl(tmp_path, llama_dir):
    """A model path as a reward (TRL's RewardTrainer output): it scores each row at its last real token, the
    same alone or padded in a batch, and GRPO trains on its scores."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from posttrain import GRPOTrainer
    from posttrain.trainers.reward_model import RewardScorer, load_reward_model

    config = LlamaConfig.from_pretrained(llama_dir, num_labels=1)
    torch.manual_seed(0)
    rm_dir = tmp_path / "rm"
    LlamaForSequenceClassification(config).save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(rm_dir)
    scorer = RewardScorer(*load_reward_model(rm_dir))
    prompts, replies = [r["prompt"] for r in ROWS[:3]], ["3", "the answer is 7", "11 11 11 11"]
    batch = scorer.score(prompts, replies)  # (3,), rows of different lengths, right-padded
    alone = torch.cat([scorer.score([p], [c]) for p, c in zip(prompts, replies, strict=True)])
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-5)
    assert batch.std() > 0

    trainer = GRPOTrainer(model=str(llama_dir), reward_funcs=[str(rm_dir)], train_dataset=ROWS,
                          args={**SMALL, "run_dir": str(tmp_path / "r"), "steps": 1})
    assert trainer.config.rewards == {"reward_model": 1.0} and trainer.config.reward_model.path == str(rm_dir)
    trainer.train(progress=False)
    metrics = [m for m in read_jsonl(tmp_path / "r" / "metrics.jsonl") if "reward" in m]
    assert metrics[0]["rewards/reward_model/failures"] == 0 and metrics[0]["rewards/reward_model/std"] > 0


def test_a_sequence_classifier_with_several_labels_is_not_a_reward_model(tmp_path, llama_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from posttrain.trainers.reward_model import load_reward_model

    LlamaForSequenceClassification(LlamaConfig.from_pretrained(llama_dir, num_labels=3)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="a sequence classifier with 3 labels; a reward model has one"):
        load_reward_model(tmp_path)


def test_bad_arguments_are_clear_errors(tmp_path, llama_dir):
    from posttrain import GRPOTrainer

    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr' \(did you mean 'lr'\?\)"):
        GRPOTrainer(model=str(llama_dir), reward_funcs="numeric_match", train_dataset=ROWS,
                    args={"run_dir": str(tmp_path / "a"), "optim.lrr": 1e-3})
    with pytest.raises(ConfigError, match="2 weights for 1 reward functions"):
        GRPOTrainer(model=str(llama_dir), reward_funcs="numeric_match", reward_weights=[1, 2], train_dataset=ROWS,
                    args={"run_dir": str(tmp_path / "b")})
    with pytest.raises(ConfigError, match="no training data"):
        GRPOTrainer(model=str(llama_dir), reward_funcs="numeric_match", args={"run_dir": str(tmp_path / "c")})
    with pytest.raises(TypeError, match="train_dataset row 1"):
        GRPOTrainer(model=str(llama_dir), reward_funcs="numeric_match", train_dataset=[ROWS[0], {"prompt": {1, 2}}],
                    args={"run_dir": str(tmp_path / "d")})


def test_sft_dpo_and_reward_trainers_run_on_objects(tmp_path, llama_dir):
    from posttrain import DPOTrainer, RewardTrainer, SFTTrainer

    chats = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}]}
             for r in ROWS]
    sft = SFTTrainer(model=str(llama_dir), train_dataset=chats,
                     args={"run_dir": str(tmp_path / "sft"), "steps": 2, "batch_size": 2, "threads": 2})
    sft.train(progress=False)
    assert [m["step"] for m in read_jsonl(tmp_path / "sft" / "metrics.jsonl") if "loss" in m] == [1, 2]
    pairs = [{"prompt": r["prompt"], "chosen": r["answer"], "rejected": str(int(r["answer"]) + 1)} for r in ROWS]
    small = {"steps": 2, "batch_size": 2, "threads": 2}
    DPOTrainer(model=str(llama_dir), train_dataset=pairs[:4], eval_dataset=pairs[4:],
               args={**small, "run_dir": str(tmp_path / "dpo")}).train(progress=False)
    assert len([m for m in read_jsonl(tmp_path / "dpo" / "metrics.jsonl") if "loss" in m]) == 2
    RewardTrainer(model=str(llama_dir), train_dataset=pairs[:4], eval_dataset=pairs[4:],
                  args={**small, "run_dir": str(tmp_path / "rm")}).train(progress=False)
    assert len([m for m in read_jsonl(tmp_path / "rm" / "metrics.jsonl") if "loss" in m]) == 2


def test_a_script_without_a_main_guard_runs_once_with_rewards_in_worker_processes(tmp_path, llama_dir):
    """A TRL-style script (no `if __name__ == "__main__":`) whose built-in reward runs in the worker pool: the
    spawned workers must not run the script again."""
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(
        "from posttrain import GRPOTrainer\n"
        "print('script body ran', flush=True)\n"
        f"rows = {ROWS!r}\n"
        f"trainer = GRPOTrainer(model={str(llama_dir)!r}, reward_funcs='numeric_match', train_dataset=rows,\n"
        f"                      args={{**{SMALL!r}, 'run_dir': 'run', 'reward_workers': 2, 'eval.every': 0}})\n"
        "trainer.train(progress=False)\n")
    import os
    from pathlib import Path

    import posttrain

    env = {**os.environ, "PYTHONPATH": str(Path(posttrain.__file__).parents[1])}  # this checkout's posttrain
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("script body ran") == 1
    assert len([m for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "reward" in m]) == 2
