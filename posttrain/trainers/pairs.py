"""Preference pairs as training tensors, shared by the reward-model and DPO trainers.

A batch of B pairs is one (2B, T) tensor: rows 0..B−1 are the chosen replies, rows B..2B−1 the
rejected ones (row b and row B + b answer the same prompt), right-padded, so one forward scores both.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.config import ConfigError
from posttrain.epoch_order import pass_order
from posttrain.optim import lr_at
from posttrain.preference_config import PreferenceDataConfig
from posttrain.tasks.arithmetic import ArithmeticTask, preference_pair
from posttrain.tasks.preference import PreferencePair, load_preferences
from posttrain.trainers.model_engine import ModelEngine, out_of_memory
from posttrain.trainers.run import Parts, Run, end_step, health_gate


def make_pairs(config: PreferenceDataConfig) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, test) pairs: generated from the arithmetic task's train / held-out problems, or loaded."""
    if config.source != "arithmetic":
        return load_preferences(config.source, config.test_size)
    task = ArithmeticTask(test_size=max(config.test_size, 1), format=config.format)
    r = random.Random(config.seed)
    train = [preference_pair(task.train_problem(r), r, config.ramble_share, config.format)
             for _ in range(config.train_size)]
    test_r = random.Random(config.seed + 1)
    test = [preference_pair(p, test_r, config.ramble_share, config.format) for p in task.test[: config.test_size]]
    return train, test


@dataclass
class EncodedPair:
    """A pair rendered by the model's tokenizer; the masks are 1 on the reply tokens the model produces."""

    chosen: list[int]
    chosen_mask: list[int]
    rejected: list[int]
    rejected_mask: list[int]
    margin: float
    kind: str | None  # why the rejected reply is worse, when the data says (the demo's 'slip' | 'ramble')


def encode_pairs(tokenizer, pairs: list[PreferencePair], max_length: int) -> tuple[list[EncodedPair], int]:
    """Render every pair (prompt + reply through the chat format); pairs with a side longer than
    ``max_length`` tokens (0: no limit) are left out. Returns (encoded, how many were left out)."""
    out, skipped = [], 0
    for pair in pairs:
        prompt = len(tokenizer.render_for_completion({"messages": pair.prompt}))  # assistant turns in it: no reply
        chosen, chosen_mask = tokenizer.render_conversation(pair.conversation("chosen"))
        rejected, rejected_mask = tokenizer.render_conversation(pair.conversation("rejected"))
        chosen_mask, rejected_mask = [0] * prompt + chosen_mask[prompt:], [0] * prompt + rejected_mask[prompt:]
        if max_length and max(len(chosen), len(rejected)) > max_length:
            skipped += 1
            continue
        out.append(EncodedPair(chosen, chosen_mask, rejected, rejected_mask, pair.margin, pair.meta.get("rejected")))
    return out, skipped


def load_pairs(config: PreferenceDataConfig) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """:func:`make_pairs`, with data it cannot use (a malformed row, an impossible split, no training pair)
    as a ConfigError naming data.source."""
    try:
        train, test = make_pairs(config)
    except ValueError as err:  # a malformed row (named by file and line) or an impossible split
        raise ConfigError(f"data.source: {err}") from None
    if not train:
        raise ConfigError(f"data.source: no training pairs in '{config.source}'")
    return train, test


def prepare_pairs(config, tokenizer, model, notice, pairs: tuple[list, list] | None = None
                  ) -> tuple[list[EncodedPair], list[EncodedPair]]:
    """The config's (train, test) pairs (``pairs`` when already loaded by :func:`load_pairs`), rendered by
    ``tokenizer``; pairs longer than the data's ``max_length`` (default: the model's context length) are
    left out with a notice."""
    train_pairs, test_pairs = pairs or load_pairs(config.data)
    limit = config.data.max_length or context_length(model)
    train, skipped = encode_pairs(tokenizer, train_pairs, limit)
    test, skipped_test = encode_pairs(tokenizer, test_pairs, limit)
    if skipped or skipped_test:
        notice(f"[yellow]left out {skipped} training and {skipped_test} held-out pairs longer than {limit} tokens "
               "(data.max_length)")
    if not train:
        raise ConfigError(f"no training pairs in '{config.data.source}' fit in data.max_length={limit} tokens")
    return train, test


@dataclass
class PairBatch:
    """B pairs as 2B right-padded rows (chosen first)."""

    ids: Tensor  # (2B, T) long
    pad_mask: Tensor  # (2B, T) bool, True on real tokens
    targets: Tensor  # (2B, T) long: the next token where it is a reply token, else −1
    margins: Tensor  # (B,)

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(self.ids.to(device), self.pad_mask.to(device), self.targets.to(device),
                         self.margins.to(device))


