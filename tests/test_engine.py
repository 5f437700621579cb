"""Specs for the rollout engine: seeding, groups, stops, compaction, tool calls, sampling rules."""

from __future__ import annotations

import pytest
import torch

from posttrain.engine import Engine, RolloutBatch, SamplingParams
from posttrain.random_streams import group_seed
from posttrain.tools import calculate, default_registry

RANDOM = SamplingParams(temperature=1.0, top_k=None, max_new_tokens=8)
GREEDY = SamplingParams(temperature=0.0, top_k=None, max_new_tokens=8)


# --- a scripted model ----------------------------------------------------------------------------


class _ScriptCache:
    """Stands in for a KV cache: remembers which script each cache row follows."""

    def __init__(self, batch: int):
        self.scripts: list[list[int]] | None = None
        self.batch = batch

    def select(self, rows: torch.Tensor) -> None:
        self.scripts = [self.scripts[int(r)] for r in rows]
        self.batch = len(self.scripts)


class ScriptedModel:
    """A model that makes greedy decoding emit ``scripts[prompt][k]`` at completion step ``k`` (its logit
    is ``margin``, every other one 0).

    Every row advances one step per call, so the step is the number of calls since the prefill.
    At steps where the engine must force a tool output, the script holds a filler token: the
    completion shows the forced tokens only if the engine overrode the model.
    """

    device = torch.device("cpu")

    def __init__(self, vocab_size: int, scripts: dict[tuple[int, ...], list[int]], margin: float = 5.0):
        self.vocab_size = vocab_size
        self.scripts = scripts
        self.margin = margin
        self.batch_sizes: list[int] = []  # rows in each call (prefill first)
        self.fed: list[list[int]] = []  # tokens fed at each decode call
        self.step = 0

    def new_cache(self, batch: int, max_len: int) -> _ScriptCache:
        return _ScriptCache(batch)

    def __call__(self, ids, cache=None, pad_mask=None):
        B, T = ids.shape
        self.batch_sizes.append(B)
        if pad_mask is not None:  # prefill: find each row's script from its (unpadded) prompt
            cache.scripts = [self.scripts[tuple(r[m].tolist())] for r, m in zip(ids, pad_mask, strict=True)]
            self.step = 0
        else:
            self.fed.append(ids[:, -1].tolist())
            self.step += 1
        logits = torch.zeros(B, T, self.vocab_size)
        for row, script in enumerate(cache.scripts):
            logits[row, -1, script[min(self.step, len(script) - 1)]] = self.margin
        return logits


def _scripted_engine(tok, scripts, tools=None, margin=5.0):
    model = ScriptedModel(tok.vocab_size, {tuple(p): s for p, s in scripts.items()}, margin)
    return model, Engine(model, tok, tools)


def _prompt(tok, text):
    return tuple(tok.encode(text))


def _greedy(max_new_tokens):
    return SamplingParams(temperature=0.0, top_k=None, max_new_tokens=max_new_tokens)


SHARP = 12.0  # a script margin under which _sharp sampling follows the script (1 − e⁻¹² per token)


def _sharp(max_new_tokens):
    """Sampling from the top 2 (the script's token and a 0 logit): a sampled token's log-prob is
    −log(1 + e⁻¹²) < 0, unlike greedy's point mass (0, as forced tokens)."""
    return SamplingParams(temperature=1.0, top_k=2, max_new_tokens=max_new_tokens)


# --- stops, truncation and compaction ------------------------------------------------------------


def test_row_that_samples_stop_token_stops_there(tok):
    p = _prompt(tok, "stop early")
    script = [*tok.encode(" hi"), tok.encode(" 7")[0], tok.assistant_end_id, *tok.encode(" junk" * 5)]
    _, engine = _scripted_engine(tok, {p: script})
    batch = engine.generate([list(p)], 1, _greedy(10), seed=0)
    stop_at = script.index(tok.assistant_end_id)
    assert batch.finished.tolist() == [True]
    assert batch.lengths.tolist() == [stop_at + 1]  # the stop token counts
    assert batch.completion_tokens(0) == script[: stop_at + 1]
    assert batch.completion_ids.shape == (1, stop_at + 1)


def test_max_new_tokens_truncates_unfinished_rows(tok):
    p = _prompt(tok, "never stop")
    script = tok.encode(" apples" * 20)
    _, engine = _scripted_engine(tok, {p: script})
    batch = engine.generate([list(p)], 2, _greedy(6), seed=0)
    assert batch.finished.tolist() == [False, False]
    assert batch.lengths.tolist() == [6, 6]
    assert batch.completion_ids.tolist() == [script[:6], script[:6]]
    assert batch.mask.tolist() == [[1.0] * 6] * 2


