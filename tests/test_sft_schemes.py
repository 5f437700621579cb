"""SFT completeness: the three loss schemes' masks, the max_length policy (truncate / skip, counted),
packing (the same loss as unpacked rows, on the built-in GPT and on a tiny HF Llama), and LoRA SFT
(only the adapter trains; the checkpoint reloads)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from posttrain.config import ConfigError, LoraConfig, ModelConfig, SFTConfig, load_config
from posttrain.metrics import read_jsonl
from posttrain.models.gpt import doc_positions
from posttrain.sft_data import (
    LOSS_MASKS,
    Example,
    answer_only_mask,
    answer_start,
    check_packing,
    completion_mask,
    draw_examples,
    first_fit,
    full_mask,
    pack_rows,
    pad_rows,
    resolve_max_length,
    sft_loss,
)
from posttrain.tasks.arithmetic import ArithmeticTask
from posttrain.tokenizer import Tokenizer
from posttrain.trainers.sft import train_sft
from tests.conftest import tiny_gpt

TINY_SFT = ["batch_size=8", "gpt.n_layer=1", "gpt.n_embd=32", "gpt.n_head=2", "gpt.n_kv_head=1",
            "gpt.max_seq_len=128", "optim.warmup_steps=2", "optim.lr=1e-2", "task.test_size=8", "eval.every=0",
            "eval.problems=2", "eval.samples=1", "eval.ks=[1]", "eval.max_new_tokens=4"]


def convo(reply) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]}


def test_the_three_loss_masks_on_one_example():
    tok = Tokenizer([" ####", " 5"])
    ids, render = tok.render_conversation(convo("ok #### 5"))
    assert [tok.decode([i]) for i in ids] == [  # positions 0..10
        "<|bos|>", "<|user_start|>", "h", "i", "<|user_end|>", "<|assistant_start|>", "o", "k", " ####", " 5",
        "<|assistant_end|>"]
    assert full_mask(tok, ids, render) == [1] * 11
    assert completion_mask(tok, ids, render) == [0] * 6 + [1] * 5
    assert answer_only_mask(tok, ids, render) == [0] * 8 + [1] * 3
    # as training targets (input position t predicts token t + 1; −1: no loss)
    targets = {name: pad_rows([Example(ids, mask(tok, ids, render))], tok.pad_id).targets[0].tolist()
               for name, mask in LOSS_MASKS.items()}
    assert targets == {"full": ids[1:], "completion": [-1] * 5 + ids[6:], "answer_only": [-1] * 7 + ids[8:]}


def test_answer_only_finds_the_answer_after_tool_outputs_and_in_xml(tok):
    conv = ArithmeticTask(test_size=8).sft_example(random.Random(3))  # calculator calls, then '#### 24'
    ids, render = tok.render_conversation(conv)
    mask = answer_only_mask(tok, ids, render)
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "#### 24<|assistant_end|>"
    assert all(r for r, m in zip(render, mask, strict=True) if m)  # inside the completion mask
    ids, render = tok.render_conversation(convo("<reasoning>\n2+3\n</reasoning>\n<answer>\n5\n</answer>\n"))
    mask = answer_only_mask(tok, ids, render)
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "<answer>\n5\n</answer>\n<|assistant_end|>"


def test_a_reply_without_an_answer_is_a_config_error(tok):
    ids, render = tok.render_conversation(convo("it is five"))
    with pytest.raises(ConfigError, match=r"loss=answer_only needs a final answer .* none: \.\.\.'it is five"):
        answer_only_mask(tok, ids, render)


def test_answer_start_and_first_fit_and_doc_positions():
    assert answer_start([" 8", " ##", "##", " 8"]) == 1
    assert answer_start(["<", "answer", ">", "5"]) == 0
    assert answer_start(["#### 1", " then ", "<answer>", "2"]) == 2  # the last marker wins
    assert answer_start(["no", " answer"]) is None
    assert first_fit([3, 5, 2, 4], 8) == [[1, 0], [3, 2]]
    assert first_fit([9, 2], 8) == [[0], [1]]  # too long: a bin of its own
    assert doc_positions(torch.tensor([[0, 0, 0, 1, 1, -1], [0, 1, 1, 1, 2, 2]])).tolist() == [
        [0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 0, 1]]


def test_max_length_truncates_or_skips_and_counts():
    tok = Tokenizer([" ####", " 5"])
    replies = iter(["a #### 5", "a long reply #### 5", "b #### 5", "the longest reply of all #### 5", "c #### 5"])
    counts = {"truncated": 0, "skipped": 0}
    kept = draw_examples(lambda: convo(next(replies)), tok, 3, "completion", 12, "skip", counts)
    assert [tok.decode(e.ids[6:-1]) for e in kept] == ["a #### 5", "b #### 5", "c #### 5"]
    assert counts == {"truncated": 0, "skipped": 2}
    replies = iter(["a #### 5", "a long reply #### 5"])
    cut = draw_examples(lambda: convo(next(replies)), tok, 2, "answer_only", 12, "truncate", counts)
    assert [len(e.ids) for e in cut] == [10, 12] and counts == {"truncated": 1, "skipped": 2}
    assert cut[1].mask == [0] * 12  # the answer span was cut off: this example trains nothing
    with pytest.raises(ConfigError, match="3 examples in a row are longer than max_length=4"):
        draw_examples(lambda: convo("a #### 5"), tok, 1, "full", 4, "skip", counts, max_skips=3)
    assert resolve_max_length(0, 128) == 128 and resolve_max_length(64, 128) == 64 and resolve_max_length(0, 0) == 0
    with pytest.raises(ConfigError, match="'max_length' must be at most the model's context length 128, got 200"):
        resolve_max_length(200, 128)


def examples(tok, n=8, loss="completion", fmt="tool"):
    task, r = ArithmeticTask(test_size=8, format=fmt), random.Random(5)
    return draw_examples(lambda: task.sft_example(r), tok, n, loss, 0, "truncate", {"truncated": 0, "skipped": 0})


@pytest.mark.parametrize("loss", ["full", "completion", "answer_only"])
def test_packed_rows_give_the_unpacked_loss_and_gradients_on_the_builtin_gpt(tok, loss):
    model = tiny_gpt(tok.vocab_size, n_layer=1).train()
    batch = examples(tok, loss=loss)  # rendered lengths 61, 61, 56, 72, 63, 67, 63, 65
    unpacked, packed = pad_rows(batch, tok.pad_id), pack_rows(batch, tok.pad_id, 128)
    assert unpacked.inputs.shape == (8, 71) and packed.inputs.shape == (4, 126)  # two examples a row
    assert unpacked.pad_fraction == pytest.approx(68 / 568) and packed.pad_fraction == pytest.approx(4 / 504)
    assert packed.positions == unpacked.positions == sum(len(e.ids) - 1 for e in batch)
    grads = []
    for rows in (unpacked, packed):
        model.zero_grad()
        loss_value, n_tokens = sft_loss(model, rows)
        loss_value.backward()
        grads.append((loss_value.item(), n_tokens, torch.cat([p.grad.flatten() for p in model.parameters()])))
    (a, n_a, g_a), (b, n_b, g_b) = grads
    assert n_a == n_b and a == pytest.approx(b, rel=1e-6)  # fp32 sums over differently shaped rows
    torch.testing.assert_close(g_a, g_b, atol=1e-5, rtol=1e-4)
    check_packing(model)  # the probe agrees


def test_a_model_that_ignores_doc_ids_fails_the_packing_probe(tok):
    model = tiny_gpt(tok.vocab_size, n_layer=1)

    class Leaky(torch.nn.Module):  # attends across packed examples: plain causal attention over the row
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, idx, targets=None, doc_ids=None):
            return self.inner(idx, targets)

    with pytest.raises(ConfigError, match=r"packing=true: two examples packed in one row score .* apart"):
        check_packing(Leaky())


@pytest.mark.parametrize(("overlong", "kind"), [("skip", "skipped"), ("truncate", "truncated")])
def test_sft_with_packing_answer_only_and_overlong_examples(tmp_path, capsys, overlong, kind):
    config = load_config(SFTConfig, None, [f"run_dir={tmp_path}", *TINY_SFT, "steps=3", "packing=true",
                                           "loss=answer_only", "max_length=58", f"overlong={overlong}"])
    train_sft(config, progress=False)
    notice = f"examples longer than max_length=58 tokens are {kind} (overlong={overlong}); counted in data/{kind}"
    assert " ".join(capsys.readouterr().out.split()).count(notice) == 1  # once (the console wraps lines)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    counted = [r[f"data/{kind}"] for r in rows]  # cumulative over the run
    assert 0 < counted[0] <= counted[1] <= counted[2]
    assert all(r["data/skipped" if kind == "truncated" else "data/truncated"] == 0 for r in rows)
    assert all(r["tokens"] < 8 * 6 and math.isfinite(r["loss"]) for r in rows)  # '#### N<end>': a few tokens each


def test_packing_without_max_length_fills_rows_to_the_longest_example_not_the_context(tmp_path, monkeypatch):
    import posttrain.trainers.sft as sft_trainer

    widths = []

    def spy(model, rows, normaliser=None):
        doc_lengths = [(rows.doc_ids[r] == d).sum().item() for r in range(len(rows.doc_ids))
                       for d in range(int(rows.doc_ids[r].max()) + 1)]  # each example's input positions
        widths.append((rows.inputs.shape[1], max(doc_lengths)))
        return sft_loss(model, rows, normaliser)

    monkeypatch.setattr(sft_trainer, "sft_loss", spy)
    config = load_config(SFTConfig, None, [f"run_dir={tmp_path}", *TINY_SFT, "steps=2", "packing=true"])
    train_sft(config, progress=False)  # max_length 0: examples held to the context (128), rows not filled to it
    assert len(widths) == 2 and all(width == longest < 100 for width, longest in widths)


def test_a_step_without_counted_tokens_makes_no_update(tmp_path, capsys):
    from safetensors.torch import load_file

    from posttrain.tasks import make_task
    from posttrain.trainers.sft import build_policy

    config = load_config(SFTConfig, None, [f"run_dir={tmp_path}", *TINY_SFT, "steps=2", "loss=answer_only",
                                           "max_length=40", "overlong=truncate", "optim.weight_decay=0.5"])
    train_sft(config, progress=False)  # every answer comes after token 40: cut off
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    counted = [(r["tokens"], r["data/empty_steps"], r["health/skipped_update"]) for r in rows]
    assert counted == [(0, 1, 1.0), (0, 2, 1.0)]
    assert not any("loss" in r or "grad_norm" in r for r in rows)  # no loss to log
    notice = ("a step's examples had no token for the loss (loss=answer_only, overlong=truncate): no update was made; "
              "counted in data/empty_steps; answer_only works best with overlong=skip")
    assert " ".join(capsys.readouterr().out.split()).count(notice) == 1
    initial = build_policy(config, make_task(config.task))[0].state_dict()
    final = load_file(tmp_path / "checkpoints" / "final" / "model.safetensors")
    assert all(final[k].equal(v) for k, v in initial.items())  # AdamW's weight decay did not shrink a thing


def test_max_length_above_the_context_is_a_config_error(tmp_path):
    config = load_config(SFTConfig, None, [f"run_dir={tmp_path}", *TINY_SFT, "steps=1", "max_length=200"])
    with pytest.raises(ConfigError, match="at most the model's context length 128, got 200"):
        train_sft(config, progress=False)


# --- Hugging Face models (a tiny random Llama built locally) -----------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from posttrain.models.tiny_llama import make_tiny_llama

    texts = ArithmeticTask(test_size=8).corpus(random.Random(0), n=300)
    return make_tiny_llama(tmp_path_factory.mktemp("llama"), texts, vocab_size=400)


def load_llama(path, rank=0):
    from posttrain.checkpoint import load_policy

    return load_policy(ModelConfig(str(path)), LoraConfig(rank=rank, alpha=2.0 * rank))


def test_answer_only_on_an_hf_chat_template(llama_dir):
    _, tok = load_llama(llama_dir)
    ids, render = tok.render_conversation(ArithmeticTask(test_size=8, format="hash").sft_example(random.Random(3)))
    mask = answer_only_mask(tok, ids, render)
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "#### 24<|im_end|>"
    ids, render = tok.render_conversation(convo("<reasoning>\nx\n</reasoning>\n<answer>\n5\n</answer>\n"))
    mask = answer_only_mask(tok, ids, render)
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "<answer>\n5\n</answer>\n<|im_end|>"


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_give_the_unpacked_loss_on_an_hf_llama(llama_dir, attention):
    policy, tok = load_llama(llama_dir)
    policy.hf.set_attn_implementation(attention)
    torch.manual_seed(0)
    with torch.no_grad():  # dense random weights: attention that leaked across examples would show
        for p in policy.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
    batch = examples(tok, n=6, fmt="hash")
    unpacked, packed = pad_rows(batch, tok.pad_id), pack_rows(batch, tok.pad_id, 512)
    assert packed.inputs.shape[0] < unpacked.inputs.shape[0]
    a, b = sft_loss(policy, unpacked)[0].item(), sft_loss(policy, packed)[0].item()
    leaky = sft_loss(policy, type(packed)(packed.inputs, packed.targets, None, packed.positions))[0].item()
    assert abs(a - b) < 1e-6 and abs(leaky - b) > 1e-3  # without doc_ids the packed examples see each other
    check_packing(policy)


def test_packing_with_flash_attention_is_a_config_error(llama_dir):
    policy, _ = load_llama(llama_dir)
    policy.hf.config._attn_implementation = "flash_attention_2"  # no kernel is loaded: only the check runs
    with pytest.raises(ConfigError, match="packing=true: this model's attention implementation 'flash_attention_2' "
                                          r"does not keep packed examples apart \(packing works with sdpa"):
        check_packing(policy)


@pytest.fixture(scope="module")
def lora_base(llama_dir, tmp_path_factory):
    """The tiny Llama with an LM head of std 1/√hidden (its own init, 0.02, leaves logits too flat for an
    adapter on the trunk to move the loss much in a few steps)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0 / math.sqrt(model.config.hidden_size))
    out = tmp_path_factory.mktemp("lora_base")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(out)
    return out


