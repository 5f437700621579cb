"""Rollout backends on this machine: the local engine, Ray rollout workers, a vLLM server and HF ``generate``, same
model, prompts and sampling settings.

* **local, 1 thread** and **local, 2 threads**: ``rollout.backend: local`` (the trainer's own KV-cache engine);
  2 threads is what a CPU user runs without workers;
* **Ray, 2 workers × 1 thread**: ``rollout.backend: ray`` (actors on a local ``ray.init``); worker k generates
  the groups of prompts k, k + 2, ..., the rows come back through Ray's object store;
* **vLLM (CPU build)**: ``rollout.backend: vllm``, a server started from ``--vllm-python`` (default
  ``.venv-vllm/bin/python``, ``make vllm-env``) with ``VLLM_CPU_KVCACHE_SPACE=1``; skipped when it is missing;
* **HF generate**: ``model.generate`` on the left-padded prompts, ``num_return_sequences`` = samples, the same
  temperature and top-k, 2 threads (the baseline a TRL user starts from).

Every variant samples ``--samples`` completions for each of ``--prompts`` arithmetic prompts (the built-in task's
word problems, through the model's chat template). Local and Ray use the same group seeds and make the **same
rows** (checked); vLLM and HF sample with their own generators (same distribution, other draws), so each
variant's tokens/s is its own completion tokens ÷ wall time, median of ``--repeats`` round-robin runs after one
warm-up each. The model is ``--model`` (an HF dir or a .gguf file, which the vLLM backend writes out as
safetensors) or by default a random Llama built locally with head_dim 64 (``models.tiny_llama``; sizes below).
Weight sync: the seconds of each backend's ``update_weights`` (Ray: the state dict into the object store, every
worker loading it; vLLM: the safetensors snapshot written, then ``reload_weights`` and a prefix-cache reset), per
GB of weights. Last line: ``RESULT vllm_vs_local=<vLLM tokens/s ÷ local 2-thread tokens/s>``.

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
from posttrain.engine import SamplingParams, left_pad
from posttrain.random_streams import group_seed
from posttrain.rollout.base import RolloutConfig, VllmConfig, make_backend
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
    ap.add_argument("--vllm-python", default=str(Path(__file__).parents[1] / ".venv-vllm" / "bin" / "python"))
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
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
        vllm = VllmConfig(python=args.vllm_python, max_model_len=512)
        if os.access(args.vllm_python, os.X_OK):
            variants["vLLM (CPU build)"] = ("vllm", 2)
        else:
            print(f"vLLM: skipped, no interpreter at {args.vllm_python} (make vllm-env)")
        backends = {name: make_backend(RolloutConfig(backend=kind, **({"vllm": vllm} if kind == "vllm" else {
            "workers": 2, "worker_threads": 1} if kind == "ray" else {})), policy, tok)
            for name, (kind, _) in variants.items()}
        times: dict[str, list[float]] = {name: [] for name in [*variants, "HF generate"]}
        tokens: dict[str, int] = {}
        rows = {}
        try:
            for name, backend in backends.items():  # the trainer's weights (version 0), then a warm-up
                backend.update_weights(0, policy.state_dict().items())
                torch.set_num_threads(variants[name][1])
                backend.generate(prompts[:1], 2, params, seeds=seeds[:1])
            hf_generate(policy, tok, prompts[:1], 2, params)
            for _ in range(args.repeats):
                for name, backend in backends.items():
                    torch.set_num_threads(variants[name][1])
                    start = time.perf_counter()
                    rows[name] = backend.generate(prompts, args.samples, params, seeds=seeds)
                    times[name].append(time.perf_counter() - start)
                    tokens[name] = int(rows[name].mask.sum())
                torch.set_num_threads(2)
                start = time.perf_counter()
                tokens["HF generate"] = hf_generate(policy, tok, prompts, args.samples, params)
                times["HF generate"].append(time.perf_counter() - start)
            first = rows["local, 1 thread"]
            assert all(torch.equal(rows[name].completion_ids, first.completion_ids) for name in
                       ("local, 2 threads", "Ray, 2 workers × 1 thread")), "local and Ray rows differ"
            weights = dict(policy.state_dict())
            gigabytes = sum(v.numel() * v.element_size() for v in weights.values()) / 1e9
            sync = {name: [] for name, (kind, _) in variants.items() if kind != "local"}
            for version in range(1, args.repeats + 1):
                for name in sync:
                    start = time.perf_counter()
                    backends[name].update_weights(version, weights.items())
                    sync[name].append(time.perf_counter() - start)
        finally:
            for backend in backends.values():
                backend.close()
    speed = {name: tokens[name] / statistics.median(t) for name, t in times.items()}
    print(f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}; model {args.model or 'random Llama'} "
          f"({sum(v.numel() for v in weights.values()) / 1e6:.1f} M parameters), {args.prompts} prompts × "
          f"{args.samples} samples, up to {args.max_new_tokens} new tokens")
    print("| backend | completion tokens | s per run, median (min–max) | tokens/s | vs local, 2 threads |\n"
          "|---|---:|---:|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {tokens[name]} | {statistics.median(t):.3f} ({min(t):.3f}–{max(t):.3f}) | "
              f"{speed[name]:.0f} | {speed[name] / speed['local, 2 threads']:.2f}× |")
    for name, seconds in sync.items():
        print(f"{name} weight sync: {statistics.median(seconds):.3f} s for {gigabytes * 1e3:.1f} MB "
              f"({statistics.median(seconds) / gigabytes:.2f} s per GB), median of {len(seconds)}")
    print(f"RESULT ray_vs_local={speed['Ray, 2 workers × 1 thread'] / speed['local, 2 threads']:.2f}")
    if "vLLM (CPU build)" in speed:
        print(f"RESULT vllm_vs_local={speed['vLLM (CPU build)'] / speed['local, 2 threads']:.2f}")


@torch.inference_mode()
def hf_generate(policy, tok, prompts: list[list[int]], samples: int, params: SamplingParams) -> int:
    """HF ``generate`` of ``samples`` completions per prompt (left-padded batch) → completion tokens made (up to and
    with the first stop token)."""
    ids, real = left_pad(prompts, tok.pad_id)
    out = policy.hf.generate(input_ids=ids, attention_mask=real.long(), do_sample=True,
                             temperature=params.temperature, top_k=params.top_k or 0, top_p=params.top_p or 1.0,
                             max_new_tokens=params.max_new_tokens, num_return_sequences=samples,
                             pad_token_id=tok.pad_id, eos_token_id=tok.stop_ids)
    made = out[:, ids.shape[1]:]  # (B·n, T)
    stopped = torch.isin(made, torch.tensor(tok.stop_ids))
    ends = torch.where(stopped.any(-1), stopped.float().argmax(-1) + 1, made.shape[1])  # (B·n,)
    return int(ends.sum())


if __name__ == "__main__":
    main()
