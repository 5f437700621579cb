"""Supervised fine-tuning: teacher forcing on task conversations.

loss = −Σ_t m_t · log π(x_t | x_<t) / Σ_t m_t over every counted token of the step, where the mask m is
the ``loss`` scheme's (``posttrain/sft_data.py``): ``full`` (the whole rendered sequence, prompt
included), ``completion`` (the default: the assistant turn, i.e. its text, tool calls and end token, not
tool outputs) or ``answer_only`` (the final-answer span, ``#### N`` or ``<answer>...</answer>`` through
the end token). Examples longer than ``max_length`` (0: the model's context length) are truncated or
skipped (``overlong``), counted in ``data/truncated`` / ``data/skipped``; a step whose examples count no
token (``answer_only`` with every answer cut off: prefer ``overlong=skip`` there) makes no optimizer
update, counted in ``data/empty_steps``. ``packing`` puts several examples in a row of ``max_length``
tokens (0: the step's longest example), each attending to itself only with its own positions: the same
loss as unpacked rows, less padding (``data/pad_fraction``). With ``lora.rank`` > 0 (HF models) only the
adapter trains.

AdamW, warm-up + decay schedule, grad clipping, held-out evaluation every ``eval.every`` steps,
resumable checkpoints every ``save_every`` steps and a final one (``run_dir/checkpoints/final``);
the health monitor checks every update (a non-finite loss or gradient is never applied).
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from posttrain.checkpoint import load_policy
from posttrain.config import ConfigError, SFTConfig
from posttrain.distributed import World, data_parallel, set_threads
from posttrain.engine import Engine
from posttrain.epoch_order import EpochOrder
from posttrain.evaluation import evaluate_on
from posttrain.metrics import StepProgress
from posttrain.models.gpt import GPT
from posttrain.optim import lr_at
from posttrain.sft_data import check_packing, draw_examples, make_rows, resolve_max_length, sft_loss
from posttrain.tasks import make_task
from posttrain.tokenizer import Tokenizer
from posttrain.tools import default_registry
from posttrain.trainers.checks import Checked, resolve_epochs, task_data
from posttrain.trainers.model_engine import ModelEngine, out_of_memory, resolve_device, resolve_precision
from posttrain.trainers.pairs import context_length
from posttrain.trainers.run import Parts, Run, TrainerState, end_step, health_gate, nothing_to_do


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


def check_inputs(config: SFTConfig) -> Checked:
    """The checks before the model loads (``train_sft`` and ``posttrain sft --dry-run``): the task's data loads
    and has conversations to teach (DataError / ConfigError otherwise); with ``epochs`` > 0 it sets ``steps``."""
    task = make_task(config.task)
    task.check("sft")
    rows = training_rows(task)
    epochs = resolve_epochs(config, None if rows is None else len(rows), config.batch_size, "conversations")
    return Checked(f"data ({task_data(task)})", task=task, epochs=epochs)


def training_rows(task) -> list | None:
    """What one SFT epoch passes over: the task's conversations (``sft_rows``: the dataset task, read in epoch
    order), else its training problems (gsm8k: drawn at random, ``epochs`` counts them), else None (arithmetic
    generates them)."""
    return task.sft_rows() if hasattr(task, "sft_rows") else getattr(task, "train", None)


@dataclass
class SFTState(TrainerState):
    """Checkpointed besides the weights: the data counts (truncated, skipped, empty steps) and, for a task
    read in epoch order, the pass and position (posttrain/epoch_order.py)."""

    data: dict = field(default_factory=lambda: {"truncated": 0, "skipped": 0, "empty_steps": 0})
    order: dict = field(default_factory=dict)


def train_sft(config: SFTConfig, progress: bool = True) -> dict[str, float]:
    """Run SFT as configured (resuming per ``config.resume``); returns the last held-out evaluation's metrics."""
    set_threads(config.threads)  # under torchrun: shared by the processes on this node
    torch.manual_seed(config.seed)  # LoRA init, new token rows, dropout: the same in a restarted run
    checked = check_inputs(config)  # sets steps when epochs > 0
    if checked.epochs:
        print(f"sft: {checked.epochs}")
    world, device = data_parallel(config, resolve_device(config.device), checked.summary)
    run = Run(config, "sft", world)
    if nothing_to_do(run, print):
        return run.state["extra"].get("last_eval", {})
    precision = resolve_precision(config.precision, device, config.model.dtype)
    task = checked.task
    model, tokenizer = build_policy(config, task, run.resume_from)
    policy = ModelEngine(model, config.optim, device, precision, config.activation_checkpointing, world=world,
                         strategy=config.distributed.strategy)
    limit = resolve_max_length(config.max_length, context_length(model))
    if config.packing:
        with policy.gathered():
            check_packing(model)
    engine = Engine(model, tokenizer, default_registry())
    state = SFTState()
    parts = Parts(model, tokenizer, state, engines={"policy": policy}, rngs={"data": random.Random(config.seed + 1)})
    conversations = task.sft_rows() if hasattr(task, "sft_rows") else None
    order = EpochOrder(len(conversations), config.seed) if conversations else None

    def next_example() -> dict:
        """The next conversation: in epoch order where the task lists them, else a draw from the task."""
        return conversations[order.next()] if order else task.sft_example(parts.rngs["data"])

    def evaluate() -> dict:
        """The held-out evaluation (the problems split over the ranks; the same numbers on every rank)."""
        with policy.gathered():
            model.eval()
            with policy.autocast():
                return evaluate_on(task, engine, config.eval, world)

    with run.preemption, StepProgress("sft", config.steps, ("loss", "grad_norm", "eval/pass@1"),
                                      progress and world.main, initial=run.start_step, quiet=not world.main,
                                      every=config.log.every) as bar:
        run.check_config(bar.print)
        run.open(bar.print)
        step = run.resume(parts, bar.print)
        if run.resume_from is None and run.needs_start_checkpoint:
            run.save(0, parts)
        announced = set()
        while step < config.steps:
            t0 = time.perf_counter()
            model.train()
            lr = lr_at(step, config.steps, config.optim) * run.monitor.lr_scale
            policy.set_lr(lr)
            counts = state.data
            if order and state.order:  # the state's copy: also after a resume or a rollback
                order.load_state_dict(state.order)
            mine = draw_share(next_example, tokenizer, config, limit, counts, world)
            state.order = order.state_dict() if order else {}
            announce_overlong(counts, announced, limit, config.overlong, bar.print)
            rows = make_rows(mine, tokenizer.pad_id, config.packing, config.max_length).to(device)
            n_tokens, positions, width = world.sum([rows.counted, rows.positions, rows.inputs.numel()])
            events: list = []
            applied, trained = False, {}
            if n_tokens:
                with out_of_memory(step + 1, "update", knob="batch_size or max_length"):
                    trained, applied = sft_update(policy, rows, int(n_tokens), world,
                                                  health_gate(run.monitor, step + 1, events))
            else:  # no loss (none logged) and no AdamW step: its momentum and weight decay would move the weights
                counts["empty_steps"] = counts.get("empty_steps", 0) + 1  # .get: checkpoints from before the count
                announce_empty(announced, config.loss, config.overlong, bar.print)
            elapsed = time.perf_counter() - t0
            metrics = {
                "step": step + 1,
                **trained,
                "learning_rate": lr,
                "tokens": int(n_tokens),
                "health/skipped_update": float(not applied),
                "data/truncated": counts["truncated"],
                "data/skipped": counts["skipped"],
                "data/empty_steps": counts.get("empty_steps", 0),
                "data/pad_fraction": 1.0 - positions / max(width, 1),
                **({"data/epoch": order.progress} if order else {}),
                "timing_s/step": elapsed,
                **policy.metrics(),
                "throughput/tokens_per_s": n_tokens / max(elapsed, 1e-9),
            }
            step = end_step(run, parts, bar, step, metrics, events, evaluate, config.eval.every)
    run.close()
    return state.last_eval


