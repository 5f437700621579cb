"""Data parallelism on this machine's CPU cores: the demo's RL step (or SFT step) with the same global batch.

* 1 process × 1 thread (the scaling baseline);
* 1 process × 2 threads (what a CPU user would otherwise run: torch's intra-op threads);
* 2 processes × 1 thread (``nproc=2``: torchrun, gloo; RL: each rank generates half of the prompt groups and
  runs half of each minibatch's rows; SFT: half of the conversations; gradients all-reduced once per step);
* with ``--fsdp2``, also 2 processes × 1 thread under ``distributed.strategy=fsdp2`` (weights, gradients and
  AdamW state sharded; each training pass gathers a block's weights and reduce-scatters its gradient, and
  generation gathers the whole model first): what the sharding costs against DDP on the same step.

``--stage rl`` (the default): ``posttrain rl configs/demo_rl.yaml`` (Dr. GRPO, 16 prompts × 8 samples, 64 new
tokens) from an SFT checkpoint of ``--sft-steps`` demo SFT steps made first; ``--stage sft``: ``posttrain sft
configs/demo_sft.yaml`` (64 conversations). Each variant runs ``--steps`` steps in a subprocess
(``save_every=0``, evaluation only after the last step, on 16 problems); the step time is the median of rank
0's ``timing_s/step`` after ``--warmup`` steps (a step's time includes its collectives). The variants take
turns, ``--rounds`` times. Samples/s = samples per step ÷ step time. Scaling efficiency = 2-process throughput
÷ (2 × 1-thread throughput). Last line: ``RESULT dp_speedup=<1 process × 2 threads time ÷ 2 processes × 1
thread time>``.

    python bench/data_parallel.py                 # the RL step
    python bench/data_parallel.py --stage sft
    python bench/data_parallel.py --fsdp2         # and the FSDP2 variant
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
VARIANTS = {"1 process × 1 thread": (1, 1, "ddp"), "1 process × 2 threads": (1, 2, "ddp"),
            "2 processes × 1 thread": (2, 1, "ddp")}
FSDP2 = {"2 processes × 1 thread, FSDP2": (2, 1, "fsdp2")}


def posttrain(stage: str, args: list[str], threads: int) -> None:
    """``posttrain STAGE configs/demo_STAGE.yaml ARGS`` in a subprocess (SystemExit with its stderr on failure)."""
    cmd = [sys.executable, "-m", "posttrain", stage, str(ROOT / "posttrain" / "configs" / f"demo_{stage}.yaml"),
           *args, "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")


def step_times(stage: str, nproc: int, threads: int, steps: int, warmup: int, out: Path, extra: list[str]
               ) -> list[float]:
    """Rank 0's step times after the warm-up steps of one run."""
    posttrain(stage, [f"run_dir={out}", f"steps={steps}", "save_every=0", "eval.every=0", "eval.problems=16",
                      "eval.samples=1", "eval.ks=[1]", f"threads={threads}", f"nproc={nproc}", *extra], threads)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["timing_s/step"] for r in rows if r["step"] > warmup]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=("rl", "sft"), default="rl")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default: rl 6, sft 14)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sft-steps", type=int, default=30, help="rl: demo SFT steps of the starting checkpoint")
    ap.add_argument("--fsdp2", action="store_true", help="also time 2 processes under distributed.strategy=fsdp2")
    args = ap.parse_args()
    variants = VARIANTS | (FSDP2 if args.fsdp2 else {})
    steps = args.steps or {"rl": 6, "sft": 14}[args.stage]
    samples = 16 * 8 if args.stage == "rl" else 64  # per step: the demo configs' global batch
    times: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        extra = []
        if args.stage == "rl":
            posttrain("sft", [f"run_dir={tmp}/sft", f"steps={args.sft_steps}", "save_every=0", "eval.problems=16",
                              "eval.samples=1", "eval.ks=[1]", "threads=2"], 2)
            extra = [f"model={tmp}/sft/checkpoints/final", "eval_before=false"]
        for r in range(args.rounds):
            for name, (nproc, threads, strategy) in variants.items():
                out = Path(tmp) / f"{r}-{nproc}-{threads}-{strategy}"
                times[name] += step_times(args.stage, nproc, threads, steps, args.warmup, out,
                                          [*extra, f"distributed.strategy={strategy}"])
    median = {name: statistics.median(t) for name, t in times.items()}
    base = median["1 process × 1 thread"]
    print(f"demo {args.stage.upper()} step, {samples} samples per step, {os.cpu_count()} CPUs, {args.rounds} rounds "
          f"× {steps - args.warmup} timed steps per variant")
    print("| variant | s/step median (min–max) | samples/s | vs 1 process × 1 thread |\n|---|---:|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {median[name]:.3f} ({min(t):.3f}–{max(t):.3f}) | {samples / median[name]:.1f} "
              f"| {base / median[name]:.2f}× |")
    efficiency = (base / median["2 processes × 1 thread"]) / 2
    print(f"scaling efficiency (2 processes): {efficiency:.2f}")
    print(f"RESULT dp_speedup={median['1 process × 2 threads'] / median['2 processes × 1 thread']:.2f}")


if __name__ == "__main__":
    main()
