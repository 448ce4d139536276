"""A position-indexed KV cache for tree verification (gpt-fast style), behind the standard transformers
`Cache` interface so any Llama-family model in transformers can use it unmodified.

Each layer preallocates (B, kv_heads, max_len, head_dim) once. A forward over T new tokens writes them at
slots [n, n+T) and attends over the view [0, n+T): no torch.cat reallocation per step (DynamicCache) and no
attention over unused slots (StaticCache). After verification `keep(n, path)` moves the accepted tree rows to
slots n, n+1, ... and drops the rest by moving the length back: rejected rows are simply overwritten later.
A cache may store keys and values in another dtype than the model computes them in (`dtype`): a quantized base
attends in float32, and a float32 cache saves casting every cached row on every forward.
"""

from __future__ import annotations

import torch
from transformers import Cache
from transformers.cache_utils import DynamicLayer


class PositionIndexedLayer(DynamicLayer):
    def __init__(self, max_len: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.max_len = max_len
        self.length = 0
        self.storage_dtype = dtype  # None: the dtype of the first keys written

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device = self.storage_dtype or key_states.dtype, key_states.device
        self.buf_k = key_states.new_zeros(b, h, self.max_len, d, dtype=self.dtype)
        self.buf_v = value_states.new_zeros(b, h, self.max_len, value_states.shape[-1], dtype=self.dtype)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} tokens > capacity {self.max_len}")
        self.buf_k[:, :, start:end] = key_states
        self.buf_v[:, :, start:end] = value_states
        self.length = end
        self.keys, self.values = self.buf_k[:, :, :end], self.buf_v[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_len

    def keep(self, start: int, rows: torch.Tensor | None, new_length: int) -> None:
        if rows is not None and self.is_initialized:
            self.buf_k[:, :, start:start + len(rows)] = self.buf_k[:, :, rows]
            self.buf_v[:, :, start:start + len(rows)] = self.buf_v[:, :, rows]
        self.length = new_length

    def crop(self, tokens_to_remove: int) -> None:
        """transformers' meaning: remove `-tokens_to_remove` tokens (0 removes none; > 0 is an error)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of tokens to remove, as with "
                             "transformers' caches")
        self.length = max(0, self.length + tokens_to_remove)
        if self.is_initialized:
            self.keys, self.values = self.buf_k[:, :, :self.length], self.buf_v[:, :, :self.length]


class TreeKVCache(Cache):
    """`Cache` of `PositionIndexedLayer`s; `keep` compacts the accepted path after each verification.
    dtype: what keys and values are stored (and returned) in; default the model's own."""

    def __init__(self, num_layers: int, max_len: int, dtype: torch.dtype | None = None):
        super().__init__(layers=[PositionIndexedLayer(max_len, dtype) for _ in range(num_layers)])
        self.max_len = max_len

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].length

    def keep(self, start: int, accepted_slots: torch.Tensor) -> None:
        """Keep tree rows `accepted_slots` (absolute slots, in path order) at slots start, start+1, ..."""
        n = len(accepted_slots)
        contiguous = bool((accepted_slots == torch.arange(start, start + n, device=accepted_slots.device)).all())
        for layer in self.layers:
            layer.keep(start, None if contiguous else accepted_slots, start + n)
