r"""MT-Bench single-answer grading by an LLM judge behind any OpenAI-compatible endpoint.

Usage:
    export OPENAI_API_KEY=...        # or name another variable with --api-key-env; local servers may
                                     # need none
    python llm_judge/gen_judgement.py --judge-endpoint https://api.openai.com/v1 --judge-model gpt-4 \
        [--model-list hydra-default baseline-default] [--parallel 4] [--first-n 10]
    python llm_judge/show_result.py --judge-model gpt-4

For every answer file in llm_judge/data/mt_bench/model_answer/ (or those named by --model-list) and every
question, turn 1 is graded with the `single-v1` prompt and turn 2 with `single-v1-multi-turn`; math, reasoning
and coding questions use `single-math-v1[-multi-turn]` with the GPT-4 reference answers. Prompts come from
llm_judge/data/judge_prompts.jsonl (FastChat's). The judge's `[[rating]]` is parsed into `score` (-1 if
absent). Output: FastChat's judgment jsonl (question_id, model, judge [model, prompt name], user_prompt,
judgment, score, turn, tstamp) in llm_judge/data/mt_bench/model_judgment/<judge-model>_single.jsonl;
rerunning skips (model, question, turn) triples already judged. The endpoint is spoken to with plain HTTP
(POST <endpoint>/chat/completions), so no `openai` package is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Run as a script, this file's folder is on sys.path.
from answer_common import (
    DEFAULT_ANSWER_DIR,
    DEFAULT_QUESTION_FILE,
    ERROR_ANSWER,
    JUDGE_DATA_DIR,
    LLM_JUDGE_DIR,
    is_error_record,
    load_questions,
)

from hydra.data.jsonl import read_jsonl, read_resumable

DEFAULT_JUDGE_FILE = JUDGE_DATA_DIR / "judge_prompts.jsonl"
DEFAULT_REF_FILE = JUDGE_DATA_DIR / "mt_bench" / "reference_answer" / "gpt-4.jsonl"
DEFAULT_JUDGMENT_DIR = LLM_JUDGE_DIR / "data" / "mt_bench" / "model_judgment"
NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")  # as in FastChat
ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
ENDPOINT_ENVS = ("OPENAI_BASE_URL", "OPENAI_API_BASE")


def load_answers(answer_dir: Path, models: list[str] | None) -> dict[str, dict]:
    """{model_id: {question_id: record}} from <answer_dir>/<model>.jsonl."""
    files = [answer_dir / f"{m}.jsonl" for m in models] if models else sorted(answer_dir.glob("*.jsonl"))
    if not files:
        raise SystemExit(f"no answer files in {answer_dir}: run gen_model_answer_hydra.py / _baseline.py "
                         "first")
    answers = {}
    for path in files:
        if not path.is_file():
            raise SystemExit(f"answer file {path} not found")
        records = read_jsonl(path)
        answers[path.stem] = {rec["question_id"]: rec for rec in records if not is_error_record(rec)}
        if len(answers[path.stem]) < len(records):
            print(f"gen_judgement: {path}: {len(records) - len(answers[path.stem])} error records "
                  f"({ERROR_ANSWER}) not judged; rerun gen_model_answer_*.py to answer them", file=sys.stderr)
    return answers


def judgment_file(judge_model: str) -> Path:
    """Where the judgments of one judge model live (the name made safe for a file name)."""
    return DEFAULT_JUDGMENT_DIR / (re.sub(r"[^A-Za-z0-9._-]+", "_", judge_model) + "_single.jsonl")


def parse_rating(judgment: str) -> int | float:
    """The judge's `[[rating]]` (FastChat's patterns: `[[x]]`, else `[x]`), or -1 when there is none."""
    match = ONE_SCORE.search(judgment) or ONE_SCORE_BACKUP.search(judgment)
    if not match:
        return -1
    value = match.group(1)
    return float(value) if "." in value else int(value)


def build_prompt(templates: dict, question: dict, answer: dict, turn: int,
                 ref: dict | None) -> tuple[str, str, str]:
    """(prompt name, system prompt, user prompt) for grading `turn` (1 or 2) of one answer."""
    name = ("single-math-v1" if ref is not None else "single-v1") + ("-multi-turn" if turn == 2 else "")
    template = templates[name]
    turns = answer["choices"][0]["turns"]
    kwargs = {}
    if ref is not None:
        kwargs["ref_answer_1"] = ref["choices"][0]["turns"][0]
        if turn == 2:
            kwargs["ref_answer_2"] = ref["choices"][0]["turns"][1]
    if turn == 2:
        user = template["prompt_template"].format(question_1=question["turns"][0],
                                                  question_2=question["turns"][1],
                                                  answer_1=turns[0], answer_2=turns[1], **kwargs)
    else:
        user = template["prompt_template"].format(question=question["turns"][0], answer=turns[0], **kwargs)
    return name, template["system_prompt"], user


class JudgeClient:
    """POST <endpoint>/chat/completions with retries (OpenAI wire format)."""

    def __init__(self, endpoint: str, model: str, api_key: str | None, max_retries: int = 5,
                 timeout: float = 120.0, max_tokens: int = 2048):
        import requests

        self.url = endpoint.rstrip("/") + "/chat/completions"
        self.model, self.max_retries, self.timeout, self.max_tokens = model, max_retries, timeout, max_tokens
        self.session = requests.Session()
        self.session.headers["Content-Type"] = "application/json"
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def complete(self, system: str, user: str) -> str:
        import requests

        payload = {"model": self.model, "temperature": 0, "max_tokens": self.max_tokens, "n": 1,
                   "messages": ([{"role": "system", "content": system}] if system else [])
                   + [{"role": "user", "content": user}]}
        err = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(2 ** attempt, 30))
            try:
                r = self.session.post(self.url, json=payload, timeout=self.timeout)
                if r.status_code in (401, 403, 404):  # not worth retrying
                    raise RuntimeError(f"{self.url} answered HTTP {r.status_code}: {r.text[:300]}")
                r.raise_for_status()
                return r.json()["choices"][0]["message"]["content"]
            except RuntimeError:
                raise
            except (requests.RequestException, KeyError, IndexError, TypeError, ValueError) as e:
                err = e
        raise RuntimeError(f"judge request failed after {self.max_retries + 1} attempts: {err}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="MT-Bench single-answer grading with an OpenAI-compatible judge.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--judge-endpoint", default=None,
                   help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1 "
                        "(default: $OPENAI_BASE_URL)")
    p.add_argument("--judge-model", default="gpt-4")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--model-list", nargs="+", default=None,
                   help="model ids to judge (default: all answer files)")
    p.add_argument("--answer-dir", type=os.path.expanduser, default=str(DEFAULT_ANSWER_DIR))
    p.add_argument("--question-file", type=os.path.expanduser,
                   default=None, help="default: llm_judge/data/mt_bench/question.jsonl")
    p.add_argument("--ref-answer-file", type=os.path.expanduser, default=None,
                   help="default: llm_judge/data/mt_bench/reference_answer/gpt-4.jsonl")
    p.add_argument("--judge-file", type=os.path.expanduser,
                   default=None, help="default: llm_judge/data/judge_prompts.jsonl")
    p.add_argument("--output-file", type=os.path.expanduser, default=None,
                   help="default: llm_judge/data/mt_bench/model_judgment/<judge-model>_single.jsonl")
    p.add_argument("--first-n", type=int, default=None, help="only the first N questions (debugging)")
    p.add_argument("--parallel", type=int, default=1, help="concurrent judge requests")
    p.add_argument("--max-retries", type=int, default=5)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    args = p.parse_args(argv)

    endpoint = args.judge_endpoint or next((os.environ[e] for e in ENDPOINT_ENVS if os.environ.get(e)), None)
    if not endpoint:
        print("gen_judgement: no judge endpoint configured. Pass --judge-endpoint URL (an OpenAI-compatible "
              "base URL such as https://api.openai.com/v1, or a local vLLM/llama.cpp server's "
              "http://host:port/v1) or set OPENAI_BASE_URL, and put the API key in $OPENAI_API_KEY (or the "
              "variable named by --api-key-env).", file=sys.stderr)
        return 2
    api_key = os.environ.get(args.api_key_env)
    if not api_key:
        print(f"gen_judgement: note: ${args.api_key_env} is not set; sending requests without an API key",
              file=sys.stderr)

    questions = load_questions(args.question_file or DEFAULT_QUESTION_FILE)
    if args.first_n:
        questions = questions[: args.first_n]
    templates = {t["name"]: t for t in read_jsonl(Path(args.judge_file or DEFAULT_JUDGE_FILE))}
    refs = {r["question_id"]: r for r in read_jsonl(Path(args.ref_answer_file or DEFAULT_REF_FILE))}
    answers = load_answers(Path(args.answer_dir), args.model_list)
    out_path = Path(args.output_file) if args.output_file else judgment_file(args.judge_model)
    done = {(rec["model"], rec["question_id"], rec["turn"]) for rec in read_resumable(out_path)
            if rec.get("judge", [None])[0] == args.judge_model}

    matches, missing = [], 0
    for model, by_qid in answers.items():
        for q in questions:
            ans = by_qid.get(q["question_id"])
            if ans is None:
                missing += 1
                continue
            ref = refs.get(q["question_id"]) if q.get("category") in NEED_REF_CATS else None
            if q.get("category") in NEED_REF_CATS and ref is None:
                print(f"gen_judgement: no reference answer for question {q['question_id']} "
                      f"({q['category']}); skipped", file=sys.stderr)
                continue
            for turn in range(1, min(len(q["turns"]), len(ans["choices"][0]["turns"]), 2) + 1):
                if (model, q["question_id"], turn) not in done:
                    matches.append((model, q, ans, turn, ref))
    print(f"gen_judgement: {len(matches)} judgments to make with {args.judge_model} at {endpoint} "
          f"({len(done)} already in {out_path}; {missing} question/model pairs have no answer)", flush=True)
    if not matches:
        return 0

    client = JudgeClient(endpoint, args.judge_model, api_key, args.max_retries, args.timeout)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    failures = []

    def judge(match) -> None:
        model, q, ans, turn, ref = match
        name, system, user = build_prompt(templates, q, ans, turn, ref)
        try:
            judgment = client.complete(system, user)
        except RuntimeError as e:
            failures.append((model, q["question_id"], turn, str(e)))
            return
        rec = {"question_id": q["question_id"], "model": model, "judge": [args.judge_model, name],
               "user_prompt": user, "judgment": judgment, "score": parse_rating(judgment), "turn": turn,
               "tstamp": time.time()}
        with lock, out_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    from tqdm import tqdm

    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        list(tqdm(pool.map(judge, matches), total=len(matches), desc="judging"))
    if failures:
        print(f"gen_judgement: {len(failures)} judgments failed (rerun to retry them); first: {failures[0]}",
              file=sys.stderr)
        return 1
    print(f"gen_judgement: wrote {out_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
