"""Specs for the padding-free RL micro-batches: rows grouped by a token budget, packed inside each group,
and the packed path computing the padded path's scores, losses and gradients (built-in GPT and an HF
Llama, every loss aggregation, the critic too)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from posttrain.config import OptimConfig
from posttrain.models.gpt import GPT
from posttrain.models.heads import ValueModel
from posttrain.trainers.model_engine import ModelEngine
from posttrain.trainers.objectives import PolicyLoss, PolicyObjective, ValueLoss, ValueObjective
from posttrain.trainers.packing import Packing, group_by_tokens
from posttrain.trainers.train_batch import TrainBatch

AGGREGATIONS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
WIDTHS = [37, 4, 22, 9, 40, 3, 15, 28, 6, 11]  # real tokens of each row: very different lengths
BUDGET = 100  # → micro-batches [0..3] (72 tokens), [4..8] (92), [9] (11)


def test_rows_are_grouped_in_order_by_their_tokens():
    assert group_by_tokens([5, 3, 9, 2], 10) == [[0, 1], [2], [3]]
    assert group_by_tokens([5, 3, 9, 2], 100) == [[0, 1, 2, 3]]
    assert group_by_tokens([5, 3, 9, 2], 1) == [[0], [1], [2], [3]]  # a row over the budget is alone
    assert group_by_tokens([12, 3], 10) == [[0], [1]]
    assert group_by_tokens(WIDTHS, BUDGET) == [[0, 1, 2, 3], [4, 5, 6, 7, 8], [9]]
    # padded rows cost rows × the widest: [2, 5] costs 10, [2, 5, 1] would cost 15
    assert group_by_tokens([2, 5, 1, 1], 10) == [[0, 1, 2, 3]]
    assert group_by_tokens([2, 5, 1, 1], 10, padded=True) == [[0, 1], [2, 3]]


@pytest.mark.parametrize("padded", [False, True])
def test_a_micro_batch_never_holds_more_than_the_budget(padded):
    rng = random.Random(0)
    for _ in range(300):
        widths = [rng.randint(1, 60) for _ in range(rng.randint(1, 30))]
        budget = rng.randint(1, 200)
        groups = group_by_tokens(widths, budget, padded)
        assert [i for g in groups for i in g] == list(range(len(widths)))  # every row once, in order
        for g in groups:
            tokens = len(g) * max(widths[i] for i in g) if padded else sum(widths[i] for i in g)
            assert tokens <= budget or len(g) == 1
        # packing the group adds bins, never tokens: its bins hold exactly the group's real tokens
        for g in groups:
            packing = Packing.of([widths[i] for i in g], max(widths[i] for i in g), torch.device("cpu"))
            assert int((packing.doc_ids >= 0).sum()) == sum(widths[i] for i in g)


def test_rows_pack_first_fit_decreasing_into_bins_of_the_longest_row():
    packing = Packing.of([3, 5, 2, 4], 5, torch.device("cpu"))
    assert packing.doc_ids.tolist() == [[1, 1, 1, 1, 1], [3, 3, 3, 3, -1], [0, 0, 0, 2, 2]]
    rows = torch.arange(1, 21).view(4, 5)  # (r, w); row b's real tokens are its first widths[b]
    packed = packing.pack(rows, 0)
    assert packed.tolist() == [[6, 7, 8, 9, 10], [16, 17, 18, 19, 0], [1, 2, 3, 11, 12]]
    assert packing.unpack(packed).tolist() == [[1, 2, 3, 0, 0], [6, 7, 8, 9, 10], [11, 12, 0, 0, 0],
                                               [16, 17, 18, 19, 0]]


def rollout_rows(vocab: int, widths: list[int], seed: int = 0) -> TrainBatch:
    """Rows of the given real widths, right-padded: a prompt then a completion whose tokens are targets
    (a few forced ones masked out), random advantages, the critic's old values and returns."""
    gen = torch.Generator().manual_seed(seed)
    B, L = len(widths), max(widths) + 3  # wider than every row: padding past the widest too
    inputs = torch.randint(1, vocab, (B, L), generator=gen)
    targets = torch.full((B, L), -1)
    mask = torch.zeros(B, L)
    for b, w in enumerate(widths):
        start = max(1, w // 3)  # the prompt's last position predicts the first completion token
        targets[b, start - 1 : w] = torch.randint(1, vocab, (w - start + 1,), generator=gen)
        mask[b, start - 1 : w] = (torch.rand(w - start + 1, generator=gen) > 0.1).float()
    targets = torch.where(mask > 0, targets, -1)
    advantages = torch.randn(B, 1, generator=gen) * mask
    return TrainBatch(inputs, targets, mask, torch.tensor(widths), advantages=advantages,
                      values=torch.randn(B, L, generator=gen), returns=torch.randn(B, L, generator=gen))


def near_the_policy(data: TrainBatch, engine: ModelEngine, objective: PolicyObjective) -> TrainBatch:
    """Old log-probs near the policy's own (ratios ≠ 1, some clipped) and reference log-probs below them
    (a KL term), as a step with several updates and a reference model has them."""
    logp = engine.score(data, objective)  # (B, L)
    noise = 0.3 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(1))
    data.old_logp, data.ref_logp = (logp + noise) * data.mask, (logp - noise.abs()) * data.mask
    return data