def test_lora_sft_trains_only_the_adapter_and_reloads(lora_base, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    config = load_config(SFTConfig, None, [
        f"model={lora_base}", "lora.rank=4", "lora.alpha=8", f"run_dir={tmp_path}", "steps=16", "batch_size=8",
        "task.format=hash", "task.test_size=8", "packing=true", "optim.lr=1e-2", "optim.warmup_steps=2",
        "eval.every=0", "eval.problems=2", "eval.samples=1", "eval.ks=[1]", "eval.max_new_tokens=4"])
    train_sft(config, progress=False)
    losses = [r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")]
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])
    final = tmp_path / "checkpoints" / "final"
    adapter = load_file(final / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero: it trained
    base = AutoModelForCausalLM.from_pretrained(lora_base).state_dict()
    from posttrain.export import export_hf_checkpoint

    export_hf_checkpoint(final, tmp_path / "merged")  # the checkpoint holds the adapter: the export merges it
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    assert merged.keys() == base.keys()
    lora_targets = {k.split(".lora_")[0].removeprefix("base_model.model.") + ".weight" for k in adapter}
    assert all(merged[k].equal(base[k]) for k in base if k not in lora_targets)  # embeddings, norms, LM head
    for name in lora_targets:  # W = W0 + (alpha / r)·B·A: the base weight itself did not move
        stem = "base_model.model." + name.removesuffix(".weight")
        delta = 2.0 * adapter[f"{stem}.lora_B.weight"] @ adapter[f"{stem}.lora_A.weight"]
        torch.testing.assert_close(merged[name], base[name] + delta, atol=1e-6, rtol=1e-5)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lora_base), final / "adapter")
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        torch.testing.assert_close(reloaded(ids).logits, exported(ids).logits, atol=1e-5, rtol=1e-4)
