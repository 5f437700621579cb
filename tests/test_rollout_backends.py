"""Rollout backends: the same seeds give the same rows as the local engine, weights follow the trainer's
versions, and a worker that dies or hangs is one clear error (Ray: a real local Ray, 2 workers)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.config_checks import ConfigError
from posttrain.engine import Engine, RolloutBatch, SamplingParams
from posttrain.random_streams import group_seed
from posttrain.rollout.base import RolloutConfig, RolloutError, interleave, make_backend, sync
from posttrain.tools import default_registry

try:
    import ray
except ImportError:
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="ray is not installed (pip install 'posttrain[ray]')")
ROOT = Path(__file__).resolve().parents[1]
PARAMS = SamplingParams(temperature=1.0, top_k=None, top_p=None, max_new_tokens=10)


def _batch(prompts: list[int], n: int, width: int) -> RolloutBatch:
    """Rows whose tokens say which prompt and sample they are: token = 100·prompt + sample."""
    rows = [[100 * p + j] * width for p in prompts for j in range(n)]
    return RolloutBatch([[p] for p in prompts for _ in range(n)], torch.tensor(rows), torch.zeros(len(rows), width),
                        torch.ones(len(rows), width), torch.full((len(rows),), width), torch.ones(len(rows)).bool(),
                        torch.arange(len(prompts)).repeat_interleave(n))


def test_interleave_puts_the_groups_of_each_part_back_in_prompt_order():
    parts = [_batch([0, 3, 6], 2, 3), _batch([1, 4], 2, 1), _batch([2, 5], 2, 2)]  # part k: prompts k, k+3, ...
    whole = interleave(parts, 7, 2, pad_id=-1)
    assert whole.completion_ids[:, 0].tolist() == [0, 1, 100, 101, 200, 201, 300, 301, 400, 401, 500, 501, 600, 601]
    assert whole.group_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    assert whole.completion_ids.shape == (14, 3) and whole.completion_ids[2].tolist() == [100, -1, -1]  # padded


@needs_ray  # (without ray installed, rollout.backend=ray is a config error of its own)
def test_under_data_parallelism_only_rank_0_drives_a_remote_backend(gpt, tok):
    from posttrain.rollout.base import Follower

    follower = make_backend(RolloutConfig(backend="ray", sync_every=2), gpt, tok, processes=2, rank=1)
    assert isinstance(follower, Follower) and follower.version is None and follower.sync_every == 2
    follower.update_weights(3, iter(()))
    assert follower.version == 3
    with pytest.raises(RuntimeError, match="rollout.backend=ray generates on rank 0 only"):
        follower.generate([[1]], 1, PARAMS, seed=0)
    with pytest.raises(ConfigError, match=r"'rollout.backend' has unknown value 'vlm' \(did you mean 'vllm'\?\)"):
        RolloutConfig(backend="vlm")


def test_a_key_of_another_backend_is_an_error_not_ignored():
    from posttrain.config import RLConfig, load_config

    with pytest.raises(ConfigError, match=r"config key rollout.workers, rollout.sync_every applies to "
                                          r"rollout.backend=ray or vllm, and the backend is local"):
        load_config(RLConfig, None, ["rollout.workers=4", "rollout.sync_every=2"])
    with pytest.raises(ConfigError, match=r"config key rollout.workers applies to rollout.backend=ray, and the "
                                          r"backend is vllm: set rollout.backend=ray"):
        load_config(RLConfig, None, ["rollout.backend=vllm", "rollout.vllm.python=" + sys.executable,
                                     "rollout.workers=3"])
    # the evaluation's backend may use them: eval.backend=ray with a local rollout
    assert load_config(RLConfig, None, ["eval.backend=ray", "rollout.workers=3"]).rollout.workers == 3
    assert load_config(RLConfig, None, []).rollout.workers == 2  # the defaults are fine


def test_a_new_backend_takes_the_trainers_weights_at_the_first_sync_whatever_their_version(gpt, tok):
    """A resumed or rolled-back policy may have any version, 0 included: a backend starts with none."""
    backend = make_backend(RolloutConfig(), gpt, tok)
    policy = type("Policy", (), {"version": 0, "named_weights": lambda self, trainable_only=False: iter(())})()
    assert backend.version is None and sync(backend, policy) >= 0 and backend.version == 0
    assert sync(backend, policy) == 0.0  # nothing new: nothing sent
    assert backend.generate([tok.encode("7 times 8")], 2, PARAMS, seed=3).completion_ids.shape[0] == 2  # as Engine


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (2 CPUs); each backend joins it and leaves it running."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", configure_logging=False)
    yield
    ray.shutdown()


def _same_rows(a: RolloutBatch, b: RolloutBatch) -> None:
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.lengths, b.lengths)
    assert torch.equal(a.group_ids, b.group_ids) and torch.equal(a.finished, b.finished)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=1e-5)
    assert a.prompt_ids == b.prompt_ids and a.tool_calls == b.tool_calls


@needs_ray
def test_ray_workers_give_the_local_engines_rows_and_follow_weight_syncs(local_ray, make_gpt, tok):
    model = make_gpt(seed=1)
    prompts = [tok.encode(f"what is {i} plus {i + 2}") for i in range(5)]  # 5 groups over 2 workers: 3 + 2
    seeds = [group_seed(7, i) for i in range(5)]
    backend = make_backend(RolloutConfig(backend="ray", workers=2), model, tok)
    try:
        with pytest.raises(RolloutError, match="have not received the trainer's weights yet"):
            backend.generate(prompts, 3, PARAMS, seeds=seeds)
        backend.update_weights(0, model.state_dict().items())
        _same_rows(backend.generate(prompts, 3, PARAMS, seeds=seeds),
                   Engine(model, tok, default_registry()).generate(prompts, 3, PARAMS, seeds=seeds))
        trained = copy.deepcopy(model)
        with torch.no_grad():
            for p in trained.parameters():
                p.add_(0.05 * torch.randn_like(p))
        backend.update_weights(1, trained.state_dict().items())
        after = backend.generate(prompts, 3, PARAMS, seeds=seeds)
        _same_rows(after, Engine(trained, tok, default_registry()).generate(prompts, 3, PARAMS, seeds=seeds))
        backend.version = 2  # the trainer believes it synced version 2; the workers hold 1
        with pytest.raises(RolloutError, match="rollout worker 0 generated with policy version 1, expected 2"):
            backend.generate(prompts, 3, PARAMS, seeds=seeds)
    finally:
        backend.close()


@needs_ray
def test_a_ray_worker_that_dies_or_times_out_is_one_clear_error(local_ray, gpt, tok):
    with pytest.raises(ConfigError, match=r"rollout.workers=3 need \{'CPU': 3\} of Ray, which has \{'CPU': 2.0\}"):
        make_backend(RolloutConfig(backend="ray", workers=3), gpt, tok)  # never placed: refused, not a hang
    prompts, seeds = [tok.encode("7 times 8")] * 2, [1, 2]
    backend = make_backend(RolloutConfig(backend="ray", workers=2, timeout_s=1e-3), gpt, tok)
    backend.version = 0  # (the workers' own version is None: the timeout comes first)
    try:
        with pytest.raises(RolloutError, match=r"rollout worker 0 did not finish a generation within "
                                               r"rollout.timeout_s=0.001 s"):
            backend.generate(prompts, 2, PARAMS, seeds=seeds)
        backend.config.timeout_s = 120.0
        ray.kill(backend.workers[1])
        with pytest.raises(RolloutError, match="rollout worker 1 died during a generation"):
            backend.generate(prompts, 2, PARAMS, seeds=seeds)
    finally:
        backend.close()


@needs_ray
def test_rl_with_ray_workers_trains_as_with_the_local_engine(tmp_path):
    """The CLI, 3 Dr. GRPO steps: the rollouts, rewards, updates and weight syncs of 2 Ray workers equal the
    local engine's; a worker generating with stale weights would change the rows of steps 2 and 3. Also on 2
    FSDP2 processes (rank 0 drives the workers with the gathered weights and broadcasts the batch)."""
    (tmp_path / "rw.py").write_text("def length(completions, **kwargs):\n"
                                    "    return [min(len(c), 40) / 40 for c in completions]\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    sft = subprocess.run([sys.executable, "-m", "posttrain", "sft", "-", "steps=5", "batch_size=8", "threads=1",
                          "gpt.n_layer=1", "gpt.n_embd=32", "gpt.n_head=2", "gpt.n_kv_head=1", "eval.problems=2",
                          "eval.samples=1", "eval.ks=[1]", "task.test_size=8", f"run_dir={tmp_path / 'sft'}",
                          "--no-progress"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert sft.returncode == 0, sft.stderr[-3000:]
    rows = {}
    for backend, nproc in (("local", 1), ("ray", 1), ("ray", 2)):
        run = tmp_path / f"{backend}{nproc}"
        proc = subprocess.run(
            [sys.executable, "-m", "posttrain", "rl", "-", "algorithm=dr_grpo", f"threads={nproc}", "steps=3",
             *([f"nproc={nproc}", "distributed.strategy=fsdp2"] if nproc > 1 else []),
             f"model={tmp_path / 'sft' / 'checkpoints' / 'final'}", "prompts_per_step=4",
             "samples_per_prompt=3", "eval.every=0", "eval_before=false", "eval.problems=4", "eval.samples=2",
             "eval.ks=[1,2]", "eval.max_new_tokens=8", "sampling.max_new_tokens=12", "task.test_size=8",
             f"rewards={{{tmp_path / 'rw.py'}:length: 1.0}}", "reward_workers=0", "optim.lr=1e-2",
             f"rollout.backend={backend}", "rollout.workers=2", "mismatch_every=1", "sampling.top_k=null",
             f"run_dir={run}", "--no-progress"],
            capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows[backend, nproc] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for remote in (rows["ray", 1], rows["ray", 2]):
        assert [r["rollout/policy_version"] for r in remote] == [1, 2, 3]  # every step changed the policy
        assert all(r["timing_s/update_weights"] > 0 for r in remote)  # and the workers received it
        assert all(r["mismatch/logprob_diff_max"] <= 1e-4 for r in remote)  # the trainer's weights sampled
        # (untruncated sampling: the workers' log-probs are the trainer's own at that version)
        for local, other in zip(rows["local", 1], remote, strict=True):
            for key in ("reward", "completions/mean_length", "grad_norm", "eval/reward"):
                if key in local:
                    assert other[key] == pytest.approx(local[key], rel=1e-5), key


def test_sync_sends_the_whole_state_first_then_the_trainable_part_when_due():
    """sync_every=2: a first full copy, then the trainable weights once two versions behind, at evaluation
    (force), and after a rollback."""

    class Backend:
        version, sync_every, sent = None, 2, []

        def update_weights(self, version, named):
            self.sent.append((version, [name for name, _ in named]))
            self.version = version

    class Policy:
        version = 0

        def named_weights(self, trainable_only=False):
            return iter([("lora_A", 0)] if trainable_only else [("base", 0), ("lora_A", 0)])

    backend, policy = Backend(), Policy()
    for version, force in ((0, False), (1, False), (2, False), (3, True), (1, False)):
        policy.version = version
        sync(backend, policy, force=force)
    assert backend.sent == [(0, ["base", "lora_A"]), (2, ["lora_A"]), (3, ["lora_A"]), (1, ["lora_A"])]


@needs_ray
def test_a_lora_policy_on_ray_workers_trains_as_with_the_local_engine(hf_llama_dir, tmp_path):
    """An HF model with a LoRA adapter and a KL reference: after the first full copy only the adapter is sent,
    and the workers still sample with the trainer's weights (its log-probs, each step)."""
    pytest.importorskip("peft")
    llama = hf_llama_dir
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    rows = {}
    for backend in ("local", "ray"):
        run = tmp_path / backend
        proc = subprocess.run(
            [sys.executable, "-m", "posttrain", "rl", "-", f"model={llama}", "lora.rank=8", "lora.alpha=16",
             "algorithm=grpo", "kl_coef=0.05", "threads=1", "steps=2", "prompts_per_step=2", "samples_per_prompt=3",
             "eval.every=0", "eval_before=false", "eval.problems=2", "eval.samples=1", "eval.ks=[1]",
             "eval.max_new_tokens=4", "sampling.max_new_tokens=12", "sampling.top_k=null", "task.test_size=8",
             "task.format=hash", "reward_workers=0", "optim.lr=1e-2", "mismatch_every=1",
             f"rollout.backend={backend}", f"run_dir={run}", "--no-progress"],
            capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows[backend] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["mismatch/logprob_diff_max"] <= 1e-4 for r in rows["ray"])
    assert [r["rollout/behaviour_version"] for r in rows["ray"]] == [0, 1]  # step 2 sampled after an adapter sync
    assert rows["ray"][1]["timing_s/update_weights"] > 0
    for local, remote in zip(rows["local"], rows["ray"], strict=True):
        for key in ("reward", "completions/mean_length", "grad_norm", "kl"):
            if key in local:
                assert remote[key] == pytest.approx(local[key], rel=1e-5, abs=1e-7), key


@needs_ray
def test_posttrain_eval_on_ray_workers_gives_the_local_engines_records(hf_llama_dir, tmp_path):
    """`posttrain eval --backend ray`: the same seeds, so the same samples and report, problem by problem."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    reports = {}
    for backend in ("local", "ray"):
        proc = subprocess.run(
            [sys.executable, "-m", "posttrain", "eval", "--model", str(hf_llama_dir), "--task", "arithmetic",
             "--problems", "4", "--samples", "2", "--max-new-tokens", "8", "--threads", "1", "--no-progress",
             "--out", str(tmp_path / f"{backend}.jsonl"), "--backend", backend,
             *(["--rollout-option", "workers=2"] if backend == "ray" else [])],
            capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports[backend] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert reports["ray"] == reports["local"] and reports["local"]["samples"] == 8
    assert (tmp_path / "ray.jsonl").read_text() == (tmp_path / "local.jsonl").read_text()
    bad = subprocess.run([sys.executable, "-m", "posttrain", "eval", "--model", str(hf_llama_dir), "--backend",
                          "local", "--rollout-option", "workers=3"], capture_output=True, text=True, env=env,
                         timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "config key rollout.workers applies to rollout.backend=ray" in bad.stderr
