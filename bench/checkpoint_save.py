"""Checkpoint cost of a model: size on disk and time of one resumable save.

Loads a built-in checkpoint (default: the demo's SFT result), gives it the AdamW state of one real
optimizer step, and times ``CheckpointDir.save`` (weights, optimizer state, RNG states, trainer state,
config; fsynced and renamed into place, then the ``latest`` pointer and pruning) ``--repeats`` times
into a temporary directory. Prints the size of one checkpoint, the median save time, and last
``RESULT save_s=<median seconds>``.

    python bench/checkpoint_save.py --checkpoint runs/demo/sft/checkpoints/final
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from posttrain.checkpoint import CheckpointDir, load_checkpoint
from posttrain.config import OptimConfig, SFTConfig
from posttrain.optim import make_optimizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("runs/demo/sft/checkpoints/final"))
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    model, tokenizer, _ = load_checkpoint(args.checkpoint)
    optimizer = make_optimizer(model, OptimConfig())
    idx = torch.randint(0, model.config.vocab_size, (4, 32))
    (-model(idx, idx.roll(-1, 1)).mean()).backward()
    optimizer.step()  # AdamW moments exist, as in a checkpoint taken mid-run
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = CheckpointDir(Path(tmp), keep_last=2)
        for step in range(1, args.repeats + 1):
            start = time.perf_counter()
            path = checkpoints.save(step, model=model, tokenizer=tokenizer, state={"step": step},
                                    optimizers={"policy": optimizer}, config=SFTConfig(),
                                    tensors={"rng": {"torch": torch.get_rng_state()}})
            times.append(time.perf_counter() - start)
        size = sum(f.stat().st_size for f in path.iterdir())
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.checkpoint} ({params:,} parameters); checkpoint {size / 1e6:.1f} MB")
    print(f"save: median {statistics.median(times):.3f} s, min {min(times):.3f} s, max {max(times):.3f} s "
          f"over {args.repeats} saves")
    print(f"RESULT save_s={statistics.median(times):.3f}")


if __name__ == "__main__":
    main()
