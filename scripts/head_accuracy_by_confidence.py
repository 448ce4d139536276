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


def report(counts: torch.Tensor, hits: torch.Tensor, edges: tuple[float, ...] = EDGES) -> list[str]:
    names = [f"[{lo:.1f}, {hi:.1f})" for lo, hi in zip((0.0, *edges), (*edges, 1.0), strict=True)]
    names[-1] = names[-1].replace(")", "]")
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
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model = HydraModel.from_pretrained(a.heads, base_model=a.base_model, dtype=a.dtype).eval()
    records, _ = load_sharegpt(a.data, verbose=False)
    rows = [render_and_mask(r, model.tokenizer, a.max_length) for r in records[: a.num_chats]]
    print("\n".join(report(*binned_accuracy(model, rows))))


if __name__ == "__main__":
    main()
