"""Hugging Face causal LMs behind the interface the built-in GPT has, so the engine and every trainer
drive either one.

* :class:`HFPolicy` wraps an ``AutoModelForCausalLM`` (optionally with a peft LoRA adapter):
  ``policy(idx)`` → logits (B, T, V) fp32, ``policy(idx, targets)`` → per-token log-probs (B, T) and
  ``policy.logprobs(idx, targets, temperature, entropy)`` → (log-probs, entropy), both computed in
  chunks from the decoder's last hidden states, never the full logits (:mod:`posttrain.models.logprobs`),
  ``policy(idx, cache=..., pad_mask=...)`` → logits of the last position, appending to an
  :class:`HFCache` (the model's own ``DynamicCache`` plus the attention mask and positions of
  left-padded rows, so the engine's prefix sharing and row compaction work unchanged).
* :class:`HFTokenizer` wraps the model's tokenizer: the chat template renders prompts, and the
  assistant-only loss mask comes from character spans of the rendered assistant turns.
* :func:`load_hf` reads a local directory, a hub id or a GGUF file; :meth:`HFPolicy.save_pretrained`
  writes a directory ``AutoModelForCausalLM.from_pretrained`` (and vLLM) load as is.

With LoRA on, the reference policy is the same module with the adapter disabled
(:meth:`HFPolicy.reference`): no second copy of the weights.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from posttrain.models.gpt import doc_positions
from posttrain.models.hf_base import BASE_FILE, add_tool_tokens, load_adapter_checkpoint, write_base
from posttrain.models.logprobs import token_logprobs_from_hidden

TOOL_TOKENS = ("<|tool_start|>", "<|tool_end|>", "<|output_start|>", "<|output_end|>")
# Used only when a tokenizer has no chat template of its own (base models): plain role-tagged turns.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
# Attention implementations whose masks keep packed examples apart (transformers' create_causal_mask).
PACKING_ATTENTION = ("sdpa", "eager", "flex_attention")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Config attributes by which some families scale the LM head's output, each its own way (Cohere
# logit_scale ×, Granite logits_scaling ÷, HyperCLOVAX logits_scaling ×, Muse output_multiplier ×).
LOGIT_SCALES = ("logit_scale", "logits_scaling", "output_multiplier")


def _require_hf():
    try:
        import transformers
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("Hugging Face models need the extra: pip install 'posttrain[hf]'") from None
    return transformers


def _buffered_layer_class():
    """A transformers cache layer that appends into a preallocated buffer (built on first use, so
    transformers is imported only with an HF model)."""
    from transformers.cache_utils import DynamicLayer

    class BufferedLayer(DynamicLayer):
        """DynamicLayer whose keys/values live in a buffer of ``capacity`` positions: a step writes its
        new keys in place and exposes a view, instead of concatenating (a full copy of the cache per
        step and layer). The buffer doubles if a row ever outgrows it."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.length = capacity, 0
            self.buf_k = self.buf_v = None  # (B, H, capacity, D)

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if self.buf_k is None or end > self.buf_k.shape[-2]:
                self._grow(key_states, value_states, max(end, 2 * self.length, self.capacity))
            self.buf_k[..., self.length : end, :] = key_states
            self.buf_v[..., self.length : end, :] = value_states
            self.length = end
            self.keys, self.values = self.buf_k[..., :end, :], self.buf_v[..., :end, :]
            return self.keys, self.values

        def _grow(self, k, v, size: int) -> None:
            new_k = k.new_empty(*k.shape[:-2], size, k.shape[-1])
            new_v = v.new_empty(*v.shape[:-2], size, v.shape[-1])
            if self.buf_k is not None:
                new_k[..., : self.length, :] = self.buf_k[..., : self.length, :]
                new_v[..., : self.length, :] = self.buf_v[..., : self.length, :]
            self.buf_k, self.buf_v = new_k, new_v

        def get_seq_length(self) -> int:
            return self.length

        def reorder_cache(self, beam_idx) -> None:
            if self.buf_k is not None:
                self.buf_k = self.buf_k.index_select(0, beam_idx.to(self.buf_k.device))
                self.buf_v = self.buf_v.index_select(0, beam_idx.to(self.buf_v.device))
                self.keys, self.values = self.buf_k[..., : self.length, :], self.buf_v[..., : self.length, :]

    return BufferedLayer


