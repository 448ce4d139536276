"""Feature cache: the frozen base model's hidden states on disk, computed once per packed row and model and
reused by every epoch and every later run (`--cache_hidden_states True`).

The base model is frozen, so the hidden states of a packed row never change. They are all the training step
needs from the base: the heads read them, and the teacher's logits are the base output layer applied to the
final hidden state (so no teacher log-probs are stored). By default rows are written the first time a step
needs them (`--fill_hidden_cache lazy`), so training starts at once and epochs 2+ skip the base forward;
`first` fills every missing row before training, `only` fills and exits (the feature-cache stage of
scripts/train_default_heads.sh). A killed fill resumes with the rows not yet flagged. Disk: tokens x
hidden_size x 2 bytes in bf16 (1,152 bytes per token for SmolLM2-135M), once more per entry of
feature_layers, and once more when hidden_state_offset > 0 since the teacher still needs the final hidden
state (`cache_arrays`).

One folder per base model, dtype, offset and feature layers (`cache_key_parts`; default root
`~/.cache/hydra/hidden_cache`, see `hydra.model.base_model.cache_dir`). Inside, rows are found by content:
`rows.tsv` lists every row ever allocated (a digest of its token and position ids, its offset and length)
and `hidden.bin` holds them end to end, so a run on more data (chats appended to a training file pack into
the same rows, plus new ones) reads every row it shares with earlier runs and only adds the new ones.
`filled.bin` flags the rows written, one byte per allocated row. A run allocates its new rows under a file
lock before training (the main process; the others wait, then read the table). Every process
memory-maps the same files; each row is written by the one process that first computes it and flagged after
its data, so a kill never leaves a row flagged but unwritten (the data reach the page cache before the flag).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

_NP = {torch.bfloat16: np.uint16, torch.float16: np.uint16, torch.float32: np.float32}


def row_digest(row: dict) -> str:
    """A packed row's identity: its tokens and where its conversations start (position ids restart there)."""
    h = hashlib.sha256(np.asarray(row["input_ids"], dtype=np.int32).tobytes())
    h.update(np.asarray(row["position_ids"], dtype=np.int32).tobytes())
    return h.hexdigest()[:32]


def _grow(path: Path, nbytes: int) -> None:
    """Make a file at least nbytes long (sparse), never shorter."""
    with open(path, "ab") as f:
        if f.tell() < nbytes:
            f.truncate(nbytes)


class HiddenCache:
    def __init__(self, root: str | Path, key_parts: dict, rows: list[dict], hidden_size: int,
                 arrays: int, dtype: torch.dtype, create: bool):
        if dtype not in _NP:
            raise ValueError(f"cannot cache hidden states of dtype {dtype}")
        spec = {**key_parts, "d": hidden_size, "arrays": arrays, "dtype": str(dtype), "layout": "rows"}
        key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.folder = Path(root) / key
        self.dtype, self.arrays, self.d = dtype, arrays, hidden_size
        self.lengths = [len(r["input_ids"]) for r in rows]
        self._digests = [row_digest(r) for r in rows]
        self._token_bytes = arrays * hidden_size * np.dtype(_NP[dtype]).itemsize
        self.nbytes = sum(self.lengths) * self._token_bytes
        self._table_path = self.folder / "rows.tsv"
        self._data_path, self._flag_path = self.folder / "hidden.bin", self.folder / "filled.bin"
        if create:
            self._allocate()
        self._data = self._flags = None

    def _read_table(self) -> tuple[list[str], dict[str, tuple[int, int, int]]]:
        """The table's lines, and digest -> (slot, offset in tokens, length)."""
        lines = self._table_path.read_text().splitlines() if self._table_path.is_file() else []
        table = {}
        for slot, line in enumerate(lines):
            digest, offset, length = line.split("\t")
            table[digest] = (slot, int(offset), int(length))
        return lines, table

    def _allocate(self) -> None:
        """Append this run's rows that the folder does not hold yet: files first, then the table (replaced
        whole), so a kill in between leaves only unused space."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another run on the same folder may be allocating too
            lines, table = self._read_table()
            known = len(lines)
            end = max((o + n for _, o, n in table.values()), default=0)
            for digest, n in zip(self._digests, self.lengths, strict=True):
                if digest not in table:
                    table[digest] = (len(lines), end, n)
                    lines.append(f"{digest}\t{end}\t{n}")
                    end += n
            if known and len(lines) == known:
                return  # every row of this run is allocated already
            _grow(self._data_path, max(end, 1) * self._token_bytes)
            _grow(self._flag_path, max(len(lines), 1))
            tmp = self._table_path.with_suffix(".tsv.partial")
            tmp.write_text("".join(line + "\n" for line in lines))
            os.replace(tmp, self._table_path)

    def open(self) -> HiddenCache:
        _, table = self._read_table()
        missing = sum(dg not in table for dg in self._digests)
        if missing:
            raise RuntimeError(f"{self.folder} lacks {missing} of this run's rows (the main process "
                               f"allocates them before the others open the cache)")
        self._slots = np.array([table[dg][0] for dg in self._digests], dtype=np.int64)
        self._offsets = np.array([table[dg][1] for dg in self._digests], dtype=np.int64)
        self._data = np.memmap(self._data_path, dtype=_NP[self.dtype], mode="r+").reshape(
            -1, self.arrays, self.d)
        self._flags = np.memmap(self._flag_path, dtype=np.uint8, mode="r+")
        return self

    def filled(self) -> int:
        """How many of this run's rows are written."""
        return int(self._flags[self._slots].astype(bool).sum())

    def missing(self, rows: list[int]) -> list[int]:
        return [r for r in rows if not self._flags[self._slots[r]]]

    def get(self, row: int) -> torch.Tensor | None:
        """(length, arrays, d) in the cached dtype, or None if the row was never written."""
        if not self._flags[self._slots[row]]:
            return None
        a = self._offsets[row]
        t = torch.from_numpy(np.array(self._data[a:a + self.lengths[row]]))
        return t.view(self.dtype) if self.dtype != torch.float32 else t

    def put(self, row: int, hidden: torch.Tensor) -> None:
        """hidden: (length, arrays, d)."""
        a = self._offsets[row]
        t = hidden.detach().to("cpu", self.dtype).contiguous()
        if self.dtype != torch.float32:
            t = t.view(torch.int16)
        self._data[a:a + self.lengths[row]] = t.numpy().view(_NP[self.dtype])
        self._flags[self._slots[row]] = 1


