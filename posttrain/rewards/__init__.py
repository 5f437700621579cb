"""Rewards: the library of rule rewards (:mod:`.library`), how a reward function is called, checked and
isolated (:mod:`.calls`, TRL's protocol), loading one by name or path (:mod:`.loading`), the worker processes
that run them with a timeout that holds (:mod:`.pool`) and the weighted composition the RL loop scores with
(:mod:`.reward_set`). Every public name is importable from here."""

from posttrain.rewards.calls import (
    Completion,
    Prompt,
    RewardFailed,
    RewardTimeout,
    TrainingProgress,
    call_with_timeout,
    texts,
)
from posttrain.rewards.library import (
    REWARDS,
    correctness,
    format_soft,
    format_strict,
    group_reward,
    integer_answer,
    length_penalty,
    majority_vote,
    overlong_penalty,
    xml_count,
)
from posttrain.rewards.loading import check_reward_specs, load_reward, reward_name, spec_of
from posttrain.rewards.pool import RewardPool
from posttrain.rewards.reward_set import ON_ERROR, RewardSet, Scores

__all__ = [
    "ON_ERROR", "REWARDS", "Completion", "Prompt", "RewardFailed", "RewardPool", "RewardSet", "RewardTimeout", "Scores",
    "TrainingProgress", "call_with_timeout", "check_reward_specs", "correctness", "format_soft", "format_strict",
    "group_reward", "integer_answer", "length_penalty", "load_reward", "majority_vote", "overlong_penalty",
    "reward_name", "spec_of", "texts", "xml_count",
]
