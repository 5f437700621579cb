"""Asynchronous RL on this CPU: the demo's RL stage with generation one step ahead (``rollout.max_staleness=1``)
against the same run synchronous (``max_staleness=0``), both on Ray with one rollout worker + the trainer process.

Each preset of ``--presets`` (default grpo, as the issue asks, and the demo's own dr_grpo), both runs:
``configs/demo_rl.yaml`` from the demo's SFT checkpoint (trained here first unless ``--sft`` names one),
``algorithm=<preset>`` (grpo updates every row, dr_grpo only rows with signal), ``rollout.backend=ray``,
``rollout.workers=1``, ``rollout.worker_threads=1``, ``threads=1`` (the trainer), ``is_correction=tis`` (the
decoupled objective K = 1 needs; K = 0 uses it too so the two differ only in K), the same seed and steps, the
in-run evaluation only after the last step (256 held-out problems × 8 samples). Training time is the sum of
``timing_s/step`` over the steps (evaluation not counted); samples/s = rows trained ÷ that.

``--long``: also a long-generation setting (``sampling.max_new_tokens=192`` at temperature 1.3, so lengths spread
and some completions run to the budget), K = 1 with and without partial rollouts (``rollout.segment_tokens=48``),
``--long-steps`` steps each.

Last line: ``RESULT async_speedup=<training time K=0 ÷ K=1>`` of the first preset.

    python bench/async_rl.py                       # ~16 min on 2 cores (SFT included)
    python bench/async_rl.py --sft runs/demo/sft/checkpoints/final --long
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from rollout import cpu_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def posttrain(*args: str) -> float:
    """Run ``posttrain ARGS`` (its output to the console); returns the wall seconds."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "posttrain", *args, "--no-progress"], check=True, env=env, cwd=ROOT)
    return time.perf_counter() - start


def summary(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "timing_s/step" in r]
    train_s = sum(r["timing_s/step"] for r in steps)
    evals = [r for r in rows if "eval/pass@1" in r]
    samples = sum(r.get("sampling/groups", 0) for r in steps) * 8  # the demo's samples_per_prompt
    return {
        "steps": len(steps),
        "train_s": train_s,
        "step_s": train_s / len(steps),
        "rows": samples,
        "wait_s": sum(r.get("timing_s/wait_for_rollout", 0.0) for r in steps),
        "overlap_s": sum(r.get("timing_s/overlap", 0.0) for r in steps),
        "gen_s": sum(r.get("timing_s/gen", 0.0) for r in steps),
        "staleness_max": max(r.get("staleness/max", 0.0) for r in steps),
        "pass@1": evals[-1]["eval/pass@1"],
        "pass@8": evals[-1].get("eval/pass@8"),
        "reward_last10": sum(r.get("reward", 0.0) for r in steps[-10:]) / 10,
        "segments_mean": sum(r.get("partial/segments_mean", 1.0) for r in steps) / len(steps),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", help="an SFT checkpoint to start from (default: train the demo's SFT stage first)")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--presets", default="grpo,dr_grpo", help="RL presets to compare K=0 and K=1 on (the first "
                    "gives the RESULT line)")
    ap.add_argument("--long", action="store_true", help="also the long-generation setting, with partial rollouts")
    ap.add_argument("--long-steps", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_async"))
    ap.add_argument("--reuse", action="store_true", help="summarise a run already complete in --out instead of "
                    "running it again (else its directory is replaced)")
    args = ap.parse_args()
    out = Path(args.out)
    sft = args.sft

    def rl(run: Path, *extra: str) -> dict:
        """The run in ``run`` (made now, or reused with --reuse when it is complete) summarised."""
        done = run / "checkpoints" / "final"
        if not (args.reuse and done.exists()):
            shutil.rmtree(run, ignore_errors=True)  # the benchmark's own output
            posttrain("rl", *extra, f"run_dir={run}")
        return summary(run)

    if sft is None:
        posttrain("sft", "configs/demo_sft.yaml", f"run_dir={out / 'sft'}", "resume=never")
        sft = str(out / "sft" / "checkpoints" / "final")
    common = ["configs/demo_rl.yaml", f"model={sft}", "rollout.backend=ray", "rollout.workers=1",
              "rollout.worker_threads=1", "threads=1", "is_correction=tis", f"steps={args.steps}", "eval.every=0",
              "eval_before=false", "resume=never"]
    presets = args.presets.split(",")
    results = {}
    for preset in presets:
        for k in (0, 1):
            results[f"{preset}, K={k}"] = rl(out / f"{preset}_k{k}", *common, f"algorithm={preset}",
                                             f"rollout.max_staleness={k}")
    if args.long:
        long = [*common, f"algorithm={presets[0]}", f"steps={args.long_steps}", "sampling.max_new_tokens=192",
                "sampling.temperature=1.3", "eval.max_new_tokens=192", "eval.problems=128", "rollout.max_staleness=1"]
        for name, extra in (("long, K=1", []), ("long, K=1, segments 48", ["rollout.segment_tokens=48"])):
            results[name] = rl(out / name.replace(", ", "_").replace(" ", ""), *long, *extra)

    print(f"\nmachine: {cpu_name()}, {os.cpu_count()} cores; the demo's RL stage, {args.steps} steps, "
          "Ray 1 worker x 1 thread + trainer 1 thread")
    print(f"{'setting':<26}{'train s':>9}{'s/step':>8}{'samples/s':>10}{'wait s':>8}{'overlap s':>10}"
          f"{'pass@1':>8}{'pass@8':>8}{'segments':>9}")
    for name, r in results.items():
        rate = r["rows"] / r["train_s"]
        p8 = f"{r['pass@8']:.3f}" if r["pass@8"] is not None else "-"
        print(f"{name:<26}{r['train_s']:>9.1f}{r['step_s']:>8.2f}{rate:>10.1f}{r['wait_s']:>8.1f}{r['overlap_s']:>10.1f}"
              f"{r['pass@1']:>8.3f}{p8:>8}{r['segments_mean']:>9.2f}")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    for preset in presets:
        sync, ahead = results[f"{preset}, K=0"], results[f"{preset}, K=1"]
        print(f"{preset}: speedup {sync['train_s'] / ahead['train_s']:.2f}x, pass@1 K=1 - K=0: "
              f"{ahead['pass@1'] - sync['pass@1']:+.3f}")
    speedup = results[f"{presets[0]}, K=0"]["train_s"] / results[f"{presets[0]}, K=1"]["train_s"]
    print(f"RESULT async_speedup={speedup:.2f}")


if __name__ == "__main__":
    main()
