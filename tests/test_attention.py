"""The attention functions decoding registers with transformers (`hydra.model.attention`): with a tree mask
and grouped key/value heads they call torch's kernel with `enable_gqa` instead of transformers' repeated keys
and values, and give the same numbers; every HydraModel switches an SDPA base to the grouped function."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import make_heads, make_tiny_base
from transformers.integrations import sdpa_attention
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hydra.model.attention import GROUPED_SDPA, _grouped_sdpa, _sdpa_fp32
from hydra.model.families import tree_attention_mask
from hydra.model.kv_cache import TreeKVCache


def _tree_rows(dtype: torch.dtype, mask_kind: str = "bool"):
    """Query (1, 6, 4, 16): 4 tree rows after 8 cached ones; keys/values of 2 grouped heads; a tree mask."""
    gen = torch.Generator().manual_seed(0)
    t, n = 4, 12
    query = torch.randn(1, 6, t, 16, generator=gen).to(dtype)
    key, value = (torch.randn(1, 2, n, 16, generator=gen).to(dtype) for _ in range(2))
    allowed = torch.ones(t, n, dtype=torch.bool).tril(n - t)
    allowed[2, n - t + 1] = False  # a tree row that does not see its left neighbour
    additive = torch.zeros(t, n).masked_fill(~allowed, torch.finfo(torch.float32).min)
    mask = (allowed if mask_kind == "bool" else additive)[None, None]
    return query, key, value, mask, SimpleNamespace(num_key_value_groups=3, is_causal=True)


def _forbid_repeat_kv(monkeypatch):
    def no_copy(*args):
        raise AssertionError("keys and values repeated per query head")
    monkeypatch.setattr(sdpa_attention, "repeat_kv", no_copy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_sdpa_with_a_tree_mask_equals_transformers_sdpa_bitwise(dtype, monkeypatch):
    query, key, value, mask, module = _tree_rows(dtype)
    want, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=0.0, scaling=0.25)
    _forbid_repeat_kv(monkeypatch)
    got, _ = _grouped_sdpa(module, query, key, value, mask, dropout=0.0, scaling=0.25)
    assert got.dtype == dtype and got.shape == (1, 4, 6, 16)
    assert torch.equal(got, want)


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_fp32_attention_with_a_tree_mask_equals_transformers_sdpa(mask_kind, monkeypatch):
    """`_sdpa_fp32` (quantized bases): the same grouped call in float32, returned in the query's dtype."""
    query, key, value, mask, module = _tree_rows(torch.bfloat16, mask_kind)
    key, value = key.float(), value.float()
    want, _ = sdpa_attention_forward(module, query.float(), key, value, mask, dropout=0.0, scaling=0.25)
    _forbid_repeat_kv(monkeypatch)
    got, _ = _sdpa_fp32(module, query, key, value, mask, dropout=0.0, scaling=0.25)
    assert got.dtype == torch.bfloat16 and got.shape == (1, 4, 6, 16)
    torch.testing.assert_close(got.float(), want.to(torch.bfloat16).float(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hydra_model_verifies_a_tree_with_the_grouped_function_and_the_same_logits(dtype, monkeypatch):
    """A HydraModel switches its SDPA base to GROUPED_SDPA; a tree verification forward after a prefill gives
    the logits transformers' SDPA gives, bit for bit (so every bf16 and fp32 measurement stands)."""
    base = make_tiny_base(scale=0.3).to(dtype)
    tree = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]],
                        dtype=torch.bool)
    depth = torch.tensor([0, 1, 1, 2, 2])
    prompt, nodes = torch.tensor([[5, 17, 3, 60, 2, 9, 41]]), torch.tensor([[8, 30, 12, 7, 55]])

    def verify_logits():
        cache = TreeKVCache(base.config.num_hidden_layers, 32)
        with torch.inference_mode():
            base(input_ids=prompt, past_key_values=cache, use_cache=True)
            mask = tree_attention_mask(tree, prompt.shape[1], dtype, True, base.config, depth)
            return base(input_ids=nodes, position_ids=prompt.shape[1] + depth[None], attention_mask=mask,
                        past_key_values=cache, use_cache=True).logits

    want = verify_logits()
    assert base.config._attn_implementation == "sdpa"
    make_heads(base, "prefix-mlp")
    assert base.config._attn_implementation == GROUPED_SDPA
    _forbid_repeat_kv(monkeypatch)
    assert torch.equal(verify_logits(), want)


def test_an_eager_base_stays_eager():
    base = make_tiny_base(scale=0.3, attn_implementation="eager")
    make_heads(base)
    assert base.config._attn_implementation == "eager"


@pytest.mark.parametrize("kv_heads", [2, 6])  # grouped (3 query heads per key/value head) and one-to-one
@pytest.mark.parametrize("cached", [1, 37, 300])
@pytest.mark.parametrize("masked", [False, True])  # eager plain steps pass no mask, exported ones a mask row
def test_one_bf16_query_goes_to_the_kernel_as_several_rows_with_the_same_attention(kv_heads, cached, masked,
                                                                                   monkeypatch):
    """A plain decoding step's bf16 attention (one query token) reaches torch's kernel as the query heads
    sharing a key/value head (or the query twice), where one row is ~5x slower; each head's output is
    transformers' SDPA's for that head under the same mask (up to bf16 rounding), so a head mix-up or a
    dropped mask would fail."""
    gen = torch.Generator().manual_seed(cached)
    query = torch.randn(1, 6, 1, 16, generator=gen).bfloat16()
    key, value = (torch.randn(1, kv_heads, cached, 16, generator=gen).bfloat16() for _ in range(2))
    mask = None
    if masked:  # a static cache's unused slots, and one more hidden key
        mask = torch.ones(1, 1, 1, cached, dtype=torch.bool)
        mask[..., cached // 2 + 1:] = False
    module = SimpleNamespace(num_key_value_groups=6 // kv_heads, is_causal=True)
    want, _ = sdpa_attention_forward(module, query.float(), key.float(), value.float(), mask, dropout=0.0,
                                     scaling=0.25)
    rows = []
    kernel = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *args, **kwargs: rows.append(q.shape[2]) or kernel(q, *args, **kwargs))
    got, _ = _grouped_sdpa(module, query, key, value, mask, dropout=0.0, scaling=0.25)
    assert rows == [max(2, 6 // kv_heads)]
    assert got.dtype == torch.bfloat16 and got.shape == (1, 1, 6, 16)
    torch.testing.assert_close(got.float(), want, rtol=0.02, atol=0.02)
    rows.clear()  # float32 keeps the other paths: one row, which torch's fp32 kernel runs fast
    got32, _ = _grouped_sdpa(module, query.float(), key.float(), value.float(), mask, dropout=0.0,
                             scaling=0.25)
    assert rows == [1]
    torch.testing.assert_close(got32, want, rtol=1e-6, atol=1e-6)
