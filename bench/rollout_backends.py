"""Rollout backends on this machine: the local engine against Ray rollout workers, same model, prompts and seeds.

* **local, 1 thread** and **local, 2 threads**: ``rollout.backend: local`` (the trainer's own KV-cache engine);
  2 threads is what a CPU user runs without workers;
* **Ray, 2 workers × 1 thread**: ``rollout.backend: ray`` (actors on a local ``ray.init``); worker k generates
  the groups of prompts k, k + 2, ..., the rows come back through Ray's object store.

Every variant samples ``--samples`` completions for each of ``--prompts`` arithmetic prompts (the built-in task's
word problems, through the model's chat template) with the same group seeds, so all three make the **same
rows** (checked) and tokens/s compare like for like (completion tokens ÷ wall time, median of ``--repeats``
round-robin runs after one warm-up each). The model is ``--model`` (an HF dir or a .gguf file) or by default a
random Llama built locally with head_dim 64 (``models.tiny_llama``; sizes below). Weight sync: the seconds of
``update_weights`` (the state dict into the object store, every worker loading it), per GB of weights. Last
line: ``RESULT ray_vs_local=<Ray tokens/s ÷ local 2-thread tokens/s>``.

    python bench/rollout_backends.py
    python bench/rollout_backends.py --model /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from posttrain.checkpoint import load_policy
from posttrain.config import LoraConfig, ModelConfig
from posttrain.engine import SamplingParams
from posttrain.random_streams import group_seed
from posttrain.rollout.base import RolloutConfig, make_backend
from posttrain.tasks.arithmetic import ArithmeticTask

sys.path.insert(0, str(Path(__file__).parent))
from rollout import cpu_name  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="an HF model dir or .gguf file (default: a random local Llama, head_dim 64)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            from posttrain.models.tiny_llama import make_tiny_llama

            texts = ArithmeticTask(test_size=8).corpus(random.Random(0), n=300)
            path = str(make_tiny_llama(Path(tmp) / "llama", texts, vocab_size=400, hidden_size=256, layers=4,
                                       heads=4, kv_heads=2))
        policy, tok = load_policy(ModelConfig(path), LoraConfig())
        policy.eval()
        task = ArithmeticTask(test_size=args.prompts)
        prompts = [tok.render_for_completion(task.prompt(p)) for p in task.test[: args.prompts]]
        seeds = [group_seed(0, i) for i in range(len(prompts))]
        params = SamplingParams(temperature=1.0, top_k=50, top_p=None, max_new_tokens=args.max_new_tokens)
        variants = {"local, 1 thread": ("local", 1), "local, 2 threads": ("local", 2),
                    "Ray, 2 workers × 1 thread": ("ray", 1)}
        backends = {name: make_backend(RolloutConfig(backend=kind, workers=2, worker_threads=1), policy, tok)
                    for name, (kind, _) in variants.items()}
        times: dict[str, list[float]] = {name: [] for name in variants}
        rows = {}
        try:
            for name, backend in backends.items():  # the trainer's weights (version 0), then a warm-up
                backend.update_weights(0, policy.state_dict().items())
                torch.set_num_threads(variants[name][1])
                backend.generate(prompts[:1], 2, params, seeds=seeds[:1])
            for _ in range(args.repeats):
                for name, backend in backends.items():
                    torch.set_num_threads(variants[name][1])
                    start = time.perf_counter()
                    rows[name] = backend.generate(prompts, args.samples, params, seeds=seeds)
                    times[name].append(time.perf_counter() - start)
            first = next(iter(rows.values()))
            assert all(torch.equal(b.completion_ids, first.completion_ids) for b in rows.values()), "rows differ"
            weights = dict(policy.state_dict())
            gigabytes = sum(v.numel() * v.element_size() for v in weights.values()) / 1e9
            ray_backend = backends["Ray, 2 workers × 1 thread"]
            sync = []
            for version in range(1, args.repeats + 1):
                start = time.perf_counter()
                ray_backend.update_weights(version, weights.items())
                sync.append(time.perf_counter() - start)
        finally:
            for backend in backends.values():
                backend.close()
    tokens = int(first.mask.sum())
    speed = {name: tokens / statistics.median(t) for name, t in times.items()}
    print(f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}; model {args.model or 'random Llama'} "
          f"({sum(v.numel() for v in weights.values()) / 1e6:.1f} M parameters), {args.prompts} prompts × "
          f"{args.samples} samples, up to {args.max_new_tokens} new tokens, {tokens} completion tokens per run")
    print("| backend | s per run, median (min–max) | tokens/s | vs local, 2 threads |\n|---|---:|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.3f} ({min(t):.3f}–{max(t):.3f}) | {speed[name]:.0f} | "
              f"{speed[name] / speed['local, 2 threads']:.2f}× |")
    print(f"Ray weight sync: {statistics.median(sync):.3f} s for {gigabytes * 1e3:.1f} MB "
          f"({statistics.median(sync) / gigabytes:.2f} s per GB), median of {len(sync)}")
    print(f"RESULT ray_vs_local={speed['Ray, 2 workers × 1 thread'] / speed['local, 2 threads']:.2f}")


if __name__ == "__main__":
    main()
