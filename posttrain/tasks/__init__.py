"""Tasks: problems, a verifiable reward, and the data a trainer needs. Picked by name from config."""

from __future__ import annotations

from posttrain.config import ConfigError, TaskConfig, suggest
from posttrain.tasks.arithmetic import ArithmeticTask
from posttrain.tasks.dataset import DatasetTask
from posttrain.tasks.gsm8k import GSM8KTask
from posttrain.tasks.short_answer import ShortAnswerTask

TASKS = {"arithmetic": ArithmeticTask, "gsm8k": GSM8KTask, "dataset": DatasetTask, "short_answer": ShortAnswerTask}


INTERFACE = ("check", "train_problem", "train_pool", "difficulty", "prompt", "sft_example", "reward", "grade",
             "columns", "evaluate", "corpus")  # what a task provides (README: the Task interface)


def make_task(config: TaskConfig):
    """Build the task named in ``config`` (each task class reads its own fields of the TaskConfig): a built-in
    one, or a class of your own named ``pkg.mod:MyTask`` / ``path/to/file.py:MyTask``, built with its
    ``from_config(config)`` (else ``MyTask(config)``); ConfigError when it cannot be loaded or lacks a method."""
    if ":" in config.name:
        from posttrain.rewards.loading import load_object  # here: the rewards import the tasks

        cls = load_object(config.name, "task")
        task = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
        missing = [name for name in INTERFACE if not callable(getattr(task, name, None))]
        if missing:
            raise ConfigError(f"task '{config.name}' lacks {', '.join(missing)} (README: the Task interface)")
        return task
    if config.name not in TASKS:
        raise ValueError(f"unknown task '{config.name}'{suggest(config.name, list(TASKS))}")
    return TASKS[config.name].from_config(config)
