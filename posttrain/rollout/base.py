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
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from posttrain.config_checks import ConfigError, check_choice, check_range
from posttrain.engine import RolloutBatch, SamplingParams

BACKENDS = {"local": "posttrain.rollout.local:LocalBackend", "ray": "posttrain.rollout.ray:RayBackend"}


class RolloutError(RuntimeError):
    """A rollout backend failed: a worker died, hung past ``rollout.timeout_s``, or answered with other weights."""


@dataclass
class RolloutConfig:
    """Where RL generates (``RLConfig.rollout``)."""

    backend: str = "local"  # local: the trainer's own KV-cache engine | ray: Ray actors, each a policy copy
    workers: int = 2  # ray: rollout workers (actors); whole prompt groups go to one worker
    worker_threads: int = 1  # ray: torch CPU threads per worker
    timeout_s: float = 600.0  # ray: a generation or weight sync that takes longer is an error naming the worker
    sync_every: int = 1  # ray: send new weights once the workers are this many policy versions behind (> 1:
    # off-policy rows by up to sync_every − 1 versions; pair it with is_correction; evaluation always syncs)
    ray_address: str | None = None  # ray: a cluster to join (None: a local Ray of the run's own; a Ray the caller
    # started already is used as it is)

    def __post_init__(self):
        check_choice("rollout.backend", self.backend, list(BACKENDS))
        if self.backend == "ray" and importlib.util.find_spec("ray") is None:  # said before any model loads
            raise ConfigError("rollout.backend=ray needs the package ray: pip install 'posttrain[ray]'")
        check_range("rollout.workers", self.workers, 1)
        check_range("rollout.worker_threads", self.worker_threads, 1)
        check_range("rollout.timeout_s", self.timeout_s, 0, low_open=True)
        check_range("rollout.sync_every", self.sync_every, 1)
        if self.backend == "local":  # a key the local engine would ignore is an error, not a silent no-op
            default = RolloutConfig.__dataclass_fields__
            changed = [f"rollout.{k}" for k in ("workers", "worker_threads", "timeout_s", "sync_every", "ray_address")
                       if getattr(self, k) != default[k].default]
            if changed:
                raise ConfigError(f"config key {', '.join(changed)} applies to rollout.backend=ray, and the backend "
                                  "is local: set rollout.backend=ray, or leave it out")


class RolloutBackend(Protocol):
    """What the RL loop and the evaluation need from a place that generates."""

    tokenizer: object
    version: int | None  # the policy version of the weights it generates with (None: not synced yet)

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams, seed: int | None = None,
                 seeds: list[int] | None = None) -> RolloutBatch: ...

    def update_weights(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def close(self) -> None: ...


def make_backend(config: RolloutConfig, model, tokenizer, processes: int = 1, precision: str = "fp32"
                 ) -> RolloutBackend:
    """The backend ``config.backend`` names around ``model`` (the policy, not synced yet: the first
    :func:`sync` sends the trainer's weights whatever their version), generating in the trainer's ``precision``,
    imported on first use (an optional dependency that is missing is a ConfigError saying what to install).
    Only ``local`` runs in each of several data-parallel processes; the others are driven by one trainer process."""
    if processes > 1 and config.backend != "local":
        raise ConfigError(f"rollout.backend={config.backend} is driven by one trainer process: run it without "
                          "nproc (its workers generate in parallel), or use rollout.backend=local")
    module, name = BACKENDS[config.backend].split(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except ImportError as err:
        raise ConfigError(f"rollout.backend={config.backend} needs the package {err.name}: "
                          f"pip install 'posttrain[{config.backend}]'") from None
    return cls(config, model, tokenizer, precision)


def sync(backend: RolloutBackend, policy, force: bool = False) -> float:
    """Bring ``backend`` to the trained ``policy``'s weights (a :class:`~posttrain.trainers.model_engine.
    ModelEngine`); returns the seconds it took (0: nothing sent). It sends them when the backend has none yet
    (the whole state dict), went back past the policy (a rollback), is ``backend.sync_every`` versions behind
    (1, the default: at every change) or ``force`` says so (evaluation); after the first, only the trainable
    parameters go (LoRA: the adapter), as nothing else changes."""
    if backend.version == policy.version:
        return 0.0
    behind = backend.version is None or backend.version > policy.version or \
        policy.version - backend.version >= getattr(backend, "sync_every", 1)
    if not (behind or force):
        return 0.0
    start = time.perf_counter()
    backend.update_weights(policy.version, policy.named_weights(trainable_only=backend.version is not None))
    return time.perf_counter() - start


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
