"""A position-indexed KV cache for tree verification (gpt-fast style), behind the standard transformers
`Cache` interface so any Llama-family model in transformers can use it unmodified.

Each layer has a key and a value buffer (B, kv_heads, storage_len, head_dim), allocated once; all layers share
one length n. A forward over T new tokens writes them at slots [n, n+T) and attends over the view [0, n+T):
no torch.cat reallocation per step (DynamicCache) and no attention over unused slots (StaticCache). After
verification `keep(n, path)` moves the accepted tree rows to slots n, n+1, ... and drops the rest by moving
the length back: rejected rows are simply overwritten later. Slots at or past the length are never read, so
the buffers need no zeroing.

Why one length, and buffers of a size fixed per model (`storage_len`, allocated before the first forward by
`allocate_for`): a compiled decoder (`hydra.model.compiled`) checks, before every call, each value its graph
was specialised on. With a length per layer and buffers sized per reply, ~20 Python conditions per layer
read the cache; with one length and static buffer sizes, 5 in all (README, Compiled decoder). Every layer of a
forward writes the same slots, so the length moves on once the last layer has been written; a forward
interrupted before that leaves the length where it was.

A cache may store keys and values in another dtype than the model computes them in (`dtype`): a quantized base
attends in float32, and a float32 cache saves casting every cached row on every forward.
"""

from __future__ import annotations

import torch
from transformers import Cache, PretrainedConfig
from transformers.cache_utils import CacheLayerMixin


class PositionIndexedLayer(CacheLayerMixin):
    """One layer's view of a `TreeKVCache`: its buffers and the shared length. `keys`/`values` are views
    computed on access, so it skips CacheLayerMixin.__init__, which would store them."""

    is_sliding = False
    is_croppable = True

    def __init__(self, cache: TreeKVCache, index: int):  # no super().__init__(): see the class docstring
        self.cache, self.index = cache, index

    @property
    def is_initialized(self) -> bool:
        return self.cache.k is not None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.cache.allocate_like(key_states, value_states)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.cache.update(key_states, value_states, self.index)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cache.length

    def get_max_length(self) -> int:
        return self.cache.max_len

    @property
    def buf_k(self) -> torch.Tensor:
        return self.cache.k[self.index]

    @property
    def buf_v(self) -> torch.Tensor:
        return self.cache.v[self.index]

    @property
    def keys(self) -> torch.Tensor:
        return self.cache.k[self.index][:, :, :self.cache.length]

    @property
    def values(self) -> torch.Tensor:
        return self.cache.v[self.index][:, :, :self.cache.length]


