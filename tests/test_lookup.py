"""hydra/model/lookup.py and the tree graft it feeds: the incremental n-gram index drafts what a brute-force
search of the context drafts, and a grafted chain adds exactly its own path to a step's tree."""

from __future__ import annotations

import random

import pytest
import torch

from hydra.model.lookup import PromptLookup
from hydra.model.trees import build_step_tree, build_tree_buffers, graft_chain


def brute_force_draft(tokens: list[int], max_tokens: int, min_ngram: int, max_ngram: int) -> list[int]:
    """The longest suffix of min..max tokens that occurred before with a token after it, at its latest
    occurrence."""
    for n in range(max_ngram, min_ngram - 1, -1):
        if len(tokens) < n:
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start: start + n] == suffix:
                return tokens[start + n: start + n + max_tokens]
    return []


def test_draft_copies_what_followed_the_latest_occurrence():
    lookup = PromptLookup(max_tokens=3)
    lookup.extend([5, 6, 7, 8, 1, 5, 6, 9, 2])
    assert lookup.draft() == []  # (9, 2) and (2,) never occurred before (1-grams are not matched)
    lookup.extend([5, 6])
    assert lookup.draft() == [9, 2, 5]  # the latest (5, 6) is followed by 9, not by the first one's 7
    lookup.extend([7])
    assert lookup.draft() == [8, 1, 5]  # the 3-gram (5, 6, 7) wins over the 2-gram (6, 7)
    periodic = PromptLookup(max_tokens=4)
    periodic.extend([1, 2, 1, 2])
    assert periodic.draft() == [1, 2]  # what exists after the match, even if fewer than max_tokens


@pytest.mark.parametrize("sizes", [(2, 3), (1, 3), (3, 4)])
def test_incremental_index_equals_brute_force(sizes):
    rng = random.Random(0)
    for trial in range(30):
        lookup = PromptLookup(5, *sizes)
        tokens: list[int] = []
        vocab = rng.choice([3, 6, 20])
        while len(tokens) < 120:
            new = [rng.randrange(vocab) for _ in range(rng.randint(1, 6))]
            lookup.extend(new)
            tokens += new
            assert lookup.draft() == brute_force_draft(tokens, 5, *sizes), (trial, tokens)


def test_followed_drafts_are_scored_once_the_decided_tokens_settle_them():
    """`follow` keeps an unverified draft; `outcomes` reports what verifying it would have decided (matched
    prefix + bonus) as soon as a differing token or the whole draft is decided, each draft once."""
    lookup = PromptLookup(4)
    lookup.extend([1, 2, 3])
    lookup.follow([7, 8, 9])  # guesses the tokens after 3
    assert lookup.outcomes() == []
    lookup.extend([7, 8])
    assert lookup.outcomes() == []  # matched so far, not settled
    lookup.follow([5])  # guesses the token after 8
    lookup.extend([9])
    assert lookup.outcomes() == [4, 1]  # all 3 matched + bonus; [5] missed at once: the bonus alone
    lookup.follow([4, 4])
    lookup.extend([4, 6, 4])
    assert lookup.outcomes() == [2] and lookup.outcomes() == []


def test_bad_sizes_refused():
    for args in ((0,), (4, 0, 3), (4, 3, 2)):
        with pytest.raises(ValueError, match="prompt lookup needs"):
            PromptLookup(*args)


def token_paths(tokens: torch.Tensor, tree) -> set[tuple[int, ...]]:
    """Root-to-node token paths (root excluded) of every node, from the parent pointers."""
    toks, parent = tokens.tolist(), tree.parent.tolist()
    paths = set()
    for node in range(1, len(toks)):
        path, at = [], node
        while at > 0:
            path.append(toks[at])
            at = parent[at]
        paths.add(tuple(reversed(path)))
    return paths


# tokens of the worked example tree [[0], [1], [0, 0], [0, 1], [1, 0]]: root 9; 10, 11; 12, 13 under 10; 14
EXAMPLE = build_tree_buffers([[0], [1], [0, 0], [0, 1], [1, 0]])
EXAMPLE_TOKENS = torch.tensor([9, 10, 11, 12, 13, 14])


@pytest.mark.parametrize("chain, new_nodes", [
    ([10, 12], 0),            # already in the tree: unchanged
    ([10, 12, 7, 8], 2),      # follows two nodes, then goes on below the second
    ([11, 15], 1),            # a second child under an existing node
    ([3, 4, 5], 3),           # a new branch from the root
    ([10], 0),
])
def test_graft_adds_exactly_the_chain(chain, new_nodes):
    tokens, tree = graft_chain(EXAMPLE_TOKENS, EXAMPLE, chain)
    assert tokens.numel() == EXAMPLE_TOKENS.numel() + new_nodes
    before = token_paths(EXAMPLE_TOKENS, EXAMPLE)
    after = token_paths(tokens, tree)
    assert after == before | {tuple(chain[:k]) for k in range(1, len(chain) + 1)}
    if new_nodes == 0:
        assert tree is EXAMPLE
        return
    # the grafted tree is what build_step_tree makes of its parents: mask, positions and paths agree
    again = build_step_tree(tree.parent, tree.depth)
    for name in ("attn_mask", "depth", "retrieve", "parent"):
        assert torch.equal(getattr(tree, name), getattr(again, name)), name
    # a node sees exactly itself and its ancestors; depth counts them
    for node in range(tokens.numel()):
        anc, at = {node}, node
        while tree.parent[at] >= 0:
            at = int(tree.parent[at])
            anc.add(at)
        assert set(tree.attn_mask[node].nonzero().flatten().tolist()) == anc
        assert int(tree.depth[node]) == len(anc) - 1
    # siblings keep distinct tokens
    for kids in tree.children:
        assert len({int(tokens[k]) for k in kids}) == len(kids)


def test_replay_counts_what_the_replies_confirm():
    """scripts/lookup_replay.py walks a reply as decoding would: no 2-gram match after the prefill's token,
    then (1, 2) matches the prompt and its 4 following tokens are all confirmed."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from lookup_replay import replay

    tau, per_step, confirmed = replay([([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 7])], 4, 2, 3)
    assert (tau, per_step, confirmed) == (3.0, 2.0, 1.0)  # steps: [] -> 1 token; [3, 4, 5, 6] -> 5 tokens
    tau, per_step, confirmed = replay([([1, 2, 3, 4, 5, 6], [1, 2, 3, 9, 5, 6, 7])], 4, 2, 3)
    # [] 1 token; [3, 4, 5, 6] 2 (3 confirmed, 9 the bonus); [] 1; [] 1; (5, 6) -> [1, 2, 3, 9] 1 (7, bonus)
    assert (tau, per_step, confirmed) == (6 / 5, 8 / 5, 1 / 8)


def test_graft_shapes_are_built_once_per_tree():
    """Two chains leaving the tree at the same node with as many new tokens share one grafted tree (its shape
    does not depend on the tokens); the tokens are each chain's own."""
    tree = build_tree_buffers([[0], [1], [0, 0], [0, 1], [1, 0]])
    first_tokens, first = graft_chain(EXAMPLE_TOKENS, tree, [10, 12, 7, 8])
    second_tokens, second = graft_chain(EXAMPLE_TOKENS, tree, [10, 12, 3, 4])
    assert second is first and list(tree.grafted) == [(3, 2)]
    assert first_tokens[-2:].tolist() == [7, 8] and second_tokens[-2:].tolist() == [3, 4]
    third_tokens, third = graft_chain(EXAMPLE_TOKENS, tree, [10, 12, 7])
    assert third is not first and third.size == first.size - 1 and third_tokens[-1] == 7
