"""Peak memory and time of one RL policy update: full logits against chunked log-probs.

The model is a random Llama of SmolLM2-135M's shape (30 layers, width 576, MLP 1536, 9 heads, 3 KV heads,
vocabulary 49,152, tied embeddings), fp32. The update is the RL policy loss's (trainers/objectives.py) on one
micro-batch: forward, then backward of the token-mean policy-gradient loss (``losses.policy_loss`` on
policy, i.e. −A·logp in its gradient) minus 0.01 × the token-mean entropy, on B×T = 8×512 rows whose first
128 positions are prompt (target −1) and last 384 completion. No optimizer step. Three variants:

* ``full``: today's path: ``logits = policy(idx)`` (B, T, V) fp32, ``token_logprobs`` (log_softmax and
  gather) and ``losses.entropy_from_logits`` of the full logits;
* ``chunked``: ``policy.logprobs(idx, targets, entropy=True)`` (posttrain/models/logprobs.py);
* ``chunked+ckpt``: the same after ``policy.enable_activation_checkpointing()``.

Each variant runs in a fresh process (the script re-invokes itself with ``--variant X``). Memory on CPU: the
resident high-water mark during the first update minus the RSS just before it. The high-water mark
(VmHWM) is reset to the current RSS just before the update (writing 5 to /proc/self/clear_refs), so
building the model does not count, and freed heap memory is handed back first (malloc_trim). The
children run with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB: every tensor is then its own mapping,
returned to the OS when freed, so RSS follows the live tensors (as ``max_memory_allocated`` does on CUDA).
With glibc's default adaptive threshold (``--keep-malloc``), tensors up to 32 MiB come from the heap, whose
freed pages stay resident, and the high-water mark also counts that fragmentation. The first
full-size update is the measured one: a full-size warm-up would leave its freed memory resident in the
allocator's pools, where the measured update would reuse it unseen; the only warm-up is an update of 8
tokens (lazy imports and kernel set-up, which would otherwise count). The gradients count (zeroed with
set_to_none, as the model engine does): every variant allocates them. On CUDA: ``torch.cuda.max_memory_allocated``
during a second update minus the memory allocated before it (the first update is a warm-up). Time: the
wall time of a second update, and its process CPU time (less sensitive to other load on the machine).
Prints each variant's peak MiB and times, and last ``RESULT memory_ratio=<full peak ÷ chunked+ckpt peak>``.

    python bench/update_memory.py     # defaults: --threads 2; --quick: a tiny model (tests); --keep-malloc
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from posttrain.algorithms import losses
from posttrain.models.gpt import token_logprobs
from posttrain.models.hf import HFPolicy

VARIANTS = ("full", "chunked", "chunked+ckpt")
SMOLLM2_135M = dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
QUICK = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=8192, tie_word_embeddings=True)
ENTROPY_COEF = 0.01


def update(policy: HFPolicy, variant: str, idx, targets, advantages) -> None:
    """One policy update: forward, loss, backward (gradients left in .grad)."""
    policy.zero_grad(set_to_none=True)
    mask = (targets >= 0).float()  # (B, T)
    if variant == "full":
        logits = policy(idx)  # (B, T, V)
        logp, entropy = token_logprobs(logits, targets), losses.entropy_from_logits(logits)  # (B, T) each
    else:
        logp, entropy = policy.logprobs(idx, targets, entropy=True)  # (B, T) each
    loss, _ = losses.policy_loss(logp, logp.detach(), advantages, mask)
    loss = loss - ENTROPY_COEF * losses.aggregate(entropy, mask, "token-mean")
    loss.backward()


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _peak_bytes_cpu(step) -> int:
    """High-water RSS of ``step()`` minus the RSS before it (Linux)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap pages back to the OS: not reusable unseen
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) * 1024


def _peak_bytes_cuda(step) -> int:
    step()  # warm-up: the caching allocator and cuBLAS workspaces; allocated bytes are counted exactly
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def run_variant(variant: str, sizes: dict, batch: int, seq: int, completion: int, device: str) -> dict:
    """Build the model and batch, then measure one update of ``variant`` (in this process)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    policy = HFPolicy(LlamaForCausalLM(LlamaConfig(**sizes, max_position_embeddings=seq))).to(device).train()
    if variant == "chunked+ckpt":
        policy.enable_activation_checkpointing()
    idx = torch.randint(0, sizes["vocab_size"], (batch, seq + 1), device=device)
    targets = idx[:, 1:].clone()  # (B, T)
    targets[:, : seq - completion] = -1  # the prompt
    idx = idx[:, :-1]
    advantages = torch.randn(batch, 1, device=device)  # (B, 1): one per row, broadcast over tokens

    def step():
        update(policy, variant, idx, targets, advantages)

    update(policy, variant, idx[:1, -8:], targets[:1, -8:], advantages[:1])  # 8 tokens: lazy imports, kernels
    policy.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    peak = _peak_bytes_cuda(step) if device == "cuda" else _peak_bytes_cpu(step)
    sync()
    start, cpu_start = time.perf_counter(), time.process_time()
    step()
    sync()
    return {"variant": variant, "peak_mib": peak / 2**20, "update_s": time.perf_counter() - start,
            "cpu_s": time.process_time() - cpu_start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=VARIANTS, help="measure one variant in this process (internal)")
    ap.add_argument("--quick", action="store_true", help="a 2-layer model, vocabulary 8192, B×T 4×128 (96 completion)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep-malloc", action="store_true", help="leave glibc's adaptive mmap threshold (see above)")
    args = ap.parse_args()
    sizes, batch, seq, completion = (QUICK, 4, 128, 96) if args.quick else (SMOLLM2_135M, 8, 512, 384)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.variant:
        torch.set_num_threads(args.threads)
        print(json.dumps(run_variant(args.variant, sizes, batch, seq, completion, device)))
        return
    print(f"model: random Llama {sizes}; B×T = {batch}×{seq}, {completion} completion tokens per row; fp32 on "
          f"{device}, {args.threads} threads; torch {torch.__version__}")
    env = dict(os.environ) if args.keep_malloc else {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    print(f"allocator: glibc, {'adaptive mmap threshold' if args.keep_malloc else 'mmap threshold 64 KiB'}")
    rows = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--threads", str(args.threads)]
        done = subprocess.run(cmd + ["--quick"] * args.quick, capture_output=True, text=True, env=env)
        if done.returncode:
            raise RuntimeError(f"variant {variant} failed:\n{done.stderr}")
        rows[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        row = rows[variant]
        print(f"{variant:<13} peak {row['peak_mib']:9.1f} MiB   update {row['update_s']:7.2f} s "
              f"(CPU time {row['cpu_s']:.2f} s)", flush=True)
    slower = rows["chunked"]["update_s"] / rows["full"]["update_s"] - 1
    print(f"chunked vs full: time {slower:+.1%}; memory ÷{rows['full']['peak_mib'] / rows['chunked']['peak_mib']:.2f}")
    print(f"RESULT memory_ratio={rows['full']['peak_mib'] / rows['chunked+ckpt']['peak_mib']:.2f}")


if __name__ == "__main__":
    main()
