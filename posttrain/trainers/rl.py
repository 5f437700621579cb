"""On-policy RL with a verifiable reward (GRPO family). One step reads top to bottom:

    rollout → reward → advantage → loss → optimizer step

* rollout: ``prompts_per_step`` prompts × ``samples_per_prompt`` completions from the engine
  (prefix shared within a group, tool calls executed);
* reward: the task's reward of each completion;
* advantage: one per completion from ``algorithms.advantages.ADVANTAGES[algorithm]``
  (grpo: (r − mean_g)/std_g; dr_grpo/reinforce: r − mean_g; rloo: leave-one-out);
  groups whose rewards are all equal carry no signal and, with ``skip_zero_std``, skip the
  forward/backward entirely;
* loss: PPO clipped surrogate on the sampled tokens (tool outputs are masked out), aggregated with
  ``loss_agg``; optionally + kl_coef · KL(π ‖ π_ref) with the k3 estimator against the frozen
  initial policy. One update per batch, so the ratio is 1 and the gradient is the plain policy
  gradient −A·∇log π (nanochat's and DeepSeek's on-policy setting);
* step: AdamW, grad clipping, LR schedule.
"""

from __future__ import annotations

import copy
import random
import time
from pathlib import Path

import torch

from posttrain.algorithms import advantages as adv_fns
from posttrain.algorithms import losses
from posttrain.checkpoint import load_checkpoint, save_checkpoint
from posttrain.config import RLConfig, save_config
from posttrain.engine import Engine, RolloutBatch
from posttrain.metrics import JsonlWriter, StepProgress, eval_due
from posttrain.models.gpt import token_logprobs
from posttrain.optim import clip_grad, lr_at, make_optimizer, set_lr
from posttrain.tasks import make_task
from posttrain.tools import default_registry


def sequences(batch: RolloutBatch, rows: torch.Tensor, pad_id: int):
    """Prompt + completion of ``rows``, right-padded for a forward pass.

    Returns inputs (R, L−1), targets (R, L−1) (−1 outside completions) and mask (R, L−1), which
    is 1 on sampled completion tokens (forced tool outputs stay 0), aligned with the targets.
    """
    full = [batch.prompt_ids[r] + batch.completion_tokens(r) for r in rows.tolist()]
    width = max(len(s) for s in full)
    ids = torch.full((len(full), width), pad_id, dtype=torch.long)
    targets = torch.full((len(full), width - 1), -1, dtype=torch.long)
    mask = torch.zeros(len(full), width - 1)
    for i, r in enumerate(rows.tolist()):
        seq, start, n = full[i], len(batch.prompt_ids[r]), int(batch.lengths[r])
        ids[i, : len(seq)] = torch.tensor(seq)
        targets[i, start - 1 : start - 1 + n] = batch.completion_ids[r, :n]
        mask[i, start - 1 : start - 1 + n] = batch.mask[r, :n]
    return ids[:, :-1], targets, mask


def rollout_metrics(batch: RolloutBatch, rewards: torch.Tensor, zero_std: torch.Tensor) -> dict:
    lengths = batch.lengths.float()
    return {
        "reward": rewards.mean().item(),
        "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
        "frac_reward_zero_std": zero_std.float().mean().item(),
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": (~batch.finished).float().mean().item(),
        "tools/call_frequency": batch.tool_calls / len(rewards),
        "tools/failure_frequency": batch.tool_failures / max(1, batch.tool_calls),
    }


