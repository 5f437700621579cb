"""The built-in tokenizer and the chat format of the built-in model.

Text is split GPT-style into pre-tokens (a word with its leading space, a single digit with its
leading space, one punctuation mark, a run of spaces). Pre-tokens seen often enough in the training
texts get their own id; anything else falls back to its UTF-8 bytes, so every string round-trips.
Digits are always single tokens, which keeps arithmetic learnable for a tiny model.

A conversation is ``{"messages": [{"role": "user"|"assistant"|"system", "content": ...}]}``; an
assistant ``content`` is a string or a list of parts ``{"type": "text"|"tool_call"|"tool_output",
"text": ...}``. Rendered::

    <|bos|> <|user_start|> question <|user_end|> <|assistant_start|> text
        <|tool_start|> 4*17 <|tool_end|> <|output_start|> 68 <|output_end|> text <|assistant_end|>

The loss mask is 1 on what the assistant must produce (its text, tool calls and end token) and 0
on the prompt and on tool outputs (the engine forces those).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = (
    "<|pad|>",
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|tool_start|>",
    "<|tool_end|>",
    "<|output_start|>",
    "<|output_end|>",
)
_PRETOKEN = re.compile(r" ?[A-Za-z]+| ?\d| ?[^\sA-Za-z\d]+|\s+(?!\S)|\s+")
_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL_TOKENS) + ")")


class Tokenizer:
    """Word-level vocabulary with byte fallback; ids: specials, then 256 bytes, then words."""

    def __init__(self, words: Iterable[str] = ()):
        self.words = list(dict.fromkeys(words))
        self.id_to_token: list[str | bytes] = list(SPECIAL_TOKENS)
        self.id_to_token += [bytes([b]) for b in range(256)]
        self.id_to_token += self.words
        self._byte0 = len(SPECIAL_TOKENS)
        self._word_ids = {w: i for i, w in enumerate(self.id_to_token) if isinstance(w, str)}
        for s in SPECIAL_TOKENS:
            setattr(self, s.strip("<|>") + "_id", self._word_ids[s])
        self.stop_ids = [self.assistant_end_id]  # tokens that end a completion
        self.has_tools = True  # the chat format has tool-call tokens

    @classmethod
    def train(cls, texts: Iterable[str], min_count: int = 2, max_words: int = 4096) -> Tokenizer:
        """Keep the ``max_words`` most frequent multi-byte pre-tokens seen ≥ ``min_count`` times."""
        counts = Counter(p for t in texts for p in _PRETOKEN.findall(t))
        # single digits with a leading space are always in, so numbers never need byte fallback
        words = [f" {d}" for d in range(10)]
        words += sorted(
            (w for w, c in counts.most_common() if c >= min_count and len(w.encode()) > 1),
            key=lambda w: (-counts[w], w),
        )
        return cls(list(dict.fromkeys(words))[:max_words])

    @property
    def vocab_size(self) -> int:
        return len(self.id_to_token)

    def encode(self, text: str) -> list[int]:
        """Encode text; special-token strings inside it become their ids."""
        ids: list[int] = []
        for chunk in _SPECIAL_SPLIT.split(text):
            if chunk in SPECIAL_TOKENS:
                ids.append(self._word_ids[chunk])
                continue
            for piece in _PRETOKEN.findall(chunk):
                wid = self._word_ids.get(piece)
                if wid is not None:
                    ids.append(wid)
                else:
                    ids.extend(self._byte0 + b for b in piece.encode())
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids; special tokens are written as their strings, pad is dropped."""
        out, pending = [], bytearray()
        for i in ids:
            tok = self.id_to_token[int(i)]
            if isinstance(tok, bytes):
                pending += tok
                continue
            if pending:
                out.append(pending.decode("utf-8", errors="replace"))
                pending = bytearray()
            if tok != "<|pad|>":
                out.append(tok)
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    # --- chat format -------------------------------------------------------------------------

    def render_conversation(self, conv: dict) -> tuple[list[int], list[int]]:
        """Conversation → (ids, loss_mask); mask is 1 only on tokens the assistant must produce."""
        ids, mask = [self.bos_id], [0]

        def add(tokens: list[int], m: int) -> None:
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        system = ""
        for msg in conv["messages"]:
            role, content = msg["role"], msg["content"]
            if role == "system":
                system = content + "\n"
            elif role == "user":
                add([self.user_start_id, *self.encode(system + content), self.user_end_id], 0)
                system = ""
            elif role == "assistant":
                add([self.assistant_start_id], 0)
                parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
                for part in parts:
                    kind, text = part["type"], part["text"]
                    if kind == "text":
                        add(self.encode(text), 1)
                    elif kind == "tool_call":
                        add([self.tool_start_id, *self.encode(text), self.tool_end_id], 1)
                    elif kind == "tool_output":
                        add([self.output_start_id, *self.encode(text), self.output_end_id], 0)
                    else:
                        raise ValueError(f"unknown assistant part type {kind!r}")
                add([self.assistant_end_id], 1)
            else:
                raise ValueError(f"unknown role {role!r} (expected system, user or assistant)")
        return ids, mask

    def render_for_completion(self, conv: dict) -> list[int]:
        """The prompt ids up to and including ``<|assistant_start|>`` (a final assistant turn is dropped)."""
        messages = list(conv["messages"])
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        ids, _ = self.render_conversation({"messages": messages})
        return ids + [self.assistant_start_id]

    # --- persistence ---------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"kind": "posttrain-words-v1", "words": self.words}))

    def save_pretrained(self, directory: str | Path) -> None:
        """``tokenizer.json`` in ``directory`` (what a checkpoint holds)."""
        self.save(Path(directory) / "tokenizer.json")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        data = json.loads(Path(path).read_text())
        return cls(data["words"])
