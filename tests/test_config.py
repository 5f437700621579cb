"""Specs for typed configs: dotted overrides, errors that name the key and suggest a fix, YAML files."""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import pytest

from posttrain.config import (
    RL_FALLBACK,
    RL_PRESETS,
    ConfigError,
    EvalConfig,
    OptimConfig,
    RLConfig,
    SFTConfig,
    TaskConfig,
    check_range,
    load_config,
    save_config,
    suggest,
    to_dict,
)
from posttrain.preference_config import RMConfig


def test_defaults_without_file_or_overrides():
    assert load_config(SFTConfig) == SFTConfig()
    assert load_config(RLConfig) == RLConfig()


def test_dotted_overrides_set_nested_fields():
    cfg = load_config(SFTConfig, overrides=["optim.lr=1e-3", "steps=5", "gpt.n_layer=3"])
    assert cfg.optim.lr == 0.001 and type(cfg.optim.lr) is float
    assert cfg.steps == 5 and type(cfg.steps) is int
    assert cfg.gpt.n_layer == 3
    assert cfg.optim.warmup_steps == OptimConfig().warmup_steps  # siblings keep their defaults
    assert cfg.gpt.n_embd == SFTConfig().gpt.n_embd


@pytest.mark.parametrize(
    ("override", "field", "expected"),
    [
        ("optim.lr=2", ("optim", "lr"), 2.0),  # an int is accepted for a float field
        ("optim.betas=[0.8, 0.9]", ("optim", "betas"), (0.8, 0.9)),
        ("eval.ks=[1, 4, 8]", ("eval", "ks"), (1, 4, 8)),
        ("eval.ks=2", ("eval", "ks"), (2,)),
        ("eval.top_k=null", ("eval", "top_k"), None),
        ("model.path=runs/x/ckpt", ("model", "path"), "runs/x/ckpt"),
        ("task.name=arithmetic", ("task", "name"), "arithmetic"),
        ("run_dir=runs/a=b", ("run_dir",), "runs/a=b"),  # only the first '=' splits
    ],
)
def test_override_values_are_parsed_as_yaml_scalars(override, field, expected):
    cfg = load_config(SFTConfig, overrides=[override])
    value = cfg
    for name in field:
        value = getattr(value, name)
    assert value == expected
    assert type(value) is type(expected)


def test_rl_config_sampling_overrides():
    cfg = load_config(RLConfig, overrides=["sampling.temperature=0.7", "sampling.top_k=null", "kl_coef=0.05"])
    assert cfg.sampling.temperature == 0.7
    assert cfg.sampling.top_k is None
    assert cfg.kl_coef == 0.05


def test_unknown_nested_key_names_it_and_suggests_the_closest():
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, overrides=["optim.lrr=1"])
    assert "'optim.lrr'" in str(err.value)
    assert "'lr'" in str(err.value)


def test_unknown_top_level_key_names_it_and_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"'stepz'.*'steps'"):
        load_config(SFTConfig, overrides=["stepz=3"])


def test_unknown_key_without_a_close_match_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(OptimConfig, overrides=["zzzzzz=1"])
    message = str(err.value)
    assert "'zzzzzz'" in message
    assert all(name in message for name in ("lr", "grad_clip", "warmup_steps"))


def test_suggest_exact_strings():
    assert suggest("lrr", ["lr", "betas"]) == " (did you mean 'lr'?)"
    assert suggest("qqq", ["lr", "betas"]) == " (valid: betas, lr)"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("steps=abc", "steps"),
        ("steps=1.5", "steps"),
        ("steps=true", "steps"),  # a bool is not an int here
        ("optim.lr=fast", "optim.lr"),
        ("eval.ks=[1, x]", "eval.ks"),
        ("dynamic_sampling=3", "dynamic_sampling"),
    ],
)
def test_wrong_type_names_the_key(override, key):
    cls = RLConfig if key == "dynamic_sampling" else SFTConfig
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(cls, overrides=[override])


def test_override_into_a_value_that_is_not_a_section():
    with pytest.raises(ConfigError, match="'steps' is not a section"):
        load_config(SFTConfig, overrides=["steps=5", "steps.x=1"])


