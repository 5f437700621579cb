"""``rollout.backend: ray``: rollout workers as Ray actors, each with a copy of the policy and the local
KV-cache engine (CPU threads of its own, or one GPU each).

* **Generation**: with W workers and P prompts, worker k generates the groups of prompts k, k + W, ... with
  those prompts' own seeds, so a group is the same whichever worker makes it and the batch, put back into
  prompt order (:func:`~posttrain.rollout.base.interleave`), equals the local engine's row for row.
* **Weight sync**: the trainer's weights go into Ray's object store once per sync (``ray.put``; the whole state
  dict first, then only the trainable parameters: LoRA's adapter) and every worker loads that one object; each
  worker answers every generation with the version it holds, and a version other than the one synced is an
  error, never a silently off-policy batch (``rollout.sync_every`` > 1 makes batches off-policy on purpose).
* **Precision**: workers generate under the trainer's autocast (mixed precisions) or with its bf16 weights
  (bf16-true), as the local engine does.
* **Failure**: the workers must fit Ray's free resources (else a ConfigError at once); every call waits at most
  ``rollout.timeout_s`` in all; a worker that died, raised or hangs ends the step with a
  :class:`RolloutError` naming the worker and Ray's reason.

Ray starts locally for the run (``ray.init(address="local")``, shut down with the run, also on errors) unless
``rollout.ray_address`` names a cluster to join, or the caller started Ray already (then that Ray is used and
left running). Under data parallelism rank 0 drives the workers (see :func:`~posttrain.rollout.base.sync` and
:class:`~posttrain.rollout.base.Follower`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from contextlib import nullcontext

import ray
import torch

from posttrain.config_checks import ConfigError
from posttrain.engine import Engine, RolloutBatch, SamplingParams
from posttrain.random_streams import group_seeds
from posttrain.rollout.base import RolloutConfig, RolloutError, interleave
from posttrain.tools import default_registry
from posttrain.trainers.model_engine import AUTOCAST_DTYPES


class RolloutWorker:
    """One actor: a policy copy on its device and the local engine over it, generating in the trainer's
    precision (``autocast``: the dtype of the trainer's mixed precision, or None)."""

    def __init__(self, model, tokenizer, threads: int, device: str, autocast: torch.dtype | None):
        torch.set_num_threads(threads)
        self.engine = Engine(model.to(device).eval(), tokenizer, default_registry())
        self.device, self.autocast, self.version = device, autocast, None

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams, seeds: list[int]
                 ) -> tuple[int | None, RolloutBatch]:
        """(the version of the weights that sampled, the groups of ``prompts``)."""
        with torch.autocast(self.device, dtype=self.autocast) if self.autocast else nullcontext():
            return self.version, self.engine.generate(prompts, n, params, seeds=seeds)

    def load(self, version: int, state: dict[str, torch.Tensor]) -> int:
        """Take ``state`` (the whole state dict, or the trainable part of it) as the weights of ``version``."""
        unexpected = self.engine.model.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise KeyError(f"weights this worker's model does not have: {unexpected[:3]}")
        self.version = version
        return version


class RayBackend:
    remote = True  # under data parallelism rank 0 drives the workers (rollout.base.Follower on the others)

    def __init__(self, config: RolloutConfig, model, tokenizer, precision: str = "fp32"):
        self.config, self.tokenizer, self.version, self.workers = config, tokenizer, None, []
        self.sync_every = config.sync_every
        self.started = not ray.is_initialized()  # else: the Ray the caller started (rollout.ray_address unused)
        if self.started:  # "local": a Ray of this run's own, even where RAY_ADDRESS or `ray start` name another
            ray.init(address=config.ray_address or "local", include_dashboard=False, logging_level="ERROR",
                     configure_logging=False, log_to_driver=False)  # a failing worker's reason comes back in its
            # error (RolloutError); its library warnings stay in Ray's log files
        try:
            gpu = next(model.parameters()).device.type == "cuda"
            self._check_resources(gpu)
            worker = ray.remote(num_cpus=config.worker_threads, num_gpus=1 if gpu else 0)(RolloutWorker)
            policy = ray.put(copy.deepcopy(model).cpu())  # one copy in the object store for every worker
            self.workers = [worker.remote(policy, tokenizer, config.worker_threads, "cuda" if gpu else "cpu",
                                          AUTOCAST_DTYPES.get(precision)) for _ in range(config.workers)]
        except BaseException:
            self.close()
            raise

    def _check_resources(self, gpu: bool) -> None:
        """ConfigError when Ray's cluster cannot place every worker at all (they would wait for resources until the
        timeout)."""
        free = ray.cluster_resources()
        need = {"CPU": self.config.workers * self.config.worker_threads}
        if gpu:
            need["GPU"] = self.config.workers
        short = {k: v for k, v in need.items() if free.get(k, 0) < v}
        if short:
            raise ConfigError(f"rollout.workers={self.config.workers} need {need} of Ray, which has "
                              f"{ {k: free.get(k, 0) for k in need} }: lower rollout.workers or "
                              "rollout.worker_threads (a GPU each on CUDA; the trainer's own GPU is not free)")

    def _wait(self, refs: list, what: str) -> list:
        """``ray.get`` of one call per worker (worker k: ``refs[k]``), all within ``rollout.timeout_s``."""
        deadline, out = time.monotonic() + self.config.timeout_s, []
        for k, ref in enumerate(refs):
            try:
                out.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
            except ray.exceptions.GetTimeoutError:
                raise RolloutError(f"rollout worker {k} did not finish {what} within rollout.timeout_s="
                                   f"{self.config.timeout_s:g} s (hung, or give it more time)") from None
            except ray.exceptions.RayActorError as err:
                raise RolloutError(f"rollout worker {k} died during {what}: {_line(err)}") from None
            except ray.exceptions.RayTaskError as err:
                raise RolloutError(f"rollout worker {k} failed during {what}: {_line(err)}") from None
        return out

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams, seed: int | None = None,
                 seeds: list[int] | None = None) -> RolloutBatch:
        """As :meth:`posttrain.engine.Engine.generate` (``seeds``, or ``seed`` for prompt i's
        ``group_seed(seed, i)``), made by the workers."""
        seeds = group_seeds(len(prompts), seed, seeds)
        if self.version is None:
            raise RolloutError("the rollout workers have not received the trainer's weights yet (update_weights)")
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
        try:
            for w in self.workers:
                ray.kill(w)
        finally:
            self.workers = []
            if self.started and ray.is_initialized():
                ray.shutdown()


def _line(err: Exception) -> str:
    """An error's text on one line, shortened."""
    return " ".join(str(err).split())[:500]
