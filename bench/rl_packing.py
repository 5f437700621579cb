"""Padded against packed RL micro-batches: time of the update's forward/backward and of a scoring pass.

The built-in GPT at the demo's size (configs/demo_sft.yaml: 4 layers, width 128, 4 heads, 2 KV heads;
vocabulary 512, GPTConfig's default), fp32 on the CPU, ``--rows`` rollout rows whose real lengths are drawn
uniformly from ``--min-len``..``--max-len`` (the first third prompt, the rest completion targets), the
token-mean policy loss of one on-policy update. Two paths through ``ModelEngine``:

* ``padded``: the path before packing: micro-batches of ``--micro-batch`` rows (the old ``micro_batch``
  key, default 64), each cut to its widest row and run padded;
* ``packed``: ``max_tokens_per_micro_batch`` = ``--max-tokens`` (default 4096) real tokens per micro-batch,
  rows packed (posttrain/trainers/packing.py).

Each is timed ``--repeats`` times on the same rows (after one warm-up, the two paths taking turns); prints
the medians, the padding share each path ran, and last ``RESULT speedup=<padded update ÷ packed update>``.

    python bench/rl_packing.py            # defaults: 128 rows of 10..120 tokens, --threads 2
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from posttrain.config import OptimConfig
from posttrain.models.gpt import GPT, GPTConfig
from posttrain.trainers.model_engine import ModelEngine
from posttrain.trainers.objectives import PolicyLoss, PolicyObjective
from posttrain.trainers.train_batch import TrainBatch

DEMO_GPT = GPTConfig(vocab_size=512, n_layer=4, n_head=4, n_kv_head=2, n_embd=128, max_seq_len=256)


def rows(n: int, low: int, high: int, seed: int) -> TrainBatch:
    """``n`` right-padded rows of random lengths in [low, high]: a third prompt, then completion targets."""
    rng = random.Random(seed)
    widths = [rng.randint(low, high) for _ in range(n)]
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randint(1, DEMO_GPT.vocab_size, (n, max(widths)), generator=gen)
    mask = torch.zeros(n, max(widths))
    for b, w in enumerate(widths):
        mask[b, w // 3 : w] = 1.0
    targets = torch.where(mask > 0, torch.randint(1, DEMO_GPT.vocab_size, mask.shape, generator=gen), -1)
    advantages = torch.randn(n, 1, generator=gen) * mask
    return TrainBatch(inputs, targets, mask, torch.tensor(widths), advantages=advantages)


def timed(fns, repeats: int) -> list[float]:
    """Median seconds of each of ``fns`` over ``repeats`` rounds, the functions taking turns within a round
    (a shared machine's load falls on both alike); one warm-up round first."""
    times = [[] for _ in fns]
    for round_ in range(repeats + 1):
        for fn, spent in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            if round_:
                spent.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--min-len", type=int, default=10)
    ap.add_argument("--max-len", type=int, default=120)
    ap.add_argument("--micro-batch", type=int, default=64, help="rows per padded micro-batch (the old default)")
    ap.add_argument("--max-tokens", type=int, default=4096, help="max_tokens_per_micro_batch of the packed path")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = GPT(DEMO_GPT)
    data = rows(args.rows, args.min_len, args.max_len, args.seed)
    objective = PolicyObjective(PolicyLoss(agg="token-mean"))
    everything = torch.arange(args.rows)
    normaliser = objective.share(data.mask)
    cpu, optim = torch.device("cpu"), OptimConfig()
    # the padded path: one unbounded engine call per slice of --micro-batch rows is one padded micro-batch
    padded = ModelEngine(model, optim, cpu, "fp32", max_tokens_per_micro_batch=2**62, packing=False)
    packed = ModelEngine(model, optim, cpu, "fp32", max_tokens_per_micro_batch=args.max_tokens)

    def update_padded():
        for part in everything.split(args.micro_batch):
            padded.forward_backward(data, part, normaliser, objective)
        padded.zero_grad()

    def update_packed():
        packed.forward_backward(data, everything, normaliser, objective)
        packed.zero_grad()

    def score_padded():
        for part in everything.split(args.micro_batch):
            padded.score(data.take(part), objective)

    model.train()
    results = {"update": timed([update_padded, update_packed], args.repeats),
               "score": timed([score_padded, lambda: packed.score(data, objective)], args.repeats)}
    widths = data.widths.tolist()
    print(f"GPT {DEMO_GPT.n_layer} layers, width {DEMO_GPT.n_embd}; {args.rows} rows of {min(widths)}..{max(widths)} "
          f"tokens ({sum(widths)} in all); torch {torch.__version__}, {args.threads} threads, fp32 CPU")
    for name, engine in (("padded", padded), ("packed", packed)):
        print(f"{name}: pad fraction {1 - engine.tokens_real / engine.tokens_run:.3f} of the update's positions")
    for phase, (a, b) in results.items():
        print(f"{phase}: padded ({args.micro_batch} rows per micro-batch) {a:.3f} s, packed ({args.max_tokens} "
              f"tokens per micro-batch) {b:.3f} s, ratio {a / b:.2f}")
    print(f"RESULT speedup={results['update'][0] / results['update'][1]:.2f}")


if __name__ == "__main__":
    main()
