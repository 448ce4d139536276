r"""Replay prompt lookup along replies the base model already wrote: how many tokens it would draft and how
many the replies confirm, for several n-gram sizes and branch lengths, without running a model.

    python scripts/lookup_replay.py \
        --answers llm_judge/data/mt_bench/model_answer/smollm2-v4-ar-bfloat16.jsonl
    python scripts/lookup_replay.py --chats data/self_distill_smollm2_more.jsonl.gz --num-chats 400

--answers takes an MT-Bench answer file of plain greedy decoding (its questions from --question-file), every
turn in the conversation it was written in; --chats takes ShareGPT-format chats whose last reply is the base
model's own (self-distilled), the earlier turns as the prompt. Each reply is walked as decoding would: at
every step the lookup drafts from the prompt and the reply so far, the reply's next tokens confirm a prefix of
the draft, and the step moves past them and one more token (the bonus). tau here counts only the lookup
(no heads): tokens per step, bonus included. The replies must be greedy outputs of the model being sped up.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
from itertools import islice
from pathlib import Path

from hydra.model.base_model import load_tokenizer
from hydra.model.lookup import PromptLookup

QUESTIONS = Path(__file__).resolve().parent.parent / "llm_judge" / "data" / "mt_bench" / "question.jsonl"


def answer_turns(tokenizer, answers: Path, questions: Path):
    """(prompt ids, reply ids) for every turn of every answer, in the conversation it was answered in."""
    by_id = {}
    for line in questions.open(encoding="utf-8"):
        q = json.loads(line)
        by_id[q["question_id"]] = q
    for line in answers.open(encoding="utf-8"):
        a = json.loads(line)
        messages = []
        for turn, reply in zip(by_id[a["question_id"]]["turns"], a["choices"][0]["turns"], strict=True):
            messages.append({"role": "user", "content": turn})
            yield encode(tokenizer, messages, reply)
            messages.append({"role": "assistant", "content": reply})


def chat_turns(tokenizer, chats: Path, limit: int):
    """(prompt ids, reply ids) for the last reply of each chat."""
    opener = gzip.open if chats.suffix == ".gz" else open
    with opener(chats, "rt", encoding="utf-8") as f:
        for line in islice(f, limit):
            turns = json.loads(line)["conversations"]
            messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                        for t in turns]
            yield encode(tokenizer, messages[:-1], messages[-1]["content"])


def encode(tokenizer, messages: list[dict], reply: str) -> tuple[list[int], list[int]]:
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return (tokenizer(prompt, add_special_tokens=False)["input_ids"],
            tokenizer(reply, add_special_tokens=False)["input_ids"])


def replay(turns, max_tokens: int, min_ngram: int, max_ngram: int) -> tuple[float, float, float]:
    """(tau, drafted tokens per step, share of drafted tokens confirmed)."""
    steps = decided = drafted = 0
    for prompt, reply in turns:
        lookup = PromptLookup(max_tokens, min_ngram, max_ngram)
        lookup.extend(prompt + reply[:1])  # the prefill decides the first reply token
        i = 1
        while i < len(reply):
            draft = lookup.draft()
            m = 0
            while m < len(draft) and i + m < len(reply) and draft[m] == reply[i + m]:
                m += 1
            lookup.extend(reply[i: i + m + 1])
            steps, decided, drafted = steps + 1, decided + m + 1, drafted + len(draft)
            i += m + 1
    return decided / steps, drafted / steps, (decided - steps) / max(drafted, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--answers", type=os.path.expanduser)
    source.add_argument("--chats", type=os.path.expanduser)
    ap.add_argument("--question-file", type=os.path.expanduser, default=str(QUESTIONS))
    ap.add_argument("--num-chats", type=int, default=400)
    ap.add_argument("--base-model", type=os.path.expanduser, default=None,
                    help="whose tokenizer (default: the default model)")
    ap.add_argument("--ngrams", nargs="*", default=["1-3", "2-3", "3-4"], help="min-max n-gram sizes tried")
    ap.add_argument("--tokens", nargs="*", type=int, default=[4, 8, 16], help="branch lengths")
    args = ap.parse_args()
    tokenizer = load_tokenizer(args.base_model)
    turns = list(answer_turns(tokenizer, Path(args.answers), Path(args.question_file)) if args.answers
                 else chat_turns(tokenizer, Path(args.chats), args.num_chats))
    print(f"# {len(turns)} replies, {sum(len(r) for _, r in turns)} tokens")
    print("| n-grams | tokens | tau (lookup alone) | drafted per step | drafted and confirmed |")
    print("|---|---:|---:|---:|---:|")
    for sizes in args.ngrams:
        low, high = (int(x) for x in sizes.split("-"))
        for max_tokens in args.tokens:
            tau, per_step, confirmed = replay(turns, max_tokens, low, high)
            print(f"| {sizes} | {max_tokens} | {tau:.2f} | {per_step:.2f} | {confirmed:.2f} |", flush=True)


if __name__ == "__main__":
    main()
