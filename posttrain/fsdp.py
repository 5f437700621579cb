"""FSDP2 (``distributed.strategy: fsdp2``): a trained module's parameters, gradients and optimizer state sharded
over the ranks with ``torch.distributed.fsdp.fully_shard``; the :class:`~posttrain.trainers.model_engine.
ModelEngine` is the one caller.

Placement: ``fully_shard`` on every transformer block (the children of each ``nn.ModuleList`` named
``blocks`` or ``layers``: the built-in GPT, Hugging Face decoders, with or without a LoRA adapter), then on
the root, which keeps the embeddings, the final norm and the heads. ``bf16-mixed`` gathers the weights in
bfloat16 and reduces gradients in float32 (``MixedPrecisionPolicy``); ``bf16-true`` weights are bfloat16
already.

Two ways to run a sharded module, and why:

* **Training passes run in lockstep.** Each forward gathers a block's weights from every rank and each
  backward reduce-scatters its gradient, so every rank must run the same number of passes: a rank with
  fewer micro-batches than another pads with passes of weight 0 (:func:`lockstep`), and the engine
  multiplies their loss by 0. Gradients are *summed* over the ranks (the trainer divides by the global
  normaliser, as under DDP: posttrain/distributed.py), not averaged as FSDP does by default.
* **Passes without gradients run gathered** (:func:`gathered`): every rank gathers all the weights once,
  then runs any number of forwards on its own (generation stops when its rows are done, scoring splits
  rows unevenly, rank 0 evaluates alone), then frees them. During generation and scoring each rank holds
  the full weights, as verl's rollout does; the gradients and the optimizer state stay sharded.

Checkpoints hold full tensors (the same files as one process, so ``posttrain export``, ``from:`` and a
resume at another world size read them unchanged): :func:`full_state` gathers the weights to rank 0 and
:func:`load_full_state` shards rank 0's copy back out; the optimizer state is gathered to rank 0 tensor by
tensor (:func:`full_optimizer_state`) and read back one tensor at a time, each rank keeping its shard
(:func:`shard_like`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

BLOCK_LISTS = ("blocks", "layers", "h")  # names of the ModuleLists whose children are transformer blocks (h: GPT-2)
FORWARD_METHODS = ("logprobs",)  # root methods the trainers call instead of forward


def blocks(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``module``: the children of every ``nn.ModuleList`` called ``blocks``,
    ``layers`` or ``h`` (``GPT.blocks``; ``model.layers`` in most Hugging Face decoders, ``transformer.h`` in
    GPT-2's family)."""
    return [block for name, child in module.named_modules()
            if name.rsplit(".", 1)[-1] in BLOCK_LISTS and isinstance(child, nn.ModuleList) for block in child]


def shard(module: nn.Module, size: int, device: torch.device, precision: str) -> nn.Module:
    """``fully_shard`` each block of ``module``, then the root, over ``size`` ranks on ``device``'s type (in
    place; returns ``module``). Gradients are summed over the ranks (no divide, plain SUM: gloo has no
    pre-multiplied sum)."""
    mesh = init_device_mesh(device.type, (size,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if precision == "bf16-mixed" else MixedPrecisionPolicy())
    found = blocks(module)
    if not found:
        print(f"fsdp2: no transformer blocks found in {type(module).__name__} (no ModuleList named "
              f"{', '.join(BLOCK_LISTS)}): the whole model is one shard unit, gathered for every pass",
              file=sys.stderr)
    for block in found:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)
    for name in FORWARD_METHODS:
        if hasattr(module, name):
            register_fsdp_forward_method(module, name)
    for unit in units(module):
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return module


def units(module: nn.Module) -> list[FSDPModule]:
    """The sharded units of ``module`` (its blocks and the root), root last."""
    return [m for m in module.modules() if isinstance(m, FSDPModule)][::-1]


@contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Every unit's weights gathered on this rank for the duration (a collective: every rank enters together);
    inside, forwards make no collective call, so ranks may run different numbers of them. Not for backward
    passes (gradients would not be reduced)."""
    all_units = units(module)
    module.set_reshard_after_forward(False)
    for unit in all_units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in all_units:
            unit.reshard()
        for unit in all_units[:-1]:
            unit.set_reshard_after_forward(True, recurse=False)  # the blocks free their weights after forward,
        # the root keeps its own (FSDP's default: they are needed again at once by the backward)


def lockstep(count: int, device: torch.device) -> int:
    """The number of training passes every rank runs: the largest ``count`` over the ranks."""
    t = torch.tensor([count], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def grad_norm(module: nn.Module) -> torch.Tensor:
    """The global L2 norm of ``module``'s sharded gradients: each rank's shard norms², summed over ranks."""
    local = [p.grad.to_local().float().pow(2).sum() for p in module.parameters() if p.grad is not None]
    total = torch.stack(local).sum() if local else torch.zeros((), device=next(module.parameters()).device)
    dist.all_reduce(total)
    return total.sqrt()


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s full state dict on the CPU on rank 0 (every rank must call; the others get {})."""
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Shard rank 0's full ``state`` into ``module`` on every rank (every rank must call; only rank 0's
    ``state`` is read)."""
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def full_optimizer_state(optimizer: torch.optim.Optimizer, main: bool) -> dict:
    """``optimizer.state_dict()`` with every sharded tensor gathered whole, on the CPU of rank 0 (``main``); the
    other ranks help gather and keep nothing (every rank must call, in the same order)."""
    sd = optimizer.state_dict()
    state = {}
    for index, entry in sorted(sd["state"].items()):
        state[index] = {}
        for key, value in entry.items():
            whole = value.full_tensor() if isinstance(value, DTensor) else value
            state[index][key] = whole.cpu() if isinstance(whole, torch.Tensor) else whole
        if not main:
            state[index] = {}
    return {"state": state if main else {}, "param_groups": sd["param_groups"]}


def shard_like(optimizer: torch.optim.Optimizer):
    """A function (parameter index, state field, whole tensor) -> this rank's part of it: the shard of the
    parameter's placement for a tensor shaped like that parameter (AdamW's moments), else the tensor (``step``).
    For reading a full optimizer state one tensor at a time (posttrain/checkpoint.py: read_optimizer_state)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def cut(index: int, field: str, value: torch.Tensor) -> torch.Tensor:
        p = params[index]
        if isinstance(p, DTensor) and value.shape == p.shape:
            return distribute_tensor(value.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
        return value

    return cut
