"""What a trainer checks before its model loads: each trainer's ``check_inputs(config)`` returns a
:class:`Checked`; the trainer goes on with what it built, and ``--dry-run`` prints its summary and stops."""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.config_checks import ConfigError
from posttrain.epoch_order import epoch_steps


@dataclass
class Checked:
    """What the checks before the model loads built, and one phrase saying what they found."""

    summary: str  # e.g. "data (arithmetic: generated train / 256 test rows), rewards (1 function: task)"
    task: object | None = None  # the task, its data loaded and checked for the stage (None: the stage has none)
    sampler: object | None = None  # rl: the prompt sampler over the task's pool
    pairs: tuple[list, list] | None = None  # rm, dpo: (train, test) preference pairs, not yet tokenized
    epochs: str = ""  # with config.epochs > 0: the step count it set, in words (resolve_epochs)


def task_data(task) -> str:
    """How much data ``task`` holds, e.g. "dataset: 412 train / 50 test rows" (arithmetic generates its
    training problems)."""
    train = getattr(task, "train", None)
    return f"{task.name}: {'generated' if train is None else len(train)} train / {len(task.test)} test rows"


def resolve_epochs(config, rows: int | None, per_step: int, unit: str) -> str:
    """With ``config.epochs`` > 0, set ``config.steps`` to :func:`~posttrain.epoch_order.epoch_steps` of the
    ``rows`` training rows read ``per_step`` at a time and return a phrase saying so ("2 epochs of 1,000
    prompts, 16 per step: 125 steps"); "" with epochs 0. The count is of the rows read: rows a step leaves
    out (SFT's ``overlong=skip``, pairs over ``data.max_length``) still use up their place in the pass.
    ConfigError when ``rows`` is None (the task generates its training data: there is no epoch to count),
    when ``steps`` was set too (not at its default), or with RL's dynamic sampling (a step then draws an
    unknown number of prompts)."""
    if not config.epochs:
        return ""
    if rows is None:
        raise ConfigError("config key 'epochs' needs a fixed training set, but the task generates its problems: "
                          "set steps instead (or, for RL, prompt_sampling.pool_size)")
    default = type(config).__dataclass_fields__["steps"].default
    steps = epoch_steps(config.epochs, rows, per_step)
    if config.steps not in (default, steps):  # steps == steps: resolved by an earlier check of this config
        raise ConfigError(f"config keys 'epochs' ({config.epochs:g}) and 'steps' ({config.steps}) are both set: "
                          "give one (epochs sets the step count)")
    if getattr(config, "dynamic_sampling", False):
        raise ConfigError("config key 'epochs' does not fit dynamic_sampling (a step draws more prompts until its "
                          "groups have signal, so a pass takes an unknown number of steps): set steps instead")
    config.steps = steps
    return (f"{config.epochs:g} epoch{'s' * (config.epochs != 1)} of {rows:,} {unit}, {per_step} per step: "
            f"{config.steps} steps")
