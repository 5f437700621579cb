"""What a trainer checks before its model loads: each trainer's ``check_inputs(config)`` returns a
:class:`Checked`; the trainer goes on with what it built, and ``--dry-run`` prints its summary and stops."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Checked:
    """What the checks before the model loads built, and one phrase saying what they found."""

    summary: str  # e.g. "data (arithmetic: generated train / 256 test rows), rewards (1 function: task)"
    task: object | None = None  # the task, its data loaded and checked for the stage (None: the stage has none)
    sampler: object | None = None  # rl: the prompt sampler over the task's pool
    pairs: tuple[list, list] | None = None  # rm, dpo: (train, test) preference pairs, not yet tokenized


def task_data(task) -> str:
    """How much data ``task`` holds, e.g. "dataset: 412 train / 50 test rows" (arithmetic generates its
    training problems)."""
    train = getattr(task, "train", None)
    return f"{task.name}: {'generated' if train is None else len(train)} train / {len(task.test)} test rows"
