"""On-disk cache of the frozen base model's hidden states for multi-epoch runs (`--cache_hidden_states`).

The base model is frozen, so its hidden states for a packed row never change: the first time a row is seen
they are written to `<output_dir>/hidden_cache/<key>/hidden.bin` (one flat memory-mapped array, rows at fixed
offsets), later epochs and evaluations read them instead of running the base model. Measured on a 2-core CPU
with SmolLM2-135M in bf16 (4 hydra-mlp heads, 512-token rows) a step ran at ~350 tok/s recomputing the base
model and ~550-630 tok/s reading its hidden states (1.6x with the teacher loss, 1.75x with the data loss).
Cost: tokens x hidden_size x 2 bytes in bf16 (1.1 KiB per token for SmolLM2-135M, doubled when
hidden_state_offset > 0 since the teacher still needs the final hidden state). Not worth it on a GPU, where
the base forward is cheap next to reading the cache.

Every process memory-maps the same files; each row is written by the one process that first computes it and
flagged in `filled.bin` after its data, so a kill never leaves a row flagged but unwritten (the data go to the
page cache before the flag). Rows at the same offsets mean the cache is only valid for the same rows, model,
dtype and offset: the folder name is a hash of all of them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

_NP = {torch.bfloat16: np.uint16, torch.float16: np.uint16, torch.float32: np.float32}


class HiddenCache:
    def __init__(self, root: str | Path, key_parts: dict, row_lengths: list[int], hidden_size: int,
                 arrays: int, dtype: torch.dtype, create: bool):
        if dtype not in _NP:
            raise ValueError(f"cannot cache hidden states of dtype {dtype}")
        spec = {**key_parts, "lengths": row_lengths, "d": hidden_size, "arrays": arrays, "dtype": str(dtype)}
        key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.folder = Path(root) / key
        self.dtype, self.arrays, self.d = dtype, arrays, hidden_size
        self.lengths = row_lengths
        self.offsets = np.concatenate([[0], np.cumsum(row_lengths)]).astype(np.int64)
        total = int(self.offsets[-1])
        self.nbytes = total * arrays * hidden_size * np.dtype(_NP[dtype]).itemsize
        data_path, flag_path = self.folder / "hidden.bin", self.folder / "filled.bin"
        if create and not (data_path.is_file() and flag_path.is_file()):
            self.folder.mkdir(parents=True, exist_ok=True)
            shape = (max(total, 1), arrays, hidden_size)
            np.memmap(data_path, dtype=_NP[dtype], mode="w+", shape=shape).flush()
            np.memmap(flag_path, dtype=np.uint8, mode="w+", shape=(max(len(row_lengths), 1),)).flush()
        self._data_path, self._flag_path = data_path, flag_path
        self._data = self._flags = None

    def open(self) -> "HiddenCache":
        total = max(int(self.offsets[-1]), 1)
        self._data = np.memmap(self._data_path, dtype=_NP[self.dtype], mode="r+",
                               shape=(total, self.arrays, self.d))
        self._flags = np.memmap(self._flag_path, dtype=np.uint8, mode="r+",
                                shape=(max(len(self.lengths), 1),))
        return self

    def filled(self) -> int:
        return int(self._flags.sum())

    def get(self, row: int) -> torch.Tensor | None:
        """(length, arrays, d) in the cached dtype, or None if the row was never written."""
        if not self._flags[row]:
            return None
        a, b = self.offsets[row], self.offsets[row + 1]
        t = torch.from_numpy(np.array(self._data[a:b]))
        return t.view(self.dtype) if self.dtype != torch.float32 else t

    def put(self, row: int, hidden: torch.Tensor) -> None:
        """hidden: (length, arrays, d)."""
        a, b = self.offsets[row], self.offsets[row + 1]
        t = hidden.detach().to("cpu", self.dtype).contiguous()
        if self.dtype != torch.float32:
            t = t.view(torch.int16)
        self._data[a:b] = t.numpy().view(_NP[self.dtype])
        self._flags[row] = 1