def engines(module, budget: int = BUDGET) -> tuple[ModelEngine, ModelEngine]:
    optim = OptimConfig(lr=1e-3)
    padded = ModelEngine(module, optim, torch.device("cpu"), "fp32", max_tokens_per_micro_batch=budget, packing=False)
    packed = ModelEngine(module, optim, torch.device("cpu"), "fp32", max_tokens_per_micro_batch=budget)
    assert packed.packing and not padded.packing
    return padded, packed


def loss_and_grads(engine: ModelEngine, data: TrainBatch, objective) -> tuple[dict, torch.Tensor]:
    engine.module.train()
    sums = engine.forward_backward(data, torch.arange(len(data.mask)), objective.share(data.mask), objective)
    grads = torch.cat([p.grad.flatten() for p in engine.module.parameters() if p.grad is not None])
    engine.zero_grad()
    return sums, grads


def assert_same_update(module, data: TrainBatch, objective) -> None:
    padded, packed = engines(module)
    if isinstance(objective, PolicyObjective):
        data = near_the_policy(data, padded, objective)
    (sums_a, grads_a), (sums_b, grads_b) = (loss_and_grads(e, data, objective) for e in (padded, packed))
    assert sums_a.keys() == sums_b.keys()
    # the statistics are token means weighted by each micro-batch's share of the normaliser: exact for
    # token-mean, by rows otherwise (so they follow the micro-batches, which the two paths cut differently)
    for k in [k for k in sums_a if objective.config.agg == "token-mean" or k in ("loss", "policy_loss")]:
        torch.testing.assert_close(sums_b[k], sums_a[k], atol=1e-5, rtol=1e-5, msg=k)
    assert grads_a.abs().max() > 1e-3  # a real gradient, on every parameter tensor
    torch.testing.assert_close(grads_b, grads_a, atol=1e-5, rtol=1e-5)
    assert packed.tokens_real == padded.tokens_real == sum(WIDTHS)
    assert packed.tokens_run < padded.tokens_run  # the padding the packed path did not run


def policy_objective(agg: str) -> PolicyObjective:
    return PolicyObjective(PolicyLoss(agg=agg, max_len=48, clip_low=0.2, clip_high=0.28, kl_coef=0.1,
                                      entropy_coef=0.01, temperature=0.8))


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_packed_policy_update_equals_the_padded_one_gpt(make_gpt, agg):
    model = make_gpt()
    assert_same_update(model, rollout_rows(model.config.vocab_size, WIDTHS), policy_objective(agg))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_packed_critic_update_equals_the_padded_one_gpt(make_gpt, agg):
    critic = ValueModel.from_policy(make_gpt())
    with torch.no_grad():
        critic.head.weight.normal_(0, 0.3)  # not the zero-initialised head: values depend on the trunk
    assert_same_update(critic, rollout_rows(critic.trunk.config.vocab_size, WIDTHS),
                       ValueObjective(ValueLoss(agg, max_len=48)))


def assert_same_scores(module, data: TrainBatch, objective) -> None:
    padded, packed = engines(module)
    a, b = padded.score(data, objective), packed.score(data, objective)
    assert a.abs().max() > 1e-3
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_packed_scores_equal_the_padded_ones_gpt(make_gpt):
    model = make_gpt()
    data = rollout_rows(model.config.vocab_size, WIDTHS)
    assert_same_scores(model, data, PolicyObjective(PolicyLoss(temperature=0.8)))
    critic = ValueModel.from_policy(model)
    with torch.no_grad():
        critic.head.weight.normal_(0, 0.3)
    assert_same_scores(critic, data, ValueObjective(ValueLoss()))


