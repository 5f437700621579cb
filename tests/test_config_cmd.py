"""Specs for ``posttrain config STAGE [--preset NAME]`` (every key, its default, its doc; a listing that is
itself a config) and ``--dry-run`` on every stage (config, data and rewards checked; no model, no files)."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from posttrain.algorithms.presets import RL_PRESETS
from posttrain.cli import app
from posttrain.config import RLConfig, load_config, to_dict
from posttrain.config_docs import field_doc, listing, stage_configs
from posttrain.pipeline import load_pipeline

ROWS = "".join(f'{{"prompt": "What is {i} + {i}?", "completion": "#### {2 * i}", "answer": "{2 * i}"}}\n'
               for i in range(6))


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def one_line_error(result, start: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().startswith(start), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


# --- posttrain config ------------------------------------------------------------------------------------


def test_listing_has_every_key_dotted_with_its_default_and_doc():
    result = invoke("config", "sft")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "optim.lr: 0.003  # peak learning rate" in lines
    assert "optim.betas: [0.9, 0.95]  # AdamW betas" in lines
    assert "task.name: arithmetic  # task name: arithmetic (built-in, generated) | gsm8k | dataset (your own " \
        "prompts) | short_answer (generated one-step questions, for small pretrained chat models); or a task class " \
        "of your own: pkg.mod:MyTask or path/to/file.py:MyTask (README: the Task " \
        "interface)" in lines
    assert "model.path: null  # a posttrain checkpoint dir, an HF model dir or hub id, or a .gguf file (None: " \
           "fresh GPT)" in lines
    assert "# optim: optimizer and schedule" in lines  # a section's header: its field's comment
    # a comment line under a field continues its doc
    loss = next(line for line in lines if line.startswith("loss: "))
    assert loss.endswith("| completion (the assistant turn: reasoning + answer) | answer_only (the final-answer span)")
    keys = {line.split(":")[0] for line in lines if line and not line.startswith("#")}
    assert {"monitor.kl_max", "log.report_to", "eval.ks", "gpt.n_layer", "packing"} <= keys


def test_rl_listing_names_nested_sections_and_inherited_fields():
    text = listing("rl")
    assert "prompt_sampling.strategy: null  # uniform | epoch" in text
    assert "sampling.temperature: 1.0  # softmax temperature; 0 means greedy" in text
    assert "advantage: null  # estimator:" in text  # left to the preset
    assert field_doc(RLConfig, "resume").startswith("auto: continue from run_dir's latest checkpoint")  # RunOptions'
    assert "\ntask: null  # a task whose held-out problems" in listing("dpo")  # an optional section, unset
    assert "\n# task.name: arithmetic  # task name" in listing("dpo")  # ... its keys as comments


@pytest.mark.parametrize("preset", ["dapo", "ppo", "nanochat"])
def test_preset_shows_the_values_it_resolves_to(preset):
    result = invoke("config", "rl", "--preset", preset)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert f"algorithm: {preset}  # preset: nanochat | grpo | dr_grpo | dapo | rloo | reinforce_pp | ppo" in lines
    values = yaml.safe_load(result.stdout)
    for key, value in RL_PRESETS[preset].items():
        assert values[key] == value, key
    assert values["clip_low"] == 0.2 if preset != "nanochat" else values["clip_low"] == float("inf")  # fallback / .inf
    assert "clip_high: null  #" in invoke("config", "rl").stdout  # without a preset: left to it


def test_the_listing_is_a_config_that_loads_to_the_defaults(tmp_path):
    for stage, cls in stage_configs().items():
        path = tmp_path / f"{stage}.yaml"
        path.write_text(listing(stage))
        assert load_config(cls, path) == cls(), stage
    path = tmp_path / "dapo.yaml"
    path.write_text(listing("rl", "dapo"))
    assert load_config(RLConfig, path) == RLConfig(algorithm="dapo")


def test_yaml_configs_take_dotted_keys_and_a_null_section_they_set(tmp_path):
    from posttrain.preference_config import DPOConfig

    path = tmp_path / "dpo.yaml"
    path.write_text("optim: {warmup_steps: 3}\noptim.lr: 0.5\ntask: null\ntask.name: gsm8k\ntask.test_size: 4\n")
    config = load_config(DPOConfig, path)
    assert (config.optim.lr, config.optim.warmup_steps, config.task.name, config.task.test_size) == (0.5, 3, "gsm8k", 4)
    pipeline = tmp_path / "pipeline.yaml"  # a pipeline file, its stage YAML and a stage's inline keys alike
    (tmp_path / "stage.yaml").write_text("optim.lr: 0.25\n")
    pipeline.write_text(f"run_dir: {tmp_path / 'run'}\neval.samples: 2\nstages:\n  sft: {{config: stage.yaml, "
                        "optim.warmup_steps: 7}\n")
    loaded = load_pipeline(pipeline)
    sft = loaded.stages[0].resolved
    assert (loaded.eval.samples, sft.optim.lr, sft.optim.warmup_steps) == (2, 0.25, 7)


@pytest.mark.parametrize("args, message", [
    (["config", "rll"], "config error: unknown stage 'rll' (did you mean 'rl'?)"),
    (["config", "rl", "--preset", "dapp"], "config error: unknown preset 'dapp' (did you mean 'dapo'?)"),
    (["config", "sft", "--preset", "dapo"], "config error: --preset is for rl"),
])
def test_unknown_stage_or_preset_is_one_line_with_the_closest_name(args, message):
    one_line_error(invoke(*args), message)


# --- --dry-run -------------------------------------------------------------------------------------------


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test."""
    def load(*args, **kwargs):
        raise AssertionError("a dry run loaded a model")

    for module in ("sft", "rl", "dpo", "reward_model"):
        monkeypatch.setattr(f"posttrain.trainers.{module}.load_policy", load)


