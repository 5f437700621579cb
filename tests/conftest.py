"""Shared fixtures: a small trained tokenizer and tiny built-in GPTs with non-trivial weights."""

from __future__ import annotations

import math
import random

import pytest
import torch

from posttrain.models.gpt import GPT, GPTConfig
from posttrain.tasks.arithmetic import ArithmeticTask
from posttrain.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    """A tokenizer trained on a small arithmetic corpus (words, digits with a space, specials)."""
    texts = ArithmeticTask(test_size=8).corpus(random.Random(0), n=60)
    return Tokenizer.train(texts)


def tiny_gpt(vocab_size: int, seed: int = 0, randomize: bool = True, **sizes) -> GPT:
    """A 2-layer GPT. ``randomize`` replaces the default init (zero residual projections, near-zero
    LM head, i.e. a model whose attention does nothing and whose outputs are almost uniform) by
    dense random weights, so cache/padding bugs and sampling differences actually show."""
    cfg = dict(vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=128)
    cfg.update(sizes)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**cfg))
    if randomize:
        with torch.no_grad():
            for name, p in model.named_parameters():
                std = 1.0 if name == "wte.weight" else 1.0 / math.sqrt(p.shape[-1])
                p.normal_(0.0, 2.0 * std if name == "lm_head.weight" else std)
    return model.eval()


@pytest.fixture
def gpt(tok: Tokenizer) -> GPT:
    return tiny_gpt(tok.vocab_size)


@pytest.fixture
def make_gpt(tok: Tokenizer):
    """Factory: ``make_gpt(seed=0, randomize=True, **sizes)`` → a tiny GPT over ``tok``'s vocab."""

    def make(seed: int = 0, randomize: bool = True, **sizes) -> GPT:
        return tiny_gpt(tok.vocab_size, seed=seed, randomize=randomize, **sizes)

    return make


@pytest.fixture(scope="session")
def hf_llama_dir(tmp_path_factory):
    """A tiny random HF Llama with a BPE tokenizer trained on the arithmetic corpus, saved once per session."""
    pytest.importorskip("transformers")
    from posttrain.models.tiny_llama import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("hf_llama"), ArithmeticTask(test_size=8).corpus(
        random.Random(0), n=300), vocab_size=400)
