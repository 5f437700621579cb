"""The built-in GPT: a small decoder-only transformer that trains on a laptop CPU.

Rotary position embeddings, RMSNorm (no learned scale, as in nanochat), grouped-query attention
(``n_kv_head`` ≤ ``n_head``), a ReLU² MLP and an untied LM head. One forward serves three callers:

* training / scoring: ``model(idx)`` → logits ``(B, T, V)``; ``model(idx, targets)`` → per-token
  log-probs of ``targets`` ``(B, T)`` (positions whose target is ``-1`` get 0), computed in chunks from
  the hidden states without the full logits (:mod:`posttrain.models.logprobs`); ``model.logprobs`` adds
  a sampling temperature and the entropy;
* generation: ``model(idx, cache=cache)`` appends to a :class:`KVCache` and returns logits of the
  new positions only. Rows may be left-padded (``pad_mask``); each row's rotary positions start at
  its first real token, so a padded row decodes exactly as it would alone;
* packed training rows: ``model(idx, targets, doc_ids=doc_ids)`` with several examples per row, each
  attending only to itself with positions counted from its own first token (see :func:`doc_positions`).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

from posttrain.models.logprobs import token_logprobs_from_hidden


@dataclass
class GPTConfig:
    """Sizes of the built-in GPT."""

    vocab_size: int = 512  # number of token ids (set from the tokenizer)
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # query heads
    n_kv_head: int = 2  # key/value heads (grouped-query attention); must divide n_head
    n_embd: int = 128  # model width
    max_seq_len: int = 256  # longest sequence (prompt + completion) the rotary table covers
    rope_base: float = 10000.0  # rotary base frequency

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head must divide n_head (grouped-query attention), got n_kv_head={self.n_kv_head}, "
                             f"n_head={self.n_head}")
        if self.n_embd % (2 * self.n_head):
            raise ValueError(f"n_embd / n_head (the head dim) must be an even whole number (rotary embeddings turn "
                             f"pairs of channels), got n_embd={self.n_embd}, n_head={self.n_head}")
        if not 0 < self.rope_base < math.inf:
            raise ValueError(f"rope_base must be a finite number > 0, got {self.rope_base}")


class KVCache:
    """Keys and values of every layer for a batch of rows being decoded.

    ``k``/``v``: ``(L, B, H_kv, T_max, D)``; ``valid``: ``(B, T_max)`` marks real (non-pad) keys;
    ``offset``: ``(B,)`` number of left pads of each row, so position = index − offset.
    """

    def __init__(self, config: GPTConfig, batch: int, max_len: int, device, dtype):
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch, config.n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.offset = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0  # positions filled so far (same for every row)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (index tensor), in that order: compaction and group replication."""
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)
        self.valid = self.valid.index_select(0, rows)
        self.offset = self.offset.index_select(0, rows)


def _rotary_tables(config: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    head_dim = config.n_embd // config.n_head
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(config.max_seq_len, dtype=torch.float32), inv_freq)  # (T, D/2)
    return angles.cos(), angles.sin()


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x1, x2) of the two halves of the head dim; ``cos``/``sin``: (B, 1, T, D/2), fp32 tables
    (angles computed in fp32) rounded to ``x``'s dtype."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def _rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],))


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.kv = nn.Linear(config.n_embd, 2 * self.n_kv_head * self.head_dim, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, layer: int, cache: KVCache | None, attn_mask):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k, v = self.kv(x).view(B, T, 2, self.n_kv_head, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        q, k = _rms_norm(q), _rms_norm(k)  # QK-norm keeps attention logits tame at high LR
        if cache is not None:
            start = cache.length
            cache.k[layer, :, :, start : start + T] = k
            cache.v[layer, :, :, start : start + T] = v
            k = cache.k[layer, :, :, : start + T]  # (B, H_kv, S, D)
            v = cache.v[layer, :, :, : start + T]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None, enable_gqa=True
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attn = Attention(config)
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.out = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, layer, cache, attn_mask):
        x = x + self.attn(_rms_norm(x), cos, sin, layer, cache, attn_mask)
        return x + self.out(F.relu(self.fc(_rms_norm(x))).square())


