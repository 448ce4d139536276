r"""Build a candidate tree for a head set on this machine: measured head accuracies along accepted paths, and
the measured cost of verifying N tree tokens.

    python scripts/build_tree.py --heads hydra/heads/default --data data/val.jsonl --name smollm2_hydra \
        --sizes 8 16 24 32 48 64

1. Accuracy. Teacher-forced on held-out self-distilled chats (the base model's own greedy replies, i.e. the
   path greedy decoding accepts), for every assistant position t we record the rank vector (r_1, ..., r_D):
   r_d is the rank, under head d-1 conditioned on the true path x_{t+1..t+d}, of the token the base model
   picks next. A tree node [r_1..r_k] is accepted at t exactly when the rank vector starts with it, so the
   expected accepted length of a tree is the sum over its nodes of the empirical frequency of that prefix.
   This is the joint, path-conditional statistic Hydra heads need; Medusa's recipe (gen_results.py) multiplies
   per-head marginals, which assumes the heads are independent.
2. Growth. The best tree of each size adds nodes greedily by frequency (a node becomes addable once its parent
   and its older sibling are in), which is optimal for this additive objective.
3. Size. For each candidate size the script times real decoding steps (proposal + verification + acceptance)
   on this machine and picks the size with the best predicted tokens/s = (1 + E[accepted]) / step time.
The chosen tree is written to hydra/model/tree_files/<name>.json and can be used as --tree <name>.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import time
from collections import Counter
from pathlib import Path

import torch

from hydra.data.sharegpt import load_sharegpt, render_and_mask
from hydra.model import HydraModel
from hydra.model.generate import DecodeConfig, generate

TREE_DIR = Path(__file__).resolve().parent.parent / "hydra" / "model" / "tree_files"


@torch.inference_mode()
def rank_vectors(model: HydraModel, rows: list[list[int]], masks: list[list[bool]], max_rank: int) -> Counter:
    """Counts of every accepted-path prefix (tuple of ranks) over all assistant positions, plus () = total."""
    counts: Counter = Counter()
    depth = model.config.hydra_num_heads
    for ids, is_target in zip(rows, masks, strict=True):
        x = torch.tensor(ids)[None]
        out = model(x)
        greedy = model.base_logits(out.base_hidden[0]).argmax(-1)  # base choice after each position
        ranks = []
        for d in range(depth):
            logits = model.head_logits(d, out.head_hidden[d, 0]).float()  # head d at t guesses x_{t+d+2}
            if model.heads.draft_vocab is not None:  # tokens outside the draft vocabulary are never drafted
                allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
                allowed[model.heads.draft_vocab] = True
                logits[:, ~allowed] = -float("inf")
            target = torch.full_like(greedy, -1)
            target[: len(ids) - d - 1] = greedy[d + 1:]
            picked = logits.gather(1, target.clamp_min(0)[:, None])
            rank = (logits > picked).sum(1)
            rank[(target < 0) | torch.isinf(picked[:, 0])] = max_rank
            ranks.append(rank.clamp(max=max_rank))
        ranks = torch.stack(ranks, 1).tolist()
        on_path = (torch.tensor(ids[1:] + [-1]) == greedy).tolist()  # data token == base's greedy choice
        for t in range(len(ids)):
            if not is_target[t]:
                continue
            counts[()] += 1
            prefix = ()
            for d in range(depth):
                # the node at depth d+1 is only reachable if the path tokens so far are the greedy ones
                if ranks[t][d] >= max_rank or t + d + 1 >= len(ids) or not on_path[t + d]:
                    break
                prefix += (ranks[t][d],)
                counts[prefix] += 1
    return counts


def save_counts(counts: Counter, path: Path) -> None:
    """Path counts as {"0 1": n, ...}; the empty key holds the number of positions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({" ".join(map(str, k)): v for k, v in sorted(counts.items())}))


def load_counts(path: Path) -> Counter:
    return Counter({tuple(int(r) for r in k.split()): v for k, v in json.loads(path.read_text()).items()})


