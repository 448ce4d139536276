"""MT-Bench scores from a single-answer judgment file (written by gen_judgement.py).

Usage:
    python llm_judge/show_result.py [--judge-model gpt-4 | --input-file FILE] [--model-list A B]
        [--per-category]

Prints a markdown table per model: mean score of turn 1, turn 2 and both (judgments whose rating could not be
parsed, score -1, are left out and counted), and with --per-category the mean per MT-Bench category (joined
with the question file).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

from answer_common import DEFAULT_QUESTION_FILE, load_questions
from gen_judgement import judgment_file

from hydra.data.jsonl import read_jsonl


def _mean(xs: list[float]) -> str:
    return f"{sum(xs) / len(xs):.2f}" if xs else "-"


def summarize(judgments: list[dict], models: list[str] | None = None) -> tuple[str, dict]:
    """(markdown table, {model: {"turn1", "turn2", "avg", "n", "unparsed"}})."""
    scores: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    unparsed: dict[str, int] = defaultdict(int)
    for j in judgments:
        if models and j["model"] not in models:
            continue
        if j["score"] == -1:
            unparsed[j["model"]] += 1
        else:
            scores[j["model"]][j["turn"]].append(float(j["score"]))
    rows, stats = [], {}
    for model, by_turn in scores.items():
        both = by_turn[1] + by_turn[2]
        stats[model] = {"turn1": sum(by_turn[1]) / len(by_turn[1]) if by_turn[1] else None,
                        "turn2": sum(by_turn[2]) / len(by_turn[2]) if by_turn[2] else None,
                        "avg": sum(both) / len(both), "n": len(both), "unparsed": unparsed[model]}
        row = (f"| {model} | {_mean(by_turn[1])} | {_mean(by_turn[2])} | {_mean(both)} | {len(both)} "
               f"| {unparsed[model]} |")
        rows.append((stats[model]["avg"], row))
    lines = ["| model | turn 1 | turn 2 | average | judgments | unparsed |", "|---|---|---|---|---|---|"]
    lines += [r for _, r in sorted(rows, key=lambda r: -r[0])]
    return "\n".join(lines), stats


def per_category(judgments: list[dict], categories: dict, models: list[str] | None = None) -> str:
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for j in judgments:
        if j["score"] != -1 and (not models or j["model"] in models):
            scores[j["model"]][categories.get(j["question_id"], "?")].append(float(j["score"]))
    cats = sorted({c for by_cat in scores.values() for c in by_cat})
    lines = ["| model | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
    for model in sorted(scores):
        lines.append(f"| {model} | " + " | ".join(_mean(scores[model].get(c, [])) for c in cats) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Show MT-Bench single-answer scores.")
    p.add_argument("--judge-model", default="gpt-4")
    p.add_argument("--input-file", type=os.path.expanduser, default=None,
                   help="judgment jsonl "
                        "(default: llm_judge/data/mt_bench/model_judgment/<judge-model>_single.jsonl)")
    p.add_argument("--model-list", nargs="+", default=None)
    p.add_argument("--question-file", type=os.path.expanduser, default=None, help="for --per-category")
    p.add_argument("--per-category", action="store_true")
    args = p.parse_args(argv)
    path = Path(args.input_file) if args.input_file else judgment_file(args.judge_model)
    if not path.is_file():
        print(f"show_result: {path} not found; run gen_judgement.py first", file=sys.stderr)
        return 1
    judgments = read_jsonl(path)
    table, stats = summarize(judgments, args.model_list)
    if not stats:
        print(f"show_result: no usable judgments in {path}", file=sys.stderr)
        return 1
    print(f"MT-Bench single-answer scores (1-10) from {path.name}\n")
    print(table)
    if args.per_category:
        categories = {q["question_id"]: q.get("category", "?")
                      for q in load_questions(args.question_file or DEFAULT_QUESTION_FILE)}
        print("\nPer category (both turns)\n")
        print(per_category(judgments, categories, args.model_list))
    return 0


if __name__ == "__main__":
    sys.exit(main())
