"""The run directory a trainer works in: its logs, its checkpoints, resuming, and the health monitor's
events and actions. Every trainer (SFT, RL, ...) drives one :class:`Run`.

Exact resume: a checkpoint holds everything that decides what the next step does (weights, optimizer
moments, every RNG, the data order, the monitor's history, the KL controller) and the byte length of
each log at the time it was written. Resuming cuts the logs back to those lengths and replays the
steps after the checkpoint, so with the same seed and thread count the resumed run writes the same
rows and ends with the same weights as a run that was never interrupted (timings aside).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from posttrain.checkpoint import (
    CheckpointDir,
    random_state,
    restore_module,
    restore_policy,
    restore_rng,
    rng_state,
    set_random_state,
)
from posttrain.config import ConfigError, save_config, to_dict
from posttrain.distributed import World
from posttrain.metrics import JsonlWriter, eval_due, open_sinks
from posttrain.monitor import Event, Monitor
from posttrain.trainers.model_engine import ModelEngine, out_of_memory
from posttrain.trainers.preemption import Preemption, RunInterrupted

LOGS = ("metrics", "samples", "events")
# Config keys a resumed run may not change: they decide what the checkpoint's tensors are.
FIXED_KEYS = ("model", "lora", "gpt", "task.name", "advantage", "critic")
IGNORED_KEYS = ("resume", "threads", "distributed")  # how a run is executed, not what it computes
# What a resumed run may change without resume=force: how long it runs, where and how it executes, what it logs,
# evaluates and saves (a run moves between machines and backends). Anything else changes what it trains.
MAY_CHANGE = ("steps", "epochs", "run_dir", "device", "precision", "threads", "distributed", "rollout", "log",
              "log_samples_every", "mismatch_every", "eval", "eval_before", "save_every", "keep_last",
              "reward_workers")


class RunStopped(RuntimeError):
    """The health monitor stopped the run (action ``stop``, or more rollbacks than allowed)."""


@dataclass
class TrainerState:
    """A trainer's JSON-able values that the next step depends on (checkpointed as ``extra``); each trainer
    adds its own fields in a subclass."""

    last_eval: dict = field(default_factory=dict)  # the latest held-out evaluation's metrics

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """Fields the saved state has (a checkpoint from before a field existed keeps its default)."""
        for f in dataclasses.fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])


@dataclass
class Parts:
    """What a checkpoint must hold for an exact resume, besides the run's own bookkeeping."""

    model: torch.nn.Module  # the policy (saved with save_pretrained, so the checkpoint loads as a model)
    tokenizer: object
    state: TrainerState  # the trainer's own values
    engines: dict[str, ModelEngine] = field(default_factory=dict)  # trained modules' optimizers and versions
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)  # other trained modules (the critic)
    rngs: dict[str, random.Random] = field(default_factory=dict)  # the trainer's own RNGs (data order)
    queue: object | None = None  # RL's rollouts made ahead: drain(), save(dir), load(dir) (trainers/rl_rollouts.py)

    @property
    def trained(self) -> dict[str, ModelEngine]:
        """The engines with an optimizer, by name."""
        return {name: e for name, e in self.engines.items() if e.optimizer is not None}

    @property
    def sharded(self) -> bool:
        return any(e.sharded for e in self.engines.values())

    def on_disk(self, gather: bool = True) -> Parts:
        """These parts as a checkpoint holds them: the modules themselves, or under FSDP2 rank 0's full copies
        (``gather``: filled with the current weights now; every rank calls)."""
        for engine in self.engines.values():
            if gather:
                engine.consolidate()

        def disk(module: torch.nn.Module) -> torch.nn.Module:
            return next((e.on_disk(module) for e in self.engines.values() if e.owns(module)), module)

        return dataclasses.replace(self, model=disk(self.model),
                                   modules={name: disk(m) for name, m in self.modules.items()})


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out |= flatten(value, f"{name}.") if isinstance(value, dict) else {name: value}
    return out


