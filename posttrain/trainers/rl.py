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

Rows made by older weights (``rollout.max_staleness`` K > 0: generation runs ahead of training, see
posttrain/trainers/rl_rollouts.py; or ``rollout.segment_tokens``: parked completions continued later) are trained
with one of two named objectives (``off_policy``), never both (that would correct twice). With π_b the behaviour
policy (the weights that sampled the token: its log-probs come back with every row), π_old the policy at the start
of the step and r_t = π_θ / π_old:

* ``decoupled`` (default; AReaL's decoupled PPO): π_old is recomputed by the trainer, the clipped surrogate is
  taken against it, and each token's term is weighted by w_t = min(π_old / π_b, C) (``is_correction: tis``, C =
  ``is_clip``) or w_t = 1[1/C ≤ π_old / π_b ≤ C] (``icepop``): L = −w_t · min(r_t·A, clip(r_t)·A);
* ``bypass`` (verl's bypass mode): π_old := π_b, no recompute and no extra weight: L = −min(ρ_t·A, clip(ρ_t)·A)
  with ρ_t = π_θ / π_b (the clip bounds the whole off-policy ratio).

Rows whose loss is exactly zero (advantage 0 everywhere, no KL or entropy term) skip the forward and
backward, but still count in the loss normaliser, so skipping changes cost and nothing else.

Scoring and update run in micro-batches of at most ``max_tokens_per_micro_batch`` real tokens, each
packed into a few sequences without padding (:mod:`posttrain.trainers.packing`); the losses see the
same (B, L) tensors as with padded rows. A model that cannot keep packed rows apart (an HF model whose
attention implementation does not) runs them padded, with one notice at the start of the run;
``data/pad_fraction`` is the padding share of the positions the update ran.

The trainer trains the distribution it sampled from: every log-prob, KL and entropy is of
softmax(logits / T) at the sampling temperature T. The sampler's own (behaviour) log-probs are of the
distribution it drew from, after top-k / top-p truncation; ``mismatch/logprob_diff_max`` and
``mismatch/kl`` compare the two on the rows the step already runs, and on every row each
``mismatch_every`` steps (truncation makes them differ by design).

Structure: :func:`setup` builds the models (each in a :class:`ModelEngine`: device, precision,
optimizer), a :class:`~posttrain.trainers.rl_rollouts.Rollouts` gives each step its rollout (made ahead with
``rollout.max_staleness`` > 0, or when the step asks) and :func:`rl_step` learns from it; the resumable values
between steps are an :class:`RLState`. :func:`train_rl` is the driver.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Mapping
from contextlib import closing
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from posttrain.algorithms import losses
from posttrain.checkpoint import load_policy
from posttrain.config import OptimConfig, RLConfig
from posttrain.distributed import World, data_parallel, rank_device, set_threads
from posttrain.evaluation import evaluate_on
from posttrain.metrics import StepProgress
from posttrain.models.heads import ValueModel
from posttrain.monitor import Monitor
from posttrain.optim import lr_at
from posttrain.prompt_sampling import make_sampler
from posttrain.rewards import RewardFailed, check_reward_specs, overlong_penalty
from posttrain.rewards.pool import RewardPool
from posttrain.rollout.base import RolloutBackend, make_backend, sync
from posttrain.tasks import make_task
from posttrain.trainers.checks import Checked, resolve_epochs, task_data
from posttrain.trainers.model_engine import ModelEngine, out_of_memory, resolve_device, resolve_precision
from posttrain.trainers.objectives import Mismatch, PolicyLoss, PolicyObjective, ValueLoss, ValueObjective
from posttrain.trainers.reward_model import RewardScorer, check_reward_checkpoint
from posttrain.trainers.rl_advantages import advantage_metrics, estimate_advantages, kl_shaped_rewards
from posttrain.trainers.rl_rollouts import Rollouts
from posttrain.trainers.rl_state import RLState
from posttrain.trainers.rollout import Rollout, Scorer, rollout_metrics
from posttrain.trainers.run import Parts, Run, end_step, health_gate, nothing_to_do
from posttrain.trainers.train_batch import TrainBatch, layout


@dataclass
class StepOut:
    """What one RL update leaves: its metrics, and per row the reward and advantages (for the samples log)."""

    metrics: dict
    rewards: Tensor  # (B,) on the CPU: the reward functions' total, plus the overlong penalty
    advantages: Tensor  # (B, L) on the CPU
    mask: Tensor  # (B, L) on the CPU


@dataclass
class RLSetup:
    """What an RL run is built from once (models on their device, the task, rewards, prompt sampler); the
    step-to-step values live in :class:`RLState`."""

    config: RLConfig
    task: object
    tokenizer: object
    scorer: Scorer
    sampler: object  # posttrain.prompt_sampling: which prompts a step draws
    rollout: RolloutBackend  # generation (rollout.backend: the local KV-cache engine, Ray workers, vLLM)
    evaluator: RolloutBackend  # evaluation's generation (eval.backend; by default the rollout's own)
    policy: ModelEngine
    objective: PolicyObjective
    reference: ModelEngine | None  # the frozen initial policy (kl_coef > 0)
    critic: ModelEngine | None  # PPO's value model (advantage: gae)
    critic_objective: ValueObjective | None
    critic_optim: OptimConfig  # the critic's schedule (its own peak lr)


def check_inputs(config: RLConfig, reward_model: bool = True, reward_funcs: Mapping[str, Callable] | None = None
                 ) -> Checked:
    """The checks before the model loads (``setup`` and ``posttrain rl --dry-run``): every reward function
    loads (but ``reward_funcs``, given as objects), the task's data loads and has what RL needs, the prompt
    sampler can draw from it, and (with ``reward_model``: False where an earlier pipeline stage writes it)
    reward_model.path is a reward-model checkpoint. ConfigError / DataError on the first that fails."""
    check_reward_specs(name for name in config.rewards if name not in (reward_funcs or {}))
    task = make_task(config.task)
    task.check("rl")
    if reward_model and "reward_model" in config.rewards:
        check_reward_checkpoint(config.reward_model.path)
    sampler = make_sampler(config.prompt_sampling, task)
    epochs = resolve_epochs(config, len(sampler.pool) if hasattr(sampler, "pool") else None,
                            config.prompts_per_step, "prompts")
    names = list(config.rewards or {"task": 1.0})
    summary = (f"data ({task_data(task)}), rewards ({len(names)} function{'s' * (len(names) > 1)}: "
               f"{', '.join(names)})")
    return Checked(summary, task=task, sampler=sampler, epochs=epochs)


def setup(config: RLConfig, reward_funcs: Mapping[str, Callable] | None = None, checked: Checked | None = None,
          world: World | None = None) -> RLSetup:
    """Load the policy on the configured device and precision, and build everything around it, after
    :func:`check_inputs` (a reward, data or sampler it cannot use is an error before any model loads; pass
    its ``checked`` when it ran already). ``reward_funcs``: reward functions given as objects (the Python
    API), by the names ``config.rewards`` weighs them under. ``world``: the data-parallel job it is part of
    (default: one process)."""
    reward_funcs = dict(reward_funcs or {})
    checked = checked or check_inputs(config, reward_funcs=reward_funcs)
    task = checked.task
    world = world or World()
    device = rank_device(resolve_device(config.device), world)
    precision = resolve_precision(config.precision, device, config.model.dtype)
    model, tokenizer = load_policy(config.model, config.lora)
    learned = "reward_model" in config.rewards
    sources = {"reward_model": RewardScorer.from_config(config.reward_model, tokenizer, device)} if learned else {}
    sources |= reward_funcs
    scorer = Scorer(task, config.rewards, config.reward_timeout, config.reward_fallback, sources,
                    config.reward_on_error, config.reward_max_failure_rate, config.steps,
                    pool=RewardPool(config.reward_workers if world.main else 0))  # started and closed by train_rl;
    # under data parallelism rank 0 scores every rollout (posttrain/trainers/rollout.py)
    tokens, strategy = config.max_tokens_per_micro_batch, config.distributed.strategy
    # the reference and the critic are copies of the starting policy: made before FSDP2 shards it
    reference_module = model.reference() if config.kl_coef > 0 else None  # LoRA: the same weights, adapter off
    critic_module = ValueModel.from_policy(model) if config.advantage == "gae" else None
    policy = ModelEngine(model, config.optim, device, precision, config.activation_checkpointing, tokens, world=world,
                         strategy=strategy)
    reference = None
    if reference_module is not None:
        shares = policy if getattr(model, "is_lora", False) else None
        reference = ModelEngine(reference_module, None, device, precision, max_tokens_per_micro_batch=tokens,
                                world=world, strategy=strategy, shares=shares)
    critic = critic_objective = None
    critic_optim = dataclasses.replace(config.optim, lr=config.critic.lr)
    if critic_module is not None:
        critic = ModelEngine(critic_module, critic_optim, device, precision, config.activation_checkpointing, tokens,
                             world=world, strategy=strategy)
        critic_objective = ValueObjective(ValueLoss(config.loss_agg, config.sampling.max_new_tokens,
                                                    config.critic.value_clip or None))
    objective = PolicyObjective(PolicyLoss(
        agg=config.loss_agg, max_len=config.sampling.max_new_tokens, clip_low=config.clip_low,
        clip_high=config.clip_high, dual_clip=config.dual_clip or None, ratio_level=config.ratio_level,
        kl_kind=config.kl_kind, kl_coef=config.kl_coef if config.kl_in == "loss" else 0.0,
        entropy_coef=config.entropy_coef, temperature=config.sampling.temperature))
    # a backend of its own copies the policy (FSDP2: rank 0's whole copy of it; the weights come at the first sync)
    copied = policy.twin if policy.sharded else model
    rollout = make_backend(config.rollout, model if config.rollout.backend == "local" else copied, tokenizer,
                           world.size, precision, world.rank)
    evaluator = rollout
    if config.eval.backend not in (None, config.rollout.backend):
        try:
            evaluator = make_backend(dataclasses.replace(config.rollout, backend=config.eval.backend),
                                     model if config.eval.backend == "local" else copied, tokenizer, world.size,
                                     precision, world.rank)
        except BaseException:
            rollout.close()
            raise
    return RLSetup(config, task, tokenizer, scorer, checked.sampler, rollout, evaluator, policy, objective, reference,
                   critic, critic_objective, critic_optim)


def train_rl(config: RLConfig, progress: bool = True, before: dict | None = None,
             reward_funcs: Mapping[str, Callable] | None = None) -> dict[str, dict[str, float]]:
    """Run RL as configured (resuming per ``config.resume``); returns {"before": eval metrics, "after": eval
    metrics}. ``before``: the initial policy's metrics when the caller has them (with ``eval_before`` off);
    ``reward_funcs``: reward functions given as objects (see :func:`setup`)."""
    set_threads(config.threads)  # under torchrun: shared by the processes on this node
    checked = check_inputs(config, reward_funcs=reward_funcs)  # sets steps when epochs > 0
    if checked.epochs:
        print(f"rl: {checked.epochs}")
    world, _ = data_parallel(config, resolve_device(config.device), checked.summary)
    run = Run(config, "rl", world)
    if nothing_to_do(run, print):
        return {"before": run.state["extra"]["before"], "after": run.state["extra"]["last_eval"]}
    torch.manual_seed(config.seed)
    rl = setup(config, reward_funcs, checked, world)
    state = RLState(kl_coef=config.kl_coef, before=before or {}, last_eval=before or {},
                    prompt_sampling=rl.sampler.state_dict())
    parts = Parts(rl.policy.module, rl.tokenizer, state, engines={"policy": rl.policy},
                  rngs={"prompts": random.Random(config.seed)})
    if rl.critic is not None:
        parts.modules["critic"] = rl.critic.module
        parts.engines["critic"] = rl.critic
    reported: set[str] = set()  # reward functions whose first failure was printed

    rollouts = Rollouts(rl, state, parts.rngs["prompts"])
    parts.queue = rollouts
    with run.preemption, closing(rl.rollout), closing(rl.evaluator), rl.scorer.pool, StepProgress(
            "rl", config.steps, ("reward", "kl", "entropy", "grad_norm", "eval/pass@1"), progress and world.main,
            initial=run.start_step, quiet=not world.main, every=config.log.every) as bar, closing(rollouts):
        # (closed in reverse order: the queue first, then what its jobs use)
        run.check_config(bar.print)
        run.open(bar.print)
        if rl.scorer.placement() is not None:
            bar.print(f"[dim]{rl.scorer.placement()}")
        if rl.policy.packing_problem is not None:
            bar.print(f"[yellow]scoring and updates run on padded rows, not packed: {rl.policy.packing_problem}")
        step = run.resume(parts, bar.print)
        if run.resume_from is None:  # a fresh run (a resumed one has these in its checkpoint and logs)
            if config.eval_before:
                state.before = state.last_eval = evaluate(rl, rollouts)
                run.write({"step": 0, **state.before})
            if state.before:
                bar.print_metrics("before RL", state.before)
            if run.needs_start_checkpoint:
                run.save(0, parts)
        rollouts.start(step)
        while step < config.steps:
            t0 = time.perf_counter()
            lr = lr_at(step, config.steps, config.optim) * run.monitor.lr_scale
            rl.policy.set_lr(lr)
            if rl.critic is not None:
                rl.critic.set_lr(lr_at(step, config.steps, rl.critic_optim) * run.monitor.lr_scale)
            try:  # the rollout: made ahead while earlier steps trained (rollout.max_staleness), or now
                with out_of_memory(step + 1, "generation"):
                    ro, timing = rollouts.next(step)
            except RewardFailed as err:  # past reward_on_error / reward_max_failure_rate: logged like a health stop
                run.stop(step + 1, str(err), bar.print, check="reward", error=RewardFailed)
            for name, line in rl.scorer.failures(config.reward_fallback).items():
                if name not in reported:
                    bar.print(f"[yellow]{line}")
                    reported.add(name)
            metrics = {"step": step + 1, **rollout_metrics(ro), **rl.sampler.metrics(step / config.steps),
                       "learning_rate": lr, **timing}
            events = run.monitor.check_rollout(step + 1, metrics)  # lengths, signal (KL below, once scored)
            if len(ro.rewards):  # else dynamic sampling found no group with signal: nothing to learn
                out = rl_step(rl, state, ro, step, run.monitor, events)
                metrics |= out.metrics | {"throughput/gen_tokens_per_s": float(ro.batch.mask.sum()) /
                                          max(timing["timing_s/gen"], 1e-9)}
                if config.log_samples_every and step % config.log_samples_every == 0:
                    log_samples(run, step + 1, ro, out.rewards, out.advantages, out.mask, config.samples_per_prompt)
            metrics["timing_s/step"] = time.perf_counter() - t0
            if metrics.get("health/skipped_update", 0.0) > 0:  # before the step's checkpoint, which stores the queue
                flush(run, rollouts, step + 1, "skipped update", bar.print, parked=False)
            done = end_step(run, parts, bar, step, metrics, events, partial(evaluate, rl, rollouts), config.eval.every)
            if done <= step:  # a rollback: the rows made ahead (and parked) are of weights that no longer exist
                flush(run, rollouts, done, "rollback", bar.print)
            step = done
    run.close()
    return {"before": state.before, "after": state.last_eval}


def flush(run: Run, rollouts: Rollouts, step: int, why: str, notice, parked: bool = True) -> None:
    """Drop the rollouts made ahead (and with ``parked`` the parked completions), logged when there were any."""
    dropped = rollouts.flush(step, parked)
    if dropped:
        run.logs["events"].write({"step": step, "check": "rollout_queue", "action": "flush",
                                  "values": {"dropped": dropped}, "message": f"{why}: {dropped} queued rollouts "
                                  "dropped"})
        notice(f"[yellow]{why}: {dropped} rollout{'s' * (dropped > 1)} made ahead dropped (made by weights that no "
               "longer exist)")


def evaluate(rl: RLSetup, rollouts: Rollouts | None = None) -> dict:
    """The task's held-out evaluation of the current policy (the problems split over the ranks; the same
    numbers on every rank), after the generation in flight (``rollouts``) finished."""
    if rollouts is not None:
        rollouts.drain()
    sync(rl.evaluator, rl.policy, force=True)  # the policy as it is now
    if rollouts is not None:
        rollouts.synced()
    with rl.policy.gathered():
        rl.policy.module.eval()
        with rl.policy.autocast():
            return evaluate_on(rl.task, rl.evaluator, rl.config.eval, rl.policy.world)


def rl_step(rl: RLSetup, state: RLState, ro: Rollout, step: int, monitor: Monitor, events: list) -> StepOut:
    """One RL update from rollout ``ro``: reward → score → advantage → update. Appends health events to
    ``events`` (an action stronger than warn stops the step's updates) and moves the adaptive KL
    coefficient in ``state``."""
    config, device = rl.config, rl.policy.device
    t0 = time.perf_counter()
    metrics: dict = {"kl_coef": state.kl_coef}  # the β this step uses (the controller moves it after the update)
    rl.objective.config.kl_coef = state.kl_coef if config.kl_in == "loss" else 0.0

    # 1. reward: the reward functions (scored in the rollout), plus the soft overlong penalty (DAPO)
    rewards = ro.rewards.clone().to(device)  # (B,)
    if config.overlong == "penalty":
        penalty = overlong_penalty(ro.batch.lengths.to(device), config.sampling.max_new_tokens,
                                   config.overlong_buffer, config.overlong_factor)  # (B,)
        rewards += penalty
        metrics["rewards/overlong_penalty/mean"] = penalty.mean().item()
    data = layout(ro.batch, rl.tokenizer.pad_id).to(device)  # (B, L)
    if config.overlong == "mask":  # truncated completions get no loss (DAPO overlong filtering)
        data.mask *= ro.batch.finished.to(device)[:, None].to(data.mask.dtype)
    t_reward = time.perf_counter()

    # 2. score: old policy (for several updates per batch, the KL, or the periodic mismatch check), reference
    # and critic under no grad; the health checks on KL
    multi_update = config.ppo_epochs * config.minibatches > 1
    bypass = config.off_policy == "bypass"  # π_old is the sampler's: nothing to recompute for the ratio
    check_all = config.mismatch_every > 0 and step % config.mismatch_every == 0
    correct = config.is_correction != "none"
    with out_of_memory(step + 1, "scoring", knob="max_tokens_per_micro_batch"):
        old_logp = None
        if (multi_update and not bypass) or rl.reference is not None or check_all or correct:
            old_logp = rl.policy.score(data, rl.objective)
            metrics |= mismatch(data, old_logp)
        if correct:  # π_old against the sampler's π_behaviour, per token (losses.is_weights)
            data.is_weight, is_stats = losses.is_weights(old_logp, data.behaviour, data.mask, config.is_correction,
                                                         config.is_clip)
            metrics |= {k: float(v) for k, v in is_stats.items()}
        data.ref_logp = rl.reference.score(data, rl.objective) if rl.reference is not None else None
        data.values = rl.critic.score(data, rl.critic_objective) if rl.critic is not None else None
    if bypass:
        data.old_logp = data.behaviour  # (B, L) the ratio is taken against the behaviour policy, every update
    else:
        data.old_logp = old_logp if multi_update else None  # one on-policy update: the ratio is exactly 1
    kl_tok = torch.zeros_like(data.mask)  # (B, L)
    if data.ref_logp is not None:
        kl_tok = losses.kl(old_logp, data.ref_logp, config.kl_kind, data.mask)
        metrics["kl"] = losses.token_mean(kl_tok, data.mask).item()
        events += monitor.check_rollout(step + 1, {"kl": metrics["kl"]})
    t_score = time.perf_counter()

    # 3. advantage: per token (B, L); sequence-level estimators broadcast over the completion
    beta_r = state.kl_coef if config.kl_in == "reward" else 0.0
    seq_rewards, token_rewards = kl_shaped_rewards(rewards, kl_tok, data.mask, beta_r)  # (B,), (B, L)
    data.advantages, data.returns = estimate_advantages(config, seq_rewards, token_rewards,
                                                        ro.batch.group_ids.to(device), data.mask, data.values)
    metrics.update(advantage_metrics(data.advantages, data.mask, data.values, data.returns))

    # 4. update: ppo_epochs × minibatches optimizer steps, each gated by the health checks
    healthy = Monitor.worst(events) in (None, "warn")
    if healthy:
        with out_of_memory(step + 1, "update", knob="max_tokens_per_micro_batch"):
            healthy, update_metrics = update(rl, state, data, step, monitor, events, track_mismatch=old_logp is None)
        metrics |= update_metrics
        observed_kl = kl_tok.sum(-1).mean().item()
        if (config.kl_controller != "fixed" and rl.reference is not None and healthy
                and math.isfinite(observed_kl)):
            state.kl_coef = losses.update_kl_coef(config.kl_controller, state.kl_coef, observed_kl, len(rewards),
                                                  config.kl_target, config.kl_horizon)
    metrics["health/skipped_update"] = float(not healthy)
    t_end = time.perf_counter()
    metrics |= {
        "timing_s/reward": t_reward - t0,
        "timing_s/ref": t_score - t_reward,
        "timing_s/update": t_end - t_score,
        "rollout/policy_version": rl.policy.version,
        **rl.policy.metrics(),
    }
    return StepOut(metrics, rewards.cpu(), data.advantages.cpu(), data.mask.cpu())


def update(rl: RLSetup, state: RLState, data: TrainBatch, step: int, monitor: Monitor, events: list,
           track_mismatch: bool) -> tuple[bool, dict]:
    """``ppo_epochs`` × ``minibatches`` optimizer steps of the policy (and the critic), each gated by the
    health checks; an action stronger than warn stops the batch's updates. ``track_mismatch``: compare
    behaviour and trainer log-probs on the first minibatch's forward (the policy that sampled: no extra
    pass). Returns (healthy, the mean of each statistic over the steps, and ``data/pad_fraction``: the
    padding share of the input positions the policy's and critic's forwards ran)."""
    config = rl.config
    rl.policy.module.train()
    update_actor = rl.critic is None or step >= config.critic.warmup_steps
    needs_all = (config.kl_in == "loss" and state.kl_coef > 0) or config.entropy_coef > 0
    live = needs_all | (data.advantages.abs().sum(-1) > 0)  # (B,) rows whose loss is not 0
    gen = torch.Generator().manual_seed(config.seed * 7919 + step)
    gate = health_gate(monitor, step + 1, events)
    critic_gate = health_gate(monitor, step + 1, events, spikes=False)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    healthy = True
    rl.objective.mismatch = Mismatch() if track_mismatch else None
    engines = [e for e in (rl.policy, rl.critic) if e is not None]
    ran, real = sum(e.tokens_run for e in engines), sum(e.tokens_real for e in engines)
    for rows in minibatch_rows(len(data.mask), config.ppo_epochs, config.minibatches, gen):
        rows = rows.to(rl.policy.device)
        part: dict[str, float] = {}
        if rl.critic is not None:
            part |= critic_update(rl.critic, rl.critic_objective, data, rows, critic_gate)
        if update_actor and bool(live[rows].any()):
            part |= policy_update(rl.policy, rl.objective, data, rows, live, gate)
        if rl.objective.mismatch is not None:  # each rank saw its rows of the forward: combined over the ranks
            part |= rl.objective.mismatch.combined(rl.policy.world)
            rl.objective.mismatch = None  # the policy has moved: later minibatches are not the sampler's
        for k, v in part.items():
            sums[k], counts[k] = sums.get(k, 0.0) + v, counts.get(k, 0) + 1
        healthy = Monitor.worst(events) in (None, "warn") and all(e.check != "nonfinite" for e in events)
        if not healthy:
            break
    rl.objective.mismatch = None
    ran, real = sum(e.tokens_run for e in engines) - ran, sum(e.tokens_real for e in engines) - real
    ran, real = rl.policy.world.sum([ran, real])  # every rank's forwards
    padding = {"data/pad_fraction": 1.0 - real / ran} if ran else {}
    return healthy, {k: v / counts[k] for k, v in sums.items()} | padding


def mismatch(data: TrainBatch, logp: Tensor) -> dict[str, float]:
    """Behaviour vs trainer log-probs over every row (see :class:`posttrain.trainers.objectives.Mismatch`)."""
    found = Mismatch()
    found.add(data.behaviour, logp, data.mask)
    return found.metrics()


def log_samples(run: Run, step: int, ro, rewards: Tensor, advantages: Tensor, mask: Tensor, group_size: int) -> None:
    """The first completion of every group to samples.jsonl: prompt, completion, reward, its advantage
    (mean over its tokens), each reward function's value, so reward hacking shows, and what the reward
    functions logged for it with log_extra (``extra``, when they did)."""
    per_row = (advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
    for i in range(0, len(rewards), group_size):
        run.sample({"step": step, "prompt": ro.convs[i // group_size]["messages"][-1]["content"],
                    "completion": ro.texts[i], "reward": rewards[i].item(), "advantage": per_row[i].item(),
                    "rewards": ro.breakdown[i], **({"extra": ro.extra[i]} if ro.extra[i] else {})})


def minibatch_rows(n: int, epochs: int, minibatches: int, gen: torch.Generator):
    """Row indices of each optimizer step: ``epochs`` shuffles of range(n), each cut into ``minibatches``
    (fewer when there are fewer rows than minibatches: no empty step)."""
    for _ in range(epochs):
        yield from (rows for rows in torch.randperm(n, generator=gen).tensor_split(minibatches) if len(rows))


def policy_update(engine: ModelEngine, objective: PolicyObjective, data: TrainBatch, rows: Tensor, live: Tensor,
                  gate=None) -> dict[str, float]:
    """One optimizer step of the policy on minibatch ``rows`` (only its ``live`` rows run forward and backward).

    The loss is aggregated over the whole minibatch (``objective.share`` of its rows is the normaliser), so
    leaving out rows whose loss is 0 changes nothing but the cost. ``gate(loss, grad_norm, entropy) -> bool``
    (the health checks) decides whether the step is applied. Statistics are means over the live rows
    (``policy_loss``: the minibatch's loss)."""
    normaliser = objective.share(data.mask[rows]).clamp(min=1)  # (a minibatch of fully masked rows: loss 0)
    running = rows[live[rows]]
    sums = global_sums(engine, engine.forward_backward(data, engine.world.shard(running), normaliser, objective))
    total_loss = sums.pop("loss")
    live_share = max(float(objective.share(data.mask[running]) / normaliser), 1e-12)
    stats = {k: v if k == "policy_loss" else v / live_share for k, v in sums.items()}
    grad_norm, _ = engine.optim_step(None if gate is None else lambda g: gate(total_loss, g, stats.get("entropy")),
                                     loss=total_loss)
    return stats | {"grad_norm": grad_norm}


def critic_update(engine: ModelEngine, objective: ValueObjective, data: TrainBatch, rows: Tensor,
                  gate=None) -> dict[str, float]:
    """One optimizer step of the critic on minibatch ``rows``: the clipped value loss against the returns,
    aggregated like the policy loss; ``gate`` as in :func:`policy_update`."""
    normaliser = objective.share(data.mask[rows]).clamp(min=1)
    sums = global_sums(engine, engine.forward_backward(data, engine.world.shard(rows), normaliser, objective))
    value_loss = sums["loss"]
    grad_norm, _ = engine.optim_step(None if gate is None else lambda g: gate(value_loss, g), loss=value_loss)
    return {"value_loss": value_loss, "vf_clipfrac": sums["vf_clipfrac"], "critic/grad_norm": grad_norm}


def global_sums(engine: ModelEngine, sums: dict) -> dict[str, float]:
    """``forward_backward``'s weighted sums over this rank's rows, added up over the ranks (data parallel: each
    rank runs its share of a minibatch's rows; the normaliser is the whole minibatch's)."""
    world = engine.world
    keys = sorted(set(world.gather(list(sums)))) if world.size > 1 else list(sums)  # a rank with no rows has none
    return dict(zip(keys, world.sum([float(sums.get(k, 0.0)) for k in keys]), strict=True))
