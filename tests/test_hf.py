"""Hugging Face models behind the posttrain interfaces: a tiny random Llama with a locally trained
tokenizer (no network) goes through load, chat rendering, the engine, LoRA, save/load, SFT and RL."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from test_engine import assert_same_group  # noqa: E402

from posttrain.checkpoint import load_policy, save_checkpoint  # noqa: E402
from posttrain.config import LoraConfig, ModelConfig, RLConfig, SFTConfig, load_config  # noqa: E402
from posttrain.engine import Engine, SamplingParams  # noqa: E402
from posttrain.metrics import read_jsonl  # noqa: E402
from posttrain.models.hf import HFPolicy  # noqa: E402
from posttrain.models.tiny_llama import make_tiny_llama  # noqa: E402
from posttrain.tasks.arithmetic import ArithmeticTask  # noqa: E402
from posttrain.tools import default_registry  # noqa: E402


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    texts = ArithmeticTask(test_size=8).corpus(random.Random(0), n=300)
    return make_tiny_llama(tmp_path_factory.mktemp("llama"), texts, vocab_size=400)


def load(path, rank=0, **model):
    return load_policy(ModelConfig(str(path), **model), LoraConfig(rank=rank, alpha=2.0 * rank))


def problem_conv(seed=1):
    return ArithmeticTask(test_size=8).sft_example(random.Random(seed))


def test_chat_template_renders_prompt_and_assistant_only_mask(llama_dir):
    policy, tok = load(llama_dir)
    assert isinstance(policy, HFPolicy) and tok.stop_ids == [tok.hf.convert_tokens_to_ids("<|im_end|>")]
    conv = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"},
                         {"role": "assistant", "content": "It is 5."}]}
    ids, mask = tok.render_conversation(conv)
    assert tok.decode(ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
                               "<|im_start|>assistant\nIt is 5.<|im_end|>\n")
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "It is 5.<|im_end|>"
    prompt = tok.render_for_completion(conv)
    assert ids[: len(prompt)] == prompt and tok.decode(prompt).endswith("<|im_start|>assistant\n")


def test_tool_parts_render_with_tool_tokens_and_outputs_unmasked(llama_dir):
    policy, tok = load(llama_dir, tool_tokens=True)
    assert tok.has_tools and policy.hf.get_input_embeddings().weight.shape[0] == tok.vocab_size
    parts = [{"type": "tool_call", "text": "6*7"}, {"type": "tool_output", "text": "42"},
             {"type": "text", "text": " #### 42"}]
    conv = {"messages": [{"role": "user", "content": "6 times 7?"}, {"role": "assistant", "content": parts}]}
    ids, mask = tok.render_conversation(conv)
    trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == "<|tool_start|>6*7<|tool_end|> #### 42<|im_end|>"


def test_engine_cache_matches_full_recompute_with_left_padding(llama_dir):
    torch.manual_seed(0)
    policy, tok = load(llama_dir)
    with torch.no_grad():  # sharper than the default init, so a cache or position slip shows
        for p in policy.parameters():
            p.mul_(4.0)
    convs = [problem_conv(s) for s in (1, 2, 3)]
    prompts = [tok.render_for_completion(c) for c in convs]
    prompts[1] = prompts[1][:-7] + prompts[1][-4:]  # different lengths: real left padding
    engine = Engine(policy, tok)
    params = SamplingParams(top_k=None, max_new_tokens=12)  # untruncated: the policy's own log-probs
    first = engine.generate(prompts, 3, params, seed=5)
    engine.stop_ids = {int(first.completion_ids[0, 2])}  # a token rows do sample: some stop early
    batch = engine.generate(prompts, 3, params, seed=5)
    assert len({len(p) for p in prompts}) > 1 and 0 < int(batch.finished.sum()) < len(batch.finished)
    for row in range(len(batch.prompt_ids)):
        seq = torch.tensor([batch.prompt_ids[row] + batch.completion_tokens(row)])
        with torch.no_grad():
            full = policy(seq[:, :-1], seq[:, 1:])[0, len(batch.prompt_ids[row]) - 1:]  # (n,)
        n = int(batch.lengths[row])
        torch.testing.assert_close(batch.logprobs[row, :n], full, atol=2e-5, rtol=0)
    again = engine.generate(prompts, 3, params, seed=5)
    assert torch.equal(again.completion_ids, batch.completion_ids)  # same seed, same samples


@pytest.mark.parametrize("top_k", [None, 5])
def test_an_hf_groups_samples_do_not_depend_on_the_rest_of_the_batch(llama_dir, top_k):
    """As for the built-in GPT: a prompt alone and left-padded among longer and shorter ones draws the
    same group (HF attention masks and position ids under left padding)."""
    torch.manual_seed(0)
    policy, tok = load(llama_dir)
    with torch.no_grad():  # sharper than the default init, so padding slips would show
        for p in policy.parameters():
            p.mul_(4.0)
    prompts = [tok.render_for_completion(problem_conv(s)) for s in (2, 1, 8)]
    assert len(prompts[0]) < len(prompts[1]) < len(prompts[2])  # 46, 48, 51 tokens
    engine = Engine(policy, tok)
    params = SamplingParams(temperature=1.0, top_k=top_k, max_new_tokens=8)
    alone = engine.generate([prompts[1]], 3, params, seeds=[11])
    assert len({tuple(alone.completion_tokens(j)) for j in range(3)}) > 1
    assert_same_group(alone, 0, engine.generate(prompts, 3, params, seeds=[5, 11, 6]), 1, 3)
    assert_same_group(alone, 0, engine.generate(prompts[1:][::-1], 3, params, seeds=[6, 11]), 1, 3)


def test_lora_reference_is_the_same_weights_with_the_adapter_off(llama_dir):
    policy, tok = load(llama_dir, rank=4)
    base, _ = load(llama_dir)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ref = policy.reference()
    assert sum(p.numel() for p in ref.parameters()) == 0  # owns nothing: no second copy of the weights
    ids = torch.tensor([tok.render_conversation(problem_conv())[0]])
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # the adapter now changes the output
        torch.testing.assert_close(ref(ids[:, :-1], ids[:, 1:]), base(ids[:, :-1], ids[:, 1:]))
        assert not torch.allclose(policy(ids[:, :-1], ids[:, 1:]), base(ids[:, :-1], ids[:, 1:]))
    name = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    base_weight = dict(policy.hf.named_parameters())[name]
    with policy.hf.disable_adapter():
        same = dict(policy.hf.named_parameters())[name]
    assert same.data_ptr() == base_weight.data_ptr()


def test_save_load_round_trip_full_and_lora(llama_dir, tmp_path):
    policy, tok = load(llama_dir)
    ids = torch.tensor([tok.render_conversation(problem_conv())[0]])
    save_checkpoint(tmp_path / "full", policy, tok, {"step": 3})
    again, tok2 = load(tmp_path / "full")
    for (n, a), (_, b) in zip(policy.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert tok2.encode("How many pens?") == tok.encode("How many pens?")

    lora, _ = load(llama_dir, rank=4)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
        expected = lora(ids)
    save_checkpoint(tmp_path / "lora", lora, tok)
    saved = {p.name for p in (tmp_path / "lora").iterdir()}  # the adapter and where its base is, not the model
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").exists() and "base_model.json" in saved
    assert not {"model.safetensors", "config.json"} & saved
    size = sum(p.stat().st_size for p in (tmp_path / "lora").rglob("*") if p.is_file())
    assert size < 0.5 * (llama_dir / "model.safetensors").stat().st_size
    reloaded, _ = load(tmp_path / "lora")  # base + adapter, merged
    assert not reloaded.is_lora
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), expected, atol=1e-4, rtol=1e-4)
    again, _ = load(tmp_path / "lora", rank=4)  # and a fresh adapter on top, saved in turn: a chain of adapters
    save_checkpoint(tmp_path / "lora2", again, tok)
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "lora2")[0](ids), expected, atol=1e-4, rtol=1e-4)

    from transformers import AutoModelForCausalLM  # the export is the merged model, for plain transformers

    from posttrain.export import export_hf_checkpoint

    export_hf_checkpoint(tmp_path / "lora", tmp_path / "export")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_sft_then_grpo_with_lora_on_an_hf_model(llama_dir, tmp_path):
    sft = load_config(SFTConfig, None, [
        f"model={llama_dir}", f"run_dir={tmp_path / 'sft'}", "steps=30", "batch_size=16", "threads=2",
        "optim.lr=3e-3", "optim.warmup_steps=3", "eval.problems=4", "eval.samples=2", "eval.ks=[1]",
        "eval.max_new_tokens=8"])
    from posttrain.trainers.sft import train_sft

    train_sft(sft, progress=False)
    rows = read_jsonl(tmp_path / "sft" / "metrics.jsonl")
    assert sum(r["loss"] for r in rows[-5:]) < 0.6 * sum(r["loss"] for r in rows[:5])
    assert (tmp_path / "sft" / "checkpoints" / "final" / "config.json").exists()  # HF format

    from posttrain.trainers.rl import train_rl

    rl = load_config(RLConfig, None, [
        f"model={tmp_path / 'sft' / 'checkpoints' / 'final'}", "lora.rank=8", f"run_dir={tmp_path / 'rl'}",
        "algorithm=grpo", "rewards={task: 1.0, length_penalty: 1.0}", "steps=3", "prompts_per_step=4",
        "samples_per_prompt=4", "threads=2",
        "sampling.max_new_tokens=24", "eval_before=false", "eval.problems=4", "eval.samples=2", "eval.ks=[1]",
        "eval.max_new_tokens=8", "optim.lr=1e-2", "optim.warmup_steps=0"])
    train_rl(rl, progress=False)
    steps = read_jsonl(tmp_path / "rl" / "metrics.jsonl")
    assert len(steps) == 3 and all(r["kl"] >= 0 and "rewards/length_penalty/mean" in r for r in steps)
    assert steps[-1]["kl"] > 0  # the adapter moved the policy away from its adapter-off reference
    final = tmp_path / "rl" / "checkpoints" / "final"
    assert (final / "base_model.json").exists() and (final / "adapter" / "adapter_model.safetensors").exists()
    assert not (final / "model.safetensors").exists()  # the adapter, not a merged copy of the model, per save


def test_engine_runs_tools_for_an_hf_tokenizer_with_tool_tokens(llama_dir):
    policy, tok = load(llama_dir, tool_tokens=True)
    engine = Engine(policy, tok, default_registry())
    assert engine.tools is not None
    plain_policy, plain_tok = load(llama_dir)
    assert Engine(plain_policy, plain_tok, default_registry()).tools is None  # no tool tokens: no calls


def test_the_critic_of_a_lora_policy_is_the_frozen_base_with_its_own_adapter_and_no_lm_head(llama_dir):
    """PPO's value model of a LoRA policy trains as few weights as the policy (its adapter) plus the value head; the
    base stays frozen and the LM head, which values never read, is gone. A full policy's critic trains everything."""
    from posttrain.models.heads import ValueModel

    def trainable(module):
        return {n: p.numel() for n, p in module.named_parameters() if p.requires_grad}

    policy, _ = load(llama_dir, rank=8)
    critic = ValueModel.from_policy(policy)
    hidden = policy.hidden_size
    assert sum(trainable(critic).values()) == sum(trainable(policy).values()) + hidden + 1
    assert all("lora_" in n or n.startswith("head.") for n in trainable(critic))
    assert not any("lm_head" in n for n in critic.state_dict()) and critic(torch.tensor([[1, 2, 3]])).shape == (1, 3)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    critic.head.weight.data.fill_(0.1)  # (zero at init: no gradient would reach the trunk)
    loss = critic(torch.tensor([[1, 2, 3, 4]])).pow(2).mean()
    loss.backward()
    assert all(p.grad is None for n, p in critic.named_parameters() if not p.requires_grad)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in critic.named_parameters() if "lora_B" in n)
    assert all(p.equal(before[n]) for n, p in policy.named_parameters())
    full, _ = load(llama_dir)
    assert sum(trainable(ValueModel.from_policy(full)).values()) == sum(
        p.numel() for n, p in full.named_parameters() if "lm_head" not in n) + hidden + 1


