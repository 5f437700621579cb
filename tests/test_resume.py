"""Exact resume, specified by killing real runs: a run SIGKILLed at random moments (mid-step, mid-log,
mid-checkpoint) and resumed until it finishes writes the same metrics rows and ends with the same
weights as the same run never interrupted. Timings are the only numbers allowed to differ."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.metrics import read_jsonl

ROOT = Path(__file__).parents[1]
TINY_SFT = ["threads=1", "steps=12", "batch_size=8", "save_every=1", "keep_last=2", "gpt.n_layer=1",
            "gpt.n_embd=32", "gpt.n_head=2", "gpt.n_kv_head=1", "gpt.max_seq_len=128", "optim.warmup_steps=2",
            "optim.lr=1e-2", "task.test_size=8", "eval.every=6", "eval.problems=4", "eval.samples=2",
            "eval.ks=[1,2]", "eval.max_new_tokens=24"]
TINY_RL = ["threads=1", "algorithm=ppo", "kl_controller=adaptive", "steps=6", "prompts_per_step=2",
           "samples_per_prompt=3", "save_every=1", "keep_last=2", "critic.warmup_steps=1", "eval.every=3",
           "eval.problems=4", "eval.samples=2", "eval.ks=[1,2]", "eval.max_new_tokens=16",
           "sampling.max_new_tokens=16", "task.test_size=8", "optim.warmup_steps=1", "log_samples_every=2"]
VOLATILE = ("timing_s/", "throughput/")


def cli(stage: str, run_dir: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "posttrain", stage, "-", "--no-progress", f"run_dir={run_dir}", *overrides]


def run_to_end(args: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def run_with_kills(args: list[str], run_dir: Path, kills: int, rng: random.Random, job: bool = False) -> int:
    """Start the run; SIGKILL it ``kills`` times at random moments once it has logged a random number of
    rows (plus a random few ms, so kills land mid-step, mid-log and mid-checkpoint); resume it each time
    (resume=auto is the default) and let the last attempt finish. Returns how many kills landed. ``job``:
    the run is a torchrun job (``nproc=N``): the kill takes its whole process group, launcher and ranks."""
    landed = 0
    for attempt in range(kills + 1):
        rows_before = _rows(run_dir / "metrics.jsonl")
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                start_new_session=job)
        if attempt < kills:
            target = rng.randint(1, 8)
            while proc.poll() is None and _rows(run_dir / "metrics.jsonl") < target:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.15))
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL) if job else os.kill(proc.pid, signal.SIGKILL)
                landed += 1
        _, err = proc.communicate(timeout=300)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err[-3000:]
    assert proc.returncode == 0
    if job and landed:  # the ranks died with the launcher (else they finished the run and this attempt had
        assert _rows(run_dir / "metrics.jsonl") > rows_before  # nothing left to train)
    return landed


def _rows(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def stable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def assert_same_run(a: Path, b: Path, weights: tuple[str, ...] = ("model.safetensors",)) -> None:
    rows_a, rows_b = stable(read_jsonl(a / "metrics.jsonl")), stable(read_jsonl(b / "metrics.jsonl"))
    assert len(rows_a) == len(rows_b)
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra == rb  # bit-identical numbers: JSON keeps every float exactly
    for name in weights:
        wa, wb = load_file(a / "checkpoints/final" / name), load_file(b / "checkpoints/final" / name)
        assert wa.keys() == wb.keys()
        assert all(wa[k].equal(wb[k]) for k in wa)


@pytest.fixture(scope="module")
def sft_reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("sft_ref")
    run_to_end(cli("sft", run_dir, TINY_SFT))
    return run_dir


def test_sft_killed_at_random_moments_resumes_exactly(sft_reference, tmp_path):
    landed = run_with_kills(cli("sft", tmp_path, TINY_SFT), tmp_path, kills=3, rng=random.Random(7))
    assert landed >= 2
    assert_same_run(sft_reference, tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "final", "latest", "step_000011", "step_000012"]  # keep_last=2; pointers; no temp dirs left


def test_rl_ppo_killed_at_random_moments_resumes_exactly(sft_reference, tmp_path):
    model = f"model={sft_reference / 'checkpoints' / 'final'}"
    reference = tmp_path / "ref"
    run_to_end(cli("rl", reference, [*TINY_RL, model]))
    resumed = tmp_path / "resumed"
    landed = run_with_kills(cli("rl", resumed, [*TINY_RL, model]), resumed, kills=3, rng=random.Random(3))
    assert landed >= 2
    assert_same_run(reference, resumed, ("model.safetensors", "critic.safetensors"))
    assert read_jsonl(reference / "samples.jsonl") == read_jsonl(resumed / "samples.jsonl")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_a_two_process_rl_job_killed_at_random_moments_resumes_exactly(sft_reference, tmp_path, strategy):
    """Data parallel: the whole job (torchrun and both ranks) killed and started again gives the rows and
    weights of the same 2-process job never interrupted, bit for bit (FSDP2: the checkpoints are gathered
    to rank 0 and sharded again on resume, Adam state included)."""
    args = [*TINY_RL, f"model={sft_reference / 'checkpoints' / 'final'}", "nproc=2", f"distributed.strategy={strategy}"]
    reference, resumed = tmp_path / "ref", tmp_path / "resumed"
    run_to_end(cli("rl", reference, args))
    landed = run_with_kills(cli("rl", resumed, args), resumed, kills=2, rng=random.Random(5), job=True)
    assert landed >= 1
    assert_same_run(reference, resumed, ("model.safetensors", "critic.safetensors"))
    assert read_jsonl(reference / "samples.jsonl") == read_jsonl(resumed / "samples.jsonl")


def invoke(stage: str, run_dir: Path, overrides: list[str], *options: str):
    """The CLI in this process (no kill needed): exit code and output."""
    from typer.testing import CliRunner

    from posttrain.cli import app

    threads = torch.get_num_threads()  # threads=1 in the config must not slow the rest of the session
    try:
        return CliRunner().invoke(app, [stage, "-", "--no-progress", f"run_dir={run_dir}", *overrides, *options])
    finally:
        torch.set_num_threads(threads)


def test_a_finished_run_says_so_and_trains_nothing(sft_reference):
    before = (sft_reference / "metrics.jsonl").read_bytes()
    done = invoke("sft", sft_reference, TINY_SFT)
    assert done.exit_code == 0
    assert "already complete at step 12" in done.output and "nothing left to train" in done.output
    assert (sft_reference / "metrics.jsonl").read_bytes() == before


def test_a_finished_run_killed_before_its_last_pruning_is_pruned_when_started_again(sft_reference, tmp_path):
    """A kill between the final checkpoint and the pruning after it leaves one step directory too many; the
    next start finds the run complete and tidies it (the final checkpoint and the logs stay as they were)."""
    import shutil

    shutil.copytree(sft_reference, tmp_path / "run", symlinks=True)
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.copytree(ckpts / "step_000011", ckpts / "step_000010")  # what the kill left behind
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    done = invoke("sft", tmp_path / "run", TINY_SFT)
    assert done.exit_code == 0 and "already complete at step 12" in done.output
    assert sorted(p.name for p in ckpts.iterdir()) == ["final", "latest", "step_000011", "step_000012"]
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before


def test_resume_refuses_what_it_cannot_honour(sft_reference, tmp_path):
    never = invoke("sft", sft_reference, TINY_SFT, "--resume", "never")
    assert never.exit_code == 2 and "resume=never" in never.output and "holds checkpoints" in never.output
    other = invoke("sft", sft_reference, [*TINY_SFT, "steps=20", "gpt.n_embd=64"])
    assert other.exit_code == 2 and "gpt.n_embd (32 -> 64)" in " ".join(other.output.split())
    missing = invoke("sft", tmp_path, [*TINY_SFT, f"resume={tmp_path / 'nope'}"])
    assert missing.exit_code == 2 and "is not a checkpoint" in missing.output


def test_a_run_whose_pointers_are_gone_resumes_from_its_newest_step_and_keeps_its_logs(sft_reference, tmp_path):
    """A copy that drops symlinks (rsync -r, an object store) or a kill before the first pointer: resume=auto
    takes the newest complete step; it used to start over and empty metrics.jsonl."""
    import shutil

    shutil.copytree(sft_reference, tmp_path / "run", symlinks=True)
    for pointer in ("latest", "final"):
        (tmp_path / "run" / "checkpoints" / pointer).unlink()
    before = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    more = invoke("sft", tmp_path / "run", [*TINY_SFT, "steps=13"])
    assert more.exit_code == 0, more.output
    after = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert after[: len(before)] == before and {json.loads(row)["step"] for row in after[len(before):]} == {13}


def test_resuming_an_earlier_checkpoint_of_the_run_is_refused_and_branching_is_a_new_run_dir(sft_reference,
                                                                                           tmp_path):
    """resume=<step 11 of a run at step 12> used to delete step 12 and cut the logs back; now it is refused,
    naming the way to branch, and the branch in a new run_dir leaves the run as it was."""
    import shutil

    shutil.copytree(sft_reference, tmp_path / "run", symlinks=True)
    ckpts, logs = tmp_path / "run" / "checkpoints", (tmp_path / "run" / "metrics.jsonl").read_bytes()
    earlier = invoke("sft", tmp_path / "run", [*TINY_SFT, "steps=13", f"resume={ckpts / 'step_000011'}"])
    text = " ".join(earlier.output.split())
    assert earlier.exit_code == 2 and "is an earlier checkpoint of this run, which goes on to step 12" in text
    assert "start a new run_dir with resume=" in text
    assert sorted(p.name for p in ckpts.iterdir()) == ["final", "latest", "step_000011", "step_000012"]
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == logs
    branch = invoke("sft", tmp_path / "branch", [*TINY_SFT, f"resume={ckpts / 'step_000011'}"])
    assert branch.exit_code == 0, branch.output
    assert [json.loads(row)["step"] for row in (tmp_path / "branch" / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(row)] == [12]  # the branch trains step 12 again, from step 11
    assert sorted(p.name for p in ckpts.iterdir()) == ["final", "latest", "step_000011", "step_000012"]
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == logs


def test_a_resume_with_other_training_values_is_refused_unless_forced(sft_reference, tmp_path):
    """Re-running a command with a new learning rate in the same run_dir used to extend the old run after a yellow
    notice; now it is refused before any model loads, naming the keys and the two ways on."""
    import shutil

    shutil.copytree(sft_reference, tmp_path / "run", symlinks=True)
    logs = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    changed = invoke("sft", tmp_path / "run", [*TINY_SFT, "steps=13", "optim.lr=5e-3"])
    text = " ".join(changed.output.split())
    assert changed.exit_code == 2 and "holds a run that trained with other values: optim.lr (0.01 -> 0.005)" in text
    assert "another run_dir, or continue this one with the new values: resume=force" in text
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == logs
    longer = invoke("sft", tmp_path / "run", [*TINY_SFT, "steps=13", "eval.every=3", "threads=2"])  # may change
    assert longer.exit_code == 0 and "resuming with a changed config" in longer.output, longer.output
    forced = invoke("sft", tmp_path / "run", [*TINY_SFT, "steps=14", "optim.lr=5e-3"], "--resume", "force")
    assert forced.exit_code == 0 and "optim.lr 0.01 -> 0.005" in " ".join(forced.output.split()), forced.output
    assert [json.loads(r)["step"] for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1] == 14


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_run_after_the_step_in_flight_with_a_checkpoint_and_it_resumes(tmp_path, sig):
    """Preemption (SIGTERM) or Ctrl-C (SIGINT): the step in flight ends, a checkpoint of it is written (save_every
    is far away), exit code 8 with one line; the same command resumes there and says so."""
    args = cli("sft", tmp_path, [*TINY_SFT, "steps=400", "save_every=1000"])
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 120
    while proc.poll() is None and _rows(tmp_path / "metrics.jsonl") < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    steps = [json.loads(r)["step"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    stopped = steps[-1]
    assert proc.returncode == 8, err[-2000:]
    assert f"{sig.name}: stopped after step {stopped} of 400, with a checkpoint" in " ".join(err.split())
    assert (tmp_path / "checkpoints" / f"step_{stopped:06d}" / "trainer_state.json").exists()
    again = subprocess.run([*args[:-2], "steps=" + str(stopped + 2), "save_every=1000"], capture_output=True,
                           text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from step {stopped} (" in " ".join((again.stdout + again.stderr).split())
    assert [json.loads(r)["step"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1] == stopped + 2


def test_report_and_export_commands_on_a_finished_run(sft_reference, tmp_path):
    from typer.testing import CliRunner

    from posttrain.cli import app

    runner = CliRunner()
    report = runner.invoke(app, ["report", str(sft_reference), "--out", str(tmp_path / "report")])
    assert report.exit_code == 0 and (tmp_path / "report" / "index.html").exists()
    assert (tmp_path / "report" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    export = runner.invoke(app, ["export", str(sft_reference), "--step", "12", "--out", str(tmp_path / "hf")])
    assert export.exit_code == 0 and (tmp_path / "hf" / "config.json").exists()
    again = runner.invoke(app, ["export", str(sft_reference), "--out", str(tmp_path / "hf")])
    assert again.exit_code == 2 and "already exists" in again.output
    forced = runner.invoke(app, ["export", str(sft_reference), "--out", str(tmp_path / "hf"), "--overwrite"])
    assert forced.exit_code == 0
    missing = runner.invoke(app, ["export", str(sft_reference), "--step", "3"])
    assert missing.exit_code == 2 and "steps with a checkpoint: 11, 12" in missing.output


def test_a_run_directory_that_cannot_be_made_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = invoke("sft", blocker / "run", TINY_SFT)
    assert result.exit_code == 4 and result.output.startswith("file error: ") and "a_file/run" in result.output
    assert "Traceback" not in result.output and blocker.read_text() == "not a directory"
