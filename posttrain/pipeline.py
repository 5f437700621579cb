"""``posttrain pipeline``: stages (sft, rm, dpo, rl, eval) run in order into one directory, each able to
start from an earlier stage's output, resumable stage by stage, ending with one comparison table.

A pipeline YAML (PipelineConfig; README "Pipelines" has an example) names its stages in run order, each
``{kind, config: STAGE.yaml, from: NAME, ...inline trainer keys}`` (``kind`` defaults to the name).
Inline keys merge leaf by leaf into the stage YAML's sections (``optim: {lr: 1}``); other values
(``rewards: {...}``) replace the YAML's whole. ``from: NAME`` starts a stage from ``run_dir/NAME/checkpoints/
final``; without it or an inline ``model``, from the previous policy stage (sft, dpo, rl), if any. An rl
stage's ``reward_model: NAME`` scores with that rm stage's output. An eval stage evaluates ``from: NAME``'s
output, ``model: PATH``, or else the start model.

``run_dir/pipeline.json`` records each finished stage's config (less UNTRAINED_KEYS) and each evaluation: a
recorded stage is not run again; one whose recorded keys changed is an error, or (``on_change: rerun``) it
and every later stage run again. A stage that trains (again) first deletes the later stages that use its
output (``dependents``). The comparison samples every policy stage's final checkpoint and every eval
stage's model with the same settings (``posttrain.eval_report``): ``comparison.md``, ``comparison.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import re
import shutil
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from posttrain.config import ConfigError, ModelConfig, RLConfig, SFTConfig, TaskConfig
from posttrain.config_checks import check_choice, check_range, suggest
from posttrain.config_files import _build, _set_dotted, expand_dotted, to_dict
from posttrain.distributed import DistributedConfig, World, join, launched_world, rank_device, set_threads
from posttrain.preference_config import DPOConfig, RMConfig
from posttrain.rewards import check_reward_specs
from posttrain.trainers.run import IGNORED_KEYS, config_changes, defaults_of

CONFIGS = {"sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig, "rl": RLConfig}  # kind -> its trainer config
TRAINERS = {"sft": ("posttrain.trainers.sft", "train_sft"), "rm": ("posttrain.trainers.reward_model",
            "train_reward_model"), "dpo": ("posttrain.trainers.dpo", "train_dpo"), "rl": ("posttrain.trainers.rl",
            "train_rl")}  # kind -> (module, function), imported when a stage runs
KINDS = (*CONFIGS, "eval")
POLICY_KINDS = ("sft", "dpo", "rl")  # stages whose output is a policy: evaluated, and what later stages start from
STAGE_KEYS = ("kind", "config", "from")  # a stage's own keys besides its trainer config's
# Trainer keys that cannot change a stage's checkpoint (what it logs, saves and evaluates on the way, how
# it resumes, its CPU threads): left out of its record, so changing them is not a change of the stage.
UNTRAINED_KEYS = (*IGNORED_KEYS, "log", "save_every", "keep_last", "log_samples_every", "eval", "eval_every",
                  "eval_before")
STATE = "pipeline.json"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")  # no '.': stages.NAME.KEY=VALUE must find the name


@dataclass
class PipelineEvalConfig:
    """How every policy is evaluated for the comparison table: the same problems and sampling for all."""

    task: TaskConfig = field(default_factory=TaskConfig)  # the task whose held-out (test) problems are sampled
    problems: int = 256  # the first N held-out problems (at most task.test_size, unless that is 0)
    samples: int = 8  # completions per problem: the K of pass@K and maj@K
    temperature: float = 1.0  # sampling temperature (0: greedy)
    top_k: int | None = 50  # keep the k most likely tokens (None: all)
    max_new_tokens: int = 64  # completion budget in tokens
    batch: int = 32  # problems per engine call
    seed: int = 4321  # sampling seed: every stage sees the same randomness
    device: str = "auto"  # auto | cpu | cuda[:i]

    def __post_init__(self):
        check_range("eval.problems", self.problems, 1)
        if self.task.test_size:
            check_range("eval.problems", self.problems, 1, self.task.test_size, note=" (eval.task.test_size)")
        check_range("eval.samples", self.samples, 1)
        check_range("eval.temperature", self.temperature, 0, note=" (0: greedy)")
        if self.top_k is not None:
            check_range("eval.top_k", self.top_k, 1, note=" or null (no top-k)")
        check_range("eval.max_new_tokens", self.max_new_tokens, 1)
        check_range("eval.batch", self.batch, 1)


@dataclass
class StageConfig:
    """One stage, resolved: its kind, the stages it starts from, and what it runs with."""

    name: str  # its key under `stages`: its sub-directory of run_dir and its row of the table
    kind: str  # sft | rm | dpo | rl | eval (YAML default: the name, when the name is a kind)
    start: str | None = None  # the stage it starts from or evaluates (`from`, or the previous policy stage)
    reward_model: str | None = None  # rl: the rm stage whose checkpoints/final scores completions
    resolved: Any = None  # the trainer config (SFTConfig | RMConfig | DPOConfig | RLConfig); eval: the ModelConfig


@dataclass
class PipelineConfig:
    """Stages run in order into ``run_dir/<name>/``, then one comparison table (module docstring)."""

    run_dir: str = "runs/pipeline"  # stage NAME writes into run_dir/NAME/; pipeline.json, comparison.* go here
    on_change: str = "error"  # a finished stage whose config changed: error (name the changes) | rerun (delete
    # its output and every later stage's, and run them again)
    threads: int = 0  # torch CPU threads while the comparison samples (0: as they are), restored after
    eval: PipelineEvalConfig = field(default_factory=PipelineEvalConfig)  # the comparison's shared settings
    stages: list[StageConfig] = field(default_factory=list)  # YAML: a mapping name -> stage, in run order

    def __post_init__(self):
        check_choice("on_change", self.on_change, ["error", "rerun"])
        check_range("threads", self.threads, 0, note=" (0: leave torch's as it is)")


# --- loading: the YAML, overrides, and every stage resolved before anything runs --------------


def _read_yaml(path: Path) -> dict:
    try:
        data = expand_dotted(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of config keys, got {type(data).__name__}")
    return data


def load_pipeline(path: str | Path, overrides: list[str] = (), notice: Callable[[str], None] = print
                  ) -> PipelineConfig:
    """The pipeline at ``path`` with ``key=value`` overrides: top-level keys (``run_dir=runs/b``,
    ``eval.samples=4``) or a stage's keys as ``stages.NAME.KEY=VALUE`` (``stages.rl.steps=5``,
    ``stages.rl.from=sft``). Every stage is resolved here, so a bad key anywhere fails before any training;
    ``notice`` gets one line per stage whose start replaces its stage YAML's model."""
    data = _read_yaml(Path(path))
    stages = data.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise ConfigError(f"{path}: 'stages' must be a mapping of stage name -> stage (e.g. sft: {{config: "
                          f"demo_sft.yaml}}), got {stages!r}")
    for name in (n for n in stages if not _NAME.fullmatch(str(n))):
        raise ConfigError(f"stage '{name}': a stage name is letters, digits, '_' and '-' (it names a directory and "
                          "stages.NAME.KEY=VALUE overrides)")
    data["stages"] = {name: {} if entry is None else entry for name, entry in stages.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. stages.rl.steps=5)")
        key, raw = (part.strip() for part in item.split("=", 1))
        parts = key.split(".")
        if parts[0] == "stages" and (len(parts) < 3 or parts[1] not in stages):
            name = parts[1] if len(parts) > 1 else ""
            raise ConfigError(f"override '{item}': " + (f"no stage '{name}'{suggest(name, list(stages))}" if len(
                parts) > 2 else "a stage key is stages.NAME.KEY=VALUE (e.g. stages.rl.steps=5)"))
        _set_dotted(data, key, yaml.safe_load(raw))
    raw_stages = data.pop("stages")
    config = _build(PipelineConfig, data, "")
    root, base = Path(config.run_dir), Path(path).parent
    for name, entry in raw_stages.items():
        try:
            config.stages.append(resolve_stage(str(name), entry, config.stages, list(map(str, raw_stages)),
                                               root, base, notice))
        except ConfigError as err:
            raise ConfigError(f"stage '{name}': {err}") from None
    policies = [s for s in config.stages if s.kind != "eval"]
    for stage in config.stages:
        if stage.kind == "eval" and stage.resolved is None:  # the start model: what the first stage starts from
            start = policies[0].resolved.model if policies else ModelConfig()
            if start.path is None:
                raise ConfigError(f"stage '{stage.name}': no start model to evaluate (the first training stage "
                                  "trains a fresh GPT, or there is none): set from: STAGE or model: PATH")
            stage.resolved = start
    return config


