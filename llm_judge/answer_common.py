"""The MT-Bench answer harness shared by gen_model_answer_hydra.py and gen_model_answer_baseline.py.

Both scripts run exactly this code; the only difference is the decoding function (`hydra_generate` or
`ar_generate`, which share loading, KV cache and stopping). One record per question, FastChat's answer format
plus per-turn speed data:

    {"question_id", "answer_id", "model_id", "tstamp",
     "choices": [{"index": 0, "turns": [str, str],
                  "new_tokens": [int, int],          # tokens emitted per turn (stop token excluded)
                  "wall_time": [float, float],       # seconds around the whole generate call, prefill
                                                     # included (a second turn prefills only what follows
                                                     # the first)
                  "first_token_time": [float, float],  # seconds to the first step's tokens (prefill)
                  "prompt_tokens": [int, int],       # the whole rendered conversation up to this turn
                  "reused_prompt_tokens": [int, int],  # prompt tokens whose prefill the prompt cache saved
                  "steps": [int, int],               # decoding steps = base-model forwards, prefill included
                  "accept_lengths": [[int, ...], [int, ...]],  # tokens decided per step, bonus token included
                  "finish_reasons": [str, str]}],
     "decoding": {method, tree, lookup, temperature, sampling, max_new_token, dtype, quant, heads_quant,
                  compile, pace, device, heads, base_model}}

tau = tokens decided per verification step with each turn's prefill step left out (with --pace the plain
steps count as verification steps of one token)
(sum(accept_lengths[1:]) / (steps - 1) per turn, summed); tokens/s = sum(new_tokens) / sum(wall_time)
(see show_speed.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

LLM_JUDGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = LLM_JUDGE_DIR.parent
if str(REPO_ROOT) not in sys.path:  # run as a script from a fresh clone: make `hydra` importable
    sys.path.insert(0, str(REPO_ROOT))

# FastChat's layout: mt_bench/question.jsonl, judge_prompts.jsonl, ...
JUDGE_DATA_DIR = LLM_JUDGE_DIR / "data"
DEFAULT_QUESTION_FILE = JUDGE_DATA_DIR / "mt_bench" / "question.jsonl"
DEFAULT_ANSWER_DIR = LLM_JUDGE_DIR / "data" / "mt_bench" / "model_answer"
DEFAULT_MAX_NEW_TOKEN = 256
ERROR_ANSWER = "$ERROR$"  # FastChat's marker for a turn that could not be generated


def build_parser(method: str) -> argparse.ArgumentParser:
    from hydra.choices import add_model_options  # after the sys.path set-up above

    p = argparse.ArgumentParser(
        description=f"Generate MT-Bench answers with "
                    f"{'Hydra speculative' if method == 'hydra' else 'plain autoregressive'} "
                    "decoding, recording wall time, new tokens and decoding steps per turn.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-path", type=os.path.expanduser, default=None,
                   help="heads folder or Hub repo id (default: the shipped heads, hydra/heads/default)")
    p.add_argument("--base-model", type=os.path.expanduser,
                   default=None, help="override the base model named in the heads' config")
    p.add_argument("--model-id", default=None,
                   help=f"name written into the answers (default: {method}-<heads folder name>)")
    p.add_argument("--answer-file", type=os.path.expanduser, default=None,
                   help="output jsonl (default: llm_judge/data/mt_bench/model_answer/<model-id>.jsonl)")
    p.add_argument("--question-file", type=os.path.expanduser, default=None,
                   help="questions jsonl (default: llm_judge/data/mt_bench/question.jsonl)")
    p.add_argument("--question-begin", type=int, default=None, help="index of the first question (debugging)")
    p.add_argument("--question-end", type=int, default=None, help="index after the last question (debugging)")
    p.add_argument("--max-new-token", type=int, default=DEFAULT_MAX_NEW_TOKEN,
                   help="cap per turn; keep it equal between the baseline and Hydra runs you compare")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    add_model_options(p, dtypes=("bfloat16", "float32"),
                      compile_help="compile the base decoder (the untimed warm-up runs compile it)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed runs of the first question's first turn before measuring")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    if method == "hydra":
        p.add_argument("--tree", type=os.path.expanduser, default=None,
                       help="candidate tree name, JSON file or dynamic[:N[:DEPTH[:K]]][:fixed] "
                            "(default: the heads' own)")
        p.add_argument("--sampling", choices=("typical", "exact"), default=None,
                       help="acceptance rule when temperature > 0 (default: the engine's)")
        p.add_argument("--lookup", type=int, default=None,
                       help="prompt-lookup tokens drafted per step besides the heads' tree (0: off; default: "
                            "the engine's)")
        p.add_argument("--posterior-threshold", type=float, default=None)
        p.add_argument("--posterior-alpha", type=float, default=None)
        p.add_argument("--pace", action="store_true",
                       help="rest the heads while they decide fewer tokens per second than plain steps "
                            "(hydra.model.pacing; tau then counts the plain steps too, and with "
                            "--temperature > 0 samples no longer repeat for a given --seed)")
    return p


def load_questions(path: str | Path, begin: int | None = None, end: int | None = None) -> list[dict]:
    """MT-Bench question records; a bad line is an error naming the file and line."""
    from hydra.data.jsonl import iter_jsonl

    path = Path(path).expanduser()
    questions = []
    try:
        for line_no, q in iter_jsonl(path):
            if not isinstance(q, dict) or "question_id" not in q or not isinstance(q.get("turns"), list):
                raise ValueError(f"{path}:{line_no}: a question needs 'question_id' and a 'turns' list")
            questions.append(q)
    except (OSError, ValueError) as e:
        raise SystemExit(f"[hydra] error: {e}") from None
    return questions[begin:end]


def is_error_record(record: dict) -> bool:
    """An answer record with a turn that could not be generated (FastChat's "$ERROR$" marker)."""
    choice = (record.get("choices") or [{}])[0]
    return ERROR_ANSWER in choice.get("turns", []) or "error" in choice.get("finish_reasons", [])


def answered_ids(path: Path) -> set:
    """question_ids answered in an answer file. Error records do not count (a rerun answers them again); a
    torn last line from an interrupted run is dropped."""
    from hydra.data.jsonl import read_resumable

    return {r["question_id"] for r in read_resumable(path) if "question_id" in r and not is_error_record(r)}


def reorg_answer_file(path: Path) -> None:
    """Sort by question_id and keep the last record of each question (as FastChat does); unreadable lines
    (a record torn by an interrupted run) are dropped."""
    from hydra.data.jsonl import read_resumable

    records = {r["question_id"]: r for r in read_resumable(path) if "question_id" in r}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(records[k], ensure_ascii=False) + "\n"
                           for k in sorted(records, key=lambda q: (str(type(q)), q))), encoding="utf-8")
    tmp.replace(path)