def test_section_given_a_scalar_sets_its_first_field():
    config = load_config(RLConfig, overrides=["model=runs/x", "model.dtype=bfloat16", "task=gsm8k"])
    assert (config.model.path, config.model.dtype, config.task.name) == ("runs/x", "bfloat16", "gsm8k")
    # after a YAML-style section, the scalar replaces only the first field
    config = load_config(RLConfig, overrides=["model.tool_tokens=true", "model=runs/y"])
    assert (config.model.path, config.model.tool_tokens) == ("runs/y", True)


def test_a_renamed_key_says_its_new_name():
    with pytest.raises(ConfigError, match="'micro_batch' \\(it is now 'max_tokens_per_micro_batch, a budget of tokens"):
        load_config(RLConfig, overrides=["micro_batch=32"])
    assert load_config(RMConfig, overrides=["micro_batch=8"]).micro_batch == 8  # the reward model's keeps its name


def test_section_given_a_list_is_an_error():
    with pytest.raises(ConfigError, match="'optim' must be a mapping"):
        load_config(SFTConfig, overrides=["optim=[1, 2]"])


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(SFTConfig, overrides=["steps"])


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_yaml_round_trip(tmp_path):
    cfg = load_config(RLConfig, overrides=["optim.lr=5e-4", "eval.ks=[1, 2, 4]", "sampling.top_p=0.9"])
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert load_config(RLConfig, path) == cfg
    assert "lr: 0.0005" in path.read_text()


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("steps: 7\noptim:\n  lr: 1.0e-2\n  schedule: linear\n")
    cfg = load_config(SFTConfig, path, ["steps=9"])
    assert cfg.steps == 9  # the override wins over the file
    assert cfg.optim.lr == 0.01 and cfg.optim.schedule == "linear"