def resolve_stage(name: str, entry: Any, earlier: list[StageConfig], names: list[str], root: Path,
                  base: Path, notice: Callable[[str], None]) -> StageConfig:
    """Stage ``name``'s YAML entry → StageConfig; ``earlier``: the stages before it, ``names``: all stages,
    ``root``: the pipeline's run_dir, ``base``: where a relative ``config`` path is read from, ``notice``:
    told when the previous policy stage replaces the stage YAML's model."""
    if not isinstance(entry, dict):
        raise ConfigError(f"must be a mapping (kind, config, from, and the stage's own keys), got {entry!r}")
    entry = expand_dotted(dict(entry))  # inline keys may be dotted, as in a stage YAML
    kind = entry.pop("kind", name if name in KINDS else None)
    if kind is None:
        raise ConfigError(f"needs a kind: {' | '.join(KINDS)}")
    check_choice("kind", kind, list(KINDS))
    start = entry.pop("from", None)
    rm = entry.pop("reward_model") if kind == "rl" and isinstance(entry.get("reward_model"), str) else None
    valid = ["kind", "from", "model"] if kind == "eval" else [*STAGE_KEYS, *(f.name for f in dataclasses.fields(
        CONFIGS[kind]))]
    for key in entry:
        if key not in valid:
            raise ConfigError(f"unknown config key '{key}'{suggest(str(key), valid)}")
    if start is not None and "model" in entry:
        raise ConfigError("set from (a stage) or model (a path), not both")
    if "run_dir" in entry:
        raise ConfigError(f"run_dir is set by the pipeline ({root / name}): leave it out")
    implicit = start is None and "model" not in entry and kind != "eval"
    if implicit:
        start = next((s.name for s in reversed(earlier) if s.kind in POLICY_KINDS), None)
    source = _earlier(start, POLICY_KINDS, earlier, names, "from") if start is not None else None
    if kind == "eval":
        model = _build(ModelConfig, entry["model"], "model") if "model" in entry else None
        if source is not None:
            model = dataclasses.replace(source.resolved.model, path=str(output(root, source)))
        return StageConfig(name, kind, start, None, model)
    data = _read_yaml(base / entry.pop("config")) if "config" in entry else {}
    for key, value in _leaves(entry, CONFIGS[kind]):  # inline keys over the stage YAML's
        _set_dotted(data, key, value)
    _set_dotted(data, "run_dir", str(root / name))
    if source is not None:
        own = data.get("model", {}).get("path") if isinstance(data.get("model"), dict) else data.get("model")
        if implicit and "model" in data and own != str(output(root, source)):
            notice(f"stage '{name}': starts from stage '{source.name}' ({output(root, source)}), not its config's "
                   f"model {own or 'null (a fresh GPT)'} (write model: PATH, or null for a fresh GPT, in the "
                   "stage to keep one)")
        _set_dotted(data, "model", str(output(root, source)))
    if rm is not None:
        _set_dotted(data, "reward_model", str(output(root, _earlier(rm, ("rm",), earlier, names, "reward_model"))))
    return StageConfig(name, kind, start, rm, _build(CONFIGS[kind], data, ""))


