"""`posttrain demo --preference`: learning from preferences on the built-in GPT, on CPU.

SFT (or a given SFT checkpoint) → a reward model on generated preference pairs → (a) DPO from the
SFT model on the same pairs, (b) PPO from the SFT model against the reward model. The pairs prefer a
right, concise worked solution over one with a slip or one that repeats steps; the policy is never
told the rule, but the rule can check it: held-out pass@1 (right answers) and completion length
(concision). Every stage is a shipped config (``configs/demo_*.yaml``) a user can re-run alone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from posttrain.config import RLConfig, SFTConfig, load_config
from posttrain.demo import CONFIG_DIR, QUICK_SFT
from posttrain.distributed import launched_world
from posttrain.metrics import read_jsonl
from posttrain.preference_config import DPOConfig, RMConfig
from posttrain.trainers.dpo import train_dpo
from posttrain.trainers.reward_model import train_reward_model
from posttrain.trainers.rl import train_rl
from posttrain.trainers.sft import train_sft

QUICK_PAIRS = ["data.train_size=64", "data.test_size=16", "batch_size=8"]
QUICK_RM = ["steps=6", "eval_every=0", *QUICK_PAIRS]
QUICK_DPO = ["steps=4", "eval.problems=8", "eval.samples=8", *QUICK_PAIRS]
QUICK_PPO = ["steps=3", "prompts_per_step=4", "eval.problems=8", "eval.samples=8"]
POLICY_ROWS = (("pass@1 (right answer)", "eval/pass@1"), ("pass@8", "eval/pass@8"),
               ("mean completion length (tokens)", "eval/mean_length"))


def run_preference_demo(run_dir: str | Path, quick: bool = False, progress: bool = True,
                        sft: str | Path | None = None, device: str = "auto", precision: str = "auto") -> dict:
    """Run the four stages into ``run_dir`` (SFT skipped when ``sft`` names a checkpoint) on ``device`` in
    ``precision``; write and return ``summary.json``'s content."""
    run_dir = Path(run_dir)
    start = time.perf_counter()
    console = Console()
    sft_model = Path(sft) if sft else run_dir / "sft" / "checkpoints" / "final"
    rm_model = run_dir / "rm" / "checkpoints" / "final"
    where = [f"device={device}", f"precision={precision}"]
    at = [f"model={sft_model}", *where]
    rm_cfg = load_config(RMConfig, CONFIG_DIR / "demo_rm.yaml",
                         [f"run_dir={run_dir / 'rm'}", *at, *(QUICK_RM if quick else [])])
    dpo_cfg = load_config(DPOConfig, CONFIG_DIR / "demo_dpo.yaml",
                          [f"run_dir={run_dir / 'dpo'}", *at, *(QUICK_DPO if quick else [])])
    ppo_cfg = load_config(RLConfig, CONFIG_DIR / "demo_ppo_rm.yaml",
                          [f"run_dir={run_dir / 'ppo'}", *at, f"reward_model.path={rm_model}", "eval_before=false",
                           *(QUICK_PPO if quick else [])])
    console.print(f"[bold]posttrain demo --preference[/bold]: reward model ({rm_cfg.steps} steps), DPO "
                  f"({dpo_cfg.steps} steps) and PPO against the reward model ({ppo_cfg.steps} steps) from an SFT "
                  f"model, built-in GPT, {device} device, {precision} precision. Run dir: {run_dir}")
    if not sft:
        train_sft(load_config(SFTConfig, CONFIG_DIR / "demo_sft.yaml",
                              [f"run_dir={run_dir / 'sft'}", *where, *(QUICK_SFT if quick else [])]),
                  progress=progress)
    rm = train_reward_model(rm_cfg, progress=progress)
    dpo = train_dpo(dpo_cfg, progress=progress)
    ppo = train_rl(ppo_cfg, progress=progress, before=dpo["before"])  # the same SFT model, the same evaluation
    wall = time.perf_counter() - start
    ppo_rows = [r for r in read_jsonl(run_dir / "ppo" / "metrics.jsonl") if "reward" in r]  # training steps
    summary = {
        "rm": {k.removeprefix("eval/"): v for k, v in rm.items() if k.startswith("eval/accuracy")},
        "dpo": {"before": pick(dpo["before"]), "after": pick(dpo["after"])},
        "ppo": {"before": pick(ppo["before"]), "after": pick(ppo["after"]),
                "reward_model_score": [row["rewards/reward_model/mean"] for row in (ppo_rows[0], ppo_rows[-1])],
                "kl": ppo_rows[-1].get("kl", 0.0)},
        "wall_s": round(wall, 1),
    }
    if launched_world().main:  # under torchrun (demo --nproc N): written once
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print_summary(console, summary, dpo_cfg.eval)
    console.print(f"wall time {wall:.0f} s; everything is in {run_dir} (summary.json, */metrics.jsonl, checkpoints)")
    return summary


def pick(metrics: dict) -> dict:
    """The numbers the summary keeps of one evaluation."""
    keys = ("eval/pass@1", "eval/pass@8", "eval/mean_length", "eval/rewards/accuracies")
    return {k.removeprefix("eval/"): metrics[k] for k in keys if k in metrics}


def print_summary(console: Console, summary: dict, eval_config) -> None:
    rm = summary["rm"]
    console.print("reward model, held-out pairs: accuracy " + ", ".join(
        f"{k.removeprefix('accuracy/') if '/' in k else 'all'} {v:.3f}" for k, v in rm.items()))
    dpo, ppo = summary["dpo"], summary["ppo"]
    if "rewards/accuracies" in dpo["after"]:
        console.print(f"DPO preference accuracy on held-out pairs (implicit reward ranks chosen first): "
                      f"{dpo['before']['rewards/accuracies']:.3f} -> {dpo['after']['rewards/accuracies']:.3f}")
    score = ppo["reward_model_score"]
    console.print(f"PPO: reward-model score {score[0]:.3f} -> {score[1]:.3f} (first -> last step), KL {ppo['kl']:.4f}")
    table = Table(title=f"held-out arithmetic problems ({eval_config.problems} problems x {eval_config.samples} "
                        f"samples, T={eval_config.temperature})")
    for name, justify in (("metric", "left"), ("SFT", "right"), ("DPO", "right"), ("PPO + RM", "right")):
        table.add_column(name, justify=justify)
    for label, key in POLICY_ROWS:
        key = key.removeprefix("eval/")
        table.add_row(label, f"{dpo['before'][key]:.3f}", f"{dpo['after'][key]:.3f}", f"{ppo['after'][key]:.3f}")
    console.print(table)