@pytest.mark.parametrize("rank, algorithm", [(0, "grpo"), (8, "grpo"), (8, "ppo")])
def test_an_hf_run_resumed_mid_way_ends_with_the_same_weights(llama_dir, tmp_path, rank, algorithm):
    """Full fine-tuning and LoRA (with PPO: a LoRA critic too): 2 steps, then the same run raised to 4 steps (it
    resumes from the step-2 checkpoint: weights or adapter, the critic, Adam state, RNGs), equals 4 steps in one
    go."""
    from safetensors.torch import load_file

    from posttrain.trainers.rl import train_rl

    def config(run_dir, steps):
        return load_config(RLConfig, None, [
            f"model={llama_dir}", f"lora.rank={rank}", "lora.alpha=16", f"run_dir={run_dir}", f"algorithm={algorithm}",
            "critic.warmup_steps=1",
            f"steps={steps}", "prompts_per_step=2", "samples_per_prompt=3", "sampling.max_new_tokens=12",
            "eval_before=false", "eval.every=0", "eval.problems=2", "eval.samples=1", "eval.ks=[1]",
            "eval.max_new_tokens=4", "optim.lr=1e-2", "optim.warmup_steps=0", "optim.schedule=constant",
            "task.format=hash"])

    train_rl(config(tmp_path / "once", 4), progress=False)
    train_rl(config(tmp_path / "twice", 2), progress=False)
    train_rl(config(tmp_path / "twice", 4), progress=False)  # steps raised: a notice, then steps 3 and 4
    name = "adapter/adapter_model.safetensors" if rank else "model.safetensors"
    once, twice = (load_file(tmp_path / run / "checkpoints/final" / name) for run in ("once", "twice"))
    assert once.keys() == twice.keys() and all(once[k].equal(twice[k]) for k in once)
    rows = [[{k: v for k, v in r.items() if not k.startswith(("timing_s", "throughput"))}
             for r in read_jsonl(tmp_path / run / "metrics.jsonl")] for run in ("once", "twice")]
    assert [r for r in rows[0] if r["step"] > 2] == [r for r in rows[1] if r["step"] > 2]
    if algorithm == "ppo":  # the LoRA critic's checkpoint holds its adapter and head, not its frozen base
        critic = (tmp_path / "once" / "checkpoints/final" / "critic.safetensors").stat().st_size
        assert critic < 0.2 * (llama_dir / "model.safetensors").stat().st_size