def test_empty_yaml_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(SFTConfig, path) == SFTConfig()


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("eval:\n  sample: 4\n")
    with pytest.raises(ConfigError, match=r"'eval.sample'.*'samples'"):
        load_config(SFTConfig, path)


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(SFTConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(SFTConfig, bad)


def test_to_dict_is_plain_data():
    data = to_dict(SFTConfig())
    assert data["optim"]["betas"] == [0.9, 0.95]
    assert data["eval"]["ks"] == [1, 8]
    assert data["gpt"]["n_kv_head"] == SFTConfig().gpt.n_kv_head


@pytest.mark.parametrize("cls", [SFTConfig, RLConfig, OptimConfig, EvalConfig])
def test_every_field_has_a_default_of_its_declared_type(cls):
    """Configs are fully specified by their defaults (a YAML file only changes fields)."""
    hints = typing.get_type_hints(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        hint = hints[f.name]
        if hint in (int, float, str, bool):
            assert type(value) is hint, f.name


@pytest.mark.parametrize("override", ["optim.betas=[0.9]", "optim.betas=[0.9, 0.95, 0.99]"])
def test_fixed_length_tuple_of_wrong_length_is_an_error(override):
    with pytest.raises(ConfigError, match="'optim.betas'"):
        load_config(SFTConfig, overrides=[override])


@pytest.mark.parametrize(
    ("override", "key", "hint"),
    [
        ("algorithm=grpoo", "'algorithm'", "'grpo'"),
        ("loss_agg=token_mean", "'loss_agg'", "'token-mean'"),
        ("kl_kind=k33", "'kl_kind'", "'k3'"),
        ("optim.schedule=cosin", "'optim.schedule'", "'cosine'"),
    ],
)
def test_an_unknown_variant_name_is_a_config_error_with_a_suggestion(override, key, hint):
    with pytest.raises(ConfigError) as err:
        load_config(RLConfig, None, [override])
    assert key in str(err.value) and hint in str(err.value)


# --- RL presets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", list(RL_PRESETS))
def test_every_preset_resolves_every_field(preset):
    cfg = RLConfig(algorithm=preset)
    for key in {*RL_FALLBACK, *RL_PRESETS[preset]}:
        assert getattr(cfg, key) is not None, key
    assert cfg.advantage == RL_PRESETS[preset]["advantage"]


def test_dapo_preset_is_the_papers_recipe():
    cfg = load_config(RLConfig, overrides=["algorithm=dapo"])
    assert (cfg.advantage, cfg.adv_scale, cfg.loss_agg) == ("grpo", "group", "token-mean")
    assert (cfg.clip_low, cfg.clip_high, cfg.kl_coef) == (0.2, 0.28, 0.0)
    assert cfg.dynamic_sampling and cfg.overlong == "penalty"


def test_preset_is_only_defaults_any_field_overrides():
    cfg = load_config(RLConfig, overrides=["algorithm=dapo", "clip_high=0.3", "dynamic_sampling=false"])
    assert cfg.clip_high == 0.3 and cfg.dynamic_sampling is False
    assert cfg.overlong == "penalty"  # untouched fields keep the preset's value
    grpo = RLConfig(algorithm="grpo", kl_coef=0.0)
    assert grpo.kl_coef == 0.0 and grpo.kl_kind == "k3"


def test_resolved_preset_round_trips_through_yaml(tmp_path):
    cfg = RLConfig(algorithm="nanochat")
    assert cfg.clip_low == float("inf")  # nanochat: no clipping
    save_config(cfg, tmp_path / "c.yaml")
    assert ".inf" in (tmp_path / "c.yaml").read_text()
    assert load_config(RLConfig, tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("override, key", [
    ("ppo_epochs=0", "ppo_epochs"), ("minibatches=0", "minibatches"), ("dual_clip=0.5", "dual_clip"),
    ("kl_in=rewards", "kl_in"), ("overlong=truncate", "overlong"), ("ratio_level=seq", "ratio_level"),
    ("kl_controller=adaptve", "kl_controller"), ("advantage=gea", "advantage"),
])
def test_bad_rl_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(RLConfig, overrides=[override])


def test_rewards_take_weights_by_name_and_reject_unknown_names():
    config = load_config(RLConfig, overrides=["rewards={task: 1.0, integer_answer: 0.5, my.module:fn: 2}"])
    assert config.rewards == {"task": 1.0, "integer_answer": 0.5, "my.module:fn": 2.0}
    with pytest.raises(ConfigError, match="unknown reward 'corectness' \\(did you mean 'correctness'\\?\\)"):
        load_config(RLConfig, overrides=["rewards={corectness: 1.0}"])
    with pytest.raises(ConfigError, match="'rewards' must be a mapping"):
        load_config(RLConfig, overrides=["rewards=3"])


def test_model_and_lora_values_are_checked():
    with pytest.raises(ConfigError, match="'model.dtype' has unknown value 'bf16'"):
        load_config(RLConfig, overrides=["model.dtype=bf16"])
    with pytest.raises(ConfigError, match="'lora.rank' must be >= 0"):
        load_config(RLConfig, overrides=["lora.rank=-1"])


def test_lora_on_a_builtin_checkpoint_is_a_config_error(tmp_path, make_gpt, tok):
    from posttrain.checkpoint import load_policy, save_checkpoint
    from posttrain.config import LoraConfig, ModelConfig

    save_checkpoint(tmp_path / "ckpt", make_gpt(), tok)
    with pytest.raises(ConfigError, match="LoRA \\(lora.rank=8\\) needs a Hugging Face model"):
        load_policy(ModelConfig(str(tmp_path / "ckpt")), LoraConfig(rank=8))
    with pytest.raises(ConfigError, match="'model.path' must name the policy"):
        load_policy(ModelConfig(None), LoraConfig())


# --- values out of range: the key, the rule and the value ---------------------------------------


@pytest.mark.parametrize(
    ("cls", "overrides", "message"),
    [
        (SFTConfig, "steps=0", "config key 'steps' must be >= 1, got 0"),
        (SFTConfig, "steps=10.5", "config key 'steps' must be int, got 10.5"),
        (SFTConfig, "batch_size=0", "config key 'batch_size' must be >= 1, got 0"),
        (SFTConfig, "save_every=-1", "config key 'save_every' must be >= 0 (0: only the final checkpoint), got -1"),
        (SFTConfig, "keep_last=0", "config key 'keep_last' must be >= 1, got 0"),
        (SFTConfig, "threads=-1", "config key 'threads' must be >= 0 (0: torch's default), got -1"),
        (SFTConfig, "resume=''", "config key 'resume' must be 'auto', 'force', 'never' or a checkpoint dir, got ''"),
        (RLConfig, "steps=-3", "config key 'steps' must be >= 1, got -3"),
        (RLConfig, "prompts_per_step=0", "config key 'prompts_per_step' must be >= 1, got 0"),
        (RLConfig, "samples_per_prompt=1",
         "config key 'samples_per_prompt' must be >= 2 for advantage 'grpo' (a group of one has no baseline), got 1"),
        (RLConfig, ["algorithm=rloo", "samples_per_prompt=1"],
         "config key 'samples_per_prompt' must be >= 2 for advantage 'rloo' (a group of one has no baseline), got 1"),
        (RLConfig, ["algorithm=ppo", "samples_per_prompt=0"], "config key 'samples_per_prompt' must be >= 1, got 0"),
        (RLConfig, "optim.lr=-0.1", "config key 'optim.lr' must be > 0, got -0.1"),
        (RLConfig, "optim.lr=0", "config key 'optim.lr' must be > 0, got 0.0"),
        (RLConfig, "optim.lr=.nan", "config key 'optim.lr' must be > 0, got nan"),
        (RLConfig, "optim.lr=.inf", "config key 'optim.lr' must be a finite number, got inf"),
        (RLConfig, "optim.weight_decay=-1e-2", "config key 'optim.weight_decay' must be >= 0, got -0.01"),
        (RLConfig, "optim.betas=[0.9,1]", "config key 'optim.betas' must be in [0, 1), got 1.0"),
        (RLConfig, "optim.betas=[-0.1,0.9]", "config key 'optim.betas' must be in [0, 1), got -0.1"),
        (RLConfig, "optim.warmup_steps=-1", "config key 'optim.warmup_steps' must be >= 0, got -1"),
        (RLConfig, "optim.min_lr_ratio=1.5", "config key 'optim.min_lr_ratio' must be in [0, 1], got 1.5"),
        (RLConfig, "optim.grad_clip=-1", "config key 'optim.grad_clip' must be >= 0 (0: off), got -1.0"),
        (RLConfig, "eval.every=-1", "config key 'eval.every' must be >= 0 (0: only at the end), got -1"),
        (RLConfig, "eval.problems=0",
         "config key 'eval.problems' must be >= 1 (the final evaluation needs a problem), got 0"),
        (RLConfig, "eval.ks=[1,16]", "config key 'eval.samples' must be >= 16 (the largest k of eval.ks: pass@k "
                                     "draws k of the samples), got 8"),
        (RLConfig, "eval.ks=[0,1]", "config key 'eval.ks' must be >= 1, got 0"),
        (RLConfig, "eval.ks=[]", "config key 'eval.ks' needs at least one k (e.g. [1, 8])"),
        (RLConfig, "eval.temperature=-0.5", "config key 'eval.temperature' must be >= 0 (0: greedy), got -0.5"),
        (RLConfig, "eval.top_k=0", "config key 'eval.top_k' must be >= 1 or null (no top-k), got 0"),
        (RLConfig, "eval.max_new_tokens=0", "config key 'eval.max_new_tokens' must be >= 1, got 0"),
        (RLConfig, "sampling.temperature=-1", "config section 'sampling': temperature must be >= 0, got -1.0"),
        (RLConfig, "sampling.top_k=0", "config section 'sampling': top_k must be >= 1 or None, got 0"),
        (RLConfig, "sampling.top_p=0", "config section 'sampling': top_p must be in (0, 1] or None, got 0.0"),
        (RLConfig, "sampling.top_p=1.5", "config section 'sampling': top_p must be in (0, 1] or None, got 1.5"),
        (RLConfig, "sampling.max_new_tokens=0", "config section 'sampling': max_new_tokens must be >= 1, got 0"),
        (RLConfig, "kl_coef=-0.1", "config key 'kl_coef' must be >= 0, got -0.1"),
        (RLConfig, "clip_low=-0.2", "config key 'clip_low' must be >= 0 (.inf: no clipping), got -0.2"),
        (RLConfig, "clip_high=-1", "config key 'clip_high' must be >= 0 (.inf: no clipping), got -1.0"),
        (RLConfig, "gamma=1.1", "config key 'gamma' must be in [0, 1], got 1.1"),
        (RLConfig, "lam=-0.5", "config key 'lam' must be in [0, 1], got -0.5"),
        (RLConfig, "entropy_coef=-0.001", "config key 'entropy_coef' must be >= 0, got -0.001"),
        (RLConfig, "reward_timeout=0", "config key 'reward_timeout' must be > 0, got 0.0"),
        (RLConfig, "reward_fallback=.nan", "config key 'reward_fallback' must be a number, got nan"),
        (RLConfig, "rewards={task: .nan}", "config key 'rewards.task' must be a number, got nan"),
        (RLConfig, "kl_target=0", "config key 'kl_target' must be > 0, got 0.0"),
        (RLConfig, "critic.lr=0", "config key 'critic.lr' must be > 0, got 0.0"),
        (RLConfig, "log_samples_every=-1", "config key 'log_samples_every' must be >= 0 (0: never), got -1"),
        (RLConfig, "task.teacher_error=1.5", "config key 'task.teacher_error' must be in [0, 1], got 1.5"),
        (RLConfig, "task.test_size=-1", "config key 'task.test_size' must be >= 1 for the arithmetic task (0 means "
                                        "'all' only for gsm8k and dataset), got -1"),
        (RLConfig, ["task=gsm8k", "task.test_size=-1"], "config key 'task.test_size' must be >= 0, got -1"),
        (RLConfig, "task=gsm8", "config key 'task.name' has unknown value 'gsm8' (did you mean 'gsm8k'?)"),
        (RLConfig, "log.report_to=[tensorbord]",
         "config key 'log.report_to' has unknown value 'tensorbord' (did you mean 'tensorboard'?)"),
        (RLConfig, "log.report_to=mlflow", "config key 'log.report_to' has unknown value 'mlflow' (valid: "
                                           "tensorboard, wandb)"),
        (RLConfig, "lora.dropout=1", "config key 'lora.dropout' must be in [0, 1), got 1.0"),
        (SFTConfig, "gpt.n_layer=0", "config section 'gpt': n_layer must be >= 1, got 0"),
        (SFTConfig, "gpt.n_kv_head=3", "config section 'gpt': n_kv_head must divide n_head (grouped-query "
                                       "attention), got n_kv_head=3, n_head=4"),
        (SFTConfig, "gpt.n_embd=36", "config section 'gpt': n_embd / n_head (the head dim) must be an even whole "
                                     "number (rotary embeddings turn pairs of channels), got n_embd=36, n_head=4"),
        (SFTConfig, "gpt.rope_base=0", "config section 'gpt': rope_base must be a finite number > 0, got 0.0"),
    ],
)
def test_bad_values_name_the_key_the_rule_and_the_value(cls, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(cls, overrides=[overrides] if isinstance(overrides, str) else overrides)
    assert str(err.value) == message


def test_edge_values_that_are_valid():
    config = load_config(RLConfig, overrides=[
        "algorithm=ppo", "samples_per_prompt=1", "clip_low=.inf", "optim.betas=[0,0.999]", "optim.min_lr_ratio=1",
        "gamma=0", "lam=1", "save_every=0", "eval.every=0", "eval.samples=4", "eval.ks=[4]", "eval.temperature=0",
        "eval.top_k=null", "sampling.top_p=1", "log.report_to=[tensorboard, wandb]", "resume=runs/old/step_5",
        "task=gsm8k", "task.test_size=0",  # gsm8k: 0 is every test row
    ])
    assert (config.samples_per_prompt, config.clip_low, config.resume) == (1, float("inf"), "runs/old/step_5")
    assert load_config(RLConfig, overrides=["algorithm=reinforce_pp", "samples_per_prompt=1"]).samples_per_prompt == 1


def test_yaml_numbers_are_checked_like_overrides(tmp_path):
    path = tmp_path / "rl.yaml"
    path.write_text("optim:\n  lr: 1e-3\n")  # PyYAML reads 1e-3 as a string
    assert load_config(RLConfig, path).optim.lr == 0.001
    path.write_text("optim:\n  lr: -1e-3\n")
    with pytest.raises(ConfigError, match=r"^config key 'optim.lr' must be > 0, got -0.001$"):
        load_config(RLConfig, path)
    path.write_text("steps: 10.5\n")
    with pytest.raises(ConfigError, match=r"^config key 'steps' must be int, got 10.5$"):
        load_config(RLConfig, path)


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("*configs/*.yaml")), ids=str)
def test_every_shipped_config_loads(path):
    from posttrain.pipeline import PipelineConfig, load_pipeline
    from posttrain.preference_config import DPOConfig, RMConfig

    if path.stem.startswith("pipeline_"):  # a pipeline: every stage resolved and checked too
        assert isinstance(load_pipeline(path), PipelineConfig)
        return
    kinds = {"demo_sft": SFTConfig, "demo_rl": RLConfig, "demo_rm": RMConfig, "demo_dpo": DPOConfig,
             "demo_ppo_rm": RLConfig, "rl_smollm2": RLConfig, "demo_real": RLConfig}
    cls = kinds[path.stem]
    assert isinstance(load_config(cls, path), cls)


def test_a_single_gsm8k_file_with_test_size_0_leaves_nothing_to_train_on(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"question": "q", "answer": "#### 1"}\n')
    with pytest.raises(ConfigError, match=r"^config key 'task.test_size' is 0 with the single data file .*rows.jsonl: "
                                          r"every row would be a test row"):
        load_config(SFTConfig, overrides=["task=gsm8k", f"task.data={data}", "task.test_size=0"])
    assert load_config(SFTConfig, overrides=["task=gsm8k", f"task.data={data}", "task.test_size=1"]).task.test_size == 1
    assert TaskConfig(name="gsm8k", data=str(data), test_size=0).test_size == 0  # evaluation alone: every row is test


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((-1, 0), "config key 'k' must be >= 0, got -1"),
        ((0, 0, math.inf, True), "config key 'k' must be > 0, got 0"),
        ((2, -math.inf, 1), "config key 'k' must be <= 1, got 2"),
        ((1, -math.inf, 1, False, True), "config key 'k' must be < 1, got 1"),
        ((1.5, 0, 1), "config key 'k' must be in [0, 1], got 1.5"),
        ((0.0, 0, 1, True, False), "config key 'k' must be in (0, 1], got 0.0"),
        ((1.0, 0, 1, False, True), "config key 'k' must be in [0, 1), got 1.0"),
        ((math.nan,), "config key 'k' must be a number, got nan"),
        ((-math.inf,), "config key 'k' must be a finite number, got -inf"),
    ],
)
def test_check_range_messages(args, message):
    value, *bounds = args
    opens = dict(zip(("low_open", "high_open"), bounds[2:], strict=False))
    with pytest.raises(ConfigError) as err:
        check_range("k", value, *bounds[:2], **opens)
    assert str(err.value) == message


