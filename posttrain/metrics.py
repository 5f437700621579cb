"""Metric sinks: ``metrics.jsonl`` (one JSON object per step), ``samples.jsonl``, and a progress bar.

Metric names follow TRL where TRL has one (``reward``, ``kl``, ``completions/mean_length`` ...)
and verl for timings (``timing_s/gen``); DESIGN.md lists them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _jsonable(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


class JsonlWriter:
    """Appends one JSON object per line and flushes, so a killed run keeps every finished line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class StepProgress:
    """A progress bar over training steps that shows a few live metrics."""

    def __init__(self, description: str, total: int, keys: tuple[str, ...], enabled: bool = True):
        self.keys = keys
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            disable=not enabled,
        )
        self._task = self._progress.add_task(description, total=total, info="")

    def __enter__(self) -> StepProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def update(self, metrics: dict) -> None:
        info = "  ".join(f"{k}={metrics[k]:.3g}" for k in self.keys if k in metrics)
        self._progress.update(self._task, advance=1, info=info)

    def print(self, text: str) -> None:
        self._progress.console.print(text)

    def print_metrics(self, label: str, metrics: dict) -> None:
        self.print(f"{label}: " + "  ".join(f"{k}={v:.3f}" for k, v in metrics.items()))


def eval_due(step: int, total: int, every: int) -> bool:
    """Whether to evaluate after 1-based ``step``: every ``every`` steps (0: never) and after the last."""
    return step == total or (every > 0 and step % every == 0)
