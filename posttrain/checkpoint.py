"""Checkpoints: atomic saves, the resume state of a run, keep-last-N, and the loader that turns a path
into a policy (built-in GPT or Hugging Face model) and its tokenizer.

A checkpoint is a directory. The policy's part is what its ``save_pretrained`` writes, so the
directory loads as a model on its own: for the built-in GPT ``model.safetensors`` + ``model.json``
+ ``tokenizer.json``; for an HF policy config.json + model.safetensors + tokenizer files (with LoRA
``adapter/`` and ``base_model.json``, the model under the adapter, which loading merges it into). The resume
part, next to it:

* ``trainer_state.json``: step, stage, the RNG states of Python and NumPy, the trainer's own RNGs
  (data order), the health monitor, the KL controller and anything else the trainer keeps (JSON);
* ``rng.safetensors``: torch's CPU (and CUDA) generator states;
* ``<name>.safetensors`` for extra modules (the PPO critic), ``optimizer.<name>.safetensors`` +
  ``optimizer.<name>.json`` for each optimizer (tensors and the rest, split so nothing is pickled);
* ``config.yaml``: the resolved config of the run that wrote it.

Nothing is unpickled on load: safetensors and JSON only (and, for asynchronous RL's queued rollouts,
``rollouts.pt`` read with torch's weights-only loader: plain containers and tensors).

Writes are atomic: everything goes to a temporary directory, every file and the directory are
fsynced, then one ``rename`` puts it in place, so a run killed at any moment leaves either the whole
checkpoint or none. A run's checkpoints live in ``checkpoints/step_XXXXXX``; ``checkpoints/latest``
(and, once the run is complete, ``checkpoints/final``) are symlinks replaced atomically after a
complete write, and only the ``keep_last`` newest step directories stay.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from posttrain.config import ConfigError, LoraConfig, ModelConfig, save_config
from posttrain.models.gpt import GPT, GPTConfig
from posttrain.tokenizer import Tokenizer

STEP_DIR = re.compile(r"step_(\d{6,})$")


class CheckpointError(OSError):
    """A checkpoint could not be written (disk full, no permission); the previous ones are intact."""


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then the directories (so their entries are on disk too)."""
    dirs = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        dirs += [Path(dirpath) / d for d in dirnames]
        for name in filenames:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in dirs:
        _fsync_dir(d)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: str | Path, model, tokenizer, state: dict | None = None, *,
                    modules: dict | None = None, optimizers: dict | None = None, tensors: dict | None = None,
                    config=None, writers: list | None = None) -> Path:
    """Write model, tokenizer and ``state`` (JSON) to ``path`` atomically; returns ``path``.

    ``modules``: extra ``nn.Module`` s saved as ``<name>.safetensors``; ``optimizers``: optimizers whose
    state is saved for resuming; ``tensors``: {file stem: {name: tensor}} saved as ``<stem>.safetensors``
    (the RNG states); ``config``: the run's config, saved as ``config.yaml``; ``writers``: callables that write
    more files into the directory they are given (the queued rollouts of asynchronous RL). On failure
    (disk full, read-only directory) nothing at ``path`` changes and :class:`CheckpointError` says where.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, module in (modules or {}).items():
            frozen = _frozen(module)  # (a LoRA critic: its frozen base is the policy's, rebuilt at load)
            if frozen:
                save_file({k: v.contiguous() for k, v in module.state_dict().items() if k not in frozen},
                          tmp / f"{name}.safetensors")
            else:
                save_model(module, str(tmp / f"{name}.safetensors"))
        for name, group in (tensors or {}).items():
            save_file({k: v.contiguous() for k, v in group.items()}, tmp / f"{name}.safetensors")
        for name, optimizer in (optimizers or {}).items():
            _save_optimizer(optimizer, tmp, name)
        if config is not None:
            save_config(config, tmp / "config.yaml")
        for write in writers or []:
            write(tmp)
        (tmp / "trainer_state.json").write_text(json.dumps(state or {}, indent=1))
        _fsync_tree(tmp)
        move_into_place(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write the checkpoint {path}: {err}. The previous checkpoints in "
                              f"{path.parent} are intact.") from err
    except BaseException:  # nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def move_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished directory ``tmp`` to ``path``, replacing what is there (moved aside, then deleted)."""
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            os.replace(old, path)  # put the previous one back
            raise
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def _save_optimizer(optimizer: torch.optim.Optimizer | dict, directory: Path, name: str) -> None:
    """An optimizer's state_dict (or the state dict itself: FSDP2's gathered one) as tensors
    (``optimizer.<name>.safetensors``, keys ``param.key``) and everything else as JSON (``optimizer.<name>.json``)."""
    sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    save_file(tensors, directory / f"optimizer.{name}.safetensors")
    meta = {"param_groups": sd["param_groups"], "scalars": scalars}
    (directory / f"optimizer.{name}.json").write_text(json.dumps(meta))


