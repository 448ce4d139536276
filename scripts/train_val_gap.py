r"""Training against validation top-1 of each head, evaluation by evaluation, from train.py's log.jsonl files
of one run (its parts in order, e.g. a run resumed across sessions):

    python scripts/train_val_gap.py assets/training_logs/hydrapp_cpu_continued6_nodrop_part5.jsonl \
        assets/training_logs/hydrapp_cpu_continued6_nodrop_part6.jsonl

For every evaluation at step s it prints the mean training top-1 of the steps since the evaluation before
(the heads scored on the batch they are about to learn from), its standard error over those steps, and the
validation top-1 at s. Rising training top-1 beside flat validation top-1 is the heads fitting chats they
have already seen rather than learning what carries to new ones; the `epoch` column shows when a pass over
the data starts again. Later parts override earlier records of the same step (a run resumed from a
checkpoint re-logs the steps after it).
"""

from __future__ import annotations

import argparse
import bisect
import math
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plot_training import head_numbers, read_log  # noqa: E402


def gap_rows(paths: list[str]) -> tuple[list[int], list[dict]]:
    """(heads, one row per evaluation: step, epoch, steps averaged, train mean/se per head, val per head)."""
    train, evals = {}, {}
    for p in paths:
        t, e = read_log(Path(p))
        train.update({r["step"]: r for r in t})
        evals.update({r["step"]: r for r in e})
    heads = head_numbers([evals[min(evals)]])
    scored = [train[s] for s in sorted(train) if f"head{heads[0]}_top1" in train[s]]
    steps = [r["step"] for r in scored]
    rows, start = [], 0
    for step in sorted(evals):
        end = bisect.bisect_right(steps, step)  # the training steps since the evaluation before
        window, start = scored[start:end], end
        if not window:
            continue  # an evaluation before any training step (the heads a continued run starts from)
        stats = []
        for h in heads:
            v = [r[f"head{h}_top1"] for r in window]
            se = statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else math.nan
            stats.append((statistics.fmean(v), se))
        rows.append({"step": step, "epoch": window[-1].get("epoch", math.nan), "steps": len(window),
                     "train": stats, "val": [evals[step][f"eval_head{h}_top1"] for h in heads]})
    return heads, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", type=os.path.expanduser, help="log.jsonl files of one run, in order")
    args = ap.parse_args(argv)
    try:
        heads, rows = gap_rows(args.logs)
    except (OSError, ValueError, KeyError) as e:
        print(f"[hydra] error: {e}", file=sys.stderr)
        return 1
    names = [f"head {h + 1}" for h in heads]
    print("| step | epoch | steps | " + " | ".join(f"train {n}" for n in names) + " | "
          + " | ".join(f"val {n}" for n in names) + " |")
    print("|" + "---:|" * (3 + 2 * len(heads)))
    for r in rows:
        print(f"| {r['step']} | {r['epoch']:.2f} | {r['steps']} | "
              + " | ".join(f"{m:.3f} ± {se:.3f}" for m, se in r["train"]) + " | "
              + " | ".join(f"{v:.3f}" for v in r["val"]) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