def new_kv_cache(config, capacity: int):
    """The KV cache for decoding: buffered layers (no per-step copy) when every layer is full
    attention, else the model's own DynamicCache (sliding-window or linear-attention layers)."""
    from transformers import DynamicCache
    from transformers.cache_utils import Cache

    text = config.get_text_config(decoder=True)
    types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    if all(t == "full_attention" for t in types):
        layer = _buffered_layer_class()
        return Cache(layers=[layer(capacity) for _ in types])
    return DynamicCache(config=config)


class HFCache:
    """Decoding state of a batch of rows: the model's KV cache, the (B, S) attention mask (0 on left
    pads) and each row's next position id. ``select`` keeps rows in a given order, as KVCache does."""

    def __init__(self, config, capacity: int):
        self.kv = new_kv_cache(config, capacity)
        self.attention_mask: torch.Tensor | None = None  # (B, S) long
        self.next_pos: torch.Tensor | None = None  # (B,) long

    def select(self, rows: torch.Tensor) -> None:
        self.kv.reorder_cache(rows)
        self.attention_mask = self.attention_mask.index_select(0, rows)
        self.next_pos = self.next_pos.index_select(0, rows)


def read_chat_template(given: str) -> str:
    """``model.chat_template`` as template text: Jinja text as it is (it holds ``{{`` or ``{%``), else a file to
    read; ConfigError when that file does not exist (a mistyped path must not become the template)."""
    if "{{" in given or "{%" in given:
        return given
    path = Path(given).expanduser()
    if not path.is_file():
        from posttrain.config_checks import ConfigError

        raise ConfigError(f"config key 'model.chat_template' is neither a Jinja template (no '{{{{' or '{{%') nor "
                          f"an existing file: {given}")
    return path.read_text()


