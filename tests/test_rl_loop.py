"""Specs for the pieces of the RL loop: batch layout, dynamic sampling, reward shaping, advantage
dispatch, minibatching, and the exactness of skipping rows whose loss is zero."""

from __future__ import annotations

import random

import pytest
import torch

from posttrain.config import RLConfig
from posttrain.engine import RolloutBatch
from posttrain.models.gpt import GPT, GPTConfig
from posttrain.random_streams import group_seed
from posttrain.trainers.model_engine import ModelEngine
from posttrain.trainers.objectives import PolicyLoss, PolicyObjective
from posttrain.trainers.rl import estimate_advantages, kl_shaped_rewards, minibatch_rows, policy_update
from posttrain.trainers.rollout import Scorer, collect
from posttrain.trainers.train_batch import TrainBatch, last_token, layout


def rollout_batch(prompts: list[list[int]], completions: list[list[int]], n: int, sampled=None) -> RolloutBatch:
    """A RolloutBatch by hand: row i answers prompts[i // n]; pad id 0."""
    width = max(len(c) for c in completions)
    ids = torch.zeros(len(completions), width, dtype=torch.long)
    mask = torch.zeros(len(completions), width)
    for i, c in enumerate(completions):
        ids[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = torch.tensor(sampled[i] if sampled else [1.0] * len(c))
    return RolloutBatch(
        prompt_ids=[p for p in prompts for _ in range(n)], completion_ids=ids, logprobs=torch.zeros_like(mask),
        mask=mask, lengths=torch.tensor([len(c) for c in completions]),
        finished=torch.ones(len(completions), dtype=torch.bool),
        group_ids=torch.arange(len(prompts)).repeat_interleave(n),
    )


def test_layout_aligns_targets_mask_and_widths():
    # prompt [5, 6] + completion [7, 8, 9] where 8 is a forced tool output (mask 0)
    batch = rollout_batch([[5, 6], [4]], [[7, 8, 9], [3]], 1, sampled=[[1, 0, 1], [1]])
    data = layout(batch, pad_id=0)
    assert data.inputs.tolist() == [[5, 6, 7, 8], [4, 3, 0, 0]]  # past a row's end nothing counts
    assert data.targets.tolist() == [[-1, 7, 8, 9], [3, -1, -1, -1]]
    assert data.mask.tolist() == [[0, 1, 0, 1], [1, 0, 0, 0]]
    assert data.widths.tolist() == [4, 1]
    row = data.take(torch.tensor([1]))
    assert row.width == 1 and row.inputs.tolist() == [[4]] and row.targets.tolist() == [[3]]
    assert row.mask.tolist() == [[1]]


def test_last_token_skips_gaps_and_empty_rows():
    mask = torch.tensor([[0.0, 1, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert last_token(mask).tolist() == [[0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]


def test_select_and_concat_keep_groups_distinct():
    a = rollout_batch([[1], [2]], [[5], [6, 7], [8], [9]], 2)
    b = rollout_batch([[3]], [[4, 4, 4], [4]], 2)
    both = RolloutBatch.concat([a.select(torch.tensor([2, 3])), b], pad_id=0)
    assert both.prompt_ids == [[2], [2], [3], [3]]
    assert both.completion_ids.tolist() == [[8, 0, 0], [9, 0, 0], [4, 4, 4], [4, 0, 0]]
    assert both.group_ids.tolist() == [1, 1, 2, 2]  # a's group 1, then b's groups shifted past a's
    assert both.lengths.tolist() == [1, 1, 3, 1]


class _Tok:
    pad_id = 0

    def render_for_completion(self, conv):
        return [conv["p"] + 1]

    def decode(self, ids):
        return str(ids)


class _Engine:
    """Sample j of every group completes with token j + 1, then the stop token 99; records the group seeds of
    each call."""

    tokenizer = _Tok()

    def __init__(self):
        self.seeds = []

    def generate(self, prompts, n, params, seeds):
        self.seeds.append(seeds)
        return rollout_batch(prompts, [[j + 1, 99] for _ in prompts for j in range(n)], n)


class _Task:
    """Problems 0..9; reward 1 for sample 0 of an even problem: odd problems are zero-variance groups."""

    def train_problem(self, r: random.Random) -> int:
        return r.randint(0, 9)

    def prompt(self, p: int) -> dict:
        return {"p": p, "messages": [{"role": "user", "content": str(p)}]}

    def reward(self, conv: dict, text: str) -> float:
        return float(conv["p"] % 2 == 0 and text == "[1]")  # the text comes without its stop token

    def columns(self, conv: dict) -> dict:
        return {"answer": str(conv["p"])}


def scorer(task, weights=None) -> Scorer:
    return Scorer(task, weights or {}, timeout_s=5.0, fallback=0.0, max_failure_rate=1.0)


def test_dynamic_sampling_keeps_only_groups_with_signal():
    engine = _Engine()
    ro = collect(engine, _Task(), scorer(_Task()), random.Random(1), prompts=4, group_size=3, sampling=None, seed=100,
                 step=7, dynamic=True, max_rounds=10)
    assert len(ro.convs) == 4 and all(c["p"] % 2 == 0 for c in ro.convs)
    assert ro.rewards.tolist() == [1, 0, 0] * 4
    assert ro.batch.group_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert ro.rounds == len(engine.seeds) > 1
    assert engine.seeds == [[group_seed(100, 7, i, r) for i in range(4)] for r in range(ro.rounds)]
    assert ro.drawn == ro.rounds * 4 * 3
    assert len(ro.first_rewards) == 12 and ro.first_rewards.sum() < 4  # round 1 as drawn, odd problems too
    assert 0 < ro.frac_zero_std < 1


def test_without_dynamic_sampling_one_round_keeps_everything():
    ro = collect(_Engine(), _Task(), scorer(_Task()), random.Random(0), prompts=4, group_size=3, sampling=None, seed=0,
                 step=0)
    assert ro.rounds == 1 and len(ro.convs) == 4 and len(ro.rewards) == 12


def test_dynamic_sampling_gives_up_after_max_rounds():
    class Never(_Task):
        def reward(self, conv, text):
            return 0.0

    ro = collect(_Engine(), Never(), scorer(Never()), random.Random(0), prompts=2, group_size=2, sampling=None, seed=0,
                 step=0, dynamic=True, max_rounds=3)
    assert ro.rounds == 3 and len(ro.rewards) == 0 and ro.frac_zero_std == 1.0


def test_scorer_combines_the_task_reward_with_trl_style_functions():
    def shorter(prompts, completions, lengths, answer, group_ids, **_):  # TRL signature, our columns
        assert prompts == ["4", "4", "3", "3"] and answer == ["4", "4", "3", "3"] and group_ids == [0, 0, 1, 1]
        return [None if a == "3" else -0.5 * n for a, n in zip(answer, lengths, strict=True)]

    def broken(prompts, completions, **_):
        raise RuntimeError("boom")

    task = _Task()
    convs = [task.prompt(4), task.prompt(4), task.prompt(3), task.prompt(3)]
    batch = rollout_batch([[5], [4]], [[1, 99], [2, 99], [1, 99], [2, 99]], 2)
    s = scorer(task, {"task": 2.0, shorter: 1.0, broken: 1.0})
    scores = s(convs, ["[1]", "[2]", "[1]", "[2]"], batch)
    rewards, metrics, breakdown = scores.totals, scores.metrics, scores.rows()
    assert rewards.tolist() == [2.0 - 1.0, -1.0, 0.0, 0.0]  # None: not applicable; broken: fallback 0
    assert breakdown[0] == {"task": 1.0, "shorter": -1.0, "broken": 0.0}
    assert breakdown[2] == {"task": 0.0, "shorter": None, "broken": 0.0}
    assert metrics["rewards/task/mean"] == 0.25 and metrics["rewards/shorter/mean"] == -1.0
    assert metrics["rewards/broken/failures"] == 4 and "boom" in s.rewards.first_errors["broken"]


def test_kl_shaped_rewards_by_hand():
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0]])
    kl_tok = torch.tensor([[0.5, 1.0, 0], [2.0, 0, 0]])
    seq, tok = kl_shaped_rewards(torch.tensor([1.0, 0.0]), kl_tok, mask, beta=0.1)
    assert torch.allclose(seq, torch.tensor([1 - 0.15, -0.2]))
    assert torch.allclose(tok, torch.tensor([[-0.05, 1 - 0.1, 0], [-0.2, 0, 0]]))
    seq0, tok0 = kl_shaped_rewards(torch.tensor([1.0, 0.0]), kl_tok, mask, beta=0.0)
    assert seq0.tolist() == [1, 0] and tok0.tolist() == [[0, 1, 0], [0, 0, 0]]


def test_sequence_level_advantages_broadcast_over_the_mask():
    config = RLConfig(algorithm="dr_grpo")
    mask = torch.tensor([[1.0, 1, 0], [0, 1, 1], [1, 0, 0], [1, 1, 1]])
    adv, returns = estimate_advantages(config, torch.tensor([1.0, 0, 2, 2]), None, torch.tensor([0, 0, 1, 1]),
                                       mask, None)
    assert returns is None
    assert adv.tolist() == [[0.5, 0.5, 0], [0, -0.5, -0.5], [0, 0, 0], [0, 0, 0]]


def test_gae_estimator_returns_returns_for_the_critic():
    config = RLConfig(algorithm="ppo", lam=1.0)
    mask = torch.tensor([[1.0, 1.0]])
    adv, returns = estimate_advantages(config, None, torch.tensor([[0.0, 1.0]]), None, mask,
                                       torch.tensor([[0.25, 0.5]]))
    assert torch.allclose(returns, torch.tensor([[1.0, 1.0]]))  # reward-to-go with γ = λ = 1
    assert adv.shape == (1, 2)


def test_minibatch_rows_are_permutations_split_evenly():
    chunks = list(minibatch_rows(10, epochs=2, minibatches=3, gen=torch.Generator().manual_seed(0)))
    assert [len(c) for c in chunks] == [4, 3, 3, 4, 3, 3]
    assert sorted(torch.cat(chunks[:3]).tolist()) == list(range(10))
    assert sorted(torch.cat(chunks[3:]).tolist()) == list(range(10))


def _tiny_setup(agg: str, max_tokens: int = 1):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, max_seq_len=16))
    inputs = torch.randint(1, 11, (4, 6))
    targets = torch.randint(1, 11, (4, 6))
    mask = torch.tensor([[0.0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0]])
    adv = torch.tensor([0.7, 0.0, -1.2, 0.0])[:, None] * mask  # rows 1 and 3 carry no signal
    data = TrainBatch(inputs, torch.where(mask > 0, targets, -1), mask, torch.tensor([6, 6, 3, 5]), advantages=adv)
    engine = ModelEngine(model, RLConfig().optim, torch.device("cpu"), "fp32", max_tokens_per_micro_batch=max_tokens)
    return engine, data, PolicyObjective(PolicyLoss(agg=agg, max_len=6))


