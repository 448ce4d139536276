"""Self-distillation throughput (new tokens/s): HF `generate` against hydra.data.self_distill's own loop, on
the same training prompts, interleaved group by group in one process so the ratio holds on a busy machine.

    python scripts/bench_distill.py                                  # 64 prompts, batch 32, sampled, fp32
    python scripts/bench_distill.py --batch-sizes 32 64 --num-prompts 128 --temperature 0
    python scripts/bench_distill.py --top-p-candidates 0 64 --dtype bfloat16  # the top-p rule's cost

`generate` keeps finished rows in the batch until its longest reply ends and grows a DynamicCache by
concatenation; the loop (`generate_replies`) drops finished rows and writes into the position-indexed cache
and applies top-p to the most likely tokens only (`sample_top_p`; --top-p-candidates 0: the warper's sort of
the whole vocabulary, as `generate` does).
Both answer first turns only, rendered as self_distill renders them. Results are in the README ("Training
data").
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hydra.data.self_distill import (  # noqa: E402
    TOP_P_CANDIDATES,
    generate_replies,
    read_prompts,
    reply_config,
)
from hydra.data.sharegpt import needs_special_tokens, render_chat  # noqa: E402
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


def loop_tokens(model, tokenizer, texts, generation_config, stop_ids, candidates: int) -> int:
    return sum(n for _, _, n in generate_replies(model, tokenizer, texts, generation_config, stop_ids,
                                                 candidates))


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
    a = p.parse_args(argv)
    if min(a.top_p_candidates) < 0:
        p.error("--top-p-candidates: 0 or more")
    a.top_p_candidates = list(dict.fromkeys(a.top_p_candidates))  # each run once
    torch.set_num_threads(a.threads)

    model, tokenizer = load_base_model(a.base_model, dtype=a.dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    stop_ids = eos_token_ids(model, tokenizer)
    prompts = read_prompts(a.prompts, a.skip + a.num_prompts, a.seed)[a.skip:]
    texts = [render_chat([{"role": "user", "content": q["turns"][0]}], tokenizer, None,
                         add_generation_prompt=True) for q in prompts]
    texts.sort(key=lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"]))  # as self_distill does
    config = reply_config(a.max_new_tokens, a.temperature, a.top_p, stop_ids, tokenizer.pad_token_id)
    sampling = config.do_sample
    loops = [(f"loop candidates {c}" if len(a.top_p_candidates) > 1 else "loop",
              partial(loop_tokens, candidates=c)) for c in a.top_p_candidates]
    runs = {f"{name} batch {b}": (fn, b) for b in a.batch_sizes
            for name, fn in (("generate", hf_generate_tokens), *loops)}
    tokens, seconds = dict.fromkeys(runs, 0), dict.fromkeys(runs, 0.0)
    group = math.lcm(*a.batch_sizes)  # whole batches of every size
    for start in range(0, len(texts), group):  # every configuration answers the same group in turn
        for name, (fn, batch_size) in runs.items():
            torch.manual_seed(a.seed + start)
            t = time.perf_counter()
            end = min(start + group, len(texts))
            for b in range(start, end, batch_size):
                tokens[name] += fn(model, tokenizer, texts[b:min(b + batch_size, end)], config, stop_ids)
            seconds[name] += time.perf_counter() - t
        print(f"[bench_distill] {min(start + group, len(texts))}/{len(texts)} prompts", flush=True)
    base = next(iter(runs))
    print(f"{len(texts)} prompts, {a.dtype}, {a.threads} threads, max {a.max_new_tokens} new tokens, "
          f"{'temperature ' + str(a.temperature) + ' top-p ' + str(a.top_p) if sampling else 'greedy'}")
    for name in runs:
        rate = tokens[name] / seconds[name]
        print(f"{name:>18}: {tokens[name]:6d} new tokens in {seconds[name]:6.0f} s = {rate:6.1f} tok/s "
              f"({rate / (tokens[base] / seconds[base]):.2f}x)")


if __name__ == "__main__":
    main()
