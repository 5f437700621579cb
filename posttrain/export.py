"""``posttrain export``: a run's checkpoint as a model directory other tools load.

Which checkpoint: ``RUN_DIR/checkpoints/step_XXXXXX`` for ``step=N``; with no step, what
``checkpoints/final`` points at, else ``checkpoints/latest`` (symlinks, or plain directories in older
runs, are resolved). A step with no checkpoint is an :class:`ExportError` listing the steps that have one.

Where: ``out``, by default ``RUN_DIR/export/step_XXXXXX-hf``. The export is written to the hidden
``.NAME.tmp`` next to ``out`` and renamed into place, so a crash or an error mid-way leaves no ``out``
(never a half-written one). An existing ``out`` is an error unless ``overwrite=True``.

Format ``hf`` (the only one so far) is a plain Hugging Face model directory:
``AutoModelForCausalLM.from_pretrained(out)`` and ``AutoTokenizer.from_pretrained(out)`` load it, and so
does posttrain itself (``model.path=out``). Every export has a ``README.md`` model card (files,
architecture, how to load it, source run and step).

* **HF policy checkpoint** → its model files are copied: ``config.json``, ``generation_config.json``,
  the safetensors weights (LoRA already merged), the tokenizer files and the chat template. Trainer
  state, optimizer/RNG state, extra modules (the PPO critic) and the run config stay behind; the LoRA
  adapter (``adapter/``) comes along only with ``adapter=True``.
* **Built-in GPT** → a ``Qwen3ForCausalLM`` that computes the same function (``model.safetensors``,
  ``config.json``, ``generation_config.json``). The mapping, layer ``i`` (C = n_embd, D = C/n_head)::

      model.embed_tokens            = rms_norm(wte) row by row   (our RMSNorm of the embeddings, folded)
      layers.i.self_attn.q_proj     = blocks.i.attn.q
      layers.i.self_attn.k_proj     = blocks.i.attn.kv rows [0, n_kv_head·D)
      layers.i.self_attn.v_proj     = blocks.i.attn.kv rows [n_kv_head·D, 2·n_kv_head·D)
      layers.i.self_attn.o_proj     = blocks.i.attn.proj
      layers.i.mlp.gate_proj        = layers.i.mlp.up_proj = blocks.i.fc,   hidden_act = "relu"
      layers.i.mlp.down_proj        = blocks.i.out
      lm_head                       = lm_head                    (untied)
      every RMSNorm weight (input, post-attention, q_norm, k_norm, final) = 1

  It is exact because: ``down(relu(gate x) · up x)`` with gate = up is relu(z)·z = relu(z)², bit for bit;
  rotary is the same "halves" rotation with inv_freq = 1/base^(2i/D) (``rope_theta`` = rope_base); Qwen3
  applies QK-norm before rotary and we after, but a rotation keeps the RMS of a head vector, so a
  weight-1 RMSNorm commutes with it; ``rms_norm_eps`` = ``torch.finfo(dtype).eps``, the default of
  ``F.rms_norm``. What remains is float rounding: logits agree to a few 1e-6 (the tests assert 1e-5, and
  identical greedy tokens). transformers ≥ 4.51 has Qwen3; vLLM's Qwen2/Qwen3 MLPs implement SiLU only,
  so vLLM will likely refuse ``hidden_act = "relu"``.

  Tokenizer: ``posttrain_tokenizer.json`` is the built-in tokenizer unchanged (``Tokenizer.load``). With
  the ``tokenizers`` library installed there is also a real HF tokenizer (``tokenizer.json`` +
  ``tokenizer_config.json`` with a chat template) giving the same ids as ``Tokenizer.encode``: the
  specials are added tokens; the pre-token regex is ours with ``\\s``/``\\d`` spelled out as the
  exporting Python's classes (the regex engine of ``tokenizers`` knows other Unicode digits and
  spaces); a ByteLevel step maps each pre-token to byte characters; a BPE model with no merges and
  ``ignore_merges`` takes a whole pre-token when it is a word of ours, else its bytes, exactly our byte
  fallback. Differences: HF ``decode`` writes ``<|pad|>`` where ours drops it (``skip_special_tokens``
  drops all specials); the chat template renders an assistant turn's consecutive text parts as one
  string where ``render_conversation`` encodes them one by one (ids differ only if a pre-token spans
  the seam). The chat template has no ``{% generation %}`` markers (posttrain's HF path masks by
  character spans; TRL's ``assistant_only_loss`` would need them).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from posttrain.checkpoint import is_builtin_checkpoint, move_into_place
from posttrain.models.gpt import GPTConfig
from posttrain.tokenizer import _PRETOKEN, SPECIAL_TOKENS, Tokenizer

if TYPE_CHECKING:
    import tokenizers

FORMATS = ("hf",)
STEP_DIR = re.compile(r"step_(\d+)")
# What an HF checkpoint dir holds that belongs to the model (the rest is resume state).
HF_MODEL_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "model-*-of-*.safetensors", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
    "chat_template.json",
)
CHAT_TEMPLATE = (  # renders Tokenizer.render_conversation's format; see the tokenizer module
    "{%- set ns = namespace(system='') -%}<|bos|>"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] + '\\n' -%}"
    "{%- elif m['role'] == 'user' -%}<|user_start|>{{ ns.system + m['content'] }}<|user_end|>"
    "{%- set ns.system = '' -%}"
    "{%- elif m['role'] == 'assistant' -%}<|assistant_start|>"
    "{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}{%- for p in m['content'] -%}"
    "{%- if p['type'] == 'text' -%}{{ p['text'] }}"
    "{%- elif p['type'] == 'tool_call' -%}<|tool_start|>{{ p['text'] }}<|tool_end|>"
    "{%- elif p['type'] == 'tool_output' -%}<|output_start|>{{ p['text'] }}<|output_end|>"
    "{%- else -%}{{ raise_exception('unknown assistant part type ' + p['type']) }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}<|assistant_end|>"
    "{%- else -%}{{ raise_exception('unknown role ' + m['role']) }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)


class ExportError(ValueError):
    """The export cannot be made as asked (no such checkpoint, unknown format, ``out`` exists)."""


# --- which checkpoint, where ------------------------------------------------------------------


def checkpoint_steps(run_dir: str | Path) -> list[int]:
    """Steps with a ``checkpoints/step_XXXXXX`` directory, ascending (temporary dirs start with a dot)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := STEP_DIR.fullmatch(p.name)) and p.is_dir())


