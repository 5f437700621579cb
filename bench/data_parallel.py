"""Data parallelism on this machine's CPU cores: the demo's SFT step with the same global batch, three ways.

* 1 process × 1 thread (the scaling baseline);
* 1 process × 2 threads (what a CPU user would otherwise run: torch's intra-op threads);
* 2 processes × 1 thread (``nproc=2``: torchrun, gloo, gradients all-reduced once per step).

Each variant is ``posttrain sft configs/demo_sft.yaml`` in a subprocess for ``--steps`` steps (``save_every=0``,
evaluation only after the last step, on 16 problems); the step time is the median of rank 0's
``timing_s/step`` after ``--warmup`` steps (a step's time includes its collectives). The variants take turns,
``--rounds`` times. Samples/s = ``batch_size`` ÷ step time. Scaling efficiency = 2-process throughput ÷ (2 ×
1-thread throughput). Last line: ``RESULT dp_speedup=<1 process × 2 threads time ÷ 2 processes × 1 thread
time>``. The issue's RL step waits for RL to run data-parallel; this is the SFT step.

    python bench/data_parallel.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"1 process × 1 thread": (1, 1), "1 process × 2 threads": (1, 2), "2 processes × 1 thread": (2, 1)}


def step_times(nproc: int, threads: int, steps: int, warmup: int, batch: int, out: Path) -> list[float]:
    """Rank 0's step times after the warm-up steps of one SFT run."""
    cmd = [sys.executable, "-m", "posttrain", "sft", str(ROOT / "posttrain" / "configs" / "demo_sft.yaml"),
           f"run_dir={out}", f"steps={steps}", f"batch_size={batch}", "save_every=0", "eval.every=0",
           "eval.problems=16", "eval.samples=1", "eval.ks=[1]", f"threads={threads}", f"nproc={nproc}",
           "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["timing_s/step"] for r in rows if r["step"] > warmup]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, (nproc, threads) in VARIANTS.items():
                out = Path(tmp) / f"{r}-{nproc}-{threads}"
                times[name] += step_times(nproc, threads, args.steps, args.warmup, args.batch, out)
    median = {name: statistics.median(t) for name, t in times.items()}
    base = median["1 process × 1 thread"]
    print(f"demo SFT step, global batch {args.batch}, {os.cpu_count()} CPUs, {args.rounds} rounds × "
          f"{args.steps - args.warmup} timed steps per variant")
    print("| variant | s/step median (min–max) | samples/s | vs 1 process × 1 thread |\n|---|---:|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {median[name]:.3f} ({min(t):.3f}–{max(t):.3f}) | {args.batch / median[name]:.1f} "
              f"| {base / median[name]:.2f}× |")
    efficiency = (base / median["2 processes × 1 thread"]) / 2
    print(f"scaling efficiency (2 processes): {efficiency:.2f}")
    print(f"RESULT dp_speedup={median['1 process × 2 threads'] / median['2 processes × 1 thread']:.2f}")


if __name__ == "__main__":
    main()
