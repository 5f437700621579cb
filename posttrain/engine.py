"""Rollout engine: batched KV-cache sampling with prefix sharing, per-row stops and tool calls.

``Engine.generate(prompts, n, params, seed)`` samples ``n`` completions for each prompt:

1. the distinct prompts are left-padded into one batch and prefilled once;
2. each prompt's KV cache is replicated ``n`` times, so a group shares its prefix;
3. decoding runs one token per step for the rows still going; a row that emits the stop token or
   runs out of ``max_new_tokens`` leaves the batch (its cache rows are dropped), so finished rows
   cost nothing;
4. when a row closes a tool call (``<|tool_start|> expr <|tool_end|>``), the engine runs the tool
   and forces ``<|output_start|> result <|output_end|>`` into that row, with loss mask 0.

Sampling uses an explicit ``torch.Generator`` seeded by the caller: same seed, same samples.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

import torch

from posttrain.tokenizer import Tokenizer
from posttrain.tools import ToolRegistry


@dataclass
class SamplingParams:
    """How completions are sampled."""

    temperature: float = 1.0  # softmax temperature; 0 means greedy
    top_k: int | None = 50  # keep the k most likely tokens (None: all)
    top_p: float | None = None  # nucleus: keep the smallest set with this much mass (None: off)
    max_new_tokens: int = 64  # completion budget per row, forced tool outputs included

    def __post_init__(self):
        if not self.temperature >= 0:  # NaN too
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class RolloutBatch:
    """Completions of ``len(prompts) * n`` rows, in prompt order (row i belongs to prompt i // n)."""

    prompt_ids: list[list[int]]  # the prompt of each row
    completion_ids: torch.Tensor  # (B, T) long, pad after the end
    logprobs: torch.Tensor  # (B, T) log-prob of each sampled token (0 on forced/pad tokens)
    mask: torch.Tensor  # (B, T) float, 1 on tokens the model sampled
    lengths: torch.Tensor  # (B,) completion length in tokens (forced tool outputs included)
    finished: torch.Tensor  # (B,) bool, True when the row emitted the stop token
    group_ids: torch.Tensor  # (B,) long, index of the row's prompt
    tool_calls: int = 0  # tool calls made in the batch
    tool_failures: int = 0  # of which returned an error string

    def completion_tokens(self, row: int) -> list[int]:
        return self.completion_ids[row, : int(self.lengths[row])].tolist()

    def select(self, rows: torch.Tensor) -> RolloutBatch:
        """The sub-batch of ``rows`` (B',) in that order; tool counts are kept as totals of the draw."""
        rows = rows.long()
        return replace(
            self,
            prompt_ids=[self.prompt_ids[r] for r in rows.tolist()],
            completion_ids=self.completion_ids[rows],
            logprobs=self.logprobs[rows],
            mask=self.mask[rows],
            lengths=self.lengths[rows],
            finished=self.finished[rows],
            group_ids=self.group_ids[rows],
        )

    @staticmethod
    def concat(batches: list[RolloutBatch], pad_id: int) -> RolloutBatch:
        """Rows of all ``batches`` in order; completions right-padded to the widest, group ids
        renumbered so groups of different batches stay distinct."""
        width = max(b.completion_ids.shape[1] for b in batches)

        def pad(x: torch.Tensor, value) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

        offsets = [0]
        for b in batches[:-1]:
            offsets.append(offsets[-1] + (int(b.group_ids.max()) + 1 if len(b.group_ids) else 0))
        return RolloutBatch(
            prompt_ids=[p for b in batches for p in b.prompt_ids],
            completion_ids=torch.cat([pad(b.completion_ids, pad_id) for b in batches]),
            logprobs=torch.cat([pad(b.logprobs, 0.0) for b in batches]),
            mask=torch.cat([pad(b.mask, 0.0) for b in batches]),
            lengths=torch.cat([b.lengths for b in batches]),
            finished=torch.cat([b.finished for b in batches]),
            group_ids=torch.cat([b.group_ids + o for b, o in zip(batches, offsets, strict=True)]),
            tool_calls=sum(b.tool_calls for b in batches),
            tool_failures=sum(b.tool_failures for b in batches),
        )


def sample_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator):
    """Sample one token per row from ``logits`` (B, V) → (tokens (B,), logprobs (B,)).

    The returned log-prob is that of the token under softmax(logits / temperature) before top-k /
    top-p truncation: the distribution a trainer recomputes. Greedy rows get their argmax. Top-k and
    top-p act on the k best (or the sorted) candidates only, so no (B, V) mask or second softmax over
    the whole vocabulary is built; the distribution is the same as masking the rest to −inf.
    """
    if params.temperature <= 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    scaled = logits.float() / params.temperature  # (B, V)
    top_p = params.top_p is not None and params.top_p < 1.0
    if params.top_k is not None and params.top_k < scaled.shape[-1]:
        cand, index = torch.topk(scaled, params.top_k, dim=-1)  # (B, k), best first
    elif top_p:
        cand, index = torch.sort(scaled, descending=True, dim=-1)  # (B, V)
    else:
        cand, index = scaled, None
    if top_p:
        probs = torch.softmax(cand, -1)
        drop = probs.cumsum(-1) - probs >= params.top_p  # mass before the candidate already reaches top_p
        cand = cand.masked_fill(drop, float("-inf"))
    choice = torch.multinomial(torch.softmax(cand, -1), 1, generator=generator)  # (B, 1)
    tokens = index.gather(-1, choice) if index is not None else choice  # (B, 1)
    logp = scaled.gather(-1, tokens) - torch.logsumexp(scaled, -1, keepdim=True)  # (B, 1)
    return tokens.squeeze(-1), logp.squeeze(-1)


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad to one length → (ids (B, L), real-token mask (B, L))."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    real = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        real[i, width - len(s) :] = True
    return ids, real


