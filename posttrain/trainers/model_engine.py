"""The model engine: the one owner of a trained module's device, precision, optimizer and version.

Every trainer drives its models through a :class:`ModelEngine` (the computation flow), so nothing else
moves a module or a batch to a device, opens an autocast region or scales a loss:

* ``device``: ``auto`` (CUDA when available) | ``cpu`` | ``cuda`` | ``cuda:N``;
* ``precision``: ``fp32``; ``bf16-mixed`` / ``fp16-mixed`` (autocast for forward and backward, fp32
  master weights and optimizer state; fp16 with a gradient scaler); ``bf16-true`` (bf16 weights and
  optimizer state, no autocast). ``auto`` is fp32 on CPU and bf16-mixed on CUDA.

:meth:`ModelEngine.optim_step` clips the gradient, asks the caller's health gate, steps the optimizer
and counts applied updates in ``version`` (the policy version that tags rollouts). The RL losses that
:meth:`ModelEngine.forward_backward` computes live in :mod:`posttrain.trainers.objectives`; it and
:meth:`ModelEngine.score` run micro-batches of at most ``max_tokens_per_micro_batch`` tokens, packed
(:mod:`posttrain.trainers.packing`).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from posttrain import fsdp
from posttrain.checkpoint import read_optimizer_state
from posttrain.config import OptimConfig
from posttrain.config_checks import ConfigError, suggest
from posttrain.distributed import World
from posttrain.optim import clip_grad, make_optimizer, set_lr
from posttrain.trainers.packing import PackedModule, Packing, group_by_tokens, packing_problem

PRECISIONS = ("auto", "fp32", "bf16-mixed", "fp16-mixed", "bf16-true")
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class OutOfMemory(RuntimeError):
    """The device ran out of memory; the message names the step, the phase and what to lower."""


def resolve_device(name: str) -> torch.device:
    """``auto`` → ``cuda`` when CUDA is available, else ``cpu``; a CUDA device this machine does not have
    is a :class:`ConfigError` (raised before any model loads)."""
    if not _DEVICE.match(name):
        raise ConfigError(f"config key 'device' must be auto | cpu | cuda | cuda:N, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"config key 'device' is {name}, but torch finds no CUDA device on this machine "
                              f"(torch {torch.__version__}); use device=cpu or device=auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"config key 'device' is {name}, but this machine has {torch.cuda.device_count()} "
                              "CUDA device(s)")
    return device


def resolve_precision(name: str, device: torch.device, model_dtype: str = "float32") -> str:
    """The precision to train in: ``auto`` → bf16-true for weights loaded in bfloat16, else fp32 on CPU and
    bf16-mixed on CUDA (fp16-mixed on a GPU without bf16). A precision the device cannot do, or one that
    contradicts ``model.dtype``, is a :class:`ConfigError`."""
    if name not in PRECISIONS:
        raise ConfigError(f"config key 'precision' has unknown value '{name}'{suggest(name, list(PRECISIONS))}")
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    if name == "auto":
        if model_dtype == "bfloat16":
            name = "bf16-true"
        elif model_dtype == "float16":
            raise ConfigError("config key 'model.dtype' is float16: fp16 weights cannot train without fp32 master "
                              "weights; use model.dtype=float32 with precision=fp16-mixed")
        elif device.type == "cuda":
            name = "bf16-mixed" if bf16_ok else "fp16-mixed"
        else:
            name = "fp32"
    if name.startswith("bf16") and not bf16_ok:
        raise ConfigError(f"config key 'precision' is {name}, but {torch.cuda.get_device_name(device)} has no "
                          "bfloat16 support; use precision=fp16-mixed or fp32")
    if model_dtype != "float32" and name != "bf16-true":
        raise ConfigError(f"config key 'model.dtype' is {model_dtype} but precision is {name} (fp32 weights): "
                          "use model.dtype=float32, or precision=bf16-true for bf16 weights")
    return name


class ModelEngine:
    """A trained module on its device, in its precision, with its optimizer (``optim`` None: a frozen module
    that is only scored, e.g. the reference policy).

    ``forward_backward`` / ``score`` run a :class:`posttrain.trainers.objectives.Objective` over a batch in
    micro-batches of at most ``max_tokens_per_micro_batch`` tokens (:func:`~posttrain.trainers.packing.
    group_by_tokens`), each run packed when the module can (``packing`` on and its ``packing_problem()``
    None) and padded to its widest row otherwise; trainers with their own loss call :meth:`autocast` and
    :meth:`backward` directly.

    Data parallel (``world``): ``strategy`` ``ddp`` keeps the whole module on every rank and sums the
    gradients in :meth:`optim_step`; ``fsdp2`` shards it (:mod:`posttrain.fsdp`): training passes then run in
    lockstep (:meth:`lockstep`, with passes of weight 0 on a rank that has fewer), passes without gradients
    run inside :meth:`gathered`, and checkpoints go through rank 0's full copy (:meth:`on_disk`).
    ``shares``: the engine whose (sharded) weights this module uses too (LoRA's reference: the policy with
    its adapter off).
    """

    def __init__(self, module: nn.Module, optim: OptimConfig | None, device: torch.device, precision: str,
                 activation_checkpointing: bool = False, max_tokens_per_micro_batch: int = 4096,
                 packing: bool = True, world: World | None = None, strategy: str = "ddp",
                 shares: ModelEngine | None = None):
        if precision == "bf16-true" and shares is None:  # the weights only: buffers (rotary frequencies) keep
            for p in module.parameters():  # their precision; shared weights are the owner's to cast
                p.data = p.data.to(torch.bfloat16)
        self.world = world or World()  # data parallel: gradients are summed over its ranks before each step
        self.owner = shares or self  # the engine that gathers this module's weights
        self.sharded = strategy == "fsdp2" and self.world.size > 1 and shares is None
        if self.sharded and precision == "fp16-mixed":
            raise ConfigError("precision fp16-mixed does not run with distributed.strategy fsdp2 (its gradient "
                              "scaler needs whole gradients): use bf16-mixed, or strategy ddp")
        # rank 0's full copy of a trained sharded module, on the CPU: what checkpoints are written from and read into
        self.twin = copy.deepcopy(module).cpu() if self.sharded and self.world.main and optim is not None else None
        self.module = module.to(device)
        if self.sharded:
            fsdp.shard(module, self.world.size, device, precision)
        self._gathering = 0  # nesting depth of gathered()
        if activation_checkpointing:
            module.enable_activation_checkpointing()
        self.device, self.precision, self.max_tokens = device, precision, max_tokens_per_micro_batch
        self.packing_problem = packing_problem(module)  # why this module runs padded (None: it packs)
        self.packing = packing and self.packing_problem is None
        self.tokens_run = self.tokens_real = 0  # forward_backward's input positions so far, and the real ones
        self.grad_clip = optim.grad_clip if optim is not None else 0.0
        self.optimizer = make_optimizer(module, optim) if optim is not None else None
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16-mixed" else None
        self.version = 0  # optimizer updates applied so far (the policy version)
        self.overflows = 0  # fp16-mixed: updates the gradient scaler skipped for an inf/NaN gradient

    def autocast(self):
        """The forward passes' autocast region (mixed precisions; a no-op otherwise)."""
        dtype = AUTOCAST_DTYPES.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss`` (scaled by the gradient scaler in fp16-mixed)."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def optim_step(self, allowed: Callable[[float], bool] | None = None, loss: float = 0.0) -> tuple[float, int]:
        """Clip the accumulated gradient and apply it when ``allowed(grad_norm)`` (the health gate) says so;
        gradients are cleared either way. ``loss``: the (unscaled) loss of the step. Returns (grad norm before
        clipping, version after the step).

        fp16-mixed: the gradient is unscaled first; an inf/NaN gradient of a finite loss is the scaler's
        overflow signal (the scale halves, the update is skipped, ``overflows`` counts it) and does not reach
        the gate, until the scale has fallen below 1: then no scale helps, and the gate sees the non-finite
        gradient (a health event) as it does a non-finite loss.

        Under data parallelism every rank calls this once per step (also one that had no rows): the gradients
        are summed over the ranks first (posttrain/distributed.py), so the norm, the gate's inputs (``loss``
        must be the global loss) and so the decision are the same on every rank. FSDP2 reduced the gradient
        shards in the backward passes already; their norm is summed over the ranks."""
        if not self.sharded:
            self.world.all_reduce_grads(self.module)
        if self.scaler is not None:
            self.scaler.scale(torch.zeros((), device=self.device))  # a rank with no rows yet: the scale starts
            self.scaler.unscale_(self.optimizer)
        grad_norm = clip_grad(self.module, self.grad_clip, fsdp.grad_norm(self.module) if self.sharded else None)
        if (self.scaler is not None and not math.isfinite(grad_norm) and math.isfinite(loss)
                and self.scaler.get_scale() >= 1.0):
            self.overflows += 1
            self.scaler.update()
        elif allowed is None or allowed(grad_norm):
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.version += 1
        elif self.scaler is not None:
            self.scaler.update()
        self.zero_grad()
        return grad_norm, self.version

    def micro_batches(self, batch, rows: torch.Tensor) -> Iterator[tuple[torch.Tensor, object, nn.Module, int, int]]:
        """(micro-batch rows, the micro-batch cut to its widest row, the module to run it with, the input
        positions it runs, its real tokens) for ``rows`` of ``batch`` in order. A packed micro-batch runs
        through a :class:`~posttrain.trainers.packing.PackedModule`: what the module returns for its (r, w)
        rows is computed on the packed sequences."""
        widths = batch.widths[rows].tolist()  # the one host sync
        groups = group_by_tokens(widths, self.max_tokens, padded=not self.packing)
        for micro_rows, group in zip(rows.split([len(g) for g in groups]), groups, strict=True):
            group_widths = [widths[i] for i in group]
            micro = batch.take(micro_rows, max(group_widths))
            if self.packing:
                packing = Packing.of(group_widths, micro.width, self.device)
                module, ran = PackedModule(self.module, packing), packing.doc_ids.numel()
            else:
                module, ran = self.module, len(group) * micro.width
            yield micro_rows, micro, module, ran, sum(group_widths)

    @torch.no_grad()
    def score(self, batch, objective) -> torch.Tensor:
        """``objective.score`` of every row of ``batch`` under no grad, (B, L), micro-batch by micro-batch. Data
        parallel: each rank scores its share of the rows and the scores are summed over the ranks (each row is
        nonzero on one rank only), so every rank gets all of them."""
        was_training = self.module.training
        self.module.eval()
        out = torch.zeros_like(batch.mask)  # (B, L)
        everything = torch.arange(len(batch.mask), device=batch.mask.device)
        with self.gathered():
            for rows, micro, module, _, _ in self.micro_batches(batch, self.world.shard(everything)):
                with self.autocast():
                    out[rows, : micro.width] = objective.score(module, micro).float()
        self.module.train(was_training)
        return self.world.sum_tensor(out) * batch.mask

    def forward_backward(self, batch, rows: torch.Tensor, normaliser: torch.Tensor,
                         objective) -> dict[str, torch.Tensor]:
        """Accumulate the gradient of ``objective``'s loss over ``rows`` of ``batch``, micro-batch by micro-batch.

        ``normaliser`` is the loss's global denominator (the minibatch's tokens for token-mean, its rows
        otherwise: see ``objective.share``), so Σ over micro-batches of loss_m · share_m / normaliser is
        the loss of the whole minibatch and the gradient equals the full batch's. Returns the weighted sums
        of the objective's statistics (tensors; the host synchronisations read the rows' widths and, under FSDP2,
        the ranks' pass counts). FSDP2: a rank with fewer micro-batches than another runs its first one again (or
        the batch's first row) at weight 0 and without the objective's side records, so that every rank runs as
        many passes."""
        sums: dict[str, torch.Tensor] = {}
        def spare():  # the pass a rank with fewer micro-batches repeats at weight 0
            first = next(self.micro_batches(batch, rows[:1]), None)
            return first or next(self.micro_batches(batch, torch.zeros(1, dtype=torch.long, device=rows.device)))

        for (_, micro, module, ran, real), counts in self.lockstep(self.micro_batches(batch, rows), spare):
            with self.autocast(), nullcontext() if counts else _padding(objective):
                loss, stats = objective.loss(module, micro)
            if not counts:
                self.backward(loss * 0.0)
                continue
            self.tokens_run, self.tokens_real = self.tokens_run + ran, self.tokens_real + real
            weight = objective.share(micro.mask) / normaliser
            self.backward(loss * weight)
            for k, v in {"loss": loss.detach(), **stats}.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() * weight
        return sums

    def lockstep(self, items: Iterable, spare: Callable[[], object]) -> Iterator[tuple[object, bool]]:
        """(item, True) for each of this rank's training passes ``items`` (made one at a time); FSDP2: then
        (``spare()``, False) until every rank has run as many passes as the rank with the most (the caller runs
        those at weight 0)."""
        if not self.sharded:
            yield from ((item, True) for item in items)
            return
        items = list(items)
        total = fsdp.lockstep(len(items), self.device)
        for i in range(total):
            yield (items[i], True) if i < len(items) else (spare(), False)

    @contextmanager
    def gathered(self):
        """FSDP2: every rank gathers the whole module for the passes inside (no gradients: scoring,
        generation, evaluation), which may then differ in number between ranks; every rank must enter
        together. A no-op otherwise, and inside another ``gathered``."""
        owner = self.owner
        if not owner.sharded or owner._gathering:
            yield
            return
        owner._gathering += 1
        try:
            with fsdp.gathered(owner.module):
                yield
        finally:
            owner._gathering -= 1

    def on_disk(self, module: nn.Module) -> nn.Module:
        """What a checkpoint writes for ``module`` (this engine's module or a submodule of it): the module
        itself; FSDP2: the same part of rank 0's full copy, once :meth:`consolidate` filled it."""
        if not self.sharded:
            return module
        name = next(n for n, m in self.module.named_modules() if m is module)
        return self.twin.get_submodule(name) if self.twin is not None else module

    def owns(self, module: nn.Module) -> bool:
        return any(m is module for m in self.module.modules())

    def consolidate(self) -> None:
        """FSDP2: gather the full weights into rank 0's copy (every rank calls; a no-op otherwise)."""
        if self.sharded:
            state = fsdp.full_state(self.module)
            if self.twin is not None:
                self.twin.load_state_dict(state)

    def scatter(self) -> None:
        """FSDP2: load rank 0's full copy (a checkpoint just read into it) into every rank's shards."""
        if self.sharded:
            fsdp.load_full_state(self.module, self.twin.state_dict() if self.twin is not None else {})

    def optimizer_state(self) -> dict:
        """The optimizer's state dict with whole tensors (FSDP2: gathered to rank 0; every rank calls)."""
        if self.sharded:
            return fsdp.full_optimizer_state(self.optimizer, self.world.main)
        return self.optimizer.state_dict()

    def restore_optimizer(self, directory, name: str) -> None:
        """Load the optimizer state a checkpoint holds (FSDP2: each rank keeps its shards, read one tensor at a
        time)."""
        cut = fsdp.shard_like(self.optimizer) if self.sharded else None
        self.optimizer.load_state_dict(read_optimizer_state(directory, name, cut))

    def named_weights(self, trainable_only: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """The module's weights by name, detached (what a weight sync sends to the rollout engine; FSDP2: this
        rank's shards, whole only inside :meth:`gathered`); ``trainable_only``: the parameters that train (LoRA:
        the adapter), which are all that can change after a first full copy."""
        if trainable_only:
            yield from ((name, p.detach()) for name, p in self.module.named_parameters() if p.requires_grad)
            return
        for name, tensor in self.module.state_dict().items():
            yield name, tensor.detach()

    def metrics(self) -> dict[str, float]:
        """fp16-mixed: the loss scale and the overflow skips so far (nothing in other precisions)."""
        if self.scaler is None:
            return {}
        return {"precision/loss_scale": self.scaler.get_scale(), "precision/overflows": self.overflows}

    def state_dict(self) -> dict:
        """What a checkpoint keeps besides the weights and the optimizer: the version and the scaler."""
        scaler = self.scaler.state_dict() if self.scaler is not None else None
        return {"version": self.version, "overflows": self.overflows, "scaler": scaler}

    def load_state_dict(self, state: dict) -> None:
        self.version, self.overflows = state["version"], state.get("overflows", 0)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


@contextmanager
def _padding(objective):
    """A padding pass of FSDP2's lockstep: the objective keeps no side record of it (the RL policy objective's
    behaviour-vs-trainer mismatch), as the pass's rows are counted where they really belong."""
    saved = getattr(objective, "mismatch", None)
    if saved is not None:
        objective.mismatch = None
    try:
        yield
    finally:
        if saved is not None:
            objective.mismatch = saved


@contextmanager
def out_of_memory(step: int, phase: str, knob: str = "micro_batch"):
    """Turn a device out-of-memory error inside ``phase`` of ``step`` into one :class:`OutOfMemory` line;
    ``knob``: the config key that sizes the micro-batches (RL: max_tokens_per_micro_batch)."""
    try:
        yield
    except torch.OutOfMemoryError:
        hint = {"generation": "prompts_per_step, samples_per_prompt or sampling.max_new_tokens",
                "evaluation": "eval.samples or eval.max_new_tokens",
                "update": f"{knob}, or set activation_checkpointing=true or precision=bf16-true"}.get(phase, knob)
        raise OutOfMemory(f"out of device memory at step {step} during {phase}: lower {hint}") from None
