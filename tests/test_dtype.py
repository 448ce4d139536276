"""dtype "auto" (the training pipeline's and the distillation's default): bfloat16 where the device computes
it natively, float32 on a CPU that would emulate it."""

from __future__ import annotations

import pytest
import torch
from helpers import save_tiny_model

from hydra.model.base_model import load_base_model, resolve_dtype


def _cpu_has(monkeypatch, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize("avx512_bf16, amx, want", [
    (True, False, "bfloat16"), (False, True, "bfloat16"), (True, True, "bfloat16"), (False, False, "float32"),
])
def test_auto_on_a_cpu_is_bf16_only_where_it_is_native(monkeypatch, avx512_bf16, amx, want):
    _cpu_has(monkeypatch, avx512_bf16, amx)
    assert resolve_dtype("auto", "cpu") == want
    # a dtype asked for by name is kept, whatever the CPU
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"
    assert resolve_dtype(torch.float32, "cpu") == torch.float32


def test_auto_on_a_gpu_is_bf16_where_it_has_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "cuda") == "float16"


@pytest.mark.parametrize("native", [True, False])
def test_load_base_model_resolves_auto(tmp_path, monkeypatch, native):
    tiny = save_tiny_model(tmp_path, heads=dict(num_heads=2))
    _cpu_has(monkeypatch, native, False)
    base, _ = load_base_model(str(tiny / "base"), dtype="auto", device="cpu")
    assert base.dtype == (torch.bfloat16 if native else torch.float32)
