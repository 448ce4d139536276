"""gen_model_answer_hydra.py / gen_model_answer_baseline.py on a tiny random model: record format, resuming,
and greedy Hydra == greedy baseline through the shared harness."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "llm_judge"))

import answer_common  # noqa: E402
from helpers import save_tiny_model  # noqa: E402

QUESTIONS = [json.loads(line)
             for line in (REPO / "llm_judge" / "data" / "mt_bench" / "question.jsonl").open()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """root/base: tiny Llama (d=32, 2 layers) with SmolLM2's tokenizer; root/heads: random Hydra heads."""
    root = save_tiny_model(tmp_path_factory.mktemp("tiny_answers"), context=512, heads=dict(num_heads=4))
    (root / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS[:2]))
    return root


def run(method: str, tiny: Path, answer_file: Path, *extra: str) -> int:
    return answer_common.main(method, ["--model-path", str(tiny / "heads"),
                                       "--question-file", str(tiny / "q.jsonl"),
                                       "--answer-file", str(answer_file), "--max-new-token", "6", "--dtype",
                                       "float32", "--device", "cpu", "--warmup", "0", *extra])


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open()]


def test_answers_format_resume_and_greedy_equality(tiny, tmp_path):
    hyd, base = tmp_path / "hydra.jsonl", tmp_path / "baseline.jsonl"
    assert run("hydra", tiny, hyd, "--tree", "tree_16", "--pace", "--lookup", "6") == 0
    assert run("baseline", tiny, base) == 0
    for path, method in ((hyd, "hydra"), (base, "baseline")):
        recs = read(path)
        assert [r["question_id"] for r in recs] == [q["question_id"] for q in QUESTIONS[:2]]
        for r in recs:
            assert r["model_id"] == f"{method}-heads" and r["answer_id"] and r["tstamp"] > 0
            assert r["decoding"]["method"] == method and r["decoding"]["max_new_token"] == 6
            c = r["choices"][0]
            assert c["index"] == 0 and len(c["turns"]) == 2 and all(isinstance(t, str) for t in c["turns"])
            for t in range(2):
                assert 0 < c["new_tokens"][t] <= 6 and c["wall_time"][t] > 0
                assert c["steps"][t] == len(c["accept_lengths"][t]) >= 1
                assert sum(c["accept_lengths"][t]) >= c["new_tokens"][t]
                if method == "baseline":
                    assert set(c["accept_lengths"][t]) == {1}
            # the second turn prefilled only what follows the first (the question's own prompt cache)
            assert c["reused_prompt_tokens"][0] == 0 and c["reused_prompt_tokens"][1] > 0
            assert (c["prompt_tokens"][1] > c["reused_prompt_tokens"][1]
                    and c["prompt_tokens"][1] > c["prompt_tokens"][0])
            assert all(0 < f <= w for f, w in zip(c["first_token_time"], c["wall_time"], strict=True))
    assert read(hyd)[0]["decoding"]["tree"] == "tree_16" and read(hyd)[0]["decoding"]["pace"] is True
    assert read(hyd)[0]["decoding"]["lookup"] == 6
    # Greedy speculative decoding is lossless: identical text through the identical harness.
    assert [r["choices"][0]["turns"] for r in read(hyd)] == [r["choices"][0]["turns"] for r in read(base)]

    # Resume: nothing to do; after dropping one record, only that question is answered again.
    before = hyd.read_text()
    assert run("hydra", tiny, hyd, "--tree", "tree_16") == 0
    assert hyd.read_text() == before
    lines = before.splitlines(keepends=True)
    hyd.write_text(lines[0] + lines[1][:20])  # second record lost, last line torn as by a crash
    assert run("hydra", tiny, hyd, "--tree", "tree_16") == 0
    recs = read(hyd)
    assert [r["question_id"] for r in recs] == [q["question_id"] for q in QUESTIONS[:2]]
    assert recs[0]["answer_id"] == json.loads(lines[0])["answer_id"]


