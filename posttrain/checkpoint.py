"""Checkpoints: a directory per save, written to a temporary name and renamed into place.

Layout of ``checkpoints/step_000120/``: ``model.safetensors`` (weights), ``model.json`` (the
built-in GPT's config), ``tokenizer.json``, and ``trainer_state.json`` (step and anything else the
trainer wants back). The rename is atomic, so a run killed mid-save leaves the previous
checkpoint intact and never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from posttrain.models.gpt import GPT, GPTConfig
from posttrain.tokenizer import Tokenizer


def save_checkpoint(path: str | Path, model: GPT, tokenizer: Tokenizer, state: dict | None = None) -> Path:
    """Write model, tokenizer and ``state`` to ``path`` atomically; returns ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, tmp / "model.safetensors")
    (tmp / "model.json").write_text(json.dumps(model.config_dict(), indent=1))
    tokenizer.save(tmp / "tokenizer.json")
    (tmp / "trainer_state.json").write_text(json.dumps(state or {}, indent=1))
    if path.exists():
        old = path.with_name(path.name + ".old")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer, dict]:
    """Read a checkpoint dir → (model, tokenizer, trainer state)."""
    path = Path(path)
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"no checkpoint at {path} (expected {path / 'model.safetensors'})")
    config = GPTConfig(**json.loads((path / "model.json").read_text()))
    model = GPT(config)
    model.load_state_dict(load_file(path / "model.safetensors"))
    state_file = path / "trainer_state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    return model.to(device), Tokenizer.load(path / "tokenizer.json"), state
