"""Where a speculative decoding step spends its time: draft proposal, verification forward, output layer over
the tree, head context update (incl. the Hydra++ prefix layer), and everything else (acceptance, KV
compaction, Python), compared with one plain autoregressive step, on the same prompts in the same process.

    python scripts/profile_step.py                          # shipped heads, bf16, 8 prompts x 64 tokens
    python scripts/profile_step.py --heads runs/hydra --tree tree_32 --dtype float32 --threads 1

Each phase is timed around its call with time.perf_counter (CPU calls are synchronous); the prefill is left
out.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

import torch

from hydra.model import generate as gen_mod
from hydra.model.generate import DecodeConfig, generate
from hydra.inference.loading import load_model


class PhaseTimer:
    """Seconds per phase; the first call of each phase in a generation (the prefill) is not counted."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.skip: set[str] = set()
        self.prefill = 0.0  # seconds spent in the skipped (prefill) calls

    def new_generation(self, phases: list[str]) -> None:
        self.skip = set(phases)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            if name in self.skip:
                self.skip.discard(name)
                self.prefill += time.perf_counter() - start
            else:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1
            return result
        return timed


def main() -> None:
    from bench_decode import QUESTIONS, load_prompts  # the benchmark's prompts (scripts/ is on sys.path)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=os.path.expanduser,
                    default=None, help="heads folder / Hub id (default: the shipped heads)")
    ap.add_argument("--base-model", type=os.path.expanduser, default=None)
    ap.add_argument("--tree", type=os.path.expanduser,
                    default=None, help="default: the tree named in the heads' config")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model(args.heads, args.base_model, dtype=args.dtype, device="cpu", heads_required=True)
    prompts = load_prompts(model.tokenizer, QUESTIONS, args.num_prompts)
    config = DecodeConfig(max_new_tokens=args.max_new_tokens, tree=args.tree)

    # Plain decoding: the decoder forward per step, prefill excluded.
    decoder_forward = model.decoder.forward
    generate(model, prompts[0][:32], DecodeConfig(max_new_tokens=4), speculative=False)  # warm-up
    timer = PhaseTimer()
    model.decoder.forward = timer.wrap("decoder", decoder_forward)
    ar_tokens, ar_start = 0, time.perf_counter()
    try:
        for ids in prompts:
            timer.new_generation(["decoder"])
            ar_tokens += len(generate(model, ids, config, speculative=False).tokens)
    finally:
        model.decoder.forward = decoder_forward
    ar_total = time.perf_counter() - ar_start
    ar_decoder_ms = 1e3 * timer.seconds["decoder"] / max(timer.calls["decoder"], 1)

    # Speculative decoding, phase by phase.
    timer = PhaseTimer()
    lm_forward, context = model.lm_head.forward, model.heads.context
    propose = gen_mod._propose
    model.decoder.forward = timer.wrap("verify forward (decoder)", decoder_forward)
    model.lm_head.forward = timer.wrap("output layer over the tree", lm_forward)
    model.heads.context = timer.wrap("head context (+ prefix layer)", context)
    gen_mod._propose = timer.wrap("draft proposal (heads)", propose)
    phases = ["verify forward (decoder)", "output layer over the tree", "head context (+ prefix layer)"]
    tokens = steps = decided = 0
    start = time.perf_counter()
    try:
        for ids in prompts:
            timer.new_generation(phases)
            res = generate(model, ids, config, speculative=True)
            tokens += len(res.tokens)
            steps += res.steps - 1
            decided += sum(res.accept_lengths[1:])
    finally:
        gen_mod._propose = propose
        model.decoder.forward, model.lm_head.forward = decoder_forward, lm_forward
        model.heads.context = context
    total = time.perf_counter() - start - timer.prefill  # prefill left out of the per-step figures
    timed = sum(timer.seconds.values())

    tree = config.tree or model.config.tree
    print(f"heads {args.heads or 'shipped default'} | tree {tree} | {args.dtype} | threads "
          f"{torch.get_num_threads()} | {len(prompts)} prompts x {args.max_new_tokens} new tokens")
    spec_speed = tokens / (total + timer.prefill)
    print(f"AR: {ar_tokens / ar_total:.1f} tok/s (prefill included), "
          f"{ar_decoder_ms:.1f} ms per one-token forward")
    print(f"speculative: {spec_speed:.1f} tok/s ({spec_speed / (ar_tokens / ar_total):.2f}x), "
          f"tau {decided / max(steps, 1):.2f}, {steps} verification steps")
    print("| phase | ms per step | share |")
    print("|---|---:|---:|")
    per_step = {name: 1e3 * s / max(steps, 1) for name, s in timer.seconds.items()}
    step_ms = 1e3 * total / max(steps, 1)
    rest = 1e3 * (total - timed) / max(steps, 1)  # acceptance, KV compaction, masks, emitting, Python
    for name, ms in list(per_step.items()) + [("everything else (acceptance, cache, Python)", rest)]:
        print(f"| {name} | {ms:.1f} | {ms / step_ms:.0%} |")
    print(f"| **step total** | {step_ms:.1f} | 100% |")
    verify_ms = per_step.get("verify forward (decoder)", 0.0)
    print(f"verify step / AR decoder forward: {verify_ms / ar_decoder_ms:.2f}x")


if __name__ == "__main__":
    main()
