"""Specs for preference learning's parts: the reward head, pair batches, the DPO step, the demo's pairs,
the reward model as an RL reward, and their configs."""

from __future__ import annotations

import random

import pytest
import torch

from posttrain.config import ConfigError, RLConfig, load_config
from posttrain.models.heads import RewardModel
from posttrain.preference_config import DPOConfig, RMConfig
from posttrain.tasks.arithmetic import ArithmeticTask, extract_answer, preference_pair, solution_parts
from posttrain.tasks.preference import PreferencePair
from posttrain.trainers.dpo import dpo_step, precompute_reference
from posttrain.trainers.model_engine import ModelEngine
from posttrain.trainers.pairs import batches, encode_pairs, pair_batch, sequence_logps
from posttrain.trainers.reward_model import RewardScorer, bt_step, pair_metrics


def scored(model: RewardModel, rows: list[list[int]], pad_id: int, left: bool) -> torch.Tensor:
    """Scores of ``rows`` padded to one width on the left or the right."""
    width = max(map(len, rows)) + 2  # every row gets padding
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row), True
    return model(ids, mask)


def random_head(model: RewardModel) -> RewardModel:
    torch.manual_seed(1)
    torch.nn.init.normal_(model.head.weight)
    return model.eval()


def test_reward_head_reads_last_real_token_under_left_and_right_padding(gpt, tok):
    model = random_head(RewardModel.from_policy(gpt))
    rows = [tok.encode("Ann has 3 apples"), tok.encode("Ben sells 12 pens to Cara and"), tok.encode("7")]
    with torch.no_grad():
        alone = torch.cat([model(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.bool)) for r in rows])
        right, left = scored(model, rows, tok.pad_id, left=False), scored(model, rows, tok.pad_id, left=True)
        # the score is the head applied to the last real token's hidden state
        h = gpt.hidden_states(torch.tensor([rows[1]]))[0, -1]
        by_hand = model.head(h).item()
    torch.testing.assert_close(right, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left, alone, rtol=1e-5, atol=1e-5)
    assert alone[1].item() == pytest.approx(by_hand, abs=1e-5)
    assert len(set(alone.tolist())) == 3  # the rows really differ


def test_padded_hidden_states_match_the_row_alone(gpt, tok):
    row = tok.encode("Eve buys 4 packs of 6 cards")
    ids = torch.tensor([[tok.pad_id] * 3 + row])
    mask = torch.tensor([[False] * 3 + [True] * len(row)])
    with torch.no_grad():
        torch.testing.assert_close(gpt.hidden_states(ids, pad_mask=mask)[0, 3:],
                                   gpt.hidden_states(torch.tensor([row]))[0], rtol=1e-5, atol=1e-5)


def test_a_row_without_real_tokens_is_an_error(gpt):
    with pytest.raises(ValueError, match="no real token"):
        RewardModel.from_policy(gpt)(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.bool))


def text_pair(chosen: str, rejected: str, margin: float = 0.0) -> PreferencePair:
    return PreferencePair([{"role": "user", "content": "Ann has 3 apples"}], chosen, rejected, margin)


def test_pair_batch_puts_chosen_rows_first_and_targets_only_on_the_reply(tok):
    pairs, skipped = encode_pairs(tok, [text_pair(" 5", " 6 7", 1.5), text_pair(" 8", " 9")], max_length=0)
    assert skipped == 0
    batch = pair_batch(pairs, tok.pad_id)
    assert batch.ids.shape[0] == 4 and batch.margins.tolist() == [1.5, 0.0]
    assert batch.ids[0, : len(pairs[0].chosen)].tolist() == pairs[0].chosen
    assert batch.ids[2, : len(pairs[0].rejected)].tolist() == pairs[0].rejected
    # reply tokens (' 6', ' 7', <|assistant_end|>) are the only targets of the first rejected row
    assert [t for t in batch.targets[2].tolist() if t >= 0] == [*tok.encode(" 6 7"), tok.assistant_end_id]
    assert batch.pad_mask.sum(1).tolist() == [len(p.chosen) for p in pairs] + [len(p.rejected) for p in pairs]


def test_long_pairs_are_left_out_and_counted(tok):
    pairs, skipped = encode_pairs(tok, [text_pair(" 5", " 6"), text_pair(" 5", " 6" * 40)], max_length=20)
    assert (len(pairs), skipped) == (1, 1)


