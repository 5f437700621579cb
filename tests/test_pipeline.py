"""Specs for ``posttrain pipeline``: stages chained by ``from``, errors that name the key, a tiny
sft → rl → eval pipeline end to end, stage-granular resume, and the comparison table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from typer.testing import CliRunner

from posttrain.checkpoint import save_checkpoint
from posttrain.cli import app
from posttrain.config import ConfigError
from posttrain.pipeline import (
    columns,
    comparison_markdown,
    comparison_row,
    dependents,
    load_pipeline,
    run_pipeline,
)
from posttrain.preference_config import RMConfig

EVAL = {"problems": 2, "samples": 2, "ks": [1, 2], "max_new_tokens": 12, "every": 0}
TINY = {"threads": 1, "steps": 2, "task": {"test_size": 8}, "eval": EVAL, "save_every": 0}
TINY_SFT = {**TINY, "batch_size": 4}
TINY_RL = {**TINY, "prompts_per_step": 2, "samples_per_prompt": 2, "eval_before": False,
           "sampling": {"max_new_tokens": 12}}
SHARED_EVAL = {"task": {"test_size": 8}, "problems": 3, "samples": 2, "max_new_tokens": 12, "batch": 3}


def write(tmp_path: Path, stages: dict, **top) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), **top, "stages": stages}, sort_keys=False))
    return path


# --- loading: from, reward_model, defaults ------------------------------------------------------


def test_from_chains_each_stage_to_an_earlier_stages_final_checkpoint(tmp_path):
    (tmp_path / "stage_rl.yaml").write_text("model: runs/elsewhere\nsteps: 7\noptim: {lr: 2.0e-4, warmup_steps: 3}\n")
    config = load_pipeline(write(tmp_path, {
        "base": {"kind": "eval"},
        "sft": {"model": "ckpt/base"},
        "rm": {"data": {"train_size": 64}},
        "dpo": {"from": "sft"},
        "rl": {"config": "stage_rl.yaml", "from": "sft", "reward_model": "rm", "optim": {"lr": 1e-3}},
        "ppo": {"kind": "rl", "steps": 3},
        "after_dpo": {"kind": "eval", "from": "dpo"},
    }), ["stages.ppo.algorithm=ppo"])
    run = tmp_path / "run"
    stages = {s.name: s for s in config.stages}
    assert [s.name for s in config.stages] == ["base", "sft", "rm", "dpo", "rl", "ppo", "after_dpo"]
    assert stages["base"].resolved.path == "ckpt/base"  # eval without from/model: the start model
    assert stages["sft"].start is None and stages["sft"].resolved.model.path == "ckpt/base"
    assert stages["rm"].start == "sft" and isinstance(stages["rm"].resolved, RMConfig)  # default: previous policy
    assert stages["rm"].resolved.model.path == str(run / "sft/checkpoints/final")
    assert stages["dpo"].resolved.model.path == str(run / "sft/checkpoints/final")
    rl = stages["rl"].resolved
    assert rl.model.path == str(run / "sft/checkpoints/final")  # from wins over the stage YAML's model
    assert rl.reward_model.path == str(run / "rm/checkpoints/final") and rl.rewards == {"reward_model": 1.0}
    assert (rl.steps, rl.optim.lr, rl.optim.warmup_steps) == (7, 1e-3, 3)  # inline keys merge leaf by leaf
    assert rl.run_dir == str(run / "rl")
    ppo = stages["ppo"]
    assert ppo.start == "rl" and ppo.resolved.model.path == str(run / "rl/checkpoints/final")  # not the rm stage
    assert (ppo.resolved.algorithm, ppo.resolved.steps) == ("ppo", 3)
    assert stages["after_dpo"].resolved.path == str(run / "dpo/checkpoints/final")


def test_dict_values_replace_the_stage_yamls_whole_and_sections_merge_by_leaf(tmp_path):
    (tmp_path / "arm.yaml").write_text("model: {path: runs/elsewhere, dtype: bfloat16}\nrewards: {task: 1.0}\n"
                                       "optim: {lr: 2.0e-4, warmup_steps: 3}\n")
    notes = []
    config = load_pipeline(write(tmp_path, {
        "sft": {"model": "ckpt/base"},
        "vote": {"kind": "rl", "config": "arm.yaml", "from": "sft", "rewards": {"majority_vote": 0.5},
                 "optim": {"lr": 1e-3}},
        "vote2": {"kind": "rl", "config": "arm.yaml", "from": "sft"},
        "chained": {"kind": "rl", "config": "arm.yaml"},  # no from, no model: starts from vote2, with a notice
        "fresh": {"kind": "sft", "model": None},
    }), ["stages.vote2.rewards={majority_vote: 0.25}"], notice=notes.append)
    run, stages = tmp_path / "run", {s.name: s.resolved for s in config.stages}
    assert stages["vote"].rewards == {"majority_vote": 0.5}  # not {task: 1.0, majority_vote: 0.5}
    assert (stages["vote"].optim.lr, stages["vote"].optim.warmup_steps) == (1e-3, 3)  # a section: leaf by leaf
    assert (stages["vote"].model.path, stages["vote"].model.dtype) == (str(run / "sft/checkpoints/final"), "bfloat16")
    assert stages["vote2"].rewards == {"majority_vote": 0.25}  # the same through an override
    assert stages["chained"].model.path == str(run / "vote2/checkpoints/final")
    assert stages["fresh"].model.path is None
    assert notes == [f"stage 'chained': starts from stage 'vote2' ({run / 'vote2/checkpoints/final'}), not its "
                     "config's model runs/elsewhere (write model: PATH, or null for a fresh GPT, in the stage to "
                     "keep one)"]


def test_dependents_follow_from_reward_model_and_the_implicit_previous_policy(tmp_path):
    config = load_pipeline(write(tmp_path, {
        "sft": {"model": "ckpt/base"},
        "rm": {},  # starts from sft
        "dpo": {"from": "sft"},
        "rl": {"from": "dpo", "reward_model": "rm"},
        "fresh": {"kind": "sft", "model": None},
        "rl2": {"kind": "rl"},  # starts from fresh
        "on_rl": {"kind": "eval", "from": "rl"},
        "base": {"kind": "eval"},  # the start model: no stage's output
    }, eval={"task": {"test_size": 8}, "problems": 2}))
    names = {name: [s.name for s in dependents(config.stages, name)] for name in ("sft", "rm", "dpo", "fresh", "rl2")}
    assert names == {"sft": ["rm", "dpo", "rl", "on_rl"], "rm": ["rl", "on_rl"], "dpo": ["rl", "on_rl"],
                     "fresh": ["rl2"], "rl2": []}


def test_shipped_pipeline_runs_rl_from_the_sft_stage(tmp_path):
    config = load_pipeline(Path(__file__).parents[1] / "configs/pipeline_sft_rl.yaml",
                           [f"run_dir={tmp_path}", "stages.rl.steps=5", "eval.samples=4"])
    sft, rl = config.stages
    assert (sft.kind, sft.resolved.model.path, sft.resolved.steps) == ("sft", None, 600)  # demo_sft.yaml
    assert (rl.kind, rl.resolved.algorithm, rl.resolved.steps) == ("rl", "dr_grpo", 5)  # demo_rl.yaml + override
    assert rl.resolved.model.path == str(tmp_path / "sft/checkpoints/final")
    assert config.eval.samples == 4


@pytest.mark.parametrize(
    ("stages", "overrides", "message"),
    [
        ({"sft": {}, "rl": {"from": "sf"}}, [], r"^stage 'rl': from: 'sf' is not a stage of this pipeline "
                                                r"\(did you mean 'sft'\?\)$"),
        ({"sft": {}, "rl": {"from": "dpo"}, "dpo": {}}, [], r"^stage 'rl': from: 'dpo' is not before this stage "
                                                            r"\(a stage uses only earlier stages\) \(valid: sft\)$"),
        ({"sft": {}, "rl": {"from": "rl"}}, [], r"^stage 'rl': from: 'rl' is not before this stage"),
        ({"rm": {"model": "x"}, "rl": {"from": "rm"}}, [], r"from: 'rm' is a rm stage"),
        ({"sft": {}, "rl": {"reward_model": "sft"}}, [], r"reward_model: 'sft' is a sft stage .* "
                                                          r"\(no earlier rm stage\)"),
        ({"sft": {}, "rl": {"stepz": 3}}, [], r"^stage 'rl': unknown config key 'stepz' \(did you mean 'steps'\?\)$"),
        ({"sft": {}, "rl": {"form": "sft"}}, [], r"unknown config key 'form' \(did you mean 'from'\?\)"),
        ({"sft": {}, "rl": {}}, ["stages.rl.optim.lrr=1"], r"^stage 'rl': unknown config key 'optim.lrr' "
                                                          r"\(did you mean 'lr'\?\)$"),
        ({"sft": {}, "rl": {}}, ["stages.rll.steps=1"], r"^override 'stages.rll.steps=1': no stage 'rll' "
                                                       r"\(did you mean 'rl'\?\)$"),
        ({"sft": {}}, ["run_dri=x"], r"^unknown config key 'run_dri' \(did you mean 'run_dir'\?\)$"),
        ({"sft": {}}, ["eval.problems=9"], r"eval.problems' must be in \[1, 8\]"),
        ({"first": {}}, [], r"^stage 'first': needs a kind: sft \| rm \| dpo \| rl \| eval$"),
        ({"a": {"kind": "sfx"}}, [], r"kind' has unknown value 'sfx' \(did you mean 'sft'\?\)"),
        ({"sft": {"run_dir": "x"}}, [], r"run_dir is set by the pipeline"),
        ({"sft": {}, "rl": {"from": "sft", "model": "m"}}, [], r"set from \(a stage\) or model \(a path\), not both"),
        ({"base": {"kind": "eval"}, "sft": {}}, [], r"stage 'base': no start model to evaluate"),
        ({"sft": {"config": "nope.yaml"}}, [], r"stage 'sft': config file not found: .*nope.yaml"),
        ({"sft": {}, "rl.v2": {"kind": "rl"}}, ["stages.rl.v2.steps=3"], r"^stage 'rl.v2': a stage name is "
                                                                        r"letters, digits, '_' and '-'"),
    ],
)
def test_bad_pipelines_are_config_errors_that_name_the_key(tmp_path, stages, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_pipeline(write(tmp_path, stages, eval={"task": {"test_size": 8}, "problems": 2}), overrides)


def test_cli_exits_2_with_the_key_in_the_message(tmp_path):
    result = CliRunner().invoke(app, ["pipeline", str(write(tmp_path, {"sft": {}, "rl": {}})), "stages.rl.stepz=3"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "config error: stage 'rl': unknown config key 'stepz' (did you mean 'steps'?)"


# --- the comparison: pure functions -------------------------------------------------------------


def report(pass1: float, pass4: float, maj4: float, fmt: int, length: float) -> dict:
    return {"problems": 2, "samples": 8, "format": fmt, "format_pct": 100 * fmt / 8, "pass@1": pass1,
            "pass@2": 0.5, "pass@4": pass4, "maj@4": maj4, "output_tokens_avg": length}


def test_comparison_rows_and_markdown_exact():
    rows = [comparison_row("base", "eval", "m0", report(0.0, 0.0, 0.0, 2, 30.0)),
            comparison_row("sft", "sft", "m1", report(0.375, 0.5, 0.5, 6, 21.25))]
    assert rows[1] == {"stage": "sft", "kind": "sft", "model": "m1", "pass@1": 0.375, "pass@4": 0.5, "maj@4": 0.5,
                       "format_rate": 0.75, "mean_length": 21.25}
    assert columns(rows) == ["stage", "pass@1", "pass@4", "maj@4", "format_rate", "mean_length"]
    assert comparison_markdown(rows, "T").splitlines() == [
        "# Pipeline comparison", "", "T", "",
        "| stage | pass@1 | pass@4 | maj@4 | format rate | mean length |",
        "|---|---:|---:|---:|---:|---:|",
        "| base | 0.000 | 0.000 | 0.000 | 0.250 | 30.0 |",
        "| sft | 0.375 | 0.500 | 0.500 | 0.750 | 21.2 |",
    ]


# --- end to end: sft -> rl -> eval, resumed stage by stage ----------------------------------------


def refuse(*args, **kwargs):
    raise AssertionError("ran again")


def killed(*args, **kwargs):
    raise KeyboardInterrupt


def test_tiny_pipeline_end_to_end_then_resumes_by_stage(tmp_path, make_gpt, tok, monkeypatch):
    import posttrain.eval_report as eval_report
    import posttrain.trainers.rl as rl_trainer
    import posttrain.trainers.sft as sft_trainer

    start = save_checkpoint(tmp_path / "start", make_gpt(n_layer=1), tok)
    path = write(tmp_path, {"sft": {**TINY_SFT, "model": str(start)}, "rl": TINY_RL, "base": {"kind": "eval"}},
                 eval=SHARED_EVAL, threads=1)
    run, quiet = tmp_path / "run", Console(quiet=True)

    with monkeypatch.context() as m:  # killed during rl: sft is recorded, rl is not
        m.setattr(rl_trainer, "train_rl", killed)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(load_pipeline(path), progress=False, console=quiet)
    assert set(json.loads((run / "pipeline.json").read_text())["stages"]) == {"sft"}

    with monkeypatch.context() as m:  # the next run goes on with rl; sft is not trained or evaluated again
        m.setattr(sft_trainer, "train_sft", refuse)
        rows = run_pipeline(load_pipeline(path), progress=False, console=quiet)
    assert [(r["stage"], r["kind"], r["model"]) for r in rows] == [
        ("sft", "sft", str(run / "sft/checkpoints/final")), ("rl", "rl", str(run / "rl/checkpoints/final")),
        ("base", "eval", str(start))]
    for row in rows:
        assert 0 <= row["pass@1"] <= row["pass@2"] <= 1 and 0 <= row["format_rate"] <= 1
        assert 1 <= row["mean_length"] <= 12
    assert (run / "rl/checkpoints/final/model.safetensors").exists()
    assert len((run / "base/comparison.jsonl").read_text().splitlines()) == 3  # 3 problems
    saved = json.loads((run / "comparison.json").read_text())
    assert saved["rows"] == rows and saved["eval"]["samples"] == 2
    table = (run / "comparison.md").read_text()
    assert "| stage | pass@1 | pass@2 | maj@2 | format rate | mean length |" in table
    assert [line.split(" | ")[0] for line in table.splitlines()[-3:]] == ["| sft", "| rl", "| base"]

    state = (run / "pipeline.json").read_bytes()
    with monkeypatch.context() as m:  # a third run trains and samples nothing: the same table from pipeline.json
        for module, name in ((sft_trainer, "train_sft"), (rl_trainer, "train_rl"), (eval_report, "run_eval")):
            m.setattr(module, name, refuse)
        assert run_pipeline(load_pipeline(path), progress=False, console=quiet) == rows
    assert (run / "pipeline.json").read_bytes() == state

    with pytest.raises(ConfigError, match=r"^stage 'rl' finished in .* under another config \(steps 2 -> 3\)"):
        run_pipeline(load_pipeline(path, ["stages.rl.steps=3"]), progress=False, console=quiet)
    with monkeypatch.context() as m:  # rerun: rl (and everything after it) again, sft untouched
        m.setattr(sft_trainer, "train_sft", refuse)
        rerun = run_pipeline(load_pipeline(path, ["stages.rl.steps=3", "on_change=rerun"]), progress=False,
                             console=quiet)
    assert [r["stage"] for r in rerun] == ["sft", "rl", "base"] and rerun[0::2] == rows[0::2]
    assert json.loads((run / "pipeline.json").read_text())["stages"]["rl"]["config"]["steps"] == 3


# --- re-running: dependents of a retrained stage, what the hash leaves out, threads -----------------


@pytest.fixture
def fakes(monkeypatch):
    """Stand-in trainers and sampling: (trained, evaluated), each a list of (stage, torch threads) in call order."""
    import posttrain.eval_report as eval_report
    import posttrain.trainers.rl as rl_trainer
    import posttrain.trainers.sft as sft_trainer

    trained, evaluated = [], []

    def train(config, progress):  # leaves the final checkpoint's directory
        trained.append((Path(config.run_dir).name, torch.get_num_threads()))
        (Path(config.run_dir) / "checkpoints/final").mkdir(parents=True)

    def run_eval(engine, task, problems, samples, params, batch, seed, path, progress, world=None):
        evaluated.append((path.parent.name, torch.get_num_threads()))
        return {"problems": 3, "samples": 6, "pass@1": 0.5, "pass@2": 0.75, "maj@2": 0.5, "format_pct": 50.0,
                "output_tokens_avg": 7.0}

    monkeypatch.setattr(sft_trainer, "train_sft", train)
    monkeypatch.setattr(rl_trainer, "train_rl", train)
    monkeypatch.setattr(eval_report, "load_eval", lambda *args: (None, None, list(range(8))))
    monkeypatch.setattr(eval_report, "run_eval", run_eval)
    return trained, evaluated


def four_stages(tmp_path: Path, **top) -> Path:
    """sft, rl (from sft), fresh (a new GPT: from nothing), on_sft (an evaluation of sft)."""
    return write(tmp_path, {"sft": {**TINY_SFT, "model": "ckpt/start"}, "rl": TINY_RL,
                            "fresh": {**TINY_SFT, "kind": "sft", "model": None},
                            "on_sft": {"kind": "eval", "from": "sft"}}, eval=SHARED_EVAL, **top)


def test_the_pipelines_threads_apply_only_while_evaluating(tmp_path, fakes):
    trained, evaluated = fakes
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_pipeline(load_pipeline(four_stages(tmp_path, threads=1)), progress=False, console=Console(quiet=True))
        assert trained == [("sft", 2), ("rl", 2), ("fresh", 2)]  # not the pipeline's threads: the stages' own
        assert evaluated == [("sft", 1), ("rl", 1), ("fresh", 1), ("on_sft", 1)]
        assert torch.get_num_threads() == 2  # restored after
    finally:
        torch.set_num_threads(before)


def test_keys_that_cannot_change_the_model_are_no_change(tmp_path, fakes):
    trained, evaluated = fakes
    path, quiet = four_stages(tmp_path), Console(quiet=True)
    run_pipeline(load_pipeline(path), progress=False, console=quiet)
    state = json.loads((tmp_path / "run/pipeline.json").read_text())
    assert not {"log", "save_every", "keep_last", "eval", "resume", "threads"} & set(state["stages"]["rl"]["config"])
    trained.clear(), evaluated.clear()
    for key in ("stages.sft.eval.problems=1", "stages.sft.save_every=7", "stages.sft.keep_last=1",
                "stages.sft.threads=2", "stages.rl.log_samples_every=3", "stages.rl.eval_before=true",
                "stages.rl.log.report_to=[tensorboard]"):
        run_pipeline(load_pipeline(path, [key]), progress=False, console=quiet)
    assert trained == evaluated == []
    with pytest.raises(ConfigError, match=r"^stage 'sft' finished in .* under another config \(seed 0 -> 1\)"):
        run_pipeline(load_pipeline(path, ["stages.sft.seed=1"]), progress=False, console=quiet)


def test_a_retrained_stage_runs_every_stage_that_uses_it_again(tmp_path, fakes):
    trained, evaluated = fakes
    path, run, quiet = four_stages(tmp_path), tmp_path / "run", Console(quiet=True)
    run_pipeline(load_pipeline(path), progress=False, console=quiet)
    trained.clear(), evaluated.clear()
    (run / "rl/stale.txt").write_text("trained from the old sft")
    shutil.rmtree(run / "sft")  # sft trains again: rl (from it) and on_sft (its evaluation) run again, fresh not
    run_pipeline(load_pipeline(path), progress=False, console=quiet)
    assert [name for name, _ in trained] == ["sft", "rl"]
    assert [name for name, _ in evaluated] == ["sft", "rl", "on_sft"]
    assert not (run / "rl/stale.txt").exists()  # its directory is deleted: it starts afresh, not from a resume


def test_a_reward_that_cannot_be_loaded_stops_the_pipeline_before_its_first_stage(tmp_path, fakes):
    trained, _ = fakes
    path = four_stages(tmp_path)
    with pytest.raises(ConfigError, match=r"^config key 'rewards': cannot load reward './typo.py:f': no file "):
        run_pipeline(load_pipeline(path, ["stages.rl.rewards={'./typo.py:f': 1.0}"]), progress=False,
                     console=Console(quiet=True))
    assert trained == []  # not even sft, whose output the rl stage would have started from