class HFPolicy(nn.Module):
    """An HF causal LM with the built-in GPT's calling conventions (see the module docstring)."""

    def __init__(self, hf_model: nn.Module, base: dict | None = None):
        super().__init__()
        self.hf = hf_model
        self.base = base  # how load_hf rebuilds the model under the adapter (path, dtype, tool_tokens), or None
        base = hf_model.get_base_model() if hasattr(hf_model, "get_base_model") else hf_model
        # transformers renamed forward's past_key_values to cache (the old name warns, and goes in 5.40)
        self._cache_argument = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def hidden_size(self) -> int:
        return self.hf.config.get_text_config().hidden_size

    @property
    def is_lora(self) -> bool:
        return hasattr(self.hf, "disable_adapter")

    def new_cache(self, batch: int, max_len: int) -> HFCache:
        return HFCache(self.hf.config, max_len)

    def forward(self, idx, targets=None, cache: HFCache | None = None, pad_mask=None, doc_ids=None):
        """``idx`` (B, T) → logits (B, T, V) fp32 or log-probs of ``targets`` (B, T) (chunked, as
        :meth:`logprobs` at temperature 1); with ``cache`` the tokens are appended to it and only the
        last position's logits (B, 1, V) come back.
        ``doc_ids`` (B, T) (no cache): packed rows, as the built-in GPT takes them. They become position
        ids that restart at each example and no attention mask, from which transformers builds the
        block-diagonal causal mask (check :meth:`packing_problem` first)."""
        if cache is None and targets is not None:
            return self.logprobs(idx, targets, doc_ids=doc_ids)[0]
        if cache is None:
            packed = {} if doc_ids is None else {"position_ids": doc_positions(doc_ids)}
            return self.hf(input_ids=idx, use_cache=False, **packed).logits.float()  # (B, T, V)
        B, T = idx.shape
        if pad_mask is not None:  # prefill of left-padded rows: positions start at each row's first token
            cache.attention_mask = pad_mask.long()
            positions = (cache.attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
            cache.next_pos = cache.attention_mask.sum(-1)
        else:
            ones = torch.ones(B, T, dtype=torch.long, device=idx.device)
            cache.attention_mask = torch.cat([cache.attention_mask, ones], dim=1)
            positions = cache.next_pos[:, None] + torch.arange(T, device=idx.device)  # (B, T)
            cache.next_pos = cache.next_pos + T
        out = self.hf(input_ids=idx, attention_mask=cache.attention_mask, position_ids=positions,
                      **{self._cache_argument: cache.kv}, use_cache=True, logits_to_keep=1)
        kv = getattr(out, "cache", None)  # (named past_key_values before transformers' rename)
        cache.kv = kv if kv is not None else out.past_key_values
        return out.logits.float()  # (B, 1, V)

    def logprobs(self, idx, targets, temperature: float = 1.0, entropy: bool = False, doc_ids=None,
                 chunk_tokens: int = 1024):
        """log softmax(logits/τ)[target] (B, T) and, with ``entropy``, the entropy of softmax(logits/τ)
        (B, T) (else None); target −1 → 0 in both. The decoder's last hidden states go through
        :meth:`logits_head` in chunks of completion positions only: no (B, T, V) tensor, in forward or
        backward. ``doc_ids``: packed rows, as in :meth:`forward`; ``chunk_tokens``: positions per head call."""
        head = self.logits_head()
        packed = {} if doc_ids is None else {"position_ids": doc_positions(doc_ids)}
        h = self._decoder()(input_ids=idx, use_cache=False, **packed).last_hidden_state  # (B, T, C)
        return token_logprobs_from_hidden(h, head, targets, temperature, entropy, chunk_tokens)

    def logits_head(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The map hidden states (..., C) → logits (..., V) that the model's own forward applies: its
        output embeddings, then c·tanh(x / c) when the config has ``final_logit_softcapping`` c (Gemma).
        Families that scale their logits otherwise (the attributes in ``LOGIT_SCALES``; Cohere multiplies,
        Granite divides, …) raise a ValueError rather than give the log-probs of other logits."""
        text = self.hf.config.get_text_config()
        for name in LOGIT_SCALES:
            if getattr(text, name, None) not in (None, 1, 1.0):
                raise ValueError(f"this model ({text.model_type}) scales its logits by config.{name}="
                                 f"{getattr(text, name)}, which the chunked log-probs do not reproduce (they "
                                 f"support a plain LM head and final_logit_softcapping)")
        out = self.hf.get_output_embeddings()
        cap = getattr(text, "final_logit_softcapping", None)
        return out if cap is None else lambda h: cap * torch.tanh(out(h) / cap)

    def _decoder(self) -> nn.Module:
        """The transformer under the LM head (with LoRA: its layers carry the adapter); it returns the
        final normalised hidden states and computes no logits."""
        return (self.hf.get_base_model() if self.is_lora else self.hf).get_decoder()

    def hidden_states(self, idx, pad_mask=None, doc_ids=None) -> torch.Tensor:
        """The final normalised hidden states (B, T, C) the LM head reads (for value/reward heads).
        ``pad_mask`` (B, T): real tokens (pads anywhere are masked out, positions count real tokens);
        ``doc_ids`` (B, T): packed rows, as in :meth:`forward` (not with ``pad_mask``)."""
        if pad_mask is not None and doc_ids is not None:
            raise ValueError("doc_ids (packed rows) cannot be combined with a pad_mask")
        kwargs = {}
        if pad_mask is not None:
            kwargs = {"attention_mask": pad_mask.long(), "position_ids": (pad_mask.long().cumsum(-1) - 1).clamp(min=0)}
        elif doc_ids is not None:
            kwargs = {"position_ids": doc_positions(doc_ids)}
        return self._decoder()(input_ids=idx, use_cache=False, **kwargs).last_hidden_state

    def enable_activation_checkpointing(self) -> None:
        """transformers' activation checkpointing, non-reentrant (``use_reentrant=False``, which works
        with LoRA's frozen base): in training mode each decoder layer recomputes its activations in backward."""
        kwargs = {"use_reentrant": False}
        if hasattr(self.hf, "activation_checkpointing_enable"):  # the current name
            self.hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # older transformers
            self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def packing_problem(self) -> str | None:
        """Why packed rows (``doc_ids``) would not compute what the examples compute alone, or None.
        transformers keeps packed examples apart (from position ids that restart) in the masks it builds
        for sdpa, eager and flex attention; flash attention does so for a single row only, and layers
        that are not attention (linear attention, state-space) carry state from one example to the next."""
        config = self.hf.config
        impl = config._attn_implementation
        if impl not in PACKING_ATTENTION:
            return (f"this model's attention implementation '{impl}' does not keep packed examples apart "
                    f"(packing works with {', '.join(PACKING_ATTENTION)})")
        text = config.get_text_config(decoder=True)
        other = sorted(set(getattr(text, "layer_types", None) or []) - {"full_attention", "sliding_attention"})
        if other:
            return f"this model has {', '.join(other)} layers, which carry state across packed examples"
        return None

    def critic_trunk(self) -> HFPolicy:
        """A copy for a value model (PPO's critic): without the LM head (``hidden_states`` never reads it); with
        LoRA the base stays frozen and only the copy's own adapter (the policy's starting one) trains, so the critic
        trains as many weights as the policy, not the whole model; otherwise every weight trains."""
        trunk = copy.deepcopy(self)
        (trunk.hf.get_base_model() if trunk.is_lora else trunk.hf).set_output_embeddings(nn.Identity())
        for name, param in trunk.named_parameters():
            param.requires_grad_(not trunk.is_lora or "lora_" in name)
        return trunk

    def reference(self) -> nn.Module:
        """The frozen starting policy for KL terms: with LoRA, this very model with its adapter off
        (shared storage, nothing copied); otherwise a frozen copy."""
        if self.is_lora:
            return _AdapterOff(self)
        return copy.deepcopy(self).requires_grad_(False)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, path: str | Path) -> None:
        """HF format in ``path`` (config.json + model.safetensors). With LoRA: the adapter alone in
        ``path/adapter`` and ``base_model.json``, where the model under it comes from (:func:`load_hf` merges the
        two; ``posttrain export`` writes the merged model); a LoRA model of unknown origin is saved merged."""
        path = Path(path)
        if self.is_lora:
            self.hf.save_pretrained(path / "adapter")
            if self.base is not None:
                write_base(self.base, path, next(self.hf.parameters()).dtype)
                return
            copy.deepcopy(self.hf).merge_and_unload().save_pretrained(path)
        else:
            self.hf.save_pretrained(path)


    def load_weights(self, path: str | Path) -> None:
        """Put back the trained weights a :meth:`save_pretrained` wrote to ``path`` (exact resume): the
        adapter with LoRA, otherwise the whole model."""
        path = Path(path)
        if self.is_lora:
            import peft
            from safetensors.torch import load_file

            peft.set_peft_model_state_dict(self.hf, load_file(path / "adapter" / "adapter_model.safetensors"))
            return
        saved = type(self.hf).from_pretrained(path, dtype=next(self.hf.parameters()).dtype)
        self.hf.load_state_dict(saved.state_dict())


class _AdapterOff(nn.Module):
    """A view of a LoRA policy with its adapter disabled: the base model, frozen, sharing storage."""

    def __init__(self, policy: HFPolicy):
        super().__init__()
        self._policy = [policy]  # a list, so the policy's parameters are not registered twice

    def forward(self, idx, targets=None):
        policy = self._policy[0]
        with torch.no_grad(), policy.hf.disable_adapter():
            return policy(idx, targets)

    def logprobs(self, idx, targets, temperature: float = 1.0, entropy: bool = False, doc_ids=None,
                 chunk_tokens: int = 1024):
        """:meth:`HFPolicy.logprobs` of the base model (adapter off), without grad."""
        policy = self._policy[0]
        with torch.no_grad(), policy.hf.disable_adapter():
            return policy.logprobs(idx, targets, temperature, entropy, doc_ids, chunk_tokens)

    def packing_problem(self) -> str | None:
        return self._policy[0].packing_problem()

    def train(self, mode: bool = True):  # the view has no state of its own; scoring toggles eval()
        return self


class HFTokenizer:
    """An HF tokenizer with the built-in tokenizer's interface: ``encode``/``decode``, ``pad_id``,
    ``stop_ids``, ``render_conversation`` → (ids, loss_mask) and ``render_for_completion`` → ids.

    Conversations are rendered with the tokenizer's chat template. Assistant ``content`` may be a list
    of parts (text, tool_call, tool_output); tool calls become ``<|tool_start|>expr<|tool_end|>`` and
    outputs ``<|output_start|>result<|output_end|>`` when the tokenizer has those tokens
    (``tool_tokens`` on load), plain text otherwise. Loss mask: 1 on the characters of each assistant
    turn's content and of the template text that closes it (the end-of-turn token), 0 elsewhere and on
    tool outputs; a token counts when its first character does.
    """

    def __init__(self, hf_tokenizer, extra_stop_ids: tuple[int, ...] = ()):
        self.hf = hf_tokenizer
        if not getattr(hf_tokenizer, "chat_template", None):
            hf_tokenizer.chat_template = FALLBACK_TEMPLATE
        pad = hf_tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else hf_tokenizer.eos_token_id
        self.stop_ids = sorted({hf_tokenizer.eos_token_id, *extra_stop_ids} - {None})
        vocab = hf_tokenizer.get_vocab()
        ids = [vocab.get(t) for t in TOOL_TOKENS]
        self.has_tools = None not in ids
        self.tool_start_id, self.tool_end_id, self.output_start_id, self.output_end_id = ids

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def _assistant_text(self, content) -> tuple[str, list[tuple[int, int]]]:
        """Assistant content as one string, and the (start, end) char spans of tool outputs in it."""
        if isinstance(content, str):
            return content, []
        text, unmasked = "", []
        for part in content:
            kind, body = part["type"], part["text"]
            if kind == "text":
                text += body
            elif kind == "tool_call":
                text += f"{TOOL_TOKENS[0]}{body}{TOOL_TOKENS[1]}" if self.has_tools else body
            elif kind == "tool_output":
                out = f"{TOOL_TOKENS[2]}{body}{TOOL_TOKENS[3]}" if self.has_tools else body
                unmasked.append((len(text), len(text) + len(out)))
                text += out
            else:
                raise ValueError(f"unknown assistant part type {kind!r}")
        return text, unmasked

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def render_conversation(self, conv: dict) -> tuple[list[int], list[int]]:
        messages, spans = [], []  # spans: (start, end) char ranges with loss
        for msg in conv["messages"]:
            if msg["role"] != "assistant":
                messages.append({"role": msg["role"], "content": msg["content"]})
                continue
            text, outputs = self._assistant_text(msg["content"])
            start = len(self._render(messages, generation_prompt=True))
            messages.append({"role": "assistant", "content": text})
            full = self._render(messages, generation_prompt=False)
            end = len(full.rstrip())  # through the end-of-turn token, not the newline after it
            at = full.find(text, start) if text else start
            at = start if at < 0 else at
            cuts = sorted((at + a, at + b) for a, b in outputs)
            edges = [start, *[x for c in cuts for x in c], end]
            spans += [(edges[i], edges[i + 1]) for i in range(0, len(edges), 2)]
        full = self._render(messages, generation_prompt=False)
        enc = self.hf(full, add_special_tokens=False, return_offsets_mapping=True)
        mask = [int(any(a <= s < b for a, b in spans)) for s, _ in enc["offset_mapping"]]
        return list(enc["input_ids"]), mask

    def render_for_completion(self, conv: dict) -> list[int]:
        messages = [{"role": m["role"], "content": m["content"]} for m in conv["messages"]]
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return self.encode(self._render(messages, generation_prompt=True))

    def save_pretrained(self, path: str | Path) -> None:
        self.hf.save_pretrained(path)


def _split_gguf(path: str) -> tuple[str, dict]:
    """A ``.gguf`` file path → (its directory, {"gguf_file": name}); anything else unchanged."""
    if path.endswith(".gguf"):
        p = Path(path)
        return str(p.parent), {"gguf_file": p.name}
    return path, {}


def load_hf(path: str, dtype: str = "float32", tool_tokens: bool = False, lora=None,
            device: str | torch.device = "cpu", chat_template: str | None = None,
            seen: frozenset = frozenset()) -> tuple[HFPolicy, HFTokenizer]:
    """Load an HF causal LM and its tokenizer from a local dir, a hub id, or a ``.gguf`` file.

    ``tool_tokens`` adds the calculator's four special tokens (the embedding grows; new rows are the
    mean of the old ones). ``lora`` (a LoraConfig with rank > 0) wraps the model in a peft adapter.
    ``chat_template`` (Jinja text, or a file holding it) replaces the tokenizer's (a base model has none);
    checkpoints save the tokenizer with it. A LoRA checkpoint (``base_model.json``) loads as its base with the
    adapter merged (posttrain/models/hf_base.py; ``seen``: the checkpoints this chain of adapters passed).
    """
    transformers = _require_hf()
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}' (valid: {', '.join(DTYPES)})")
    if (Path(path) / BASE_FILE).is_file():
        model, tokenizer, base = load_adapter_checkpoint(Path(path), dtype, tool_tokens, lora, device, chat_template,
                                                         load_hf, seen)
        return _policy(model, tokenizer, lora, device, base)
    source, extra = _split_gguf(path)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, **extra)
        model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], **extra)
    except OSError as err:
        where = "a local path" if Path(source).exists() else "not a local path, and the hub could not serve it"
        raise OSError(f"could not load the model '{path}' ({where}): {err}") from None
    if extra:  # GGUF: transformers dequantises to ordinary float tensors; forget the quantizer so the
        model.hf_quantizer = None  # model saves (and trains) as the plain model it now is
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if chat_template is not None:
        tokenizer.chat_template = read_chat_template(chat_template)
    if tool_tokens:
        add_tool_tokens(model, tokenizer)
    local = Path(source).exists()
    where = str(Path(path).resolve()) if local else path  # a hub id stays as it is
    return _policy(model, tokenizer, lora, device, {"path": where, "local": local, "tool_tokens": tool_tokens})


def _policy(model, tokenizer, lora, device, base: dict) -> tuple[HFPolicy, HFTokenizer]:
    """The loaded model on ``device`` as an :class:`HFPolicy` (a fresh LoRA adapter when ``lora.rank`` > 0)."""
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    extra_stop = tuple(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    model = model.to(device)
    if lora is not None and lora.rank > 0:
        model = apply_lora(model, lora)
    return HFPolicy(model, base), HFTokenizer(tokenizer, extra_stop)


def apply_lora(model: nn.Module, lora) -> nn.Module:
    """Wrap ``model`` in a peft LoRA adapter: rank r, scale alpha / r, dropout, on ``target_modules``
    (empty: every linear layer but the LM head)."""
    try:
        import peft
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("LoRA needs the extra: pip install 'posttrain[hf]'") from None
    config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.target_modules) or "all-linear", task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)
