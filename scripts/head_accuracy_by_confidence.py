r"""Where the heads miss: teacher-forced top-1 accuracy of each head, binned by how sure the base model itself is
of the token the head must guess.

    python scripts/head_accuracy_by_confidence.py --heads hydra/heads/default --data runs/split/val.jsonl \
        --num-chats 40

Head i at position t guesses x_{t+i+2}, the base model's greedy choice after it has read x_{t+1..t+i+1}
(on self-distilled chats, the token greedy decoding accepts). Each such position is put in a bin by the base
model's own probability of that token there (its top-1 probability after reading the true path). If the heads
missed mostly where the base is unsure, no draft could do much better; where the base is sure, a miss is the
heads' own limit. Accuracy is over the heads' draft vocabulary (a target outside it is a miss), as decoding
proposes from it.

With `--bin-by draft` it checks instead what dynamic trees assume, that a draft's probability is the rate at
which greedy verification accepts it: each head's top-k candidates at the nodes greedy decoding can reach,
binned by their own draft probability, with the share accepted per bin.

    python scripts/head_accuracy_by_confidence.py --heads hydra/heads/default --data runs/split/val.jsonl \
        --num-chats 40 --bin-by draft
"""  # noqa: E501 - the first line is the --help description (main: __doc__.split("\n")[0])

from __future__ import annotations

import argparse
import os

import torch

from hydra.data.sharegpt import load_sharegpt, render_and_mask
from hydra.model import HydraModel

EDGES = (0.3, 0.5, 0.7, 0.9)  # bin edges of the base model's top-1 probability


@torch.inference_mode()
def binned_accuracy(model: HydraModel, rows: list[dict[str, list[int]]],
                    edges: tuple[float, ...] = EDGES) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, hits), each (heads, bins): assistant positions whose target lies in each bin of the base's
    top-1 probability, and how many of them the head's top-1 (over its draft vocabulary) got right."""
    heads, nbins = model.config.hydra_num_heads, len(edges) + 1
    counts, hits = torch.zeros(heads, nbins), torch.zeros(heads, nbins)
    bounds = torch.tensor(edges)
    vocab = model.heads.draft_vocab
    for row in rows:
        ids, labels = torch.tensor(row["input_ids"]), torch.tensor(row["labels"])
        out = model(ids[None])
        # the base's choice after each position j, and its probability there (it predicts x_{j+1})
        p_max, greedy = model.base_logits(out.base_hidden[0]).float().softmax(-1).max(-1)
        for i in range(heads):
            logits = model.head_logits(i, out.head_hidden[i, 0], vocab=vocab)
            guess = logits.argmax(-1) if vocab is None else vocab[logits.argmax(-1)]
            t = torch.arange(max(len(ids) - i - 2, 0))
            j = t + i + 1  # head i at t guesses x_{t+i+2}: the base's choice after j = t+i+1
            keep = labels[j + 1] != -100  # assistant tokens only, as in training and validation
            t, j = t[keep], j[keep]
            b = torch.bucketize(p_max[j], bounds, right=True)
            counts[i] += torch.bincount(b, minlength=nbins).float()
            hits[i] += torch.bincount(b, weights=(guess[t] == greedy[j]).float(), minlength=nbins)
    return counts, hits


def bin_names(edges: tuple[float, ...], digits: int) -> list[str]:
    """'[lo, hi)' for each bin of probabilities cut at `edges`, the last one closed at 1."""
    names = [f"[{lo:.{digits}f}, {hi:.{digits}f})"
             for lo, hi in zip((0.0, *edges), (*edges, 1.0), strict=True)]
    names[-1] = names[-1][:-1] + "]"
    return names


PROB_EDGES = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)  # bin edges of a draft candidate's own probability


