"""Rollout throughput on a Hugging Face model: the posttrain engine against ``model.generate``.

Both sample ``--samples`` completions for each of ``--prompts`` prompts from the same HF causal LM,
with the same sampling (temperature 1, top-k 50) and the **same lengths**: every row runs to exactly
``--max-new-tokens`` (``min_new_tokens`` for ``generate``; no stop tokens for the engine), so both do
the same number of decode steps for the same rows.

* **HF generate** (the baseline): ``model.generate(input_ids, attention_mask, do_sample=True,
  num_return_sequences=n, ...)`` on the left-padded batch of prompts, the way TRL's trainers sample
  without vLLM: each prompt is copied n times before the prefill.
* **engine**: ``Engine.generate(prompts, n, ...)`` on ``models.hf.HFPolicy``: each distinct prompt is
  prefilled once and its KV cache replicated to its n rows.

Tokens per second = completion tokens produced ÷ wall time, median of ``--repeats`` runs that go
round-robin over both (a busy machine slows both alike) after one warm-up each. The model is
``--model`` (an HF dir or a .gguf file), or by default a random Llama built locally
(``models.tiny_llama``, sizes below). Two scenarios: GSM8K test prompts in the ``hash`` format
(the question with its answer-format instruction, through the chat template), and the built-in
arithmetic task's short prompts. The last line is ``RESULT speedup=<engine tokens/s ÷ generate
tokens/s>`` on the GSM8K prompts.
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

from posttrain.engine import Engine, SamplingParams
from posttrain.models.hf import load_hf
from posttrain.models.tiny_llama import make_tiny_llama
from posttrain.tasks.arithmetic import ArithmeticTask
from posttrain.tasks.gsm8k import GSM8KTask, load_splits

sys.path.insert(0, str(Path(__file__).parent))
from rollout import cpu_name  # noqa: E402


@torch.inference_mode()
def hf_generate(policy, prompts: list[list[int]], n: int, params: SamplingParams, pad_id: int, seed: int) -> int:
    """Completion tokens sampled by ``model.generate`` (every row runs to max_new_tokens)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], attn[i, width - len(p):] = torch.tensor(p), 1
    torch.manual_seed(seed)
    out = policy.hf.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=params.temperature,
                             top_k=params.top_k, top_p=1.0, num_return_sequences=n,
                             max_new_tokens=params.max_new_tokens, min_new_tokens=params.max_new_tokens,
                             pad_token_id=pad_id)
    return (out.shape[1] - width) * out.shape[0]


def engine_generate(engine: Engine, prompts: list[list[int]], n: int, params: SamplingParams, seed: int) -> int:
    batch = engine.generate(prompts, n, params, seed=seed)
    return int(batch.mask.sum())


def run_scenario(policy, engine, prompts, args, params, pad_id) -> dict[str, tuple[int, list[float]]]:
    methods = {
        "HF model.generate": lambda p, s: hf_generate(policy, p, args.samples, params, pad_id, s),
        "posttrain engine": lambda p, s: engine_generate(engine, p, args.samples, params, s),
    }
    for fn in methods.values():  # warm-up: one prompt
        fn(prompts[:1], 0)
    times: dict[str, list[float]] = {m: [] for m in methods}
    tokens: dict[str, int] = {}
    for r in range(args.repeats):
        for m, fn in methods.items():
            t0 = time.perf_counter()
            tokens[m] = fn(prompts, args.seed + r)
            times[m].append(time.perf_counter() - t0)
    return {m: (tokens[m], times[m]) for m in methods}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="an HF model dir or .gguf file (default: a random local Llama)")
    ap.add_argument("--hidden", type=int, default=256, help="random Llama: hidden size")
    ap.add_argument("--layers", type=int, default=4, help="random Llama: layers")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"),
                    help="GSM8K data dir (train/test .jsonl)")
    ap.add_argument("--prompts", type=int, default=8, help="first P problems of each test split")
    ap.add_argument("--samples", type=int, default=16, help="completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per method (median is reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    task = ArithmeticTask()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or str(make_tiny_llama(tmp, task.corpus(random.Random(0)), vocab_size=2048,
                                                 hidden_size=args.hidden, layers=args.layers, heads=8, kv_heads=4))
        policy, tokenizer = load_hf(path)
    policy.eval()
    engine = Engine(policy, tokenizer, tools=None)
    engine.stop_ids = set()  # same lengths as generate(min_new_tokens=max_new_tokens): no row stops early
    params = SamplingParams(temperature=1.0, top_k=50, max_new_tokens=args.max_new_tokens)
    gsm8k = GSM8KTask(*load_splits(args.data, args.prompts))
    scenarios = {
        "gsm8k": [tokenizer.render_for_completion(gsm8k.prompt(p)) for p in gsm8k.test[: args.prompts]],
        "arithmetic": [tokenizer.render_for_completion(task.prompt(p)) for p in task.test[: args.prompts]],
    }

    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {load} (1/5/15 min)")
    cfg = policy.hf.config
    print(f"model: {args.model or 'random Llama (models.tiny_llama)'}: {type(policy.hf).__name__} "
          f"{cfg.num_hidden_layers}L/{cfg.hidden_size}d, {policy.num_params():,} params, vocab {tokenizer.vocab_size}")
    print(f"rollout: {args.prompts} prompts x {args.samples} samples, temperature 1, top-k 50, exactly "
          f"{args.max_new_tokens} new tokens per row; median of {args.repeats} runs after a warm-up\n")
    t_start = time.perf_counter()
    header = (f"{'scenario':<12} {'method':<20} {'tokens':>7} {'median s':>9} {'(min-max)':>15} {'tokens/s':>9} "
              f"{'ratio':>7}")
    rows, speedups = [], {}
    for name, prompts in scenarios.items():
        lens = [len(p) for p in prompts]
        print(f"[{name}] prompt lengths {min(lens)}-{max(lens)} tokens ...", flush=True)
        res = run_scenario(policy, engine, prompts, args, params, tokenizer.pad_id)
        rates = {m: tok / statistics.median(secs) for m, (tok, secs) in res.items()}
        base = rates["HF model.generate"]
        for m, (tok, secs) in res.items():
            rows.append(f"{name:<12} {m:<20} {tok:>7} {statistics.median(secs):>9.3f} "
                        f"{f'({min(secs):.3f}-{max(secs):.3f})':>15} {rates[m]:>9.0f} {rates[m] / base:>6.2f}x")
        speedups[name] = rates["posttrain engine"] / base
    print("\n" + header + "\n" + "-" * len(header) + "\n" + "\n".join(rows))
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; load average at the end {load}")
    print(f"RESULT speedup={speedups['gsm8k']:.2f}")


if __name__ == "__main__":
    main()