def test_question_range_and_missing_heads(tiny, tmp_path, monkeypatch):
    out = tmp_path / "a.jsonl"
    assert run("baseline", tiny, out, "--question-begin", "1", "--question-end", "2") == 0
    assert [r["question_id"] for r in read(out)] == [QUESTIONS[1]["question_id"]]

    from hydra.inference import loading

    monkeypatch.setattr(loading, "DEFAULT_HEADS_DIR", tmp_path / "no_heads")
    with pytest.raises(SystemExit, match="no heads given"):
        answer_common.main("hydra", ["--question-file", str(tiny / "q.jsonl"), "--answer-file",
                                     str(tmp_path / "b.jsonl"), "--base-model", str(tiny / "base")])


def test_scripts_help_runs_from_any_directory(tmp_path):
    for script in ("gen_model_answer_hydra.py", "gen_model_answer_baseline.py"):
        r = subprocess.run([sys.executable, str(REPO / "llm_judge" / script), "-h"], check=False,
                           capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
        assert r.returncode == 0, r.stderr
        for flag in ("--model-path", "--base-model", "--model-id", "--answer-file", "--dtype",
                     "--temperature", "--max-new-token", "--question-file", "--question-begin",
                     "--question-end", "--warmup", "--num-threads"):
            assert flag in r.stdout
        assert ("--tree" in r.stdout) == ("hydra" in script)


@pytest.mark.parametrize("flags, needle", [
    (["--tree", "no_such_tree"], "unknown tree 'no_such_tree'"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--temperature", "nan"], "temperature must be >= 0"),
])
def test_configuration_errors_fail_before_any_record(tiny, tmp_path, flags, needle):
    out = tmp_path / "a.jsonl"
    with pytest.raises(SystemExit, match=rf"^\[hydra\] error: .*{needle}"):
        run("hydra", tiny, out, *flags)
    assert not out.exists()


def test_error_records_are_answered_again_and_flagged(tiny, tmp_path, capsys):
    import show_speed

    out = tmp_path / "a.jsonl"
    assert run("baseline", tiny, out) == 0
    good = read(out)
    broken = json.loads(json.dumps(good[1]))
    broken["choices"][0]["turns"][1] = answer_common.ERROR_ANSWER
    broken["choices"][0]["finish_reasons"][1] = "error"
    out.write_text(json.dumps(good[0]) + "\n" + json.dumps(broken) + "\n")
    assert answer_common.answered_ids(out) == {good[0]["question_id"]}
    capsys.readouterr()
    assert set(show_speed.load_answer_file(out)) == {good[0]["question_id"]}  # left out of the speed table
    assert "1 error records ($ERROR$) left out" in capsys.readouterr().err
    assert run("baseline", tiny, out) == 0  # a rerun answers the error record's question again
    again = read(out)
    assert [r["question_id"] for r in again] == [r["question_id"] for r in good]
    assert not any(answer_common.is_error_record(r) for r in again)
    assert again[0]["answer_id"] == good[0]["answer_id"]  # the good record is kept as it was


def test_malformed_question_line_names_file_and_line(tiny, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text((tiny / "q.jsonl").read_text() + '{"question_id": 9, "turns": "not a list"}\n')
    with pytest.raises(SystemExit, match=rf"^\[hydra\] error: {questions}:3: a question needs"):
        answer_common.load_questions(questions)
    questions.write_text('{"question_id": 1, "turns": ["a"]}\n{broken\n')
    with pytest.raises(SystemExit, match=rf"{questions}:2: not a JSON line"):
        answer_common.load_questions(questions)


def test_tilde_in_answer_and_question_files(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "q.jsonl").write_text((tiny / "q.jsonl").read_text())
    assert answer_common.main("baseline", ["--model-path", str(tiny / "heads"),
                                           "--question-file", "~/q.jsonl", "--answer-file", "~/out/a.jsonl",
                                           "--max-new-token", "2", "--dtype", "float32", "--device", "cpu",
                                           "--warmup", "0"]) == 0
    assert len(read(tmp_path / "out" / "a.jsonl")) == 2
