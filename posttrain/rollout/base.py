"""The rollout-backend interface, its config, the lazy registry of backends, and the one piece of arithmetic
they share (putting prompt groups made in several places back into prompt order).

A backend generates ``n`` completions for each prompt, prompt i's group from its own seed ``seeds[i]``
(so a group is the same whichever worker makes it), and returns a :class:`~posttrain.engine.RolloutBatch` on
the CPU (token ids, the sampler's log-probs, masks, lengths, finished flags, tool counts). Its weights are
those of ``version``, the trainer's policy version they were last synced to (:meth:`update_weights`);
the trainer syncs before it generates or evaluates whenever its policy version differs (a new backend has none:
the first sync always sends the trainer's weights, as a resumed or rolled-back policy may have any version).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch

from posttrain.config_checks import ConfigError, check_choice, check_range
from posttrain.engine import RolloutBatch, SamplingParams

BACKENDS = {"local": "posttrain.rollout.local:LocalBackend", "ray": "posttrain.rollout.ray:RayBackend",
            "vllm": "posttrain.rollout.vllm:VllmBackend"}


class RolloutError(RuntimeError):
    """A rollout backend failed: a worker died, hung past ``rollout.timeout_s``, or answered with other weights."""


@dataclass
class VllmConfig:
    """A vLLM server that generates (``rollout.vllm``; posttrain/rollout/vllm.py)."""

    python: str | None = None  # the interpreter of an environment with vLLM (make vllm-env: .venv-vllm/bin/python);
    # posttrain starts the server on a snapshot of the policy and stops it with the run
    url: str | None = None  # or a server you started (http://host:port; dev mode, VLLM_SERVER_DEV_MODE=1,
    # --logprobs-mode processed_logprobs and --generation-config vllm), which must read snapshot_dir
    gpu_memory_utilization: float | None = None  # the server's share of its GPU (None: vLLM's default, 0.9; lower
    # it when the trainer shares that GPU)
    max_model_len: int | None = None  # the server's context length (None: the model's)
    startup_timeout_s: float = 600.0  # the server must answer /health within this
    snapshot_dir: str | None = None  # where the policy's weights are written for the server (None: a temporary
    # directory, removed with the run)
    args: list[str] = field(default_factory=list)  # further `vllm serve` flags, e.g. ["--enforce-eager"]

    def __post_init__(self):
        if self.gpu_memory_utilization is not None:
            check_range("rollout.vllm.gpu_memory_utilization", self.gpu_memory_utilization, 0, 1, low_open=True)
        if self.max_model_len is not None:
            check_range("rollout.vllm.max_model_len", self.max_model_len, 1)
        check_range("rollout.vllm.startup_timeout_s", self.startup_timeout_s, 0, low_open=True)

    def check(self) -> None:
        """ConfigError unless exactly one of python / url says where the server is (and python exists)."""
        if (self.python is None) == (self.url is None):
            raise ConfigError("rollout.backend=vllm needs exactly one of rollout.vllm.python (an interpreter with "
                              "vLLM: make vllm-env builds .venv-vllm/bin/python) or rollout.vllm.url (a running "
                              "server)")
        if self.python is not None and not os.access(self.python, os.X_OK):
            raise ConfigError(f"rollout.vllm.python={self.python} is not an executable interpreter (make vllm-env "
                              "builds .venv-vllm/bin/python)")


@dataclass
class RolloutConfig:
    """Where RL generates (``RLConfig.rollout``)."""

    backend: str = "local"  # local: the trainer's own KV-cache engine | ray: Ray actors, each a policy copy |
    # vllm: a vLLM server (HF models)
    workers: int = 2  # ray: rollout workers (actors); whole prompt groups go to one worker
    worker_threads: int = 1  # ray: torch CPU threads per worker
    timeout_s: float = 600.0  # ray, vllm: a generation or weight sync that takes longer is an error naming the
    # worker or server
    sync_every: int = 1  # ray, vllm: send new weights once the workers are this many policy versions behind (> 1:
    # off-policy rows by up to sync_every − 1 versions; pair it with is_correction; evaluation always syncs)
    max_staleness: int = 0  # ray, vllm: generate the rollouts of up to this many steps ahead while a step trains
    # (asynchronous RL; rows at most this many weight-changing steps old, counted in staleness/*; 0: synchronous)
    segment_tokens: int = 0  # partial rollouts (Kimi k1.5): a completion longer than this many new tokens in one
    # step is parked and continued in a later step with newer weights, up to max_new_tokens in all (0: off)
    ray_address: str | None = None  # ray: a cluster to join (None: a local Ray of the run's own; a Ray the caller
    # started already is used as it is)
    vllm: VllmConfig = field(default_factory=VllmConfig)  # vllm: the server

    def __post_init__(self):
        check_choice("rollout.backend", self.backend, list(BACKENDS))
        if self.backend == "ray" and importlib.util.find_spec("ray") is None:  # said before any model loads
            raise ConfigError("rollout.backend=ray needs the package ray: pip install 'posttrain[ray]'")
        check_range("rollout.workers", self.workers, 1)
        check_range("rollout.worker_threads", self.worker_threads, 1)
        check_range("rollout.timeout_s", self.timeout_s, 0, low_open=True)
        check_range("rollout.sync_every", self.sync_every, 1)
        check_range("rollout.max_staleness", self.max_staleness, 0, note=" (0: synchronous)")
        check_range("rollout.segment_tokens", self.segment_tokens, 0, note=" (0: off)")
        if self.max_staleness and self.sync_every > 1:
            raise ConfigError("rollout.sync_every > 1 and rollout.max_staleness > 0 both let rows lag the policy: "
                              "use rollout.max_staleness alone (it bounds the lag and counts it)")
        if self.backend == "vllm":
            self.vllm.check()

    def check_keys(self, backends: tuple[str, ...], generates: bool = True) -> None:
        """A key set for a backend none of ``backends`` is (the run's, and the evaluation's) is an error, not a
        silent no-op; so is a vLLM server nobody says how to reach. ``rollout.sync_every`` counts only for a
        backend that generates rollouts (``generates``: ``self.backend`` does; evaluation always syncs)."""
        if "vllm" in backends:
            self.vllm.check()
        syncing = {self.backend} if generates else set()
        changed = [key for key, owners in _OWNERS.items() if _changed(self, key) and
                   not set(owners) & (syncing if key in _ROLLOUT_ONLY else set(backends))]
        if changed:
            owners = sorted({o for key in changed for o in _OWNERS[key]})
            raise ConfigError(f"config key {', '.join(changed)} applies to rollout.backend="
                              f"{' or '.join(owners)}, and the backend is {backends[0]}"
                              f"{f' (evaluation: {backends[1]})' if len(backends) > 1 else ''}: set "
                              f"rollout.backend={owners[0]}, or leave it out")


# Which backends read each key of RolloutConfig (the others reject it when set).
_OWNERS = {"rollout.workers": ("ray",), "rollout.worker_threads": ("ray",), "rollout.ray_address": ("ray",),
           "rollout.timeout_s": ("ray", "vllm"), "rollout.sync_every": ("ray", "vllm"),
           "rollout.max_staleness": ("ray", "vllm"),
           **{f"rollout.vllm.{k}": ("vllm",) for k in VllmConfig.__dataclass_fields__}}


_ROLLOUT_ONLY = ("rollout.sync_every", "rollout.max_staleness")  # keys of the rollout's backend, not evaluation's


def _changed(config: RolloutConfig, dotted: str) -> bool:
    """Whether the key ``rollout.a`` / ``rollout.vllm.b`` differs from its default."""
    *section, key = dotted.split(".")[1:]
    owner = config.vllm if section else config
    default = type(owner)()
    return getattr(owner, key) != getattr(default, key)


class RolloutBackend(Protocol):
    """What the RL loop and the evaluation need from a place that generates."""

    tokenizer: object
    version: int | None  # the policy version of the weights it generates with (None: not synced yet)

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams, seed: int | None = None,
                 seeds: list[int] | None = None) -> RolloutBatch: ...

    def update_weights(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def close(self) -> None: ...


class Follower:
    """What a data-parallel rank other than 0 holds for a backend that rank 0 drives (Ray workers, a vLLM server):
    the version its weights are at, so every rank takes the same sync decisions; rank 0 generates for all of them
    (:func:`~posttrain.trainers.rollout.generate_groups`) and the batch is broadcast."""

    remote = True

    def __init__(self, config: RolloutConfig, tokenizer):
        self.tokenizer, self.version, self.sync_every, self.backend = tokenizer, None, config.sync_every, config.backend

    def generate(self, *args, **kwargs) -> RolloutBatch:
        raise RuntimeError(f"rollout.backend={self.backend} generates on rank 0 only")

    def update_weights(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.version = version

    def close(self) -> None:
        pass


def make_backend(config: RolloutConfig, model, tokenizer, processes: int = 1, precision: str = "fp32",
                 rank: int = 0) -> RolloutBackend:
    """The backend ``config.backend`` names around ``model`` (the policy, not synced yet: the first
    :func:`sync` sends the trainer's weights whatever their version), generating in the trainer's ``precision``,
    imported on first use (an optional dependency that is missing is a ConfigError saying what to install).
    ``local`` runs in each of several data-parallel processes; the others are driven by rank 0 (the other
    ``processes`` get a :class:`Follower`)."""
    if processes > 1 and config.backend != "local" and rank != 0:
        return Follower(config, tokenizer)
    module, name = BACKENDS[config.backend].split(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except ImportError as err:
        raise ConfigError(f"rollout.backend={config.backend} needs the package {err.name}: "
                          f"pip install 'posttrain[{config.backend}]'") from None
    return cls(config, model, tokenizer, precision)


def sync_due(have: int | None, want: int, every: int = 1, force: bool = False) -> bool:
    """Whether a backend at version ``have`` (None: no weights yet) needs the policy's version ``want``: when it has
    none, went back past it (a rollback), is ``every`` versions behind, or ``force`` says so (evaluation)."""
    if have == want:
        return False
    return have is None or have > want or want - have >= every or force


def sync(backend: RolloutBackend, policy, force: bool = False) -> float:
    """Bring ``backend`` to the trained ``policy``'s weights (a :class:`~posttrain.trainers.model_engine.
    ModelEngine`, or anything with ``version`` and ``named_weights``) when :func:`sync_due` (``sync_every``: the
    backend's); returns the seconds it took (0: nothing sent). After the first sync only the trainable parameters
    go (LoRA: the adapter), as nothing else changes.
    Data parallel with a backend rank 0 drives: every rank decides alike (a :class:`Follower` keeps the version),
    gathers the weights together (FSDP2), rank 0 sends them, and its error, if any, is raised on every rank."""
    if not sync_due(backend.version, policy.version, getattr(backend, "sync_every", 1), force):
        return 0.0
    start = time.perf_counter()
    world = getattr(policy, "world", None)
    with policy.gathered() if hasattr(policy, "gathered") else nullcontext():
        weights = policy.named_weights(trainable_only=backend.version is not None)
        if world is not None and world.size > 1 and getattr(backend, "remote", False):
            whole = list(full_tensors(weights))  # (FSDP2: a collective, so on every rank, in the same order)
            world.on_main(lambda: backend.update_weights(policy.version, whole))
            backend.version = policy.version
        else:
            backend.update_weights(policy.version, weights)
    return time.perf_counter() - start


def sync_later(backend: RolloutBackend, policy, have: int | None) -> Callable[[], float]:
    """A weight sync to run later (the asynchronous queue), of the weights the policy has now: they are gathered
    now (FSDP2: a collective, so every rank calls this in the same order) and copied to the CPU, so training may
    change the policy before the sync runs. ``have``: the version the backend will hold when the sync runs.
    The returned job sends them (on rank 0 for a backend rank 0 drives; the other ranks' :class:`Follower` only
    takes the version) and returns its seconds."""
    version, follower = policy.version, isinstance(backend, Follower)
    with policy.gathered() if hasattr(policy, "gathered") else nullcontext():
        whole = full_tensors(policy.named_weights(trainable_only=have is not None))
        weights = [(name, tensor.detach().to("cpu", copy=True)) for name, tensor in whole if not follower]

    def send() -> float:
        start = time.perf_counter()
        backend.update_weights(version, weights)  # (a Follower: none, it takes the version)
        return time.perf_counter() - start

    return send


def full_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
    """``named`` with each DTensor (an FSDP2 parameter) as the whole tensor it shards."""
    for name, tensor in named:
        yield name, tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def interleave(parts: list[RolloutBatch], prompts: int, group_size: int, pad_id: int) -> RolloutBatch:
    """One batch in prompt order from ``parts``, where part k holds the groups of prompts k, k + K, k + 2K, ...
    (K = len(parts)) in that order; group ids are the prompt indices again."""
    if len(parts) == 1:
        return parts[0]
    whole = RolloutBatch.concat(parts, pad_id)
    starts = [0]
    for part in parts[:-1]:
        starts.append(starts[-1] + len(part.lengths))
    k = len(parts)
    rows = [starts[i % k] + (i // k) * group_size + j for i in range(prompts) for j in range(group_size)]
    ordered = whole.select(torch.tensor(rows))
    ordered.group_ids = torch.arange(prompts).repeat_interleave(group_size)
    return ordered
