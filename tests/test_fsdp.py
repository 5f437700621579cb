"""FSDP2 (distributed.strategy: fsdp2) beyond the built-in GPT: where the shards go, and Hugging Face models with
and without LoRA on two processes equal one process (the built-in GPT's stages: tests/test_distributed.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from test_distributed import TORCHRUN, _run, _same_run  # noqa: E402

from posttrain.checkpoint import load_policy  # noqa: E402
from posttrain.config import LoraConfig, ModelConfig  # noqa: E402
from posttrain.fsdp import blocks  # noqa: E402
from posttrain.models.gpt import GPT, GPTConfig  # noqa: E402
from posttrain.models.heads import ValueModel  # noqa: E402


def test_the_shards_are_the_transformer_blocks(hf_llama_dir):
    gpt = GPT(GPTConfig(vocab_size=50, n_layer=3, n_embd=16, n_head=2, n_kv_head=1))
    assert blocks(gpt) == list(gpt.blocks)
    assert blocks(ValueModel.from_policy(gpt)) != [] and len(blocks(ValueModel.from_policy(gpt))) == 3
    for rank in (0, 4):  # the decoder layers of an HF model, also inside peft's wrappers
        policy, _ = load_policy(ModelConfig(str(hf_llama_dir)), LoraConfig(rank=rank, alpha=8.0))
        layers = [m for name, m in policy.named_modules() if name.endswith(("layers.0", "layers.1"))]
        assert blocks(policy) == layers and len(layers) == policy.hf.config.num_hidden_layers


HF_RL = ["-", "algorithm=grpo", "kl_coef=0.05", "prompts_per_step=2", "samples_per_prompt=3",
         "sampling.max_new_tokens=10", "task.format=hash", "task.test_size=8", "eval_before=false", "eval.every=0",
         "eval.problems=2", "eval.samples=1", "eval.ks=[1]", "eval.max_new_tokens=4", "optim.lr=1e-2"]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this Python")
def test_an_hf_policy_full_and_lora_on_two_processes_equals_one_process(hf_llama_dir, tmp_path):
    """GRPO with a KL term: with LoRA the reference is the policy's own (sharded) weights with the adapter off;
    full fine-tuning shards the decoder layers. Both strategies give the one-process weights and metrics."""
    keys = ("reward", "grad_norm", "policy_loss", "kl")
    for rank in (8, 0):
        args = (*HF_RL, f"model={hf_llama_dir}", f"lora.rank={rank}", "lora.alpha=16")
        one = _run(tmp_path, "rl", f"one{rank}", 1, *args)
        strategies = ("ddp", "fsdp2") if rank else ("fsdp2",)
        for strategy in strategies:
            _same_run(one, _run(tmp_path, "rl", f"{strategy}{rank}", 2, *args, f"distributed.strategy={strategy}"),
                      keys)