def right_pad(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token sequences as (ids (B, T) long, pad_mask (B, T) bool, True on real tokens), right-padded."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    pad_mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq)
        pad_mask[row, : len(seq)] = True
    return ids, pad_mask


def pair_batch(pairs: list[EncodedPair], pad_id: int) -> PairBatch:
    """Stack ``pairs`` into a :class:`PairBatch`."""
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    masks = [p.chosen_mask for p in pairs] + [p.rejected_mask for p in pairs]
    ids, pad_mask = right_pad(seqs, pad_id)  # (2B, T)
    targets = torch.full(ids.shape, -1, dtype=torch.long)
    for row, (seq, mask) in enumerate(zip(seqs, masks, strict=True)):
        nxt, m = torch.tensor(seq[1:]), torch.tensor(mask[1:], dtype=torch.bool)
        targets[row, : len(seq) - 1] = nxt.masked_fill(~m, -1)
    return PairBatch(ids, pad_mask, targets, torch.tensor([p.margin for p in pairs], dtype=torch.float32))


def sequence_logps(model, batch: PairBatch) -> Tensor:
    """Σ_t log π(y_t | x, y_<t) over each row's reply tokens, (2B,). Right padding needs no mask: pads
    come after every real token, which causal attention never lets a real token see."""
    return model(batch.ids, batch.targets).sum(-1)  # (2B, T) -> (2B,)


def batches(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The pair indices of optimizer step ``step``: passes over range(n) in posttrain/epoch_order.py's orders,
    so any step's batch follows from (step, seed) alone (exact resume needs no data state)."""
    start = step * batch_size
    out: list[int] = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        out += pass_order(n, seed, epoch)[offset : offset + batch_size - len(out)]
    return out


def context_length(model) -> int:
    """The longest sequence ``model`` takes: the built-in GPT's max_seq_len, an HF model's
    max_position_embeddings when it has one, else 0 (no limit known)."""
    config = getattr(model, "config", None)
    if hasattr(config, "max_seq_len"):
        return config.max_seq_len
    hf = getattr(model, "hf", None)
    return getattr(hf.config.get_text_config(), "max_position_embeddings", 0) if hf is not None else 0


def pair_step(engine: ModelEngine, n_pairs: int, micro_batches, gate) -> dict[str, float]:
    """One optimizer step of a pair loss: ``micro_batches`` yields (per-pair losses (m,), per-pair statistics
    {name: (m,)}) under the engine's autocast; each micro-batch's loss sum / ``n_pairs`` is backpropagated
    (the gradient of the mean over all pairs), then the update is applied when ``gate(loss, grad_norm)``
    allows. Returns the mean loss and statistics, the grad norm and ``health/skipped_update``. Under data
    parallelism ``micro_batches`` are this rank's pairs and ``n_pairs`` the step's pairs over all ranks: the
    sums are added up over the ranks (the engine's world) before the gate sees them."""
    total, stats = 0.0, {}
    for loss, parts in micro_batches:
        engine.backward(loss.sum() / n_pairs)
        total += loss.sum().item() / n_pairs
        for k, v in parts.items():
            stats[k] = stats.get(k, 0.0) + v.sum().item() / n_pairs
    total, *values = engine.world.sum([total, *stats.values()])
    stats = dict(zip(stats, values, strict=True))
    version = engine.version
    grad_norm, _ = engine.optim_step(lambda g: gate(total, g), loss=total)
    return {"loss": total, "grad_norm": grad_norm, "health/skipped_update": float(engine.version == version), **stats}


def train_on_pairs(run: Run, parts: Parts, bar, engine: ModelEngine, step: int, n_pairs: int, config,
                   update: Callable[[list[int], Callable], dict], evaluate: Callable[[], dict],
                   eval_every: int) -> None:
    """The loop the reward-model and DPO trainers share, from ``step`` to ``config.steps``: schedule the
    learning rate, take the step's pairs (:func:`batches`), ``update(rows, n, gate) -> metrics`` (one
    optimizer step on this rank's share ``rows`` of the step's ``n`` pairs, applied only when the health
    ``gate`` allows), then :func:`end_step`."""
    while step < config.steps:
        t0 = time.perf_counter()
        parts.model.train()
        lr = lr_at(step, config.steps, config.optim) * run.monitor.lr_scale
        engine.set_lr(lr)
        events: list = []
        rows = batches(n_pairs, config.batch_size, step, config.seed)
        with out_of_memory(step + 1, "update"):
            stats = update(engine.world.shard(rows), len(rows), health_gate(run.monitor, step + 1, events))
        metrics = {"step": step + 1, **stats, "learning_rate": lr, "timing_s/step": time.perf_counter() - t0,
                   **engine.metrics()}
        step = end_step(run, parts, bar, step, metrics, events, evaluate, eval_every)
