"""MT-Bench judging, result and speed reports (no model needed).

The judge is a small OpenAI-compatible HTTP server started by the test (http.server in a thread, real HTTP on
127.0.0.1) that answers every /v1/chat/completions request with a canned verdict.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "llm_judge"))

import gen_judgement  # noqa: E402
import show_result  # noqa: E402
import show_speed  # noqa: E402
from helpers import LocalServer, write_jsonl  # noqa: E402

JUDGE_DATA = REPO / "llm_judge" / "data"
QUESTIONS = [json.loads(line) for line in (JUDGE_DATA / "mt_bench" / "question.jsonl").open()]
WRITING = next(q for q in QUESTIONS if q["category"] == "writing")
MATH = next(q for q in QUESTIONS if q["category"] == "math")


class FakeJudge(LocalServer):
    """OpenAI-compatible chat completions endpoint with canned replies; records every request."""

    def __init__(self, reply=lambda req: "The answer is fine. Rating: [[8]]", fail_first: int = 0):
        self.requests: list[dict] = []
        self.fail_left = fail_first
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    self.send_error(404)
                    return
                if judge.fail_left > 0:
                    judge.fail_left -= 1
                    self.send_error(500, "try again")
                    return
                judge.requests.append({"auth": self.headers.get("Authorization"), **body})
                data = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant",
                                                            "content": reply(body)}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        super().__init__(Handler, "/v1")


def spread(n: int, steps: int) -> list[int]:
    """n tokens over `steps` steps (accept lengths summing to n)."""
    return [n // steps + (i < n % steps) for i in range(steps)]


def answer_record(q: dict, model: str, turns: list[str], new_tokens=(10, 20), wall=(1.0, 2.0), steps=(5, 10),
                  per_step: bool = True):
    """per_step=False: no accept_lengths, as in older answer files (tau = new tokens / steps)."""
    choice = {"index": 0, "turns": turns, "new_tokens": list(new_tokens), "wall_time": list(wall),
              "steps": list(steps)}
    if per_step:
        choice["accept_lengths"] = [spread(n, s) for n, s in zip(new_tokens, steps, strict=True)]
    return {"question_id": q["question_id"], "answer_id": "a", "model_id": model, "tstamp": 0.0,
            "choices": [choice]}


@pytest.fixture
def answers(tmp_path) -> Path:
    d = tmp_path / "model_answer"
    for model in ("model-a", "model-b"):
        write_jsonl(d / f"{model}.jsonl", [answer_record(q, model, [f"{model} answer 1 to {q['question_id']}",
                                                                    f"{model} answer 2"])
                                           for q in (WRITING, MATH)])
    return d


def judge_args(answers: Path, out: Path, url: str, *extra: str) -> list[str]:
    qfile = write_jsonl(answers.parent / "q.jsonl", [WRITING, MATH])
    return ["--judge-endpoint", url, "--judge-model", "judge-x", "--answer-dir", str(answers),
            "--question-file", str(qfile), "--output-file", str(out), *extra]


def test_judging_against_a_local_openai_compatible_server(answers, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    out = tmp_path / "judgment.jsonl"
    with FakeJudge(fail_first=1) as judge:
        assert gen_judgement.main(judge_args(answers, out, judge.url, "--parallel", "2",
                                             "--max-retries", "2")) == 0
        assert len(judge.requests) == 8  # 2 models x 2 questions x 2 turns (one 500 retried)
        assert all(r["auth"] == "Bearer test-key" and r["model"] == "judge-x" and r["temperature"] == 0
                   for r in judge.requests)
        # Rerunning judges nothing new.
        assert gen_judgement.main(judge_args(answers, out, judge.url)) == 0
        assert len(judge.requests) == 8

    records = [json.loads(line) for line in out.open()]
    assert len(records) == 8 and all(r["score"] == 8 for r in records)
    by_key = {(r["model"], r["question_id"], r["turn"]): r for r in records}
    ref = json.loads(next(line
                          for line in (JUDGE_DATA / "mt_bench" / "reference_answer" / "gpt-4.jsonl").open()
                          if json.loads(line)["question_id"] == MATH["question_id"]))
    math1 = by_key[("model-a", MATH["question_id"], 1)]
    assert math1["judge"] == ["judge-x", "single-math-v1"]
    assert (ref["choices"][0]["turns"][0] in math1["user_prompt"]
            and "model-a answer 1" in math1["user_prompt"])
    math2 = by_key[("model-b", MATH["question_id"], 2)]
    assert math2["judge"] == ["judge-x", "single-math-v1-multi-turn"]
    assert (ref["choices"][0]["turns"][1] in math2["user_prompt"]
            and "model-b answer 2" in math2["user_prompt"])
    assert by_key[("model-a", WRITING["question_id"], 1)]["judge"] == ["judge-x", "single-v1"]
    w2 = by_key[("model-a", WRITING["question_id"], 2)]
    assert w2["judge"] == ["judge-x", "single-v1-multi-turn"] and WRITING["turns"][1] in w2["user_prompt"]
    sent = {tuple(m["content"][:40] for m in r["messages"]) for r in judge.requests}
    assert any(s[0] == "You are a helpful assistant." for s in sent)  # single-v1's system prompt

    table, stats = show_result.summarize(records)
    assert stats["model-a"] == {"turn1": 8.0, "turn2": 8.0, "avg": 8.0, "n": 4, "unparsed": 0}
    assert "| model-a | 8.00 | 8.00 | 8.00 | 4 | 0 |" in table
    assert show_result.main(["--input-file", str(out), "--per-category",
                             "--question-file", str(answers.parent / "q.jsonl")]) == 0


def test_unparsable_verdicts_score_minus_one(answers, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    out = tmp_path / "judgment.jsonl"
    with FakeJudge(reply=lambda req: "I cannot decide.") as judge:
        assert gen_judgement.main(judge_args(answers, out, judge.url, "--model-list", "model-a")) == 0
        assert judge.requests and all(r["auth"] is None for r in judge.requests)
    records = [json.loads(line) for line in out.open()]
    assert len(records) == 4 and all(r["score"] == -1 and r["model"] == "model-a" for r in records)
    _, stats = show_result.summarize(records)
    assert stats == {}


def test_parse_rating():
    assert gen_judgement.parse_rating("blah Rating: [[7]]") == 7
    assert gen_judgement.parse_rating("Rating: [[6.5]] and later [[2]]") == 6.5
    assert gen_judgement.parse_rating("Rating: [9]") == 9
    assert gen_judgement.parse_rating("no rating") == -1


def test_no_endpoint_is_a_clear_message(answers):
    env = {k: v for k, v in os.environ.items() if k not in gen_judgement.ENDPOINT_ENVS}
    r = subprocess.run([sys.executable, str(REPO / "llm_judge" / "gen_judgement.py"),
                        "--answer-dir", str(answers)],
                       check=False, capture_output=True, text=True, env=env, cwd=str(REPO.parent), timeout=60)
    assert r.returncode == 2
    assert "no judge endpoint configured" in r.stderr and "--judge-endpoint" in r.stderr


def test_unreachable_endpoint_fails_without_writing(answers, tmp_path):
    out = tmp_path / "judgment.jsonl"
    with FakeJudge() as judge:
        url = judge.url
    assert gen_judgement.main(judge_args(answers, out, url, "--max-retries", "0", "--first-n", "1")) == 1
    assert not out.exists() or out.read_text() == ""


# --- show_speed ---------------------------------------------------------------------------------------------
def test_speed_report_numbers_plot_and_equality(tmp_path, capsys):
    qfile = write_jsonl(tmp_path / "q.jsonl", [WRITING, MATH])
    # tau = new tokens / steps here (no per-step lengths); the prefill rule is pinned in the next test
    rec = functools.partial(answer_record, per_step=False)
    base = write_jsonl(tmp_path / "base.jsonl", [
        rec(WRITING, "ar", ["x", "y"], new_tokens=(10, 10), wall=(1.0, 1.0), steps=(10, 10)),
        rec(MATH, "ar", ["p", "q"], new_tokens=(30, 10), wall=(2.0, 2.0), steps=(40, 10))])
    hyd = write_jsonl(tmp_path / "hyd.jsonl", [
        rec(WRITING, "hydra", ["x", "y"], new_tokens=(10, 10), wall=(0.5, 0.5), steps=(4, 4)),
        rec(MATH, "hydra", ["p", "DIFFERENT"], new_tokens=(30, 10), wall=(1.0, 0.6), steps=(10, 6))])
    png = tmp_path / "assets" / "speed.png"
    assert show_speed.main(["--baseline", str(base), "--hydra", str(hyd), "--question-file", str(qfile),
                            "--check-equal", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    # writing: base 20 tok / 2 s = 10 tok/s; hydra 20 / 1 = 20 tok/s, tau 20 / 8 = 2.5, speedup 2x
    assert "| writing | 1 | 10.0 | 20.0 | 2.50 | 2.00x |" in out
    # math: base 40 / 4 = 10; hydra 40 / 1.6 = 25, tau 40 / 16 = 2.5, 2.5x
    assert "| math | 1 | 10.0 | 25.0 | 2.50 | 2.50x |" in out
    # overall: sums, not means of ratios: base 60 / 6 = 10; hydra 60 / 2.6 = 23.08, tau 60 / 24, 2.31x
    assert "| **overall** | 2 | 10.0 | 23.1 | 2.50 | 2.31x |" in out
    assert f"hydra: 1/2 questions identical to the baseline (first differing: [{MATH['question_id']}])" in out
    if _has_matplotlib():
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"


def test_tau_is_the_mean_accepted_length():
    """The stop token is decided (and counted by accept_length) but not emitted: AR stays at tau = 1."""
    rec = answer_record(WRITING, "ar", ["a", "b"], new_tokens=(2, 3), wall=(1.0, 1.0), steps=(3, 3))
    rec["choices"][0]["accept_lengths"] = [[1, 1, 1], [1, 1, 1]]
    sums = show_speed.aggregate({WRITING["question_id"]: rec}, [WRITING["question_id"]], {})
    assert show_speed.rates(sums["overall"]) == (2.5, 1.0)
    rec["choices"][0]["accept_lengths"] = [[1, 3, 2], [1, 4]]  # the prefill step (first) is left out
    sums = show_speed.aggregate({WRITING["question_id"]: rec}, [WRITING["question_id"]], {})
    assert show_speed.rates(sums["overall"])[1] == 3.0
    del rec["choices"][0]["accept_lengths"]  # older files: new tokens / steps
    sums = show_speed.aggregate({WRITING["question_id"]: rec}, [WRITING["question_id"]], {})
    assert show_speed.rates(sums["overall"])[1] == pytest.approx(5 / 6)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_plot_without_matplotlib_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert show_speed.plot({"h": {"overall": 2.0}}, tmp_path / "x.png", "t") is False
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_speed_report_rejects_files_without_speed_fields(tmp_path):
    qfile = write_jsonl(tmp_path / "q.jsonl", [WRITING])
    rec = answer_record(WRITING, "m", ["a", "b"])
    del rec["choices"][0]["steps"]
    bad = write_jsonl(tmp_path / "fastchat.jsonl", [rec])
    with pytest.raises(SystemExit, match="has no 'steps'"):
        show_speed.main(["--baseline", str(bad), "--hydra", str(bad), "--question-file", str(qfile)])
