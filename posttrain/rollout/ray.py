"""``rollout.backend: ray``: rollout workers as Ray actors, each with a copy of the policy and the local
KV-cache engine (CPU threads of its own, or one GPU each).

* **Generation**: with W workers and P prompts, worker k generates the groups of prompts k, k + W, ... with
  those prompts' own seeds, so a group is the same whichever worker makes it and the batch, put back into
  prompt order (:func:`~posttrain.rollout.base.interleave`), equals the local engine's row for row.
* **Weight sync**: the trainer's weights go into Ray's object store once per policy version (``ray.put``) and
  every worker loads that one object; each worker answers every generation with the version it holds, and
  a version other than the one synced is an error, never a silently off-policy batch.
* **Failure**: every remote call waits at most ``rollout.timeout_s``; a worker that died or hangs ends the
  step with a :class:`RolloutError` naming the worker and Ray's reason.

Ray starts locally for the run (``ray.init``, shut down with the run) unless ``rollout.ray_address`` names a
cluster to join. Only one trainer process drives the workers (data parallelism with this backend is refused).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import ray
import torch

from posttrain.engine import Engine, RolloutBatch, SamplingParams
from posttrain.rollout.base import RolloutConfig, RolloutError, interleave
from posttrain.tools import default_registry


class RolloutWorker:
    """One actor: a policy copy on its device and the local engine over it."""

    def __init__(self, model, tokenizer, threads: int, device: str):
        torch.set_num_threads(threads)
        self.engine = Engine(model.to(device).eval(), tokenizer, default_registry())
        self.version = 0

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams, seeds: list[int]
                 ) -> tuple[int, RolloutBatch]:
        """(the version of the weights that sampled, the groups of ``prompts``)."""
        return self.version, self.engine.generate(prompts, n, params, seeds=seeds)

    def load(self, version: int, state: dict[str, torch.Tensor]) -> int:
        self.engine.model.load_state_dict(state)
        self.version = version
        return version


class RayBackend:
    def __init__(self, config: RolloutConfig, model, tokenizer):
        self.config, self.tokenizer, self.version = config, tokenizer, 0
        self.started = not ray.is_initialized()
        if self.started:
            ray.init(address=config.ray_address, include_dashboard=False, logging_level="ERROR",
                     configure_logging=False)
        device = next(model.parameters()).device
        gpu = device.type == "cuda"
        worker = ray.remote(num_cpus=config.worker_threads, num_gpus=1 if gpu else 0)(RolloutWorker)
        policy = ray.put(copy.deepcopy(model).cpu())  # one copy in the object store for every worker
        self.workers = [worker.remote(policy, tokenizer, config.worker_threads, "cuda" if gpu else "cpu")
                        for _ in range(config.workers)]

    def _wait(self, refs: list, what: str) -> list:
        """``ray.get`` of one call per worker (worker k: ``refs[k]``), each within ``rollout.timeout_s``."""
        out = []
        for k, ref in enumerate(refs):
            try:
                out.append(ray.get(ref, timeout=self.config.timeout_s))
            except ray.exceptions.GetTimeoutError:
                raise RolloutError(f"rollout worker {k} did not finish {what} within rollout.timeout_s="
                                   f"{self.config.timeout_s:g} s (hung, or give it more time)") from None
            except ray.exceptions.RayActorError as err:
                reason = " ".join(str(err).split())[:500]
                raise RolloutError(f"rollout worker {k} died during {what}: {reason}") from None
        return out

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams, *,
                 seeds: list[int]) -> RolloutBatch:
        k = min(len(self.workers), len(prompts))
        refs = [self.workers[w].generate.remote(prompts[w::k], n, params, seeds[w::k]) for w in range(k)]
        answers = self._wait(refs, "a generation")
        for w, (version, _) in enumerate(answers):
            if version != self.version:
                raise RolloutError(f"rollout worker {w} generated with policy version {version}, expected "
                                   f"{self.version}: its weights were not synced")
        return interleave([batch for _, batch in answers], len(prompts), n, self.tokenizer.pad_id)

    def update_weights(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        state = ray.put({name: tensor.detach().cpu() for name, tensor in named_tensors})
        self._wait([w.load.remote(version, state) for w in self.workers], f"the weight sync to version {version}")
        self.version = version

    def close(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []
        if self.started and ray.is_initialized():
            ray.shutdown()
