"""scripts/bench_distill.py on a tiny model: every configuration answers every prompt in full."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from helpers import save_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench_distill


def run_bench(tmp_path, capsys, questions: list[str], *flags: str) -> str:
    """bench_distill's output on a tiny random model answering `questions`, one thread."""
    root = save_tiny_model(tmp_path / "tiny")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "turns": [q]}) + "\n"
                               for i, q in enumerate(questions)))
    bench_distill.main(["--prompts", str(prompts), "--base-model", str(root / "base"),
                        "--num-prompts", str(len(questions)), "--skip", "0", "--threads", "1", *flags])
    return capsys.readouterr().out


def test_generate_and_loop_answer_the_same_prompts(tmp_path, capsys):
    out = run_bench(tmp_path, capsys, [f"Question {i}: " + "why? " * i for i in range(5)],
                    "--batch-sizes", "2", "3", "--max-new-tokens", "4", "--temperature", "0")
    rows = dict(re.findall(r"(\w+ batch \d): +(\d+) new tokens", out))
    # A random tiny model never stops early: 5 prompts x 4 tokens for each of the four configurations.
    assert rows == {name: "20" for name in ("generate batch 2", "loop batch 2", "generate batch 3",
                                            "loop batch 3")}, out
    assert "[bench_distill] 5/5 prompts" in out and "greedy" in out


def test_top_p_candidates_add_one_loop_run_each(tmp_path, capsys):
    out = run_bench(tmp_path, capsys, [f"Question {i}" for i in range(3)], "--batch-sizes", "3",
                    "--max-new-tokens", "4", "--top-p-candidates", "0", "16", "16")  # 16 runs once
    rows = dict(re.findall(r"(\w+(?: candidates \d+)? batch \d): +(\d+) new tokens", out))
    assert set(rows) == {"generate batch 3", "loop candidates 0 batch 3", "loop candidates 16 batch 3"}, out
    assert out.count("loop candidates 16 batch 3:") == 1
    assert all(0 < int(n) <= 12 for n in rows.values()) and "temperature 0.7 top-p 0.95" in out


def test_refill_below_adds_one_loop_run_each(tmp_path, capsys):
    out = run_bench(tmp_path, capsys, [f"Question {i}" for i in range(5)], "--batch-sizes", "2",
                    "--max-new-tokens", "3", "--temperature", "0", "--refill-below", "1", "2", "3",
                    "--group", "5", "--no-generate")
    rows = dict(re.findall(r"(loop refill below \d batch \d): +(\d+) new tokens", out))
    # 3 is above the batch size: it runs (and is named) as 2, once
    assert rows == {"loop refill below 1 batch 2": "15", "loop refill below 2 batch 2": "15"}, out
    assert out.count("loop refill below 2 batch 2:") == 1
    assert "generate" not in out