def test_batches_are_seeded_epochs_that_follow_from_the_step():
    first_epoch = batches(10, 5, 0, seed=3) + batches(10, 5, 1, seed=3)
    assert sorted(first_epoch) == list(range(10))  # an epoch visits every pair once
    assert batches(10, 4, 2, seed=3) == first_epoch[8:] + batches(10, 2, 5, seed=3)  # crosses into epoch 2
    assert batches(10, 5, 1, seed=3) == batches(10, 5, 1, seed=3) != batches(10, 5, 1, seed=4)


def test_demo_pairs_prefer_the_right_concise_solution():
    task, r = ArithmeticTask(test_size=4), random.Random(0)
    kinds = set()
    for _ in range(40):
        problem = task.train_problem(r)
        pair = preference_pair(problem, r, ramble_share=0.5)
        kinds.add(pair.meta["rejected"])
        calls = lambda parts: [p["text"] for p in parts if p["type"] == "tool_call"]  # noqa: E731
        assert pair.chosen == solution_parts(problem)
        assert extract_answer(pair.chosen[-1]["text"]) == problem.answer
        if pair.meta["rejected"] == "ramble":  # right answer, a step done again
            assert extract_answer(pair.rejected[-1]["text"]) == problem.answer
            assert len(calls(pair.rejected)) > len(calls(pair.chosen)) == len(problem.steps)
        else:  # a slip: the answer is wrong
            assert extract_answer(pair.rejected[-1]["text"]) != problem.answer
    assert kinds == {"ramble", "slip"}
    text = preference_pair(task.train_problem(r), r, 0.5, fmt="hash")
    assert isinstance(text.chosen, str) and text.chosen.endswith(f"#### {text.meta['answer']}")


def sgd(model, lr: float):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)


def engine(model, optimizer) -> ModelEngine:
    """``model`` in a CPU fp32 model engine stepping ``optimizer`` (no gradient clipping)."""
    out = ModelEngine(model, None, torch.device("cpu"), "fp32")
    out.optimizer = optimizer
    return out


def test_dpo_step_raises_chosen_and_lowers_rejected(make_gpt, tok):
    policy = make_gpt(seed=2).train()
    reference = policy.reference()
    pairs, _ = encode_pairs(tok, [text_pair(" 5 apples", " 9 pens"), text_pair(" 3", " 4 4 4")], 0)
    config = load_config(DPOConfig, None, ["beta=0.5", "optim.grad_clip=0"])
    before = sequence_logps(policy, pair_batch(pairs, tok.pad_id)).detach()
    stats = dpo_step(engine(policy, sgd(policy, 0.05)), pairs, [0, 1], tok.pad_id, engine(reference, None), None,
                     config, lambda loss, norm: True)
    after = sequence_logps(policy, pair_batch(pairs, tok.pad_id)).detach()
    assert (after[:2] > before[:2]).all() and (after[2:] < before[2:]).all()
    assert stats["rewards/chosen"] == 0 and stats["rewards/margins"] == 0  # measured before the step: π = π_ref
    assert stats["loss"] == pytest.approx(0.6931, abs=1e-4)  # −log σ(0)
    # a precomputed reference gives the same step
    table = precompute_reference(engine(reference, None), engine(reference, None), pairs, tok.pad_id, size=1)
    torch.testing.assert_close(table, torch.stack([before[:2], before[2:]], 1), rtol=1e-5, atol=1e-4)


def test_bt_step_separates_chosen_from_rejected(make_gpt, tok):
    model = RewardModel.from_policy(make_gpt(seed=3)).train()
    pairs, _ = encode_pairs(tok, [text_pair(" 5 apples", " 9 pens"), text_pair(" 3", " 4 4 4")], 0)
    config = load_config(RMConfig, None, ["micro_batch=1", "optim.grad_clip=0"])
    rm = engine(model, sgd(model, 0.5))
    first = bt_step(rm, pairs, config, tok.pad_id, lambda loss, norm: True)
    assert first["loss"] == pytest.approx(0.6931, abs=1e-4) and first["accuracy"] == 0.5  # head starts at 0: ties
    for _ in range(5):
        last = bt_step(rm, pairs, config, tok.pad_id, lambda loss, norm: True)
    assert last["accuracy"] == 1.0 and last["margin"] > 0 and last["loss"] < first["loss"]


def test_pair_metrics_by_hand():
    m = pair_metrics(torch.tensor([2.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 1.0]))
    assert m["accuracy"] == pytest.approx(0.5)  # one win, one tie (½), one loss
    assert m["margin"] == pytest.approx(0.0) and m["rewards/chosen/mean"] == pytest.approx(1.0)
    assert m["rewards/chosen/std"] == pytest.approx(1.0) and m["rewards/rejected/std"] == 0.0