def write_draft_vocab(model: HydraModel, data: str, size: int, heads_folder: Path) -> None:
    """The `size` most frequent assistant tokens of `data` (plus the stop tokens) become the draft
    vocabulary."""
    from safetensors.torch import save_file

    from hydra.model.hydra_model import DRAFT_VOCAB_NAME

    counts = torch.zeros(model.config.vocab_size, dtype=torch.long)
    for rec in load_sharegpt(data)[0]:
        ex = render_and_mask(rec, model.tokenizer, 4096)
        ids = torch.tensor([t for t, label in zip(ex["input_ids"], ex["labels"], strict=True)
                            if label != -100], dtype=torch.long)
        counts += torch.bincount(ids, minlength=counts.numel())
    ranked = counts.clone()
    if model.tokenizer.eos_token_id is not None:  # always draftable, however rare
        ranked[model.tokenizer.eos_token_id] = ranked.max() + 1
    top = ranked.topk(min(size, counts.numel())).indices.sort().values
    coverage = counts[top].sum().item() / max(counts.sum().item(), 1)
    save_file({"token_ids": top}, str(heads_folder / DRAFT_VOCAB_NAME))
    model.heads.set_draft_vocab(top)
    print(f"draft vocabulary: {len(top)} tokens covering {coverage:.2%} of assistant tokens -> "
          f"{heads_folder / DRAFT_VOCAB_NAME}")


def grow_tree(counts: Counter, size: int) -> tuple[list[list[int]], float]:
    """Greedy best tree of `size` nodes; returns (choices, expected accepted draft tokens per step)."""
    total = counts[()]
    chosen: list[tuple[int, ...]] = []
    heap = [(-counts[(0,)], (0,))]
    seen = {(0,)}
    gain = 0.0
    while heap and len(chosen) < size:
        neg, node = heapq.heappop(heap)
        chosen.append(node)
        gain += -neg / total
        for nxt in (node + (0,), node[:-1] + (node[-1] + 1,)):
            if nxt not in seen and counts[nxt] > 0:
                seen.add(nxt)
                heapq.heappush(heap, (-counts[nxt], nxt))
    return [list(p) for p in chosen], gain


def step_time(model: HydraModel, prompt: list[int], choices: list[list[int]] | None, steps: int) -> float:
    """Seconds per decoding step with this tree (None: plain AR), prefill excluded: the difference between
    runs of 2 and 2 + `steps` forwards, with no stop tokens. Without the prompt-lookup branch: it would add
    tokens to some steps and not others, and the tree's own cost is what is being timed."""
    def timed(n: int) -> float:
        cfg = DecodeConfig(tree=choices, max_new_tokens=10_000, max_steps=n, stop_token_ids=[], lookup=0)
        start = time.perf_counter()
        generate(model, prompt, cfg, speculative=choices is not None)
        return time.perf_counter() - start

    timed(3)  # warm-up
    # min over repeats: on a shared machine the noise is one-sided (interference only slows things down)
    extra = min(timed(2 + steps) for _ in range(3)) - min(timed(2) for _ in range(3))
    if extra <= 0:  # a choice made on it would be arbitrary
        raise ValueError(f"runs of {2 + steps} steps were no slower than runs of 2: the timing of {steps} "
                         "steps is lost in the noise of the prefill; raise --timing-steps")
    return extra / steps


