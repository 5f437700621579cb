"""Asynchronous RL: the rollout queue, the staleness bound, the off-policy objectives, partial rollouts, and exact
resume with generation running ahead (real Ray workers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt

from posttrain.checkpoint import save_checkpoint
from posttrain.config import ConfigError, RLConfig, load_config
from posttrain.engine import Engine, SamplingParams
from posttrain.metrics import read_jsonl
from posttrain.rollout.queue import RolloutQueue
from posttrain.tools import default_registry
from posttrain.trainers.partial import PartialRow, Segments
from posttrain.trainers.rl import train_rl

try:
    import ray
except ImportError:
    ray = None

needs_ray = pytest.mark.skipif(ray is None, reason="ray is not installed (pip install 'posttrain[ray]')")
ROOT = Path(__file__).resolve().parents[1]


# -- the queue ---------------------------------------------------------------------------------------------------


def test_the_queue_runs_jobs_ahead_in_order_and_gives_results_in_submission_order():
    order, started = [], threading.Event()
    queue = RolloutQueue(background=True)

    def job(name, seconds):
        def run():
            started.set()
            time.sleep(seconds)
            order.append(name)
            return name
        return run

    queue.submit(job("a", 0.2))
    queue.submit(lambda: order.append("sync"), produces=False)
    queue.submit(job("b", 0.01))
    assert started.wait(5) and len(queue) == 2  # the side-effect job is not a result
    time.sleep(0.3)  # the caller "trains" while the queue generates
    first, waited, overlap = queue.pop()
    assert first == "a" and waited < 0.1 and overlap >= 0.2
    second, _, _ = queue.pop()
    assert second == "b" and order == ["a", "sync", "b"] and len(queue) == 0
    queue.close()


def test_with_no_staleness_a_job_runs_in_the_callers_thread_when_its_result_is_popped():
    ran = []
    queue = RolloutQueue(background=False)
    queue.submit(lambda: ran.append(("sync", threading.current_thread().name)), produces=False)
    queue.submit(lambda: ran.append(("gen", threading.current_thread().name)) or "rows")
    assert ran == []  # nothing ahead: the synchronous loop
    assert queue.pop()[0] == "rows"
    assert ran == [("sync", threading.current_thread().name), ("gen", threading.current_thread().name)]


def test_a_failed_job_is_raised_where_its_result_is_taken_and_a_flush_drops_everything_queued():
    queue = RolloutQueue(background=True)

    def broken():
        raise RuntimeError("worker died")

    queue.submit(broken, produces=False)
    queue.submit(lambda: 1)
    with pytest.raises(RuntimeError, match="worker died"):
        queue.pop()
    queue.submit(lambda: time.sleep(0.1) or 2)
    queue.submit(lambda: 3)
    assert queue.flush() == 3 and len(queue) == 0  # 1 (behind the failed sync), 2 and 3
    queue.submit(lambda: 4)
    assert queue.call(lambda: 5) == 5 and queue.drain() == [4]  # call runs behind what was submitted
    queue.preload([0])
    assert [queue.pop()[0], queue.pop()[0]] == [0, 4]
    queue.close()


# -- configuration -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["rollout.max_staleness=1"], "with rollout.backend=local both run in this one process: there is nothing to "
                                  "overlap"),
    (["off_policy=bypass", "is_correction=tis"], "together they would correct twice"),
    (["rollout.backend=ray", "rollout.max_staleness=1"], "needs is_correction=tis \\(or icepop\\)"),
    (["rollout.backend=ray", "rollout.max_staleness=1", "rollout.sync_every=2", "off_policy=bypass"],
     "use rollout.max_staleness alone"),
    (["rollout.segment_tokens=64", "sampling.max_new_tokens=64", "off_policy=bypass"], "must be below"),
    (["rollout.segment_tokens=8", "dynamic_sampling=true", "off_policy=bypass"], "use one of them"),
    (["rollout.segment_tokens=8"], "rollout.segment_tokens=8 trains on tokens of older weights"),
    (["rollout.segment_tokens=8", "off_policy=bypass"], "with sampling.top_k / top_p they are of the truncated"),
])
def test_async_settings_that_cannot_work_are_refused_with_what_to_do(overrides, message):
    if any("backend=ray" in o for o in overrides) and ray is None:
        pytest.skip("ray is not installed")
    with pytest.raises(ConfigError, match=message):
        load_config(RLConfig, None, overrides)


def test_the_off_policy_objectives_are_accepted_as_named():
    assert load_config(RLConfig, None, ["off_policy=bypass", "rollout.segment_tokens=8",
                                        "sampling.top_k=null"]).off_policy == "bypass"
    assert load_config(RLConfig, None, ["rollout.segment_tokens=8", "is_correction=tis"]).off_policy == "decoupled"


# -- partial rollouts ----------------------------------------------------------------------------------------------


def test_a_row_cut_inside_a_tool_call_is_parked_from_before_the_call(tok):
    text = tok.encode("3 apples ")
    call = [tok.tool_start_id, *tok.encode("2+2"), tok.tool_end_id]
    output = [tok.output_start_id, *tok.encode("4"), tok.output_end_id]
    for cut_at in (len(text) + 2, len(text) + len(call), len(text) + len(call) + 2):  # open call; output forced
        row = PartialRow([1], tokens=(text + call + output)[:cut_at], logprobs=[0.0] * cut_at, mask=[1.0] * cut_at)
        row.cut_to_safe_point(tok)
        assert row.tokens == text and len(row.logprobs) == len(row.mask) == len(text)
    whole = text + call + output + tok.encode(" so")
    row = PartialRow([1], tokens=list(whole), logprobs=[0.0] * len(whole), mask=[1.0] * len(whole))
    row.cut_to_safe_point(tok)
    assert row.tokens == whole  # a finished call stays
    stuck = PartialRow([1], tokens=list(text), logprobs=[0.0] * len(text), mask=[1.0] * len(text), spent=18)
    assert not stuck.done(20) and PartialRow([1], spent=20).done(20)  # the budget counts tokens generated


def test_segments_park_long_rows_and_give_back_whole_groups_within_the_budget(tok):
    torch.manual_seed(0)
    engine = Engine(tiny_gpt(tok.vocab_size).eval(), tok, default_registry())
    params = SamplingParams(temperature=1.0, top_k=None, top_p=None, max_new_tokens=20)
    segments = Segments(segment_tokens=6, max_new_tokens=20, seed=3)

    class Scorer:
        def __call__(self, convs, done, batch, step):
            from posttrain.rewards import Scores
            return Scores(torch.ones(len(done)), {}, {"task": [1.0] * len(done)}, [{}] * len(done))

        def solved(self, convs, done, batch, scores, step):
            return [True] * len(done)

    from posttrain.distributed import World
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "What is 2+2?"}]})
    seen = 0
    for step in range(6):
        drawn = ([(-1, None)] * 2, [{"messages": []}] * 2, [prompt, prompt], 0, 0)
        made = segments.make_round(engine, Scorer(), drawn, 3, params, [step * 10, step * 10 + 1], step, World(),
                                   made_at=step)
        batch = made.batch
        assert len(batch.lengths) == 3 * len(made.convs)  # whole groups only
        # a row is whole when it finished or 20 tokens were generated for it (a tool call cut at a segment's end is
        # sampled again, its first tokens counted: the row may end shorter)
        assert all(bool(f) or int(n) <= 20 for f, n in zip(batch.finished, batch.lengths, strict=True))
        assert all(int(n) <= 20 for n in batch.lengths) and all(s >= 1 for s in made.segments)
        assert all(first <= last for first, last in zip(made.first_made_at, made.made_at, strict=True))
        assert made.parked == sum(not r.done(20) for g in segments.pile for r in g.rows)
        seen += len(made.convs)
    assert seen > 0 and any(s > 1 for s in made.segments or [1])  # long rows took several segments


def _tiny_rl(tmp_path, tok, *extra: str) -> list[dict]:
    policy = save_checkpoint(tmp_path / "policy", tiny_gpt(tok.vocab_size), tok)
    (tmp_path / "rw.py").write_text("def length(completions, **kwargs):\n"
                                    "    return [min(len(c), 200) / 200 for c in completions]\n")
    config = load_config(RLConfig, None, [
        f"model={policy}", f"run_dir={tmp_path / 'run'}", "algorithm=dr_grpo", "steps=6", "prompts_per_step=4",
        "samples_per_prompt=3", "eval.every=0", "eval_before=false", "eval.problems=2", "eval.samples=1",
        "eval.ks=[1]", "eval.max_new_tokens=4", "sampling.max_new_tokens=24", "task.test_size=8", "optim.lr=1e-2",
        "optim.warmup_steps=1", "reward_workers=0", f"rewards={{{tmp_path / 'rw.py'}:length: 1.0}}",
        "mismatch_every=1", "threads=1", *extra])
    train_rl(config, progress=False)
    return read_jsonl(tmp_path / "run" / "metrics.jsonl")


def test_partial_rollouts_train_on_whole_groups_with_each_tokens_own_behaviour_log_prob(tmp_path, tok):
    rows = _tiny_rl(tmp_path, tok, "rollout.segment_tokens=8", "is_correction=tis", "sampling.top_k=null")
    assert rows[0]["partial/parked"] > 0 and rows[0]["sampling/groups"] == 0  # nothing whole after one segment
    trained = [r for r in rows if r["sampling/groups"] > 0]
    assert trained and max(r["partial/segments_mean"] for r in trained) > 1
    assert any(r["partial/resumed"] > 0 for r in rows)
    for r in trained:  # untruncated sampling: the trainer's log-probs are the sampler's where nothing moved
        if r["partial/first_segment_staleness_max"] == 0:
            assert r["mismatch/logprob_diff_max"] <= 1e-4
    older = [r for r in trained if r["partial/first_segment_staleness_max"] > 0]
    assert older and all(r["mismatch/logprob_diff_max"] > 1e-4 and r["is/ratio_max"] != 1.0 for r in older)
    assert all(r["completions/max_length"] <= 24 for r in trained)


def test_bypass_takes_the_ratio_against_the_behaviour_policy_decoupled_against_the_recomputed_one(tmp_path, tok):
    """Partial rollouts make tokens of older weights: bypass's one update takes its ratio against them (π_θ /
    π_behaviour ≠ 1 from the start, no weight), decoupled's against the recomputed π_old (exactly 1) with the
    truncated importance weight carrying the correction."""
    common = ("rollout.segment_tokens=8", "sampling.top_k=null")
    bypass = [r for r in _tiny_rl(tmp_path / "bypass", tok, *common, "off_policy=bypass")
              if r.get("partial/first_segment_staleness_max", 0) > 0]
    decoupled = [r for r in _tiny_rl(tmp_path / "decoupled", tok, *common, "is_correction=tis")
                 if r.get("partial/first_segment_staleness_max", 0) > 0]
    assert bypass and all(r["approx_kl"] > 1e-6 and "is/ratio_max" not in r for r in bypass)
    assert decoupled and all(r["approx_kl"] == 0.0 and r["ratio_mean"] == 1.0 and r["is/ratio_max"] != 1.0
                             for r in decoupled)


# -- generation ahead of training, on Ray workers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_policy(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("async")
    (out / "rw.py").write_text("def even(completions, **kwargs):\n"
                               "    return [float(len(c) % 2 == 0) for c in completions]\n")
    sft = subprocess.run([sys.executable, "-m", "posttrain", "sft", "-", "steps=5", "batch_size=8", "threads=1",
                          "gpt.n_layer=1", "gpt.n_embd=32", "gpt.n_head=2", "gpt.n_kv_head=1", "eval.problems=2",
                          "eval.samples=1", "eval.ks=[1]", "task.test_size=8", f"run_dir={out / 'sft'}",
                          "--no-progress"], capture_output=True, text=True, env=_env(), timeout=300, cwd=out)
    assert sft.returncode == 0, sft.stderr[-3000:]
    return out


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _async_args(base: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "posttrain", "rl", "-", "algorithm=grpo", "threads=1", "steps=6",
            f"model={base / 'sft' / 'checkpoints' / 'final'}", "prompts_per_step=4", "samples_per_prompt=3",
            "eval.every=3", "eval_before=false", "eval.problems=4", "eval.samples=2", "eval.ks=[1,2]",
            "eval.max_new_tokens=8", "sampling.max_new_tokens=12", "task.test_size=8",
            f"rewards={{{base / 'rw.py'}:even: 1.0}}", "reward_workers=0", "optim.lr=1e-2", "rollout.backend=ray",
            "rollout.workers=1", "rollout.max_staleness=1", "is_correction=tis", "dynamic_sampling=true",
            "max_sampling_rounds=2", "prompt_sampling.strategy=priority", "prompt_sampling.pool_size=32",
            "save_every=2", f"run_dir={run}", "--no-progress", *extra]


def _same(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        for key, value in x.items():
            if not key.startswith(("timing_s/", "throughput/", "rollout/queued")):
                assert y[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (x["step"], key)


@needs_ray
def test_generation_runs_one_step_ahead_and_a_killed_run_resumes_exactly(sft_policy):
    """K = 1 on a Ray worker with dynamic sampling, priority prompt sampling and an evaluation every 3 steps: every
    trained row is at most one step old, generation overlaps training, and a run killed (SIGKILL) after a checkpoint
    resumes to the uninterrupted run's numbers exactly (the checkpoint holds the rollout that was made ahead)."""
    whole = sft_policy / "whole"
    proc = subprocess.run(_async_args(sft_policy, whole), capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(whole / "metrics.jsonl")
    trained = [r for r in rows if "staleness/max" in r]
    assert len(trained) == 6 and trained[0]["staleness/max"] == 0
    assert all(r["staleness/max"] <= 1 and r["staleness/dropped"] == 0 for r in trained)
    assert any(r["staleness/max"] == 1 for r in trained[1:]) and sum(r["timing_s/overlap"] for r in trained) > 0
    assert any(r["sampling/rounds"] > 1 for r in trained)  # dynamic sampling refilled some step
    assert trained[-1]["sampling/seen"] > trained[0]["sampling/seen"]  # the priority sampler learned, as consumed
    assert (whole / "checkpoints" / "step_000002" / "rollouts.pt").exists()

    cut = sft_policy / "cut"
    killed = subprocess.Popen(_async_args(sft_policy, cut), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=_env(), start_new_session=True)
    deadline = time.monotonic() + 120
    while killed.poll() is None and not (cut / "checkpoints" / "latest").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    again = subprocess.run(_async_args(sft_policy, cut), capture_output=True, text=True, env=_env(), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step" in " ".join((again.stdout + again.stderr).split())
    _same(rows, read_jsonl(cut / "metrics.jsonl"))


@needs_ray
def test_a_skipped_update_flushes_the_rollouts_made_ahead(sft_policy):
    run = sft_policy / "skip"
    proc = subprocess.run(_async_args(sft_policy, run, "steps=3", "monitor.clipped_ratio_max=0",
                                      "monitor.length_action=skip_step", "sampling.max_new_tokens=4"),
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    flushes = [e for e in read_jsonl(run / "events.jsonl") if e["check"] == "rollout_queue"]
    assert flushes and all(e["action"] == "flush" and e["values"]["dropped"] == 1 for e in flushes)
    assert "made ahead dropped" in " ".join(proc.stdout.split())
    assert all(r["staleness/max"] == 0 for r in read_jsonl(run / "metrics.jsonl") if "staleness/max" in r)


def test_parked_completions_are_in_the_checkpoint_and_a_resumed_run_continues_them_exactly(tmp_path, tok):
    extra = ("rollout.segment_tokens=8", "is_correction=tis", "sampling.top_k=null", "optim.schedule=constant",
             "save_every=3")
    whole = _tiny_rl(tmp_path / "whole", tok, *extra)
    _tiny_rl(tmp_path / "cut", tok, *extra, "steps=3")
    assert (tmp_path / "cut" / "run" / "checkpoints" / "step_000003" / "rollouts.pt").exists()  # the pile
    _same(whole, _tiny_rl(tmp_path / "cut", tok, *extra))


@needs_ray
def test_two_processes_generating_ahead_train_as_one(sft_policy):
    """Data parallel (2 DDP processes, rank 0 drives the Ray worker and broadcasts each rollout) with K = 1 and the
    PPO critic (values computed when the step trains) gives the one-process run's numbers."""
    rows = {}
    for nproc in (1, 2):
        run = sft_policy / f"dp{nproc}"
        proc = subprocess.run(_async_args(sft_policy, run, "steps=3", "algorithm=ppo", "critic.warmup_steps=1",
                                          "dynamic_sampling=false", f"nproc={nproc}", "distributed.strategy=ddp"),
                              capture_output=True, text=True, env=_env(), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows[nproc] = read_jsonl(run / "metrics.jsonl")
    assert any("value_loss" in r for r in rows[1]) and max(r.get("staleness/max", 0) for r in rows[1]) == 1
    for one, two in zip(rows[1], rows[2], strict=True):
        for key in ("reward", "value_loss", "grad_norm", "staleness/max", "eval/pass@1"):
            if key in one:
                assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key


def test_the_rollouts_file_holds_plain_values_only():
    import numpy as np

    from posttrain.trainers.rl_rollouts import plain

    value = {"row": {"n": np.int64(3), "x": np.float32(0.5), "v": np.arange(3)}, "t": (1, "a", None)}
    out = plain(value)
    assert out["row"]["n"] == 3 and type(out["row"]["n"]) is int and out["t"] == [1, "a", None]
    assert torch.equal(out["row"]["v"], torch.arange(3))
    with pytest.raises(ValueError, match=r"hold a datetime at rollouts\['when'\], which a checkpoint keeps only"):
        import datetime

        plain({"when": datetime.datetime(2026, 12, 7)})
