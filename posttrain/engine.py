"""Rollout engine: batched KV-cache sampling with prefix sharing, per-row stops and tool calls.

``Engine.generate(prompts, n, params, seed | seeds)`` samples ``n`` completions for each prompt:

1. the distinct prompts are left-padded into one batch and prefilled once;
2. each prompt's KV cache is replicated ``n`` times, so a group shares its prefix;
3. decoding runs one token per step for the rows still going; a row that emits the stop token or
   runs out of ``max_new_tokens`` leaves the batch (its cache rows are dropped), so finished rows
   cost nothing;
4. when a row closes a tool call (``<|tool_start|> expr <|tool_end|>``), the engine runs the tool
   and forces ``<|output_start|> result <|output_end|>`` into that row, with loss mask 0.

Sampling is counter-based (posttrain/random_streams.py): row j of the group of a prompt with seed s draws
step t from a uniform that is a hash of (s, j, t), so a group's samples depend on its seed alone, not on
the other prompts of the batch, its padding or its position. The decode loop keeps every tensor on the
model's device and makes one device→host transfer per step (which rows stopped, with the tokens when the
tokenizer has tools); the batch comes back on the CPU.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

import torch

from posttrain.random_streams import group_seeds, row_streams, uniforms
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


def completion_text(tokenizer, batch: RolloutBatch, row: int) -> str:
    """Row ``row``'s completion as text, without the stop token that ended it (what rewards and graders read)."""
    ids = batch.completion_tokens(row)
    return tokenizer.decode(ids[:-1] if batch.finished[row] else ids)


def sample_tokens(logits: torch.Tensor, params: SamplingParams, u: torch.Tensor):
    """Sample one token per row of ``logits`` (B, V) by inverse CDF with the float64 uniforms ``u`` (B,)
    in [0, 1) → (tokens (B,), logprobs (B,) float32).

    The distribution sampled is the tempered policy p_T = softmax(logits / T) truncated to the candidates
    C and renormalised: q(v) = p_T(v) / Σ_{c ∈ C} p_T(c) on C, 0 elsewhere. C is the vocabulary, or its k
    most likely tokens (top-k); top-p then keeps the smallest best-first prefix of C whose mass under the
    softmax over C reaches p. With the candidates in order (best first under top-k / top-p, else vocabulary
    order) the token is the first c whose cumulative mass Σ_{c' ≤ c} q(c') exceeds u (float64 sums; a
    uniform u takes candidate c with probability q(c)).

    The returned log-prob is log q(token), the behaviour policy actually sampled (vLLM's "processed"
    log-probs). A trainer recomputes log p_T, the tempered *untruncated* policy, so with top-k / top-p the
    two differ by design (log q ≥ log p_T); without truncation they agree. Greedy rows (T = 0) get the
    argmax and log-prob 0: they are drawn from a point mass (and top-k 1 gives the same).

    Top-k works on its k candidates only (no (B, V) softmax); top-p without top-k sorts the vocabulary;
    truncation renormalises by the kept mass, never by a second softmax.
    """
    if params.temperature <= 0:
        return logits.argmax(-1), torch.zeros(logits.shape[0], device=logits.device)
    scaled = logits.float() / params.temperature  # (B, V)
    top_p = params.top_p is not None and params.top_p < 1.0
    if params.top_k is not None and params.top_k < scaled.shape[-1]:
        cand, index = torch.topk(scaled, params.top_k, dim=-1)  # (B, K = k), best first
    elif top_p:
        cand, index = torch.sort(scaled, descending=True, dim=-1)  # (B, K = V)
    else:
        cand, index = scaled, None  # (B, K = V)
    lse = torch.logsumexp(cand, -1, keepdim=True)  # (B, 1)
    q = (cand - lse).exp_()  # (B, K) softmax over the candidates
    if top_p:
        drop = q.cumsum(-1) - q >= params.top_p  # mass before the candidate already reaches top_p
        q = q.masked_fill_(drop, 0.0)
    cdf = torch.cumsum(q, -1, dtype=torch.float64)  # (B, K), unnormalised: the last column is the kept mass
    mass = cdf[:, -1:]  # (B, 1)
    choice = torch.searchsorted(cdf, u.unsqueeze(-1) * mass, right=True)  # (B, 1); u · mass < mass
    logq = cand.gather(-1, choice) - lse - mass.log().float()  # (B, 1) log softmax over C − log kept mass
    tokens = index.gather(-1, choice) if index is not None else choice  # (B, 1)
    return tokens.squeeze(-1), logq.squeeze(-1)


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad to one length → (ids (B, L), real-token mask (B, L))."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    real = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        real[i, width - len(s) :] = True
    return ids, real


