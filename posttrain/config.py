"""Typed run configs: dataclasses with a one-line doc per field, YAML files, dotted overrides.

``load_config(SFTConfig, "configs/demo_sft.yaml", ["optim.lr=1e-3", "steps=50"])`` reads the
YAML, applies ``key=value`` overrides (values parsed as YAML scalars), and builds the nested
dataclasses. A key that does not exist is an error that names the key and the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from posttrain.engine import SamplingParams
from posttrain.models.gpt import GPTConfig

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be used, with a message that says what to change."""


@dataclass
class TaskConfig:
    """Which task supplies problems and rewards."""

    name: str = "arithmetic"  # task name (built-in: arithmetic)
    teacher_error: float = 0.3  # share of SFT solutions with one wrong step (imperfect teacher)
    test_size: int = 256  # held-out problems in the fixed test split
    test_seed: int = 1234  # seed of the test split


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 3e-3  # peak learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay (matrices only)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    warmup_steps: int = 20  # linear warm-up from 0 to lr
    schedule: str = "cosine"  # after warm-up: cosine | linear | constant
    min_lr_ratio: float = 0.0  # final lr as a fraction of lr
    grad_clip: float = 1.0  # clip the global grad norm to this (0: off)

    def __post_init__(self):
        _check_choice("optim.schedule", self.schedule, ["cosine", "linear", "constant"])


@dataclass
class EvalConfig:
    """Periodic evaluation on the held-out split."""

    every: int = 100  # evaluate every N steps (0: only at the end)
    problems: int = 256  # held-out problems used (≤ task.test_size)
    samples: int = 8  # completions per problem, for pass@k
    ks: tuple[int, ...] = (1, 8)  # k values of pass@k
    temperature: float = 1.0  # sampling temperature for evaluation
    top_k: int | None = 50  # top-k for evaluation sampling
    max_new_tokens: int = 64  # completion budget
    seed: int = 4321  # sampling seed (fixed: every evaluation sees the same randomness)


@dataclass
class SFTConfig:
    """Supervised fine-tuning on task solutions (teacher forcing on assistant tokens)."""

    run_dir: str = "runs/sft"  # where metrics, samples and checkpoints go
    seed: int = 0  # seeds data order and initialisation
    threads: int = 0  # torch CPU threads (0: leave torch's default)
    init_from: str | None = None  # checkpoint dir to start from (None: fresh built-in GPT)
    steps: int = 600  # optimizer steps
    batch_size: int = 64  # conversations per step
    model: GPTConfig = field(default_factory=GPTConfig)  # built-in GPT sizes (fresh model only)
    task: TaskConfig = field(default_factory=TaskConfig)  # problems and rewards
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer and schedule
    eval: EvalConfig = field(default_factory=EvalConfig)  # held-out evaluation


@dataclass
class RLConfig:
    """On-policy RL (GRPO family) from a checkpoint, with the task's verifiable reward."""

    run_dir: str = "runs/rl"  # where metrics, samples and checkpoints go
    seed: int = 0  # seeds prompt order and sampling
    threads: int = 0  # torch CPU threads (0: leave torch's default)
    init_from: str = "runs/sft/checkpoints/final"  # checkpoint dir of the policy to train
    algorithm: str = "grpo"  # advantage estimator: grpo | rloo | reinforce
    steps: int = 100  # RL steps (one rollout batch and one update each)
    prompts_per_step: int = 16  # distinct prompts per step
    samples_per_prompt: int = 8  # completions per prompt (the group size G)
    adv_scale: str = "group"  # grpo only: divide r − mean by the group std (group), batch std, or none
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm | ...
    clip_low: float = 0.2  # PPO ratio clip below 1
    clip_high: float = 0.2  # PPO ratio clip above 1 (DAPO clip-higher when > clip_low)
    kl_coef: float = 0.0  # weight of the KL penalty to the initial policy (0: no reference model)
    kl_kind: str = "k3"  # KL estimator: k1 | k2 | k3
    skip_zero_std: bool = True  # groups whose rewards are all equal skip the backward pass
    micro_batch: int = 64  # rows per forward/backward chunk
    sampling: SamplingParams = field(default_factory=SamplingParams)  # rollout sampling
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, schedule="linear"))
    task: TaskConfig = field(default_factory=TaskConfig)  # problems and rewards
    eval: EvalConfig = field(default_factory=EvalConfig)  # held-out evaluation
    log_samples_every: int = 10  # write prompts/completions/rewards to samples.jsonl every N steps
    eval_before: bool = True  # evaluate the initial policy before the first step

    def __post_init__(self):
        from posttrain.algorithms import advantages, losses

        for key, valid in (
            ("algorithm", advantages.ADVANTAGES),
            ("adv_scale", advantages.GRPO_SCALES),
            ("loss_agg", losses.AGGREGATIONS),
            ("kl_kind", losses.KL_ESTIMATORS),
        ):
            _check_choice(key, getattr(self, key), list(valid))


def _check_choice(key: str, value: str, valid: list[str]) -> None:
    if value not in valid:
        raise ConfigError(f"config key '{key}' has unknown value '{value}'{suggest(value, valid)}")


def suggest(name: str, valid: list[str]) -> str:
    """' (did you mean X?)' for the closest valid name, or the list of valid names."""
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(sorted(valid))})"


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{key}' is not a section")
    node[leaf] = value


def _build(cls: type[T], data: dict, where: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"'{where or 'config'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config key '{path}'{suggest(key, list(fields))}")
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(next(a for a in args if a is not type(None)), value, path)
    if origin is tuple:
        items = value if isinstance(value, list | tuple) else [value]
        if len(args) == 2 and args[1] is Ellipsis or not args:
            return tuple(_coerce(args[0] if args else Any, v, path) for v in items)
        if len(items) != len(args):
            raise ConfigError(f"config key '{path}' needs {len(args)} values, got {list(items)!r}")
        return tuple(_coerce(a, v, path) for a, v in zip(args, items, strict=True))
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-3 as a string
        except ValueError:
            pass
    if hint is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # e.g. run_dir=2024
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
            raise ConfigError(f"config key '{path}' must be {hint.__name__}, got {value!r}")
    return value


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Build ``cls`` from a YAML file (optional) and ``key=value`` overrides (dotted keys)."""
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. optim.lr=1e-3)")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    return _build(cls, data, "")


def to_dict(config: Any) -> dict:
    """The config as plain data (tuples as lists), ready for YAML."""
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(config))


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