def _leaves(tree: dict, cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) pairs that set ``tree`` over a ``cls`` config one leaf at a time inside dataclass
    sections and whole elsewhere: {optim: {lr: 1}, rewards: {task: 1}} → [('optim.lr', 1), ('rewards',
    {task: 1})], as ``rewards={...}`` on a trainer's command line replaces its YAML's."""
    hints, out = typing.get_type_hints(cls), []
    for key, value in tree.items():
        hint = hints.get(key)
        section = next((t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)), None)
        if section is not None and isinstance(value, dict) and value:
            out += _leaves(value, section, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _earlier(name: Any, kinds: tuple[str, ...], earlier: list[StageConfig], names: list[str],
             role: str) -> StageConfig:
    """The earlier stage ``name`` of one of ``kinds`` (``role``: the key that named it), or a ConfigError."""
    fits = [s.name for s in earlier if s.kind in kinds]
    found = next((s for s in earlier if s.name == name), None)
    if found is not None and found.kind in kinds:
        return found
    if found is not None:
        why = f"is a {found.kind} stage ({role} names a {' | '.join(kinds)} stage)"
    elif name in names:
        why = "is not before this stage (a stage uses only earlier stages)"
    else:
        why = "is not a stage of this pipeline"
    hint = suggest(str(name), fits) if fits else f" (no earlier {' | '.join(kinds)} stage)"
    raise ConfigError(f"{role}: '{name}' {why}{hint}")


def output(root: Path, stage: StageConfig) -> Path:
    """The checkpoint a finished training stage leaves: run_dir/NAME/checkpoints/final."""
    return root / stage.name / "checkpoints" / "final"


# --- state: what has run, under which config --------------------------------------------------------


def trained_settings(settings: dict) -> dict:
    """A trainer config's plain data less UNTRAINED_KEYS: what decides the stage's checkpoint."""
    return {k: v for k, v in settings.items() if k not in UNTRAINED_KEYS}


def dependents(stages: list[StageConfig], name: str) -> list[StageConfig]:
    """The stages after ``name`` that use its output, directly or through one another: started from it
    (``from`` or the previous policy stage), scoring with it (``reward_model``), or evaluating it."""
    used, out = {name}, []
    for stage in stages:  # in run order: a stage uses only earlier ones
        if stage.start in used or stage.reward_model in used:
            used.add(stage.name)
            out.append(stage)
    return out


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def read_state(root: Path) -> dict:
    path = root / STATE
    state = json.loads(path.read_text()) if path.exists() else {}
    return {"stages": state.get("stages", {}), "evals": state.get("evals", {})}


def write_state(root: Path, state: dict, world: World | None = None) -> None:
    """pipeline.json via a temporary file and a rename: a kill leaves the old or the new file, never half.
    Data parallel: written by rank 0 (every rank keeps the same ``state``)."""
    if world is not None and not world.main:
        return
    tmp = root / f".{STATE}.tmp"
    with tmp.open("w") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / STATE)


def check_finished(config: PipelineConfig, state: dict, notice, world: World | None = None) -> None:
    """Compare each recorded stage with its config now. A change is a ConfigError naming the changed keys
    (on_change: error), or (rerun) that stage and every later one lose their records and directories."""
    root = Path(config.run_dir)
    for i, stage in enumerate(config.stages):
        record = state["stages"].get(stage.name)
        changed = record and config_changes(trained_settings(record["config"]), trained_settings(to_dict(
            stage.resolved)), defaults_of(stage.resolved))  # trained_settings of the record too: one written
        # with more keys compares alike
        if not changed:
            continue
        changes = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        if config.on_change == "error":
            raise ConfigError(f"stage '{stage.name}' finished in {root / stage.name} under another config "
                              f"({changes}): restore it, use another run_dir, or set on_change=rerun to run "
                              "it and every later stage again (their directories are deleted)")
        notice(f"[yellow]stage '{stage.name}' changed ({changes}): running it and every later stage again")
        forget(root, state, [later.name for later in config.stages[i:]], world)
        return


def forget(root: Path, state: dict, names: list[str], world: World | None = None) -> None:
    """Stages ``names`` lose their records, cached evaluations and directories (so they run again afresh).
    Data parallel: rank 0 deletes and writes, every rank forgets, and they go on together."""
    world = world or World()
    for name in names:
        state["stages"].pop(name, None)
        state["evals"].pop(name, None)
        if world.main:
            shutil.rmtree(root / name, ignore_errors=True)
    write_state(root, state, world)
    world.barrier()


def pipeline_world(config: PipelineConfig) -> World:
    """The data-parallel job the pipeline runs in (under torchrun; else one process): joined once, with the first
    stage's ``distributed`` settings, on CUDA when any stage or the evaluation uses it; each stage then runs
    in it as its trainer does."""
    if launched_world().size == 1:
        return World()
    from posttrain.trainers.model_engine import resolve_device

    trained = [s.resolved for s in config.stages if s.kind != "eval"]
    devices = [resolve_device(c.device) for c in trained] + [resolve_device(config.eval.device)]
    device = next((d for d in devices if d.type == "cuda"), devices[0])
    return join(trained[0].distributed if trained else DistributedConfig(), device)


# --- running -------------------------------------------------------------------------------------


def run_pipeline(config: PipelineConfig, progress: bool = True, console: Console | None = None) -> list[dict]:
    """Run every stage not yet finished, evaluate every policy not yet evaluated, and write the comparison
    (comparison.md, comparison.json; printed as a table). Returns the table's rows."""
    console = console or Console()
    world = pipeline_world(config)
    root = Path(config.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    state = world.broadcast(read_state(root) if world.main else None)  # rank 0's reading: the same decisions
    check_finished(config, state, console.print, world)
    for stage in config.stages:  # a reward that cannot be loaded stops the pipeline before its first stage trains
        if stage.kind == "rl" and stage.name not in state["stages"]:
            check_reward_specs(stage.resolved.rewards)
    rows = []
    for stage in config.stages:
        finished = world.broadcast(stage.name in state["stages"] and output(root, stage).exists())
        if stage.kind != "eval" and not finished:  # what used its earlier output (if any) runs again after it
            stale = world.broadcast([s.name for s in dependents(config.stages, stage.name) if s.name in state[
                "stages"] | state["evals"] or (root / s.name).exists()])
            if stale:
                console.print(f"[yellow]stage '{stage.name}' trains again: so do {', '.join(stale)} (using it)")
            state["evals"].pop(stage.name, None)
            forget(root, state, stale, world)
            console.print(f"[bold]pipeline[/bold]: stage '{stage.name}' ({stage.kind}) -> {root / stage.name}")
            module, name = TRAINERS[stage.kind]
            start = time.perf_counter()
            settings = trained_settings(to_dict(stage.resolved))  # as configured (epochs > 0 sets steps in training)
            getattr(importlib.import_module(module), name)(stage.resolved, progress=progress)
            state["stages"][stage.name] = {"kind": stage.kind, "config": settings,
                                           "wall_s": world.broadcast(time.perf_counter() - start)}
            write_state(root, state, world)
        elif stage.kind != "eval":
            console.print(f"pipeline: stage '{stage.name}' finished earlier ({root / stage.name}); not run again")
        if stage.kind in (*POLICY_KINDS, "eval"):
            rows.append(evaluate_stage(config, stage, state, progress, console, world))
    if world.main:
        write_comparison(config, rows, console)
    return rows


def evaluate_stage(config: PipelineConfig, stage: StageConfig, state: dict, progress: bool, console,
                   world: World | None = None) -> dict:
    """The stage's comparison row, from pipeline.json when this model was evaluated with these settings
    before; otherwise sampled now (per-problem records: run_dir/NAME/comparison.jsonl; torch threads:
    ``config.threads`` while sampling; data parallel: the problems split over the ranks) and recorded."""
    import torch

    from posttrain.engine import SamplingParams
    from posttrain.eval_report import load_eval, run_eval
    from posttrain.trainers.model_engine import resolve_device

    root, settings = Path(config.run_dir), config.eval
    model = stage.resolved if stage.kind == "eval" else dataclasses.replace(
        stage.resolved.model, path=str(output(root, stage)))
    trained = {"model": to_dict(model)} if stage.kind == "eval" else state["stages"][stage.name]["config"]
    key = digest([to_dict(model), trained, to_dict(settings)])  # trained: the config its checkpoint came from
    cached = state["evals"].get(stage.name)
    if cached is None or cached["hash"] != key:
        console.print(f"[bold]pipeline[/bold]: evaluating '{stage.name}' ({model.path})")
        world = world or World()
        device = str(rank_device(resolve_device(settings.device), world))
        try:
            engine, task, problems = load_eval(model, settings.task, "test", device)
        except (ValueError, OSError, ImportError) as err:
            raise ConfigError(f"stage '{stage.name}': cannot evaluate {model.path}: {err}") from None
        params = SamplingParams(settings.temperature, settings.top_k, None, settings.max_new_tokens)
        threads = torch.get_num_threads()
        set_threads(config.threads)  # under torchrun: shared by the node's processes
        try:
            report = run_eval(engine, task, problems[: settings.problems], settings.samples, params, settings.batch,
                              settings.seed, root / stage.name / "comparison.jsonl", progress, world)
        finally:
            torch.set_num_threads(threads)  # the training stages keep their own
        cached = state["evals"][stage.name] = {"hash": key, "model": model.path, "report": report}
        write_state(root, state, world)
    return comparison_row(stage.name, stage.kind, cached["model"], cached["report"])


# --- the comparison: pure functions of the evaluation reports ------------------------------------


def comparison_row(stage: str, kind: str, model: str, report: dict) -> dict:
    """One row: pass@1, pass@K, maj@K (K = samples per problem), format rate (share of samples whose
    answer is in the required format) and mean completion length in tokens, from a ``summarize`` report."""
    k = report["samples"] // report["problems"]
    return {"stage": stage, "kind": kind, "model": model, "pass@1": report["pass@1"], f"pass@{k}": report[f"pass@{k}"],
            f"maj@{k}": report[f"maj@{k}"], "format_rate": report["format_pct"] / 100,
            "mean_length": report["output_tokens_avg"]}


def columns(rows: list[dict]) -> list[str]:
    """The table's columns: stage, pass@1, pass@K, maj@K, format rate, mean length (pass@K once when K = 1)."""
    return list(dict.fromkeys(["stage", *(k for k in rows[0] if k.startswith(("pass@", "maj@"))), "format_rate",
                               "mean_length"]))


def cell(row: dict, column: str) -> str:
    """A value as shown: the stage's name, the mean length to 0.1 token, rates to 3 decimals."""
    if column == "stage":
        return str(row[column])
    return f"{row[column]:.1f}" if column == "mean_length" else f"{row[column]:.3f}"


def comparison_title(settings: PipelineEvalConfig) -> str:
    top_k = f", top-k {settings.top_k}" if settings.top_k else ""
    return (f"{settings.task.name} test: {settings.problems} problems x {settings.samples} samples, temperature "
            f"{settings.temperature:g}{top_k}, max {settings.max_new_tokens} new tokens, seed {settings.seed}")


def comparison_markdown(rows: list[dict], title: str) -> str:
    """The table as Markdown: a title line, then one row per evaluated stage in pipeline order."""
    cols = columns(rows)
    lines = [f"# Pipeline comparison\n\n{title}\n", "| " + " | ".join(c.replace("_", " ") for c in cols) + " |",
             "|---" + "|---:" * (len(cols) - 1) + "|"]
    lines += ["| " + " | ".join(cell(r, c) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_comparison(config: PipelineConfig, rows: list[dict], console: Console) -> None:
    """Print the table and write run_dir/comparison.md and comparison.json (settings, rows with model paths)."""
    root, title = Path(config.run_dir), comparison_title(config.eval)
    if not rows:
        console.print("pipeline: no policy or eval stage: nothing to compare")
        return
    table = Table(title=title)
    for column in columns(rows):
        table.add_column(column.replace("_", " "), justify="left" if column == "stage" else "right")
    for row in rows:
        table.add_row(*(cell(row, c) for c in columns(rows)))
    console.print(table)
    (root / "comparison.md").write_text(comparison_markdown(rows, title))
    (root / "comparison.json").write_text(json.dumps({"eval": to_dict(config.eval), "rows": rows}, indent=1))
    console.print(f"comparison: {root / 'comparison.md'}, {root / 'comparison.json'}", soft_wrap=True)