def resolve_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """The checkpoint directory of ``step`` (None: ``final``, else ``latest``), symlinks resolved."""
    root = Path(run_dir) / "checkpoints"
    names = ["final", "latest"] if step is None else [f"step_{step:06d}"]
    for name in names:
        if (root / name).is_dir():
            return (root / name).resolve()
    steps = checkpoint_steps(run_dir)
    have = f"steps with a checkpoint: {', '.join(map(str, steps))}" if steps else "it has no checkpoints"
    what = "neither 'final' nor 'latest'" if step is None else f"no checkpoint for step {step}"
    raise ExportError(f"{what} in {root} ({have})")


def _label(checkpoint: Path) -> str:
    """``step_XXXXXX`` of a checkpoint dir (its name, else the step in ``trainer_state.json``)."""
    if STEP_DIR.fullmatch(checkpoint.name):
        return checkpoint.name
    state = checkpoint / "trainer_state.json"
    step = json.loads(state.read_text()).get("step") if state.exists() else None
    return f"step_{step:06d}" if isinstance(step, int) else checkpoint.name


@contextmanager
def _atomic_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary dir next to ``out``; on success it becomes ``out``, on error it is removed."""
    if out.exists() and not (overwrite and out.is_dir()):
        raise ExportError(f"{out} already exists; remove it or choose another output (or overwrite=True)")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an export that was killed
    tmp.mkdir(parents=True)
    try:
        yield tmp
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_checkpoint(run_dir: str | Path, step: int | None = None, fmt: str = "hf", out: str | Path | None = None,
                      *, adapter: bool = False, overwrite: bool = False) -> Path:
    """Export the checkpoint of ``step`` (None: final, else latest) of ``run_dir`` in format ``fmt``.

    ``out`` defaults to ``run_dir/export/step_XXXXXX-hf``; ``adapter`` also copies an HF checkpoint's LoRA
    adapter dir; ``overwrite`` replaces an existing ``out``. Returns ``out``. See the module docstring.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format '{fmt}' (valid: {', '.join(FORMATS)})")
    checkpoint = resolve_checkpoint(run_dir, step)
    out = Path(out).absolute() if out is not None else Path(run_dir) / "export" / f"{_label(checkpoint)}-{fmt}"
    builtin = is_builtin_checkpoint(checkpoint)
    if adapter and (builtin or not (checkpoint / "adapter").is_dir()):
        raise ExportError(f"adapter=True but {checkpoint} has no LoRA adapter (no adapter/ directory)")
    with _atomic_dir(out, overwrite) as tmp:
        files = export_builtin(checkpoint, tmp) if builtin else export_hf_checkpoint(checkpoint, tmp, adapter)
        card = _builtin_card if builtin else _hf_card
        config = json.loads((tmp / "config.json").read_text())
        (tmp / "README.md").write_text(card(config, checkpoint, out, files))
    return out


