"""scripts/bench_decode.py: its `--hf` baseline is transformers' own `generate` on transformers' own SDPA, not
on the attention function a HydraModel switches its base to."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from helpers import make_heads, make_tiny_base

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench_decode

from hydra.model.attention import GROUPED_SDPA


def test_hf_generate_runs_on_transformers_sdpa_and_gives_ours_back(monkeypatch):
    base = make_tiny_base(scale=0.3).to(torch.bfloat16)
    model = make_heads(base)
    assert base.config._attn_implementation == GROUPED_SDPA
    seen = []
    generate = type(base).generate

    def recording(self, *args, **kwargs):
        seen.append(self.config._attn_implementation)
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(type(base), "generate", recording)
    tokens, _ = bench_decode.hf_decoder(model, 5, {base.config.vocab_size - 1})([5, 6, 7])
    assert seen == ["sdpa"] and 1 <= len(tokens) <= 5
    assert base.config._attn_implementation == GROUPED_SDPA
    assert all(layer.self_attn.config._attn_implementation == GROUPED_SDPA for layer in base.model.layers)