def test_check_range_passes_values_in_range_and_inf_where_allowed():
    check_range("k", 0, 0, 1)
    check_range("k", 1, 0, 1)
    check_range("k", math.inf, 0, infinite=True)
    check_range("k", 5)


def test_a_section_that_checks_itself_in_config_key_style_is_passed_through():
    """MonitorConfig raises ValueError("config key 'monitor....' ..."): a ConfigError, not prefixed again."""
    with pytest.raises(ConfigError, match=r"^config key 'monitor\.window' "):
        load_config(RLConfig, overrides=["monitor.window=0"])


def test_a_key_added_since_a_config_was_saved_is_no_change_at_its_default():
    from posttrain.trainers.run import config_changes, defaults_of

    new = to_dict(SFTConfig())
    old = {k: v for k, v in new.items() if k not in ("epochs", "distributed")}  # saved before those keys existed
    assert config_changes(old, new, defaults_of(SFTConfig())) == {}
    assert config_changes(old, new | {"epochs": 2.0}, defaults_of(SFTConfig())) == {"epochs": (None, 2.0)}


def test_an_overlong_buffer_longer_than_the_budget_is_a_config_error():
    with pytest.raises(ConfigError, match=r"'overlong_buffer' \(16\) must be at most sampling.max_new_tokens \(8\)"):
        load_config(RLConfig, None, ["algorithm=dapo", "sampling.max_new_tokens=8"])


def test_the_sampler_trainer_correction_checks_its_keys():
    with pytest.raises(ConfigError, match="config key 'is_correction' weighs tokens: it needs ratio_level=token"):
        load_config(RLConfig, overrides=["is_correction=tis", "ratio_level=sequence"])
    with pytest.raises(ConfigError, match="is_correction"):
        load_config(RLConfig, overrides=["is_correction=tsi"])
    with pytest.raises(ConfigError, match="is_clip"):
        load_config(RLConfig, overrides=["is_correction=tis", "is_clip=1"])


def test_k1_in_the_loss_is_refused_its_expected_gradient_is_zero():
    from posttrain.config import RLConfig, load_config

    with pytest.raises(ConfigError, match=r"'kl_kind' k1 in the loss \(kl_in=loss\) has an expected gradient of "
                                          r"exactly 0: use k2"):
        load_config(RLConfig, None, ["algorithm=grpo", "kl_kind=k1"])
    assert load_config(RLConfig, None, ["algorithm=ppo"]).kl_kind == "k1"  # in the reward: fine
    assert load_config(RLConfig, None, ["algorithm=grpo", "kl_kind=k1", "kl_coef=0"]).kl_coef == 0  # no KL term