def draw_share(next_example, tokenizer, config: SFTConfig, limit: int, counts: dict, world: World) -> list:
    """This rank's share of the step's ``batch_size`` examples, drawn as one process draws them (``counts``:
    the step's truncated and skipped examples over all ranks). With ``overlong=truncate`` no example is left
    out, so the batch's conversations are drawn and each rank renders only its own; with ``skip`` which ones
    make the batch depends on every rendering, so each rank renders them all."""
    if world.size == 1 or config.overlong != "truncate":
        examples = draw_examples(next_example, tokenizer, config.batch_size, config.loss, limit, config.overlong,
                                 counts)
        return world.shard(examples)
    convs = world.shard([next_example() for _ in range(config.batch_size)])
    local, mine, error = {"truncated": 0, "skipped": 0}, [], None
    try:
        mine = draw_examples(iter(convs).__next__, tokenizer, len(convs), config.loss, limit, config.overlong, local)
    except (ConfigError, ValueError) as err:  # a conversation this rank alone renders: every rank stops on it
        error = err
    world.raise_any(error)
    counts["truncated"] += int(world.sum([local["truncated"]])[0])
    return mine


def sft_update(policy: ModelEngine, rows, n_tokens: int, world: World, gate) -> tuple[dict[str, float], bool]:
    """One optimizer step on this rank's ``rows``, its loss normalised by ``n_tokens``, the step's counted
    tokens over all ranks, so the gradients summed over the ranks are the whole batch's (posttrain/
    distributed.py). A rank whose rows count no token still joins the step (FSDP2: with a pass of its own).
    Returns ({"loss": the global
    loss, "grad_norm"}, whether the update was applied)."""
    local = 0.0
    if rows.counted or policy.sharded:
        with policy.autocast():
            loss, _ = sft_loss(policy.module, rows, n_tokens)
        policy.backward(loss)
        local = loss.item()
    (loss_value,) = world.sum([local])
    version = policy.version
    grad_norm, _ = policy.optim_step(partial(gate, loss_value), loss=loss_value)
    return {"loss": loss_value, "grad_norm": grad_norm}, policy.version > version


def announce_overlong(counts: dict[str, int], announced: set[str], limit: int, overlong: str, notice) -> None:
    """One notice the first time an example is truncated or skipped (the count goes on in the metrics)."""
    kind = "skipped" if overlong == "skip" else "truncated"
    if counts[kind] and kind not in announced:
        announced.add(kind)
        notice(f"[yellow]examples longer than max_length={limit} tokens are {kind} (overlong={overlong}); "
               f"counted in data/{kind}")


def announce_empty(announced: set[str], loss: str, overlong: str, notice) -> None:
    """One notice the first time a step has no counted token (the count goes on in the metrics)."""
    if "empty_steps" not in announced:
        announced.add("empty_steps")
        hint = "; answer_only works best with overlong=skip" if loss == "answer_only" and overlong == "truncate" else ""
        notice(f"[yellow]a step's examples had no token for the loss (loss={loss}, overlong={overlong}): no update "
               f"was made; counted in data/empty_steps{hint}")
