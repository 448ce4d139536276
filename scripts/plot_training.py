r"""Validation top-1 of each head against training tokens, from train.py's log.jsonl files.

    python scripts/plot_training.py assets/training_logs/hydrapp.jsonl \
        assets/training_logs/hydrapp_cpu_long.jsonl --output assets/hydrapp_top1.png

Logs given after the first are continued runs (train.py --init_heads): each starts where the one before it
ended on the token axis. A log whose first record is at step N > 0 instead continues the log before it from
that log's step N (train.py --start_step, which counts the tokens of the first N steps as seen); the earlier
log's records after step N are dropped. Where a log holds a step twice (a run resumed before train.py
truncated its log on resuming), the later record counts. An evaluation's token count is the `tokens_seen` of
the training record of the same step (logs written before train.py put it in evaluation records), else
interpolated between the training records around it. A dotted line marks where each continued run starts;
its step-0 evaluation re-scores the heads it started from, so a jump there is a change of metric or validation
rows, not learning (assets/training_logs/README.md says which metric each run used). A log that continues
another from step N without evaluating at N (a cool-down branch, train.py --decay_from, or the rest of a run
resumed from its own checkpoint) is drawn from the other's last point at or before N. Prints the table it
plots.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np


class Placed(NamedTuple):
    """One log on the shared token axis."""

    name: str
    x: np.ndarray  # tokens at each evaluation
    y: np.ndarray  # top-1 per evaluation x head
    marker: float  # where its dotted line goes: where it resumed
    offset: float  # tokens before its own count starts
    lead: tuple[float, np.ndarray] | None  # the point its line starts from, if it does not evaluate there


def read_log(path: Path) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of one log.jsonl."""
    train, evals = [], []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
            (evals if "eval_head0_top1" in record else train).append(record)
    if not evals:
        raise ValueError(f"{path}: no evaluation records (eval_head0_top1)")
    return _last_per_step(train), _last_per_step(evals)


def _last_per_step(records: list[dict]) -> list[dict]:
    """One record per step, the latest written, in step order."""
    return sorted({r["step"]: r for r in records}.values(), key=lambda r: r["step"])


def first_step(train: list[dict], evals: list[dict]) -> int:
    """The step a log starts from: 0, or N for a run started with --start_step N. A run with --init_heads
    evaluates the heads it starts from first; train.py always logs the first step it trains."""
    if train and train[0]["step"] <= evals[0]["step"]:
        return train[0]["step"] - 1
    return evals[0]["step"]


def until(train: list[dict], evals: list[dict], step: int) -> tuple[list[dict], list[dict]]:
    """A log's records up to `step`."""
    return [r for r in train if r["step"] <= step], [r for r in evals if r["step"] <= step]


def head_numbers(evals: list[dict]) -> list[int]:
    """The heads an evaluation record scores (eval_head{h}_top1)."""
    return sorted(int(k[len("eval_head"):-len("_top1")]) for k in evals[0]
                  if k.startswith("eval_head") and k.endswith("_top1") and "teacher" not in k)


def curve(train: list[dict], evals: list[dict], heads: list[int]) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens at each evaluation, top-1 per evaluation x head, tokens at the end of the run). A log cut
    before its first evaluation (continued from an earlier step) has no points but still spans its tokens."""
    steps = [r["step"] for r in train if "tokens_seen" in r]
    seen = [r["tokens_seen"] for r in train if "tokens_seen" in r]
    x = np.array([r["tokens_seen"] if "tokens_seen" in r else np.interp(r["step"], [0] + steps, [0] + seen)
                  for r in evals], dtype=float)
    y = np.array([[r[f"eval_head{h}_top1"] for h in heads] for r in evals]).reshape(len(evals), len(heads))
    return x, y, int(max(seen + [0] + list(x)))


def load_logs(paths: list[str]) -> tuple[list[tuple[list[dict], list[dict]]], list[int], list[int]]:
    """(each log's records, cut where the next log continues it; the step each starts from; the heads)."""
    logs = [read_log(Path(p)) for p in paths]
    starts = [first_step(*log) for log in logs]
    heads = head_numbers(logs[0][1])  # before the cut, which may leave a log no evaluations
    for k in range(1, len(logs)):
        if starts[k] > 0:  # continues the log before it from that step
            logs[k - 1] = until(*logs[k - 1], starts[k])
    return logs, starts, heads


def place(paths: list[str], logs: list[tuple[list[dict], list[dict]]], starts: list[int],
          heads: list[int]) -> list[Placed]:
    """Each log on the one token axis."""
    offset, placed = 0, []
    for k, (path, log) in enumerate(zip(paths, logs, strict=True)):
        x, y, end = curve(*log, heads)
        marker = offset
        lead = None
        if k and starts[k] > 0:  # on the axis of the run it continues, marked where it resumed
            offset = placed[-1].offset
            resumed = [r["tokens_seen"] for r in logs[k - 1][0]
                       if r["step"] == starts[k] and "tokens_seen" in r]
            marker = offset + (resumed[0] if resumed else x[0] if len(x) else 0)
            prev = placed[-1]
            evaluates_at_start = bool(log[1]) and log[1][0]["step"] == starts[k]
            if len(prev.x) and not evaluates_at_start:  # a cool-down branch, or the run resumed in place
                lead = (prev.x[-1], prev.y[-1])  # its last point at or before the step this one goes on from
        placed.append(Placed(Path(path).name, x + offset, y, marker, offset, lead))
        offset += end
    return placed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", type=os.path.expanduser, help="log.jsonl files, first run first")
    ap.add_argument("--output", type=os.path.expanduser, default=None, help="PNG to write (needs matplotlib)")
    args = ap.parse_args(argv)
    try:
        logs, starts, heads = load_logs(args.logs)
    except (OSError, ValueError) as e:
        print(f"[hydra] error: {e}", file=sys.stderr)
        return 1

    placed = place(args.logs, logs, starts, heads)
    print("| run | tokens (M) | " + " | ".join(f"head {h + 1}" for h in heads) + " |")
    for p in placed:
        for xi, yi in zip(p.x, p.y, strict=True):
            print(f"| {p.name} | {xi / 1e6:.2f} | " + " | ".join(f"{v:.3f}" for v in yi) + " |")
    if args.output:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for col, h in enumerate(heads):
            color = f"C{col}"
            for k, p in enumerate(placed):
                x, y = p.x, p.y
                if p.lead is not None:
                    x, y = np.concatenate([[p.lead[0]], x]), np.concatenate([p.lead[1][None], y])
                ax.plot(x / 1e6, y[:, col], "o-" if k == 0 else "s-", color=color, ms=3,
                        label=f"head {h + 1}" if k == 0 else None)
        for p in placed[1:]:
            ax.axvline(p.marker / 1e6, color="grey", ls=":", lw=1)
            # vertical, along its line: the labels of runs a few million tokens apart would overlap
            ax.text(p.marker / 1e6, ax.get_ylim()[0], f" {p.name}", va="bottom", ha="right", rotation=90,
                    fontsize=7, color="grey")
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel("validation top-1")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        tmp = Path(args.output).with_suffix(".partial.png")
        fig.savefig(tmp, dpi=120)
        tmp.replace(args.output)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