def write_tree_json(choices: list[list[int]], meta: dict) -> str:
    """One path per line: readable in a diff, loadable with hydra.model.trees.get_tree."""
    paths = ",\n  ".join(json.dumps(p) for p in choices)
    return "{\n \"choices\": [\n  " + paths + "\n ],\n" + json.dumps(meta, indent=1)[2:] + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=os.path.expanduser, required=True)
    ap.add_argument("--data", type=os.path.expanduser,
                    required=True, help="held-out ShareGPT jsonl (self-distilled replies)")
    ap.add_argument("--name", required=True)
    ap.add_argument("--num-chats", type=int, default=100)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--max-rank", type=int, default=10)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16, 24, 32, 48, 64])
    ap.add_argument("--timing-dtype", default="bfloat16")
    ap.add_argument("--timing-steps", type=int, default=24)
    ap.add_argument("--draft-vocab-size", type=int, default=0,
                    help="also write draft_vocab.safetensors into --heads: the K most frequent assistant "
                         "tokens of --vocab-data (0: keep the heads as they are)")
    ap.add_argument("--vocab-data", type=os.path.expanduser,
                    default=None, help="ShareGPT jsonl for token counts (default: --data)")
    ap.add_argument("--prompt-tokens", type=int, default=400, help="context length used for timing")
    ap.add_argument("--counts", type=os.path.expanduser, default=None,
                    help="JSON file of the measured path counts: read if it exists, else written after "
                         "measuring (the measurement is the slow part; timing on another thread count can "
                         "then reuse it)")
    args = ap.parse_args()

    model = HydraModel.from_pretrained(args.heads, dtype="float32")
    if args.draft_vocab_size:
        write_draft_vocab(model, args.vocab_data or args.data, args.draft_vocab_size, Path(args.heads))
    records, _ = load_sharegpt(args.data)
    rows, masks = [], []
    for rec in records[: args.num_chats]:
        ex = render_and_mask(rec, model.tokenizer, args.max_length)
        rows.append(ex["input_ids"])
        masks.append([label != -100 for label in ex["labels"]])
    if args.counts and Path(args.counts).is_file():
        counts = load_counts(Path(args.counts))
    else:
        counts = rank_vectors(model, rows, masks, args.max_rank)
        if args.counts:
            save_counts(counts, Path(args.counts))
    print(f"{counts[()]} positions; per-depth acceptance of the top-1 chain:",
          [round(counts[(0,) * (d + 1)] / counts[()], 3) for d in range(model.config.hydra_num_heads)])

    try:
        choose_size(args, counts, rows)
    except ValueError as e:  # the path counts are saved (--counts): a rerun times again without recounting
        raise SystemExit(f"[hydra] error: {e}") from None


def choose_size(args: argparse.Namespace, counts: Counter, rows: list[list[int]]) -> None:
    """Time each size's best tree, print the table and write the fastest predicted one."""
    timed = HydraModel.from_pretrained(args.heads, dtype=args.timing_dtype)
    prompt = rows[0][: args.prompt_tokens]
    prompt = (prompt * (args.prompt_tokens // max(len(prompt), 1) + 1))[: args.prompt_tokens]
    ar_time = step_time(timed, prompt, None, args.timing_steps)
    best = None
    print("| nodes | expected tau | step ms | predicted speedup |\n|---|---|---|---|")
    for size in args.sizes:
        choices, gain = grow_tree(counts, size)
        if not choices:
            continue
        t = step_time(timed, prompt, choices, args.timing_steps)
        speedup = (1 + gain) / t * ar_time
        print(f"| {len(choices)} | {1 + gain:.2f} | {t * 1e3:.1f} | {speedup:.2f}x |", flush=True)
        if best is None or speedup > best[0]:
            best = (speedup, choices, 1 + gain, t)
    speedup, choices, tau, t = best
    TREE_DIR.mkdir(exist_ok=True)
    out = TREE_DIR / f"{args.name}.json"
    meta = {"heads": str(args.heads), "expected_tau": round(tau, 3), "step_ms": round(t * 1e3, 2),
            "ar_step_ms": round(ar_time * 1e3, 2), "predicted_speedup": round(speedup, 3),
            "timing_dtype": args.timing_dtype, "timing_threads": torch.get_num_threads(),
            "positions": counts[()]}
    out.write_text(write_tree_json(choices, meta))
    print(f"wrote {out} ({len(choices)} nodes, expected tau {tau:.2f}, predicted {speedup:.2f}x)")


if __name__ == "__main__":
    main()
