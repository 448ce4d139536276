"""Training data for train.py: ShareGPT file/folder -> packed token rows, cached, and a resumable batch order.

`--data_path` is either one ShareGPT .json/.jsonl file (split 95/5 with seed 42 here, as
hydra.data.partition_train_test does) or a folder holding train.jsonl and val.jsonl (or the original's
train.json / val.json). Tokenized, packed rows are cached in `<output_dir>/data_cache/` (safetensors), keyed
by the data files, the tokenizer and model_max_length, so restarts and other ranks skip the tokenization.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hydra.data.partition_train_test import split_records
from hydra.data.sharegpt import load_sharegpt, pack, tokenize_records
from hydra.model.base_model import partial_path

Row = dict[str, list[int]]


def data_files(data_path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(train file, val file or None when the single file must be split)."""
    path = Path(data_path)
    if path.is_dir():
        for train_name, val_name in (("train.jsonl", "val.jsonl"), ("train.json", "val.json")):
            if (path / train_name).is_file():
                if not (path / val_name).is_file():
                    raise FileNotFoundError(f"{path} has {train_name} but no {val_name}")
                return path / train_name, path / val_name
        raise FileNotFoundError(f"{path} is a folder without train.jsonl/val.jsonl "
                                f"(make them with python -m hydra.data.partition_train_test)")
    if not path.is_file():
        raise FileNotFoundError(f"--data_path {path} does not exist")
    return path, None


def _fingerprint(files: list[Path], tokenizer, max_length: int, template: str | None, test_size: float,
                 seed: int, train_on_inputs: bool) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    spec = {
        "tokenizer": getattr(tokenizer, "name_or_path", ""), "vocab": len(tokenizer),
        "template": template, "chat_template": getattr(tokenizer, "chat_template", None) or "",
        "max_length": max_length, "test_size": test_size, "seed": seed,
        "version": 2,  # of the labelling rule; 2: spans stop before trailing whitespace (render_with_spans)
    }
    if train_on_inputs:  # only then: caches written before the option keep their keys
        spec["train_on_inputs"] = True
    h.update(json.dumps(spec, sort_keys=True).encode())
    return h.hexdigest()[:16]


def build_rows(data_path: str | os.PathLike, tokenizer, max_length: int, template: str | None = None,
               test_size: float = 0.05, seed: int = 42, train_on_inputs: bool = False,
               ) -> tuple[list[Row], list[Row]]:
    """Load, split (single file), tokenize with assistant-only labels and pack into rows of <= max_length.

    train_on_inputs: the training rows also label the user turns' text (sharegpt.render_and_mask); the
    validation rows never do, so validation figures compare across runs with and without it.
    """
    train_file, val_file = data_files(data_path)
    records, _ = load_sharegpt(train_file)
    if val_file is None:
        train_records, val_records = split_records(records, test_size, seed)
        if not train_records:
            raise ValueError(f"{data_path} holds {len(records)} conversation(s): a single --data_path file "
                             f"is split into train and validation ({test_size:g} of it, at least one "
                             f"conversation, goes to validation), which leaves none to train on; give it "
                             f"more conversations or a folder with train.jsonl + val.jsonl")
    else:
        train_records, (val_records, _) = records, load_sharegpt(val_file)
    train = pack(tokenize_records(train_records, tokenizer, max_length, template, train_on_inputs),
                 max_length)
    val = pack(tokenize_records(val_records, tokenizer, max_length, template), max_length)
    if not train:
        raise ValueError(f"{data_path}: no training conversation with an assistant token left")
    return train, val


def _rows_to_tensors(rows: list[Row], prefix: str) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([len(r["input_ids"]) for r in rows], dtype=torch.int64)
    cat = lambda key: torch.tensor([t for r in rows for t in r[key]], dtype=torch.int32)  # noqa: E731
    return {f"{prefix}.lengths": lengths, f"{prefix}.input_ids": cat("input_ids"),
            f"{prefix}.labels": cat("labels"), f"{prefix}.position_ids": cat("position_ids")}


def _tensors_to_rows(tensors: dict[str, torch.Tensor], prefix: str) -> list[Row]:
    lengths = tensors[f"{prefix}.lengths"].tolist()
    fields = {k: tensors[f"{prefix}.{k}"].tolist() for k in ("input_ids", "labels", "position_ids")}
    rows, start = [], 0
    for n in lengths:
        rows.append({k: v[start:start + n] for k, v in fields.items()})
        start += n
    return rows


def load_or_build_rows(data_path: str | os.PathLike, tokenizer, max_length: int,
                       cache_dir: str | os.PathLike | None, template: str | None = None,
                       is_main: bool = True, barrier=lambda: None, test_size: float = 0.05,
                       seed: int = 42, train_on_inputs: bool = False) -> tuple[list[Row], list[Row]]:
    """build_rows with a cache: the main process builds and writes it, the others wait and read it."""
    if cache_dir is None:
        return build_rows(data_path, tokenizer, max_length, template, test_size, seed, train_on_inputs)
    train_file, val_file = data_files(data_path)
    files = [train_file] + ([val_file] if val_file else [])
    key = _fingerprint(files, tokenizer, max_length, template, test_size, seed, train_on_inputs)
    cache = Path(cache_dir) / f"rows-{key}.safetensors"
    if is_main and not cache.is_file():
        train, val = build_rows(data_path, tokenizer, max_length, template, test_size, seed, train_on_inputs)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = partial_path(cache)  # also removes what killed processes left
        save_file({**_rows_to_tensors(train, "train"), **_rows_to_tensors(val, "val")}, str(tmp))
        tmp.replace(cache)
    barrier()
    tensors = load_file(str(cache))
    return _tensors_to_rows(tensors, "train"), _tensors_to_rows(tensors, "val")


class BatchOrder:
    """Which rows make up global batch number `step`: a fresh seeded permutation per epoch, no state to save.

    steps_per_epoch = len(rows) // global_batch (at least 1; a data set smaller than one global batch wraps).
    Rank r, micro-batch m of a step gets the rows [(m * world + r) * per_device, ...+ per_device) of its
    batch.
    """

    def __init__(self, num_rows: int, global_batch: int, seed: int):
        self.num_rows, self.global_batch, self.seed = num_rows, global_batch, seed
        self.steps_per_epoch = max(1, num_rows // global_batch)
        self._perm_epoch, self._perm = None, None

    def _permutation(self, epoch: int) -> list[int]:
        if self._perm_epoch != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.num_rows, generator=gen).tolist(), epoch
        return self._perm

    def global_batch_rows(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = self._permutation(epoch)
        start = k * self.global_batch
        return [perm[(start + j) % self.num_rows] for j in range(self.global_batch)]

    def epoch(self, step: int) -> float:
        return step / self.steps_per_epoch
