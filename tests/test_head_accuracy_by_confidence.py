"""scripts/head_accuracy_by_confidence.py: the vectorised binning equals a position-by-position count."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from test_generate import VOCAB, make_cycle_base, oracle_heads

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from head_accuracy_by_confidence import (  # noqa: E402
    EDGES,
    PROB_EDGES,
    binned_accuracy,
    draft_reliability,
    reliability_report,
    report,
)


def test_binned_accuracy_counts_every_assistant_target_once():
    # heads that predict the cycle x -> x+1 that this base mostly follows: right often, not always
    model = oracle_heads(make_cycle_base(), "hydra-mlp", num_heads=3)
    model.heads.set_draft_vocab(torch.arange(0, VOCAB, 2))  # even tokens only: odd targets are misses
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in (9, 14):
        ids = torch.randint(0, VOCAB, (n,), generator=gen).tolist()
        labels = [-100] * 3 + ids[3:n - 1] + [-100]  # a prompt, a reply, and one unlabelled token
        rows.append({"input_ids": ids, "labels": labels})
    counts, hits = binned_accuracy(model, rows)

    want_counts, want_hits = torch.zeros_like(counts), torch.zeros_like(hits)
    bounds = (0.0, *EDGES)
    with torch.inference_mode():
        for row in rows:
            ids, labels = row["input_ids"], row["labels"]
            out = model(torch.tensor([ids]))
            probs = model.base_logits(out.base_hidden[0]).float().softmax(-1)
            for i in range(3):
                logits = model.head_logits(i, out.head_hidden[i, 0]).float()
                for t in range(len(ids)):
                    target_at = t + i + 2
                    if target_at >= len(ids) or labels[target_at] == -100:
                        continue
                    p = probs[target_at - 1]
                    b = max(k for k, lo in enumerate(bounds) if p.max() >= lo)
                    guess = max(range(0, VOCAB, 2), key=lambda v: logits[t, v])
                    want_counts[i, b] += 1
                    want_hits[i, b] += guess == int(p.argmax())
    assert torch.equal(counts, want_counts) and torch.equal(hits, want_hits)
    assert (counts > 0).sum() >= 3 and 0 < hits.sum() < counts.sum()  # the case tests something
    lines = report(counts, hits)
    assert len(lines) == 2 + len(EDGES) + 1 and lines[-1].startswith("all")


def _greedy_rows(model, prompts: list[list[int]], reply: int) -> list[dict[str, list[int]]]:
    """Prompts continued by the base's own greedy reply (self-distilled chats), the reply labelled."""
    rows = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(reply):
                ids.append(int(model.base_logits(model(torch.tensor([ids])).base_hidden[0, -1]).argmax()))
            rows.append({"input_ids": ids, "labels": [-100] * len(prompt) + ids[len(prompt):]})
    return rows


def test_draft_reliability_counts_every_reachable_candidate_once():
    model = oracle_heads(make_cycle_base(), "hydra-mlp", num_heads=3)
    model.heads.set_draft_vocab(torch.arange(0, VOCAB, 2))
    gen = torch.Generator().manual_seed(1)
    rows = _greedy_rows(model, [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (4, 7)], 12)
    rows[1]["input_ids"][9] = (rows[1]["input_ids"][9] + 1) % VOCAB  # one token off the greedy path
    counts, prob_sums, hits = draft_reliability(model, rows, topk=3)

    want = [torch.zeros_like(counts) for _ in range(3)]
    bounds = (0.0, *PROB_EDGES)
    even = torch.arange(0, VOCAB, 2)
    with torch.inference_mode():
        for row in rows:
            ids, labels = row["input_ids"], row["labels"]
            out = model(torch.tensor([ids]))
            greedy = model.base_logits(out.base_hidden[0]).argmax(-1).tolist()
            for i in range(3):
                probs = model.head_logits(i, out.head_hidden[i, 0]).float()[:, even].softmax(-1)
                for t in range(len(ids)):
                    if t + i + 2 >= len(ids) or labels[t + i + 2] == -100:
                        continue
                    if any(ids[t + e + 1] != greedy[t + e] for e in range(i + 1)):
                        continue  # the node is not reachable: a token on its path is not the greedy one
                    top = probs[t].topk(3)
                    for p, c in zip(top.values.tolist(), even[top.indices].tolist(), strict=True):
                        b = max(k for k, lo in enumerate(bounds) if p >= lo)
                        want[0][i, b] += 1
                        want[1][i, b] += p
                        want[2][i, b] += c == greedy[t + i + 1]
    assert torch.equal(counts, want[0]) and torch.equal(hits, want[2])
    assert torch.allclose(prob_sums, want[1], atol=1e-4)
    assert 0 < hits.sum() < counts.sum() and (counts.sum(0) > 0).sum() >= 2  # the case tests something
    lines = reliability_report(counts, prob_sums, hits)
    assert len(lines) == 2 + len(PROB_EDGES) + 1 and lines[-1].startswith("all")
