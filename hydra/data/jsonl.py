"""JSON Lines: strict reading that names the file and line of a bad record, and the one rule for resuming from
a file that a run appends to (answer files, self-distilled data, judgments)."""

from __future__ import annotations

import gzip
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line of a plain or gzip-compressed file.

    Raises FileNotFoundError for a missing file and ValueError naming `file:line` for a line that is not JSON.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    with path.open("rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    with (gzip.open(path, "rb") if gzipped else path.open("rb")) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}:{line_no}: not a JSON line ({e})") from None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every record of a JSON Lines file; a line that is not a JSON object is a ValueError naming
    file:line."""
    records = []
    for line_no, record in iter_jsonl(path):
        if not isinstance(record, dict):
            raise ValueError(f"{Path(path).expanduser()}:{line_no}: expected a JSON object, "
                             f"got {type(record).__name__}")
        records.append(record)
    return records


def read_resumable(path: str | os.PathLike) -> list[dict]:
    """The records already in an output file that a run appends to one line at a time, for resuming.

    A last line without its newline was cut off by a kill: it is removed from the file (its record is
    regenerated). Other unreadable lines are reported on stderr and skipped. A missing file has no records.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        return []
    data = path.read_bytes()
    records, pos, line_no = [], 0, 0
    while True:
        newline = data.find(b"\n", pos)
        if newline < 0:
            break
        line_no += 1
        line = data[pos:newline]
        pos = newline + 1
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            print(f"[hydra] {path}:{line_no}: ignoring an unreadable line", file=sys.stderr, flush=True)
    if data[pos:].strip():
        print(f"[hydra] {path}: dropping a truncated last line ({len(data) - pos} bytes)", file=sys.stderr,
              flush=True)
        os.truncate(path, pos)
    return records
