"""`posttrain export`: which checkpoint, the atomic write, and the hf format: a built-in GPT becomes a
Qwen3 model with the same logits and greedy tokens and a tokenizer with the same ids; an HF policy's
checkpoint becomes a plain HF model directory."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from posttrain import export
from posttrain.export import ExportError, export_checkpoint, pretoken_regex, resolve_checkpoint
from posttrain.tasks.arithmetic import ArithmeticTask

BUILTIN_FILES = ["README.md", "config.json", "generation_config.json", "model.safetensors",
                 "posttrain_tokenizer.json", "tokenizer.json", "tokenizer_config.json"]
TOOL_CONV = {"messages": [
    {"role": "system", "content": "Use the calculator."},
    {"role": "user", "content": "A shop had 32 cups and sold 6 + 18. How many are left?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Sold"}, {"type": "tool_call", "text": "6+18"},
        {"type": "tool_output", "text": "24"}, {"type": "text", "text": ", left"},
        {"type": "tool_call", "text": "32-24"}, {"type": "tool_output", "text": "8"},
        {"type": "text", "text": " #### 8"}]},
    {"role": "user", "content": "And twice that?"},
    {"role": "assistant", "content": " 1 6"},
]}


def save_step(run, step: int, model, tok) -> None:
    """A checkpoint dir as the trainers write it, resume-only files included."""
    path = run / "checkpoints" / f"step_{step:06d}"
    path.mkdir(parents=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    (path / "optimizer.policy.json").write_text("{}")


def point(run, name: str, step: int) -> None:
    os.symlink(f"step_{step:06d}", run / "checkpoints" / name)


@pytest.fixture
def run(tmp_path, make_gpt, tok):
    """A run with steps 2 and 5 (different weights), final → 2, latest → 5."""
    run = tmp_path / "run"
    save_step(run, 2, make_gpt(seed=2), tok)
    save_step(run, 5, make_gpt(seed=5), tok)
    point(run, "final", 2)
    point(run, "latest", 5)
    return run


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tok):
    """A tiny random GPT (seed 0, as the conftest builds it), its export and the HF model loaded from it."""
    from conftest import tiny_gpt

    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    run = tmp_path_factory.mktemp("exp") / "run"
    model = tiny_gpt(tok.vocab_size, seed=0)
    save_step(run, 2, model, tok)
    point(run, "final", 2)
    out = export_checkpoint(run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    return model, out, hf, transformers.AutoTokenizer.from_pretrained(out)


# --- which checkpoint, where ------------------------------------------------------------------------


def test_step_selection_and_the_error_listing_existing_steps(run):
    root = run / "checkpoints"
    assert resolve_checkpoint(run, 5) == (root / "step_000005").resolve()
    assert resolve_checkpoint(run) == (root / "step_000002").resolve()  # final before latest
    (root / "final").unlink()
    assert resolve_checkpoint(run) == (root / "step_000005").resolve()
    with pytest.raises(ExportError) as err:
        resolve_checkpoint(run, 3)
    assert str(err.value) == f"no checkpoint for step 3 in {root} (steps with a checkpoint: 2, 5)"
    (root / "latest").unlink()
    with pytest.raises(ExportError, match=r"neither 'final' nor 'latest' in .* \(steps with a checkpoint: 2, 5\)"):
        resolve_checkpoint(run)
    with pytest.raises(ExportError, match=r"no checkpoint for step 1 in .* \(it has no checkpoints\)$"):
        resolve_checkpoint(run.parent / "empty", 1)


def test_final_and_latest_symlinks_export_their_target_step(run):
    from safetensors.torch import load_file

    def embeddings(out):
        return load_file(out / "model.safetensors")["model.embed_tokens.weight"]

    out = export_checkpoint(run)
    assert out == run / "export" / "step_000002-hf"
    (run / "checkpoints" / "final").unlink()
    latest = export_checkpoint(run)
    assert latest == run / "export" / "step_000005-hf"
    assert torch.equal(embeddings(latest), embeddings(export_checkpoint(run, 5, out=run / "five")))
    assert not torch.equal(embeddings(out), embeddings(latest))


def test_unknown_format_names_the_valid_ones(run):
    with pytest.raises(ExportError) as err:
        export_checkpoint(run, 2, fmt="gguf")
    assert str(err.value) == "unknown export format 'gguf' (valid: hf)"


def test_write_is_atomic_no_temp_left_and_no_out_after_an_error(run, monkeypatch):
    out = export_checkpoint(run, 2, out=run / "exports" / "m")
    assert sorted(p.name for p in out.parent.iterdir()) == ["m"]
    assert sorted(p.name for p in out.iterdir()) == BUILTIN_FILES  # no trainer/optimizer files
    with pytest.raises(ExportError, match="already exists"):
        export_checkpoint(run, 5, out=out)

    def fail(tok):  # after model.safetensors and config.json are written
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "hf_tokenizer", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export_checkpoint(run, 5, out=run / "exports" / "n")
    with pytest.raises(RuntimeError, match="disk full"):
        export_checkpoint(run, 5, out=out, overwrite=True)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m"]  # no n, no .n.tmp; m untouched
    assert json.loads((out / "config.json").read_text())["vocab_size"] > 0
    monkeypatch.undo()
    before = (out / "model.safetensors").read_bytes()
    export_checkpoint(run, 5, out=out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in out.parent.iterdir()) == ["m"]  # no .m.old


def test_without_tokenizers_only_the_posttrain_tokenizer_ships(run, monkeypatch):
    def missing(tok):
        raise ImportError("No module named 'tokenizers'")

    monkeypatch.setattr(export, "hf_tokenizer", missing)
    out = export_checkpoint(run, 2)
    assert sorted(p.name for p in out.iterdir()) == [f for f in BUILTIN_FILES if not f.startswith("tokenizer")]
    assert "no tokenizer.json" in (out / "README.md").read_text()


# --- built-in GPT → Qwen3 -----------------------------------------------------------------------------


def test_hf_logits_equal_ours(exported, tok):
    model, out, hf, _ = exported
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    idx = torch.randint(0, tok.vocab_size, (3, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(idx), hf(input_ids=idx).logits  # (3, 96, V)
    assert ours.abs().max() > 1.0  # logits far from uniform, so a mapping slip shows
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_greedy_continuations_are_the_same_tokens(exported, tok):
    model, _, hf, _ = exported
    convs = [ArithmeticTask(test_size=8).sft_example(random.Random(s)) for s in (1, 2)]
    for conv in convs:
        prompt = tok.render_for_completion(conv)
        ids = torch.tensor([prompt])
        with torch.no_grad():
            theirs = hf.generate(ids, do_sample=False, max_new_tokens=24)[0, len(prompt):].tolist()
            ours = []
            while len(ours) < 24 and tok.assistant_end_id not in ours:
                ours.append(int(model(ids)[0, -1].argmax()))
                ids = torch.cat([ids, torch.tensor([[ours[-1]]])], dim=1)
        assert theirs == ours and len(set(ours)) > 3


def test_config_and_weights_follow_the_mapping(exported, tok):
    model, out, hf, _ = exported
    cfg = model.config
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_act"] == "relu" and config["rms_norm_eps"] == torch.finfo(torch.float32).eps
    assert hf.config.rope_parameters["rope_theta"] == cfg.rope_base and not hf.config.tie_word_embeddings
    assert hf.generation_config.eos_token_id == tok.assistant_end_id
    layer = hf.model.layers[1]
    kv = model.blocks[1].attn.kv.weight
    assert torch.equal(layer.self_attn.k_proj.weight, kv[: cfg.n_kv_head * 8])  # head_dim 32/4
    assert torch.equal(layer.self_attn.v_proj.weight, kv[cfg.n_kv_head * 8:])
    assert torch.equal(layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight)
    norms = [layer.input_layernorm, layer.post_attention_layernorm, layer.self_attn.q_norm, hf.model.norm]
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in norms)
    rows = hf.model.embed_tokens.weight.pow(2).mean(-1)  # the RMSNorm folded in: unit RMS per row
    torch.testing.assert_close(rows, torch.ones_like(rows))
    assert "Qwen3ForCausalLM" in (out / "README.md").read_text() and "step_000002" in (out / "README.md").read_text()


# --- the tokenizer --------------------------------------------------------------------------------


def test_hf_tokenizer_gives_our_ids_on_varied_strings(exported, tok):
    _, out, _, hf_tok = exported
    every = "".join(chr(c) for c in range(0, 0x110000, 7) if not 0xD800 <= c < 0xE000)
    texts = ["What is 12 + 345?", "  leading  and trailing  ", "tabs\tand\nnew\n\n lines \n", "café naïve",
             "emoji 😀😀 and 中文", "<|bos|><|user_start|>hi<|user_end|><|assistant_start|> 4 5<|assistant_end|>",
             "\x1c\x1d x \x1fy", "٣٤ Arabic-Indic and 𑱐 newer digits", "<|bos", "1,234.5 - 0.25", "\u00a0\u2028 ",
             "a -\x1c", "####\U000116d0 is",  # words ' -', '####' end where Python's \s, \d say, not the engine's
             "", " ", "x  ", *ArithmeticTask(test_size=8).corpus(random.Random(3), n=10), every]
    for text in texts:
        ids = tok.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False) == ids, text[:40]
        if text is not every:  # ours decodes each byte run on its own; equal for these
            assert hf_tok.decode(ids) == tok.decode(ids)
    assert hf_tok.decode([tok.pad_id]) == "<|pad|>" and tok.decode([tok.pad_id]) == ""  # the documented difference
    assert (out / "posttrain_tokenizer.json").read_text() == json.dumps({"kind": "posttrain-words-v1",
                                                                         "words": tok.words})


def test_chat_template_renders_our_chat_format(exported, tok):
    _, _, _, hf_tok = exported
    ids, _ = tok.render_conversation(TOOL_CONV)
    assert hf_tok.apply_chat_template(TOOL_CONV["messages"], return_dict=True)["input_ids"] == ids
    prompt = hf_tok.apply_chat_template(TOOL_CONV["messages"][:-1], add_generation_prompt=True, return_dict=True)
    assert prompt["input_ids"] == tok.render_for_completion(TOOL_CONV)
    # consecutive text parts: one string for the template, separate encodes for us (the documented difference)
    conv = ArithmeticTask(test_size=8).sft_example(random.Random(1))
    rendered = hf_tok.apply_chat_template(conv["messages"], tokenize=False)
    assert rendered == tok.decode(tok.render_conversation(conv)[0])


def test_posttrain_loads_the_export_as_an_hf_policy(exported, tok):
    from posttrain.checkpoint import load_policy
    from posttrain.config import LoraConfig, ModelConfig

    model, out, _, _ = exported
    policy, hf_tok = load_policy(ModelConfig(str(out)), LoraConfig())
    assert hf_tok.render_conversation(TOOL_CONV) == tok.render_conversation(TOOL_CONV)  # ids and loss mask
    assert hf_tok.stop_ids == [tok.assistant_end_id]
    idx = torch.tensor([tok.render_for_completion(TOOL_CONV)])
    with torch.no_grad():
        torch.testing.assert_close(policy(idx), model(idx), atol=1e-5, rtol=0)


def test_pretoken_regex_spells_out_python_classes():
    assert pretoken_regex(r"\d") == pretoken_regex(r"[\d]")  # a lone class gets its brackets
    assert pretoken_regex(r"\S").startswith("[^\\x{9}-\\x{d}\\x{1c}-\\x{20}")  # \x1c..\x1f: Python spaces
    with pytest.raises(ValueError, match=r"cannot spell out \\S inside a character class"):
        pretoken_regex(r"[\Sa]")


# --- HF policy checkpoints ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """A run whose step 2 is a tiny Llama policy with a LoRA adapter (merged weights + adapter/), saved as
    the trainers save it, plus a critic and resume files."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from posttrain.checkpoint import load_policy
    from posttrain.config import LoraConfig, ModelConfig
    from posttrain.models.tiny_llama import make_tiny_llama

    base = tmp_path_factory.mktemp("llama")
    texts = ArithmeticTask(test_size=8).corpus(random.Random(0), n=200)
    llama = make_tiny_llama(base / "base", texts, vocab_size=320, hidden_size=32)
    policy, tok = load_policy(ModelConfig(str(llama)), LoraConfig(rank=4, alpha=8.0))
    with torch.no_grad():  # a non-zero adapter, so merged != base
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    run = base / "run"
    save_step(run, 2, policy, tok)
    (run / "checkpoints" / "step_000002" / "critic.safetensors").write_bytes(b"")
    point(run, "latest", 2)
    idx = torch.tensor([tok.encode("What is 12 + 30?")])
    with torch.no_grad():
        logits = policy(idx)
    return run, idx, logits


