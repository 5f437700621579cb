"""``rollout.backend: local``: the trainer's own KV-cache engine (posttrain/engine.py) on the policy itself,
so its weights are always the trainer's and a weight sync only moves the version. It is the engine as far as
a caller can tell (the same ``generate`` arguments, its other attributes), so a task's ``evaluate`` written
for the engine works unchanged."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from posttrain.engine import Engine, RolloutBatch, SamplingParams
from posttrain.tools import default_registry


class LocalBackend:
    def __init__(self, config, model, tokenizer, precision: str = "fp32"):
        self.engine = Engine(model, tokenizer, default_registry())
        self.tokenizer = tokenizer
        self.version: int | None = None  # the first sync only records the trainer's version

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams, seed: int | None = None,
                 share_prefix: bool = True, seeds: list[int] | None = None) -> RolloutBatch:
        return self.engine.generate(prompts, n, params, seed=seed, share_prefix=share_prefix, seeds=seeds)

    def __getattr__(self, name: str):
        return getattr(self.engine, name)  # model, tools, stop_ids: what the engine offers

    def update_weights(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Nothing to copy: the engine runs the trained module itself."""
        self.version = version

    def close(self) -> None:
        pass
