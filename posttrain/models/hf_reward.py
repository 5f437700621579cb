"""A Hugging Face sequence-classification model as a reward model: what TRL's ``RewardTrainer`` writes and what
TRL's ``GRPOTrainer`` takes as a reward function when given a model path.

``HFScoreModel(idx, pad_mask)`` (B, T) → (B,): the model's single logit per row, pooled as the HF class pools
(its last token that is not ``pad_token_id``; right padding), so a row scores as it did in training. The
tokenizer is posttrain's ``HFTokenizer`` over the model's own, so prompts render with its chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from posttrain.config_checks import ConfigError


def is_sequence_classifier(path: str | Path) -> bool:
    """Whether ``path`` is a local HF model directory whose architecture is ``*ForSequenceClassification``."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in architectures)


class HFScoreModel(nn.Module):
    """A one-label ``AutoModelForSequenceClassification`` as posttrain's reward-model call (module doc)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    def forward(self, idx: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        logits = self.hf(input_ids=idx, attention_mask=pad_mask.long()).logits  # (B, 1)
        return logits[:, 0].float()  # (B,)


def load_sequence_classifier(path: str | Path, dtype: str = "float32", device: str | torch.device = "cpu"):
    """(HFScoreModel in eval mode on ``device``, its HFTokenizer); ConfigError unless the model has one label."""
    import transformers

    from posttrain.models.hf import DTYPES, HFTokenizer

    tokenizer = HFTokenizer(transformers.AutoTokenizer.from_pretrained(str(path)))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(path), dtype=DTYPES[dtype])
    if hf.config.num_labels != 1:
        raise ConfigError(f"{path} is a sequence classifier with {hf.config.num_labels} labels; a reward model has "
                          "one (num_labels=1), its logit being the score")
    if hf.config.pad_token_id is None:  # the class pools at the last token that is not padding: it must know it
        hf.config.pad_token_id = tokenizer.pad_id
    tokenizer.pad_id = hf.config.pad_token_id  # and rows are padded with that token
    return HFScoreModel(hf).to(device).eval().requires_grad_(False), tokenizer
