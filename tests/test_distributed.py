"""Data parallelism: N processes under torchrun (gloo, CPU) equal one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.distributed import World
from posttrain.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"


def test_a_shard_is_every_size_th_item_from_the_rank():
    items = list(range(7))
    assert [World(r, 3).shard(items) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert World().shard(items) == items and World().sum([1.5, 2]) == [1.5, 2]


def _rows(tmp_path: Path) -> Path:
    """Conversations of very different lengths (2 to about 90 answer tokens), so the two ranks of a step hold
    very different token counts: a per-rank mean of means would give another gradient."""
    rows = []
    for i in range(12):
        answer = " ".join(["seven plus five is twelve"] * (1 + (i * 7) % 18)) if i % 2 else str(i)
        rows.append({"messages": [{"role": "user", "content": f"Question {i}: say something"},
                                  {"role": "assistant", "content": answer}]})
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pairs(tmp_path: Path) -> Path:
    """Preference pairs whose replies range from a word to about 60 tokens."""
    rows = [{"prompt": f"Question {i}: say something", "chosen": " ".join(["seven plus five"] * (1 + i % 9)),
             "rejected": str(i)} for i in range(14)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


COMMON = ["steps=3", "optim.warmup_steps=0", "save_every=0", "threads=1"]
SFT = ["-", "task.name=dataset", "task.test_size=2", "task.reward=regex_format", "task.format_regex=.*",
       "batch_size=4", "gpt.n_layer=1", "gpt.n_embd=32", "gpt.n_head=2", "gpt.n_kv_head=1", "gpt.max_seq_len=160",
       "optim.lr=3e-3", "optim.schedule=constant", "eval.every=0", "eval.problems=2", "eval.samples=1",
       "eval.ks=[1]", "eval.max_new_tokens=2"]
PAIRS = ["-", "data.test_size=2", "batch_size=6", "micro_batch=2", "optim.lr=1e-3"]


def _run(tmp_path: Path, stage: str, name: str, nproc: int, *args: str) -> Path:
    """``posttrain STAGE ... nproc=N`` (N > 1: it starts itself again under torchrun); its run directory."""
    run_dir = tmp_path / name
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "posttrain", stage, args[0], *COMMON, *args[1:], f"run_dir={run_dir}",
           f"nproc={nproc}", "--no-progress"]  # args[0]: the config ('-': none); later overrides win
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def _same_run(one: Path, two: Path, keys: tuple[str, ...]) -> None:
    """The same final weights (‖a − b‖ / ‖a‖ ≤ 1e-5 per tensor: float32 sums in another order, through AdamW)
    and the same logged values (to 1e-4: the policy loss is a sum of terms that nearly cancel); the
    two-process run's logs written once (by rank 0)."""
    final = Path("checkpoints") / "final"
    for name in ("model.safetensors", "reward_head.safetensors"):
        if not (one / final / name).exists():
            continue
        a, b = load_file(one / final / name), load_file(two / final / name)
        for key in a:
            assert ((a[key] - b[key]).norm() / a[key].norm().clamp_min(1e-6)).item() <= 1e-5, key
    rows_one = [r for r in read_jsonl(one / "metrics.jsonl") if r["step"] > 0]
    rows_two = [r for r in read_jsonl(two / "metrics.jsonl") if r["step"] > 0]
    assert [r["step"] for r in rows_two] == [1, 2, 3]
    for r1, r2 in zip(rows_one, rows_two, strict=True):
        for key in (k for k in keys if k in r1):  # eval/... on the last step only
            assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-6), key  # a loss of terms that cancel
    assert all(k in rows_two[-1] for k in keys)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process runs both strategies are compared with, each made once: ``single(stage, name, *args)``."""
    root = tmp_path_factory.mktemp("one")
    done: dict[str, Path] = {}

    def run(stage: str, name: str, *args: str) -> Path:
        if name not in done:
            done[name] = _run(root, stage, name, 1, *args)
        return done[name]

    return root, run


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this Python")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_sft_dpo_rm_and_rl_on_two_processes_equal_one_process(single, strategy, tmp_path):
    root, one_process = single
    dp = f"distributed.strategy={strategy}"
    data = [f"task.data={_rows(root)}"]
    one = one_process("sft", "sft1", *SFT, *data)
    _same_run(one, _run(tmp_path, "sft", "sft2", 2, *SFT, *data, dp), ("tokens", "loss", "grad_norm", "eval/reward"))
    _run(tmp_path, "sft", "cut", 2, *SFT, *data, "steps=2", dp)  # a 2-process run of 2 steps, resumed by 1 process
    _same_run(one, _run(tmp_path, "sft", "cut", 1, *SFT, *data), ("tokens", "loss", "grad_norm", "eval/reward"))
    pairs = [f"data.source={_pairs(root)}", f"model={one / 'checkpoints' / 'final'}"]
    dpo = (*PAIRS, *pairs, "task=null", "eval.every=0")
    _same_run(one_process("dpo", "dpo1", *dpo), _run(tmp_path, "dpo", "dpo2", 2, *dpo, dp),
              ("loss", "grad_norm", "rewards/margins", "rewards/accuracies", "eval/loss"))
    rl_data = root / "questions.jsonl"
    rl_data.write_text("".join(json.dumps({"question": f"Question {i}: say something", "answer": str(i)}) + "\n"
                               for i in range(10)))
    (root / "rw.py").write_text("def length(completions, **kwargs):\n"
                                "    return [min(len(c), 40) / 40 for c in completions]\n\n\n"
                                "def sparse(completions, **kwargs):  # few groups with signal\n"
                                "    return [float(len(c) % 5 == 0) for c in completions]\n")
    rl = ["-", f"model={one / 'checkpoints' / 'final'}", "task.name=dataset", f"task.data={rl_data}",
          "task.prompt={question}", "task.test_size=2", "task.reward=regex_format", "task.format_regex=.*",
          f"rewards={{{root / 'rw.py'}:length: 1.0}}", "reward_workers=0", "prompts_per_step=4",
          "samples_per_prompt=3", "sampling.max_new_tokens=8", "optim.lr=1e-3", "eval_before=false", "eval.every=0",
          "eval.problems=2", "eval.samples=1", "eval.ks=[1]", "eval.max_new_tokens=2"]
    cases = {"dr_grpo": (), "ppo": ("critic.warmup_steps=1",),  # dapo: rounds of dynamic sampling, sparse rows
             "dapo": (f"rewards={{{root / 'rw.py'}:sparse: 1.0}}", "minibatches=2", "max_sampling_rounds=3",
                      "overlong_buffer=4")}  # (minibatches in which a rank has no live row: FSDP2 pads its passes)
    for algorithm, extra in cases.items():
        args = (*rl, f"algorithm={algorithm}", *extra)
        _same_run(one_process("rl", f"{algorithm}1", *args), _run(tmp_path, "rl", f"{algorithm}2", 2, *args, dp),
                  ("reward", "sampling/rounds", "completions/mean_length", "grad_norm", "policy_loss", "mismatch/kl",
                   "eval/reward", *(("value_loss", "kl") if algorithm == "ppo" else ())))
    rm = (*PAIRS, *pairs, "eval_every=0", "center_coef=0.1")  # without it the head bias has no gradient: Adam
    # would turn float noise into full steps of it
    _same_run(one_process("rm", "rm1", *rm), _run(tmp_path, "rm", "rm2", 2, *rm, dp),
              ("loss", "grad_norm", "accuracy", "eval/accuracy"))


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this Python")
def test_the_python_api_refuses_two_processes(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("from posttrain.api import SFTTrainer\nSFTTrainer(model='m', args={})\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(script)], capture_output=True,
                          text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0
    assert "the Python API does not run data-parallel yet (sft, rm, dpo, rl, pipeline, demo and eval do)" in proc.stderr


def test_nproc_is_checked_before_any_process_starts(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for args, message in [
        (["sft", "-", "batch_size=1", "nproc=2"], "batch_size (1) is the global batch: it must be at least nproc (2)"),
        (["rl", "-", "prompts_per_step=1", "nproc=2"], "prompts_per_step (1) is the global batch"),
        (["sft", "-", "nproc=0"], "'nproc' must be a whole number >= 1"),
        (["sft", "-", "nproc=2", "distributed.strategy=fsdp2", "precision=fp16-mixed"],
         "precision fp16-mixed does not run with distributed.strategy fsdp2: use bf16-mixed, or strategy ddp"),
    ]:
        proc = subprocess.run([sys.executable, "-m", "posttrain", *args, f"run_dir={tmp_path}"], capture_output=True,
                              text=True, env=env, timeout=120, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.count("config error") == 1 and message in proc.stderr, proc.stderr


def test_ranks_that_read_other_data_stop_with_one_line(monkeypatch):
    from posttrain.config import ConfigError

    world = World(0, 2)
    monkeypatch.setattr(World, "gather", lambda self, items: ["steps 10, data A", "steps 10, data B"])
    with pytest.raises(ConfigError, match="the 2 processes do not agree on the data: rank 0: steps 10, data A; "
                                          "rank 1: steps 10, data B .every node must see the same files"):
        world.agree("the data", "steps 10, data A")


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this Python")
def test_a_pipeline_and_posttrain_eval_on_two_processes_give_the_one_process_table(tmp_path):
    """``posttrain pipeline ... nproc=2`` (its stages data-parallel, the comparison's problems split over the
    ranks, pipeline.json and the tables written once) and ``posttrain eval --nproc 2`` equal one process."""
    import yaml

    tiny = {"threads": 1, "steps": 2, "save_every": 0, "task": {"test_size": 8}, "gpt": {
        "n_layer": 1, "n_embd": 32, "n_head": 2, "n_kv_head": 1},
        "eval": {"problems": 3, "samples": 2, "ks": [1, 2], "max_new_tokens": 8, "every": 0}}
    stages = {"sft": {**tiny, "kind": "sft", "model": None, "batch_size": 4},
              "rl": {**{k: v for k, v in tiny.items() if k != "gpt"}, "from": "sft", "prompts_per_step": 2,
                     "samples_per_prompt": 2,
                     "eval_before": False, "sampling": {"max_new_tokens": 8}}}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    tables = []
    for nproc in (1, 2):
        path = tmp_path / f"pipeline{nproc}.yaml"
        path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / f"run{nproc}"), "stages": stages, "eval": {
            "task": {"test_size": 8}, "problems": 5, "samples": 2, "max_new_tokens": 8, "batch": 2}}, sort_keys=False))
        proc = subprocess.run([sys.executable, "-m", "posttrain", "pipeline", str(path), f"nproc={nproc}",
                               "--no-progress"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("comparison:") == 1  # printed by rank 0 alone
        tables.append(json.loads((tmp_path / f"run{nproc}" / "comparison.json").read_text()))
        assert len((tmp_path / f"run{nproc}" / "rl" / "comparison.jsonl").read_text().splitlines()) == 5
    rows = [[{k: v for k, v in row.items() if k != "model"} for row in table["rows"]] for table in tables]
    assert rows[0] == rows[1] and 0 < len(rows[0])
    model = str(tmp_path / "run1" / "rl" / "checkpoints" / "final")
    for nproc in (1, 2):
        proc = subprocess.run([sys.executable, "-m", "posttrain", "eval", f"--model={model}", "--task=arithmetic",
                               "--problems=5", "--samples=2", "--max-new-tokens=8", "--batch=2", "--no-progress",
                               f"--out={tmp_path / f'eval{nproc}.jsonl'}", f"--nproc={nproc}"],
                              capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "eval1.jsonl").read_text() == (tmp_path / "eval2.jsonl").read_text()


def test_a_strategy_set_for_one_process_says_it_applies_to_several(capsys):
    from types import SimpleNamespace

    from posttrain.distributed import DistributedConfig, data_parallel

    config = SimpleNamespace(distributed=DistributedConfig(strategy="fsdp2"), steps=3, batch_size=4)
    world, _ = data_parallel(config, torch.device("cpu"), "data")
    assert world.size == 1
    assert "note: distributed.strategy=fsdp2 applies to a run on several processes" in capsys.readouterr().err
