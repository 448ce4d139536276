r"""Speed report: tokens/s, mean accepted length tau and speedup per MT-Bench category, from answer files.

Usage:
    python llm_judge/show_speed.py --baseline llm_judge/data/mt_bench/model_answer/baseline-default.jsonl \
        --hydra llm_judge/data/mt_bench/model_answer/hydra-default.jsonl [MORE_HYDRA_FILES ...] \
        [--plot assets/speed.png] [--check-equal]

Per category (joined with the question file) and overall, over the questions present in every file:
    tokens/s = sum(new_tokens) / sum(wall_time)       (wall time includes prefill)
    tau      = mean accepted length: tokens decided per verification forward, bonus token included, the
               prefill forward (always the first step, deciding one token) left out; AR = 1. It counts the
               stop token and tokens past --max-new-token that the last step decided, so it measures the
               drafts, not the cap; files without accept_lengths fall back to sum(new_tokens) / sum(steps).
    speedup  = tokens/s / the baseline's tokens/s in the same category
Prints a markdown table. --plot writes a bar chart of the speedups (needs matplotlib: pip install matplotlib).
--check-equal counts the questions whose every turn is identical to the baseline's: with greedy decoding
speculative decoding should change nothing (small differences can come from low-precision arithmetic, where
a tree forward and a one-token forward round differently).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

from answer_common import DEFAULT_QUESTION_FILE, ERROR_ANSWER, is_error_record, load_questions

from hydra.data.jsonl import read_jsonl

OVERALL = "overall"


def load_answer_file(path: str | Path) -> dict:
    """{question_id: record}. Records with a turn that could not be generated ($ERROR$) are flagged on stderr
    and left out: they carry no timing, and a rerun of the answer script answers them again."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"answer file {path} not found")
    records, errors = {}, []
    for rec in read_jsonl(path):
        choice = rec["choices"][0]
        for key in ("new_tokens", "wall_time", "steps"):
            if key not in choice:
                raise SystemExit(f"{path}: question {rec['question_id']} has no '{key}' (not written by "
                                 "gen_model_answer_*.py of this repository?)")
        if is_error_record(rec):
            errors.append(rec["question_id"])
        else:
            records[rec["question_id"]] = rec
    if errors:
        print(f"show_speed: warning: {path}: {len(errors)} error records ({ERROR_ANSWER}) left out, "
              f"questions {errors[:10]}{' ...' if len(errors) > 10 else ''}; rerun gen_model_answer_*.py to "
              "answer them", file=sys.stderr)
    return records


def label_of(path: str | Path, records: dict) -> str:
    ids = {r.get("model_id") for r in records.values()}
    return ids.pop() if len(ids) == 1 and None not in ids else Path(path).stem


def aggregate(records: dict, qids: list, categories: dict) -> dict[str, dict[str, float]]:
    """{category or 'overall': {"tokens", "time", "steps", "questions"}} summed over both turns."""
    sums: dict[str, dict[str, float]] = defaultdict(lambda: {"tokens": 0, "decided": 0, "time": 0.0,
                                                              "steps": 0, "questions": 0})
    for qid in qids:
        choice = records[qid]["choices"][0]
        for key in (categories.get(qid, "?"), OVERALL):
            s = sums[key]
            s["tokens"] += sum(choice["new_tokens"])
            s["time"] += sum(choice["wall_time"])
            accept = choice.get("accept_lengths")
            if accept:  # drop each turn's prefill step (see the module docstring)
                s["decided"] += sum(sum(a[1:]) for a in accept)
                s["steps"] += sum(len(a) - 1 for a in accept)
            else:
                s["decided"] += sum(choice["new_tokens"])
                s["steps"] += sum(choice["steps"])
            s["questions"] += 1
    return sums


def rates(s: dict) -> tuple[float, float]:
    tps = s["tokens"] / s["time"] if s["time"] > 0 else float("nan")
    tau = s["decided"] / s["steps"] if s["steps"] > 0 else float("nan")
    return tps, tau


