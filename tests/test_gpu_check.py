"""The prepared GPU check's CPU twin: bench/gpu_check.py's GRPO and decode-roofline parts run here at toy
sizes (on a GPU machine the same code runs at SmolLM2-135M's shape), and without CUDA the script says so
and exits 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

BENCH = Path(__file__).parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_it_says_so_and_exits_0():
    done = subprocess.run([sys.executable, str(BENCH / "gpu_check.py")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("no CUDA device")


def test_grpo_and_roofline_parts_run_on_the_cpu_twin(tmp_path):
    threads = torch.get_num_threads()
    model_dir = gpu_check.random_smollm2(tmp_path / "model", gpu_check.TINY, 512)
    try:
        grpo = gpu_check.check_grpo(model_dir, "cpu", tmp_path, steps=2, tiny=True)
    finally:
        torch.set_num_threads(threads)
    assert grpo["updates"] == 2  # the parity reward has signal: every step updated the policy
    assert grpo["s_per_step"] > 0 and grpo["gen_tokens_per_s"] > 0
    roof = gpu_check.check_roofline(model_dir, torch.device("cpu"), batch=4, context=16, steps=8)
    assert roof["weight_bytes"] > 0 and roof["kv_bytes"] == (2 * 2 * 2 * 16 * 2) * 4 * (16 + 8 + 4)
    assert roof["against"] == "measured copy bandwidth (device not in the table)"  # the CPU: no data sheet


def test_nominal_bandwidth_by_device_name():
    assert gpu_check.nominal_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert gpu_check.nominal_bandwidth("NVIDIA H200") == 4.8e12
    assert gpu_check.nominal_bandwidth("a GPU nobody lists") is None


def test_token_parity_reads_the_completion_ids_only():
    assert gpu_check.token_parity(["p"], ["c"], token_ids=[[1, 3, 2, 4, 5]], lengths=[3]) == [2 / 3]