def assert_rows_share_sequences(model, vocab: int) -> None:
    """The equalities have teeth: rows packed into one sequence without their doc_ids see each other."""
    packing = Packing.of(WIDTHS[:4], max(WIDTHS[:4]), torch.device("cpu"))
    assert packing.doc_ids.shape[0] == 2  # four rows in two sequences
    data = rollout_rows(vocab, WIDTHS[:4])
    idx, targets = packing.pack(data.inputs[:, :37], 0), packing.pack(data.targets[:, :37], -1)
    with torch.no_grad():
        apart = model.logprobs(idx, targets, doc_ids=packing.doc_ids)[0]
        leaky = model.logprobs(idx, targets)[0]
    assert (apart - leaky).abs().max() > 1e-2


def test_the_packed_rows_really_share_sequences_gpt(make_gpt):
    model = make_gpt()
    assert_rows_share_sequences(model, model.config.vocab_size)


class Unpackable(GPT):
    """A GPT that says it cannot keep packed rows apart, and fails if it is given packed rows."""

    def packing_problem(self):
        return "this test model cannot pack"

    def hidden_states(self, idx, cache=None, pad_mask=None, doc_ids=None):
        assert doc_ids is None, "a model that cannot pack got packed rows"
        return super().hidden_states(idx, cache, pad_mask)


def test_a_model_that_cannot_pack_runs_padded_with_the_same_scores(make_gpt):
    model = make_gpt()
    unpackable = Unpackable(model.config)
    unpackable.load_state_dict(model.state_dict())
    engine = ModelEngine(unpackable, None, torch.device("cpu"), "fp32", max_tokens_per_micro_batch=BUDGET)
    assert not engine.packing and engine.packing_problem == "this test model cannot pack"
    data = rollout_rows(model.config.vocab_size, WIDTHS)
    objective = PolicyObjective(PolicyLoss())
    torch.testing.assert_close(engine.score(data, objective), engines(model)[1].score(data, objective),
                               atol=1e-5, rtol=1e-5)
    assert not ModelEngine(torch.nn.Linear(2, 2), None, torch.device("cpu"), "fp32").packing  # says nothing: padded


# --- a tiny HF Llama -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    pytest.importorskip("transformers")
    from posttrain.models.hf import load_hf
    from posttrain.models.tiny_llama import make_tiny_llama
    from posttrain.tasks.arithmetic import ArithmeticTask

    texts = ArithmeticTask(test_size=8).corpus(random.Random(0), n=100)
    policy, _ = load_hf(str(make_tiny_llama(tmp_path_factory.mktemp("llama"), texts, vocab_size=300)))
    torch.manual_seed(0)
    with torch.no_grad():  # dense random weights (not the 0.02-std init), so a leak between rows shows
        for name, p in policy.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "embed" in name else 1.0 / math.sqrt(p.shape[1]))
    assert policy.packing_problem() is None  # sdpa keeps packed rows apart
    return policy


def test_the_packed_rows_really_share_sequences_hf(llama):
    assert_rows_share_sequences(llama, llama.hf.config.vocab_size)


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_packed_policy_update_equals_the_padded_one_hf(llama, agg):
    assert_same_update(llama, rollout_rows(llama.hf.config.vocab_size, WIDTHS), policy_objective(agg))


def test_packed_scores_and_critic_update_equal_the_padded_ones_hf(llama):
    data = rollout_rows(llama.hf.config.vocab_size, WIDTHS)
    assert_same_scores(llama, data, PolicyObjective(PolicyLoss(temperature=0.8)))
    critic = ValueModel.from_policy(llama)
    with torch.no_grad():
        critic.head.weight.normal_(0, 0.3)
    assert_same_scores(critic, data, ValueObjective(ValueLoss()))
    assert_same_update(critic, data, ValueObjective(ValueLoss("seq-mean-token-mean", max_len=48)))


def test_hf_attention_that_cannot_pack_runs_padded(llama):
    implementation = llama.hf.config._attn_implementation
    llama.hf.config._attn_implementation = "flash_attention_2"  # only the config: nothing runs with it here
    try:
        engine = ModelEngine(llama, None, torch.device("cpu"), "fp32")
        critic = ModelEngine(ValueModel(llama, llama.hidden_size), None, torch.device("cpu"), "fp32")
    finally:
        llama.hf.config._attn_implementation = implementation
    for e in (engine, critic):
        assert not e.packing and "'flash_attention_2' does not keep packed examples apart" in e.packing_problem
