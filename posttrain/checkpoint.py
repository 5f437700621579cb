"""Checkpoints: a directory per save, written to a temporary name and renamed into place, and the
loader that turns a path into a policy (built-in GPT or Hugging Face model) and its tokenizer.

A built-in checkpoint (``checkpoints/step_000120/``) holds ``model.safetensors`` (weights),
``model.json`` (the GPT's config) and ``tokenizer.json``; an HF policy's holds what
``save_pretrained`` writes (config.json, model.safetensors, tokenizer files; with LoRA the merged
model plus ``adapter/``), so ``AutoModelForCausalLM.from_pretrained`` reads it directly. Both add
``trainer_state.json`` (step and anything else the trainer wants back). The rename is atomic, so a
run killed mid-save leaves the previous checkpoint intact and never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from posttrain.config import ConfigError, LoraConfig, ModelConfig
from posttrain.models.gpt import GPT, GPTConfig
from posttrain.tokenizer import Tokenizer


def save_checkpoint(path: str | Path, model, tokenizer, state: dict | None = None) -> Path:
    """Write model, tokenizer and ``state`` to ``path`` atomically; returns ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "trainer_state.json").write_text(json.dumps(state or {}, indent=1))
    if path.exists():
        old = path.with_name(path.name + ".old")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    return path


def is_builtin_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "model.json").exists()


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer, dict]:
    """Read a built-in GPT checkpoint dir → (model, tokenizer, trainer state)."""
    path = Path(path)
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"no checkpoint at {path} (expected {path / 'model.safetensors'})")
    config = GPTConfig(**json.loads((path / "model.json").read_text()))
    model = GPT(config)
    model.load_state_dict(load_file(path / "model.safetensors"))
    state_file = path / "trainer_state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    return model.to(device), Tokenizer.load(path / "tokenizer.json"), state


def load_policy(model: ModelConfig, lora: LoraConfig, device: str | torch.device = "cpu"):
    """The policy ``model.path`` names and its tokenizer: a built-in GPT checkpoint, or an HF causal LM
    (a local dir, a hub id or a ``.gguf`` file), with a LoRA adapter when ``lora.rank`` > 0."""
    if model.path is None:
        raise ConfigError("config key 'model.path' must name the policy to load (model=runs/sft/checkpoints/final)")
    if is_builtin_checkpoint(model.path):
        if lora.rank > 0:
            raise ConfigError(f"LoRA (lora.rank={lora.rank}) needs a Hugging Face model; {model.path} is built-in")
        policy, tokenizer, _ = load_checkpoint(model.path, device)
        return policy, tokenizer
    from posttrain.models.hf import load_hf

    return load_hf(model.path, model.dtype, model.tool_tokens, lora, device)