def answer_question(model, question: dict, generate, config) -> dict:
    """Both turns of one question, each conditioned on the model's own earlier answers, as a FastChat
    choice."""
    from hydra.inference.conversation import converse

    turns = converse(model, question["turns"], generate, config, error_reply=ERROR_ANSWER,
                     label=f"question {question['question_id']} ")
    return {"index": 0, "turns": [t.reply for t in turns], "new_tokens": [len(t.tokens) for t in turns],
            "wall_time": [t.wall_time for t in turns], "steps": [len(t.accept_lengths) for t in turns],
            "accept_lengths": [t.accept_lengths for t in turns],
            "finish_reasons": [t.finish_reason for t in turns],
            "reused_prompt_tokens": [t.reused_prompt_tokens for t in turns],
            "prompt_tokens": [t.prompt_tokens for t in turns],
            "first_token_time": [t.first_token_time for t in turns]}


def main(method: str, argv: list[str] | None = None) -> int:
    args = build_parser(method).parse_args(argv)
    if args.max_new_token < 1:
        raise SystemExit("--max-new-token must be >= 1")
    questions = load_questions(args.question_file or DEFAULT_QUESTION_FILE, args.question_begin,
                               args.question_end)

    import shortuuid
    import torch
    from tqdm import tqdm

    from hydra.inference.loading import check_decoding, default_heads_folder, load_model
    from hydra.model.generate import DecodeConfig, ar_generate, hydra_generate, lookup_tokens
    from hydra.model.pacing import Pacer
    from hydra.model.trees import tree_spec

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    heads = args.model_path or default_heads_folder()
    model_id = args.model_id or f"{method}-{Path(str(heads)).name if heads else 'base'}" + (
        f"-{args.quant}" if args.quant else "")
    answer_file = Path(args.answer_file) if args.answer_file else DEFAULT_ANSWER_DIR / f"{model_id}.jsonl"
    if answer_file.is_file():
        reorg_answer_file(answer_file)  # drops a torn last line left by an interrupted run before appending
    done = answered_ids(answer_file)
    todo = [q for q in questions if q["question_id"] not in done]
    print(f"{model_id}: {len(questions)} questions, {len(questions) - len(todo)} already in {answer_file}, "
          f"{len(todo)} to answer", flush=True)
    if not todo:
        return 0

    try:
        model, has_heads = load_model(args.model_path, args.base_model, args.dtype, args.device,
                                      heads_required=method == "hydra", quant=args.quant,
                                      compile=args.compile, heads_quant=args.heads_quant)
    except (OSError, ValueError) as e:
        raise SystemExit(f"[hydra] error: {e}") from None
    torch.manual_seed(args.seed)
    kwargs = {}
    if method == "hydra":
        optional = {"tree": args.tree, "sampling": args.sampling,
                    "posterior_threshold": args.posterior_threshold, "posterior_alpha": args.posterior_alpha,
                    "lookup": args.lookup}
        kwargs = ({k: v for k, v in optional.items() if v is not None}
                  | {"pace": Pacer() if args.pace else False})
    config = DecodeConfig(temperature=args.temperature, max_new_tokens=args.max_new_token,
                          seed=args.seed if args.temperature > 0 else None, **kwargs)
    try:  # a bad tree, temperature or sampling rule fails here, before any record is written
        check_decoding(model, config, speculative=method == "hydra")
    except ValueError as e:
        raise SystemExit(f"[hydra] error: {e}") from None
    generate = hydra_generate if method == "hydra" else ar_generate
    device = next(model.parameters()).device
    decoding = {"method": method, "temperature": config.temperature, "max_new_token": config.max_new_tokens,
                "dtype": args.dtype, "quant": args.quant,
                "heads_quant": model.heads.quant if has_heads else None,
                "compile": args.compile, "device": str(device), "threads": torch.get_num_threads(),
                "heads": str(args.model_path) if args.model_path else ("default" if has_heads else None),
                "base_model": args.base_model or model.config.base_model_name_or_path}
    if method == "hydra":
        decoding.update(tree=tree_spec(config.tree, model.config), lookup=lookup_tokens(model, config),
                        sampling=config.sampling, pace=config.pace is not False,
                        posterior_threshold=config.posterior_threshold,
                        posterior_alpha=config.posterior_alpha)

    warm = dict(todo[0], turns=todo[0]["turns"][:1])
    for _ in tqdm(range(args.warmup), desc="warmup", disable=args.warmup == 0):
        answer_question(model, warm, generate, config)

    answer_file.parent.mkdir(parents=True, exist_ok=True)
    with answer_file.open("a", encoding="utf-8") as f:
        for q in tqdm(todo, desc=model_id, unit="question"):
            record = {"question_id": q["question_id"], "answer_id": shortuuid.uuid(), "model_id": model_id,
                      "choices": [answer_question(model, q, generate, config)], "tstamp": time.time(),
                      "decoding": decoding}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    reorg_answer_file(answer_file)
    print(f"wrote {answer_file}", flush=True)
    return 0