def restore_optimizer(optimizer: torch.optim.Optimizer, directory: str | Path, name: str) -> None:
    """Load what :func:`_save_optimizer` wrote into ``optimizer`` (whose parameters are already in place)."""
    optimizer.load_state_dict(read_optimizer_state(directory, name))


def read_optimizer_state(directory: str | Path, name: str, cut=None) -> dict:
    """The optimizer state dict :func:`_save_optimizer` wrote (full tensors, on the CPU); ``cut(index, field,
    tensor)``: what to keep of each tensor as it is read, one at a time (FSDP2: this rank's shard)."""
    directory = Path(directory)
    meta = json.loads((directory / f"optimizer.{name}.json").read_text())
    state: dict[int, dict] = {}
    with safe_open(directory / f"optimizer.{name}.safetensors", "pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            index, field = key.split(".", 1)
            value = f.get_tensor(key)
            state.setdefault(int(index), {})[field] = cut(int(index), field, value) if cut else value
    for key, value in meta["scalars"].items():
        index, field = key.split(".", 1)
        state.setdefault(int(index), {})[field] = value
    groups = meta["param_groups"]
    for group in groups:  # JSON turned tuples into lists
        for key, value in group.items():
            if key != "params" and isinstance(value, list):
                group[key] = tuple(value)
    return {"state": state, "param_groups": groups}


def restore_module(module: torch.nn.Module, directory: str | Path, name: str) -> None:
    """Load ``name.safetensors`` into ``module``: every weight, or, for a module with frozen weights (a LoRA
    critic), the trainable ones and buffers (the frozen ones are not saved: the module was built with them)."""
    path = Path(directory) / f"{name}.safetensors"
    frozen = _frozen(module)
    if not frozen:
        load_model(module, str(path))
        return
    missing, unexpected = module.load_state_dict(load_file(path), strict=False)
    wrong = [k for k in missing if k not in frozen] + list(unexpected)
    if wrong:
        raise KeyError(f"{path} does not fit the module it is restored into: {wrong[:3]}")


def _frozen(module: torch.nn.Module) -> set[str]:
    """Names of ``module``'s parameters that do not train."""
    return {n for n, p in module.named_parameters() if not p.requires_grad}


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """The global RNG states: (JSON part: Python, NumPy; tensors: torch CPU and each CUDA device)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    json_part = {"python": [version, list(internal), gauss],
                 "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return json_part, tensors


def restore_rng(json_part: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = json_part["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = json_part["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    for key, value in tensors.items():
        if key.startswith("cuda.") and torch.cuda.is_available():
            torch.cuda.set_rng_state(value, int(key.split(".")[1]))


def random_state(rng: random.Random) -> list:
    """A ``random.Random``'s state as JSON-able data (:func:`set_random_state` reads it back)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_random_state(rng: random.Random, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


class CheckpointDir:
    """The checkpoints of one run (``run_dir/checkpoints``): ``step_XXXXXX`` directories, the ``latest``
    and ``final`` pointers, and pruning to the ``keep_last`` newest step directories (pointer targets
    are always kept)."""

    def __init__(self, root: str | Path, keep_last: int):
        self.root, self.keep_last = Path(root), keep_last

    def path(self, step: int) -> Path:
        return self.root / f"step_{step:06d}"

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint directory, ascending."""
        if not self.root.is_dir():
            return []
        found = (STEP_DIR.match(p.name) for p in self.root.iterdir())
        return sorted(int(m.group(1)) for m in found if m and (self.root / m.group(0) / "trainer_state.json").exists())

    def pointer(self, name: str) -> Path | None:
        """The checkpoint ``latest`` or ``final`` points at, if the pointer and its target exist."""
        link = self.root / name
        if not link.is_symlink() and not link.is_dir():
            return None
        target = link.resolve()
        return target if (target / "trainer_state.json").exists() else None

    def save(self, step: int, *, final: bool = False, **kwargs) -> Path:
        """:func:`save_checkpoint` into ``step_XXXXXX``, then point ``final`` (when asked) and ``latest`` at it
        (in that order: a resume from ``latest`` never finds a finished run without ``final``), then prune."""
        path = save_checkpoint(self.path(step), **kwargs)
        try:
            if final:
                self._point("final", path.name)
            self._point("latest", path.name)
        except OSError as err:
            raise CheckpointError(f"wrote {path} but could not update the pointers in {self.root}: {err}") from err
        self.prune()
        return path

    def before(self, step: int) -> Path | None:
        """The newest checkpoint of a step before ``step``."""
        earlier = [s for s in self.steps() if s < step]
        return self.path(earlier[-1]) if earlier else None

    def discard_after(self, step: int) -> None:
        """Delete the checkpoints after ``step`` (a branch given up: a rollback, or a resume from an earlier
        checkpoint); ``latest`` points at ``step``, and a ``final`` pointing past it goes."""
        self._point("latest", self.path(step).name)
        final = self.pointer("final")
        if final is not None and final.name > self.path(step).name:  # zero-padded: names sort as steps
            (self.root / "final").unlink()
        for s in self.steps():
            if s > step:
                self._delete(self.path(s))

    def _delete(self, path: Path) -> None:
        """Rename first, then delete: a kill mid-way leaves a ``.del`` leftover, never a half-deleted
        directory that still looks like a checkpoint."""
        gone = path.with_name(f".{path.name}.del")
        os.replace(path, gone)
        shutil.rmtree(gone, ignore_errors=True)

    def _point(self, name: str, target: str) -> None:
        tmp = self.root / f".{name}.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(target, tmp)
        os.replace(tmp, self.root / name)
        _fsync_dir(self.root)

    def prune(self) -> None:
        """Keep the ``keep_last`` newest step directories and the pointers' targets; remove what a save or a
        delete killed mid-way left behind."""
        keep = {p.name for p in (self.pointer("latest"), self.pointer("final")) if p is not None}
        steps = self.steps()
        keep |= {self.path(s).name for s in steps[-self.keep_last:]}
        for s in steps:
            if self.path(s).name not in keep:
                self._delete(self.path(s))
        for pattern in (".step_*.tmp", ".step_*.old", ".step_*.del"):  # a save or a delete killed mid-way
            for leftover in self.root.glob(pattern):
                shutil.rmtree(leftover, ignore_errors=True)


def restore_policy(model, directory: str | Path) -> None:
    """Load the weights a checkpoint holds into ``model`` (built the way the run built it), exactly."""
    if is_builtin_checkpoint(directory):
        model.load_state_dict(load_file(Path(directory) / "model.safetensors"))
    else:
        model.load_weights(directory)


def is_builtin_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "model.json").exists()


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer, dict]:
    """Read a built-in GPT checkpoint dir → (model, tokenizer, trainer state)."""
    path = Path(path)
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"no checkpoint at {path} (expected {path / 'model.safetensors'})")
    config = GPTConfig(**json.loads((path / "model.json").read_text()))
    model = GPT(config)
    model.load_state_dict(load_file(path / "model.safetensors"))
    state_file = path / "trainer_state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    return model.to(device), Tokenizer.load(path / "tokenizer.json"), state


def load_policy(model: ModelConfig, lora: LoraConfig, device: str | torch.device = "cpu"):
    """The policy ``model.path`` names and its tokenizer: a built-in GPT checkpoint, or an HF causal LM
    (a local dir, a hub id or a ``.gguf`` file), with a LoRA adapter when ``lora.rank`` > 0."""
    if model.path is None:
        raise ConfigError("config key 'model.path' must name the policy to load (model=runs/sft/checkpoints/final)")
    if is_builtin_checkpoint(model.path):
        if lora.rank > 0:
            raise ConfigError(f"LoRA (lora.rank={lora.rank}) needs a Hugging Face model; {model.path} is built-in")
        if model.chat_template is not None:
            raise ConfigError(f"model.chat_template is for Hugging Face models; {model.path} is a built-in checkpoint")
        policy, tokenizer, _ = load_checkpoint(model.path, device)
        return policy, tokenizer
    from posttrain.models.hf import load_hf

    return load_hf(model.path, model.dtype, model.tool_tokens, lora, device, model.chat_template)