def speed_table(baseline: dict, hydras: dict[str, dict], categories: dict) -> tuple[str, dict]:
    """(markdown, {label: {category: speedup}}) over the question ids common to all files."""
    common = set(baseline)
    for recs in hydras.values():
        common &= set(recs)
    qids = sorted(common, key=lambda q: (str(type(q)), q))
    if not qids:
        raise SystemExit("the answer files have no question in common")
    base = aggregate(baseline, qids, categories)
    agg = {label: aggregate(recs, qids, categories) for label, recs in hydras.items()}
    cats = sorted(k for k in base if k != OVERALL) + [OVERALL]
    header = "| category | questions | baseline tok/s |"
    rule = "|---|---:|---:|"
    for label in hydras:
        header += f" {label} tok/s | {label} tau | {label} speedup |"
        rule += "---:|---:|---:|"
    lines, speedups = [header, rule], {label: {} for label in hydras}
    for cat in cats:
        b_tps, _ = rates(base[cat])
        name = f"**{cat}**" if cat == OVERALL else cat
        row = f"| {name} | {int(base[cat]['questions'])} | {b_tps:.1f} |"
        for label in hydras:
            tps, tau = rates(agg[label][cat])
            speedups[label][cat] = tps / b_tps
            row += f" {tps:.1f} | {tau:.2f} | {tps / b_tps:.2f}x |"
        lines.append(row)
    return "\n".join(lines), speedups


def check_equal(baseline: dict, records: dict) -> tuple[int, int, list]:
    """(identical questions, compared questions, first differing question ids)."""
    common = sorted(set(baseline) & set(records), key=lambda q: (str(type(q)), q))
    differ = [q for q in common if baseline[q]["choices"][0]["turns"] != records[q]["choices"][0]["turns"]]
    return len(common) - len(differ), len(common), differ[:10]


def plot(speedups: dict[str, dict[str, float]], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("show_speed: --plot needs matplotlib (pip install matplotlib); no plot written",
              file=sys.stderr)
        return False
    labels = list(speedups)
    cats = list(next(iter(speedups.values())))
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(1.1 * len(cats) + 2, 4))
    for i, label in enumerate(labels):
        xs = [c + (i - (len(labels) - 1) / 2) * width for c in range(len(cats))]
        bars = ax.bar(xs, [speedups[label][c] for c in cats], width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right")
    ax.set_ylabel("speedup vs. autoregressive")
    ax.set_title(title)
    top = max(v for per_cat in speedups.values() for v in per_cat.values())
    ax.set_ylim(0, top * 1.25)  # headroom so the legend row never covers a bar label
    ax.legend(fontsize=8, ncol=len(labels), loc="upper center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Tokens/s, tau and speedup per MT-Bench category.")
    p.add_argument("--baseline", type=os.path.expanduser,
                   required=True, help="answer file of gen_model_answer_baseline.py")
    p.add_argument("--hydra", type=os.path.expanduser,
                   nargs="+", required=True, help="answer file(s) of gen_model_answer_hydra.py")
    p.add_argument("--question-file", type=os.path.expanduser,
                   default=None, help="default: llm_judge/data/mt_bench/question.jsonl")
    p.add_argument("--plot", type=os.path.expanduser,
                   default=None, help="write a bar chart PNG here, e.g. assets/speedup.png")
    p.add_argument("--title", default="Hydra speedup on MT-Bench")
    p.add_argument("--check-equal", action="store_true",
                   help="count questions whose turns are identical to the baseline's (greedy losslessness)")
    args = p.parse_args(argv)

    categories = {q["question_id"]: q.get("category", "?")
                  for q in load_questions(args.question_file or DEFAULT_QUESTION_FILE)}
    baseline = load_answer_file(args.baseline)
    hydras = {}
    for path in args.hydra:
        recs = load_answer_file(path)
        label = label_of(path, recs)
        hydras[label if label not in hydras else Path(path).stem] = recs
    table, speedups = speed_table(baseline, hydras, categories)
    decoding = next(iter(baseline.values())).get("decoding", {})
    where = ", ".join(f"{k} {decoding[k]}" for k in ("device", "dtype", "max_new_token", "temperature")
                      if k in decoding)
    print(f"baseline: {label_of(args.baseline, baseline)}" + (f" ({where})" if where else "") + "\n")
    print(table)
    if args.check_equal:
        print()
        for label, recs in hydras.items():
            same, total, differ = check_equal(baseline, recs)
            print(f"{label}: {same}/{total} questions identical to the baseline"
                  + (f" (first differing: {differ})" if differ else ""))
    if args.plot and plot(speedups, Path(args.plot), args.title):
        print(f"\nwrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
