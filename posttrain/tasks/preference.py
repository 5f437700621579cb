"""Preference pairs: two assistant replies to one prompt, the first preferred (reward models, DPO).

Sources (``load_preferences``): a directory with train/test ``.jsonl`` or ``.parquet`` files, one such
file, or an HF dataset id. Row shapes, as in TRL's preference datasets:

- text: ``{"prompt" | "question": str, "chosen": str, "rejected": str}``;
- conversational, explicit prompt: ``{"prompt": [messages], "chosen": [assistant message(s)],
  "rejected": [...]}``;
- conversational, implicit prompt: ``{"chosen": [whole conversation], "rejected": [whole conversation]}``
  whose messages agree up to the last one, an assistant reply.

An optional numeric ``margin`` column is kept (the reward-model loss subtracts it).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PreferencePair:
    """One preference: the same prompt answered twice, ``chosen`` preferred over ``rejected``."""

    prompt: list[dict]  # the conversation before the reply: messages {role, content}, ending with a user turn
    chosen: str | list[dict]  # the preferred reply: text, or built-in tool-format parts
    rejected: str | list[dict]  # the other reply
    margin: float = 0.0  # how much more ``chosen`` is preferred (Llama 2's margin; 0: none given)
    where: str = ""  # where the pair came from, for messages: 'data/train.jsonl:12', 'hub:id[train][12]'
    meta: dict = field(default_factory=dict)  # what a task keeps beside the pair (gold answer, why rejected)

    def conversation(self, which: str) -> dict:
        """The prompt followed by reply ``which`` ('chosen' | 'rejected'), as a conversation to render."""
        reply = self.chosen if which == "chosen" else self.rejected
        return {"messages": [*self.prompt, {"role": "assistant", "content": reply}]}
