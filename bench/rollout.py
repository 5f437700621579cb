"""Rollout throughput of the engine: sampled tokens per second, 16 samples per prompt.

Three ways to sample the same completions are timed in one run, on the same model and prompts with the
same ``SamplingParams`` (temperature 1, top-k 50, stop at ``<|assistant_end|>``, no tools):

* **full recompute** (the baseline): no KV cache. Each step runs the model on the whole sequence so far
  (prompt + sampled tokens) of every row still going and samples from the last position with the
  engine's own ``sample_tokens`` and random streams (prompt i's group seed is ``group_seed(seed, i)``, as in
  ``Engine.generate(..., seed)``); finished rows leave the batch, as in the engine. Prompts are done one
  group at a time (16 identical rows), so no padding is needed: the model's no-cache forward has no
  padding mask.
* **engine, no prefix sharing**: ``Engine.generate(..., share_prefix=False)``; all rows are left-padded
  into one batch and each of them prefills its prompt.
* **engine**: ``Engine.generate(..., share_prefix=True)``; each distinct prompt is prefilled once and
  its KV cache replicated to its 16 rows.

Throughput counts the tokens actually sampled (``RolloutBatch.mask.sum()``, stop tokens included; the
same count for the baseline) divided by the median wall time of ``--repeats`` timed runs, which go
round-robin over the methods (so a busy machine slows all of them alike) after a warm-up of each on
one prompt. The model is the built-in GPT at the demo's size with random weights
(``torch.manual_seed(0)``): a random model mostly samples until ``max_new_tokens``, which is a fair
throughput test. Two scenarios: the test prompts as they are, and with the question repeated
``--prompt-repeat`` times (long prompts, where prefix sharing matters). The last line is
``RESULT speedup=<engine tokens/s ÷ full-recompute tokens/s>`` in the default scenario.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time

import torch

from posttrain.engine import Engine, SamplingParams, sample_tokens
from posttrain.models.gpt import GPT, GPTConfig
from posttrain.random_streams import group_seed, row_streams, uniforms
from posttrain.tasks.arithmetic import ArithmeticTask
from posttrain.tokenizer import Tokenizer


@torch.inference_mode()
def full_recompute(model: GPT, prompts: list[list[int]], n: int, params: SamplingParams, seed: int,
                   stop_id: int) -> list[list[int]]:
    """``n`` completions per prompt without a KV cache; returns the completions (stop token included)."""
    completions: list[list[int]] = []
    for i, prompt in enumerate(prompts):  # one group at a time: its rows share the prompt, so no padding
        seqs = torch.tensor([prompt], dtype=torch.long).repeat(n, 1)  # (rows still going, T)
        streams = row_streams([group_seed(seed, i)], n)  # (rows still going, 2)
        for step in range(params.max_new_tokens):
            logits = model(seqs)[:, -1]  # whole sequence, every step
            tokens, _ = sample_tokens(logits, params, uniforms(streams, step))
            seqs = torch.cat([seqs, tokens[:, None]], dim=1)
            done = tokens == stop_id
            if step == params.max_new_tokens - 1:
                done[:] = True
            completions += [row[len(prompt):].tolist() for row in seqs[done]]
            if bool(done.all()):
                break
            seqs, streams = seqs[~done], streams[~done]
    return completions


def run_scenario(model, engine, prompts, args, params) -> dict[str, tuple[int, list[float]]]:
    """Warm up, then time each method → {method: (tokens sampled per run, seconds of each run)}."""
    n, seed, stop = args.samples, args.seed, engine.tokenizer.assistant_end_id
    methods = {
        "full recompute (no KV cache)": lambda ps: sum(
            len(c) for c in full_recompute(model, ps, n, params, seed, stop)
        ),
        "engine, share_prefix=False": lambda ps: int(
            engine.generate(ps, n, params, seed, share_prefix=False).mask.sum()
        ),
        "engine, share_prefix=True": lambda ps: int(
            engine.generate(ps, n, params, seed, share_prefix=True).mask.sum()
        ),
    }
    for fn in methods.values():
        fn(prompts[:1])
    tokens: dict[str, set[int]] = {m: set() for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.repeats):
        for m, fn in methods.items():
            t0 = time.perf_counter()
            tokens[m].add(fn(prompts))
            times[m].append(time.perf_counter() - t0)
    assert all(len(t) == 1 for t in tokens.values()), "same seed must sample the same tokens"
    return {m: (tokens[m].pop(), times[m]) for m in methods}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8, help="first P problems of the test split")
    ap.add_argument("--samples", type=int, default=16, help="completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompt-repeat", type=int, default=4, help="question repeats, long-prompt scenario")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per method (median is reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    task = ArithmeticTask()
    tokenizer = Tokenizer.train(task.corpus(random.Random(0)))
    config = GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=4, n_head=4, n_kv_head=2, n_embd=128,
                       max_seq_len=256)
    torch.manual_seed(0)
    model = GPT(config).eval()
    engine = Engine(model, tokenizer, tools=None)
    params = SamplingParams(temperature=1.0, top_k=50, max_new_tokens=args.max_new_tokens)

    problems = task.test[: args.prompts]
    scenarios = {
        "default": [tokenizer.render_for_completion(task.prompt(p)) for p in problems],
        f"long (question x{args.prompt_repeat})": [
            tokenizer.render_for_completion({"messages": [{"role": "user", "content": " ".join(
                [p.question] * args.prompt_repeat)}]}) for p in problems
        ],
    }
    for name, prompts in scenarios.items():
        longest = max(len(p) for p in prompts) + args.max_new_tokens
        if longest > config.max_seq_len:
            ap.error(f"{name}: prompt + max_new_tokens = {longest} > max_seq_len={config.max_seq_len}")

    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {load} (1/5/15 min)")
    print(f"model: built-in GPT {config.n_layer}L/{config.n_head}H/{config.n_kv_head}KV/{config.n_embd}d, "
          f"{model.num_params():,} params, vocab {config.vocab_size}, RANDOM init (torch.manual_seed(0))")
    print(f"rollout: {args.prompts} prompts x {args.samples} samples, temperature 1, top-k 50, "
          f"max_new_tokens {args.max_new_tokens}, no tools; median of {args.repeats} runs after a warm-up\n")
    t_start = time.perf_counter()

    results = {}
    for name, prompts in scenarios.items():
        lens = [len(p) for p in prompts]
        print(f"[{name}] prompt lengths {min(lens)}-{max(lens)} tokens ...", flush=True)
        results[name] = run_scenario(model, engine, prompts, args, params)

    header = f"{'scenario':<20} {'method':<30} {'tokens':>7} {'median s':>9} {'(min-max)':>15}"
    header += f" {'tokens/s':>9} {'vs recompute':>12}"
    print("\n" + header + "\n" + "-" * len(header))
    speedups = {}
    for name, res in results.items():
        rates = {m: tokens / statistics.median(secs) for m, (tokens, secs) in res.items()}
        base = rates["full recompute (no KV cache)"]
        for m, (tokens, secs) in res.items():
            spread = f"({min(secs):.3f}-{max(secs):.3f})"
            print(f"{name:<20} {m:<30} {tokens:>7} {statistics.median(secs):>9.3f} {spread:>15}"
                  f" {rates[m]:>9.0f} {rates[m] / base:>11.2f}x")
        share = rates["engine, share_prefix=True"] / rates["engine, share_prefix=False"]
        print(f"{'':<20} prefix sharing vs no sharing: {share:.2f}x")
        speedups[name] = rates["engine, share_prefix=True"] / base
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; load average at the end {load}")
    print(f"RESULT speedup={speedups['default']:.2f}")


if __name__ == "__main__":
    main()
