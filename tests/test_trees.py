"""hydra/model/trees.py: tree validation and the static buffers decoding reads (mask, depths, paths, plan)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from hydra.model.trees import _TREE_DIR, MC_SIM_7B_63, TREES, build_tree_buffers, get_tree

# A worked example, small enough to check by hand: tree order root, [0], [1], [0,0], [0,1], [1,0].
EXAMPLE = [[0], [1], [0, 0], [0, 1], [1, 0]]


def _node_paths(tree) -> list[tuple[int, ...]]:
    """Rank path of every node in tree order (root = ())."""
    return [()] + [tuple(p) for p in tree.choices]


def _check_consistent(tree) -> None:
    """Invariants every tree must satisfy, derived from the node paths alone."""
    paths = _node_paths(tree)
    index = {p: i for i, p in enumerate(paths)}
    t = len(paths)
    assert tree.size == t
    assert paths == sorted(paths, key=lambda p: (len(p), p))  # tree order
    # Mask: node i sees exactly itself and its ancestors.
    expected = torch.zeros(t, t, dtype=torch.bool)
    for i, p in enumerate(paths):
        for k in range(len(p) + 1):
            expected[i, index[p[:k]]] = True
    assert torch.equal(tree.attn_mask, expected)
    assert torch.equal(tree.depth, torch.tensor([len(p) for p in paths]))
    # Children lists in rank order.
    for i, p in enumerate(paths):
        kids = [index[q] for q in paths if len(q) == len(p) + 1 and q[:-1] == p]
        assert tree.children[i] == kids
    # Retrieve: one row per leaf, root first, sentinel T after the leaf, every row a real root-to-leaf path.
    leaves = {i for i in range(t) if not tree.children[i]}
    assert tree.retrieve.shape == (len(leaves), tree.max_depth + 1)
    seen = set()
    for row in tree.retrieve.tolist():
        nodes = [x for x in row if x != t]
        assert row[len(nodes):] == [t] * (len(row) - len(nodes))  # padding only at the end, with T
        assert nodes[0] == 0 and nodes[-1] in leaves
        assert [paths[x] for x in nodes] == [paths[nodes[-1]][:k] for k in range(len(nodes))]
        seen.add(nodes[-1])
    assert seen == leaves
    # Expansion plan: replaying it on "rows = paths" must produce every depth's nodes in tree order, which is
    # exactly what the vectorised proposal does with token rows (decoding relies on it).
    rows = [()]
    for d in range(tree.max_depth):
        level = [rows[r] + (k,) for r, k in zip(tree.parent_row[d].tolist(), tree.rank[d].tolist())]
        assert level == [p for p in paths if len(p) == d + 1]
        assert tree.topk[d] == max(p[-1] for p in level) + 1
        rows = [level[j] for j in tree.expand[d].tolist()]
        assert rows == [p for p in level if tree.children[index[p]]]
    assert rows == []  # nothing at the last depth has children


def test_worked_example():
    tree = build_tree_buffers(EXAMPLE)
    assert tree.size == 6 and tree.max_depth == 2
    assert tree.choices == EXAMPLE
    rows = ["100000", "110000", "101000", "110100", "110010", "101001"]
    assert tree.attn_mask.tolist() == [[c == "1" for c in r] for r in rows]
    assert tree.depth.tolist() == [0, 1, 1, 2, 2, 2]
    # The original lists paths leaf-last-first ([[0,2,5],[0,1,4],[0,1,3]]); any order is fine.
    assert {tuple(r) for r in tree.retrieve.tolist()} == {(0, 2, 5), (0, 1, 4), (0, 1, 3)}
    assert tree.topk == [2, 2]
    assert tree.parent_row[0].tolist() == [0, 0] and tree.rank[0].tolist() == [0, 1]
    assert tree.expand[0].tolist() == [0, 1]  # both depth-1 nodes have children: 2 rows for head 1
    assert tree.parent_row[1].tolist() == [0, 0, 1] and tree.rank[1].tolist() == [0, 1, 0]
    assert tree.expand[1].tolist() == []
    assert tree.children == [[1, 2], [3, 4], [5], [], [], []]
    _check_consistent(tree)


def test_input_order_and_duplicates_do_not_matter():
    a = build_tree_buffers(EXAMPLE)
    b = build_tree_buffers([[1, 0], [0, 1], [1], [0, 0], [0], [0, 1]])
    for name in ("attn_mask", "depth", "retrieve"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert a.choices == b.choices and a.children == b.children


def test_mc_sim_7b_63_statistics():
    tree = build_tree_buffers(MC_SIM_7B_63)
    assert tree.size == 64 and tree.max_depth == 4
    assert Counter(tree.depth.tolist()) == {0: 1, 1: 10, 2: 28, 3: 23, 4: 2}
    assert tree.retrieve.shape == (42, 5)
    assert tree.topk == [10, 10, 10, 2]
    assert [len(x) for x in tree.parent_row] == [10, 28, 23, 2]
    # Rows each head runs on: 1 (root), 10, 10, 1.
    assert [len(x) for x in tree.expand] == [10, 10, 1, 0]
    assert len(tree.children[0]) == 10
    _check_consistent(tree)


def test_padding_uses_sentinel_slot_not_last_node():
    tree = build_tree_buffers(MC_SIM_7B_63)
    t = tree.size
    lengths = (tree.retrieve < t).sum(1)
    # leaves at depth 2..4 (+ root): every depth-1 node has children
    assert set(lengths.tolist()) == {3, 4, 5}
    for row, n in zip(tree.retrieve.tolist(), lengths.tolist()):
        assert row[n:] == [t] * (5 - n)
        assert t - 1 not in row or row.index(t - 1) == n - 1  # the last node appears only as a real leaf
    # A one-node tree: padding-free; a chain has no padding either.
    assert build_tree_buffers([[0]]).retrieve.tolist() == [[0, 1]]
    assert build_tree_buffers(TREES["chain_4"]).retrieve.tolist() == [[0, 1, 2, 3, 4]]
    # root, [0]=1, [1]=2, [0,0]=3: the short path [1] is padded with T=4, never with node 3.
    short = build_tree_buffers([[0], [0, 0], [1]])
    assert {tuple(r) for r in short.retrieve.tolist()} == {(0, 1, 3), (0, 2, 4)}


@pytest.mark.parametrize("bad, match", [
    ([[0, 0]], "missing parent"),
    ([[0], [0, 1]], "older sibling"),  # rank gap: [0,1] without [0,0]
    ([[1]], "older sibling"),
    ([[0], [2], [1, 0]], "older sibling"),
    ([[-1]], "negative rank"),
    ([], "at least one node"),
])
def test_invalid_trees_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        build_tree_buffers(bad)


def _shipped_trees():
    names = sorted(TREES) + sorted(p.stem for p in _TREE_DIR.glob("*.json"))
    return names


@pytest.mark.parametrize("name", _shipped_trees())
def test_every_shipped_tree_builds(name):
    choices = get_tree(name)
    tree = build_tree_buffers(choices)
    assert tree.size == len({tuple(p) for p in choices}) + 1
    _check_consistent(tree)


def test_get_tree_sources(tmp_path):
    assert get_tree("tree_16") is TREES["tree_16"]
    assert get_tree([(0,), (0, 0)]) == [[0], [0, 0]]
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"choices": EXAMPLE}))
    assert get_tree(str(path)) == EXAMPLE
    path.write_text(json.dumps(EXAMPLE))
    assert get_tree(str(path)) == EXAMPLE
    with pytest.raises(ValueError, match="unknown tree 'nope'.*mc_sim_7b_63"):
        get_tree("nope")


def test_to_device_keeps_everything():
    tree = build_tree_buffers(EXAMPLE).to("cpu")
    assert tree.size == 6 and tree.topk == [2, 2] and tree.children[0] == [1, 2]
    assert all(isinstance(x, torch.Tensor) for x in tree.parent_row + tree.rank + tree.expand)