@pytest.mark.parametrize("stage, args, checked", [
    ("sft", ["task.name=dataset", "task.data=DATA", "task.test_size=2"], "data (dataset: 4 train / 2 test rows)"),
    ("rl", ["task.name=dataset", "task.data=DATA", "task.test_size=2", "rewards={task: 1.0, format_soft: 0.5}"],
     "data (dataset: 4 train / 2 test rows), rewards (2 functions: task, format_soft)"),
    ("rm", ["data.train_size=8", "data.test_size=2"], "data (8 train / 2 test pairs)"),
    ("dpo", ["data.train_size=8", "data.test_size=2", "task=arithmetic", "task.test_size=3"],
     "data (8 train / 2 test pairs; eval task arithmetic: generated train / 3 test rows)"),
])
def test_dry_run_checks_and_stops_without_a_model_or_a_file(tmp_path, no_model, stage, args, checked):
    data = tmp_path / "rows.jsonl"
    data.write_text(ROWS)
    run_dir = tmp_path / "run"
    overrides = [a.replace("DATA", str(data)) for a in args]
    result = invoke(stage, "-", f"run_dir={run_dir}", f"model={tmp_path / 'no-such-model'}", *overrides, "--dry-run")
    assert result.exit_code == 0, result.output
    *config, last = result.stdout.strip().splitlines()
    assert last == f"dry run: config, {checked} OK; no model loaded, nothing written"
    resolved = load_config(stage_configs()[stage], None, [f"run_dir={run_dir}", f"model={tmp_path / 'no-such-model'}",
                                                          *overrides])
    assert yaml.safe_load("\n".join(config)) == to_dict(resolved)  # the resolved config, as a run saves it
    assert not run_dir.exists()


def test_dry_run_of_a_pipeline_does_not_need_the_checkpoints_it_would_write(tmp_path, no_model):
    path = tmp_path / "pipeline.yaml"
    stages = {"sft": {}, "rm": {"data": {"train_size": 8, "test_size": 2}},
              "rl": {"reward_model": "rm", "rewards": {"reward_model": 1.0}}}  # rm's output does not exist yet
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "eval": {"task": {"test_size": 4}, "problems": 2},
                                    "stages": stages}, sort_keys=False))
    result = invoke("pipeline", str(path), "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[-6:] == ["checked, stage by stage:",
                          "  sft (sft): data (arithmetic: generated train / 256 test rows)",
                          "  rm (rm): data (8 train / 2 test pairs)",
                          "  rl (rl): data (arithmetic: generated train / 256 test rows), rewards (1 function: "
                          "reward_model)",
                          "  comparison: arithmetic: generated train / 4 test rows",
                          "dry run: config, data, rewards OK; no model loaded, nothing written"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["optim.lrr=1"], "config error: unknown config key 'optim.lrr' (did you mean 'lr'?)"),
    (["task.name=dataset", "task.data=BAD"], "data error: BAD:2: malformed JSON"),
    (["rewards={MISSING:score: 1.0}"], "config error: config key 'rewards': cannot load reward 'MISSING:score'"),
    (["reward_model.path=NOWHERE"], "config error: NOWHERE is not a reward model: neither a posttrain checkpoint"),
    (["prompt_sampling.strategy=priority"], "config error: prompt_sampling.strategy 'priority' tracks each prompt"),
])
def test_dry_run_stops_on_a_bad_key_data_file_or_reward_with_one_line(tmp_path, no_model, args, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1 + 1?", "answer": "2"}\n{"prompt": "2 + 2?", "answer": \n')
    paths = {"BAD": str(bad), "MISSING": str(tmp_path / "missing.py"), "NOWHERE": str(tmp_path / "nowhere")}
    for name, path in paths.items():
        args, message = [a.replace(name, path) for a in args], message.replace(name, path)
    run_dir = tmp_path / "run"
    one_line_error(invoke("rl", "-", f"run_dir={run_dir}", "model=nope", *args, "--dry-run"), message)
    assert not run_dir.exists()


def test_rm_and_dpo_dry_runs_stop_on_a_pair_file_they_cannot_use(tmp_path, no_model):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "1 + 1?", "chosen": "2"}\n')
    for stage in ("rm", "dpo"):
        one_line_error(invoke(stage, "-", f"run_dir={tmp_path / 'run'}", f"data.source={bad}", "--dry-run"),
                       f"config error: data.source: {bad}:1: row has no 'rejected'")
    assert not (tmp_path / "run").exists()


def test_every_stage_command_has_dry_run():
    for stage in (*stage_configs(), "pipeline"):
        assert "--dry-run" in invoke(stage, "--help").stdout, stage