@torch.inference_mode()
def draft_reliability(model: HydraModel, rows: list[dict[str, list[int]]], topk: int = 4,
                      edges: tuple[float, ...] = PROB_EDGES) -> tuple[torch.Tensor, ...]:
    """(candidates, probability sums, accepted), each (heads, bins): head i's `topk` candidates at every
    position whose node greedy decoding can reach (the path to it, x_{t+1..t+i+1}, is the base's own greedy
    choice), binned by the candidate's draft probability (normalised over the draft vocabulary, as
    decoding scores it), and how many of them greedy verification accepts (the candidate is the base's choice
    x_{t+i+2}). Dynamic trees read a node's draft probability as this acceptance rate."""
    heads, nbins = model.config.hydra_num_heads, len(edges) + 1
    counts, prob_sums, hits = (torch.zeros(heads, nbins) for _ in range(3))
    bounds = torch.tensor(edges)
    for row in rows:
        ids, labels = torch.tensor(row["input_ids"]), torch.tensor(row["labels"])
        out = model(ids[None])
        greedy = model.base_logits(out.base_hidden[0]).argmax(-1)  # the base's choice after each position
        on_path = torch.cat([ids[1:] == greedy[:-1], torch.tensor([False])])  # x_{j+1} is its choice
        for i in range(heads):
            logp, cand = model.heads.draft_topk_logprobs(i, out.head_hidden[i, 0], model.lm_head, topk)
            t = torch.arange(max(len(ids) - i - 2, 0))
            keep = labels[t + i + 2] != -100
            for e in range(i + 1):  # the root x_{t+1} and the path's tokens are the greedy ones
                keep &= on_path[t + e]
            t = t[keep]
            p = logp[t].exp().flatten()
            b = torch.bucketize(p, bounds, right=True)
            counts[i] += torch.bincount(b, minlength=nbins).float()
            prob_sums[i] += torch.bincount(b, weights=p, minlength=nbins)
            accepted = (cand[t] == greedy[t + i + 1, None]).flatten().float()
            hits[i] += torch.bincount(b, weights=accepted, minlength=nbins)
    return counts, prob_sums, hits


def reliability_report(counts: torch.Tensor, prob_sums: torch.Tensor, hits: torch.Tensor,
                       edges: tuple[float, ...] = PROB_EDGES) -> list[str]:
    names = bin_names(edges, digits=2)
    heads = " | ".join(f"head {i + 1}: n, mean prob, accepted" for i in range(len(counts)))
    lines = ["draft prob      | " + heads]
    for k, name in enumerate(names):
        cells = [f"{int(c[k])}, {s[k] / max(c[k], 1):.3f}, {h[k] / max(c[k], 1):.3f}"
                 for c, s, h in zip(counts, prob_sums, hits, strict=True)]
        lines.append(f"{name:15} | " + " | ".join(cells))
    sums = [f"{int(c.sum())}, {s.sum():.1f}, {h.sum():.0f}"
            for c, s, h in zip(counts, prob_sums, hits, strict=True)]
    lines.append(f"{'all (sums)':15} | " + " | ".join(sums))
    return lines


def report(counts: torch.Tensor, hits: torch.Tensor, edges: tuple[float, ...] = EDGES) -> list[str]:
    names = bin_names(edges, digits=1)
    lines = ["base top-1 prob | " + " | ".join(f"head {i + 1}: share, top-1" for i in range(len(counts)))]
    for k, name in enumerate(names):
        cells = [f"{c[k] / c.sum():.3f}, {h[k] / max(c[k], 1):.3f}"
                 for c, h in zip(counts, hits, strict=True)]
        lines.append(f"{name:15} | " + " | ".join(cells))
    lines.append(f"{'all':15} | " + " | ".join(f"1.000, {h.sum() / c.sum():.3f} ({int(c.sum())} positions)"
                                                for c, h in zip(counts, hits, strict=True)))
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", type=os.path.expanduser, required=True)
    ap.add_argument("--data", type=os.path.expanduser, required=True, help="held-out self-distilled chats")
    ap.add_argument("--num-chats", type=int, default=40)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--base-model", type=os.path.expanduser, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--bin-by", choices=["base", "draft"], default="base",
                    help="base: the heads' top-1 by the base model's confidence; draft: each head's top-k "
                         "candidates by their own draft probability, against how often greedy verification "
                         "accepts them (is a draft probability an acceptance rate?)")
    ap.add_argument("--topk", type=int, default=4, help="candidates per head for --bin-by draft")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model = HydraModel.from_pretrained(a.heads, base_model=a.base_model, dtype=a.dtype).eval()
    records, _ = load_sharegpt(a.data, verbose=False)
    rows = [render_and_mask(r, model.tokenizer, a.max_length) for r in records[: a.num_chats]]
    if a.bin_by == "base":
        print("\n".join(report(*binned_accuracy(model, rows))))
    else:
        print("\n".join(reliability_report(*draft_reliability(model, rows, a.topk))))


if __name__ == "__main__":
    main()
