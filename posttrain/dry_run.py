"""``--dry-run``: a stage's (or a pipeline's) config, data and rewards checked as a run checks them before
its model loads, with the trainers' own ``check_inputs``; no model is loaded and nothing is written."""

from __future__ import annotations

import importlib

import yaml

from posttrain.config import to_dict

CHECKS = {"sft": "posttrain.trainers.sft", "rm": "posttrain.trainers.reward_model", "dpo": "posttrain.trainers.dpo",
          "rl": "posttrain.trainers.rl"}  # stage -> the module whose check_inputs(config) it runs
DONE = "no model loaded, nothing written"


def check_stage(stage: str, config, **options):
    """``stage``'s ``check_inputs(config, **options)``: its :class:`~posttrain.trainers.checks.Checked`."""
    return importlib.import_module(CHECKS[stage]).check_inputs(config, **options)


def dry_run(stage: str, config) -> str:
    """The resolved ``config`` as YAML, then one line saying what was checked; raises what the checks raise
    (ConfigError, DataError)."""
    checked = check_stage(stage, config)  # first: with epochs > 0 it sets steps
    epochs = f"{checked.epochs}\n" if checked.epochs else ""
    return f"{_yaml(config)}{epochs}dry run: config, {checked.summary} OK; {DONE}\n"


def dry_run_pipeline(config) -> str:
    """A loaded pipeline (every stage's config already resolved): each training stage's checks (an rl stage
    scoring with an rm stage's output does not look for that checkpoint: the pipeline writes it) and the
    comparison task's data; the resolved pipeline as YAML, a line per stage, and the closing line."""
    from posttrain.tasks import make_task
    from posttrain.trainers.checks import task_data

    lines = []
    for stage in config.stages:
        if stage.kind == "eval":
            lines.append(f"  {stage.name} (eval): model {stage.resolved.path}")
            continue
        options = {"reward_model": stage.reward_model is None} if stage.kind == "rl" else {}
        checked = check_stage(stage.kind, stage.resolved, **options)
        epochs = f"; {checked.epochs}" if checked.epochs else ""
        lines.append(f"  {stage.name} ({stage.kind}): {checked.summary}{epochs}")
    task = make_task(config.eval.task)
    task.check("eval")
    lines.append(f"  comparison: {task_data(task)}")
    closing = f"dry run: config, data, rewards OK; {DONE}\n"
    return "\n".join([_yaml(config) + "checked, stage by stage:", *lines, closing])


def _yaml(config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)
