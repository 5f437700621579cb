"""The prepared GPU check: what only a CUDA device can show about posttrain, in one run of a few minutes.

Needs only torch, transformers, safetensors and posttrain (no network, no model download):

(a) ``posttrain demo`` on the device (built-in GPT: SFT then Dr. GRPO): the before/after table and the wall
    time, to set next to the CPU figures in the README;
(b) 5 GRPO steps of a random Llama of SmolLM2-135M's shape (30 layers, width 576, 9 heads / 3 KV heads,
    vocabulary 49,152; a word-level tokenizer of 49,152 words built on the spot) in ``bf16-mixed``:
    seconds per step, generated tokens/s and peak device memory. The reward is a token-parity rule with
    signal in every group (a random model never solves a task, and a group with equal rewards has no
    gradient), so every step runs its update;
(c) the rollout engine's decode step at batch 64 on that model (sampling and the per-step host transfer
    included): the fraction of the memory-bandwidth roofline it reaches, (weight bytes + KV-cache bytes read
    per step) ÷ step time ÷ the device's data-sheet bandwidth (a device-to-device copy is measured and
    printed beside it, and used when the device is not in the table).

Without CUDA it says so and exits 0 (``--device cpu --tiny`` runs the same code at toy sizes: that is
how CI exercises it). The last line is ``RESULT roofline_fraction=<x>``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

WORDS = 49_152
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}


def token_parity(prompts, completions, token_ids, lengths, **_) -> list[float]:
    """The share of even token ids among a completion's last ``lengths`` ids: a reward a random policy's
    groups always disagree on (so GRPO always has a gradient)."""
    return [sum(1 for t in ids[len(ids) - n :] if t % 2 == 0) / max(n, 1)
            for ids, n in zip(token_ids, lengths, strict=True)]


def random_smollm2(out: Path, sizes: dict, words: int) -> Path:
    """A random Llama of the given sizes and a word-level tokenizer of ``words`` entries, saved as an HF dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + [f"w{i}" for i in range(words - len(specials))])}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", bos_token="<|im_start|>", unk_token="<unk>")
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    config = LlamaConfig(vocab_size=words, max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=vocab["<|im_start|>"], eos_token_id=vocab["<|im_end|>"],
                         pad_token_id=vocab["<|endoftext|>"], **sizes)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def check_demo(device: str, run_dir: Path, quick: bool) -> dict:
    """(a): the demo on ``device``; its summary.json."""
    from posttrain.demo import run_demo

    return run_demo(run_dir / "demo", quick=quick, progress=False, device=device)


def check_grpo(model_dir: Path, device: str, run_dir: Path, steps: int, tiny: bool) -> dict:
    """(b): ``steps`` GRPO steps in bf16-mixed; mean step time (first step excluded), tokens/s, peak memory."""
    from posttrain.config import RLConfig, load_config
    from posttrain.metrics import read_jsonl
    from posttrain.trainers.rl import train_rl

    sys.path.insert(0, str(Path(__file__).parent))  # the reward below, by module path
    out = run_dir / "grpo"
    overrides = [f"run_dir={out}", f"model={model_dir}", f"device={device}", "precision=bf16-mixed",
                 "algorithm=grpo", f"steps={steps}", "task.format=hash", "rewards={gpu_check:token_parity: 1.0}",
                 "eval_before=false", "eval.every=0", "eval.problems=1", "eval.samples=1", "eval.ks=[1]",
                 "eval.max_new_tokens=8", "save_every=0", "log_samples_every=0", "monitor.enabled=false",
                 f"prompts_per_step={2 if tiny else 16}", f"samples_per_prompt={2 if tiny else 8}",
                 f"sampling.max_new_tokens={8 if tiny else 256}", "max_tokens_per_micro_batch=8192",
                 "reward_timeout=300"]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train_rl(load_config(RLConfig, None, overrides), progress=False)
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "timing_s/step" in r]
    timed = rows[1:] or rows
    return {
        "s_per_step": statistics.mean(r["timing_s/step"] for r in timed),
        "gen_tokens_per_s": statistics.mean(r["throughput/gen_tokens_per_s"] for r in timed),
        "timing_s/update": statistics.mean(r.get("timing_s/update", 0.0) for r in timed),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "updates": rows[-1].get("rollout/policy_version"),
    }


# Nominal HBM bandwidth (bytes/s) by device name, from the vendors' data sheets.
NOMINAL_BANDWIDTH = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 80GB HBM3": 3.35e12, "H100 NVL": 3.9e12,
                     "H100 PCIe": 2.0e12, "A100-SXM4-80GB": 2.039e12, "A100 80GB PCIe": 1.935e12,
                     "A100-SXM4-40GB": 1.555e12, "A100-PCIE-40GB": 1.555e12}


