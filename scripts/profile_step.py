"""Where a speculative decoding step spends its time: draft proposal, verification forward, output layer over
the tree, head context update (incl. the Hydra++ prefix layer), and everything else (acceptance, KV
compaction, Python), compared with one plain autoregressive step, on the same prompts in the same process.

    python scripts/profile_step.py                          # shipped heads, bf16, 8 prompts x 64 tokens
    python scripts/profile_step.py --heads runs/hydra --tree tree_32 --dtype float32 --threads 1
    python scripts/profile_step.py --threads 1 --costs      # verify cost vs tree size, head call vs rows
    python scripts/profile_step.py --quant int4            # the same on the 4-bit base
    python scripts/profile_step.py --quant int4 --compile  # ... with the base decoder compiled
    python scripts/profile_step.py --quant int4 --heads-quant none   # ... with float heads

`--costs` times the pieces a dynamic tree's size rule trades off, interleaved in random order on one
400-token context: a verification forward (decoder + output layer) over T = 1..24 tokens, one head call
(head + draft projection + log-softmax + top-k) over R rows, and the head context update; it prints each
relative to a one-token verification, the numbers `hydra.model.trees.StepCosts` holds
(its defaults, and `INT4_STEP_COSTS` for the int4 base).

Each phase is timed around its call with time.perf_counter (CPU calls are synchronous); the prefill is left
out.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

import torch

from hydra.choices import HEADS_QUANT_CHOICES, QUANT_CHOICES
from hydra.inference.loading import load_model
from hydra.model import generate as gen_mod
from hydra.model.compiled import compile_decoder, warm_up
from hydra.model.generate import DecodeConfig, generate
from hydra.model.trees import tree_spec


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


def measure_costs(model, prompt: list[int], reps: int) -> None:
    """Median ms of the pieces of a step, interleaved; see the module docstring."""
    import random
    import statistics

    from hydra.model.attention import takes_bool_mask
    from hydra.model.families import chain_attention_mask
    from hydra.model.generate import new_kv_cache
    from hydra.model.hydra_model import exported_decoder, reads_all_hidden_states

    device = next(model.parameters()).device
    ids = torch.tensor(prompt, device=device)
    n = ids.numel()
    cache = new_kv_cache(model, n + 64)  # as decoding allocates it (static sizes on a compiled CPU decoder)
    d_model = model.config.hidden_size
    decoder = exported_decoder(model) or model.decoder  # what decoding calls
    base = model.base_model
    as_bool = takes_bool_mask(base.config)
    with torch.inference_mode():
        out = decoder(input_ids=ids[None], position_ids=torch.arange(n, device=device)[None],
                      past_key_values=cache, use_cache=True,
                      output_hidden_states=reads_all_hidden_states(model.config))
        heads_in = model.heads_input(out)[:, -1:]  # what the heads read at the last position
        ctx = (heads_in if model.heads.fuse is None else model.heads.fuse(heads_in))[0, -1]  # d wide

        def verify(t: int) -> None:  # a plain step (t = 1) runs without a mask, as in decoding
            mask = chain_attention_mask(t, n, base.dtype, as_bool, base.config, device) if t > 1 else None
            out = decoder(input_ids=ids[None, -t:], position_ids=torch.arange(n, n + t, device=device)[None],
                          past_key_values=cache, use_cache=True, attention_mask=mask)
            model.lm_head(out.last_hidden_state[0])
            cache.crop(-t)  # back to the n prompt tokens

        def head(rows: int) -> None:
            x = torch.cat([ctx, model.embed_tokens(ids[-1:])[0]])[None].expand(rows, -1)
            hid = model.heads.head_hidden(0, x[:, :d_model], x[:, d_model:]) if model.heads.grounded \
                else model.heads.head_hidden(0, ctx[None])
            model.heads.draft_topk_logprobs(0, hid, model.lm_head, 4)

        def context() -> None:
            if model.heads.prefix is not None:
                cache_p = model.heads.prefix.new_cache()
                next_embeds = model.embed_tokens(ids[None, -1:])  # read only by a prefix that reads x_{t+1}
                position = torch.tensor([[n - 1]], device=device)
                model.heads.context(heads_in, position, cache_p, next_embeds)

        jobs = [(f"verify T={t}", lambda t=t: verify(t)) for t in (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24)]
        jobs += [(f"head call R={r}", lambda r=r: head(r)) for r in (1, 4, 8, 16)]
        jobs += [("context update", context)]
        times: dict[str, list[float]] = defaultdict(list)
        for _name, fn in jobs:
            fn()  # warm-up
        for _ in range(reps):
            random.shuffle(jobs)
            for name, fn in jobs:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["verify T=1"])
    print(f"context {n} tokens, {reps} reps, threads {torch.get_num_threads()}")
    print("| piece | median ms | / verify T=1 |")
    print("|---|---:|---:|")
    for name, _ in sorted(jobs, key=lambda j: (j[0].split()[0],
                                               int(j[0].split("=")[-1]) if "=" in j[0] else 0)):
        ms = statistics.median(times[name])
        print(f"| {name} | {1e3 * ms:.1f} | {ms / base:.3f} |")


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
    ap.add_argument("--quant", choices=QUANT_CHOICES, default=None,
                    help="quantized base (README: 4-bit base)")
    ap.add_argument("--heads-quant", choices=HEADS_QUANT_CHOICES, default="auto",
                    help="the heads' weights (auto: the base's kind, else float)")
    ap.add_argument("--compile", action="store_true", help="compile the base decoder (hydra.model.compiled)")
    ap.add_argument("--costs", action="store_true", help="time verification vs tree size and head calls")
    ap.add_argument("--reps", type=int, default=20, help="repetitions per piece with --costs")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model(args.heads, args.base_model, dtype=args.dtype, device="cpu", heads_required=True,
                          quant=args.quant, heads_quant=args.heads_quant)
    if args.compile:
        compile_decoder(model)
    prompts = load_prompts(model.tokenizer, QUESTIONS, args.num_prompts)
    if args.costs:
        long_prompt = [t for ids in prompts for t in ids][:400]
        return measure_costs(model, long_prompt, args.reps)
    config = DecodeConfig(max_new_tokens=args.max_new_tokens, tree=args.tree)

    # Plain decoding: the decoder forward per step, prefill excluded. The timers wrap generate's `_forward`
    # (the decoder call), not the decoder module, which may be compiled.
    decoder_forward = gen_mod._forward
    warm_up(model, config, speculative=True)
    timer = PhaseTimer()
    gen_mod._forward = timer.wrap("decoder", decoder_forward)
    ar_tokens, ar_start = 0, time.perf_counter()
    try:
        for ids in prompts:
            timer.new_generation(["decoder"])
            ar_tokens += len(generate(model, ids, config, speculative=False).tokens)
    finally:
        gen_mod._forward = decoder_forward
    ar_total = time.perf_counter() - ar_start
    ar_decoder_ms = 1e3 * timer.seconds["decoder"] / max(timer.calls["decoder"], 1)

    # Speculative decoding, phase by phase.
    timer = PhaseTimer()
    lm_forward, context = model.lm_head.forward, model.heads.context
    propose, propose_dynamic = gen_mod._propose, gen_mod._propose_dynamic
    gen_mod._forward = timer.wrap("verify forward (decoder)", decoder_forward)
    model.lm_head.forward = timer.wrap("output layer over the tree", lm_forward)
    model.heads.context = timer.wrap("head context (+ prefix layer)", context)
    gen_mod._propose = timer.wrap("draft proposal (heads)", propose)
    gen_mod._propose_dynamic = timer.wrap("draft proposal (heads)", propose_dynamic)
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
        gen_mod._propose, gen_mod._propose_dynamic = propose, propose_dynamic
        gen_mod._forward, model.lm_head.forward = decoder_forward, lm_forward
        model.heads.context = context
    total = time.perf_counter() - start - timer.prefill  # prefill left out of the per-step figures
    timed = sum(timer.seconds.values())

    tree = tree_spec(config.tree, model.config)
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
