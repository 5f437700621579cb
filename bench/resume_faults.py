"""Faults a run must survive, tried one by one on a tiny SFT run (the CLI in subprocesses, as a user runs it), each
checked against an uninterrupted run of the same config: what happened, what was lost (the steps of metrics.jsonl
that differ from the uninterrupted run's, or are missing; must be none), and how long the recovery took.

1. SIGKILL while the first checkpoint is being written (the process is killed as soon as ``.step_000001.tmp``
   appears), then the same command again;
2. SIGKILL at a random moment mid-run, then the same command;
3. the ``checkpoints/latest`` link deleted (a copy that drops symlinks), then the same command;
4. ``resume=<an earlier checkpoint of the run>`` (refused: branching is a new run_dir);
5. the same command with another learning rate (refused), then with ``resume=force`` (continues, new value);
6. SIGTERM mid-run (checkpoint of the step in flight, exit 8), then the same command;
7. SIGINT twice (the second stops at once, exit 130 or 8), then the same command.

Last line: ``RESULT faults_lost_steps=<total steps lost over all faults>`` (must be 0).

    python bench/resume_faults.py
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["threads=1", "steps=30", "batch_size=8", "save_every=3", "keep_last=3", "gpt.n_layer=1", "gpt.n_embd=32",
        "gpt.n_head=2", "gpt.n_kv_head=1", "gpt.max_seq_len=128", "optim.warmup_steps=2", "optim.lr=1e-2",
        "task.test_size=8", "eval.every=10", "eval.problems=4", "eval.samples=2", "eval.ks=[1,2]",
        "eval.max_new_tokens=24"]
VOLATILE = ("timing_s/", "throughput/")


def args(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "posttrain", "sft", "-", "--no-progress", f"run_dir={run}", *TINY, *extra]


def run(cmd: list[str]) -> tuple[int, str, float]:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return done.returncode, " ".join((done.stdout + done.stderr).split()), time.perf_counter() - start


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)


def rows(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in map(json.loads, lines)}


def lost(reference: dict[int, dict], got: dict[int, dict]) -> int:
    """Steps of the uninterrupted run missing from ``got`` or different there."""
    return sum(got.get(step) != row for step, row in reference.items())


def kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # it ended already
        pass
    proc.wait()


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not predicate() and time.monotonic() < deadline:
        time.sleep(0.005)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="faults-"))
    code, _, whole_s = run(args(work / "whole"))
    assert code == 0
    reference = rows(work / "whole")
    report = []

    def record(name: str, happened: str, run_dir: Path, seconds: float) -> None:
        report.append((name, happened, lost(reference, rows(run_dir)), seconds))

    # 1. killed while writing the first checkpoint
    d = work / "first_save"
    proc = start(args(d))
    wait_for(lambda: (d / "checkpoints" / ".step_000003.tmp").exists(), proc)
    kill(proc)
    caught = (d / "checkpoints" / ".step_000003.tmp").exists() and not (d / "checkpoints" / "step_000003").exists()
    code, out, s = run(args(d))
    record("SIGKILL during the first save" + ("" if caught else " (missed: killed after it)"),
           f"exit {code}; " + ("resumed" if "resumed from" in out else "started over"), d, s)

    # 2. killed at a random moment
    d = work / "random_kill"
    proc = start(args(d))
    time.sleep(random.Random(0).uniform(0.3, 0.8) * whole_s)
    kill(proc)
    code, out, s = run(args(d))
    record("SIGKILL at a random moment", f"exit {code}; " + ("resumed" if "resumed from" in out else "started over"),
           d, s)

    # 3. the latest link gone
    d = work / "no_latest"
    shutil.copytree(work / "whole", d, symlinks=True)
    for name in ("latest", "final"):
        (d / "checkpoints" / name).unlink()
    code, out, s = run(args(d, "steps=33"))
    record("checkpoints/latest and final deleted, steps raised to 33",
           f"exit {code}; " + ("resumed from the newest step" if "resumed from step 30" in out else out[-120:]), d, s)
    reference_33 = rows(d)

    # 4. resume from an earlier checkpoint of the same run
    d = work / "earlier"
    shutil.copytree(work / "whole", d, symlinks=True)
    before = sorted(p.name for p in (d / "checkpoints").iterdir())
    code, out, s = run(args(d, f"resume={d / 'checkpoints' / 'step_000027'}"))
    after = sorted(p.name for p in (d / "checkpoints").iterdir())
    record("resume=<an earlier checkpoint of the run>", f"exit {code} (refused); checkpoints "
           f"{'unchanged' if before == after else 'CHANGED'}", d, s)

    # 5. another learning rate
    d = work / "changed"
    shutil.copytree(work / "whole", d, symlinks=True)
    code, out, s = run(args(d, "steps=33", "optim.lr=5e-3"))
    record("optim.lr changed on resume", f"exit {code} (refused, names the key)", d, s)
    code2, out2, s2 = run(args(d, "steps=33", "optim.lr=5e-3", "resume=force"))
    report.append(("... then resume=force", f"exit {code2}; trained to step {max(rows(d))}",
                   lost(reference, {k: v for k, v in rows(d).items() if k <= 30}), s2))

    # 6. SIGTERM, 7. SIGINT twice
    for name, sig, twice in (("SIGTERM mid-run", signal.SIGTERM, False), ("SIGINT twice mid-run", signal.SIGINT, True)):
        d = work / name.split()[0].lower()
        proc = start(args(d))
        wait_for(lambda d=d: len(rows(d)) >= 10, proc)
        os.killpg(proc.pid, sig)
        if twice:
            time.sleep(0.05)
            os.killpg(proc.pid, sig)
        first = proc.wait()
        code, out, s = run(args(d))
        record(name, f"exit {first}, then {code}; " + ("resumed" if "resumed from" in out else "started over"), d, s)

    print(f"\nuninterrupted run: {len(reference)} steps in {whole_s:.1f} s (tiny SFT, save_every=3)")
    print(f"{'fault':<58}{'what happened':<52}{'steps lost':>11}{'recovery s':>11}")
    for name, happened, n, s in report:
        print(f"{name:<58}{happened:<52}{n:>11}{s:>11.1f}")
    assert reference_33  # (the 33-step continuation is checked against itself only: it has no reference)
    shutil.rmtree(work, ignore_errors=True)
    print(f"RESULT faults_lost_steps={sum(n for _, _, n, _ in report)}")


if __name__ == "__main__":
    main()
