"""`posttrain demo`: SFT from an imperfect teacher, then RL (Dr. GRPO), then a before/after table.

Both stages are the shipped configs ``configs/demo_sft.yaml`` and ``configs/demo_rl.yaml``; the
demo only points them at one run directory (and shrinks them with ``quick``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from posttrain.config import RLConfig, SFTConfig, load_config
from posttrain.distributed import launched_world
from posttrain.trainers.model_engine import resolve_device, resolve_precision
from posttrain.trainers.rl import train_rl
from posttrain.trainers.sft import train_sft

CONFIG_DIR = Path(__file__).parent / "configs"
QUICK_SFT = ["steps=40", "eval.problems=16", "eval.samples=8", "batch_size=16"]
QUICK_RL = ["steps=4", "prompts_per_step=4", "eval.every=0", "eval.problems=16", "eval.samples=8"]
ROWS = (("pass@1", "eval/pass@1"), ("pass@8", "eval/pass@8"), ("mean reward", "eval/reward"),
        ("mean completion length (tokens)", "eval/mean_length"))


def run_demo(run_dir: str | Path, quick: bool = False, progress: bool = True, device: str = "auto",
             precision: str = "auto") -> dict:
    """Run SFT then RL into ``run_dir`` on ``device`` in ``precision`` (both stages); write and return
    ``summary.json``'s content."""
    run_dir = Path(run_dir)
    start = time.perf_counter()
    sft_dir, rl_dir = run_dir / "sft", run_dir / "rl"
    where = [f"device={device}", f"precision={precision}"]
    sft_cfg = load_config(SFTConfig, CONFIG_DIR / "demo_sft.yaml",
                          [f"run_dir={sft_dir}", *where, *(QUICK_SFT if quick else [])])
    rl_cfg = load_config(RLConfig, CONFIG_DIR / "demo_rl.yaml",
                         [f"run_dir={rl_dir}", f"model={sft_dir / 'checkpoints' / 'final'}", *where,
                          "eval_before=false", *(QUICK_RL if quick else [])])
    console = Console()
    target = resolve_device(device)
    console.print(f"[bold]posttrain demo[/bold]: SFT ({sft_cfg.steps} steps) then RL: {rl_cfg.algorithm} "
                  f"({rl_cfg.steps} steps) on arithmetic word problems, built-in GPT, {target.type} "
                  f"({resolve_precision(precision, target)}). Run dir: {run_dir}")
    sft = train_sft(sft_cfg, progress=progress)
    rl = train_rl(rl_cfg, progress=progress, before=sft)["after"]
    wall = time.perf_counter() - start

    def pick(m: dict) -> dict:
        return {"pass@1": m["eval/pass@1"], "pass@8": m["eval/pass@8"], "reward": m["eval/reward"],
                "mean_length": m["eval/mean_length"]}

    summary = {"sft": pick(sft), "rl": pick(rl), "wall_s": round(wall, 1)}
    if launched_world().main:  # under torchrun (demo --nproc N): written once
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    table = Table(title=f"held-out arithmetic problems ({sft_cfg.eval.problems} problems x "
                        f"{sft_cfg.eval.samples} samples, T={sft_cfg.eval.temperature})")
    table.add_column("metric")
    table.add_column("after SFT", justify="right")
    table.add_column("after RL", justify="right")
    table.add_column("change", justify="right")
    for label, key in ROWS:
        table.add_row(label, f"{sft[key]:.3f}", f"{rl[key]:.3f}", f"{rl[key] - sft[key]:+.3f}")
    console.print(table)
    console.print(f"wall time {wall:.0f} s; everything is in {run_dir} (summary.json, */metrics.jsonl, checkpoints)")
    return summary