def config_changes(old: dict, new: dict, defaults: dict | None = None) -> dict[str, tuple]:
    """Dotted keys whose values differ between two config dicts → (old, new). With ``defaults`` (the config
    class's defaults), a key the old config lacks (it was written before the key existed) is a change only
    when the new value is not the default."""
    a, b, d = flatten(old), flatten(new), flatten(defaults or {})
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and not k.startswith(IGNORED_KEYS)
            and not (k not in a and k in d and b.get(k) == d[k])}


def _listed(changes: dict[str, tuple]) -> str:
    return ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in changes.items())


def defaults_of(config) -> dict:
    """The plain data of a config class's defaults (for :func:`config_changes`)."""
    return to_dict(type(config)())


class _Discard:
    """The logs of a rank other than 0: rank 0 writes the run's files, the other ranks nothing."""

    position = 0

    def write(self, record: dict) -> None:
        """Nothing."""

    def close(self) -> None:
        """Nothing."""


class Run:
    """One trainer's run directory. ``config`` has run_dir, resume, save_every, keep_last, log, monitor.
    Under data parallelism every rank has one and reads the checkpoint it resumes from, but only rank 0
    (``world.main``) writes: logs, config, checkpoints (the others wait for each save to finish)."""

    def __init__(self, config, stage: str, world: World | None = None):
        self.config, self.stage, self.world = config, stage, world or World()
        self.dir = Path(config.run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.checkpoints = CheckpointDir(self.dir / "checkpoints", config.keep_last)
        self.monitor = Monitor(config.monitor)
        # decided by rank 0 alone: another rank could otherwise already see a checkpoint rank 0 has just written
        self.resume_from = self.world.broadcast(self._resume_point() if self.world.main else None)
        self.state = json.loads((self.resume_from / "trainer_state.json").read_text()) if self.resume_from else {}
        self.changes = self._config_changes()  # (before any model loads: a refused resume costs nothing)
        self._start_checkpoint = self.world.broadcast(self._needs_start_checkpoint() if self.world.main else None)
        self.logs: dict[str, JsonlWriter] = {}
        self.sinks: list = []
        self.preemption = Preemption()  # entered around the training loop

    @property
    def start_step(self) -> int:
        return self.state.get("step", 0)

    def _resume_point(self) -> Path | None:
        resume = self.config.resume
        if resume == "never":
            if self.checkpoints.steps():
                raise ConfigError(f"resume=never, but {self.checkpoints.root} holds checkpoints of an earlier run: "
                                  "continue it with resume=auto, or choose another run_dir")
            return None
        if resume in ("auto", "force"):  # latest; without it (a kill before the first pointer, a copy that dropped
            steps = self.checkpoints.steps()  # symlinks) the newest complete step: never a fresh start over logs
            return self.checkpoints.pointer("latest") or (self.checkpoints.path(steps[-1]) if steps else None)
        path = Path(resume)
        if not (path / "trainer_state.json").exists():
            raise ConfigError(f"config key 'resume': {path} is not a checkpoint (no trainer_state.json); "
                              "use auto, force, never or a checkpoints/step_XXXXXX directory")
        newest = self.checkpoints.steps()
        if path.resolve().parent == self.checkpoints.root.resolve() and newest and path.resolve() != \
                self.checkpoints.path(newest[-1]).resolve():
            raise ConfigError(f"resume={path} is an earlier checkpoint of this run, which goes on to step "
                              f"{newest[-1]}: resuming here would discard the later checkpoints and log rows. To "
                              f"branch from it, start a new run_dir with resume={path}; to continue this run, "
                              "resume=auto")
        return path

    def _config_changes(self) -> dict[str, tuple]:
        """The config changes since the checkpoint resumed from. A changed model/task/algorithm structure is an
        error; so is a change of anything that shapes training (the learning rate, the rewards, the data...)
        unless ``resume=force``, since re-running a command with new values would otherwise quietly extend the
        old run; the keys of ``MAY_CHANGE`` (length, execution, logging, evaluation, saving) may change."""
        saved = self.resume_from / "config.yaml" if self.resume_from else None
        if saved is None or not saved.exists():
            return {}
        changes = config_changes(yaml.safe_load(saved.read_text()), to_dict(self.config), defaults_of(self.config))
        fixed = {k: v for k, v in changes.items() if k.startswith(FIXED_KEYS)}
        if fixed:
            raise ConfigError(f"cannot resume {self.resume_from} with a different " + _listed(fixed)
                              + ": use another run_dir for that run")
        trained = {k: v for k, v in changes.items() if not k.startswith(MAY_CHANGE)}
        if trained and self.config.resume != "force":
            raise ConfigError(f"{self.dir} holds a run that trained with other values: {_listed(trained)}. Start "
                              "a new run with another run_dir, or continue this one with the new values: resume=force")
        return changes

    def check_config(self, notice: Callable[[str], None]) -> None:
        """Say what changed since the checkpoint resumed from (what :meth:`_config_changes` let through)."""
        if self.changes:
            notice("[yellow]resuming with a changed config: " + ", ".join(
                f"{k} {a!r} -> {b!r}" for k, (a, b) in self.changes.items()))

    def open(self, notice: Callable[[str], None]) -> None:
        """Save config.yaml, open the logs (cut back to the checkpoint's lengths) and the optional sinks."""
        if not self.world.main:
            self.logs = {name: _Discard() for name in LOGS}
            return
        save_config(self.config, self.dir / "config.yaml")
        inside = self.resume_from is not None and self.resume_from.resolve().parent == self.checkpoints.root.resolve()
        lengths = self.state.get("logs", {}) if inside else {}
        if inside:  # checkpoints after the one resumed from belong to a branch given up (or a save cut short)
            self.checkpoints.discard_after(self.start_step)
        for name in LOGS:
            self.logs[name] = JsonlWriter(self.dir / f"{name}.jsonl", truncate_at=lengths.get(name, 0))
        log = self.config.log
        self.sinks = open_sinks(log.report_to, self.dir, log.run_name or self.dir.name, log.project,
                                to_dict(self.config), self.start_step, notice)

    def write(self, metrics: dict) -> None:
        """One metrics row: metrics.jsonl and every optional sink."""
        self.logs["metrics"].write(metrics)
        for sink in list(self.sinks):
            sink.write(metrics["step"], metrics)

    def sample(self, row: dict) -> None:
        self.logs["samples"].write(row)

    def close(self) -> None:
        for writer in self.logs.values():
            writer.close()
        for sink in self.sinks:
            sink.close()

    def resume(self, parts: Parts, notice: Callable[[str], None]) -> int:
        """The step to start at: 0, or that of the checkpoint resumed from, loaded into ``parts`` (and said)."""
        if self.resume_from is None:
            return 0
        step = self.restore(parts)
        notice(f"resumed from step {step} ({self.resume_from})")
        return step

    def restore(self, parts: Parts, path: Path | None = None) -> int:
        """Load checkpoint ``path`` (default: the one resumed from) into ``parts``; returns its step."""
        path = path or self.resume_from
        state = json.loads((path / "trainer_state.json").read_text())
        disk = parts.on_disk(gather=False)  # FSDP2: rank 0 reads into its full copies, every rank takes its shards
        if self.world.main or not parts.sharded:
            restore_policy(disk.model, path)
            for name, module in disk.modules.items():
                restore_module(module, path, name)
        for engine in parts.engines.values():
            engine.scatter()
        for name, engine in parts.trained.items():
            engine.restore_optimizer(path, name)
        for name, engine in parts.engines.items():
            engine.load_state_dict(state.get("engines", {}).get(name, {"version": 0}))
        for name, rng in parts.rngs.items():
            set_random_state(rng, state["rngs"][name])
        self.monitor.load_state_dict(state["monitor"])
        parts.state.load_state_dict(state["extra"])
        if parts.queue is not None:
            parts.queue.load(path)
        restore_rng(state["rng"], load_file(path / "rng.safetensors"))  # last: loading may draw random numbers
        return state["step"]

    def save(self, step: int, parts: Parts, final: bool = False) -> Path | None:
        """A resumable checkpoint of ``step``; ``final`` also points ``checkpoints/final`` at it. Written by
        rank 0 (every rank holds the same weights and state; FSDP2: every rank helps gather them to rank 0
        first); every rank returns once it is on disk."""
        if parts.queue is not None:
            parts.queue.drain()  # the generation in flight finishes: its rollout goes into the checkpoint
        disk = parts.on_disk()
        optimizers = {name: engine.optimizer_state() for name, engine in parts.trained.items()}
        if not self.world.main:
            self.world.barrier()
            return None
        path = self._save(step, disk, optimizers, final)
        self.world.barrier()
        return path

    def _save(self, step: int, parts: Parts, optimizers: dict[str, dict], final: bool) -> Path:
        rng_json, rng_tensors = rng_state()
        state = {"step": step, "stage": self.stage, "rng": rng_json,
                 "rngs": {name: random_state(rng) for name, rng in parts.rngs.items()},
                 "monitor": self.monitor.state_dict(), "extra": parts.state.state_dict(),
                 "engines": {name: engine.state_dict() for name, engine in parts.engines.items()},
                 "logs": {name: writer.position for name, writer in self.logs.items()}}
        return self.checkpoints.save(step, final=final, model=parts.model, tokenizer=parts.tokenizer, state=state,
                                     modules=parts.modules, optimizers=optimizers, config=self.config,
                                     tensors={"rng": rng_tensors},
                                     writers=[parts.queue.save] if parts.queue is not None else [])

    def save_due(self, step: int) -> bool:
        every = self.config.save_every
        return every > 0 and step % every == 0 and step < self.config.steps

    @property
    def needs_start_checkpoint(self) -> bool:
        """Rollback needs a good checkpoint to go back to: save one before the first step (unless this run
        directory already had one from before it when the run started)."""
        return self._start_checkpoint

    def _needs_start_checkpoint(self) -> bool:
        rollback = any(getattr(self.config.monitor, f"{check}_action") == "rollback"
                       for check in ("kl", "grad", "nonfinite", "entropy", "length", "zero_std"))
        return rollback and self.checkpoints.before(self.start_step + 1) is None

    def record(self, events: list[Event], notice: Callable[[str], None]) -> str | None:
        """Log health events (events.jsonl and the console); returns the strongest action, if any."""
        for event in events:
            self.logs["events"].write(event.to_dict())
            colour = "yellow" if event.action == "warn" else "red"
            notice(f"[{colour}]health, step {event.step}: {event.check}: {event.message} -> {event.action}")
        return Monitor.worst(events)

    def last_good(self, step: int) -> Path | None:
        """The checkpoint to go back to when step ``step`` fails a check: the newest one from before step
        ``step`` − 1 (the rollout of step s shows the update of step s − 1, which the checkpoint of step
        s − 1 already holds; replaying from it would fail the same way)."""
        return self.checkpoints.before(step - 1)

    def rollback(self, step: int, parts: Parts, notice: Callable[[str], None]) -> int:
        """Go back to the last good checkpoint with the learning rate lowered (later checkpoints are
        deleted); returns the step restored. Raises :class:`RunStopped` past ``max_rollbacks``."""
        monitor = self.monitor
        if not monitor.on_rollback():
            self.stop(step, f"more than {self.config.monitor.max_rollbacks} rollbacks", notice)
        lr_scale, rollbacks = monitor.lr_scale, monitor.rollbacks
        path = self.last_good(step)
        if path is None:
            self.stop(step, f"no checkpoint from before step {step - 1} to roll back to (keep_last "
                             f"{self.config.keep_last}, save_every {self.config.save_every})", notice)
        restored = self.restore(parts, path)
        if self.world.main:
            self.checkpoints.discard_after(restored)
        monitor.lr_scale, monitor.rollbacks = lr_scale, rollbacks  # the lowered lr survives the restore
        self.logs["events"].write({"step": step, "check": "rollback", "action": "rollback", "values": {
            "restored_step": restored, "lr_scale": lr_scale},
            "message": f"restored {path.name} (step {restored}); learning rate x{lr_scale:.3g}"})
        notice(f"[red]rollback: step {step} -> {path.name}, learning rate x{lr_scale:.3g}")
        return restored

    def stop_if(self, action: str | None, step: int, notice: Callable[[str], None]) -> None:
        if action == "stop":
            self.stop(step, "a health check's action is stop", notice)

    def stop(self, step: int, why: str, notice: Callable[[str], None], check: str = "stop",
             error: type[Exception] = RunStopped) -> None:
        """End the run at ``step``: a ``check`` event with action stop in events.jsonl, the logs closed, and
        ``error`` raised with one line (``why``, where the events are, the last good checkpoint)."""
        message = (f"run stopped at step {step}: {why} (see {self.dir / 'events.jsonl'}); the last good "
                   f"checkpoint is {self.last_good(step) or 'none'}")
        self.logs["events"].write({"step": step, "check": check, "action": "stop", "values": {}, "message": message})
        notice(f"[red]{message}")
        self.close()
        raise error(message)


def health_gate(monitor: Monitor, step: int, events: list[Event], spikes: bool = True):
    """``gate(loss, grad_norm, entropy=None) -> bool``, called before an optimizer step: records the
    monitor's update checks in ``events`` and says whether the update may be applied. A non-finite loss
    or gradient is never applied, even with the monitor off. ``spikes=False`` (the PPO critic, whose
    gradients are not the policy's) checks finiteness only."""
    def gate(loss: float, grad_norm: float, entropy: float | None = None) -> bool:
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if spikes:
            found = monitor.check_update(step, loss, grad_norm, entropy)
        elif finite or not monitor.config.enabled:
            found = []
        else:
            found = [Event(step, "nonfinite", monitor.config.nonfinite_action,
                           f"critic loss {loss:.3g}, grad norm {grad_norm:.3g}: not finite",
                           {"loss": loss, "grad_norm": grad_norm})]
        events.extend(found)
        return finite and monitor.update_allowed(found)

    return gate


def end_step(run: Run, parts: Parts, bar, step: int, metrics: dict, events: list[Event],
             evaluate: Callable[[], dict], eval_every: int) -> int:
    """The end of a training step: act on its health events (a rollback returns the restored checkpoint's
    step), evaluate when due (``evaluate()`` → metrics, kept in ``parts.state.last_eval``), log, and
    checkpoint (the last step's checkpoint is the final one). Returns the next step index."""
    action = run.record(events, bar.print)
    metrics["health/events"] = len(events)
    if action in ("rollback", "stop"):
        run.write(metrics)  # the step that went wrong stays in the log
        run.stop_if(action, step + 1, bar.print)
        return run.rollback(step + 1, parts, bar.print)
    step += 1
    if eval_due(step, run.config.steps, eval_every):
        with out_of_memory(step, "evaluation"):
            parts.state.last_eval = evaluate()
        metrics.update(parts.state.last_eval)
        bar.print_metrics(f"step {step}", parts.state.last_eval)
    run.write(metrics)
    bar.update(metrics)
    signalled = run.preemption.due(run.world)  # SIGTERM / Ctrl-C: checkpoint this step, then stop
    if run.save_due(step) or step == run.config.steps or signalled:
        run.save(step, parts, final=step == run.config.steps)
    if signalled and step < run.config.steps:
        raise RunInterrupted(f"{signalled}: stopped after step {step} of {run.config.steps}, with a checkpoint "
                             f"({run.checkpoints.path(step)}); the same command resumes the run")
    return step


def nothing_to_do(run: Run, notice: Callable[[str], None]) -> bool:
    """A resumed run whose checkpoint is already at the last step says so (it never trains zero steps
    silently) and the trainer returns the metrics the checkpoint kept."""
    if run.resume_from is None or run.start_step < run.config.steps:
        return False
    notice(f"{run.dir}: already complete at step {run.start_step} ({run.resume_from}); nothing left to train. "
           f"Raise steps (or epochs) to train on, or use another run_dir.")
    if run.world.main and run.resume_from.resolve().parent == run.checkpoints.root.resolve():
        run.checkpoints.prune()  # a run killed between its final save and the pruning after it
    return True

