"""Every RL preset from the same SFT checkpoint under the same wall-clock budget, on the demo task.

For each preset: a 6-step calibration run measures seconds per step (steps 2–6), then a run of
``budget / (s/step)`` steps trains from the shared SFT checkpoint (the LR schedule spans those steps).
Reported: held-out pass@1 / pass@8 (256 problems × 8 samples), the KL of the final policy to the start
policy, and seconds per step. The KL is exact per token, Σ_v π(v) log(π(v)/π_0(v)) over the whole
vocabulary at every position of completions the final policy samples on held-out prompts, averaged
over completion tokens (no estimator noise beyond the sampled positions).

    python bench/presets.py                      # trains the demo SFT checkpoint first (~2.5 min)
    python bench/presets.py --sft runs/demo/sft/checkpoints/final --budget 90 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from posttrain.checkpoint import load_checkpoint
from posttrain.config import RL_PRESETS, RLConfig, SFTConfig, load_config
from posttrain.engine import Engine, SamplingParams
from posttrain.tasks import make_task
from posttrain.tools import default_registry
from posttrain.trainers.rl import train_rl
from posttrain.trainers.sft import train_sft
from posttrain.trainers.train_batch import layout

CONFIGS = Path(__file__).parents[1] / "posttrain" / "configs"
# The demo config pins some preset-managed fields; unpin them so each preset's own defaults apply.
TOLERANCE = 0.15  # a run's training seconds may miss the budget by this fraction
UNPIN = ["advantage=null", "adv_scale=null", "loss_agg=null", "kl_coef=null", "kl_kind=null", "kl_in=null"]


def rl_config(preset: str, sft: Path, run_dir: Path, seed: int, steps: int, calibrate: bool) -> RLConfig:
    """The demo's RL stage with ``preset``'s defaults; ``calibrate``: no eval, no critic warm-up (time full steps)."""
    return load_config(RLConfig, CONFIGS / "demo_rl.yaml", [
        f"algorithm={preset}", *UNPIN, f"model={sft}", f"run_dir={run_dir}", f"seed={seed}",
        f"steps={steps}", "eval_before=false", "eval.every=0", "log_samples_every=0",
        *(["eval.problems=1", "eval.samples=1", "eval.ks=[1]", "critic.warmup_steps=0"] if calibrate else []),
    ])


@torch.no_grad()
def kl_to_start(final_dir: Path, start_dir: Path, problems: int = 128, samples: int = 4) -> float:
    """Mean over completion tokens of the exact KL(π_final ‖ π_start) of the next-token distributions."""
    final, tok, _ = load_checkpoint(final_dir)
    start, _, _ = load_checkpoint(start_dir)
    task = make_task(load_config(RLConfig, CONFIGS / "demo_rl.yaml").task)
    prompts = [tok.render_for_completion(task.prompt(p)) for p in task.test[:problems]]
    batch = Engine(final, tok, default_registry()).generate(prompts, samples, SamplingParams(), seed=99)
    data = layout(batch, tok.pad_id)
    total, count = 0.0, 0.0
    for rows in torch.arange(len(data.mask)).split(64):
        micro = data.take(rows)
        inputs, m = micro.inputs, micro.mask
        logp = torch.log_softmax(final(inputs), -1)  # (r, w, V)
        logq = torch.log_softmax(start(inputs), -1)
        kl = (logp.exp() * (logp - logq)).sum(-1)  # (r, w)
        total += float((kl * m).sum())
        count += float(m.sum())
    return total / count


def budget_run(preset: str, seed: int, sft: Path, out: Path, budget: float, steps: float | None) -> dict:
    """Train ``preset`` for about ``budget`` seconds; one retry with rescaled steps if the time misses by
    more than TOLERANCE (per-step time drifts as the policy changes: lengths, dynamic-sampling rounds)."""
    if steps is None:
        calib = out / f"{preset}_s{seed}_calib"
        shutil.rmtree(calib, ignore_errors=True)
        train_rl(rl_config(preset, sft, calib, seed, 6, calibrate=True), progress=False)
        calib_log = [json.loads(line) for line in (calib / "metrics.jsonl").read_text().splitlines()]
        steps = budget / (sum(r["timing_s/step"] for r in calib_log[1:]) / (len(calib_log) - 1))  # step 1 warms up
    for _ in range(2):
        n = max(1, int(steps))
        run = out / f"{preset}_s{seed}"
        shutil.rmtree(run, ignore_errors=True)  # metrics.jsonl appends
        result = train_rl(rl_config(preset, sft, run, seed, n, calibrate=False), progress=False)
        log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        train_s = sum(r.get("timing_s/step", 0.0) for r in log)
        if abs(train_s - budget) <= TOLERANCE * budget:
            break
        steps = n * budget / train_s
    return {"preset": preset, "seed": seed, "budget": budget, "steps": n, "train_s": round(train_s, 1),
            "s_per_step": round(train_s / n, 3), "pass@1": result["after"]["eval/pass@1"],
            "pass@8": result["after"]["eval/pass@8"], "kl_to_start": kl_to_start(run / "checkpoints" / "final", sft)}


def plot(presets: list[str], seed: int, out: Path, path: Path) -> None:
    """Training reward (moving mean over 10 steps) against training seconds, one line per preset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for preset in presets:
        log = [json.loads(line) for line in (out / f"{preset}_s{seed}" / "metrics.jsonl").read_text().splitlines()]
        log = [r for r in log if r.get("reward") == r.get("reward") and "timing_s/step" in r]  # drop NaN rows
        t = torch.tensor([r["timing_s/step"] for r in log]).cumsum(0)
        reward = torch.tensor([r["reward"] for r in log])
        smooth = torch.stack([reward[max(0, i - 9): i + 1].mean() for i in range(len(reward))])
        ax.plot(t.numpy(), smooth.numpy(), label=preset)
    ax.set_xlabel("training seconds (2-core CPU)")
    ax.set_ylabel("training reward (moving mean, 10 steps)")
    ax.set_title(f"RL presets from the same SFT checkpoint, seed {seed}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", type=Path, help="SFT checkpoint dir (default: train the demo SFT stage)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_presets"))
    ap.add_argument("--budget", type=float, default=90.0, help="training seconds per preset")
    ap.add_argument("--presets", nargs="+", default=list(RL_PRESETS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--plot", type=Path, help="write a PNG of training reward against time (first seed)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    sft = args.sft
    if sft is None:
        cfg = load_config(SFTConfig, CONFIGS / "demo_sft.yaml", [f"run_dir={args.out / 'sft'}"])
        train_sft(cfg, progress=False)
        sft = args.out / "sft" / "checkpoints" / "final"
    done_file = args.out / "rows.jsonl"  # finished runs: a re-run of the bench skips them
    done = [json.loads(line) for line in done_file.read_text().splitlines()] if done_file.exists() else []
    rows = []
    for preset in args.presets:
        for seed in args.seeds:
            prev = [r for r in done if (r["preset"], r["seed"], r["budget"]) == (preset, seed, args.budget)]
            row = prev[-1] if prev else None
            if row is None or abs(row["train_s"] - args.budget) > TOLERANCE * args.budget:
                row = budget_run(preset, seed, sft, args.out, args.budget, row and row["steps"] * args.budget
                                 / row["train_s"])
                with done_file.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            rows.append(row)
            print(json.dumps(row), flush=True)
    start = load_config(RLConfig, CONFIGS / "demo_rl.yaml")
    print(f"\nfrom {sft}, budget {args.budget:.0f} s/preset, seeds {args.seeds}, eval "
          f"{start.eval.problems} problems × {start.eval.samples} samples")
    print("| preset | steps | train s | s/step | pass@1 | pass@8 | KL to start (nats/token) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for preset in args.presets:
        rs = [r for r in rows if r["preset"] == preset]

        def mean(key: str, rs=rs) -> float:
            return sum(r[key] for r in rs) / len(rs)

        print(f"| {preset} | {mean('steps'):.0f} | {mean('train_s'):.0f} | {mean('s_per_step'):.2f} | "
              f"{mean('pass@1'):.3f} | {mean('pass@8'):.3f} | {mean('kl_to_start'):.4f} |")
    if args.plot:
        plot(args.presets, args.seeds[0], args.out, args.plot)
    best = max(args.presets, key=lambda p: sum(r["pass@1"] for r in rows if r["preset"] == p))
    best_p1 = sum(r["pass@1"] for r in rows if r["preset"] == best) / len(args.seeds)
    print(f"RESULT best={best} pass@1={best_p1:.3f}")


if __name__ == "__main__":
    main()