def test_reward_scorer_clamps_and_renders_the_prompt(gpt, tok):
    model = random_head(RewardModel.from_policy(gpt))
    with torch.no_grad():
        model.head.bias.fill_(100.0)
    scorer = RewardScorer(model, tok, batch_size=2, clamp=(-1.0, 3.0))
    assert scorer(["Ann has 3 apples"] * 3, [" 5", " 6", " 7 8"]) == [3.0, 3.0, 3.0]
    with torch.no_grad():
        model.head.bias.fill_(0.0)
    convs = [{"messages": [{"role": "user", "content": "Ann has 3 apples"}]}]
    by_conv = scorer.score(convs, [" 5"])
    ids, _ = tok.render_conversation(text_pair(" 5", " 6").conversation("chosen"))
    expected = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool)).clamp(-1, 3)
    torch.testing.assert_close(by_conv, expected)
    assert scorer.score(["Ann has 3 apples"], [" 5"]).item() == pytest.approx(by_conv.item())
    assert scorer.__name__ == "reward_model"


def test_rl_config_uses_the_reward_model_when_one_is_given():
    assert load_config(RLConfig, None, ["reward_model.path=runs/rm"]).rewards == {"reward_model": 1.0}
    mixed = load_config(RLConfig, None, ["reward_model.path=runs/rm", "rewards={task: 1.0, reward_model: 0.5}"])
    assert mixed.rewards == {"task": 1.0, "reward_model": 0.5}
    with pytest.raises(ConfigError, match="reward_model.path"):
        load_config(RLConfig, None, ["rewards={reward_model: 1.0}"])
    with pytest.raises(ConfigError, match="reward_model.clamp"):
        load_config(RLConfig, None, ["reward_model.clamp=[1, -1]"])


@pytest.mark.parametrize(("override", "message"), [
    ("loss=sigmod", "did you mean 'sigmoid'"),
    ("label_smoothing=0.5", "label_smoothing"),
    ("beta=0", "beta"),
    ("data.sorce=x", "did you mean 'source'"),
])
def test_dpo_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DPOConfig, None, [override])


def test_a_reward_model_set_but_not_used_is_an_error():
    with pytest.raises(ConfigError, match=r"^config key 'reward_model.path' is set but 'rewards' \({'task': 1.0}\) "
                                          r"does not use it: add reward_model: <weight> to rewards"):
        load_config(RLConfig, None, ["reward_model.path=runs/rm", "rewards={task: 1.0}"])


def test_a_policy_checkpoint_is_not_a_reward_model(tmp_path):
    from posttrain.trainers.reward_model import load_reward_model

    with pytest.raises(ConfigError, match=rf"^{tmp_path} is not a reward model: neither a posttrain checkpoint \(no "
                                          "reward_head"):
        load_reward_model(tmp_path)


def write_pairs(path, rows: list[str]) -> str:
    path.write_text("".join(row + "\n" for row in rows))
    return str(path)


def pairs_config(source: str, *extra: str) -> RMConfig:
    return load_config(RMConfig, None, [f"data.source={source}", *extra])


def test_bad_preference_data_is_a_one_line_config_error_naming_file_and_line(tmp_path, gpt, tok):
    from posttrain.trainers.pairs import prepare_pairs

    good = '{"prompt": "Ann has 3 apples", "chosen": " 5", "rejected": " 6"}'
    small = write_pairs(tmp_path / "small.jsonl", [good, good])
    with pytest.raises(ConfigError, match=r"^data.source: .*small.jsonl has 2 pairs and test_size=256 holds out the "
                                          r"first 256: none would be left to train on \(lower data.test_size\)$"):
        prepare_pairs(pairs_config(small), tok, gpt, print)
    bad = write_pairs(tmp_path / "bad.jsonl", [good, '{"prompt": "q", "chosen": " 5"}'])
    with pytest.raises(ConfigError, match=r"^data.source: .*bad.jsonl:2: "):
        prepare_pairs(pairs_config(bad, "data.test_size=0"), tok, gpt, print)
    notices: list[str] = []
    with pytest.raises(ConfigError, match=r"^no training pairs in '.*small.jsonl' fit in data.max_length=3 tokens$"):
        prepare_pairs(pairs_config(small, "data.test_size=1", "data.max_length=3"), tok, gpt, notices.append)
    assert notices == ["[yellow]left out 1 training and 1 held-out pairs longer than 3 tokens (data.max_length)"]
    train, test = prepare_pairs(pairs_config(small, "data.test_size=1"), tok, gpt, notices.append)
    assert (len(train), len(test)) == (1, 1)