def test_finished_rows_leave_the_batch_and_rest_is_pad(tok):
    end = tok.assistant_end_id
    a, b, c = _prompt(tok, "a"), _prompt(tok, "b b"), _prompt(tok, "c c c")
    word = tok.encode(" pens")[0]
    scripts = {
        a: [word, word, end, word, word, word, word, word],  # stops at step 2
        b: [word] * 5 + [end, word, word],  # stops at step 5
        c: [word] * 8,  # runs out of budget
    }
    model, engine = _scripted_engine(tok, scripts, margin=SHARP)
    batch = engine.generate([list(a), list(b), list(c)], 1, _sharp(8), seed=0)
    # prefill 3 rows; decode calls after steps 0..6 (the last step needs no call)
    assert model.batch_sizes == [3, 3, 3, 2, 2, 2, 1, 1]
    assert batch.finished.tolist() == [True, True, False]
    assert batch.lengths.tolist() == [3, 6, 8]
    pad = tok.pad_id
    assert batch.completion_ids.tolist() == [
        [word, word, end] + [pad] * 5,
        [word] * 5 + [end] + [pad] * 2,
        [word] * 8,
    ]
    assert batch.mask.tolist() == [[1.0] * 3 + [0.0] * 5, [1.0] * 6 + [0.0] * 2, [1.0] * 8]
    assert (batch.logprobs[batch.mask == 0] == 0).all()
    assert (batch.logprobs[batch.mask == 1] < 0).all()


def test_all_rows_finishing_ends_generation_early(tok):
    p = _prompt(tok, "quick")
    model, engine = _scripted_engine(tok, {p: [tok.assistant_end_id] * 4})
    batch = engine.generate([list(p)], 3, _greedy(8), seed=0)
    assert model.batch_sizes == [1]  # prefill once for the group, no decode call at all
    assert batch.lengths.tolist() == [1, 1, 1]
    assert batch.completion_ids.tolist() == [[tok.assistant_end_id]] * 3


# --- tool calls ----------------------------------------------------------------------------------


def _tool_script(tok, expr, forced_len, tail):
    filler = tok.encode(" cups")[0]  # what the model would say where the engine must force
    call = [tok.tool_start_id, *tok.encode(expr), tok.tool_end_id]
    return call, [*call, *[filler] * forced_len, *tail, tok.assistant_end_id]


def test_tool_call_output_is_forced_with_mask_zero(tok):
    p = _prompt(tok, "What is 2+3?")
    forced = [tok.output_start_id, *tok.encode("5"), tok.output_end_id]
    tail = tok.encode(" #### 5")
    call, script = _tool_script(tok, "2+3", len(forced), tail)
    model, engine = _scripted_engine(tok, {p: script}, default_registry(), margin=SHARP)
    batch = engine.generate([list(p)], 1, _sharp(32), seed=0)
    expected = [*call, *forced, *tail, tok.assistant_end_id]
    assert batch.completion_tokens(0) == expected
    assert tok.decode(expected[len(call) :]) == "<|output_start|>5<|output_end|> #### 5<|assistant_end|>"
    mask = [1.0] * len(call) + [0.0] * len(forced) + [1.0] * (len(tail) + 1)
    assert batch.mask[0].tolist() == mask
    assert (batch.logprobs[0][batch.mask[0] == 0] == 0).all()
    assert (batch.logprobs[0][batch.mask[0] == 1] < 0).all()
    assert batch.tool_calls == 1 and batch.tool_failures == 0
    assert batch.finished.tolist() == [True]
    assert batch.lengths.tolist() == [len(expected)]  # forced tokens count in the length
    # the forced tokens were fed to the model, so it conditions on the tool's answer
    assert [f[0] for f in model.fed[len(call) : len(call) + len(forced)]] == forced


def test_malformed_tool_call_forces_error_string(tok):
    p = _prompt(tok, "What is 2 plus?")
    error = calculate("2+*")
    assert error.startswith("error: ")
    forced = [tok.output_start_id, *tok.encode(error), tok.output_end_id]
    call, script = _tool_script(tok, "2+*", len(forced), tok.encode(" #### 2"))
    _, engine = _scripted_engine(tok, {p: script}, default_registry())
    batch = engine.generate([list(p)], 1, _greedy(40), seed=0)
    got = batch.completion_tokens(0)
    assert got[len(call) : len(call) + len(forced)] == forced
    assert tok.decode(forced) == f"<|output_start|>{error}<|output_end|>"
    assert batch.tool_calls == 1 and batch.tool_failures == 1
    assert batch.finished.tolist() == [True]


