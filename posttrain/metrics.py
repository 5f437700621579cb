"""Where a run's numbers go: ``metrics.jsonl`` (always), optional TensorBoard and W&B sinks, and a progress bar.

Metric names follow TRL where TRL has one (``reward``, ``kl``, ``completions/mean_length`` ...)
and verl for timings (``timing_s/gen``); DESIGN.md lists them.

API, as a trainer uses it (``trainers/run.py``'s ``Run`` does this)::

    log = JsonlWriter(run_dir / "metrics.jsonl", truncate_at=state["logs"]["metrics"])  # None: append
    sinks = open_sinks(("tensorboard", "wandb"), run_dir, run_name, project, config_dict, start_step, notice)
    for metrics in rows:  # each row has "step"
        log.write(metrics)
        for sink in sinks:
            sink.write(metrics["step"], metrics)
    state["logs"] = {"metrics": log.position}  # saved with a checkpoint: what resuming cuts the file back to
    log.close()
    for sink in sinks:
        sink.close()

- :class:`JsonlWriter` appends one JSON object per line, flushed, so a killed run keeps every finished
  line; ``truncate_at`` cuts the file back to a checkpoint's ``position`` (exact resume: rows written
  after the checkpoint are dropped, and the resumed run writes them again). :func:`read_jsonl` reads it
  back, skipping a cut-off last line (a run killed mid-write, or still running).
- :func:`open_sinks` opens the sinks named in ``report_to`` (:data:`SINKS`). A sink whose package is
  missing, that is not configured, or that fails to start costs one ``notice`` line and is left out;
  a sink that raises in ``write`` costs one notice and is dropped (it does nothing from then on).
  An optional sink never stops the run. Sinks log the numeric entries of a row only (strings and None
  are skipped; NaN/inf are kept) against ``step``, the x axis.
- ``start_step`` is the number of steps already done (the checkpoint's step; 0 for a fresh run).
  TensorBoard then hides the earlier run's events at steps > ``start_step`` (they are logged again);
  W&B continues the same run (its id is kept in ``run_dir/wandb_id.txt``); W&B ignores rows at steps
  below the last one it has, so there the rows logged between the checkpoint and the crash stay.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

SINKS = ("tensorboard", "wandb")
INSTALL_HINT = "pip install 'posttrain[logging]'"
WANDB_ID_FILE = "wandb_id.txt"


def _plain(value):
    """A 0-d tensor/array as its Python number; anything else unchanged."""
    return value.item() if hasattr(value, "item") else value


def _jsonable(value):
    value = _plain(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


class JsonlWriter:
    """Appends one JSON object per line and flushes, so a killed run keeps every finished line.

    ``truncate_at``: first cut the file to this many bytes (a checkpoint's :attr:`position`); a file
    shorter than that is not the one the checkpoint saw → ValueError. None: append to what is there."""

    def __init__(self, path: str | Path, truncate_at: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        size = self.path.stat().st_size if self.path.exists() else 0
        if truncate_at is not None and size < truncate_at:
            raise ValueError(f"cannot resume {self.path}: it has {size} bytes, fewer than the {truncate_at} "
                             "bytes the checkpoint recorded (the file was replaced or cut since)")
        self._file = self.path.open("a", encoding="utf-8")  # appends go to the end, also after a truncate
        if truncate_at is not None:
            self._file.truncate(truncate_at)

    @property
    def position(self) -> int:
        """The file's length in bytes after the last write (what a checkpoint stores)."""
        return os.fstat(self._file.fileno()).st_size

    def write(self, record: dict) -> None:
        self._file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSONL file. A last line with no newline after it that does not parse was cut off
    mid-write (the run was killed, or is still writing) and is skipped; any other line that does not
    parse → ValueError naming the file and the 1-based line number."""
    path = Path(path)
    lines = path.read_bytes().split(b"\n")  # the last item is b"" when the file ends with a newline
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError in a cut multi-byte character
            if number == len(lines):
                break
            raise ValueError(f"{path}: line {number} is not valid JSON ({e})") from None
    return rows


class StepProgress:
    """A progress bar over training steps that shows a few live metrics. ``initial``: steps already done
    (a resumed run); the ETA comes from the speed of this run's steps only. Where no live bar shows (no terminal:
    a cluster job, CI, nohup; or ``enabled`` False), a plain text line with the same metrics, the elapsed time and
    the ETA is printed every ``every`` steps and at the last (0: never)."""

    def __init__(self, description: str, total: int, keys: tuple[str, ...], enabled: bool = True, initial: int = 0,
                 quiet: bool = False, every: int = 0):
        self.keys, self.quiet = keys, quiet  # quiet: print nothing at all (a rank other than 0)
        self.description, self.total, self.done, self.initial, self.every = description, total, initial, initial, every
        self.started = time.monotonic()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            disable=not enabled or quiet,
        )
        self._task = self._progress.add_task(description, total=total, completed=initial, info="")
        self.live = enabled and not quiet and self._progress.console.is_terminal

    def __enter__(self) -> StepProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def update(self, metrics: dict) -> None:
        info = "  ".join(f"{k}={metrics[k]:.3g}" for k in self.keys if k in metrics)
        self._progress.update(self._task, advance=1, info=info)
        self.done += 1
        if self.live or self.quiet or not self.every or (self.done % self.every and self.done != self.total):
            return
        elapsed = time.monotonic() - self.started
        left = elapsed / (self.done - self.initial) * (self.total - self.done)
        print(f"{self.description} step {self.done}/{self.total}  {info}  elapsed {_clock(elapsed)}  "
              f"eta {_clock(left)}", flush=True)

    def print(self, text: str) -> None:
        if not self.quiet:
            self._progress.console.print(text)

    def print_metrics(self, label: str, metrics: dict) -> None:
        """One line of the metrics (a failure count shows only when it is not 0; the logs keep every value)."""
        shown = {k: v for k, v in metrics.items() if not (k.endswith("failures") and v == 0)}
        self.print(f"{label}: " + "  ".join(f"{k}={v:.3f}" for k, v in shown.items()))


def _clock(seconds: float) -> str:
    """h:mm:ss."""
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def eval_due(step: int, total: int, every: int) -> bool:
    """Whether to evaluate after 1-based ``step``: every ``every`` steps (0: never) and after the last."""
    return step == total or (every > 0 and step % every == 0)


# ---------------------------------------------------------------------------------------------- sinks


class Sink(Protocol):
    """An optional metric sink. ``write`` logs the numeric scalars of ``metrics`` at ``step``."""

    name: str

    def write(self, step: int, metrics: dict) -> None: ...

    def close(self) -> None: ...


def numeric_scalars(metrics: Mapping) -> dict[str, float]:
    """The entries that are numbers (bools as 0/1, 0-d tensors/arrays as their value; NaN/inf kept), as
    floats; strings, None, containers and ``step`` (the x axis) are left out."""
    out = {}
    for name, value in metrics.items():
        with contextlib.suppress(ValueError, RuntimeError):  # .item() of a tensor with more than one element
            value = _plain(value)
        if name != "step" and isinstance(value, int | float):
            out[name] = float(value)
    return out


class TensorBoardSink:
    """Scalars as TensorBoard event files in ``log_dir``, one tag per metric name."""

    name = "tensorboard"

    def __init__(self, log_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        # purge_step: TensorBoard hides the events of earlier runs at steps >= it (this run logs them again)
        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1 if start_step > 0 else None)

    def write(self, step: int, metrics: dict) -> None:
        for name, value in numeric_scalars(metrics).items():
            self._writer.add_scalar(name, value, step)

    def close(self) -> None:
        self._writer.close()  # flushes


class WandbSink:
    """One W&B run per run directory: a resumed run continues it (``resume="allow"``, same id)."""

    name = "wandb"

    def __init__(self, wandb, run_dir: Path, run_name: str, project: str, config: dict):
        self._run = wandb.init(project=project, name=run_name, config=config, id=wandb_run_id(run_dir),
                               resume="allow", dir=str(run_dir))

    def write(self, step: int, metrics: dict) -> None:
        self._run.log(numeric_scalars(metrics), step=step)

    def close(self) -> None:
        self._run.finish()


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of ``run_dir``: read from ``wandb_id.txt``, or made (12 hex digits) and saved there."""
    path = run_dir / WANDB_ID_FILE
    if path.exists():
        return path.read_text().strip()
    run_id = secrets.token_hex(6)
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def wandb_configured(wandb, env: Mapping[str, str]) -> bool:
    """A key in the environment, an offline/disabled mode, or a stored login (``wandb login``)."""
    if env.get("WANDB_API_KEY") or env.get("WANDB_MODE") in ("offline", "disabled"):
        return True
    try:  # reading the stored key touches settings files; wandb versions differ in where it lives
        return bool(getattr(getattr(wandb, "api", None), "api_key", None))
    except Exception:
        return False