# --- HF policy checkpoints ----------------------------------------------------------------------


def export_hf_checkpoint(checkpoint: Path, dst: Path, adapter: bool = False) -> list[str]:
    """Copy the model files of an HF checkpoint (and ``adapter/`` if asked) into ``dst``; returns their names. A
    LoRA checkpoint (its adapter and ``base_model.json``) is first merged: its base model loaded, the adapter
    merged into it in place, written out."""
    from posttrain.models.hf_base import BASE_FILE

    if (checkpoint / BASE_FILE).is_file():
        from posttrain.models.hf import load_hf

        dtype = json.loads((checkpoint / BASE_FILE).read_text()).get("dtype", "float32")  # as trained
        policy, tokenizer = load_hf(str(checkpoint), dtype)
        merged = dst / ".merged"
        policy.hf.save_pretrained(merged)
        tokenizer.save_pretrained(merged)
        names = export_hf_checkpoint(merged, dst)
        shutil.rmtree(merged)
        if adapter:
            shutil.copytree(checkpoint / "adapter", dst / "adapter")
            names.append("adapter/")
        return names
    names = sorted({p.name for pattern in HF_MODEL_FILES for p in checkpoint.glob(pattern) if p.is_file()})
    if "config.json" not in names:
        raise ExportError(f"{checkpoint} is neither a built-in checkpoint (model.json) nor an HF one (config.json)")
    for name in names:
        shutil.copy2(checkpoint / name, dst / name)
    if adapter:
        shutil.copytree(checkpoint / "adapter", dst / "adapter")
        names.append("adapter/")
    return names


# --- built-in GPT → Qwen3 -----------------------------------------------------------------------


def qwen3_state_dict(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """The built-in GPT's ``state_dict`` as ``Qwen3ForCausalLM`` weights (mapping in the module docstring)."""
    wte = state["wte.weight"]  # (V, C)
    C, D = config.n_embd, config.n_embd // config.n_head
    kv_rows = config.n_kv_head * D

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=wte.dtype)

    out = {"model.embed_tokens.weight": F.rms_norm(wte, (C,)), "model.norm.weight": ones(C),
           "lm_head.weight": state["lm_head.weight"]}
    for i in range(config.n_layer):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        kv = state[src + "attn.kv.weight"]  # (2·H_kv·D, C): keys first, then values
        out |= {
            dst + "input_layernorm.weight": ones(C),
            dst + "post_attention_layernorm.weight": ones(C),
            dst + "self_attn.q_proj.weight": state[src + "attn.q.weight"],
            dst + "self_attn.k_proj.weight": kv[:kv_rows],
            dst + "self_attn.v_proj.weight": kv[kv_rows:],
            dst + "self_attn.o_proj.weight": state[src + "attn.proj.weight"],
            dst + "self_attn.q_norm.weight": ones(D),
            dst + "self_attn.k_norm.weight": ones(D),
            dst + "mlp.gate_proj.weight": state[src + "fc.weight"],
            dst + "mlp.up_proj.weight": state[src + "fc.weight"],
            dst + "mlp.down_proj.weight": state[src + "out.weight"],
        }
    return {k: v.detach().clone().contiguous() for k, v in out.items()}  # no shared storage (safetensors)