def test_hf_checkpoint_exports_a_plain_hf_model(llama_run):
    transformers = pytest.importorskip("transformers")
    run, idx, logits = llama_run
    out = export_checkpoint(run)
    source = {p.name for p in (run / "checkpoints" / "step_000002").iterdir()}
    exported = {p.name for p in out.iterdir()}
    # a LoRA checkpoint holds the adapter and where its base model is; the export is the merged model
    assert {"adapter", "base_model.json", "tokenizer.json"} <= source
    assert not {"config.json", "model.safetensors"} & source
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md"} <= exported
    assert not {"adapter", "base_model.json", "trainer_state.json", "optimizer.policy.json", "critic.safetensors"} \
        & exported
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=idx).logits, logits, atol=1e-5, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.encode("What is 12 + 30?") == idx[0].tolist()
    assert "LlamaForCausalLM" in (out / "README.md").read_text()
    with_adapter = export_checkpoint(run, 2, out=run / "with-adapter", adapter=True)
    assert (with_adapter / "adapter" / "adapter_config.json").exists()
    assert "`adapter/`" in (with_adapter / "README.md").read_text()


def test_adapter_flag_on_a_checkpoint_without_one_is_an_error(run):
    with pytest.raises(ExportError, match=r"adapter=True but .*step_000002 has no LoRA adapter"):
        export_checkpoint(run, 2, adapter=True)