class _ToolState:
    """Per-row tool-call bookkeeping: where an open call began and what must be forced next."""

    def __init__(self, tokenizer: Tokenizer, registry: ToolRegistry):
        self.tok, self.registry = tokenizer, registry
        self.call_start: dict[int, int] = {}  # row -> step of its <|tool_start|>
        self.forced: dict[int, deque[int]] = {}  # row -> tokens still to force
        self.calls = self.failures = 0

    def force(self, active: torch.Tensor, tokens, logp, sampled) -> None:
        """Overwrite this step's samples with pending tool-output tokens (logprob 0, mask 0)."""
        if not self.forced:
            return
        where = {row: j for j, row in enumerate(active.tolist())}
        for row, queue in list(self.forced.items()):
            j = where[row]
            tokens[j], logp[j], sampled[j] = queue.popleft(), 0.0, 0.0
            if not queue:
                del self.forced[row]

    def observe(self, active: torch.Tensor, tokens, sampled, step: int, out: torch.Tensor) -> None:
        """Open calls on <|tool_start|>; on <|tool_end|> run the tool and queue its output."""
        tok, was_sampled = self.tok, sampled.bool()
        for j in torch.nonzero(was_sampled & (tokens == tok.tool_start_id)).flatten().tolist():
            self.call_start[int(active[j])] = step
        for j in torch.nonzero(was_sampled & (tokens == tok.tool_end_id)).flatten().tolist():
            row = int(active[j])
            if row not in self.call_start:
                continue  # a stray <|tool_end|> is just a token
            expr = tok.decode(out[row, self.call_start.pop(row) + 1 : step].tolist())
            result = self.registry.run(expr)
            self.calls += 1
            self.failures += result.startswith("error")
            self.forced[row] = deque([tok.output_start_id, *tok.encode(result), tok.output_end_id])


class Engine:
    """Samples completions from a model that supports ``model(ids, cache=..., pad_mask=...)`` and
    ``model.new_cache(batch, max_len)`` (the built-in GPT, or an HF model through ``models.hf``), with a
    tokenizer that has ``pad_id``, ``stop_ids``, ``has_tools`` and the tool token ids."""

    def __init__(self, model, tokenizer: Tokenizer, tools: ToolRegistry | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.tools = tools if tokenizer.has_tools else None  # a tokenizer without tool tokens cannot call
        self.stop_ids = set(tokenizer.stop_ids)

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        params: SamplingParams,
        seed: int,
        share_prefix: bool = True,
    ) -> RolloutBatch:
        """``n`` completions per prompt; ``share_prefix=False`` prefills every row (for benchmarks)."""
        tok = self.tokenizer
        device = self.model.device
        gen = torch.Generator(device=device).manual_seed(seed)  # on the logits' device
        rows = len(prompts) * n
        prefill = prompts if share_prefix else [p for p in prompts for _ in range(n)]
        ids, real = left_pad(prefill, tok.pad_id)
        cache = self.model.new_cache(len(prefill), ids.shape[1] + params.max_new_tokens)
        logits = self.model(ids.to(device), cache=cache, pad_mask=real.to(device))[:, -1]  # (P, V)
        if share_prefix and n > 1:
            expand = torch.arange(len(prompts), device=device).repeat_interleave(n)
            cache.select(expand)
            logits = logits[expand]  # (B, V)

        out = torch.full((rows, params.max_new_tokens), tok.pad_id, dtype=torch.long)
        out_logp = torch.zeros(rows, params.max_new_tokens)
        out_mask = torch.zeros(rows, params.max_new_tokens)
        lengths = torch.zeros(rows, dtype=torch.long)
        finished = torch.zeros(rows, dtype=torch.bool)
        active = torch.arange(rows)  # original row of each cache row
        tools = _ToolState(tok, self.tools) if self.tools is not None else None
        stop_ids = torch.tensor(sorted(self.stop_ids))
        for step in range(params.max_new_tokens):
            tokens, logp = sample_tokens(logits, params, gen)
            tokens, logp = tokens.cpu(), logp.float().cpu()
            sampled = torch.ones(len(active))  # 0 where a tool output is forced instead
            if tools is not None:
                tools.force(active, tokens, logp, sampled)
            out[active, step], out_logp[active, step], out_mask[active, step] = tokens, logp, sampled
            lengths[active] = step + 1
            if tools is not None:
                tools.observe(active, tokens, sampled, step, out)
            done = torch.isin(tokens, stop_ids) & sampled.bool()
            finished[active[done]] = True
            if step == params.max_new_tokens - 1 or bool(done.all()):
                break
            keep = torch.nonzero(~done).flatten()
            if len(keep) < len(active):  # compact: finished rows leave the batch
                cache.select(keep.to(device))
                active, tokens = active[keep], tokens[keep]
            logits = self.model(tokens[:, None].to(device), cache=cache)[:, -1]
        width = int(lengths.max()) if rows else 0
        return RolloutBatch(
            prompt_ids=[p for p in prompts for _ in range(n)],
            completion_ids=out[:, :width],
            logprobs=out_logp[:, :width],
            mask=out_mask[:, :width],
            lengths=lengths,
            finished=finished,
            group_ids=torch.arange(len(prompts)).repeat_interleave(n),
            tool_calls=tools.calls if tools is not None else 0,
            tool_failures=tools.failures if tools is not None else 0,
        )
