"""The Python API, in TRL's shape: ``GRPOTrainer``, ``SFTTrainer``, ``DPOTrainer``, ``RewardTrainer``.

Each takes objects the way TRL's trainers do and runs the CLI's code (``train_rl``, ``train_sft``, ``train_dpo``,
``train_reward_model``) on a config built from them:

- ``model``: a path (posttrain checkpoint, HF directory or hub id, ``.gguf``), or an HF model object, which is
  saved to ``RUN_DIR/start_model`` with ``processing_class`` (its tokenizer; loaded from the model's
  ``name_or_path`` when not given) so the run can be resumed;
- ``train_dataset`` / ``eval_dataset``: an HF ``datasets.Dataset``, a list of dicts, or a path (anything
  ``task.data`` / ``data.source`` takes). Objects are written as JSON lines to ``RUN_DIR/data/train.jsonl`` and
  ``test.jsonl`` (the run reads them like any data: every row checked before the model loads). Without an
  ``eval_dataset`` nothing is held out (``test_size`` 0) unless ``args`` says otherwise, and the run has no
  held-out evaluation;
- ``args``: the stage's config dataclass, or a dict of overrides (nested, or dotted keys: ``{"optim.lr": 1e-5}``);
- ``GRPOTrainer``'s ``reward_funcs``: one or a list of callables (TRL's signature, called in this process;
  named ``api:<__name__>`` in the saved config, ``<__name__>`` in the metrics), reward names or paths
  (``"numeric_match"``, ``"./my_rewards.py:fn"``, run as configured), or a reward-model directory (a posttrain
  ``rm`` checkpoint, or an HF sequence classifier such as TRL's ``RewardTrainer`` writes; scored as
  ``reward_model``); ``reward_weights``: one weight each (default 1.0).
  Give either ``reward_funcs`` or ``args``' ``rewards``, not both.

The GRPO defaults are posttrain's ``algorithm=grpo`` preset and the dataset task (``prompt`` column,
``exact_match`` as the task reward): set ``task.prompt`` / ``task.answer`` / ``task.reward`` in ``args`` for
other columns. ``trainer.train()`` returns what the CLI's run returns (the held-out metrics);
``trainer.save_model(dir)`` writes the final checkpoint as an HF model directory (``posttrain export``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from posttrain.config import ConfigError, RLConfig, SFTConfig, build_config, to_dict
from posttrain.preference_config import DPOConfig, RMConfig
from posttrain.rewards import reward_name
from posttrain.rewards.loading import API_PREFIX

Data = Any  # a datasets.Dataset, a list of dicts, or a path


def _nested(overrides: Mapping[str, Any]) -> dict:
    """``{"optim.lr": 1e-5, "task": {"prompt": "q"}}`` as one nested dict (dotted keys split)."""
    out: dict = {}
    for key, value in overrides.items():
        node = out
        *parents, leaf = str(key).split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if isinstance(value, Mapping) and isinstance(node.get(leaf), dict):
            node[leaf].update(_nested(value))
        else:
            node[leaf] = _nested(value) if isinstance(value, Mapping) else value
    return out


def _as_dict(cls: type, args: Any) -> dict:
    """``args`` (None, a ``cls`` instance or a dict of overrides) as a nested dict of config fields."""
    if args is None:
        return {}
    if isinstance(args, cls):
        return to_dict(args)
    if isinstance(args, Mapping):
        return _nested(args)
    raise TypeError(f"args must be a {cls.__name__} or a dict of overrides, got {type(args).__name__}")


def _write_rows(data: Data, path: Path, what: str) -> str:
    """A path as it is; a Dataset or a list of dicts written to ``path`` as JSON lines (its path returned)."""
    if isinstance(data, str | Path):
        return str(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(data, "to_json") and hasattr(data, "column_names"):  # a datasets.Dataset
        data.to_json(str(path), lines=True, force_ascii=False)
        return str(path)
    if not isinstance(data, Sequence) or not all(isinstance(row, Mapping) for row in data):
        raise TypeError(f"{what} must be a datasets.Dataset, a list of dicts or a path, got {type(data).__name__}")
    with open(path, "w", encoding="utf-8") as f:
        for i, row in enumerate(data):
            try:
                f.write(json.dumps(dict(row), ensure_ascii=False) + "\n")
            except TypeError as err:
                raise TypeError(f"{what} row {i}: {err}") from None
    return str(path)


def _model_path(model: Any, processing_class: Any, run_dir: Path) -> str:
    """A path as it is; an HF model object saved (with its tokenizer) to ``run_dir/start_model`` once."""
    if isinstance(model, str | Path):
        return str(model)
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"model must be a path or a Hugging Face model, got {type(model).__name__}")
    out = run_dir / "start_model"
    if not (out / "config.json").exists():  # a resumed run keeps the start it had
        if processing_class is None:
            from transformers import AutoTokenizer

            processing_class = AutoTokenizer.from_pretrained(model.name_or_path)
        model.save_pretrained(out)
        processing_class.save_pretrained(out)
    return str(out)


class _Trainer:
    """What the four trainers share: the config, the run directory, ``save_model``."""

    config_cls: type = RLConfig

    def __init__(self, model: Any, args: Any, processing_class: Any = None):
        from posttrain.distributed import single_process_only

        single_process_only("the Python API")  # each rank would write the run's data files; the CLI runs them
        self.fields = _as_dict(self.config_cls, args)
        self.run_dir = Path(self.fields.get("run_dir") or self.config_cls.run_dir)
        self.fields.setdefault("model", {})["path"] = _model_path(model, processing_class, self.run_dir)
        self.config = None

    def _data_paths(self, train: Data, evaluation: Data | None) -> tuple[str, str | None]:
        """(train data, held-out data or None) as paths (objects written under RUN_DIR/data)."""
        folder = self.run_dir / "data"
        test = None if evaluation is None else _write_rows(evaluation, folder / "test.jsonl", "eval_dataset")
        return _write_rows(train, folder / "train.jsonl", "train_dataset"), test

    def _build(self) -> None:
        self.config = build_config(self.config_cls, self.fields)

    def save_model(self, output_dir: str | Path) -> Path:
        """The final checkpoint of the run as an HF model directory at ``output_dir`` (replaced if it exists)."""
        from posttrain.export import export_checkpoint

        return export_checkpoint(self.run_dir, None, "hf", out=output_dir, overwrite=True)


class _PromptTrainer(_Trainer):
    """A trainer on the dataset task: ``train_dataset`` (and ``eval_dataset``) become ``task.data``."""

    def _use_data(self, train: Data | None, evaluation: Data | None) -> None:
        task = self.fields.setdefault("task", {})
        if train is None:
            if task.get("name", "dataset") == "dataset" and not task.get("data"):
                raise ConfigError("no training data: give train_dataset, or task.data in args")
            return
        data, test = self._data_paths(train, evaluation)
        task.update({"name": "dataset", "data": data})
        if test is not None:
            task["test_split"] = test
        task.setdefault("test_size", 0)  # nothing held out of the training data unless args says so


class GRPOTrainer(_PromptTrainer):
    """GRPO (any posttrain RL algorithm through ``args``) on your prompts with your reward functions."""

    config_cls = RLConfig

    def __init__(self, model: Any, reward_funcs: Callable | str | Sequence[Callable | str] | None = None,
                 args: RLConfig | Mapping | None = None, train_dataset: Data | None = None,
                 eval_dataset: Data | None = None, processing_class: Any = None,
                 reward_weights: Sequence[float] | None = None):
        super().__init__(model, args, processing_class)
        self.fields.setdefault("algorithm", "grpo")
        self._use_data(train_dataset, eval_dataset)
        self.reward_funcs: dict[str, Callable] = {}
        if reward_funcs is not None:
            self._use_rewards(reward_funcs, reward_weights)
        self._build()

    def _use_rewards(self, funcs, weights: Sequence[float] | None) -> None:
        funcs = list(funcs) if isinstance(funcs, Sequence) and not isinstance(funcs, str) else [funcs]
        weights = list(weights) if weights is not None else [1.0] * len(funcs)
        if len(weights) != len(funcs):
            raise ConfigError(f"reward_weights has {len(weights)} weights for {len(funcs)} reward functions")
        if self.fields.get("rewards"):
            raise ConfigError("give the rewards either as reward_funcs or as args' rewards, not both")
        rewards: dict[str, float] = {}
        for fn, weight in zip(funcs, weights, strict=True):
            if isinstance(fn, str | Path) and Path(fn).is_dir():  # a reward model checkpoint
                self.fields.setdefault("reward_model", {})["path"] = str(fn)
                name = "reward_model"
            elif isinstance(fn, str | Path):
                name = str(fn)
            elif callable(fn):  # config.rewards says api:NAME; the metrics say NAME
                name = API_PREFIX + reward_name(fn)
                self.reward_funcs[name] = fn
            else:
                raise TypeError(f"a reward function must be callable or a name/path, got {type(fn).__name__}")
            if name in rewards:
                raise ConfigError(f"two reward functions are named '{name}'")
            rewards[name] = float(weight)
        self.fields["rewards"] = rewards

    def train(self, progress: bool = True) -> dict[str, dict[str, float]]:
        """Run it (resuming a run in the same run_dir, as the CLI does): {"before": ..., "after": ...}."""
        from posttrain.trainers.rl import train_rl

        return train_rl(self.config, progress=progress, reward_funcs=self.reward_funcs)


class SFTTrainer(_PromptTrainer):
    """Supervised fine-tuning on ``messages`` rows, or ``prompt`` and ``completion`` columns."""

    config_cls = SFTConfig

    def __init__(self, model: Any, args: SFTConfig | Mapping | None = None, train_dataset: Data | None = None,
                 eval_dataset: Data | None = None, processing_class: Any = None):
        super().__init__(model, args, processing_class)
        self._use_data(train_dataset, eval_dataset)
        self._build()

    def train(self, progress: bool = True) -> dict[str, float]:
        from posttrain.trainers.sft import train_sft

        return train_sft(self.config, progress=progress)


class _PairTrainer(_Trainer):
    """A trainer on preference pairs (``prompt``, ``chosen``, ``rejected``): the datasets become ``data.source``."""

    def __init__(self, model: Any, args: Any, train_dataset: Data | None, eval_dataset: Data | None,
                 processing_class: Any):
        super().__init__(model, args, processing_class)
        data = self.fields.setdefault("data", {})
        if train_dataset is not None:
            if eval_dataset is None and not isinstance(train_dataset, str | Path):
                raise ConfigError("preference pairs need held-out pairs: give eval_dataset too")
            source, test = self._data_paths(train_dataset, eval_dataset)
            data["source"] = source if test is None else str(Path(source).parent)
            data.setdefault("test_size", 0)
        elif data.get("source", "arithmetic") == "arithmetic" and "source" not in data:
            raise ConfigError("no training pairs: give train_dataset, or data.source in args")
        self._build()


class DPOTrainer(_PairTrainer):
    """Direct preference optimisation (``args``: ``loss``, ``beta``, ...)."""

    config_cls = DPOConfig

    def __init__(self, model: Any, args: DPOConfig | Mapping | None = None, train_dataset: Data | None = None,
                 eval_dataset: Data | None = None, processing_class: Any = None):
        super().__init__(model, args, train_dataset, eval_dataset, processing_class)

    def train(self, progress: bool = True) -> dict[str, dict[str, float]]:
        from posttrain.trainers.dpo import train_dpo

        return train_dpo(self.config, progress=progress)


class RewardTrainer(_PairTrainer):
    """A reward model (scalar head, Bradley–Terry loss) on preference pairs."""

    config_cls = RMConfig

    def __init__(self, model: Any, args: RMConfig | Mapping | None = None, train_dataset: Data | None = None,
                 eval_dataset: Data | None = None, processing_class: Any = None):
        super().__init__(model, args, train_dataset, eval_dataset, processing_class)

    def train(self, progress: bool = True) -> dict[str, float]:
        from posttrain.trainers.reward_model import train_reward_model

        return train_reward_model(self.config, progress=progress)
