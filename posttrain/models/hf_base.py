"""Where a LoRA checkpoint's base model comes from, and loading such a checkpoint back as one model.

A LoRA checkpoint holds its adapter (``adapter/``) and ``base_model.json``: the base's path (absolute, and relative
to the checkpoint, tried first, so a run folder moved with its base still loads), whether it is local, its dtype as
trained, whether the calculator's tool tokens were added to it, and a **fingerprint** of its weights (sha256 of its
weight files; for a base that is itself a LoRA checkpoint, of its adapter and its own ``base_model.json``). Loading
checks the fingerprint, so a base that was overwritten since (a rolled-back or re-run stage, a copy pointing at a
re-trained original) is an error, never other weights under the adapter. A hub id is loaded as it is (not pinned).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

BASE_FILE = "base_model.json"  # a LoRA checkpoint: where the model under its adapter comes from
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.gguf", "*.pt")


def fingerprint(path: str | Path) -> str:
    """sha256 of the weights at ``path``: a ``.gguf`` file; a LoRA checkpoint's adapter and ``base_model.json``; or
    a model directory's weight files, in name order."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif (path / BASE_FILE).is_file():
        files = [path / "adapter" / "adapter_model.safetensors", path / BASE_FILE]
    else:
        files = sorted({p for pattern in WEIGHT_FILES for p in path.glob(pattern) if p.is_file()})
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def write_base(base: dict, checkpoint: Path, dtype: torch.dtype) -> None:
    """``base_model.json`` in ``checkpoint`` for a model loaded as ``base`` (``load_hf``'s record: path, local,
    tool_tokens; the fingerprint is taken once and kept in ``base``), trained in ``dtype``."""
    if base["local"] and "fingerprint" not in base:
        base["fingerprint"] = fingerprint(base["path"])
    record = {**base, "dtype": str(dtype).removeprefix("torch.")}
    if base["local"]:
        record["relative"] = os.path.relpath(base["path"], checkpoint.resolve())
    (checkpoint / BASE_FILE).write_text(json.dumps(record, indent=1))


def find_base(checkpoint: Path) -> dict:
    """The checkpoint's ``base_model.json`` with ``path`` pointing at a base whose fingerprint matches (the relative
    path first); FileNotFoundError saying which failed when none does."""
    record = json.loads((checkpoint / BASE_FILE).read_text())
    if not record.get("local"):
        return record
    tried = []
    for candidate in dict.fromkeys(filter(None, [record.get("relative") and str((checkpoint / record["relative"])
                                                                                  .resolve()), record["path"]])):
        if not Path(candidate).exists():
            tried.append(f"{candidate} (not there)")
        elif record.get("fingerprint") not in (None, fingerprint(candidate)):
            tried.append(f"{candidate} (other weights than the adapter was trained on)")
        else:
            return {**record, "path": candidate}
    raise FileNotFoundError(f"{checkpoint} holds a LoRA adapter on a base model that cannot be found: "
                            f"{'; '.join(tried)}. Put the base back, or load an export of the run (posttrain export)")


def add_tool_tokens(model, tokenizer) -> int:
    """Add the calculator's four special tokens to ``tokenizer`` and grow the embeddings (and an untied LM head)
    with rows equal to the mean of the old ones, exactly (so a base rebuilt later is the same); returns the count
    added (0: it had them)."""
    from posttrain.models.hf import TOOL_TOKENS

    added = tokenizer.add_special_tokens({"additional_special_tokens": list(TOOL_TOKENS)})
    if added:
        old = model.get_input_embeddings().weight.shape[0]
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for table in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())
                          if m is not None}.values():
                table.weight[old:] = table.weight[:old].mean(0)
    return added


def load_adapter_checkpoint(path: Path, dtype: str, tool_tokens: bool, lora, device, chat_template, load_hf,
                            seen: frozenset = frozenset()):
    """A LoRA checkpoint as one model: its base loaded as it was trained (``load_hf``, recursively for a base that is
    itself a LoRA checkpoint), the adapter merged into it in place (W + (α/r)·B·A), the checkpoint's own tokenizer
    (its tool tokens and chat template), then ``tool_tokens`` added if asked and missing. → (model, tokenizer,
    the base record of this checkpoint for a LoRA model trained on top)."""
    import peft
    import transformers

    from posttrain.models.hf import DTYPES, read_chat_template

    here = path.resolve()
    if here in seen:
        raise ValueError(f"{path}: its base_model.json leads back to itself")
    base = find_base(path)
    under, _ = load_hf(base["path"], base.get("dtype", dtype), base.get("tool_tokens", False), None, "cpu",
                       seen=seen | {here})
    model = peft.PeftModel.from_pretrained(under.hf, path / "adapter").merge_and_unload()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if chat_template is not None:
        tokenizer.chat_template = read_chat_template(chat_template)
    added = tool_tokens and add_tool_tokens(model, tokenizer)
    record = {"path": str(here), "local": True, "tool_tokens": bool(added)}
    return model.to(DTYPES[dtype]), tokenizer, record
