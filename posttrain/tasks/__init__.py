"""Tasks: problems, a verifiable reward, and the data a trainer needs. Picked by name from config."""

from __future__ import annotations

from posttrain.config import TaskConfig, suggest
from posttrain.tasks.arithmetic import ArithmeticTask
from posttrain.tasks.dataset import DatasetTask
from posttrain.tasks.gsm8k import GSM8KTask

TASKS = {"arithmetic": ArithmeticTask, "gsm8k": GSM8KTask, "dataset": DatasetTask}


def make_task(config: TaskConfig):
    """Build the task named in ``config`` (each task class reads its own fields of the TaskConfig)."""
    if config.name not in TASKS:
        raise ValueError(f"unknown task '{config.name}'{suggest(config.name, list(TASKS))}")
    return TASKS[config.name].from_config(config)
