"""Specs for checkpoints: exact round trips of optimizer and RNG state, atomic writes that leave the
previous checkpoint intact when the disk fails, keep-last-N with the latest/final pointers."""

from __future__ import annotations

import errno
import json
import os
import random

import numpy as np
import pytest
import torch

from posttrain import checkpoint
from posttrain.checkpoint import (
    CheckpointDir,
    CheckpointError,
    random_state,
    restore_optimizer,
    restore_policy,
    restore_rng,
    rng_state,
    save_checkpoint,
    set_random_state,
)
from posttrain.config import OptimConfig
from posttrain.optim import make_optimizer


def train_steps(model, optimizer, n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        idx = torch.randint(0, model.config.vocab_size, (2, 6), generator=gen)
        loss = -model(idx, idx.roll(-1, 1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_optimizer_and_weights_round_trip_exactly(make_gpt, tok, tmp_path):
    model = make_gpt(seed=1)
    optimizer = make_optimizer(model, OptimConfig(lr=1e-2))
    train_steps(model, optimizer, 3, seed=0)
    save_checkpoint(tmp_path / "c", model, tok, {"step": 3}, optimizers={"policy": optimizer})
    assert not list(tmp_path.glob("c/*.pt")) and not list(tmp_path.glob("c/*.bin"))  # nothing pickled

    fresh = make_gpt(seed=2)
    fresh_opt = make_optimizer(fresh, OptimConfig(lr=1e-2))
    restore_policy(fresh, tmp_path / "c")
    restore_optimizer(fresh_opt, tmp_path / "c", "policy")
    assert fresh_opt.param_groups[0]["betas"] == optimizer.param_groups[0]["betas"]  # a tuple again
    train_steps(model, optimizer, 2, seed=5)
    train_steps(fresh, fresh_opt, 2, seed=5)
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert a.equal(b)  # bit-identical after two more steps: the Adam moments came back exactly


def test_rng_states_round_trip(tmp_path):
    rng = random.Random(3)
    json_part, tensors = rng_state()
    own = json.loads(json.dumps(random_state(rng)))
    draws = (random.random(), np.random.rand(), torch.rand(2).tolist(), rng.random())
    restore_rng(json.loads(json.dumps(json_part)), tensors)
    set_random_state(rng, own)
    assert (random.random(), np.random.rand(), torch.rand(2).tolist(), rng.random()) == draws


def save_step(ckpts: CheckpointDir, step: int, model, tok, final: bool = False):
    return ckpts.save(step, final=final, model=model, tokenizer=tok, state={"step": step})


def test_keep_last_and_pointers(make_gpt, tok, tmp_path):
    ckpts = CheckpointDir(tmp_path / "checkpoints", keep_last=2)
    model = make_gpt()
    assert ckpts.pointer("latest") is None and ckpts.steps() == []
    for step in (1, 2, 3):
        save_step(ckpts, step, model, tok)
    assert ckpts.steps() == [2, 3] and ckpts.pointer("latest").name == "step_000003"
    save_step(ckpts, 4, model, tok, final=True)
    assert ckpts.pointer("final").name == "step_000004"
    assert os.readlink(tmp_path / "checkpoints" / "final") == "step_000004"  # relative: the run dir can move
    assert json.loads((tmp_path / "checkpoints/final/trainer_state.json").read_text()) == {"step": 4}


def test_disk_full_mid_save_keeps_the_previous_checkpoint(make_gpt, tok, tmp_path, monkeypatch):
    ckpts = CheckpointDir(tmp_path / "checkpoints", keep_last=3)
    model = make_gpt()
    good = save_step(ckpts, 1, model, tok)
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_save_optimizer", full)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(CheckpointError) as err:
        ckpts.save(2, model=model, tokenizer=tok, state={"step": 2}, optimizers={"policy": opt})
    message = str(err.value)
    assert "step_000002" in message and "No space left on device" in message and "intact" in message
    assert ckpts.pointer("latest") == good.resolve() and ckpts.steps() == [1]
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000001"]  # no temp


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_unwritable_run_dir_names_the_path(make_gpt, tok, tmp_path):
    ckpts = CheckpointDir(tmp_path / "checkpoints", keep_last=3)
    save_step(ckpts, 1, make_gpt(), tok)
    os.chmod(tmp_path / "checkpoints", 0o555)
    try:
        with pytest.raises(CheckpointError, match="step_000002"):
            save_step(ckpts, 2, make_gpt(), tok)
    finally:
        os.chmod(tmp_path / "checkpoints", 0o755)
    assert ckpts.steps() == [1]


def test_a_save_killed_midway_leaves_no_checkpoint(make_gpt, tok, tmp_path):
    ckpts = CheckpointDir(tmp_path / "checkpoints", keep_last=3)
    save_step(ckpts, 1, make_gpt(), tok)
    half = tmp_path / "checkpoints" / ".step_000002.tmp"  # what a SIGKILL mid-write leaves
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 10)
    assert ckpts.steps() == [1] and ckpts.pointer("latest").name == "step_000001"
    save_step(ckpts, 2, make_gpt(), tok)
    assert not half.exists() and ckpts.steps() == [1, 2]


def test_discard_after_drops_a_given_up_branch_and_its_final_pointer(make_gpt, tok, tmp_path):
    ckpts = CheckpointDir(tmp_path / "checkpoints", keep_last=5)
    model = make_gpt()
    for step in (1, 2, 3):
        save_step(ckpts, step, model, tok, final=step == 3)
    (tmp_path / "checkpoints" / ".step_000009.del").mkdir()  # a delete killed mid-way
    ckpts.discard_after(1)  # e.g. resume=checkpoints/step_000001
    assert ckpts.steps() == [1] and ckpts.pointer("latest").name == "step_000001"
    assert not (tmp_path / "checkpoints" / "final").is_symlink()  # it pointed into the dropped branch
    save_step(ckpts, 2, model, tok)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000001", "step_000002"]


def test_a_failed_replace_puts_the_previous_checkpoint_back(make_gpt, tok, tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "step_000001", make_gpt(seed=1), tok, {"step": 1})
    before = (path / "model.safetensors").read_bytes()
    real_replace = os.replace

    def flaky(src, dst):
        if str(src).endswith(".tmp"):
            raise OSError(errno.EIO, "I/O error")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", flaky)
    with pytest.raises(CheckpointError, match="I/O error"):
        save_checkpoint(path, make_gpt(seed=2), tok, {"step": 1})
    assert (path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"]
