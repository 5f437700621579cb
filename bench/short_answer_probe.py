"""Which short-answer skill can RL teach a small pretrained chat model? Each skill's held-out pass@1 at the start,
under the task's strict grader (the reply ends with the gold number) and the lenient one (the gold anywhere in it).

For each skill of ``posttrain.tasks.short_answer``: ``--problems`` test questions (fewer when the skill has fewer
distinct ones) × ``--samples`` completions at temperature 1, top-k 50, ``--max-new-tokens``, sampled by the
posttrain engine from the model given (a GGUF file, an HF directory or a checkpoint). Prints a table, one reply per
skill, and ``RESULT <skill>_lenient=<pass@1>`` lines. The demo's task should start with a lenient score between
0.1 and 0.6: right often enough for RL to find a signal, wrong often enough to have room to learn.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from posttrain.engine import Engine, SamplingParams, completion_text
from posttrain.models.hf import load_hf
from posttrain.random_streams import group_seed
from posttrain.tasks.short_answer import SKILLS, ShortAnswerTask, lenient_correct, strict_correct

sys.path.insert(0, str(Path(__file__).parent))
from rollout import cpu_name  # noqa: E402


def probe(engine: Engine, task: ShortAnswerTask, samples: int, params: SamplingParams) -> dict:
    """Strict and lenient pass@1 (mean over samples), mean length and one reply, for the task's test split."""
    tok = engine.tokenizer
    convs = [task.prompt(p) for p in task.test]
    batch = engine.generate([tok.render_for_completion(c) for c in convs], samples, params,
                            seeds=[group_seed(4321, i) for i in range(len(convs))])
    strict, lenient, replies = [], [], []
    for i, conv in enumerate(convs):
        for j in range(i * samples, (i + 1) * samples):
            text = completion_text(tok, batch, j)
            strict.append(strict_correct(text, conv["answer"]))
            lenient.append(lenient_correct(text, conv["answer"]))
            replies.append((conv["messages"][0]["content"], conv["answer"], text))
    return {"strict": statistics.mean(strict), "lenient": statistics.mean(lenient),
            "length": float(batch.lengths.float().mean()), "example": replies[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a GGUF file, an HF model directory or a checkpoint")
    ap.add_argument("--skills", default=",".join(SKILLS), help="comma-separated skills")
    ap.add_argument("--problems", type=int, default=40, help="test questions per skill")
    ap.add_argument("--samples", type=int, default=4, help="completions per question")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {cpu_name()}, torch {torch.__version__}, {args.threads} threads; model {args.model}")
    policy, tokenizer = load_hf(args.model, dtype=args.dtype)
    policy.eval()
    engine = Engine(policy, tokenizer, tools=None)
    params = SamplingParams(temperature=1.0, top_k=50, max_new_tokens=args.max_new_tokens)
    rows = {}
    for skill in args.skills.split(","):
        t0 = time.perf_counter()
        task = ShortAnswerTask(skill, test_size=min(args.problems, _distinct(skill) // 2))  # half stays for training
        rows[skill] = probe(engine, task, args.samples, params) | {"n": len(task.test), "s": time.perf_counter() - t0}
        question, gold, reply = rows[skill]["example"]
        print(f"{skill}: {question!r} (gold {gold}) -> {reply[:160]!r}", flush=True)
    print("\n| skill | questions × samples | strict pass@1 | lenient pass@1 | mean length | s |")
    print("|---|---:|---:|---:|---:|---:|")
    for skill, r in rows.items():
        print(f"| {skill} | {r['n']} × {args.samples} | {r['strict']:.3f} | {r['lenient']:.3f} | {r['length']:.1f} "
              f"| {r['s']:.0f} |")
    for skill, r in rows.items():
        print(f"RESULT {skill}_lenient={r['lenient']:.3f} {skill}_strict={r['strict']:.3f}")


def _distinct(skill: str) -> int:
    """How many distinct questions a skill has, as far as 20,000 draws find them."""
    import random

    r, seen = random.Random(0), set()
    for _ in range(20_000):
        seen.add(SKILLS[skill](r).question)
    return len(seen)


if __name__ == "__main__":
    main()
