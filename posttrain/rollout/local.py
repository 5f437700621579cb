"""``rollout.backend: local``: the trainer's own KV-cache engine (posttrain/engine.py) on the policy itself,
so its weights are always the trainer's and a weight sync only moves the version."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from posttrain.engine import Engine, RolloutBatch, SamplingParams
from posttrain.tools import default_registry


class LocalBackend:
    def __init__(self, config, model, tokenizer):
        self.engine = Engine(model, tokenizer, default_registry())
        self.tokenizer = tokenizer
        self.version = 0

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams, *,
                 seeds: list[int]) -> RolloutBatch:
        return self.engine.generate(prompts, n, params, seeds=seeds)

    def update_weights(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Nothing to copy: the engine runs the trained module itself."""
        self.version = version

    def close(self) -> None:
        pass
