"""SFT examples as training rows: which tokens the loss covers, the max_length policy, and packing.

**Loss schemes** (``SFTConfig.loss``). Each is a mask over a rendered conversation's tokens: ``mask[t]``
= 1 when the loss counts token t as a target (predicting x_t from x_<t); the first token is never a
target. :data:`LOSS_MASKS` maps a scheme's name to its function, ``(tokenizer, ids, render_mask) → mask``,
where ``render_mask`` is the tokenizer's own (1 on what the assistant produces: its text, tool calls and
end-of-turn token; 0 on the prompt and on tool outputs).

**max_length** (0: the model's context length). An example longer than that is cut to it
(``overlong=truncate``) or left out and another drawn in its place (``overlong=skip``); the trainer
counts both (``data/truncated``, ``data/skipped``, cumulative over the run). A cut example can lose every
token its mask counts (``answer_only``: the answer is at the end), so ``answer_only`` works best with
``overlong=skip``; a step left with no counted token makes no optimizer update (``data/empty_steps``).

**Packing** puts several examples in one row (first-fit decreasing, rendered lengths summing to at most
``max_length``, or with max_length 0 to at most the step's longest example: never the model's context,
whose rows would cost far more attention than the examples need); ``doc_ids`` tell the model which
example each position belongs to, and the model attends within an example only, with positions counted
from the example's first token. The step's loss is the same token mean as unpacked:
−Σ m_t log π(x_t | x_<t) / Σ m_t over every counted token of the step.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate

import torch

from posttrain.config import ConfigError

ANSWER_MARKERS = ("####", "<answer>")  # where a final answer starts: '#### N' (hash, tool), <answer> (xml)


@dataclass
class Example:
    """One rendered conversation and its loss mask (same length)."""

    ids: list[int]
    mask: list[int]  # 1: the token is a target the loss counts


@dataclass
class Rows:
    """A step's training tensors: ``inputs`` (R, T), ``targets`` (R, T) (−1: no loss), and for packed rows
    ``doc_ids`` (R, T) (the example each position belongs to, −1 on padding)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    doc_ids: torch.Tensor | None
    positions: int  # input positions holding a real token (the rest is padding)

    @property
    def counted(self) -> int:
        """Targets the loss counts (not −1): N of :func:`sft_loss`."""
        return int((self.targets >= 0).sum())

    @property
    def pad_fraction(self) -> float:
        return 1.0 - self.positions / max(self.inputs.numel(), 1)

    def to(self, device) -> Rows:
        doc_ids = None if self.doc_ids is None else self.doc_ids.to(device)
        return Rows(self.inputs.to(device), self.targets.to(device), doc_ids, self.positions)


def full_mask(tokenizer, ids: list[int], render_mask: list[int]) -> list[int]:
    """Every token: the loss covers the whole rendered sequence, prompt and chat markup included.

    Use it for continued-pretraining-like training, when the prompts are data worth learning too (the
    model also learns to write questions)."""
    return [1] * len(ids)


def completion_mask(tokenizer, ids: list[int], render_mask: list[int]) -> list[int]:
    """The assistant turn: reasoning and answer, tool calls and the end-of-turn token, not tool outputs
    (the tokenizer's render mask).

    The default for chat SFT: the model learns to answer, never to imitate the prompt."""
    return list(render_mask)


def answer_only_mask(tokenizer, ids: list[int], render_mask: list[int]) -> list[int]:
    """The final-answer span: from the token that holds the last answer marker (``####`` or ``<answer>``)
    through the end of the assistant turn (its end-of-turn token included), e.g. ``#### 42<end>`` or
    ``<answer>\\n42\\n</answer>\\n<end>``. A reply without a marker is a ConfigError.

    Use it to teach the answer format alone, or for short-answer supervision where the reasoning in
    the data is not worth imitating (the reasoning still conditions the answer but gets no loss)."""
    end = max((t + 1 for t, m in enumerate(render_mask) if m), default=0)
    start = end
    while start > 0 and render_mask[start - 1]:
        start -= 1  # the last run of trained tokens: the reply after its last tool output
    k = answer_start([tokenizer.decode([i]) for i in ids[start:end]])
    if k is None:
        reply = tokenizer.decode(ids[start:end])
        raise ConfigError(f"loss=answer_only needs a final answer ('#### N' or '<answer>...</answer>') in every "
                         f"reply; this one has none: ...{reply[-80:]!r}")
    return [0] * (start + k) + [1] * (end - start - k) + [0] * (len(ids) - end)