class SinkUnavailable(Exception):
    """A sink cannot be used (package missing, not configured); the message says why and what to do."""


def _open_tensorboard(log_dir: Path, start_step: int) -> Sink:
    try:
        return TensorBoardSink(log_dir, start_step)
    except ImportError:
        raise SinkUnavailable(f"not installed ({INSTALL_HINT})") from None


def _open_wandb(run_dir: Path, run_name: str, project: str, config: dict, env: Mapping[str, str]) -> Sink:
    try:
        import wandb
    except ImportError:
        raise SinkUnavailable(f"not installed ({INSTALL_HINT})") from None
    if not wandb_configured(wandb, env):
        raise SinkUnavailable("not logged in (run `wandb login`, or set WANDB_API_KEY, or WANDB_MODE=offline)")
    return WandbSink(wandb, run_dir, run_name, project, config)


def _describe(error: Exception) -> str:
    """'Type: first line of the message' (a notice is one line)."""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0]}" if message else type(error).__name__


def _left_out(name: str, why: str, what: str = "left out") -> str:
    return f"{name} {why}: {what}, metrics still go to metrics.jsonl"


class _Guarded:
    """A sink whose errors never reach the run: the first exception → one notice, and the sink is dropped
    (closed quietly; later writes do nothing)."""

    def __init__(self, sink: Sink, notice: Callable[[str], None]):
        self.name, self._sink, self._notice = sink.name, sink, notice

    def write(self, step: int, metrics: dict) -> None:
        if self._sink is None:
            return
        try:
            self._sink.write(step, metrics)
        except Exception as e:
            sink, self._sink = self._sink, None
            self._notice(_left_out(self.name, f"failed at step {step} ({_describe(e)})", "dropped"))
            with contextlib.suppress(Exception):
                sink.close()

    def close(self) -> None:
        sink, self._sink = self._sink, None
        if sink is None:
            return
        try:
            sink.close()
        except Exception as e:
            self._notice(f"{self.name} failed to close ({_describe(e)}); its last metrics may be missing")


