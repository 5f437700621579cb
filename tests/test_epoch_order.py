"""Epoch order (each row once per pass, reshuffled, resumable) and ``epochs`` → steps for every trainer."""

from __future__ import annotations

import json

import pytest

from posttrain.config import ConfigError, RLConfig, SFTConfig, load_config
from posttrain.epoch_order import EpochOrder, epoch_steps, pass_order
from posttrain.preference_config import DPOConfig


def test_epoch_steps_exact_values():
    assert epoch_steps(2, 1000, 16) == 125
    assert epoch_steps(1, 32, 16) == 2
    assert epoch_steps(0.3, 10, 1) == 3  # not 4: the product is rounded before the ceiling
    assert epoch_steps(0.01, 5, 16) == 1


def test_each_pass_visits_every_row_once_in_its_own_seeded_order():
    order = EpochOrder(7, seed=3)
    passes = [[order.next() for _ in range(7)] for _ in range(3)]
    assert all(sorted(p) == list(range(7)) for p in passes)
    assert len({tuple(p) for p in passes}) == 3
    assert passes[1] == pass_order(7, 3, 1) and order.progress == 3.0
    assert [EpochOrder(7, seed=3).next() for _ in range(1)] == passes[0][:1]


def test_a_restored_order_continues_where_it_stopped():
    order = EpochOrder(5, seed=0)
    for _ in range(8):
        order.next()
    saved = json.loads(json.dumps(order.state_dict()))
    rest = [order.next() for _ in range(6)]
    again = EpochOrder(5, seed=0)
    again.load_state_dict(saved)
    assert [again.next() for _ in range(6)] == rest


def test_epochs_sets_the_rl_steps_from_the_prompt_pool(tmp_path):
    from posttrain.trainers.rl import check_inputs

    config = load_config(RLConfig, None, ["epochs=2.5", "prompts_per_step=16", "prompt_sampling.pool_size=100"])
    checked = check_inputs(config, reward_model=False)
    assert config.steps == 16 and checked.epochs == "2.5 epochs of 100 prompts, 16 per step: 16 steps"


def test_epochs_on_generated_problems_is_a_config_error():
    from posttrain.trainers.rl import check_inputs as rl_inputs
    from posttrain.trainers.sft import check_inputs as sft_inputs

    with pytest.raises(ConfigError, match="'epochs' needs a fixed training set"):
        rl_inputs(load_config(RLConfig, None, ["epochs=1"]), reward_model=False)
    with pytest.raises(ConfigError, match="'epochs' needs a fixed training set"):
        sft_inputs(load_config(SFTConfig, None, ["epochs=1"]))
    with pytest.raises(ConfigError, match="'epochs' must be >= 0"):
        load_config(SFTConfig, None, ["epochs=-1"])


def test_epochs_over_preference_pairs_and_in_the_dry_run():
    from posttrain.dry_run import dry_run

    config = load_config(DPOConfig, None, ["epochs=2", "batch_size=32", "data.train_size=100", "data.test_size=8",
                                           "task=null"])
    out = dry_run("dpo", config)
    assert config.steps == 7 and "2 epochs of 100 pairs, 32 per step: 7 steps" in out and "steps: 7" in out


def test_epochs_with_steps_or_dynamic_sampling_is_a_config_error():
    from posttrain.trainers.rl import check_inputs

    with pytest.raises(ConfigError, match=r"'epochs' \(1\) and 'steps' \(40\) are both set"):
        check_inputs(load_config(RLConfig, None, ["epochs=1", "steps=40", "prompt_sampling.pool_size=64"]),
                     reward_model=False)
    with pytest.raises(ConfigError, match="does not fit dynamic_sampling"):
        check_inputs(load_config(RLConfig, None, ["epochs=1", "algorithm=dapo", "prompt_sampling.pool_size=64"]),
                     reward_model=False)
    config = load_config(RLConfig, None, ["epochs=1", "prompt_sampling.pool_size=64"])
    check_inputs(config, reward_model=False)
    check_inputs(config, reward_model=False)  # checked twice (a dry run, then the run): the same steps
    assert config.steps == 4


def test_a_checkpoint_of_another_data_size_is_refused():
    saved = EpochOrder(5, seed=0).state_dict()
    with pytest.raises(ConfigError, match="the checkpoint passes over 5 training rows, this config's data has 6"):
        EpochOrder(6, seed=0).load_state_dict(saved)