def test_decoding_passes_the_kv_cache_under_the_name_this_transformers_takes(llama_dir):
    """transformers renamed forward's past_key_values to cache (the old name warns, then goes in 5.40): no
    deprecation warning while decoding, with the supported range's old and new names alike."""
    import warnings

    policy, tok = load(llama_dir, rank=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Engine(policy, tok, default_registry()).generate([[1, 2, 3]], 2, SamplingParams(max_new_tokens=4), seed=0)
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_a_lora_checkpoint_finds_its_base_moved_with_it_and_refuses_one_with_other_weights(llama_dir, tmp_path):
    """base_model.json: the base's path (relative first: a folder moved with its base still loads) and a
    fingerprint of its weights (a base overwritten since is an error, never other weights under the adapter)."""
    import json
    import shutil

    base = tmp_path / "run" / "base"
    shutil.copytree(llama_dir, base)
    lora, tok = load(base, rank=4)
    save_checkpoint(tmp_path / "run" / "ckpt", lora, tok)
    record = json.loads((tmp_path / "run" / "ckpt" / "base_model.json").read_text())
    assert record["path"] == str(base.resolve()) and record["relative"] == "../base" and record["dtype"] == "float32"
    shutil.move(tmp_path / "run", tmp_path / "moved")  # the whole folder elsewhere: found by the relative path
    assert not load(tmp_path / "moved" / "ckpt")[0].is_lora
    other, _ = load(tmp_path / "moved" / "base", rank=4)  # the base overwritten by other weights
    with torch.no_grad():
        next(p for n, p in other.hf.named_parameters() if "embed" in n).add_(1.0)
    other.hf.get_base_model().save_pretrained(tmp_path / "moved" / "base")
    with pytest.raises(FileNotFoundError, match=r"holds a LoRA adapter on a base model that cannot be found: .*"
                                                r"base \(other weights than the adapter was trained on\)"):
        load(tmp_path / "moved" / "ckpt")
    shutil.rmtree(tmp_path / "moved" / "base")
    with pytest.raises(FileNotFoundError, match=r"\(not there\)\. Put the base back, or load an export"):
        load(tmp_path / "moved" / "ckpt")


def test_tool_tokens_asked_for_on_a_lora_checkpoint_are_added(llama_dir, tmp_path):
    """rl model=<a LoRA checkpoint without tool tokens> model.tool_tokens=true: the merged model gets them, with
    rows at the exact mean, and a LoRA trained on top records it for its own base rebuild."""
    lora, tok = load(llama_dir, rank=4)
    save_checkpoint(tmp_path / "ckpt", lora, tok)
    merged, mtok = load_policy(
        ModelConfig(str(tmp_path / "ckpt"), tool_tokens=True), LoraConfig(rank=4, alpha=8.0))
    assert mtok.has_tools
    emb = merged.hf.get_base_model().get_input_embeddings().weight
    assert torch.equal(emb[-1], emb[:-4].mean(0))
    save_checkpoint(tmp_path / "ckpt2", merged, mtok)
    again, atok = load(tmp_path / "ckpt2")
    assert atok.has_tools and again.hf.get_input_embeddings().weight.shape == emb.shape
