r"""Decoding benchmark: plain autoregressive vs speculative decoding with each head set / tree, in one
process.

    python scripts/bench_decode.py --num-prompts 8 --max-new-tokens 128      # random heads, all archs
    python scripts/bench_decode.py --heads hydra/heads/default runs/medusa --trees mc_sim_7b_63 tree_32
    python scripts/bench_decode.py --dtypes float32 --check-equal            # losslessness count
    python scripts/bench_decode.py --heads hydra/heads/default --hf \
        --dtypes bfloat16                                        # + transformers' generate
    python scripts/bench_decode.py --heads hydra/heads/default --dtypes bfloat16 --quant none int4 --hf \
        --llama-cpp <the GGUF file>                              # 4-bit base, HF generate and llama.cpp,
                                                                 # interleaved
    python scripts/bench_decode.py --heads hydra/heads/default --dtypes bfloat16 --quant none int4 \
        --compile off on
    python scripts/bench_decode.py --heads hydra/heads/default --dtypes bfloat16 --quant int4 \
        --compile torch.compile on                               # the two ways of compiling, interleaved
    python scripts/bench_decode.py --heads hydra/heads/default --dtypes bfloat16 --pace off on \
        --question-file data/translation_eval/question.jsonl     # heads resting where they do not pay

Prompts are the first turns of llm_judge/data/mt_bench/question.jsonl (chat template applied; --question-file
takes any file in that format, e.g. data/sharegpt_eval/question.jsonl for choosing a tree without
looking at MT-Bench). For every configuration it prints tokens/s, tau (mean tokens decided per base-model
forward, bonus token included; AR = 1) and speedup over AR. With --hf it also times transformers' `generate`
(plain greedy, and prompt-lookup decoding) and adds a column relative to it (the first base model's), the
baseline that peers are usually quoted against. --quant runs each dtype on int4/int8 base weights too
(hydra.model.quant); --compile off on runs each base eager and with its decoder compiled
(hydra.model.compiled: on a CPU exported ahead of time, or with torch.compile for --compile torch.compile;
compilation happens in the untimed warm-up); --heads-quant none int8 runs each head set
with float and with int8 weights (default auto: the base's own kind); --pace off on runs every tree with
the heads on every step and paced (hydra.model.pacing; tau then counts the plain steps too); --lookup 0 8 runs
every tree without and with a prompt-lookup branch of up to 8 tokens (hydra.model.lookup; the default is the
engine's: 8, or 3 on an int4 base); --llama-cpp adds llama.cpp's own greedy decoding of a GGUF file.

Timing on a shared machine drifts, so the configurations are interleaved: each prompt runs through every
configuration before the next prompt, in an order rotated per prompt, and each configuration's time is the sum
of its own runs. A slow minute then slows all configurations alike. Still, compare ratios from one run, not
absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hydra.choices import HEADS_QUANT_CHOICES, QUANT_CHOICES
from hydra.model import HydraConfig, HydraModel, load_base_model
from hydra.model.attention import GROUPED_SDPA
from hydra.model.compiled import compile_decoder
from hydra.model.generate import DecodeConfig, generate, lookup_tokens, stop_token_ids
from hydra.model.pacing import Pacer

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = REPO / "llm_judge" / "data" / "mt_bench" / "question.jsonl"


def load_prompts(tokenizer, path: Path, n: int) -> list[list[int]]:
    questions = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:n]
    return [tokenizer.apply_chat_template([{"role": "user", "content": q["turns"][0]}],
                                          add_generation_prompt=True, tokenize=True, return_dict=False)
            for q in questions]


@dataclass
class Tally:
    """One configuration's totals over the prompts."""
    name: str
    tree: str
    decode: Callable[[list[int]], tuple[list[int], list[int] | None]]  # ids -> (new tokens, accept lengths)
    seconds: float = 0.0
    tokens: int = 0
    decided: int = 0
    verify_steps: int = 0
    outputs: list = field(default_factory=list)

    def add(self, ids: list[int]) -> None:
        start = time.perf_counter()
        tokens, accept_lengths = self.decode(ids)
        self.seconds += time.perf_counter() - start
        self.tokens += len(tokens)
        self.outputs.append(tokens)
        if accept_lengths:
            # tau leaves out the prefill step (see hydra.model.generate)
            self.decided += sum(accept_lengths[1:])
            self.verify_steps += len(accept_lengths) - 1

    @property
    def speed(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def tau(self) -> float | None:
        return self.decided / self.verify_steps if self.verify_steps else None


COMPILE_MODES = ("off", "on", "torch.compile")


def off_on(values: list[str]) -> list[str]:
    """An off/on option's values once each, "off" first."""
    return sorted(set(values), key=("off", "on").index)


def hydra_decoder(model: HydraModel, config: DecodeConfig, speculative: bool):
    def decode(ids: list[int]) -> tuple[list[int], list[int]]:
        res = generate(model, ids, config, speculative=speculative)
        return res.tokens, res.accept_lengths
    return decode


def hf_decoder(model: HydraModel, max_new_tokens: int, stop_ids: set[int], **generate_kwargs):
    """transformers' own greedy `generate` (stop tokens are not counted, as in ours), on transformers' own
    SDPA function: a HydraModel switches its base to `sdpa_grouped`, whose one-query path is this
    project's."""
    base = model.base_model

    def decode(ids: list[int]) -> tuple[list[int], None]:
        x = torch.tensor([ids])
        switched = base.config._attn_implementation == GROUPED_SDPA
        if switched:
            base.set_attn_implementation("sdpa")
        try:
            with torch.inference_mode():
                out = base.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                    do_sample=False, eos_token_id=sorted(stop_ids), **generate_kwargs)
        finally:
            if switched:
                base.set_attn_implementation(GROUPED_SDPA)
        new = out[0, len(ids):].tolist()
        return new[: next((i for i, t in enumerate(new) if t in stop_ids), len(new))], None
    return decode