def test_forced_tool_output_counts_against_the_budget(tok):
    p = _prompt(tok, "What is 12*12?")
    forced = [tok.output_start_id, *tok.encode("144"), tok.output_end_id]
    call, script = _tool_script(tok, "12*12", len(forced), tok.encode(" #### 144"))
    _, engine = _scripted_engine(tok, {p: script}, default_registry())
    budget = len(call) + 2  # the output is cut off after two forced tokens
    batch = engine.generate([list(p)], 1, _greedy(budget), seed=0)
    assert batch.completion_tokens(0) == [*call, *forced[:2]]
    assert batch.finished.tolist() == [False]
    assert batch.mask[0].tolist() == [1.0] * len(call) + [0.0, 0.0]


def test_without_tools_a_tool_call_is_just_tokens(tok):
    p = _prompt(tok, "no tools here")
    call, script = _tool_script(tok, "2+3", 3, [])
    _, engine = _scripted_engine(tok, {p: script}, tools=None)
    batch = engine.generate([list(p)], 1, _greedy(32), seed=0)
    assert batch.completion_tokens(0) == script
    assert batch.mask[0].tolist() == [1.0] * len(script)
    assert batch.tool_calls == 0


def test_stray_tool_end_is_not_a_call(tok):
    p = _prompt(tok, "stray")
    script = [*tok.encode("2+3"), tok.tool_end_id, tok.assistant_end_id]
    _, engine = _scripted_engine(tok, {p: script}, default_registry())
    batch = engine.generate([list(p)], 1, _greedy(16), seed=0)
    assert batch.completion_tokens(0) == script
    assert batch.tool_calls == 0


# --- sampling with a real model ------------------------------------------------------------------


def _prompts(tok):
    return [tok.encode("Ann has 3 pens."), tok.encode("How many apples does Ben have now?")]


def test_same_seed_gives_identical_samples(gpt, tok):
    engine = Engine(gpt, tok)
    a = engine.generate(_prompts(tok), 3, RANDOM, seed=7)
    b = engine.generate(_prompts(tok), 3, RANDOM, seed=7)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.logprobs, b.logprobs)
    assert torch.equal(a.lengths, b.lengths)


def test_different_seeds_give_different_samples(gpt, tok):
    engine = Engine(gpt, tok)
    a = engine.generate(_prompts(tok), 3, RANDOM, seed=7)
    b = engine.generate(_prompts(tok), 3, RANDOM, seed=8)
    assert not torch.equal(a.completion_ids, b.completion_ids)


def test_seed_gives_prompt_i_the_group_seed_of_seed_and_i(gpt, tok):
    engine = Engine(gpt, tok)
    a = engine.generate(_prompts(tok), 3, RANDOM, seed=7)
    b = engine.generate(_prompts(tok), 3, RANDOM, seeds=[group_seed(7, 0), group_seed(7, 1)])
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.logprobs, b.logprobs)


def test_a_groups_rows_are_a_function_of_its_seed(gpt, tok):
    """The same prompt twice in one batch: equal group seeds give equal groups, different ones not."""
    engine = Engine(gpt, tok)
    prompt = tok.encode("Ann has 3 pens.")
    same = engine.generate([prompt, prompt], 4, RANDOM, seeds=[1, 1])
    assert torch.equal(same.completion_ids[:4], same.completion_ids[4:])
    torch.testing.assert_close(same.logprobs[:4], same.logprobs[4:], atol=1e-5, rtol=0)  # rows of one batch may
    # sum in another order on several threads
    other = engine.generate([prompt, prompt], 4, RANDOM, seeds=[1, 2])
    assert torch.equal(other.completion_ids[:4], same.completion_ids[:4])
    assert not torch.equal(other.completion_ids[:4], other.completion_ids[4:])


def test_generate_needs_one_seed_per_prompt(gpt, tok):
    engine = Engine(gpt, tok)
    with pytest.raises(ValueError, match="exactly one of seed and seeds"):
        engine.generate(_prompts(tok), 1, RANDOM)
    with pytest.raises(ValueError, match="exactly one of seed and seeds"):
        engine.generate(_prompts(tok), 1, RANDOM, seed=0, seeds=[1, 2])
    with pytest.raises(ValueError, match="one seed per prompt: 1 seeds, 2 prompts"):
        engine.generate(_prompts(tok), 1, RANDOM, seeds=[1])