def open_sinks(report_to: Sequence[str], run_dir: Path, run_name: str, project: str, config: dict,
               start_step: int, notice: Callable[[str], None], env: Mapping[str, str] | None = None) -> list[Sink]:
    """The optional sinks named in ``report_to`` (each of :data:`SINKS`), guarded (see the module doc).

    An unknown name → ValueError with the closest valid one, before any sink opens. ``start_step``: steps
    already done (see the module doc). ``env``: where W&B's settings are looked up (default os.environ)."""
    names = list(dict.fromkeys([report_to] if isinstance(report_to, str) else report_to))
    for name in names:
        if name not in SINKS:
            from posttrain.config import suggest  # here: config may come to import this module

            raise ValueError(f"unknown report_to name '{name}'{suggest(name, list(SINKS))}")
    openers: dict[str, Callable[[], Sink]] = {
        "tensorboard": lambda: _open_tensorboard(Path(run_dir) / "tensorboard", start_step),
        "wandb": lambda: _open_wandb(Path(run_dir), run_name, project, config, os.environ if env is None else env),
    }
    sinks: list[Sink] = []
    for name in names:
        try:
            sinks.append(_Guarded(openers[name](), notice))
        except SinkUnavailable as e:
            notice(_left_out(name, str(e)))
        except Exception as e:
            notice(_left_out(name, f"failed to start ({_describe(e)})"))
    return sinks
