"""Partial rollouts (Kimi k1.5, Team Kimi 2025, §2.6.2): a step's generation is bounded by ``rollout.segment_tokens``
S new tokens per row. A completion that reaches S tokens without finishing is **parked** (its tokens, the behaviour
log-probs of each and its loss mask kept) and continued in a later step's generation, with the weights of then, up
to ``sampling.max_new_tokens`` M in all. A group is trained on once every one of its rows has finished (its stop
token) or reached M; until then it waits in the pile, its finished rows with it.

Every step draws ``prompts_per_step`` new prompts and continues every parked row by one more segment; the step
trains the groups that became whole in it (new and continued alike), so the groups per step vary around
``prompts_per_step``. The correction is per token: each token keeps the log-prob of the weights that sampled it,
and the off-policy objective (``off_policy``) weighs each token by its own.

Cut at a safe point: with a tokenizer that has tool tokens, a row cut inside a tool call (an open
``<|tool_start|>``, or a tool output not yet fully forced) is parked from just before that call, which is sampled
again in the next segment (the engine runs a tool only for a call it saw opened).

Continuations draw from ``group_seed(seed, step, P + k, 0)`` for the k-th parked row continued in step ``step`` (P:
the prompts drawn for the step), so a seeded run is reproducible. The budget counts the tokens generated for a row,
those of a tool call dropped at a cut included, so a call longer than a segment ends at the budget instead of
being sampled again forever. The pile belongs to whoever makes the rounds (the asynchronous
queue's one thread, in submission order); checkpoints store it with the queued rollouts.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field, replace

import torch

from posttrain.distributed import World
from posttrain.engine import RolloutBatch, SamplingParams
from posttrain.random_streams import group_seed
from posttrain.trainers.rollout import Round, generate_groups, scored_round


@dataclass
class PartialRow:
    """One completion so far."""

    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # the behaviour log-prob of each token
    mask: list[float] = field(default_factory=list)  # 1 on sampled tokens, 0 on forced tool outputs
    finished: bool = False  # it emitted its stop token
    made_at: int = 0  # the policy step of its last segment
    first_made_at: int = 0  # of its first
    segments: int = 0
    spent: int = 0  # tokens generated for it so far, those of tool calls dropped at a cut included

    def add(self, batch: RolloutBatch, row: int, budget: int, made_at: int) -> None:
        """Append ``batch``'s row ``row`` (a segment), cut to the ``budget`` left."""
        n = min(int(batch.lengths[row]), budget)
        self.spent += n
        self.tokens += batch.completion_ids[row, :n].tolist()
        self.logprobs += batch.logprobs[row, :n].tolist()
        self.mask += batch.mask[row, :n].tolist()
        self.finished = bool(batch.finished[row]) and n == int(batch.lengths[row])
        self.first_made_at = made_at if self.segments == 0 else self.first_made_at
        self.made_at, self.segments = made_at, self.segments + 1

    def done(self, max_new_tokens: int) -> bool:
        """Finished, or at the budget (counted in tokens generated: a tool call cut again and again ends it too)."""
        return self.finished or self.spent >= max_new_tokens

    def cut_to_safe_point(self, tok) -> None:
        """Drop an unfinished tool call at the end (see the module doc)."""
        if not getattr(tok, "has_tools", False) or tok.tool_start_id not in self.tokens:
            return
        start = len(self.tokens) - 1 - self.tokens[::-1].index(tok.tool_start_id)
        if tok.output_end_id not in self.tokens[start:]:
            del self.tokens[start:], self.logprobs[start:], self.mask[start:]


@dataclass
class PartialGroup:
    picked: tuple[int, object]  # (pool index, problem)
    conv: dict
    rows: list[PartialRow]


