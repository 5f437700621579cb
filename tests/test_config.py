"""Specs for typed configs: dotted overrides, errors that name the key and suggest a fix, YAML files."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from posttrain.config import (
    RL_FALLBACK,
    RL_PRESETS,
    ConfigError,
    EvalConfig,
    OptimConfig,
    RLConfig,
    SFTConfig,
    load_config,
    save_config,
    suggest,
    to_dict,
)


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
        ("eval.ks=[1, 4, 16]", ("eval", "ks"), (1, 4, 16)),
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
    config = load_config(RLConfig, overrides=["model.dtype=float16", "model=runs/y"])
    assert (config.model.path, config.model.dtype) == ("runs/y", "float16")


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
