"""Supervised fine-tuning: teacher forcing on the assistant tokens of task conversations.

loss = −Σ_t m_t · log π(x_{t+1} | x_{≤t}) / Σ_t m_t over the batch, where m is the render mask
(1 on assistant text, tool calls and the end token; 0 on the prompt and on tool outputs).
AdamW, warm-up + decay schedule, grad clipping, held-out evaluation every ``eval.every`` steps,
a final checkpoint in ``run_dir/checkpoints/final``.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

import torch

from posttrain.checkpoint import load_policy, save_checkpoint
from posttrain.config import SFTConfig, save_config
from posttrain.engine import Engine
from posttrain.metrics import JsonlWriter, StepProgress, eval_due
from posttrain.models.gpt import GPT
from posttrain.optim import clip_grad, lr_at, make_optimizer, set_lr
from posttrain.tasks import make_task
from posttrain.tokenizer import Tokenizer
from posttrain.tools import default_registry


def collate(tokenizer: Tokenizer, convs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Render and right-pad conversations → (inputs (B, T), targets (B, T)); target −1 = no loss."""
    rendered = [tokenizer.render_conversation(c) for c in convs]
    width = max(len(ids) for ids, _ in rendered) - 1
    inputs = torch.full((len(convs), width), tokenizer.pad_id, dtype=torch.long)
    targets = torch.full((len(convs), width), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(rendered):
        ids_t, mask_t = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
        inputs[i, : len(ids) - 1] = ids_t[:-1]
        targets[i, : len(ids) - 1] = ids_t[1:].masked_fill(~mask_t[1:], -1)
    return inputs, targets


def build_policy(config: SFTConfig, task):
    """The policy ``model.path`` names (built-in checkpoint or HF model), or a fresh built-in GPT with a
    tokenizer trained on the task."""
    if config.model.path:
        return load_policy(config.model, config.lora)
    tokenizer = Tokenizer.train(task.corpus(random.Random(config.seed)))
    torch.manual_seed(config.seed)
    model = GPT(dataclasses.replace(config.gpt, vocab_size=tokenizer.vocab_size))
    return model, tokenizer


def train_sft(config: SFTConfig, progress: bool = True) -> dict[str, float]:
    """Run SFT as configured; returns the final held-out evaluation metrics."""
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    task = make_task(config.task)
    model, tokenizer = build_policy(config, task)
    engine = Engine(model, tokenizer, default_registry())
    optimizer = make_optimizer(model, config.optim)
    data_rng = random.Random(config.seed + 1)
    log = JsonlWriter(run_dir / "metrics.jsonl")
    final: dict[str, float] = {}
    with StepProgress("sft", config.steps, ("loss", "eval/pass@1"), progress) as bar:
        for step in range(config.steps):
            t0 = time.perf_counter()
            model.train()
            lr = lr_at(step, config.steps, config.optim)
            set_lr(optimizer, lr)
            inputs, targets = collate(tokenizer, [task.sft_example(data_rng) for _ in range(config.batch_size)])
            logp = model(inputs, targets)  # (B, T)
            n_tokens = (targets >= 0).sum()
            loss = -logp.sum() / n_tokens
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = clip_grad(model, config.optim.grad_clip)
            optimizer.step()
            metrics = {
                "step": step + 1,
                "loss": loss.item(),
                "grad_norm": grad_norm,
                "learning_rate": lr,
                "tokens": int(n_tokens),
                "timing_s/step": time.perf_counter() - t0,
            }
            if eval_due(step + 1, config.steps, config.eval.every):
                model.eval()
                final = task.evaluate(engine, config.eval)
                metrics.update(final)
                bar.print_metrics(f"step {step + 1}", final)
            log.write(metrics)
            bar.update(metrics)
    log.close()
    save_checkpoint(run_dir / "checkpoints" / "final", model, tokenizer, {"step": config.steps, "stage": "sft"})
    return final