def _upload(values: list[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``values`` as a long tensor on ``device``, copied without waiting for the device (pinned memory)."""
    host = torch.as_tensor(values, dtype=torch.long)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)


class _ToolState:
    """Per-row tool-call bookkeeping on the host: the tokens seen, where an open call began and what must
    be forced next."""

    def __init__(self, tokenizer: Tokenizer, registry: ToolRegistry, rows: int, steps: int):
        self.tok, self.registry = tokenizer, registry
        self.seen = torch.full((rows, steps), tokenizer.pad_id, dtype=torch.long)  # (B, T) on the host
        self.call_start: dict[int, int] = {}  # row -> step of its <|tool_start|>
        self.forced: dict[int, deque[int]] = {}  # row -> tokens still to force
        self.calls = self.failures = 0

    def force(self, left: torch.Tensor, tokens, logp, sampled) -> None:
        """Overwrite this step's samples (on the device) with pending tool-output tokens (log-prob 0,
        mask 0); ``left`` (b,) holds the original row of each batch row."""
        if not self.forced:
            return
        where = {row: j for j, row in enumerate(left.tolist())}
        at = _upload([where[row] for row in self.forced], tokens.device)
        tokens[at] = _upload([queue.popleft() for queue in self.forced.values()], tokens.device)
        logp[at], sampled[at] = 0.0, 0.0
        self.forced = {row: queue for row, queue in self.forced.items() if queue}

    def observe(self, left: torch.Tensor, tokens: torch.Tensor, sampled: torch.Tensor, step: int) -> None:
        """Open calls on <|tool_start|>; on <|tool_end|> run the tool and queue its output. ``tokens`` and
        ``sampled`` (b,): this step's tokens on the host, and whether each was sampled (not forced)."""
        tok, was_sampled = self.tok, sampled.bool()
        self.seen[left, step] = tokens
        for j in torch.nonzero(was_sampled & (tokens == tok.tool_start_id)).flatten().tolist():
            self.call_start[int(left[j])] = step
        for j in torch.nonzero(was_sampled & (tokens == tok.tool_end_id)).flatten().tolist():
            row = int(left[j])
            if row not in self.call_start:
                continue  # a stray <|tool_end|> is just a token
            expr = tok.decode(self.seen[row, self.call_start.pop(row) + 1 : step].tolist())
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
        seed: int | None = None,
        share_prefix: bool = True,
        seeds: list[int] | None = None,
    ) -> RolloutBatch:
        """``n`` completions per prompt, returned on the CPU. Give ``seeds`` (one group seed per prompt)
        or ``seed`` (then prompt i's group seed is ``group_seed(seed, i)``): row j of prompt i draws from
        the stream (seeds[i], j), whatever else is in the batch. ``share_prefix=False`` prefills every
        row (for benchmarks)."""
        seeds = group_seeds(len(prompts), seed, seeds)
        tok = self.tokenizer
        device = self.model.device
        rows, steps = len(prompts) * n, params.max_new_tokens
        prefill = prompts if share_prefix else [p for p in prompts for _ in range(n)]
        ids, real = left_pad(prefill, tok.pad_id)
        cache = self.model.new_cache(len(prefill), ids.shape[1] + steps)
        logits = self.model(ids.to(device), cache=cache, pad_mask=real.to(device))[:, -1]  # (P, V)
        if share_prefix and n > 1:
            expand = torch.arange(len(prompts), device=device).repeat_interleave(n)
            cache.select(expand)
            logits = logits[expand]  # (B, V)

        out = torch.full((rows, steps), tok.pad_id, dtype=torch.long, device=device)  # (B, T)
        out_logp = torch.zeros(rows, steps, device=device)  # (B, T)
        out_mask = torch.zeros(rows, steps, device=device)  # (B, T)
        lengths = torch.zeros(rows, dtype=torch.long, device=device)  # (B,)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)  # (B,)
        active = torch.arange(rows, device=device)  # (b,) original row of each batch (cache) row
        left = torch.arange(rows)  # (b,) the same on the host
        streams = row_streams(seeds, n, device)  # (b, 2) each batch row's random stream
        tools = _ToolState(tok, self.tools, rows, steps) if self.tools is not None else None
        stop_ids = torch.tensor(sorted(self.stop_ids), device=device)
        for step in range(steps):
            tokens, logp = sample_tokens(logits, params, uniforms(streams, step))  # (b,), (b,)
            sampled = torch.ones(len(active), device=device)  # 0 where a tool output is forced instead
            if tools is not None:
                tools.force(left, tokens, logp, sampled)
            out[active, step], out_logp[active, step], out_mask[active, step] = tokens, logp, sampled
            lengths[active] = step + 1
            done = torch.isin(tokens, stop_ids) & sampled.bool()  # (b,)
            finished[active] = done  # a row still in the batch has not finished before
            if tools is None:  # the step's one device→host transfer
                done_host = done.cpu()
            else:
                tokens_host, sampled_host, done_host = torch.stack([tokens, sampled.long(), done.long()]).cpu()
                tools.observe(left, tokens_host, sampled_host, step)
                done_host = done_host.bool()
            if step == steps - 1 or bool(done_host.all()):
                break
            if done_host.any():  # compact: finished rows leave the batch
                keep = torch.nonzero(~done_host).flatten()
                left, keep = left[keep], _upload(keep, device)
                cache.select(keep)
                active, streams, tokens = active[keep], streams[keep], tokens[keep]
            logits = self.model(tokens[:, None], cache=cache)[:, -1]
        width = step + 1  # the longest rows ran to the last step
        return RolloutBatch(
            prompt_ids=[p for p in prompts for _ in range(n)],
            completion_ids=out[:, :width].cpu(),
            logprobs=out_logp[:, :width].cpu(),
            mask=out_mask[:, :width].cpu(),
            lengths=lengths.cpu(),
            finished=finished.cpu(),
            group_ids=torch.arange(len(prompts)).repeat_interleave(n),
            tool_calls=tools.calls if tools is not None else 0,
            tool_failures=tools.failures if tools is not None else 0,
        )
