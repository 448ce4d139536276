"""Training throughput (tokens/s) of Medusa, Hydra and Hydra++ heads on the default model: the plain path and
each fast-path option side by side, interleaved in one process so the ratios hold on a busy machine.

    python scripts/bench_train.py                      # 4 heads, bf16, 2 rows x 512 tokens per step
    python scripts/bench_train.py --threads 1 --rounds 3 --steps 2
    python scripts/bench_train.py --profile hydrapp:both   # torch.profiler table of one configuration

Options: old = base forward every step, loss over the whole vocabulary; cache = --cache_hidden_states (rows
already cached, as in epochs 2+ or any later run); vocab = --draft_vocab (the shipped draft vocabulary);
both = the two together; both+fp32 = both, with the heads' arithmetic in fp32 instead of bf16 autocast
(--bf16_heads False; the base stays bf16). Each step is a full train.py optimizer step (train_step) on real
packed rows of the self-distilled data. Results are in the README ("Training speed").
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hydra.train import hidden_cache, train  # noqa: E402
from hydra.train.loss import new_stats  # noqa: E402
from hydra.train.runtime import autocast_ctx  # noqa: E402

RECIPES = {  # name -> train.py flags (README "Training": the three recipes)
    "medusa": ["--hydra_head_arch", "mlp", "--hydra_num_layers", "1", "--lm_loss_weight", "1.0",
               "--teacher_loss_weight", "0.0"],
    "hydra": ["--hydra_head_arch", "hydra-mlp", "--hydra_num_layers", "1", "--lm_loss_weight", "1.0",
              "--teacher_loss_weight", "0.0"],
    "hydrapp": ["--hydra_head_arch", "prefix-mlp", "--hydra_num_layers", "4", "--lm_loss_weight", "0.0",
                "--teacher_loss_weight", "1.0", "--dropout_rate", "0.2"],
}
# The pipeline's Hydra++ recipe: the paper's without dropout (assets/training_logs/README.md, "Dropout off").
RECIPES["hydrapp-nodrop"] = ["--hydra_head_arch", "prefix-mlp", "--hydra_num_layers", "4",
                              "--lm_loss_weight", "0.0", "--teacher_loss_weight", "1.0",
                              "--dropout_rate", "0.0"]
OPTIONS = ("old", "cache", "vocab", "both", "both+fp32")


def make_runs(args, workdir: Path) -> dict[str, train.Run]:
    runs = {}
    for name in args.recipes:
        argv = ["--data_path", args.data, "--output_dir", str(workdir / "out"), "--bf16", str(args.bf16),
                "--hydra_num_heads", str(args.num_heads), "--model_max_length", str(args.max_length),
                "--per_device_train_batch_size", str(args.rows), "--gradient_accumulation_steps", "1",
                "--max_steps", "1000000", "--warmup_steps", "0", "--loss_chunk_size", str(args.chunk),
                "--cache_hidden_states", "True", "--hidden_cache_dir", str(workdir / "features"),
                "--draft_vocab", args.draft_vocab] + RECIPES[name]
        runs[name] = train.setup(*train.parse_args(argv))
    return runs


def configure(run: train.Run, option: str, vocab: torch.Tensor, cache) -> None:
    run.vocab = vocab if option in ("vocab", "both", "both+fp32") else None
    run.cache = cache if option in ("cache", "both", "both+fp32") else None
    run.args.bf16_heads = option != "both+fp32"


def timed_steps(run: train.Run, first_step: int, n: int) -> tuple[int, float]:
    stats = new_stats(run.model.config.hydra_num_heads, run.d.device)
    tokens, t0 = 0, time.perf_counter()
    for step in range(first_step, first_step + n):
        tokens += train.train_step(run, step, stats)[2]
    if run.d.device.type == "cuda":
        torch.cuda.synchronize()
    return tokens, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=os.path.expanduser,
                   default=str(REPO / "data" / "self_distill_smollm2.jsonl.gz"))
    p.add_argument("--draft-vocab", type=os.path.expanduser,
                   default=str(REPO / "hydra" / "heads" / "default" / "draft_vocab.safetensors"))
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--rows", type=int, default=2, help="packed rows per optimizer step")
    p.add_argument("--max-length", type=int, default=512, help="tokens per packed row")
    p.add_argument("--chunk", type=int, default=train.TrainingArguments.loss_chunk_size,
                   help="--loss_chunk_size (default: train.py's)")
    p.add_argument("--bf16", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    p.add_argument("--steps", type=int, default=2, help="timed steps per configuration per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--profile", default=None, metavar="RECIPE:OPTION",
                   help="instead of the table, profile one configuration with torch.profiler")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        runs = make_runs(args, Path(tmp))
        any_run = next(iter(runs.values()))
        vocab, cache = any_run.vocab, any_run.cache
        n_steps = args.rounds * args.steps + 1
        used = sorted({r for s in range(n_steps) for r in any_run.order.global_batch_rows(s)})
        with torch.no_grad(), autocast_ctx(any_run.base_amp, any_run.d.device):
            hidden_cache.fill(any_run.model, cache, used, any_run.batch, args.rows, lambda m: None)
        print(f"# {torch.get_num_threads()} thread(s), device {any_run.d.device}, bf16 {args.bf16}, "
              f"{args.num_heads} heads, {args.rows} x {args.max_length}-token rows per step, "
              f"loss chunk {args.chunk}, "
              f"draft vocabulary {len(vocab)} tokens")
        for run in runs.values():  # warm-up: one step of every configuration
            for option in OPTIONS:
                configure(run, option, vocab, cache)
                timed_steps(run, 0, 1)
        if args.profile:
            return profile(runs, args.profile, vocab, cache)
        rates = {(r, o): [] for r in runs for o in OPTIONS}
        for k in range(args.rounds):
            for name, run in runs.items():
                for option in OPTIONS:
                    configure(run, option, vocab, cache)
                    tokens, seconds = timed_steps(run, 1 + k * args.steps, args.steps)
                    rates[name, option].append(tokens / seconds)
        print(f"{'recipe':<15}" + "".join(f"{o + ' tok/s':>16}" for o in OPTIONS)
              + f"{'both/old':>10}{'fp32/both':>11}")
        for name in runs:
            med = {o: statistics.median(rates[name, o]) for o in OPTIONS}
            print(f"{name:<15}" + "".join(f"{med[o]:>16.0f}" for o in OPTIONS)
                  + f"{med['both'] / med['old']:>9.2f}x{med['both+fp32'] / med['both']:>10.2f}x")
    return 0


def profile(runs, spec: str, vocab, cache) -> int:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    name, option = spec.split(":")
    run = runs[name]
    configure(run, option, vocab, cache)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.d.device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        tokens, seconds = timed_steps(run, 1, 2)
    print(f"{name}:{option}: {tokens / seconds:.0f} tok/s under the profiler")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