LOSS_MASKS: dict[str, Callable[[object, list[int], list[int]], list[int]]] = {
    "full": full_mask, "completion": completion_mask, "answer_only": answer_only_mask}


def answer_start(pieces: list[str], markers: tuple[str, ...] = ANSWER_MARKERS) -> int | None:
    """Index of the piece holding the first character of the last marker in ``"".join(pieces)``, or None.

    ``[" 8", " ##", "##", " 8"]`` → 1. Pieces are single tokens decoded alone; the markers are ASCII,
    so a multi-byte character split across tokens never hides one."""
    text = "".join(pieces)
    at = max(text.rfind(m) for m in markers)
    if at < 0:
        return None
    return bisect_right(list(accumulate(len(p) for p in pieces)), at)  # the first piece ending after `at`


def resolve_max_length(max_length: int, context: int) -> int:
    """The token limit an example is held to: ``max_length``, or the model's ``context`` length when it is
    0 (0 again when the context is unknown: no limit). A limit above a known context is a ConfigError."""
    if context and max_length > context:
        raise ConfigError(f"config key 'max_length' must be at most the model's context length {context}, "
                          f"got {max_length}")
    return max_length or context


def draw_examples(next_conv: Callable[[], dict], tokenizer, n: int, loss: str, max_length: int, overlong: str,
                  counts: dict[str, int], max_skips: int = 1000) -> list[Example]:
    """``n`` examples rendered by ``tokenizer`` with ``loss``'s mask, each at most ``max_length`` tokens
    (0: no limit). A longer one is cut to ``max_length`` (``overlong='truncate'``, its mask computed on the
    whole example first) or left out for the next ``next_conv()`` (``'skip'``); ``counts['truncated']`` /
    ``counts['skipped']`` grow by one for each. ``max_skips`` skips in a row is a ConfigError."""
    out, in_a_row = [], 0
    while len(out) < n:
        ids, render_mask = tokenizer.render_conversation(next_conv())
        if max_length and len(ids) > max_length:
            if overlong == "skip":
                counts["skipped"] += 1
                in_a_row += 1
                if in_a_row >= max_skips:
                    raise ConfigError(f"{max_skips} examples in a row are longer than max_length={max_length} "
                                      "tokens (overlong=skip): raise max_length or use overlong=truncate")
                continue
            counts["truncated"] += 1
        in_a_row = 0
        mask = LOSS_MASKS[loss](tokenizer, ids, render_mask)
        keep = max_length or len(ids)
        out.append(Example(ids[:keep], mask[:keep]))
    return out


def _shifted(example: Example) -> tuple[list[int], list[int]]:
    """(inputs, targets) of one example: x_0..x_{n−2} and x_1..x_{n−1}, a target −1 where mask is 0."""
    targets = [i if m else -1 for i, m in zip(example.ids[1:], example.mask[1:], strict=True)]
    return example.ids[:-1], targets


def pad_rows(examples: list[Example], pad_id: int) -> Rows:
    """One example per row, right-padded to the longest: (B, max n − 1)."""
    pairs = [_shifted(e) for e in examples]
    width = max(len(x) for x, _ in pairs)
    inputs = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    targets = torch.full((len(pairs), width), -1, dtype=torch.long)
    for row, (x, y) in enumerate(pairs):
        inputs[row, : len(x)] = torch.tensor(x, dtype=torch.long)
        targets[row, : len(y)] = torch.tensor(y, dtype=torch.long)
    return Rows(inputs, targets, None, sum(len(x) for x, _ in pairs))


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each summing to ≤ ``capacity`` (an item longer than that gets a bin of its
    own): first-fit decreasing, ties in index order. ``first_fit([3, 5, 2, 4], 8)`` → ``[[1, 0], [3, 2]]``."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        b = next((b for b, r in enumerate(room) if lengths[i] <= r), None)
        if b is None:
            bins.append([])
            room.append(capacity)
            b = len(bins) - 1
        bins[b].append(i)
        room[b] -= lengths[i]
    return bins


