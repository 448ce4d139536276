"""Time multi-turn chats with and without a prompt cache (hydra.model.prompt_cache), in one process.

    python scripts/bench_chat.py --num-questions 16 --max-new-tokens 128 --threads 2  # MT-Bench, both turns
    python scripts/bench_chat.py --chain 8 --max-new-tokens 128 --threads 2          # 8 questions, one chat
    python scripts/bench_chat.py --dtype float32 --no-pace --max-new-tokens 64       # identical replies

Four arms: plain decoding (AR) and the heads' decoding (paced unless --no-pace, the engine's tree and prompt
lookup), each with a `PromptCache` kept across a conversation's turns and without one. A conversation is an
MT-Bench question's turns, or with --chain N the first turns of N questions asked one after another. Each
arm answers every conversation with its own replies; the arms take turns conversation by conversation
(rotating who goes first). Printed per arm: the prefill time of the later turns (to their first token), the
whole time, tokens/s, prompt tokens and how many of them the cache reused; then, per pair of arms, how many
later turns have identical replies (in fp32 all of them; in bf16 the reused rows round differently).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hydra.choices import QUANT_CHOICES
from hydra.inference.conversation import converse
from hydra.inference.loading import load_model
from hydra.model.compiled import warm_up
from hydra.model.generate import DecodeConfig, ar_generate, hydra_generate
from hydra.model.pacing import Pacer

QUESTIONS = Path(__file__).resolve().parent.parent / "llm_judge" / "data" / "mt_bench" / "question.jsonl"


@dataclass
class Arm:
    name: str
    speculative: bool
    cached: bool
    pacer: Pacer | bool
    prefill_later: float = 0.0  # seconds to the first token, turns after the first
    seconds: float = 0.0
    tokens: int = 0
    prompt_later: int = 0  # prompt tokens of the turns after the first
    reused: int = 0
    replies: list[list[list[int]]] = field(default_factory=list)  # per conversation, per turn

    def converse(self, model, turns: list[str], max_new_tokens: int) -> None:
        config = DecodeConfig(max_new_tokens=max_new_tokens, pace=self.pacer)
        done = converse(model, turns, hydra_generate if self.speculative else ar_generate, config,
                        self.cached)
        for t in done:
            self.seconds += t.wall_time
            self.tokens += len(t.tokens)
        for t in done[1:]:
            self.prefill_later += t.first_token_time
            self.prompt_later += t.prompt_tokens
            self.reused += t.reused_prompt_tokens
        self.replies.append([t.tokens for t in done])


def conversations(path: Path, num_questions: int, chain: int | None) -> list[list[str]]:
    questions = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if chain:
        return [[q["turns"][0] for q in questions[:chain]]]
    return [q["turns"] for q in questions[:num_questions]]


def same_later_turns(a: Arm, b: Arm) -> tuple[int, int]:
    pairs = [(x, y) for ra, rb in zip(a.replies, b.replies, strict=True)
             for x, y in zip(ra[1:], rb[1:], strict=True)]
    return sum(x == y for x, y in pairs), len(pairs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=os.path.expanduser, default=None, help="heads folder (the shipped heads)")
    ap.add_argument("--base-model", type=os.path.expanduser, default=None)
    ap.add_argument("--question-file", type=os.path.expanduser, default=QUESTIONS)
    ap.add_argument("--num-questions", type=int, default=16)
    ap.add_argument("--chain", type=int, default=None,
                    help="ask the first turns of this many questions as one chat")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--quant", choices=QUANT_CHOICES, default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--no-pace", action="store_true", help="run the heads on every step")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, has_heads = load_model(args.model, args.base_model, args.dtype, "cpu", quant=args.quant,
                                  compile=args.compile)
    chats = conversations(Path(args.question_file), args.num_questions, args.chain)
    arms = [Arm("AR + cache", False, True, False), Arm("AR", False, False, False)]
    if has_heads:
        arms += [Arm(f"Hydra{suffix}", True, cached, False if args.no_pace else Pacer())
                 for suffix, cached in ((" + cache", True), ("", False))]
    if args.compile:
        warm_up(model, DecodeConfig(), speculative=has_heads)
    for _ in ar_generate(model, list(range(8)), DecodeConfig(max_new_tokens=4)):  # first-call costs
        pass
    for i, turns in enumerate(chats):
        for arm in arms[i % len(arms):] + arms[:i % len(arms)]:
            arm.converse(model, turns, args.max_new_tokens)
    print(f"# {len(chats)} conversation(s), {sum(map(len, chats))} turns, {args.max_new_tokens} new tokens "
          f"per turn, {args.dtype}, {torch.get_num_threads()} threads")
    print("| arm | later turns' prefill s | whole s | tokens | tok/s | later prompt tokens | reused |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for arm in arms:
        print(f"| {arm.name} | {arm.prefill_later:.2f} | {arm.seconds:.1f} | {arm.tokens} | "
              f"{arm.tokens / max(arm.seconds, 1e-9):.1f} | {arm.prompt_later} | {arm.reused} |")
    for a, b in zip(arms[::2], arms[1::2], strict=True):
        same, pairs = same_later_turns(a, b)
        print(f"{a.name} vs {b.name}: later turns identical {same}/{pairs}, their prefill "
              f"{b.prefill_later / max(a.prefill_later, 1e-9):.2f}x faster, tok/s "
              f"{a.tokens / a.seconds:.1f} vs {b.tokens / b.seconds:.1f}")
    if has_heads:
        same, pairs = same_later_turns(arms[2], arms[1])
        print(f"{arms[2].name} vs {arms[1].name}: later turns identical {same}/{pairs}")


if __name__ == "__main__":
    main()
