"""Preference pairs: two assistant replies to one prompt, the first preferred (reward models, DPO).

Sources (``load_preferences``): a directory with train/test ``.jsonl`` or ``.parquet`` files, one such
file, or an HF dataset id. Row shapes, as in TRL's preference datasets:

- text: ``{"prompt" | "question": str, "chosen": str, "rejected": str}``;
- conversational, explicit prompt: ``{"prompt": [messages], "chosen": [one assistant message],
  "rejected": [one assistant message]}``;
- conversational, implicit prompt: ``{"chosen": [whole conversation], "rejected": [whole conversation]}``
  whose messages agree up to the last one, an assistant reply.

An optional numeric ``margin`` column is kept (the reward-model loss subtracts it), and an optional
``system`` string column becomes a system message before the prompt. A text prompt becomes one user
message; messages keep only ``role`` and ``content`` (a string); a conversational reply is the content
of its assistant message. Other columns are ignored.

Rows are checked as they are read (``to_pair``): each problem is a ValueError that starts with where
the row is (``data/train.jsonl:12``, ``data/train.parquet row 11``, ``org/pairs[train] row 11``).

Splits (``load_preferences(source, test_size)``), as in ``gsm8k.load_splits``: a directory's test
file cut to its first ``test_size`` pairs (0: all); a single file's first ``test_size`` pairs held out
as the test split, the rest to train on (0: none held out); a hub dataset's ``train`` and ``test``
splits, or, when it has no ``test`` split, its first ``test_size`` train pairs held out.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.tasks.files import file_rows, hub_rows, load_hub, split_file

WHAT = "preference"  # how file and dataset messages name this data


@dataclass
class PreferencePair:
    """One preference: the same prompt answered twice, ``chosen`` preferred over ``rejected``."""

    prompt: list[dict]  # the conversation before the reply: messages {role, content}, ending with a user turn
    chosen: str | list[dict]  # the preferred reply: text, or built-in tool-format parts
    rejected: str | list[dict]  # the other reply
    margin: float = 0.0  # how much more ``chosen`` is preferred (Llama 2's margin; 0: none given)
    where: str = ""  # where the pair came from, for messages: 'data/train.jsonl:12', 'org/pairs[train] row 11'
    meta: dict = field(default_factory=dict)  # what a task keeps beside the pair (gold answer, why rejected)

    def conversation(self, which: str) -> dict:
        """The prompt followed by reply ``which`` ('chosen' | 'rejected'), as a conversation to render."""
        reply = self.chosen if which == "chosen" else self.rejected
        return {"messages": [*self.prompt, {"role": "assistant", "content": reply}]}


# --- rows -> pairs ------------------------------------------------------------------------------


def to_pair(row: object, where: str) -> PreferencePair:
    """A dataset row (one of the module doc's shapes) as a PreferencePair; ValueError starting with
    ``where`` if it is not an object, a field is missing, null, of the wrong type or blank, the two
    replies are the same, or implicit-prompt conversations disagree before their last message."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with 'chosen' and 'rejected', got {type(row).__name__}")
    chosen = _field(row, "chosen", where)
    if isinstance(chosen, str):
        prompt, chosen, rejected = _text_row(row, where)
    elif isinstance(chosen, list):
        prompt, chosen, rejected = _conversational_row(row, where)
    else:
        raise ValueError(f"{where}: 'chosen' must be a string or a list of messages, got {_show(chosen)}")
    if chosen == rejected:
        raise ValueError(f"{where}: chosen and rejected are the same reply")
    system = row.get("system")
    if system is not None:
        if prompt[0]["role"] == "system":
            raise ValueError(f"{where}: row has both a 'system' column and a system message; keep one")
        prompt = [{"role": "system", "content": _text(system, "'system'", where)}, *prompt]
    return PreferencePair(prompt, chosen, rejected, _margin(row.get("margin"), where), where)


def _text_row(row: dict, where: str) -> tuple[list[dict], str, str]:
    """(prompt, chosen, rejected) of a text row: the prompt (``prompt``, else ``question``) as a user turn."""
    key = "prompt" if row.get("prompt") is not None else "question"
    if row.get(key) is None:
        raise ValueError(f"{where}: row has no 'prompt' (or 'question')")
    prompt = _text(row[key], f"'{key}'", where)
    chosen, rejected = (_text(_field(row, name, where), f"'{name}'", where) for name in ("chosen", "rejected"))
    return [{"role": "user", "content": prompt}], chosen, rejected


