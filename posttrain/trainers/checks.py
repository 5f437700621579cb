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
    prompts, 16 per step: 125 steps"); "" with epochs 0. ConfigError when ``rows`` is None (the task
    generates its training data: there is no epoch to count)."""
    if not config.epochs:
        return ""
    if rows is None:
        raise ConfigError("config key 'epochs' needs a fixed training set, but the task generates its problems: "
                          "set steps instead (or, for RL, prompt_sampling.pool_size)")
    config.steps = epoch_steps(config.epochs, rows, per_step)
    return f"{config.epochs:g} epochs of {rows:,} {unit}, {per_step} per step: {config.steps} steps"
