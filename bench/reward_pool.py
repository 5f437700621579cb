"""A CPU-heavy reward in the reward worker pool against the same reward in the trainer's process.

The reward (``slow_reward`` below, loaded by its file path in both cases) does ``--work`` rounds of integer
arithmetic per completion: pure Python, so in-process it runs on one core however many there are. A batch is
``--groups`` groups of ``--group-size`` completions (the RL loop's shape). The in-process baseline is
``RewardSet`` without a pool; the pool is ``RewardPool(--workers)`` (ready before the clock starts), which
splits each call across its workers by whole groups. The two ways take turns, ``--repeats`` calls each (so
both see the same load from other jobs); the median is reported. The values must agree. For reference, the
ceiling: the same work split over a plain ``multiprocessing`` spawn pool of as many processes (no reward
machinery), against one process, in the same turns: what the machine gives that many processes right now (a
shared machine may give less than its core count). Prints a table and last ``RESULT speedup=<x>``.

    python bench/reward_pool.py --workers 2
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time


def slow_reward(completions, work: int = 200_000, **kwargs) -> list[float]:
    """A deterministic CPU-bound reward: ``work`` rounds of a multiply-and-mod per completion."""
    out = []
    for text in completions:
        x = len(text) + 1
        for _ in range(work):
            x = (x * 1_103_515_245 + 12_345) % 2_147_483_648
        out.append(float(x % 100))
    return out


def ceiling_part(texts: list[str], work: int) -> list[float]:
    return slow_reward(texts, work=work)


def timed(reward_set, completions: list[str], group_ids: list[int], work: int) -> tuple[float, list]:
    """(seconds of one call, its values)."""
    start = time.perf_counter()
    scores = reward_set.score([""] * len(completions), completions, group_ids=group_ids, work=work)
    return time.perf_counter() - start, scores.values["slow_reward"]


def main() -> None:
    from posttrain.rewards import RewardSet
    from posttrain.rewards.pool import RewardPool

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--work", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    spec = {f"{os.path.abspath(__file__)}:slow_reward": 1.0}
    completions = [f"completion {i}" for i in range(args.groups * args.group_size)]
    group_ids = [i // args.group_size for i in range(len(completions))]
    in_process = RewardSet(spec, timeout_s=600)
    times: dict[str, list[float]] = {"here": [], "pool": [], "plain": []}
    parts = [completions[i :: args.workers] for i in range(args.workers)]
    with RewardPool(args.workers) as pool, multiprocessing.get_context("spawn").Pool(args.workers) as plain:
        plain.starmap(ceiling_part, [(part, 1) for part in parts])  # started before the clock
        in_pool = RewardSet(spec, timeout_s=600, pool=pool)
        pool.wait_ready()
        for _ in range(args.repeats):
            seconds, here = timed(in_process, completions, group_ids, args.work)
            times["here"].append(seconds)
            seconds, there = timed(in_pool, completions, group_ids, args.work)
            times["pool"].append(seconds)
            start = time.perf_counter()
            plain.starmap(ceiling_part, [(part, args.work) for part in parts])
            times["plain"].append(time.perf_counter() - start)
            assert there == here, "the pool's values differ from the in-process values"
    here_s, pool_s, plain_s = (statistics.median(times[k]) for k in ("here", "pool", "plain"))
    print(f"{len(completions)} completions ({args.groups} groups of {args.group_size}), {args.work} rounds each, "
          f"{os.cpu_count()} CPUs, median of {args.repeats}")
    print("| where | s per call | vs in-process |\n|---|---:|---:|")
    print(f"| in-process (no pool) | {here_s:.3f} | 1.00× |")
    print(f"| pool, {args.workers} workers | {pool_s:.3f} | {here_s / pool_s:.2f}× |")
    print(f"| ceiling: plain multiprocessing pool, {args.workers} processes | {plain_s:.3f} "
          f"| {here_s / plain_s:.2f}× |")
    print(f"RESULT speedup={here_s / pool_s:.2f}")


if __name__ == "__main__":
    main()