def _conversational_row(row: dict, where: str) -> tuple[list[dict], str, str]:
    """(prompt, chosen, rejected) of a conversational row, with an explicit ``prompt`` or an implicit one."""
    chosen, rejected = (_messages(_field(row, name, where), f"'{name}'", where) for name in ("chosen", "rejected"))
    if row.get("prompt") is not None:
        prompt = _messages(row["prompt"], "'prompt'", where)
        return prompt, _reply(chosen, "'chosen'", where), _reply(rejected, "'rejected'", where)
    if chosen[:-1] != rejected[:-1]:
        raise ValueError(f"{where}: 'chosen' and 'rejected' must agree on every message but the last "
                         f"(the prompt); they differ at message {_first_difference(chosen, rejected)}")
    for name, conversation in (("'chosen'", chosen), ("'rejected'", rejected)):
        if conversation[-1]["role"] != "assistant":
            raise ValueError(f"{where}: the last message of {name} must be from the assistant, "
                             f"got role '{conversation[-1]['role']}'")
    if len(chosen) == 1:
        raise ValueError(f"{where}: 'chosen' has no prompt before its reply (no 'prompt' column either)")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def _first_difference(a: list[dict], b: list[dict]) -> int:
    """The first index where ``a`` and ``b`` differ (the shorter length when one is a prefix of the other)."""
    shorter = min(len(a), len(b))
    return next((i for i in range(shorter) if a[i] != b[i]), shorter)


def _reply(messages: list[dict], name: str, where: str) -> str:
    """The content of ``messages``, which must be exactly one assistant message."""
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        roles = [m["role"] for m in messages]
        raise ValueError(f"{where}: {name} must be one assistant message, got roles {roles}")
    return messages[0]["content"]


def _messages(value: object, name: str, where: str) -> list[dict]:
    """A non-empty list of messages, each cut to {role, content} with non-blank string content."""
    if not isinstance(value, list):
        raise ValueError(f"{where}: {name} must be a list of messages, got {_show(value)}")
    if not value:
        raise ValueError(f"{where}: {name} has no messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ValueError(f"{where}: {name} message {i} must be an object with 'role' and 'content', "
                             f"got {_show(message)}")
        for key in ("role", "content"):
            if message.get(key) is None:
                raise ValueError(f"{where}: {name} message {i} has no '{key}'")
        role = _text(message["role"], f"{name} message {i} 'role'", where)
        messages.append({"role": role, "content": _text(message["content"], f"{name} message {i} 'content'", where)})
    return messages


def _field(row: dict, key: str, where: str) -> object:
    """``row[key]``; ValueError if it is missing or null."""
    if row.get(key) is None:
        raise ValueError(f"{where}: row has no '{key}'")
    return row[key]


def _text(value: object, name: str, where: str) -> str:
    """``value`` if it is a string with something besides whitespace; ValueError naming ``name`` if not."""
    if not isinstance(value, str):
        raise ValueError(f"{where}: {name} must be a string, got {_show(value)}")
    if not value.strip():
        raise ValueError(f"{where}: {name} is empty")
    return value


def _margin(value: object, where: str) -> float:
    """The ``margin`` column as a float (missing or null: 0.0); ValueError for a bool, a non-number or a
    value that is not finite."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where}: 'margin' must be a number, got {_show(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{where}: 'margin' must be finite, got {value}")
    return float(value)


def _show(value: object) -> str:
    """A value for a message: its type and the start of its repr, e.g. ``list ['a', 'b']``."""
    return f"{type(value).__name__} {value!r:.40}"


# --- loading ------------------------------------------------------------------------------------


def read_pairs(path: Path | str) -> list[PreferencePair]:
    """The pairs in a .jsonl or .parquet file; ValueError if it has none or a row is not a valid pair."""
    return [to_pair(row, where) for where, row in file_rows(Path(path), WHAT)]


def _hub_split(loaded: Mapping, dataset_id: str, split: str) -> list[PreferencePair]:
    """The pairs of split ``split`` of a loaded hub dataset."""
    return [to_pair(row, where) for where, row in hub_rows(loaded, dataset_id, split, WHAT)]


def _hub_pairs(dataset_id: str, test_size: int) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, test) pairs of hub dataset ``dataset_id`` (no config); without a ``test`` split, the first
    ``test_size`` train pairs are the test split."""
    loaded = load_hub(dataset_id, None, WHAT)
    train = _hub_split(loaded, dataset_id, "train")
    if "test" not in loaded:
        return train[test_size:], train[:test_size]
    test = _hub_split(loaded, dataset_id, "test")
    return train, test[:test_size] if test_size else test


def load_preferences(source: str, test_size: int = 0) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, test) pairs from ``source``: a directory holding ``train`` and ``test`` .jsonl/.parquet files
    (test cut to its first ``test_size`` pairs, 0: all); one such file (its first ``test_size`` pairs are
    the test split, the rest train; 0: no test pairs); or, when no such path exists, a Hugging Face hub
    dataset id, which needs ``datasets`` (splits ``train`` and ``test``; without ``test``, the first
    ``test_size`` train pairs are held out). ValueError if ``test_size`` is negative."""
    if test_size < 0:
        raise ValueError(f"test_size must be 0 or more, got {test_size}")
    path = Path(source).expanduser()
    if path.is_dir():
        train, test = (read_pairs(split_file(path, split, WHAT)) for split in ("train", "test"))
        return train, test[:test_size] if test_size else test
    if path.is_file():
        pairs = read_pairs(path)
        if test_size >= len(pairs):
            raise ValueError(f"{path} has {len(pairs)} pairs and test_size={test_size} holds out the first "
                             f"{test_size}: none would be left to train on (lower data.test_size)")
        return pairs[test_size:], pairs[:test_size]
    return _hub_pairs(source, test_size)