def train_rl(config: RLConfig, progress: bool = True, before: dict | None = None) -> dict[str, dict[str, float]]:
    """Run RL as configured; returns {"before": eval metrics, "after": eval metrics}.

    ``before``: the initial policy's metrics when the caller has them (with ``eval_before`` off).
    """
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    torch.manual_seed(config.seed)
    task = make_task(config.task)
    model, tokenizer, _ = load_checkpoint(config.init_from)
    reference = copy.deepcopy(model).requires_grad_(False) if config.kl_coef > 0 else None
    engine = Engine(model, tokenizer, default_registry())
    optimizer = make_optimizer(model, config.optim)
    advantage_fn = adv_fns.choose(adv_fns.ADVANTAGES, config.algorithm, "algorithm")
    adv_kwargs = {"scale": config.adv_scale} if config.algorithm == "grpo" else {}
    prompt_rng = random.Random(config.seed)
    log, samples_log = JsonlWriter(run_dir / "metrics.jsonl"), JsonlWriter(run_dir / "samples.jsonl")
    P, G = config.prompts_per_step, config.samples_per_prompt

    model.eval()
    if config.eval_before:
        before = task.evaluate(engine, config.eval)
        log.write({"step": 0, **before})
    before = after = before or {}
    with StepProgress("rl", config.steps, ("reward", "eval/pass@1"), progress) as bar:
        if before:
            bar.print_metrics("before RL", before)
        for step in range(config.steps):
            t0 = time.perf_counter()
            lr = lr_at(step, config.steps, config.optim)
            set_lr(optimizer, lr)

            # 1. rollout: P prompts × G samples, prefix shared per group
            model.eval()
            convs = [task.prompt(task.train_problem(prompt_rng)) for _ in range(P)]
            prompts = [tokenizer.render_for_completion(c) for c in convs]
            batch = engine.generate(prompts, G, config.sampling, seed=config.seed * 1_000_003 + step)
            t_gen = time.perf_counter()

            # 2. reward: the task's verifiable reward of every completion
            texts = [tokenizer.decode(batch.completion_tokens(i)) for i in range(P * G)]
            rewards = torch.tensor([task.reward(convs[i // G], texts[i]) for i in range(P * G)])  # (B,)
            t_reward = time.perf_counter()

            # 3. advantage: one scalar per completion; zero-variance groups carry no signal
            advantages = advantage_fn(rewards, batch.group_ids, **adv_kwargs)  # (B,)
            zero_std = adv_fns.group_stats(rewards, batch.group_ids).zero_std  # (B,)
            rows = torch.nonzero(~zero_std if config.skip_zero_std else torch.ones_like(zero_std)).flatten()

            # 4. loss and 5. step (skipped when no group carries signal)
            model.train()
            stats: dict[str, float] = {}
            grad_norm = 0.0
            if len(rows) > 0:
                optimizer.zero_grad(set_to_none=True)
                stats = accumulate_policy_gradient(model, reference, batch, rows, advantages, config, tokenizer.pad_id)
                grad_norm = clip_grad(model, config.optim.grad_clip)
                optimizer.step()
            t_end = time.perf_counter()

            gen_tokens = int(batch.mask.sum())
            metrics = {
                "step": step + 1,
                **rollout_metrics(batch, rewards, zero_std),
                "advantages/mean": advantages.mean().item(),
                "advantages/std": advantages.std().item(),
                **stats,
                "grad_norm": grad_norm,
                "learning_rate": lr,
                "timing_s/gen": t_gen - t0,
                "timing_s/reward": t_reward - t_gen,
                "timing_s/update": t_end - t_reward,
                "timing_s/step": t_end - t0,
                "throughput/gen_tokens_per_s": gen_tokens / max(t_gen - t0, 1e-9),
            }
            if config.log_samples_every and step % config.log_samples_every == 0:
                for i in range(0, P * G, G):  # the first sample of every group
                    samples_log.write({"step": step + 1, "prompt": convs[i // G]["messages"][0]["content"],
                                       "completion": texts[i], "reward": rewards[i].item()})
            if eval_due(step + 1, config.steps, config.eval.every):
                model.eval()
                after = task.evaluate(engine, config.eval)
                metrics.update(after)
                bar.print_metrics(f"step {step + 1}", after)
            log.write(metrics)
            bar.update(metrics)
    log.close()
    samples_log.close()
    save_checkpoint(run_dir / "checkpoints" / "final", model, tokenizer, {"step": config.steps, "stage": "rl"})
    return {"before": before, "after": after}


def accumulate_policy_gradient(model, reference, batch, rows, advantages, config: RLConfig, pad_id: int) -> dict:
    """Backward of the policy loss over ``rows`` in micro-batches; returns mean stats.

    Each micro-batch's loss is weighted by its share of the batch (tokens for token-mean, rows
    otherwise), so the accumulated gradient equals that of one big batch.
    """
    inputs, targets, mask = sequences(batch, rows, pad_id)  # (R, L)
    token_share = config.loss_agg == "token-mean"
    total = mask.sum() if token_share else torch.tensor(float(len(rows)))
    sums: dict[str, float] = {}
    for start in range(0, len(rows), config.micro_batch):
        sl = slice(start, start + config.micro_batch)
        m = mask[sl]  # (r, L)
        logits = model(inputs[sl])  # (r, L, V)
        logp = token_logprobs(logits, targets[sl])  # (r, L)
        adv = advantages[rows[sl]]  # (r,)
        loss, pstats = losses.policy_loss(
            logp, logp.detach(), adv, m, config.clip_low, config.clip_high,
            agg=config.loss_agg, max_len=config.sampling.max_new_tokens,
        )
        if reference is not None:
            with torch.no_grad():
                ref_logp = token_logprobs(reference(inputs[sl]), targets[sl])
            kl = losses.kl(logp, ref_logp, config.kl_kind)
            loss = loss + config.kl_coef * losses.aggregate(kl, m, config.loss_agg, config.sampling.max_new_tokens)
            pstats["kl"] = losses.token_mean(kl.detach(), m)
        weight = (m.sum() if token_share else torch.tensor(float(m.shape[0]))) / total
        (loss * weight).backward()
        with torch.no_grad():
            pstats["entropy"] = losses.token_mean(losses.entropy_from_logits(logits), m)
            pstats["policy_loss"] = loss.detach()
        for k, v in pstats.items():
            sums[k] = sums.get(k, 0.0) + float(v) * float(weight)
    return sums
