"""On-policy RL with a verifiable reward: one loop for every algorithm preset. A step reads top to bottom:

    rollout → reward → score (old / reference log-probs, values) → advantage → update

* rollout: ``prompts_per_step`` prompts × ``samples_per_prompt`` completions from the engine (prefix
  shared within a group, tool calls executed); with ``dynamic_sampling`` (DAPO) groups whose rewards
  are all equal are replaced by fresh prompts. ``prompt_sampling`` picks the prompts (uniform,
  curriculum or priority, posttrain/prompt_sampling.py) and learns each drawn group's success;
* reward: the weighted reward functions of ``rewards`` (default: the task's verifiable 0/1 reward),
  each isolated from failures, plus DAPO's soft overlong penalty when ``overlong: penalty``;
* score: under no grad, the log-probs of the sampled tokens under the policy that sampled them
  (needed when the batch gets more than one update, or for the KL) and under the frozen reference
  (only when ``kl_coef`` > 0), and the critic's values (``advantage: gae``);
* advantage: by name. Sequence-level estimators (grpo, dr_grpo, rloo, reinforce) see the sequence
  reward r − β·Σ_t KL_t when the KL is in the reward; token-level ones (reinforce_pp, gae) see the
  token rewards −β·KL_t on every token plus r on the last;
* update: ``ppo_epochs`` × ``minibatches`` optimizer steps, each the PPO clipped surrogate on a
  shuffled share of the rows (+ β·KL when the KL is in the loss, − entropy bonus), and for PPO a
  clipped value loss on the critic. With one epoch and one minibatch the ratio is 1 and the update
  is the plain policy gradient −A·∇log π.

Rows whose loss is exactly zero (advantage 0 everywhere, no KL or entropy term) skip the forward and
backward, but still count in the loss normaliser, so skipping changes cost and nothing else.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from functools import partial

import torch
from torch import Tensor

from posttrain.algorithms import advantages as adv_fns
from posttrain.algorithms import losses
from posttrain.checkpoint import load_policy
from posttrain.config import RLConfig
from posttrain.engine import Engine
from posttrain.metrics import StepProgress
from posttrain.models.gpt import token_logprobs
from posttrain.models.heads import ValueModel
from posttrain.monitor import Monitor
from posttrain.optim import clip_grad, lr_at, make_optimizer, set_lr
from posttrain.prompt_sampling import make_sampler
from posttrain.rewards import overlong_penalty
from posttrain.tasks import make_task
from posttrain.tools import default_registry
from posttrain.trainers.reward_model import RewardScorer
from posttrain.trainers.rollout import Scorer, TrainBatch, collect, last_token, layout, rollout_metrics
from posttrain.trainers.run import Parts, Run, end_step, health_gate, nothing_to_do


def train_rl(config: RLConfig, progress: bool = True, before: dict | None = None) -> dict[str, dict[str, float]]:
    """Run RL as configured (resuming per ``config.resume``); returns {"before": eval metrics, "after": eval
    metrics}. ``before``: the initial policy's metrics when the caller has them (with ``eval_before`` off)."""
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    run = Run(config, "rl")
    if nothing_to_do(run, print):
        return {"before": run.state["extra"]["before"], "after": run.state["extra"]["last_eval"]}
    torch.manual_seed(config.seed)
    task = make_task(config.task)
    model, tokenizer = load_policy(config.model, config.lora)
    learned = "reward_model" in config.rewards
    sources = {"reward_model": RewardScorer.from_config(config.reward_model, tokenizer)} if learned else {}
    scorer = Scorer(task, config.rewards, config.reward_timeout, config.reward_fallback, sources)
    reference = model.reference() if config.kl_coef > 0 else None  # LoRA: the same weights, adapter off
    critic = ValueModel.from_policy(model) if config.advantage == "gae" else None
    engine = Engine(model, tokenizer, default_registry())
    sampler = make_sampler(config.prompt_sampling, task)
    critic_optim = dataclasses.replace(config.optim, lr=config.critic.lr)
    parts = Parts(model, tokenizer, optimizers={"policy": make_optimizer(model, config.optim)},
                  rngs={"prompts": random.Random(config.seed)},
                  extra={"kl_coef": config.kl_coef, "before": before or {}, "last_eval": before or {},
                         "prompt_sampling": sampler.state_dict()})
    if critic is not None:
        parts.modules["critic"] = critic
        parts.optimizers["critic"] = make_optimizer(critic, critic_optim)
    optimizer, critic_optimizer = parts.optimizers["policy"], parts.optimizers.get("critic")
    reported: set[str] = set()  # reward functions whose first failure was printed
    P, G = config.prompts_per_step, config.samples_per_prompt
    multi_update = config.ppo_epochs * config.minibatches > 1

    with StepProgress("rl", config.steps, ("reward", "kl", "entropy", "grad_norm", "eval/pass@1"), progress,
                      initial=run.start_step) as bar:
        run.check_config(bar.print)
        run.open(bar.print)
        step = run.restore(parts) if run.resume_from else 0
        model.eval()
        if run.resume_from is None:  # a fresh run (a resumed one has these in its checkpoint and logs)
            if config.eval_before:
                parts.extra["before"] = parts.extra["last_eval"] = task.evaluate(engine, config.eval)
                run.write({"step": 0, **parts.extra["before"]})
            if parts.extra["before"]:
                bar.print_metrics("before RL", parts.extra["before"])
            if run.needs_start_checkpoint:
                run.save(0, parts)
        while step < config.steps:
            t0 = time.perf_counter()
            kl_coef = parts.extra["kl_coef"]
            lr = lr_at(step, config.steps, config.optim) * run.monitor.lr_scale
            set_lr(optimizer, lr)
            if critic_optimizer is not None:
                set_lr(critic_optimizer, lr_at(step, config.steps, critic_optim) * run.monitor.lr_scale)

            # 1. rollout: P prompts × G samples (more rounds with dynamic sampling); the sampler's state is the
            # checkpoint's (parts.extra, also after a resume or rollback) and learns every group drawn
            model.eval()
            train_progress = step / config.steps  # p of the curriculum
            sampler.load_state_dict(parts.extra["prompt_sampling"])
            ro = collect(engine, task, scorer, parts.rngs["prompts"], P, G, config.sampling,
                         seed=(config.seed * 1_000_003 + step) * 64, dynamic=config.dynamic_sampling,
                         max_rounds=config.max_sampling_rounds, draw=partial(sampler.draw, progress=train_progress))
            sampler.update(ro.pool_ids, ro.success)
            parts.extra["prompt_sampling"] = sampler.state_dict()
            metrics = {"step": step + 1, **rollout_metrics(ro), **sampler.metrics(train_progress), "learning_rate": lr}
            for name, line in scorer.failures(config.reward_fallback).items():
                if name not in reported:
                    bar.print(f"[yellow]{line}")
                    reported.add(name)
            t_gen = time.perf_counter()
            events = run.monitor.check_rollout(step + 1, metrics)  # lengths, signal (KL below, once scored)
            if len(ro.rewards) == 0:  # dynamic sampling found no group with signal: nothing to learn
                metrics |= {"timing_s/gen": t_gen - t0, "timing_s/step": t_gen - t0}
                step = finish_step(run, parts, task, engine, config, bar, step, metrics, events)
                continue

            # 2. reward: the reward functions (scored in the rollout), plus the soft overlong penalty (DAPO)
            rewards = ro.rewards.clone()  # (B,)
            if config.overlong == "penalty":
                penalty = overlong_penalty(ro.batch.lengths, config.sampling.max_new_tokens,
                                           config.overlong_buffer, config.overlong_factor)  # (B,)
                rewards += penalty
                metrics["rewards/overlong_penalty/mean"] = penalty.mean().item()
            data = layout(ro.batch, tokenizer.pad_id)  # (B, L)
            if config.overlong == "mask":  # truncated completions get no loss (DAPO overlong filtering)
                data.mask *= ro.batch.finished[:, None].to(data.mask.dtype)
            t_reward = time.perf_counter()

            # 3. score: old policy, reference and critic, no grad; the health checks on KL
            old_logp = score(model, data, config.micro_batch) if multi_update or reference is not None else None
            ref_logp = score(reference, data, config.micro_batch) if reference is not None else None
            values = score(critic, data, config.micro_batch) if critic is not None else None
            kl_tok = torch.zeros_like(data.mask)  # (B, L)
            if reference is not None:
                kl_tok = losses.kl(old_logp, ref_logp, config.kl_kind) * data.mask
                metrics["kl"] = losses.token_mean(kl_tok, data.mask).item()
                events += run.monitor.check_rollout(step + 1, {"kl": metrics["kl"]})
            t_score = time.perf_counter()

            # 4. advantage: per token (B, L); sequence-level estimators broadcast over the completion
            beta_r = kl_coef if config.kl_in == "reward" else 0.0
            seq_rewards, token_rewards = kl_shaped_rewards(rewards, kl_tok, data.mask, beta_r)  # (B,), (B, L)
            advantages, returns = estimate_advantages(config, seq_rewards, token_rewards, ro.batch.group_ids,
                                                      data.mask, values)  # (B, L), (B, L) | None
            metrics.update(advantage_metrics(advantages, data.mask, values, returns))

            # 5. update: ppo_epochs × minibatches optimizer steps, each gated by the health checks; an action
            # stronger than warn (before or during the update) stops this batch's updates
            healthy = Monitor.worst(events) in (None, "warn")
            if healthy:
                model.train()
                update_actor = critic is None or step >= config.critic.warmup_steps
                needs_all = (config.kl_in == "loss" and kl_coef > 0) or config.entropy_coef > 0
                live = needs_all | (advantages.abs().sum(-1) > 0)  # (B,) rows whose loss is not 0
                gen = torch.Generator().manual_seed(config.seed * 7919 + step)
                gate = health_gate(run.monitor, step + 1, events)
                critic_gate = health_gate(run.monitor, step + 1, events, spikes=False)
                sums: dict[str, float] = {}
                counts: dict[str, int] = {}
                for rows in minibatch_rows(len(rewards), config.ppo_epochs, config.minibatches, gen):
                    part: dict[str, float] = {}
                    if critic is not None:
                        part |= critic_step(critic, critic_optimizer, data, rows, values, returns, config,
                                            critic_gate)
                    if update_actor and bool(live[rows].any()):
                        part |= policy_step(model, optimizer, data, rows, live, old_logp, ref_logp, advantages,
                                            config, kl_coef, gate)
                    for k, v in part.items():
                        sums[k], counts[k] = sums.get(k, 0.0) + v, counts.get(k, 0) + 1
                    healthy = Monitor.worst(events) in (None, "warn") and all(e.check != "nonfinite" for e in events)
                    if not healthy:
                        break
                metrics.update({k: v / counts[k] for k, v in sums.items()})
                observed_kl = kl_tok.sum(-1).mean().item()
                if config.kl_controller != "fixed" and reference is not None and healthy and math.isfinite(observed_kl):
                    parts.extra["kl_coef"] = losses.update_kl_coef(
                        config.kl_controller, kl_coef, observed_kl, len(rewards), config.kl_target, config.kl_horizon)
            metrics["health/skipped_update"] = float(not healthy)
            t_end = time.perf_counter()

            gen_tokens = int(ro.batch.mask.sum())
            metrics.update({
                "kl_coef": kl_coef,
                "timing_s/gen": t_gen - t0,
                "timing_s/reward": t_reward - t_gen,
                "timing_s/ref": t_score - t_reward,
                "timing_s/update": t_end - t_score,
                "timing_s/step": t_end - t0,
                "throughput/gen_tokens_per_s": gen_tokens / max(t_gen - t0, 1e-9),
            })
            if config.log_samples_every and step % config.log_samples_every == 0:
                log_samples(run, step + 1, ro, rewards, advantages, data.mask, G)
            step = finish_step(run, parts, task, engine, config, bar, step, metrics, events)
    run.close()
    return {"before": parts.extra["before"], "after": parts.extra["last_eval"]}


