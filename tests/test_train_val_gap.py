"""scripts/train_val_gap.py: mean training top-1 between evaluations beside validation top-1, a resumed
part's records replacing the earlier part's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from train_val_gap import gap_rows, main  # noqa: E402


def _train(step, top1, epoch):
    return {"step": step, "epoch": epoch, "loss": 1.0, "head0_top1": top1, "head1_top1": top1 / 2}


def _eval(step, top1):
    return {"step": step, "eval_loss": 1.0, "eval_head0_top1": top1, "eval_head1_top1": top1 / 2}


def _write(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_training_means_between_evaluations_and_resumed_steps_replaced(tmp_path, capsys):
    first = _write(tmp_path / "a.jsonl", [
        _eval(0, 0.40),  # the heads a continued run starts from: no training window, no row
        _train(1, 0.50, 0.5), _train(2, 0.60, 1.0), _eval(2, 0.41),
        _train(3, 0.10, 1.5),  # re-logged by the resumed part below
    ])
    second = _write(tmp_path / "b.jsonl", [_train(3, 0.70, 1.5), _train(4, 0.90, 2.0), _eval(4, 0.42)])
    heads, rows = gap_rows([first, second])
    assert heads == [0, 1]
    assert [r["step"] for r in rows] == [2, 4]
    assert [r["steps"] for r in rows] == [2, 2]
    assert rows[0]["train"][0][0] == pytest.approx(0.55)
    assert rows[1]["train"][0][0] == pytest.approx(0.80)  # 0.70 replaced the first part's 0.10
    assert rows[1]["train"][0][1] == pytest.approx(0.10)  # sample SD of (0.7, 0.9) / sqrt(2)
    assert rows[1]["train"][1][0] == pytest.approx(0.40)
    assert rows[1]["val"] == pytest.approx([0.42, 0.21])
    assert rows[1]["epoch"] == 2.0

    assert main([first, second]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 4 ")]
    assert lines == ["| 4 | 2.00 | 2 | 0.800 ± 0.100 | 0.400 ± 0.050 | 0.420 | 0.210 |"]


def test_a_log_without_evaluations_is_one_error_line(tmp_path, capsys):
    log = _write(tmp_path / "a.jsonl", [_train(1, 0.5, 0.1)])
    assert main([log]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no evaluation records" in err[0]