def nominal_bandwidth(name: str) -> float | None:
    """The data-sheet bandwidth of the first table entry whose name is in ``name``, or None."""
    return next((bw for key, bw in NOMINAL_BANDWIDTH.items() if key in name), None)


def copy_bandwidth(device: torch.device, size_mib: int) -> float:
    """Bytes per second of a device-to-device copy (read + write), best of 5."""
    src = torch.empty(size_mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() / best


def check_roofline(model_dir: Path, device: torch.device, batch: int, context: int, steps: int = 32) -> dict:
    """(c): the rollout engine's decode step at ``batch`` rows (one prompt per row, ``context`` tokens each),
    bf16 weights: the time of ``steps`` more decode steps, from two ``Engine.generate`` calls of 8 and 8 +
    ``steps`` new tokens (prefill and start-up cancel out; sampling, the random streams and the one host
    transfer per step are in), against the bytes a step must read: every weight once and the KV cache so far."""
    from posttrain.checkpoint import load_policy
    from posttrain.config import LoraConfig, ModelConfig
    from posttrain.engine import Engine, SamplingParams

    policy, tokenizer = load_policy(ModelConfig(str(model_dir), dtype="bfloat16"), LoraConfig(), device)
    policy.eval()
    tokenizer.stop_ids = []  # every row decodes every step: no row leaves the batch
    engine = Engine(policy, tokenizer)
    words = policy.hf.config.vocab_size
    prompts = [[int(t) for t in torch.randint(4, words, (context,), generator=torch.Generator().manual_seed(i))]
               for i in range(batch)]

    def timed(new_tokens: int) -> float:
        params = SamplingParams(temperature=1.0, top_k=50, max_new_tokens=new_tokens)
        _sync(device)
        t0 = time.perf_counter()
        engine.generate(prompts, 1, params, seed=0)
        _sync(device)
        return time.perf_counter() - t0

    timed(8)  # warm-up
    short = statistics.median(timed(8) for _ in range(3))
    long = statistics.median(timed(8 + steps) for _ in range(3))
    step_s = (long - short) / steps
    text = policy.hf.config
    weights = sum(p.numel() * p.element_size() for p in policy.parameters())
    head_dim = text.hidden_size // text.num_attention_heads
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2  # keys and values, bf16
    kv = kv_per_token * batch * (context + 8 + steps / 2)  # bf16 keys and values read by a mean step
    copy = copy_bandwidth(device, 1024 if device.type == "cuda" else 64)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    nominal = nominal_bandwidth(name)
    bandwidth = nominal or copy
    return {"batch": batch, "context": context, "step_ms": 1e3 * step_s, "weight_bytes": weights, "kv_bytes": kv,
            "achieved_gb_s": (weights + kv) / step_s / 1e9, "copy_gb_s": copy / 1e9,
            "nominal_gb_s": None if nominal is None else nominal / 1e9,
            "roofline_fraction": (weights + kv) / step_s / bandwidth,
            "against": "data-sheet bandwidth" if nominal else "measured copy bandwidth (device not in the table)"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda | cuda:N (cpu: the CI twin, with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes and the quick demo (CI runs this on the CPU)")
    ap.add_argument("--steps", type=int, default=5, help="GRPO steps of (b)")
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary directory)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"no CUDA device (torch {torch.__version__}): nothing to check here; run this on a GPU machine")
        return
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}")
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    report: dict = {"device": name}
    try:
        t0 = time.perf_counter()
        report["demo"] = check_demo(str(device), work, quick=args.tiny)
        print(f"(a) demo: {json.dumps(report['demo'])} in {time.perf_counter() - t0:.0f} s")
        model_dir = random_smollm2(work / "smollm2_shape", TINY if args.tiny else SMOLLM2, 512 if args.tiny else WORDS)
        report["grpo"] = check_grpo(model_dir, str(device), work, args.steps, args.tiny)
        print(f"(b) GRPO bf16-mixed: {json.dumps(report['grpo'])}")
        report["roofline"] = check_roofline(model_dir, device, batch=8 if args.tiny else 64,
                                            context=32 if args.tiny else 512)
        print(f"(c) decode step: {json.dumps(report['roofline'])}")
        (work / "gpu_check.json").write_text(json.dumps(report, indent=1))
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)
    print(f"RESULT roofline_fraction={report['roofline']['roofline_fraction']:.3f}")


if __name__ == "__main__":
    main()
