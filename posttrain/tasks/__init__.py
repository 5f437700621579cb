"""Tasks: problems, a verifiable reward, and the data a trainer needs. Picked by name from config."""

from __future__ import annotations

from posttrain.config import TaskConfig, suggest
from posttrain.tasks.arithmetic import ArithmeticTask

TASKS = {"arithmetic": ArithmeticTask}


def make_task(config: TaskConfig):
    """Build the task named in ``config``."""
    if config.name not in TASKS:
        raise ValueError(f"unknown task '{config.name}'{suggest(config.name, list(TASKS))}")
    return TASKS[config.name](
        test_size=config.test_size, test_seed=config.test_seed, teacher_error=config.teacher_error
    )