def qwen3_config(config: GPTConfig, tok: Tokenizer, dtype: torch.dtype = torch.float32) -> dict:
    """``config.json`` of the Qwen3 equivalent of a built-in GPT (``rope_theta`` kept at the top level too,
    for transformers 4, next to transformers 5's ``rope_parameters``)."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": 4 * config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.n_embd // config.n_head,
        "hidden_act": "relu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": torch.finfo(dtype).eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
        "rope_theta": config.rope_base,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": config.n_layer,
        "layer_types": ["full_attention"] * config.n_layer,
        "use_cache": True,
        "initializer_range": 0.02,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.assistant_end_id,
        "pad_token_id": tok.pad_id,
        "dtype": str(dtype).removeprefix("torch."),
    }


def export_builtin(checkpoint: Path, dst: Path) -> list[str]:
    """Write the Qwen3 form of a built-in checkpoint into ``dst``; returns the file names written."""
    config = GPTConfig(**json.loads((checkpoint / "model.json").read_text()))
    tok = Tokenizer.load(checkpoint / "tokenizer.json")
    state = load_file(checkpoint / "model.safetensors")
    dtype = state["wte.weight"].dtype
    save_file(qwen3_state_dict(state, config), dst / "model.safetensors", metadata={"format": "pt"})
    hf_config = qwen3_config(config, tok, dtype)
    _write_json(dst / "config.json", hf_config)
    _write_json(dst / "generation_config.json", {k: hf_config[k] for k in ("bos_token_id", "eos_token_id",
                                                                             "pad_token_id")})
    shutil.copyfile(checkpoint / "tokenizer.json", dst / "posttrain_tokenizer.json")
    names = ["config.json", "generation_config.json", "model.safetensors", "posttrain_tokenizer.json"]
    try:
        hf_tokenizer(tok).save(str(dst / "tokenizer.json"))
    except ImportError:  # core install: the built-in tokenizer file only (the model card says so)
        return names
    _write_json(dst / "tokenizer_config.json", hf_tokenizer_config(config.max_seq_len))
    return [*names, "tokenizer.json", "tokenizer_config.json"]


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


# --- the built-in tokenizer as an HF tokenizer --------------------------------------------------


def byte_chars() -> list[str]:
    """The ByteLevel alphabet: byte b → one printable character (printable Latin-1 bytes stand for
    themselves, the other 68 bytes for U+0100 onwards, in byte order)."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars, extra = [], 0
    for b in range(256):
        chars.append(chr(b) if b in printable else chr(0x100 + extra))
        extra += b not in printable
    return chars


@functools.cache  # 1.1M calls of ``keep``: ~0.2 s, the same answer every time
def _char_class(keep: Callable[[str], bool]) -> str:
    """A regex character-class body (``\\x{..}`` ranges) of the code points ``keep`` accepts."""
    ranges, start = [], None
    for c in range(0x110001):
        ok = c < 0x110000 and not 0xD800 <= c < 0xE000 and keep(chr(c))
        if ok and start is None:
            start = c
        elif not ok and start is not None:
            ranges.append((start, c - 1))
            start = None
    return "".join(f"\\x{{{a:x}}}" if a == b else f"\\x{{{a:x}}}-\\x{{{b:x}}}" for a, b in ranges)


def pretoken_regex(pattern: str = _PRETOKEN.pattern) -> str:
    """``pattern`` for the ``tokenizers`` regex engine: ``\\s``/``\\S`` and ``\\d``/``\\D`` spelled out as the
    character classes Python's ``re`` gives them (str.isspace, str.isdecimal); the engine's own differ."""
    classes = {"s": _char_class(str.isspace), "d": _char_class(str.isdecimal)}
    out, in_class = [], False
    for piece in re.findall(r"\\.|.", pattern, flags=re.DOTALL):  # an escape stays one piece
        body = classes.get(piece[1:].lower()) if piece.startswith("\\") else None
        if body is None:
            in_class = (in_class or piece == "[") and piece != "]"
        elif piece[1].isupper():  # \S, \D: the complement
            if in_class:
                raise ValueError(f"cannot spell out {piece} inside a character class: {pattern}")
            piece = f"[^{body}]"
        else:
            piece = body if in_class else f"[{body}]"
        out.append(piece)
    return "".join(out)


def hf_tokenizer(tok: Tokenizer) -> tokenizers.Tokenizer:
    """A ``tokenizers.Tokenizer`` whose ``encode(text).ids`` equal ``tok.encode(text)`` (module docstring)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as FastTokenizer

    alphabet = byte_chars()
    vocab = {}
    for i, token in enumerate(tok.id_to_token):
        raw = token if isinstance(token, bytes) else token.encode()
        vocab[token if token in SPECIAL_TOKENS else "".join(alphabet[b] for b in raw)] = i
    fast = FastTokenizer(models.BPE(vocab, [], ignore_merges=True))
    fast.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pretoken_regex()), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    fast.decoder = decoders.ByteLevel()
    fast.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    return fast


def hf_tokenizer_config(max_len: int) -> dict:
    """``tokenizer_config.json``: the tokenizer.json as is, our specials, the chat template, no clean-up."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|assistant_end|>",
        "pad_token": "<|pad|>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "chat_template": CHAT_TEMPLATE,
    }


