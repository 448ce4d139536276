"""Self-distillation throughput (new tokens/s): HF `generate` against hydra.data.self_distill's own loop, on
the same training prompts, interleaved group by group in one process so the ratio holds on a busy machine.

    python scripts/bench_distill.py                                  # 64 prompts, batch 32, sampled, fp32
    python scripts/bench_distill.py --batch-sizes 32 64 --num-prompts 128 --temperature 0
    python scripts/bench_distill.py --top-p-candidates 0 64 --dtype bfloat16  # the top-p rule's cost
    python scripts/bench_distill.py --refill-below 1 32 --num-prompts 256 --group 128 --dtype bfloat16 \
        --no-generate                                  # continuous batching against batch after batch

`generate` keeps finished rows in the batch until its longest reply ends and grows a DynamicCache by
concatenation; the loop (`stream_replies`) writes into the position-indexed cache, applies top-p to the
most likely tokens only (`sample_top_p`; --top-p-candidates 0: the warper's sort of the whole vocabulary, as
`generate` does) and admits the next prompts when fewer than --refill-below rows are left (1: batch after
batch, dropping finished rows as they end). Every configuration answers the same --group of prompts in turn
(the loop streams through the group; `generate` takes it batch by batch), first turns only, rendered as
self_distill renders them. The loop drains its batch at the end of every group, which a self_distill run does
only once, so a small --group understates continuous batching. Results are in the README ("Training data").
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import deque
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hydra.data.self_distill import (  # noqa: E402
    TOP_P_CANDIDATES,
    length_sorted,
    read_prompts,
    rendered_contexts,
    reply_config,
    stream_replies,
)
from hydra.data.sharegpt import needs_special_tokens  # noqa: E402
from hydra.model.base_model import eos_token_ids, load_base_model  # noqa: E402


@torch.inference_mode()
def hf_generate_tokens(model, tokenizer, texts, generation_config, stop_ids) -> int:
    """New tokens HF `generate` gives the batch, up to and including each row's stop token."""
    batch = tokenizer(list(texts), padding=True, padding_side="left", return_tensors="pt",
                      add_special_tokens=needs_special_tokens(texts[0], tokenizer)).to(model.device)
    new = model.generate(**batch, generation_config=generation_config)[:, batch["input_ids"].shape[1]:].cpu()
    total = 0
    for row in new:
        stops = torch.isin(row, torch.tensor(list(stop_ids))).nonzero()
        total += int(stops[0, 0]) + 1 if len(stops) else len(row)
    return total


def hf_generate_group(model, tokenizer, texts, generation_config, stop_ids, batch_size: int) -> int:
    return sum(hf_generate_tokens(model, tokenizer, texts[b:b + batch_size], generation_config, stop_ids)
               for b in range(0, len(texts), batch_size))


def loop_tokens(model, tokenizer, texts, generation_config, stop_ids, batch_size: int, candidates: int,
                refill_below: int) -> int:
    return sum(n for *_, n in stream_replies(model, tokenizer, deque(enumerate(texts)), generation_config,
                                             stop_ids, batch_size, refill_below, candidates))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=os.path.expanduser,
                   default=str(REPO / "data" / "train_prompts.jsonl.gz"))
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--skip", type=int, default=1000, help="start this far into the seeded prompt order")
    p.add_argument("--seed", type=int, default=7, help="prompt order and sampling seed")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32])
    p.add_argument("--max-new-tokens", type=int, default=320)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--dtype", default="float32", choices=("bfloat16", "float32"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--base-model", type=os.path.expanduser, default=None)
    p.add_argument("--top-p-candidates", type=int, nargs="+", default=[TOP_P_CANDIDATES],
                   help="a loop run for each: top-p over this many most likely tokens (0: the warper)")
    p.add_argument("--refill-below", type=int, nargs="+", default=[1],
                   help="a loop run for each: admit prompts when fewer rows are left (1: batch after batch)")
    p.add_argument("--group", type=int, default=None,
                   help="prompts each configuration answers in turn (default 4 batches of every size)")
    p.add_argument("--no-generate", action="store_true", help="time the loop only")
    a = p.parse_args(argv)
    if min(a.top_p_candidates) < 0:
        p.error("--top-p-candidates: 0 or more")
    if min(a.refill_below) < 1 or min(a.batch_sizes) < 1 or (a.group or 1) < 1:
        p.error("--batch-sizes, --refill-below and --group: 1 or more")
    a.top_p_candidates = list(dict.fromkeys(a.top_p_candidates))  # each run once
    a.refill_below = list(dict.fromkeys(a.refill_below))
    torch.set_num_threads(a.threads)

    model, tokenizer = load_base_model(a.base_model, dtype=a.dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    stop_ids = eos_token_ids(model, tokenizer)
    prompts = read_prompts(a.prompts, a.skip + a.num_prompts, a.seed)[a.skip:]
    rendered = rendered_contexts([[{"role": "user", "content": q["turns"][0]}] for q in prompts],
                                 tokenizer, None)
    texts = length_sorted([text for text, _ in rendered], [n for _, n in rendered],
                          16 * max(a.batch_sizes))  # as self_distill orders them
    config = reply_config(a.max_new_tokens, a.temperature, a.top_p, stop_ids, tokenizer.pad_token_id)
    sampling = config.do_sample
    runs = {}
    for b in a.batch_sizes:
        if not a.no_generate:
            runs[f"generate batch {b}"] = partial(hf_generate_group, batch_size=b)
        for c in a.top_p_candidates:
            used = (min(b, r) for r in a.refill_below)
            for r in dict.fromkeys(used):  # clamped to the batch size, as stream_replies does
                name = "loop" + (f" candidates {c}" if len(a.top_p_candidates) > 1 else "") \
                    + (f" refill below {r}" if len(a.refill_below) > 1 else "")
                runs[f"{name} batch {b}"] = partial(loop_tokens, batch_size=b, candidates=c, refill_below=r)
    tokens, seconds = dict.fromkeys(runs, 0), dict.fromkeys(runs, 0.0)
    group = a.group or 4 * math.lcm(*a.batch_sizes)  # whole batches of every size
    for start in range(0, len(texts), group):  # every configuration answers the same group in turn
        for name, fn in runs.items():
            torch.manual_seed(a.seed + start)
            t = time.perf_counter()
            tokens[name] += fn(model, tokenizer, texts[start:start + group], config, stop_ids)
            seconds[name] += time.perf_counter() - t
        print(f"[bench_distill] {min(start + group, len(texts))}/{len(texts)} prompts", flush=True)
    base = next(iter(runs))
    print(f"{len(texts)} prompts, {a.dtype}, {a.threads} threads, max {a.max_new_tokens} new tokens, "
          f"{'temperature ' + str(a.temperature) + ' top-p ' + str(a.top_p) if sampling else 'greedy'}")
    for name in runs:
        rate = tokens[name] / seconds[name]
        print(f"{name:>36}: {tokens[name]:6d} new tokens in {seconds[name]:6.0f} s = {rate:6.1f} tok/s "
              f"({rate / (tokens[base] / seconds[base]):.2f}x)")


if __name__ == "__main__":
    main()