class Segments:
    """The pile of parked groups and the making of a segmented round (see the module doc)."""

    def __init__(self, segment_tokens: int, max_new_tokens: int, seed: int):
        self.segment_tokens, self.max_new_tokens, self.seed = segment_tokens, max_new_tokens, seed
        self.pile: list[PartialGroup] = []

    def make_round(self, engine, scorer, drawn: tuple, group_size: int, sampling: SamplingParams, seeds: list[int],
                   step: int, world: World, made_at: int = 0, version: int | None = None) -> Round:
        """Continue every parked row by a segment, generate the first segment of the groups of ``drawn``, and
        return the groups that are whole now as a scored :class:`Round`; the others stay parked."""
        start = time.perf_counter()
        tok, budget = engine.tokenizer, self.max_new_tokens
        picked, convs, ids, truncated, skipped = drawn
        short = replace(sampling, max_new_tokens=min(self.segment_tokens, budget))
        waiting = [row for group in self.pile for row in group.rows if not row.done(budget)]
        calls = failures = 0
        for left in sorted({budget - row.spent for row in waiting}):  # one call per budget left: none runs past it
            ks = [k for k, row in enumerate(waiting) if budget - row.spent == left]
            more = generate_groups(engine, [waiting[k].prompt_ids + waiting[k].tokens for k in ks], 1,
                                   replace(short, max_new_tokens=min(short.max_new_tokens, left)),
                                   [group_seed(self.seed, step, len(ids) + k, 0) for k in ks], world)
            for j, k in enumerate(ks):
                waiting[k].add(more, j, left, made_at)
            calls, failures = calls + more.tool_calls, failures + more.tool_failures
        fresh = generate_groups(engine, ids, group_size, short, seeds, world)
        calls, failures = calls + fresh.tool_calls, failures + fresh.tool_failures
        groups = self.pile + [
            PartialGroup(picked[g], convs[g], [PartialRow(list(ids[g])) for _ in range(group_size)])
            for g in range(len(ids))]
        for g, group in enumerate(groups[len(self.pile):]):
            for j, row in enumerate(group.rows):
                row.add(fresh, g * group_size + j, budget, made_at)
        whole = [g for g in groups if all(r.done(budget) for r in g.rows)]
        self.pile = [g for g in groups if not all(r.done(budget) for r in g.rows)]
        for group in self.pile:
            for row in group.rows:
                if not row.done(budget):
                    row.cut_to_safe_point(tok)
        rows = [r for g in whole for r in g.rows]
        batch = as_batch(rows, group_size, tok.pad_id, calls, failures)
        return scored_round(tok, scorer, [g.picked for g in whole], [g.conv for g in whole], batch, step, world,
                            truncated, skipped, [r.made_at for r in rows], start, version,
                            first_made_at=[r.first_made_at for r in rows], segments=[r.segments for r in rows],
                            resumed=len(waiting), parked=sum(not r.done(budget) for g in self.pile for r in g.rows))

    def state_dict(self) -> dict:
        """The pile as plain containers (problems by pool index only: the prompt is in ``conv``)."""
        return {"pile": [{"picked": [int(g.picked[0]), None], "conv": g.conv,
                          "rows": [dataclasses.asdict(r) for r in g.rows]} for g in self.pile]}

    def load_state_dict(self, state: dict) -> None:
        self.pile = [PartialGroup(tuple(g["picked"]), g["conv"], [PartialRow(**r) for r in g["rows"]])
                     for g in state.get("pile", [])]


def as_batch(rows: list[PartialRow], group_size: int, pad_id: int, tool_calls: int = 0,
             tool_failures: int = 0) -> RolloutBatch:
    """Whole rows as a :class:`RolloutBatch` (groups of ``group_size`` in order)."""
    width = max((len(r.tokens) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    logprobs, mask = torch.zeros(len(rows), width), torch.zeros(len(rows), width)  # (B, T)
    for i, r in enumerate(rows):
        n = len(r.tokens)
        ids[i, :n] = torch.tensor(r.tokens, dtype=torch.long)
        logprobs[i, :n], mask[i, :n] = torch.tensor(r.logprobs), torch.tensor(r.mask)
    return RolloutBatch([r.prompt_ids for r in rows], ids, logprobs, mask,
                        torch.tensor([len(r.tokens) for r in rows], dtype=torch.long),
                        torch.tensor([r.finished for r in rows], dtype=torch.bool),
                        torch.arange(len(rows) // max(1, group_size)).repeat_interleave(group_size),
                        tool_calls, tool_failures)
