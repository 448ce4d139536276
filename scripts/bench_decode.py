"""Decoding benchmark: plain autoregressive vs speculative decoding with each head set / tree, in one process.

    python scripts/bench_decode.py --num-prompts 8 --max-new-tokens 128                 # random heads, all archs
    python scripts/bench_decode.py --heads hydra/heads/default runs/medusa --trees mc_sim_7b_63 tree_32
    python scripts/bench_decode.py --dtypes float32 --check-equal                       # losslessness count

Prompts are the first turns of ../shared/data/mt_bench/question.jsonl (chat template applied). For every
configuration it prints tokens/s, tau (mean tokens decided per base-model forward, bonus token included; AR = 1)
and speedup over AR measured in the same process on the same prompts. Timing on a shared machine is noisy:
compare ratios from one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hydra.model import HydraConfig, HydraModel, load_base_model
from hydra.model.generate import DecodeConfig, generate

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = REPO.parent / "shared" / "data" / "mt_bench" / "question.jsonl"


def load_prompts(tokenizer, path: Path, n: int) -> list[list[int]]:
    questions = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:n]
    return [tokenizer.apply_chat_template([{"role": "user", "content": q["turns"][0]}],
                                          add_generation_prompt=True, tokenize=True, return_dict=False)
            for q in questions]


def run(model: HydraModel, prompts, config: DecodeConfig, speculative: bool):
    tokens = decided = verify_steps = 0
    outputs = []
    start = time.perf_counter()
    for ids in prompts:
        res = generate(model, ids, config, speculative=speculative)
        tokens += len(res.tokens)
        decided += sum(res.accept_lengths[1:])  # tau leaves out the prefill step (see hydra.model.generate)
        verify_steps += res.steps - 1
        outputs.append(res.tokens)
    return tokens / (time.perf_counter() - start), decided / max(verify_steps, 1), outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-model", default=None)
    ap.add_argument("--heads", nargs="*", default=[], help="heads folders / Hub ids (default: random heads)")
    ap.add_argument("--trees", nargs="*", default=["mc_sim_7b_63"])
    ap.add_argument("--dtypes", nargs="*", default=["bfloat16", "float32"])
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--question-file", type=Path, default=QUESTIONS)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--check-equal", action="store_true", help="count prompts where speculative == AR output")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = DecodeConfig(max_new_tokens=args.max_new_tokens)
    print("| dtype | heads | tree | tok/s | tau | speedup |" + (" equal |" if args.check_equal else ""))
    print("|---|---|---|---|---|---|" + ("---|" if args.check_equal else ""))
    for dtype in args.dtypes:
        base, tokenizer = load_base_model(args.base_model, dtype=dtype)
        prompts = load_prompts(tokenizer, args.question_file, args.num_prompts)
        if args.heads:
            models = {h: HydraModel.from_pretrained(h, base_model=base, tokenizer=tokenizer) for h in args.heads}
        else:
            models = {f"random {arch}": HydraModel(base, HydraConfig(hydra_head_arch=arch), tokenizer)
                      for arch in ("mlp", "hydra-mlp", "prefix-mlp")}
        first = next(iter(models.values()))
        run(first, prompts[:1], DecodeConfig(max_new_tokens=8), speculative=False)  # warm-up
        ar_speed, _, ar_out = run(first, prompts, config, speculative=False)
        print(f"| {dtype} | AR | - | {ar_speed:.1f} | 1.00 | 1.00x |" + (" - |" if args.check_equal else ""),
              flush=True)
        for name, model in models.items():
            for tree in args.trees:
                cfg = DecodeConfig(tree=tree, max_new_tokens=args.max_new_tokens)
                speed, tau, out = run(model, prompts, cfg, speculative=True)
                row = f"| {dtype} | {name} | {tree} | {speed:.1f} | {tau:.2f} | {speed / ar_speed:.2f}x |"
                if args.check_equal:
                    row += f" {sum(a == b for a, b in zip(out, ar_out))}/{len(prompts)} |"
                print(row, flush=True)


if __name__ == "__main__":
    main()