def assert_same_group(a: RolloutBatch, ga: int, b: RolloutBatch, gb: int, n: int) -> None:
    """Group ``ga`` of ``a`` and group ``gb`` of ``b`` (n rows each) hold the same samples: tokens,
    lengths, stops and log-probs (to float rounding: batches of other shapes may sum in another order)."""
    for j in range(n):
        ra, rb = ga * n + j, gb * n + j
        assert a.completion_tokens(ra) == b.completion_tokens(rb)
        assert bool(a.finished[ra]) == bool(b.finished[rb])
        length = int(a.lengths[ra])
        torch.testing.assert_close(a.logprobs[ra, :length], b.logprobs[rb, :length], atol=1e-5, rtol=0)


@pytest.mark.parametrize("top_k", [None, 5])
def test_a_groups_samples_do_not_depend_on_the_rest_of_the_batch(make_gpt, tok, top_k):
    """A prompt alone, then between a shorter and a longer one (so it is left-padded), then with the
    longer one only, and prefilled row by row: its group draws the same samples every time."""
    engine = Engine(make_gpt(seed=1), tok)
    params = SamplingParams(temperature=1.0, top_k=top_k, max_new_tokens=10)
    short, mid = tok.encode("Ann has 3 pens."), tok.encode("How many apples does Ben have now?")
    long = tok.encode("A farm has 3 cows and 4 hens. How many legs do the animals have in all?")
    assert len(short) < len(mid) < len(long)
    alone = engine.generate([mid], 4, params, seeds=[11])
    assert len({tuple(alone.completion_tokens(j)) for j in range(4)}) > 1  # the rows do differ
    assert_same_group(alone, 0, engine.generate([short, mid, long], 4, params, seeds=[5, 11, 6]), 1, 4)
    assert_same_group(alone, 0, engine.generate([long, mid], 4, params, seeds=[6, 11]), 1, 4)
    assert_same_group(alone, 0, engine.generate([long, mid], 4, params, seeds=[6, 11], share_prefix=False), 1, 4)


def test_samples_within_a_group_differ_from_the_first_token(gpt, tok):
    batch = Engine(gpt, tok).generate([tok.encode("Eve has 5 cards.")], 16, RANDOM, seed=0)
    first = batch.completion_ids[:, 0].tolist()
    assert len(set(first)) >= 2
    assert len({tuple(batch.completion_tokens(i)) for i in range(16)}) >= 2


def test_batch_layout(gpt, tok):
    prompts = _prompts(tok)
    batch = Engine(gpt, tok).generate(prompts, 3, RANDOM, seed=0)
    assert isinstance(batch, RolloutBatch)
    assert batch.prompt_ids == [prompts[0]] * 3 + [prompts[1]] * 3
    assert batch.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert batch.completion_ids.shape == batch.logprobs.shape == batch.mask.shape
    assert batch.completion_ids.shape[0] == 6
    assert batch.completion_ids.shape[1] == int(batch.lengths.max()) <= RANDOM.max_new_tokens
    for row in range(6):
        n = int(batch.lengths[row])
        assert batch.mask[row, :n].tolist() == [1.0] * n  # no tools: every token sampled
        assert (batch.completion_ids[row, n:] == tok.pad_id).all()


@pytest.mark.parametrize("top_k", [None, 20])
def test_logprobs_are_the_sampled_distribution_as_a_trainer_recomputes_it(gpt, tok, top_k):
    """The recorded log-prob is log softmax(logits / T) of the sampled token, as a trainer recomputes it
    from the unpadded prompt + completion (prompts of different lengths: left padding is exact); with
    top-k it is renormalised over the k best: log p_T(token) − log Σ_top-k p_T."""
    params = SamplingParams(temperature=0.7, top_k=top_k, max_new_tokens=6)
    prompts = _prompts(tok)
    batch = Engine(gpt, tok).generate(prompts, 2, params, seed=3)
    for row in range(4):
        prompt, completion = batch.prompt_ids[row], batch.completion_tokens(row)
        with torch.no_grad():
            logits = gpt(torch.tensor([prompt + completion]))[0, len(prompt) - 1 : -1]  # (n, V)
        logp = torch.log_softmax(logits / 0.7, -1)  # (n, V)
        if top_k is not None:
            best = logp.topk(top_k, -1)
            assert (best.indices == torch.tensor(completion)[:, None]).any(-1).all()
            logp = logp - torch.logsumexp(best.values, -1, keepdim=True)
        expected = logp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        torch.testing.assert_close(batch.logprobs[row, : len(completion)], expected, atol=1e-4, rtol=0)