def _grads(engine: ModelEngine) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in engine.module.parameters() if p.grad is not None])


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_skipping_zero_advantage_rows_leaves_the_gradient_exact(agg):
    grads = []
    for live in (torch.ones(4, dtype=torch.bool), torch.tensor([True, False, True, False])):
        engine, data, objective = _tiny_setup(agg)
        rows = torch.arange(4)
        engine.forward_backward(data, rows[live], objective.share(data.mask), objective)  # the grads, no step
        grads.append(_grads(engine))
    assert torch.allclose(grads[0], grads[1], atol=1e-7)


def test_micro_batches_give_the_full_batch_gradient():
    grads = []
    for max_tokens in (1, 20):  # a micro-batch per row; all 20 tokens in one
        engine, data, objective = _tiny_setup("token-mean", max_tokens)
        stats = engine.forward_backward(data, torch.arange(4), objective.share(data.mask), objective)
        grads.append(_grads(engine))
        assert float(stats["ratio_mean"]) == pytest.approx(1.0)  # on-policy: ρ = 1
    assert torch.allclose(grads[0], grads[1], atol=1e-7)


def test_policy_update_applies_one_step_and_counts_the_version():
    engine, data, objective = _tiny_setup("token-mean")
    before = [p.detach().clone() for p in engine.module.parameters()]
    stats = policy_update(engine, objective, data, torch.arange(4), torch.tensor([True, False, True, False]))
    assert engine.version == 1 and stats["grad_norm"] > 0 and stats["ratio_mean"] == pytest.approx(1.0)
    assert any(not p.equal(b) for p, b in zip(engine.module.parameters(), before, strict=True))
    assert all(p.grad is None for p in engine.module.parameters())  # cleared for the next step
    refused = policy_update(engine, objective, data, torch.arange(4), torch.ones(4, dtype=torch.bool),
                            gate=lambda loss, grad_norm, entropy: False)
    assert engine.version == 1 and refused["grad_norm"] > 0  # the health gate said no: nothing applied