class GPT(nn.Module):
    """Decoder-only transformer; see the module docstring for the three ways to call it."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        cos, sin = _rotary_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = False  # see enable_activation_checkpointing
        self._init_weights()

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            std = 1.0 / math.sqrt(p.shape[-1])
            if name.endswith(("proj.weight", "out.weight")):
                nn.init.zeros_(p)  # residual branches start as identity (nanochat)
            elif name == "wte.weight":
                nn.init.normal_(p, std=1.0)
            elif name == "lm_head.weight":
                nn.init.normal_(p, std=0.001)
            else:
                nn.init.normal_(p, std=std)

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch, max_len, self.device, self.wte.weight.dtype)

    def forward(self, idx, targets=None, cache: KVCache | None = None, pad_mask=None, doc_ids=None):
        """``idx`` (B, T) → logits (B, T, V), or log-probs of ``targets`` (B, T) when given (chunked, as
        :meth:`logprobs` at temperature 1: no (B, T, V) tensor).

        With ``cache``: the tokens are appended after ``cache.length`` positions; ``pad_mask``
        (B, T) marks real tokens (False = left pad) and is only allowed on the first call. Without a
        cache, ``pad_mask`` may mark pads anywhere: pads are never attended to and each row's positions
        count its real tokens only, so a padded row's real positions compute what they would alone.
        ``doc_ids`` (B, T) (no cache, no ``pad_mask``): packed rows, each example a contiguous run of one
        id; a token attends causally within its run only and its position counts from the run's start.
        """
        h = self.hidden_states(idx, cache, pad_mask, doc_ids)  # (B, T, C)
        if targets is None:
            return self.lm_head(h).float()  # (B, T, V)
        return token_logprobs_from_hidden(h, self.lm_head, targets)[0]  # (B, T)

    def logprobs(self, idx, targets, temperature: float = 1.0, entropy: bool = False, doc_ids=None,
                 chunk_tokens: int = 1024):
        """log softmax(logits/τ)[target] (B, T) and, with ``entropy``, the entropy of softmax(logits/τ)
        (B, T) (else None); target −1 → 0 in both. Computed in chunks from the hidden states
        (:func:`~posttrain.models.logprobs.token_logprobs_from_hidden`), never the full (B, T, V) logits.
        ``doc_ids``: packed rows, as in :meth:`forward`; ``chunk_tokens``: positions per head call."""
        h = self.hidden_states(idx, doc_ids=doc_ids)  # (B, T, C)
        return token_logprobs_from_hidden(h, self.lm_head, targets, temperature, entropy, chunk_tokens)

    def enable_activation_checkpointing(self) -> None:
        """From now on, in training mode with grad enabled (no cache), each block runs under non-reentrant
        ``torch.utils.checkpoint``: backward keeps only the blocks' inputs (B, T, C) and recomputes each
        block's activations, one more forward of the blocks for a fraction of the memory."""
        self.activation_checkpointing = True

    def hidden_states(self, idx, cache: KVCache | None = None, pad_mask=None, doc_ids=None) -> torch.Tensor:
        """The final normalised hidden states (B, T, C) that the LM head reads (value and reward heads
        read them too); arguments as in :meth:`forward`."""
        B, T = idx.shape
        if doc_ids is not None:  # packed rows: block-diagonal causal attention, positions per example
            if cache is not None or pad_mask is not None:
                raise ValueError("doc_ids (packed rows) cannot be combined with a cache or a pad_mask")
            pos = doc_positions(doc_ids)  # (B, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()  # (T, T)
            attn_mask = (causal & (doc_ids[:, :, None] == doc_ids[:, None, :])).unsqueeze(1)  # (B, 1, T, T)
        elif cache is None and pad_mask is None:
            pos = torch.arange(T, device=idx.device).expand(B, T)  # (B, T)
            attn_mask = None  # plain causal
        elif cache is None:  # padded rows, no cache (reward scoring): positions start at each row's first token
            pos = (pad_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()  # (T, T)
            attn_mask = (causal & pad_mask[:, None, :]) | torch.eye(T, dtype=torch.bool, device=idx.device)
            attn_mask = attn_mask.unsqueeze(1)  # (B, 1, T, T); a pad query sees itself: no NaN
        else:
            pos, attn_mask = self._cache_positions(cache, B, T, pad_mask)
        if int(pos.max()) >= self.config.max_seq_len:
            raise ValueError(f"sequence longer than max_seq_len={self.config.max_seq_len}")
        cos = self.rope_cos[pos].unsqueeze(1)  # (B, 1, T, D/2)
        sin = self.rope_sin[pos].unsqueeze(1)
        x = _rms_norm(self.wte(idx))
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.blocks):
            if recompute:
                x = checkpoint(block, x, cos, sin, i, None, attn_mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, i, cache, attn_mask)
        if cache is not None:
            cache.length += T
        return _rms_norm(x)  # (B, T, C)

    @staticmethod
    def _cache_positions(cache: KVCache, B: int, T: int, pad_mask):
        start = cache.length
        if pad_mask is not None:
            if start != 0:
                raise ValueError("pad_mask is only allowed when the cache is empty")
            cache.offset = (~pad_mask).sum(1)  # left pads per row, (B,)
            cache.valid[:, :T] = pad_mask
        else:
            cache.valid[:, start : start + T] = True
        idx = torch.arange(start, start + T, device=cache.valid.device)  # (T,)
        pos = (idx.unsqueeze(0) - cache.offset.unsqueeze(1)).clamp(min=0)  # (B, T)
        keys = torch.arange(start + T, device=idx.device)  # (S,)
        causal = keys.unsqueeze(0) <= idx.unsqueeze(1)  # (T, S)
        mask = causal.unsqueeze(0) & cache.valid[:, None, : start + T]  # (B, T, S)
        mask = mask | (keys.unsqueeze(0) == idx.unsqueeze(1))  # a pad query sees itself: no NaN
        return pos, mask.unsqueeze(1)  # (B, 1, T, S)

    def packing_problem(self) -> str | None:
        """None: packed rows (``doc_ids``) always compute what each example computes alone."""
        return None

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def config_dict(self) -> dict:
        return asdict(self.config)

    @property
    def hidden_size(self) -> int:
        return self.config.n_embd

    def reference(self) -> GPT:
        """A frozen copy of this model: the starting policy that KL terms measure against."""
        return copy.deepcopy(self).requires_grad_(False)

    def save_pretrained(self, path: str | Path) -> None:
        """``model.safetensors`` (weights) and ``model.json`` (the config) in directory ``path``."""
        weights = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(weights, Path(path) / "model.safetensors")
        (Path(path) / "model.json").write_text(json.dumps(self.config_dict(), indent=1))


def doc_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token within its run of equal ``doc_ids`` (B, T) → (B, T): t − (first t of its run).

    ``[[0, 0, 0, 1, 1, -1]]`` → ``[[0, 1, 2, 0, 1, 0]]``: the packed examples restart at 0 (a run of pads
    is a run of its own)."""
    t = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)  # (B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return t - torch.where(starts, t, 0).cummax(dim=1).values


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position, (B, T, V), (B, T) → (B, T); target −1 → 0."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * (targets >= 0)
