"""Supervised fine-tuning: teacher forcing on the assistant tokens of task conversations.

loss = −Σ_t m_t · log π(x_{t+1} | x_{≤t}) / Σ_t m_t over the batch, where m is the render mask
(1 on assistant text, tool calls and the end token; 0 on the prompt and on tool outputs).
AdamW, warm-up + decay schedule, grad clipping, held-out evaluation every ``eval.every`` steps,
resumable checkpoints every ``save_every`` steps and a final one (``run_dir/checkpoints/final``);
the health monitor checks every update (a non-finite loss or gradient is never applied).
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

import torch

from posttrain.checkpoint import load_policy
from posttrain.config import SFTConfig
from posttrain.engine import Engine
from posttrain.metrics import StepProgress, eval_due
from posttrain.models.gpt import GPT
from posttrain.optim import clip_grad, lr_at, make_optimizer, set_lr
from posttrain.tasks import make_task
from posttrain.tokenizer import Tokenizer
from posttrain.tools import default_registry
from posttrain.trainers.run import Parts, Run, health_gate, nothing_to_do


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


def build_policy(config: SFTConfig, task, resume_from: Path | None = None):
    """The policy ``model.path`` names (built-in checkpoint or HF model), or a fresh built-in GPT with a
    tokenizer trained on the task (read back from the checkpoint when resuming: same words, no training)."""
    if config.model.path:
        return load_policy(config.model, config.lora)
    if resume_from is not None:
        tokenizer = Tokenizer.load(resume_from / "tokenizer.json")
    else:
        tokenizer = Tokenizer.train(task.corpus(random.Random(config.seed)))
    torch.manual_seed(config.seed)
    model = GPT(dataclasses.replace(config.gpt, vocab_size=tokenizer.vocab_size))
    return model, tokenizer


def train_sft(config: SFTConfig, progress: bool = True) -> dict[str, float]:
    """Run SFT as configured (resuming per ``config.resume``); returns the last held-out evaluation's metrics."""
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)  # LoRA init, new token rows, dropout: the same in a restarted run
    run = Run(config, "sft")
    if nothing_to_do(run, print):
        return run.state["extra"].get("last_eval", {})
    task = make_task(config.task)
    model, tokenizer = build_policy(config, task, run.resume_from)
    engine = Engine(model, tokenizer, default_registry())
    optimizer = make_optimizer(model, config.optim)
    parts = Parts(model, tokenizer, optimizers={"policy": optimizer},
                  rngs={"data": random.Random(config.seed + 1)}, extra={"last_eval": {}})
    with StepProgress("sft", config.steps, ("loss", "grad_norm", "eval/pass@1"), progress,
                      initial=run.start_step) as bar:
        run.check_config(bar.print)
        run.open(bar.print)
        step = run.restore(parts) if run.resume_from else 0
        if run.resume_from is None and run.needs_start_checkpoint:
            run.save(0, parts)
        while step < config.steps:
            t0 = time.perf_counter()
            model.train()
            lr = lr_at(step, config.steps, config.optim) * run.monitor.lr_scale
            set_lr(optimizer, lr)
            convs = [task.sft_example(parts.rngs["data"]) for _ in range(config.batch_size)]
            inputs, targets = collate(tokenizer, convs)
            logp = model(inputs, targets)  # (B, T)
            n_tokens = (targets >= 0).sum()
            loss = -logp.sum() / n_tokens
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = clip_grad(model, config.optim.grad_clip)
            events: list = []
            applied = health_gate(run.monitor, step + 1, events)(loss.item(), grad_norm)
            if applied:
                optimizer.step()
            elapsed = time.perf_counter() - t0
            metrics = {
                "step": step + 1,
                "loss": loss.item(),
                "grad_norm": grad_norm,
                "learning_rate": lr,
                "tokens": int(n_tokens),
                "health/skipped_update": float(not applied),
                "timing_s/step": elapsed,
                "throughput/tokens_per_s": int(n_tokens) / max(elapsed, 1e-9),
            }
            action = run.record(events, bar.print)
            if action in ("rollback", "stop"):
                run.write(metrics)  # the step that went wrong stays in the log
                run.stop_if(action, step + 1, bar.print)
                step = run.rollback(step + 1, parts, bar.print)
                continue
            step += 1
            if eval_due(step, config.steps, config.eval.every):
                model.eval()
                parts.extra["last_eval"] = task.evaluate(engine, config.eval)
                metrics.update(parts.extra["last_eval"])
                bar.print_metrics(f"step {step}", parts.extra["last_eval"])
            run.write(metrics)
            bar.update(metrics)
            if run.save_due(step):
                run.save(step, parts)
        run.save(config.steps, parts, final=True)
    run.close()
    return parts.extra["last_eval"]