def finish_step(run: Run, parts: Parts, task, engine: Engine, config: RLConfig, bar, step: int, metrics: dict,
                events: list) -> int:
    """Act on the step's health events, evaluate when due, log, checkpoint; returns the next step index
    (after a rollback: the restored checkpoint's)."""
    def evaluate() -> dict:
        parts.model.eval()
        return task.evaluate(engine, config.eval)

    return end_step(run, parts, bar, step, metrics, events, evaluate, config.eval.every)


def log_samples(run: Run, step: int, ro, rewards: Tensor, advantages: Tensor, mask: Tensor, group_size: int) -> None:
    """The first completion of every group to samples.jsonl: prompt, completion, reward, its advantage
    (mean over its tokens) and each reward function's value, so reward hacking shows."""
    per_row = (advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
    for i in range(0, len(rewards), group_size):
        run.sample({"step": step, "prompt": ro.convs[i // group_size]["messages"][0]["content"],
                    "completion": ro.texts[i], "reward": rewards[i].item(), "advantage": per_row[i].item(),
                    "rewards": ro.breakdown[i]})


def kl_shaped_rewards(rewards: Tensor, kl_tok: Tensor, mask: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """The task reward with the KL penalty folded in (RLHF's KL-in-reward), in both shapes:

    sequence (B,):  r − β·Σ_t KL_t                                  (RLOO, Ahmadian et al. 2024)
    token (B, L):   −β·KL_t on every valid token, + r on the last one (PPO, Ouyang et al. 2022)

    ``kl_tok`` (B, L) is the per-token KL estimate, 0 off the mask; β = 0 gives the plain reward.
    """
    seq = rewards - beta * kl_tok.sum(-1)  # (B,)
    tok = -beta * kl_tok + rewards[:, None] * last_token(mask)  # (B, L)
    return seq, tok


def estimate_advantages(config: RLConfig, seq_rewards: Tensor, token_rewards: Tensor, group_ids: Tensor,
                        mask: Tensor, values: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Advantages (B, L) from the estimator named by ``config.advantage``, and returns (B, L) for the critic
    (GAE only). Sequence-level estimators give one A per completion, broadcast over its valid tokens."""
    if config.advantage == "gae":
        return adv_fns.gae(token_rewards, values, mask, config.gamma, config.lam)
    if config.advantage == "reinforce_pp":
        return adv_fns.reinforce_pp(token_rewards, mask, config.gamma), None
    kwargs = {"scale": config.adv_scale} if config.advantage == "grpo" else {}
    per_seq = adv_fns.ADVANTAGES[config.advantage](seq_rewards, group_ids, **kwargs)  # (B,)
    return per_seq[:, None] * mask, None


def advantage_metrics(advantages: Tensor, mask: Tensor, values: Tensor | None, returns: Tensor | None) -> dict:
    """Masked mean/std of the advantages (and the critic's values and returns, for PPO)."""
    def stats(name: str, x: Tensor) -> dict:
        n = mask.sum().clamp(min=1)
        mean = (x * mask).sum() / n
        std = (((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)).sqrt()
        return {f"{name}/mean": mean.item(), f"{name}/std": std.item()}

    out = stats("advantages", advantages)
    if values is not None:
        out |= stats("values", values) | stats("returns", returns)
    return out


@torch.no_grad()
def score(model: torch.nn.Module, data: TrainBatch, micro_batch: int) -> Tensor:
    """Per-token log-probs of the targets (a policy) or values (a critic), (B, L), in micro-batches."""
    was_training = model.training
    model.eval()
    out = torch.zeros_like(data.mask)  # (B, L)
    for rows in torch.arange(len(data.mask)).split(micro_batch):
        inputs, targets, _, w = data.take(rows)
        out[rows, :w] = model(inputs) if isinstance(model, ValueModel) else model(inputs, targets)
    model.train(was_training)
    return out * data.mask


def minibatch_rows(n: int, epochs: int, minibatches: int, gen: torch.Generator):
    """Row indices of each optimizer step: ``epochs`` shuffles of range(n), each cut into ``minibatches``
    (fewer when there are fewer rows than minibatches: no empty step)."""
    for _ in range(epochs):
        yield from (rows for rows in torch.randperm(n, generator=gen).tensor_split(minibatches) if len(rows))


def _share(mask: Tensor, agg: str) -> Tensor:
    """A micro-batch's share of the loss normaliser: its tokens for token-mean, its rows otherwise."""
    return mask.sum() if agg == "token-mean" else torch.tensor(float(mask.shape[0]))


def policy_step(model, optimizer, data: TrainBatch, rows: Tensor, live: Tensor, old_logp: Tensor | None,
                ref_logp: Tensor | None, advantages: Tensor, config: RLConfig, kl_coef: float, gate=None) -> dict:
    """One optimizer step of the policy on minibatch ``rows`` (only its ``live`` rows run).

    Loss = policy_loss (+ β·KL to the reference when ``kl_in`` is loss) − entropy_coef·entropy, each
    aggregated with ``loss_agg`` over the whole minibatch: micro-batch losses are weighted by their
    share of its tokens (token-mean) or rows (other modes), so the gradient equals the full batch's.
    ``gate(loss, grad_norm, entropy) -> bool`` (the health checks) decides whether the step is applied.
    """
    total = _share(data.mask[rows], config.loss_agg)
    max_len = config.sampling.max_new_tokens
    kl_in_loss = config.kl_in == "loss" and ref_logp is not None
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    total_loss = 0.0
    for micro in rows[live[rows]].split(config.micro_batch):
        inputs, targets, m, w = data.take(micro)  # (r, w)
        logits = model(inputs)  # (r, w, V)
        logp = token_logprobs(logits, targets)  # (r, w)
        old = old_logp[micro, :w] if old_logp is not None else logp.detach()
        loss, stats = losses.policy_loss(
            logp, old, advantages[micro, :w], m, config.clip_low, config.clip_high,
            dual_clip=config.dual_clip or None, agg=config.loss_agg, max_len=max_len, ratio_level=config.ratio_level,
        )
        stats["policy_loss"] = loss.detach()
        if kl_in_loss:
            kl = losses.kl(logp, ref_logp[micro, :w], config.kl_kind)  # (r, w)
            loss = loss + kl_coef * losses.aggregate(kl, m, config.loss_agg, max_len)
        entropy = losses.entropy_from_logits(logits if config.entropy_coef > 0 else logits.detach())  # (r, w)
        if config.entropy_coef > 0:
            loss = loss - config.entropy_coef * losses.aggregate(entropy, m, config.loss_agg, max_len)
        stats["entropy"] = losses.token_mean(entropy.detach(), m)
        weight = _share(m, config.loss_agg) / total
        (loss * weight).backward()
        total_loss += float(loss.detach()) * float(weight)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + float(v) * float(weight)
    grad_norm = clip_grad(model, config.optim.grad_clip)
    # sums are over live rows weighted by their share of the minibatch: the loss is already the full
    # minibatch's (other rows add 0); diagnostics are rescaled to means over the live rows
    live_share = float(_share(data.mask[rows[live[rows]]], config.loss_agg) / total)
    stats = {k: v if k == "policy_loss" else v / max(live_share, 1e-12) for k, v in sums.items()}
    if gate is None or gate(total_loss, grad_norm, stats.get("entropy")):
        optimizer.step()
    return stats | {"grad_norm": grad_norm}


def critic_step(critic: ValueModel, optimizer, data: TrainBatch, rows: Tensor, old_values: Tensor,
                returns: Tensor, config: RLConfig, gate=None) -> dict:
    """One optimizer step of the critic on minibatch ``rows``: clipped value loss (PPO2) against the GAE
    returns, aggregated like the policy loss; ``gate`` as in :func:`policy_step`."""
    total = _share(data.mask[rows], config.loss_agg)
    optimizer.zero_grad(set_to_none=True)
    sums = {"value_loss": 0.0, "vf_clipfrac": 0.0}
    for micro in rows.split(config.micro_batch):
        inputs, _, m, w = data.take(micro)
        loss, stats = losses.value_loss(critic(inputs), old_values[micro, :w], returns[micro, :w], m,
                                        config.critic.value_clip or None, config.loss_agg,
                                        config.sampling.max_new_tokens)
        weight = _share(m, config.loss_agg) / total
        (loss * weight).backward()
        sums["value_loss"] += float(loss.detach()) * float(weight)
        sums["vf_clipfrac"] += float(stats["vf_clipfrac"]) * float(weight)
    sums["critic/grad_norm"] = clip_grad(critic, config.optim.grad_clip)
    if gate is None or gate(sums["value_loss"], sums["critic/grad_norm"]):
        optimizer.step()
    return sums