def llama_cpp_decoder(gguf: Path, max_new_tokens: int, stop_ids: set[int], context: int):
    """llama.cpp (llama-cpp-python) on a GGUF file: greedy, the same token ids in, the same thread count; the
    KV cache is cleared before each prompt so no prompt prefix is reused."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit("[hydra] error: --llama-cpp needs llama-cpp-python: "
                         "pip install '.[llamacpp]'") from None

    threads = torch.get_num_threads()
    llm = Llama(str(gguf), n_ctx=context, n_threads=threads, n_threads_batch=threads, verbose=False)

    def decode(ids: list[int]) -> tuple[list[int], None]:
        llm.reset()  # n_tokens = 0: generate() then skips its prefix-reuse check
        llm._ctx.kv_cache_clear()
        new: list[int] = []
        for tok in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            if tok in stop_ids:
                break
            new.append(tok)
            if len(new) >= max_new_tokens:
                break
        return new, None
    return decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-model", type=os.path.expanduser, default=None)
    ap.add_argument("--heads", type=os.path.expanduser,
                    nargs="*", default=[], help="heads folders / Hub ids (default: random heads)")
    ap.add_argument("--trees", type=os.path.expanduser, nargs="*", default=["mc_sim_7b_63"])
    ap.add_argument("--dtypes", nargs="*", default=["bfloat16", "float32"])
    ap.add_argument("--quant", nargs="*", default=["none"], choices=("none", *QUANT_CHOICES),
                    help="base model weights: each dtype runs with each of these (none = the dtype's own)")
    ap.add_argument("--heads-quant", nargs="*", default=["auto"], choices=HEADS_QUANT_CHOICES,
                    help="each head set with each of these weights (auto: the base's kind)")
    ap.add_argument("--compile", nargs="*", default=["off"], choices=COMPILE_MODES,
                    help="each base model eager (off) and/or with its decoder compiled "
                         "(hydra.model.compiled; on: the default way, exported ahead of time on a CPU; "
                         "torch.compile: that way)")
    ap.add_argument("--pace", nargs="*", default=["off"], choices=("off", "on"),
                    help="each tree with the heads on every step (off) and/or paced (on)")
    ap.add_argument("--lookup", nargs="*", type=int, default=[DecodeConfig.lookup],
                    help="each tree with each of these prompt-lookup lengths (hydra.model.lookup; 0: none)")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--question-file", type=os.path.expanduser, default=QUESTIONS)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--check-equal", action="store_true", help="count prompts where speculative == AR output")
    ap.add_argument("--hf", action="store_true",
                    help="also time transformers' generate: plain greedy and prompt lookup "
                         "(--prompt-lookup tokens)")
    ap.add_argument("--prompt-lookup", type=int, default=10,
                    help="prompt_lookup_num_tokens for --hf (0: skip)")
    ap.add_argument("--llama-cpp", type=lambda p: Path(os.path.expanduser(p)), default=None, metavar="GGUF",
                    help="also time llama.cpp's plain greedy decoding of this GGUF file "
                         "(pip install '.[llamacpp]')")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.hf and "off" not in args.compile:
        raise SystemExit("[hydra] error: --hf times transformers' generate on an eager base: add 'off' to "
                         "--compile")
    if args.llama_cpp and not args.llama_cpp.is_file():
        raise SystemExit(f"[hydra] error: --llama-cpp {args.llama_cpp}: no such file")
    torch.manual_seed(0)
    extra = (" equal |" if args.check_equal else "") + (" vs HF generate |" if args.hf else "")
    print(f"# {torch.get_num_threads()} threads, {args.num_prompts} prompts from "
          f"{Path(args.question_file).name}, "
          f"{args.max_new_tokens} new tokens, greedy")
    # Every configuration of every base model (dtype x quant) is built first and all are interleaved in one
    # loop, so ratios across dtypes, quantizations and llama.cpp come from the same minutes.
    groups: list[tuple[str, Tally, list[Tally]]] = []  # (base label, its AR, its tallies)
    hf_first = prompts = None
    for dtype in args.dtypes:
        for quant, compiled in itertools.product(args.quant,
                                                 sorted(set(args.compile), key=COMPILE_MODES.index)):
            label = dtype + ("" if quant == "none" else f"+{quant}") + {
                "off": "", "on": "+compiled", "torch.compile": "+torch.compile"}[compiled]
            base, tokenizer = load_base_model(args.base_model, dtype=dtype,
                                              quant=None if quant == "none" else quant)
            prompts = prompts or load_prompts(tokenizer, Path(args.question_file), args.num_prompts)
            if args.heads:
                models = {}
                for h, heads_quant in itertools.product(args.heads, args.heads_quant):
                    model = HydraModel.from_pretrained(h, base_model=base, tokenizer=tokenizer,
                                                       heads_quant=heads_quant)
                    name = h if len(args.heads_quant) == 1 else f"{h} ({model.heads.quant or 'float'} heads)"
                    models[name] = model
            else:
                models = {f"random {arch}": HydraModel(base, HydraConfig(hydra_head_arch=arch), tokenizer)
                          for arch in ("mlp", "hydra-mlp", "prefix-mlp")}
            first = next(iter(models.values()))
            if compiled != "off":  # in place on the shared base; the warm-up below compiles each shape once
                compile_decoder(first, export=None if compiled == "on" else False)
            config = DecodeConfig(max_new_tokens=args.max_new_tokens)
            ar = Tally("AR", "-", hydra_decoder(first, config, speculative=False))
            tallies = [ar]
            # transformers' generate runs on the first base model only
            if args.hf and hf_first is None and compiled == "off":
                stop_ids = stop_token_ids(first, config)
                hf_first = Tally("HF generate", "-", hf_decoder(first, args.max_new_tokens, stop_ids))
                tallies.append(hf_first)
                if args.prompt_lookup:
                    tallies.append(Tally(f"HF prompt lookup ({args.prompt_lookup})", "-", hf_decoder(
                        first, args.max_new_tokens, stop_ids, prompt_lookup_num_tokens=args.prompt_lookup)))
            for name, model in models.items():
                for tree, pace, lookup in itertools.product(args.trees, off_on(args.pace), args.lookup):
                    cfg = DecodeConfig(tree=tree, max_new_tokens=args.max_new_tokens, lookup=lookup,
                                       pace=Pacer() if pace == "on" else False)
                    tokens = lookup_tokens(model, cfg)
                    tree_label = (tree + (f" +lookup {tokens}" if tokens else "")
                                  + (" paced" if pace == "on" else ""))
                    tallies.append(Tally(name, tree_label, hydra_decoder(model, cfg, speculative=True)))
            groups.append((label, ar, tallies))
    if args.llama_cpp:
        stop_ids = stop_token_ids(first, DecodeConfig())
        context = max(len(p) for p in prompts) + args.max_new_tokens + 8
        llama = Tally("llama.cpp", "-",
                      llama_cpp_decoder(args.llama_cpp, args.max_new_tokens, stop_ids, context))
        groups.append(("gguf", llama, [llama]))
    everything = [t for _, _, tallies in groups for t in tallies]
    for t in everything:  # warm-up: first calls allocate and pick kernels
        t.decode(prompts[0][:16])
    for i, ids in enumerate(prompts):
        k = i % len(everything)
        for t in everything[k:] + everything[:k]:
            t.add(ids)
    print("| base | heads | tree | tok/s | tau | speedup |" + extra)
    print("|---|---|---|---|---|---|" + "---|" * extra.count("|"))
    for label, ar, tallies in groups:
        for t in tallies:
            tau = "-" if t.tau is None else f"{t.tau:.2f}"
            line = f"| {label} | {t.name} | {t.tree} | {t.speed:.1f} | {tau} | {t.speed / ar.speed:.2f}x |"
            if args.check_equal:
                line += (" - |" if t is ar else
                         f" {sum(a == b for a, b in zip(t.outputs, ar.outputs, strict=True))}"
                         f"/{len(prompts)} |")
            if args.hf:
                line += f" {t.speed / hf_first.speed:.2f}x |"
            print(line, flush=True)


if __name__ == "__main__":
    main()
