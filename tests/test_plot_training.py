"""scripts/plot_training.py: runs placed on one token axis (continued runs after the one before, a
--start_step run on the axis of the run it continues), a repeated step's later record counting."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from plot_training import load_logs, main, place  # noqa: E402


def _train(step, tokens):
    return {"step": step, "loss": 1.0, "tokens_seen": tokens}


def _eval(step, tokens, top1):
    return {"step": step, "eval_loss": 1.0, "eval_head0_top1": top1, "eval_head1_top1": top1 / 2,
            "tokens_seen": tokens}


def _write(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _table(capsys) -> list[tuple[str, float, float]]:
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    return [(r[0].strip(), float(r[1]), float(r[2])) for r in rows[1:]]


def test_continued_and_start_step_runs_share_one_token_axis(tmp_path, capsys):
    first = _write(tmp_path / "first.jsonl", [_train(1, 1_000_000), _eval(1, 1_000_000, 0.30),
                                              _train(2, 2_000_000), _eval(2, 2_000_000, 0.40)])
    # continued with --init_heads: starts from zero tokens at step 0, placed after `first` (2M)
    second = _write(tmp_path / "second.jsonl", [
        _eval(0, 0, 0.40), _train(1, 1_000_000), _eval(1, 1_000_000, 0.45),
        _train(2, 2_000_000), _eval(2, 2_000_000, 0.47),
        _train(2, 2_000_000), _eval(2, 2_000_000, 0.48),  # resumed at step 1: step 2 again, later wins
        _train(3, 3_000_000), _eval(3, 3_000_000, 0.49)])
    # --start_step 2 from `second`'s step-2 heads: its own records past step 2 are dropped
    third = _write(tmp_path / "third.jsonl", [_eval(2, 2_000_000, 0.48), _train(3, 3_000_000),
                                              _train(4, 4_000_000), _eval(4, 4_000_000, 0.55)])
    assert main([first, second, third]) == 0
    assert _table(capsys) == [
        ("first.jsonl", 1.0, 0.30), ("first.jsonl", 2.0, 0.40),
        ("second.jsonl", 2.0, 0.40), ("second.jsonl", 3.0, 0.45), ("second.jsonl", 4.0, 0.48),
        ("third.jsonl", 4.0, 0.48), ("third.jsonl", 6.0, 0.55)]


def test_a_log_without_evaluations_is_one_error_line(tmp_path, capsys):
    log = _write(tmp_path / "log.jsonl", [_train(1, 10)])
    assert main([log]) == 1
    assert capsys.readouterr().err.strip() == f"[hydra] error: {log}: no evaluation records (eval_head0_top1)"


def test_a_log_continued_before_its_first_evaluation_still_spans_its_tokens(tmp_path, capsys):
    # evaluated only at step 4; continued (--start_step 2) from heads exported at step 2
    first = _write(tmp_path / "first.jsonl", [_train(1, 1_000_000), _train(2, 2_000_000),
                                              _train(3, 3_000_000), _eval(4, 4_000_000, 0.40)])
    second = _write(tmp_path / "second.jsonl", [_eval(2, 2_000_000, 0.35), _train(3, 3_000_000),
                                                _eval(3, 3_000_000, 0.45)])
    assert main([first, second]) == 0
    assert _table(capsys) == [("second.jsonl", 2.0, 0.35), ("second.jsonl", 3.0, 0.45)]


def test_a_cool_down_branch_is_drawn_from_the_point_it_branched_at(tmp_path, capsys):
    run = _write(tmp_path / "run.jsonl", [_train(1, 1_000_000), _eval(1, 1_000_000, 0.40),
                                          _train(2, 2_000_000), _eval(2, 2_000_000, 0.42),
                                          _train(3, 3_000_000), _eval(3, 3_000_000, 0.43)])
    # --decay_from checkpoint-1 --decay_steps 2: trains steps 2-3 again, evaluates at its end only
    branch = _write(tmp_path / "branch.jsonl", [_train(2, 2_000_000), _train(3, 3_000_000),
                                                _eval(3, 3_000_000, 0.47)])
    assert main([run, branch]) == 0
    assert _table(capsys) == [("run.jsonl", 1.0, 0.40), ("branch.jsonl", 3.0, 0.47)]
    logs, starts, heads = load_logs([run, branch])
    assert starts == [0, 1]
    placed = place([run, branch], logs, starts, heads)
    marker, lead = placed[1].marker, placed[1].lead
    assert marker == 1_000_000 and lead[0] == 1_000_000 and list(lead[1]) == [0.40, 0.20]
    assert placed[0].lead is None


def test_the_rest_of_a_run_resumed_in_place_is_drawn_from_its_last_point_before(tmp_path, capsys):
    # the run's log split where it was resumed from checkpoint-3; it last evaluated at step 2
    head = _write(tmp_path / "head.jsonl", [_train(1, 1_000_000), _eval(1, 1_000_000, 0.40),
                                            _train(2, 2_000_000), _eval(2, 2_000_000, 0.42),
                                            _train(3, 3_000_000)])
    rest = _write(tmp_path / "rest.jsonl", [_train(4, 4_000_000), _eval(4, 4_000_000, 0.45)])
    assert main([head, rest]) == 0
    assert _table(capsys) == [("head.jsonl", 1.0, 0.40), ("head.jsonl", 2.0, 0.42), ("rest.jsonl", 4.0, 0.45)]
    logs, starts, heads = load_logs([head, rest])
    placed = place([head, rest], logs, starts, heads)
    assert starts == [0, 3] and placed[1].marker == 3_000_000
    assert placed[1].lead[0] == 2_000_000 and list(placed[1].lead[1]) == [0.42, 0.21]
