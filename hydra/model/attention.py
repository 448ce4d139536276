"""The attention functions a base model decodes with, registered with transformers' `AttentionInterface`, so
the model's own modeling code calls them (no patched modeling files).

- `GROUPED_SDPA` ("sdpa_grouped"): transformers' SDPA, except that on a CPU a forward with a mask (tree
  verification) and grouped key/value heads calls torch's kernel with `enable_gqa`. transformers repeats the
  keys and values to every query head whenever a mask is given (its rule follows CUDA's kernels, which take
  no mask with grouped heads): a copy of `num_key_value_groups` times the cache per layer and verification.
  torch's CPU kernel takes the mask with grouped heads and gives the same numbers (tested bitwise). Every
  `HydraModel` switches an SDPA base to it (`use_grouped_sdpa`). A plain step's bf16 attention (one query
  token) goes to the kernel as several query rows (`_one_query`): the same arithmetic per row, where one row
  takes ~5x longer. Elsewhere (fp32 without a mask, other devices) it is transformers' function unchanged.
- `FP32_ATTENTION` ("sdpa_fp32"): the same in float32, returned in the query's dtype, for quantized bases on a
  CPU: for one query token torch's fp32 kernel is faster than its bf16 one, even given several rows
  (README, Quantized base model). Such a base keeps its KV cache in float32 (`attention_dtype`), so no
  forward casts the cache.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

GROUPED_SDPA = "sdpa_grouped"
FP32_ATTENTION = "sdpa_fp32"
# Implementations whose tree masks generate.py passes as booleans, as transformers' SDPA takes them; the
# others (eager, and sdpa_fp32, which casts a float mask to float32) get the additive form.
BOOL_MASK_ATTENTION = ("sdpa", GROUPED_SDPA)


def _grouped_sdpa(module, query, key, value, attention_mask, **kwargs):
    on_cpu, dropout, scale = query.device.type == "cpu", kwargs.get("dropout", 0.0), kwargs.get("scaling")
    one_mask_row = attention_mask is None or attention_mask.shape[1] == 1  # shared by every head
    if on_cpu and query.shape[2] == 1 and query.dtype in (torch.bfloat16, torch.float16) and one_mask_row:
        return _one_query(query, key, value, attention_mask, dropout, scale), None
    if on_cpu and attention_mask is not None and key.shape[1] != query.shape[1]:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scale, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _one_query(query, key, value, mask: torch.Tensor | None, dropout: float,
               scale: float | None) -> torch.Tensor:
    """Attention of one query token (a plain decoding step) in bf16/fp16 on a CPU, given to torch's kernel as
    several query rows: the query heads that share a key/value head (grouped heads), else the query twice.
    Each row is the same computation, under the same mask row (`mask`: (batch, 1, 1, keys) or None);
    torch's reduced-precision CPU kernel takes ~5x longer for one row than for two or three, and the gap
    grows with the cache (README, "One query token in bf16"). Returns (batch, 1, heads, head_dim), as
    transformers' attention functions do."""
    batch, heads, _, head_dim = query.shape
    groups = heads // key.shape[1]
    rows = query.reshape(batch, key.shape[1], groups, head_dim) if groups > 1 else query.expand(-1, -1, 2, -1)
    out = torch.nn.functional.scaled_dot_product_attention(rows, key, value, attn_mask=mask,
                                                           dropout_p=dropout, scale=scale)
    return out[:, :, :groups].reshape(batch, 1, heads, head_dim)


def _sdpa_fp32(module, query, key, value, attention_mask, **kwargs):
    """`_grouped_sdpa` in float32, returned in the query's dtype; the cast costs one pass over the keys and
    values, nothing for a float32 KV cache."""
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    out, weights = _grouped_sdpa(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), weights


def _register(name: str, fn) -> None:
    AttentionInterface.register(name, fn)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)  # the masks these take are SDPA's


def use_grouped_sdpa(model: nn.Module) -> None:
    """Switch a base model that runs transformers' SDPA to `GROUPED_SDPA` (same numbers, no repeated keys and
    values under a tree mask on a CPU); any other implementation is left as it is."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        _register(GROUPED_SDPA, _grouped_sdpa)
        model.set_attn_implementation(GROUPED_SDPA)


def use_fp32_attention(model: nn.Module) -> None:
    """Run `model`'s attention through `_sdpa_fp32` (quantized bases)."""
    _register(FP32_ATTENTION, _sdpa_fp32)
    model.set_attn_implementation(FP32_ATTENTION)


def takes_bool_mask(config) -> bool:
    """Whether a model's attention takes its tree masks as booleans (`BOOL_MASK_ATTENTION`), else additive."""
    return config._attn_implementation in BOOL_MASK_ATTENTION


def attention_dtype(config) -> torch.dtype | None:
    """The dtype a model's attention reads keys and values in when it differs from its activations' (float32
    for the fp32 attention of quantized bases), else None: the dtype its KV cache should store."""
    return torch.float32 if getattr(config, "_attn_implementation", None) == FP32_ATTENTION else None