# --- model cards --------------------------------------------------------------------------------


def _file_list(files: list[str], notes: dict[str, str]) -> str:
    return "\n".join(f"- `{name}`" + (f": {notes[name]}" if name in notes else "") for name in files)


def _builtin_card(config: dict, checkpoint: Path, out: Path, files: list[str]) -> str:
    """README.md of a built-in export; ``config``: its config.json."""
    has_hf_tokenizer = "tokenizer.json" in files
    notes = {
        "config.json": "Qwen3 config (transformers)",
        "generation_config.json": "bos/eos/pad ids; generation stops at `<|assistant_end|>`",
        "model.safetensors": "the weights, Qwen3 names",
        "posttrain_tokenizer.json": "the posttrain tokenizer, unchanged (`posttrain.tokenizer.Tokenizer.load`)",
        "tokenizer.json": "the same tokenizer for the `tokenizers` library (same ids)",
        "tokenizer_config.json": "special tokens and the chat template of the posttrain chat format",
    }
    tokenizer_line = (
        "tok = AutoTokenizer.from_pretrained(path)\n"
        'ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}],\n'
        "                              add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)\n"
        "out = model.generate(**ids, max_new_tokens=32)\n"
        "print(tok.decode(out[0], skip_special_tokens=True))"
        if has_hf_tokenizer else
        "# no tokenizer.json: the `tokenizers` library was missing at export time; use posttrain_tokenizer.json"
    )
    return f"""# posttrain built-in GPT, exported to Hugging Face format

Exported by `posttrain export` from `{checkpoint}`.

## Files
{_file_list(files + ["README.md"], notes | {"README.md": "this card"})}

## Architecture
The posttrain built-in GPT, stored as a `Qwen3ForCausalLM` that computes the same logits (to float
rounding, a few 1e-6): {config["num_hidden_layers"]} layers, width {config["hidden_size"]}, \
{config["num_attention_heads"]} query heads and {config["num_key_value_heads"]} key/value heads of size \
{config["head_dim"]}, ReLU² MLP of width {config["intermediate_size"]} (gate = up, `hidden_act = "relu"`), \
rotary positions (theta {config["rope_parameters"]["rope_theta"]:g}, at most {config["max_position_embeddings"]} \
tokens), QK-norm, RMSNorm without learned scale (all norm weights 1), untied LM head, no biases, \
vocabulary {config["vocab_size"]}. The embedding table already holds the RMS-normalised embeddings.
vLLM's Qwen3 implements only SiLU MLPs, so it will likely not load this model; transformers does.

Chat format: `<|bos|><|user_start|>question<|user_end|><|assistant_start|>answer<|assistant_end|>`,
tool calls as `<|tool_start|>expr<|tool_end|><|output_start|>result<|output_end|>`.

## Load with transformers
```python
from transformers import AutoModelForCausalLM, AutoTokenizer

path = "{out}"
model = AutoModelForCausalLM.from_pretrained(path)
{tokenizer_line}
```

## Load with posttrain
```python
from posttrain.checkpoint import load_policy
from posttrain.config import LoraConfig, ModelConfig

policy, tokenizer = load_policy(ModelConfig("{out}"), LoraConfig())  # an HF policy
```
or `posttrain eval --model {out} --task arithmetic`. The original checkpoint loads with
`posttrain.checkpoint.load_checkpoint("{checkpoint}")`.
"""


def _hf_card(config: dict, checkpoint: Path, out: Path, files: list[str]) -> str:
    """README.md of an HF checkpoint's export; ``config``: its config.json."""
    arch = ", ".join(config.get("architectures") or [config.get("model_type", "unknown")])
    notes = {"adapter/": "the LoRA adapter alone (peft); the weights above already include it"}
    return f"""# posttrain policy, exported to Hugging Face format

Exported by `posttrain export` from `{checkpoint}`. A Hugging Face causal LM ({arch}) trained with
posttrain; any LoRA adapter is merged into the weights.

## Files
{_file_list(files + ["README.md"], notes | {"README.md": "this card"})}

## Load with transformers
```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{out}")
tok = AutoTokenizer.from_pretrained("{out}")
```

## Load with posttrain
```python
from posttrain.checkpoint import load_policy
from posttrain.config import LoraConfig, ModelConfig

policy, tokenizer = load_policy(ModelConfig("{out}"), LoraConfig())
```
"""