class _StopAfterToken:
    """Wraps a real GPT: after ``trigger`` is fed back, the next token is forced to be the stop."""

    def __init__(self, model, trigger: int, stop: int):
        self.model, self.trigger, self.stop = model, trigger, stop
        self.device = model.device
        self.batch_sizes: list[int] = []

    def new_cache(self, batch, max_len):
        return self.model.new_cache(batch, max_len)

    def __call__(self, ids, cache=None, pad_mask=None):
        self.batch_sizes.append(ids.shape[0])
        logits = self.model(ids, cache=cache, pad_mask=pad_mask)
        if pad_mask is None:
            logits[ids[:, -1] == self.trigger, -1, self.stop] = 1e4
        return logits


def test_rows_that_stop_leave_a_real_kv_cache_without_disturbing_the_others(gpt, tok):
    prompts = [tok.encode("Ann has 3 pens."), tok.encode("How many apples?"), tok.encode("A farm")]
    params = _greedy(8)
    base = Engine(gpt, tok).generate(prompts, 1, params, seed=0)
    base_rows = [base.completion_tokens(r) for r in range(3)]
    trigger = base_rows[0][1]
    assert tok.assistant_end_id not in sum(base_rows, [])
    assert sum(trigger in row[:7] for row in base_rows) < 3  # someone keeps going
    wrapped = _StopAfterToken(gpt, trigger, tok.assistant_end_id)
    batch = Engine(wrapped, tok).generate(prompts, 1, params, seed=0)
    for r, row in enumerate(base_rows):
        if trigger in row[:7]:
            cut = row.index(trigger) + 1
            assert batch.completion_tokens(r) == row[:cut] + [tok.assistant_end_id]
            assert bool(batch.finished[r])
        else:
            assert batch.completion_tokens(r) == row  # exact continuation after compaction
            assert not bool(batch.finished[r])
    assert wrapped.batch_sizes[0] == 3
    assert wrapped.batch_sizes[-1] < 3  # the decode batch shrank
    assert wrapped.batch_sizes == sorted(wrapped.batch_sizes, reverse=True)


def test_greedy_is_deterministic_across_seeds(gpt, tok):
    engine = Engine(gpt, tok)
    a = engine.generate(_prompts(tok), 2, GREEDY, seed=1)
    b = engine.generate(_prompts(tok), 2, GREEDY, seed=2)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_ids[0], a.completion_ids[1])  # a group of greedy rows is one row


def test_top_k_one_equals_greedy(gpt, tok):
    engine = Engine(gpt, tok)
    top1 = engine.generate(
        _prompts(tok), 2, SamplingParams(temperature=1.0, top_k=1, max_new_tokens=8), seed=5
    )
    greedy = engine.generate(_prompts(tok), 2, GREEDY, seed=5)
    assert torch.equal(top1.completion_ids, greedy.completion_ids)
    torch.testing.assert_close(top1.logprobs, greedy.logprobs)


def test_greedy_matches_step_by_step_argmax_of_full_recompute(gpt, tok):
    prompt = tok.encode("A farm has 3 cows and 4 hens.")
    batch = Engine(gpt, tok).generate([prompt], 1, GREEDY, seed=0)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(int(batch.lengths[0])):
            seq.append(int(gpt(torch.tensor([seq]))[0, -1].argmax()))
            if seq[-1] == tok.assistant_end_id:
                break
    assert batch.completion_tokens(0) == seq[len(prompt) :]


def test_share_prefix_false_gives_same_shape(gpt, tok):
    engine = Engine(gpt, tok)
    shared = engine.generate(_prompts(tok), 3, RANDOM, seed=0, share_prefix=True)
    alone = engine.generate(_prompts(tok), 3, RANDOM, seed=0, share_prefix=False)
    assert alone.completion_ids.shape[0] == shared.completion_ids.shape[0] == 6
    assert alone.logprobs.shape == alone.mask.shape == alone.completion_ids.shape
    assert alone.group_ids.tolist() == shared.group_ids.tolist()
    assert alone.prompt_ids == shared.prompt_ids


def test_share_prefix_modes_agree_under_greedy(gpt, tok):
    engine = Engine(gpt, tok)
    shared = engine.generate(_prompts(tok), 3, GREEDY, seed=0, share_prefix=True)
    alone = engine.generate(_prompts(tok), 3, GREEDY, seed=0, share_prefix=False)
    assert torch.equal(shared.completion_ids, alone.completion_ids)
    assert torch.equal(shared.lengths, alone.lengths)
    torch.testing.assert_close(shared.logprobs, alone.logprobs, atol=1e-4, rtol=0)
