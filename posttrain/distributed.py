"""Data parallelism with torch.distributed: the :class:`World` a run is part of, passed explicitly.

A run started by ``torchrun --nproc_per_node=N -m posttrain ...`` finds ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK`` in its environment and joins the process group (gloo on the CPU, NCCL on CUDA, each rank on
``cuda:LOCAL_RANK``); a plain run is the world of one process and makes no collective call.

``strategy: ddp``: every rank holds the whole model and optimizer; each optimizer step's gradients are summed
over the ranks once (:meth:`World.all_reduce_grads`, ``torch.distributed.all_reduce``) after every rank ran
its own micro-batches, so a rank may run more micro-batches than another, or none. The trainer divides each
rank's loss by the *global* normaliser (the step's token count over all ranks), so the summed gradient is
the single-process gradient of the global batch:

    ∇ (Σ_r Σ_{t ∈ rank r} ℓ_t) / N_global  =  Σ_r ∇ (Σ_{t ∈ rank r} ℓ_t / N_global)

Deviation from ``torch.nn.parallel.DistributedDataParallel``: the same reduction without its bucketing and
overlap of communication with the backward pass, because DDP's reducer needs every rank to make the same
number of synchronised backward calls through the wrapper, which a token-budget micro-batching (and a rank
with no rows) does not give.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from posttrain.config_checks import ConfigError, check_choice, check_range

STRATEGIES = ("ddp", "fsdp2")


@dataclass
class DistributedConfig:
    """How a run under torchrun splits its work (``RunOptions.distributed``); ignored in a single process."""

    strategy: str = "ddp"  # ddp: every rank holds the model, gradients are summed over ranks once per step;
    # fsdp2: weights, gradients and optimizer state sharded over the ranks (fully_shard per block; posttrain/fsdp.py)
    timeout_s: float = 1800.0  # a collective that waits longer ends the job (a rank died or hangs); the other ranks
    # wait this long for rank 0's saves (and a task of your own that rank 0 evaluates): keep it above those

    def __post_init__(self):
        check_choice("distributed.strategy", self.strategy, list(STRATEGIES))
        check_range("distributed.timeout_s", self.timeout_s, 0, low_open=True)


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size`` processes (``local_rank`` on its node)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints, writes logs and checkpoints."""
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's share of a global list: items rank, rank + size, rank + 2·size, ..."""
        return items[self.rank :: self.size]

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over the ranks (float64 on the host; the values themselves in one process)."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, in place (on its device: gloo on the host, NCCL on CUDA)."""
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_grads(self, module: torch.nn.Module) -> None:
        """Sum every parameter's gradient over the ranks, flattened into one buffer per dtype so that the job
        makes a few collectives, not one per tensor. A parameter no rank computed a gradient for keeps none
        (as in one process: AdamW then leaves it alone, weight decay included); one that only some ranks
        reached gets zeros from the others."""
        if self.size == 1:
            return
        params = [p for p in module.parameters() if p.requires_grad]
        device = params[0].device if params else torch.device("cpu")
        reached = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)  # (P,)
        dist.all_reduce(reached, op=dist.ReduceOp.MAX)
        params = [p for p, anywhere in zip(params, reached.tolist(), strict=True) if anywhere]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for dtype in sorted({p.grad.dtype for p in params}, key=str):
            grads = [p.grad for p in params if p.grad.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in grads])  # (Σ numel,)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
                g.copy_(part.view_as(g))

    def gather(self, items: list) -> list:
        """Every rank's ``items`` (picklable), concatenated in rank order, on every rank."""
        if self.size == 1:
            return list(items)
        parts: list = [None] * self.size
        dist.all_gather_object(parts, list(items))
        return [x for part in parts for x in part]

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (a picklable value: evaluation metrics, a decision)."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, what: str, value) -> None:
        """ConfigError on every rank unless every rank has the same ``value`` (what each rank read for itself:
        the step count, the data): ranks that disagree would train on different batches, or hang."""
        values = self.gather([value])
        if any(v != values[0] for v in values):
            raise ConfigError(f"the {self.size} processes do not agree on {what}: "
                              + "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))
                              + " (every node must see the same files: put run_dir and the data on a shared disk)")

    def on_main(self, fn, *args):
        """``fn(*args)`` computed by rank 0 and its result on every rank; an exception it raises is raised on
        every rank (so every rank stops with the same one line). For what must not be computed N times or
        could come out differently on different ranks: rewards (a judge, a timeout, randomness)."""
        if self.size == 1:
            return fn(*args)
        out = None
        if self.main:
            try:
                out = (True, fn(*args))
            except Exception as err:  # noqa: BLE001 - re-raised on every rank below
                out = (False, err)
        try:
            ok, value = self.broadcast(out)
        except Exception as err:  # rank 0's result or exception could not be pickled
            raise RuntimeError(f"rank 0's result could not be sent to the other ranks: {err}") from None
        if not ok:
            raise value
        return value

    def raise_any(self, error: Exception | None) -> None:
        """Raise the first rank's ``error`` (in rank order) on every rank, when any rank has one."""
        errors = self.gather([error]) if self.size > 1 else [error]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def set_threads(threads: int) -> None:
    """``torch.set_num_threads`` for the job's ``threads`` CPU threads (0: leave torch's choice): under torchrun
    the processes on one node share them (each takes threads ÷ LOCAL_WORLD_SIZE, at least 1), so that the
    same config on N processes does not start N times as many threads as the machine has cores."""
    if threads > 0:
        torch.set_num_threads(max(1, threads // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def launched_world() -> World:
    """The world torchrun's environment describes (one process when there is none)."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def join(config: DistributedConfig, device: torch.device) -> World:
    """Join the process group torchrun set up (gloo for the CPU, NCCL for CUDA, with ``config.timeout_s``)
    and return this process's :class:`World`; a single process joins nothing. Under CUDA each rank uses
    ``cuda:LOCAL_RANK``: a device index in the config is a ConfigError."""
    world = launched_world()
    if world.size == 1:
        return world
    if device.type == "cuda":
        if device.index is not None:
            raise ConfigError(f"config key 'device' is {device} under torchrun: use device=cuda (each rank takes "
                              "cuda:LOCAL_RANK)")
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"{world.size} processes on a node with {torch.cuda.device_count()} CUDA device(s): "
                              "start at most one process per GPU, or use device=cpu")
        torch.cuda.set_device(world.local_rank)
    _die_with_launcher()
    if not dist.is_initialized():  # host-side sums and objects go through gloo, CUDA tensors through NCCL
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=config.timeout_s))
    return world


def leave() -> None:
    """The last call of a command that ended well on every rank: wait for the others, then end this process at
    once (exit 0) — after everything it writes is written and closed. Not through the interpreter's shutdown:
    tearing down gloo's threads there aborted a rank now and then ("terminate called without an active
    exception", SIGABRT) after a complete run, which torchrun reports as a failed job. A run that failed leaves
    no group: torchrun ends the job. In a single process (no group) it does nothing."""
    if dist.is_initialized():
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _die_with_launcher() -> None:
    """On Linux, have the kernel SIGKILL this rank when the process that started it (torchrun's agent) dies:
    torchrun starts each rank in a session of its own, so killing the launcher would otherwise leave the
    ranks training and writing the run directory."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG


def rank_device(device: torch.device, world: World) -> torch.device:
    """The device this rank trains on: ``cuda:LOCAL_RANK`` under CUDA, else ``device``."""
    return torch.device("cuda", world.local_rank) if device.type == "cuda" and world.size > 1 else device


def data_parallel(config, device: torch.device, data: str) -> tuple[World, torch.device]:
    """A trainer's world and its rank's device: :func:`join` with ``config.distributed``, then the checks that
    every rank read the same step count and ``data`` (a summary of the training data) and that the global
    batch (``batch_size``; RL: ``prompts_per_step``) gives every rank at least one row to start a step with (one
    prompt group to generate; a rank's share of an update's rows may still be empty)."""
    world = join(config.distributed, device)
    if world.size == 1 and config.distributed.strategy != "ddp":  # kept for a run on several processes
        print(f"note: distributed.strategy={config.distributed.strategy} applies to a run on several processes "
              "(nproc=N, torchrun); this one is a single process", file=sys.stderr)
    world.agree("the step count and the training data", f"steps {config.steps}, {data}")
    key = "batch_size" if hasattr(config, "batch_size") else "prompts_per_step"
    if getattr(config, key) < world.size:
        raise ConfigError(f"config key '{key}' ({getattr(config, key)}) is the global batch: it must be at least "
                          f"the number of processes ({world.size})")
    return world, rank_device(device, world)


def single_process_only(what: str) -> None:
    """ConfigError when ``what`` is started as one of several processes: it does not split its work across
    ranks yet, and N copies of one run would write the same files."""
    world = launched_world()
    if world.size > 1:
        raise ConfigError(f"{what} does not run data-parallel yet (sft, rm, dpo, rl, pipeline, demo and eval do): "
                          f"started as {world.size} processes by torchrun; run it as one process, or use the CLI")