class TreeKVCache(Cache):
    """`Cache` of `PositionIndexedLayer`s sharing one length; `keep` compacts the accepted path after each
    verification. max_len: the tokens it may hold (an update past it is an error); storage_len (>= max_len,
    default max_len): the buffers' size, fixed per model for a compiled decoder; dtype: what keys and values
    are stored (and returned) in, default the model's own."""

    def __init__(self, num_layers: int, max_len: int, dtype: torch.dtype | None = None,
                 storage_len: int | None = None):
        if storage_len is not None and storage_len < max_len:
            raise ValueError(f"storage_len {storage_len} < max_len {max_len}")
        self.max_len, self.storage_len, self.length = max_len, storage_len or max_len, 0
        self.num_layers, self.storage_dtype = num_layers, dtype  # dtype None: that of the first keys written
        self.k: list[torch.Tensor] | None = None
        self.v: list[torch.Tensor] | None = None
        super().__init__(layers=[PositionIndexedLayer(self, i) for i in range(num_layers)])

    def allocate(self, batch: int, kv_heads: int, key_dim: int, value_dim: int, dtype: torch.dtype,
                 device: torch.device | str, static: bool = False) -> None:
        dtype = self.storage_dtype or dtype
        self.k = [torch.empty(batch, kv_heads, self.storage_len, key_dim, dtype=dtype, device=device)
                  for _ in range(self.num_layers)]
        self.v = [torch.empty(batch, kv_heads, self.storage_len, value_dim, dtype=dtype, device=device)
                  for _ in range(self.num_layers)]
        if static:  # sizes TorchDynamo takes as constants, not symbols checked per call (module docstring)
            for buf in self.k + self.v:
                torch._dynamo.mark_static(buf)

    def allocate_like(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate for keys and values shaped like the first ones written (sizes not marked static)."""
        self.allocate(key_states.shape[0], key_states.shape[1], key_states.shape[-1], value_states.shape[-1],
                      key_states.dtype, key_states.device)

    def allocate_for(self, config: PretrainedConfig, dtype: torch.dtype, device: torch.device | str,
                     static: bool = False) -> None:
        """Allocate from the model config before the first forward; `static`: mark the buffers' sizes as
        constants for TorchDynamo (for a storage_len that is the same for every reply)."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.allocate(1, kv_heads, head_dim, head_dim, dtype, device, static)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write T new rows of layer `layer_idx` at [length, length+T); return its keys/values [0, length+T).
        The length moves on after the last layer (every layer of a forward writes the same slots)."""
        if self.k is None:
            self.allocate_like(key_states, value_states)
        k, v = self.k[layer_idx], self.v[layer_idx]
        if key_states.shape[:2] + key_states.shape[3:] != k.shape[:2] + k.shape[3:] \
                or value_states.shape[-1] != v.shape[-1]:
            raise ValueError(f"keys of shape {tuple(key_states.shape)} do not fit a cache allocated for "
                             f"{tuple(k.shape)} (batch, kv heads, slots, head dim)")
        start, end = self.slots_for(key_states.shape[-2])
        k[:, :, start:end] = key_states
        v[:, :, start:end] = value_states
        if layer_idx == self.num_layers - 1:
            self.length = end
        return k[:, :, :end], v[:, :, :end]

    def slots_for(self, tokens: int) -> tuple[int, int]:
        """The slots [start, end) that `tokens` new rows take; an error past max_len."""
        start, end = self.length, self.length + tokens
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} tokens > capacity {self.max_len}")
        return start, end

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_len

    def keep(self, start: int, accepted_slots: torch.Tensor) -> None:
        """Keep tree rows `accepted_slots` (absolute slots, in path order) at slots start, start+1, ..."""
        n = len(accepted_slots)
        contiguous = bool((accepted_slots
                           == torch.arange(start, start + n, device=accepted_slots.device)).all())
        if not contiguous and self.k is not None:
            for buf in self.k + self.v:
                buf[:, :, start:start + n] = buf[:, :, accepted_slots]
        self.length = start + n

    def reopen(self, length: int, max_len: int) -> None:
        """Start another call on these buffers: their first `length` rows kept, up to `max_len` tokens (at
        most `storage_len`) (hydra.model.prompt_cache)."""
        if not 0 <= length <= max_len <= self.storage_len:
            raise ValueError(f"cannot reopen a cache of {self.storage_len} slots with {length} rows kept for "
                             f"{max_len} tokens")
        self.length, self.max_len = length, max_len

    def copy_rows(self, source: TreeKVCache, length: int) -> None:
        """Take over the first `length` rows of `source` (a cache of the same model, now too small)."""
        for dst, src in zip(self.k + self.v, source.k + source.v, strict=True):
            dst[:, :, :length] = src[:, :, :length]
        self.length = length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows `indices`, in that order (transformers' name for it; batched
        self-distillation drops the replies that have ended)."""
        if self.k is not None:
            self.k = [buf.index_select(0, indices) for buf in self.k]
            self.v = [buf.index_select(0, indices) for buf in self.v]

    def crop(self, tokens_to_remove: int) -> None:
        """transformers' meaning: remove `-tokens_to_remove` tokens (0 removes none; > 0 is an error)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of tokens to remove, as with "
                             "transformers' caches")
        self.length = max(0, self.length + tokens_to_remove)
