"""Which tree candidates to keep, given the base model's logits at every tree node.

All three rules take the verification logits (T, V) in tree order and the tree's tokens (T,), and return
the accepted node indices (root first, a root-to-node path) plus the next token (the "bonus" token the base
model decided after the last accepted node).

- greedy: keep the longest path whose tokens equal the base model's argmax at each parent. Exact.
  `greedy_walk` gives the same result from the logits of the nodes it walks through only (siblings are
  distinct tokens, so at most one child matches), for output layers whose cost grows with the rows.
- typical: Medusa/Hydra typical acceptance. A child x of node u is accepted iff
  p_u(x) > min(threshold, alpha * exp(-H(p_u))) with p_u = softmax(logits_u / temperature); ties between
  equally long paths go to the larger summed log-probability; the next token is the argmax. Deterministic and
  lossy: it does not sample from the base model's distribution (as in the original Hydra and Medusa code).
- exact: speculative sampling over the tree (multi-draft rejection sampling, as in SpecInfer / EAGLE). The
  drafts are deterministic given the context, so child x is accepted with probability p(x); on rejection
  p(x) is set to 0 and p renormalised before trying the next sibling; if all siblings are rejected the next
  token is sampled from what remains. Output tokens are distributed exactly as sampling from the base model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hydra.model.trees import StepTree, TreeBuffers


def tempered_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / temperature) in fp32, finite for every temperature > 0. The logits are shifted so the
    largest is 0 before dividing, and the largest stay 0: a tiny temperature would otherwise overflow them to
    inf (inf - inf = nan inside softmax), and one below fp32's range divides by 0. The limit is then the
    argmax, as it should be."""
    logits = logits.float()
    shifted = logits - logits.amax(-1, keepdim=True)
    return torch.softmax(torch.where(shifted == 0, shifted, shifted / temperature), dim=-1)


def top1(logits: torch.Tensor) -> torch.Tensor:
    """The argmax over the last dimension: the first index of the largest value, as `argmax` gives it.
    `max(-1).indices` because torch's CPU `argmax` is ~4x slower on bf16 logits (README, Quantized base
    model), and greedy decoding takes it over the whole vocabulary at every node it verifies."""
    return logits.max(-1).indices


def greedy_accept(logits: torch.Tensor, tokens: torch.Tensor, tree: TreeBuffers) -> tuple[torch.Tensor, int]:
    pred = top1(logits)
    if tokens.numel() == 1:  # a plain step: the root alone, nothing to match
        return tree.retrieve[0, :1], int(pred[0])
    # Sentinel slot T: its token (-1) never equals an argmax, so padded path slots never match.
    tokens_ext = torch.cat([tokens, tokens.new_full((1,), -1)])
    pred_ext = torch.cat([pred, pred.new_full((1,), -2)])
    paths = tree.retrieve
    match = tokens_ext[paths[:, 1:]] == pred_ext[paths[:, :-1]]
    lengths = match.long().cumprod(dim=1).sum(dim=1)
    best = int(lengths.argmax())
    accepted = paths[best, : int(lengths[best]) + 1]
    return accepted, int(pred[accepted[-1]])


def greedy_walk(row_logits: Callable[[int], torch.Tensor], tokens: torch.Tensor,
                tree: StepTree) -> tuple[torch.Tensor, int]:
    """`greedy_accept` asking `row_logits(i)` for node i's logits (V,) only at the root and at each node it
    accepts: tau rows instead of T."""
    token_list, children = tokens.tolist(), tree.children
    node, path = 0, [0]
    while True:
        best = int(top1(row_logits(node)))
        child = next((c for c in children[node] if token_list[c] == best), None)
        if child is None:
            return torch.tensor(path, device=tokens.device), best
        path.append(child)
        node = child


def typical_accept(logits: torch.Tensor, tokens: torch.Tensor, tree: TreeBuffers, temperature: float,
                   posterior_threshold: float = 0.09,
                   posterior_alpha: float = 0.3) -> tuple[torch.Tensor, int]:
    probs = tempered_probs(logits, temperature)
    entropy = -(probs * torch.log(probs + 1e-5)).sum(-1)
    threshold = torch.minimum(torch.full_like(entropy, posterior_threshold),
                              posterior_alpha * torch.exp(-entropy))
    paths = tree.retrieve
    parents, kids = paths[:, :-1], paths[:, 1:]
    valid = kids < tokens.shape[0]
    safe_kids = kids.clamp(max=tokens.shape[0] - 1)
    p_child = probs[parents.clamp(max=tokens.shape[0] - 1), tokens[safe_kids]]
    match = valid & (p_child > threshold[parents.clamp(max=tokens.shape[0] - 1)])
    keep = match.long().cumprod(dim=1)
    lengths = keep.sum(dim=1)
    best_len = int(lengths.max())
    # Among the longest paths, the one with the largest summed log-probability of its accepted tokens.
    score = (torch.log(p_child.clamp_min(1e-30)) * keep).sum(dim=1)
    score = torch.where(lengths == best_len, score, torch.full_like(score, -float("inf")))
    best = int(score.argmax())
    accepted = paths[best, : best_len + 1]
    return accepted, int(top1(logits[accepted[-1]]))


def sample_from(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def exact_accept(logits: torch.Tensor, tokens: torch.Tensor, tree: TreeBuffers, temperature: float,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    probs_all = tempered_probs(logits, temperature).cpu()
    token_list = tokens.tolist()
    node, path = 0, [0]
    while True:
        p = probs_all[node].clone()
        accepted_child = None
        for child in tree.children[node]:
            x = token_list[child]
            if torch.rand((), generator=generator) < p[x]:
                accepted_child = child
                break
            p[x] = 0.0
            total = p.sum()
            if total <= 0:  # all mass was on rejected drafts (cannot happen with exact arithmetic)
                p = probs_all[node].clone()
                break
            p /= total
        if accepted_child is None:
            return torch.tensor(path, device=tokens.device), sample_from(p, generator)
        path.append(accepted_child)
        node = accepted_child