def pack_rows(examples: list[Example], pad_id: int, capacity: int) -> Rows:
    """Several examples per row (:func:`first_fit` on rendered lengths, ``capacity`` tokens a row), each
    example's (inputs, targets) one after the other, ``doc_ids`` its index in the row; right-padded with
    ``doc_ids`` −1, targets −1."""
    pairs = [_shifted(e) for e in examples]
    rows = []
    for members in first_fit([len(e.ids) for e in examples], capacity):
        x = [t for j in members for t in pairs[j][0]]
        y = [t for j in members for t in pairs[j][1]]
        doc = [d for d, j in enumerate(members) for _ in pairs[j][0]]
        rows.append((x, y, doc))
    width = max(len(x) for x, _, _ in rows)
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), -1, dtype=torch.long)
    doc_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, (x, y, doc) in enumerate(rows):
        inputs[r, : len(x)] = torch.tensor(x, dtype=torch.long)
        targets[r, : len(y)] = torch.tensor(y, dtype=torch.long)
        doc_ids[r, : len(doc)] = torch.tensor(doc, dtype=torch.long)
    return Rows(inputs, targets, doc_ids, sum(len(x) for x, _, _ in rows))


def make_rows(examples: list[Example], pad_id: int, packing: bool, max_length: int) -> Rows:
    """The step's rows: packed into ``max_length``-token rows (the configured max_length; 0: the longest of
    ``examples``, so no row is wider than unpacked rows), or one example per row."""
    if not packing:
        return pad_rows(examples, pad_id)
    return pack_rows(examples, pad_id, max_length or max(len(e.ids) for e in examples))


def sft_loss(model, rows: Rows, normaliser: int | None = None) -> tuple[torch.Tensor, int]:
    """(loss, counted tokens N): loss = −Σ log π(target) / max(normaliser, 1) over every counted target of
    ``rows``; ``normaliser``: N by default, the step's count over all ranks under data parallelism."""
    logp = _logprobs(model, rows)  # (R, T), 0 where the target is −1
    n_tokens = rows.counted
    return -logp.sum() / max(n_tokens if normaliser is None else normaliser, 1), n_tokens


def check_packing(model, tolerance: float | None = None) -> None:
    """Raise ConfigError when packed rows would not give each example what it gets alone: the model's own
    ``packing_problem()`` (HF models), then a probe: two short examples packed in one row against each
    alone, max |Δ log π| ≤ ``tolerance`` (default 1e-4 in float32, 5e-2 in half precision)."""
    problem = getattr(model, "packing_problem", lambda: None)()
    if problem is None:
        a, b = Example(list(range(1, 9)), [1] * 8), Example(list(range(9, 15)), [1] * 6)
        device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        training = model.training
        model.eval()  # no dropout
        with torch.no_grad():
            packed = _logprobs(model, pack_rows([a, b], 0, 14).to(device))  # (1, 7 + 5)
            alone = [_logprobs(model, pad_rows([e], 0).to(device)) for e in (a, b)]  # (1, 7), (1, 5)
        model.train(training)
        gap = (packed[0] - torch.cat([alone[0][0], alone[1][0]])).abs().max().item()
        limit = tolerance if tolerance is not None else (1e-4 if dtype == torch.float32 else 5e-2)
        if gap > limit:
            problem = f"two examples packed in one row score {gap:.3g} apart from the same examples alone"
    if problem:
        raise ConfigError(f"packing=true: {problem}; use packing=false for this model")


def _logprobs(model, rows: Rows) -> torch.Tensor:
    return model(rows.inputs, rows.targets, doc_ids=rows.doc_ids)  # (R, T)
