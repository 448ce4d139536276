r"""Split a ShareGPT file into train/val JSON Lines files.

Usage:
    python -m hydra.data.partition_train_test --input data/self_distill.jsonl --output-dir data/split
    python -m hydra.data.partition_train_test --input ShareGPT_V4.3_unfiltered_cleaned_split.json \
        --output-dir data/sharegpt --test-size 0.05 --seed 42
    python -m hydra.data.partition_train_test --input data/self_distill_smollm2.jsonl.gz \
        --extra-train data/self_distill_smollm2_more.jsonl.gz --output-dir runs/long/split
Writes D/train.jsonl and D/val.jsonl holding only the valid records (see hydra.data.sharegpt.load_sharegpt),
split 95/5 with seed 42 like the original Hydra, which used datasets' train_test_split: the same index
choice is reproduced here (numpy default_rng(seed).permutation; the first ceil(n * test_size) indices are the
validation set).
--extra-train files go to training only, after the split of --input: more data for heads already trained on
--input keeps their validation set unseen (splitting the concatenation would move some of their training
conversations into validation). An extra conversation with the id of a validation conversation (another
reply to the same prompt, e.g. sampled self-distillation of the same prompt file) is left out, counted in the
summary line: its prompt would otherwise be trained on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hydra.data.sharegpt import load_sharegpt


def split_records(records: Sequence[Any], test_size: float = 0.05,
                  seed: int = 42) -> tuple[list[Any], list[Any]]:
    """(train, val) like `datasets.Dataset.train_test_split(test_size, seed=seed)`.

    test_size: a fraction in (0, 1), or an integer number of validation records.
    """
    n = len(records)
    if isinstance(test_size, float) and 0.0 < test_size < 1.0:
        n_test = math.ceil(test_size * n)
    elif float(test_size).is_integer() and 0 <= int(test_size) <= n:
        n_test = int(test_size)
    else:
        raise ValueError(f"test_size must be a fraction in (0, 1) or a count in [0, {n}], got {test_size}")
    if n_test >= n:  # e.g. a single conversation: the validation share (rounded up) takes it
        raise ValueError(f"{n} conversation{'s' if n != 1 else ''} cannot be split into training and "
                         f"validation sets ({n_test} would go to validation, none to training): give at "
                         f"least {n_test + 1}, or a folder with train.jsonl and val.jsonl")
    permutation = np.random.default_rng(seed).permutation(n)
    val = [records[i] for i in permutation[:n_test]]
    train = [records[i] for i in permutation[n_test:]]
    return train, val


def write_jsonl(records: Sequence[Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")  # never leave a half-written split behind
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=os.path.expanduser,
                        required=True, help="ShareGPT .json (list) or .jsonl file")
    parser.add_argument("--output-dir", type=os.path.expanduser,
                        required=True, help="folder for train.jsonl and val.jsonl")
    parser.add_argument("--test-size", type=float, default=0.05,
                        help="validation fraction in (0, 1), or a record count >= 1 (default 0.05)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--extra-train", type=os.path.expanduser, nargs="*", default=[],
                        help="ShareGPT files added to the training side only, after the split of --input")
    args = parser.parse_args(argv)

    try:
        records, _ = load_sharegpt(args.input)
        test_size = int(args.test_size) if args.test_size >= 1 else args.test_size
        train, val = split_records(records, test_size, args.seed)
        val_ids = {r.get("id") for r in val} - {None}
        left_out = 0
        for extra in args.extra_train:
            for record in load_sharegpt(extra)[0]:
                if record.get("id") in val_ids:
                    left_out += 1
                else:
                    train.append(record)
    except (OSError, ValueError) as e:
        print(f"[hydra] error: {e}", file=sys.stderr)
        return 1
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(val, out / "val.jsonl")
    note = (f" ({left_out} extra-train conversations left out: replies to validation prompts)"
            if left_out else "")
    print(f"[hydra.data] wrote {len(train)} train and {len(val)} val conversations to {out}{note}",
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