def weights_fingerprint(model: torch.nn.Module, samples: int = 64) -> str:
    """A digest of evenly spaced entries of every weight: a re-converted or fine-tuned model at the same name
    gets a new cache instead of the old model's hidden states. Exact bytes, so it does not depend on threads
    or summation order."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        k = min(samples, flat.numel())
        # integer spacing: a float32 linspace rounds past the last index of a 28M-entry embedding
        idx = torch.arange(k, device=flat.device) * (flat.numel() - 1) // max(k - 1, 1)
        h.update(name.encode())
        h.update(flat[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_arrays(config) -> int:
    """d-wide arrays per token: what the heads read (1 + len(feature_layers)), plus the final hidden state
    when the heads read an earlier one instead (hidden_state_offset > 0)."""
    return 1 + len(config.feature_layers) + (config.hidden_state_offset > 0)


def cache_key_parts(model_name: str, config, weights: str = "") -> dict:
    """What the cached hidden states depend on besides the rows: the folder's key."""
    parts = {"model": model_name, "weights": weights, "offset": config.hidden_state_offset}
    if config.feature_layers:
        parts["layers"] = list(config.feature_layers)
    return parts


def cached_features(model, cache: HiddenCache, row_ids: list[int], batch: dict[str, torch.Tensor]):
    """model.base_features through the cache: the base model runs only if one of the rows is missing."""
    cached = [cache.get(r) for r in row_ids]
    S = batch["input_ids"].shape[1]
    # Array layout per token: what the heads read in d-wide parts, then the final hidden state if that is
    # not already its first part (hidden_state_offset > 0).
    separate_final = model.config.hidden_state_offset > 0
    if any(c is None for c in cached):
        feats, final = model.base_features(batch["input_ids"], batch["position_ids"])
        parts = [feats.unflatten(-1, (-1, cache.d))] + ([final[:, :, None]] if separate_final else [])
        arrays = torch.cat(parts, dim=2)  # (B, S, arrays, d)
        if arrays.shape[2] != cache.arrays:
            raise ValueError(f"the feature cache holds {cache.arrays} arrays per token, the heads read "
                             f"{arrays.shape[2]}")
        for j, r in enumerate(row_ids):
            if cached[j] is None:
                cache.put(r, arrays[j, :cache.lengths[r]])
        return feats, final
    out = torch.zeros(len(row_ids), S, cache.arrays, cache.d, dtype=cached[0].dtype)
    for j, c in enumerate(cached):
        out[j, :c.shape[0]] = c  # padding positions: zeros (never scored, never attended to by real tokens)
    out = out.to(batch["input_ids"].device, non_blocking=True)
    feats = out[:, :, :cache.arrays - separate_final].flatten(2)
    return feats, out[:, :, -1] if separate_final else out[:, :, 0]


def fill(model, cache: HiddenCache, row_ids: list[int], make_batch: Callable[[list[int]], dict],
         batch_size: int, info: Callable[[str], None], every_s: float = 60.0) -> None:
    """Compute and store every row of `row_ids` not cached yet, printing progress and the time left."""
    todo = cache.missing(row_ids)
    total = sum(cache.lengths[r] for r in todo)
    if not todo:
        return
    info(f"filling the hidden-state cache: {len(todo)} rows, {total} tokens")
    done, t0, last = 0, time.time(), time.time()
    for j in range(0, len(todo), batch_size):
        ids = todo[j:j + batch_size]
        cached_features(model, cache, ids, make_batch(ids))
        done += sum(cache.lengths[r] for r in ids)
        now = time.time()
        if now - last >= every_s or j + batch_size >= len(todo):
            rate = done / max(now - t0, 1e-9)
            info(f"hidden-state cache: {done}/{total} tokens, {rate:.0f} tok/s, "
                 f"~{(total - done) / max(rate, 1e-9) / 60:.1f} min left")
            last = now
