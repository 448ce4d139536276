"""hydra/model/trees.py: tree validation, the static buffers decoding reads (mask, depths, paths, plan), the
per-step selection of dynamic trees, the size rule, and resolve_tree."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from hydra.model import HydraConfig
from hydra.model.trees import (
    _TREE_DIR,
    DEFAULT_TREE,
    MC_SIM_7B_63,
    TREES,
    DynamicTree,
    StepCosts,
    build_tree_buffers,
    choose_size,
    get_tree,
    parse_dynamic_tree,
    resolve_tree,
    select_step_tree,
    tree_spec,
    worth_expanding,
)

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
        level = [rows[r] + (k,)
                 for r, k in zip(tree.parent_row[d].tolist(), tree.rank[d].tolist(), strict=True)]
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
    for row, n in zip(tree.retrieve.tolist(), lengths.tolist(), strict=True):
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


# --- dynamic trees: per-step selection ----------------------------------------------------------------------
def _random_candidates(seed: int, depth: int = 4, k: int = 3, ties: bool = False):
    """Candidates as an EAGLE-2 expansion makes them: proposal order, every parent before its children, a
    child's score = its parent's + a log-probability <= 0 (exactly 0 for some nodes when `ties`)."""
    gen = torch.Generator().manual_seed(seed)
    parent, depth_of, score = [-1], [0], [0.0]
    frontier = [0]
    for d in range(depth):
        new = []
        for u in frontier:
            for _ in range(k):
                logp = -float(torch.rand((), generator=gen)) * 3
                if ties and torch.rand((), generator=gen) < 0.3:
                    logp = 0.0  # a certain guess: the child ties with its parent
                parent.append(u)
                depth_of.append(d + 1)
                score.append(score[u] + logp)
                new.append(len(parent) - 1)
        frontier = sorted(new, key=lambda i: -score[i])[:k]
    return torch.tensor(score), torch.tensor(parent), torch.tensor(depth_of)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("nodes", [1, 4, 8, 16])
def test_select_step_tree_is_top_n_and_ancestor_closed(seed, nodes):
    scores, parent, depth = _random_candidates(seed, ties=seed % 2 == 1)
    keep, tree = select_step_tree(scores, parent, depth, nodes)
    kept = keep.tolist()
    assert kept[0] == 0 and kept == sorted(kept) and len(kept) == nodes + 1
    # the N best by score (ties to the lower index), brute force
    ranked = sorted(range(1, len(scores)), key=lambda i: (-float(scores[i]), i))[:nodes]
    assert sorted(ranked) == kept[1:]
    # ancestor-closed, and the tree's parents are the candidates' parents
    for i in kept[1:]:
        assert int(parent[i]) in kept
    local = {c: j for j, c in enumerate(kept)}
    assert tree.parent.tolist() == [-1] + [local[int(parent[c])] for c in kept[1:]]
    assert tree.depth.tolist() == depth[keep].tolist()
    # mask = self + ancestors, retrieve = one row per leaf (brute force, node by node)
    t = len(kept)
    ancestors = []
    for j in range(t):
        chain, a = [], j
        while a >= 0:
            chain.append(a)
            a = int(tree.parent[a])
        ancestors.append(chain[::-1])
    want_mask = torch.zeros(t, t, dtype=torch.bool)
    for j, chain in enumerate(ancestors):
        want_mask[j, chain] = True
    assert torch.equal(tree.attn_mask, want_mask)
    leaves = [j for j in range(t) if j not in tree.parent.tolist()]
    width = int(tree.depth.max()) + 1
    want_rows = [ancestors[j] + [t] * (width - len(ancestors[j])) for j in leaves]
    assert tree.retrieve.tolist() == want_rows
    assert tree.children == [[c for c in range(t) if int(tree.parent[c]) == j] for j in range(t)]


def test_select_step_tree_ties_keep_parents_first():
    """All guesses certain (log-prob 0): every score ties, and the selection must still be a tree."""
    parent = torch.tensor([-1, 0, 0, 1, 1, 3, 3])
    depth = torch.tensor([0, 1, 1, 2, 2, 3, 3])
    keep, tree = select_step_tree(torch.zeros(7), parent, depth, 3)
    assert keep.tolist() == [0, 1, 2, 3] and tree.parent.tolist() == [-1, 0, 0, 1]


# --- dynamic trees: spec, size rule, resolve_tree -----------------------------------------------------------
def test_parse_dynamic_tree():
    assert parse_dynamic_tree("dynamic", 4) == DynamicTree(8, 4, 4)
    assert parse_dynamic_tree("dynamic:16", 3) == DynamicTree(16, 3, 4)
    assert parse_dynamic_tree("dynamic:6:2:3:fixed", 4) == DynamicTree(6, 2, 3, adaptive=False)
    tree = parse_dynamic_tree("dynamic:5", 4)
    assert tree.size == 6 and tree.max_depth == 4
    for bad in ("dynamic:0", "dynamic:x", "dynamic:4:4:4:4", "dynamic:-1", "dynamic:4:fast", "dynamic:"):
        with pytest.raises(ValueError, match="bad dynamic tree.*dynamic\\[:N"):
            parse_dynamic_tree(bad, 4)


def test_resolve_tree_precedence_and_depth_check():
    heads = HydraConfig(hydra_num_heads=2)
    assert tree_spec(None, heads) == DEFAULT_TREE
    heads.tree = "tree_8"
    assert tree_spec(None, heads) == "tree_8" and tree_spec("chain_4", heads) == "chain_4"
    assert resolve_tree(EXAMPLE, heads).choices == EXAMPLE
    assert resolve_tree(EXAMPLE, heads) is resolve_tree(EXAMPLE, heads)  # built once
    assert resolve_tree("dynamic:4", heads) == DynamicTree(4, 2, 4)  # depth defaults to the number of heads
    for deep in ("tree_8", "dynamic:4:3"):
        with pytest.raises(ValueError, match="tree depth \\d exceeds the number of heads \\(2\\)"):
            resolve_tree(deep, heads)
    with pytest.raises(ValueError, match="unknown tree"):
        resolve_tree("no_such_tree", heads)
    # a typo names the dynamic form
    with pytest.raises(ValueError, match="unknown tree 'dynamic8'.*dynamic:8"):
        resolve_tree("dynamic8", heads)


def test_verify_costs_interpolate_and_extrapolate():
    costs = StepCosts(verify=((1, 1.0), (3, 1.2), (5, 2.0)))
    assert costs.verify_costs(7).tolist() == pytest.approx([1.0, 1.0, 1.1, 1.2, 1.6, 2.0, 2.4, 2.8])


def test_choose_size():
    costs = StepCosts(verify=((1, 1.0), (17, 1.0 + 16 * 0.05)), head_call=0.05, context=0.05)
    tree = DynamicTree(8, 4, 4, costs=costs)
    # root + candidates with path probabilities 0.9, 0.8, 0.5, 0.01...: the sure ones pay for their cost
    probs = torch.tensor([0.9, 0.8, 0.5] + [0.01] * 10)
    scores = torch.cat([torch.zeros(1), probs.log()])
    n, rate = choose_size(scores, overhead=0.1, tree=tree)
    assert n == 3 and rate == pytest.approx((1 + 2.2) / (0.1 + 1 + 3 * 0.05), rel=1e-5)
    # unsure heads: nothing is worth verifying and the step is slower than a plain one
    n, rate = choose_size(torch.cat([torch.zeros(1), torch.full((12,), -6.0)]), overhead=0.1, tree=tree)
    assert n == 0 and rate < 1
    # fixed trees always verify N
    fixed = DynamicTree(8, 4, 4, adaptive=False, costs=costs)
    assert choose_size(torch.cat([torch.zeros(1), torch.full((12,), -6.0)]), 0.1, fixed)[0] == 8
    assert choose_size(torch.zeros(4), 0.1, fixed)[0] == 3  # fewer candidates than N


def test_a_dynamic_tree_object_is_used_as_given_and_checked():
    tree = DynamicTree(6, 3, 2, costs=StepCosts(head_call=0.2))
    assert resolve_tree(tree, HydraConfig(hydra_num_heads=4)) is tree
    with pytest.raises(ValueError, match="tree depth 3 exceeds the number of heads \\(2\\)"):
        resolve_tree(tree, HydraConfig(hydra_num_heads=2))


def test_worth_expanding():
    tree = DynamicTree(8, 4, 4, costs=StepCosts(head_call=0.05))
    assert worth_expanding(torch.tensor([0.5, 0.02]).log(), tree)
    assert not worth_expanding(torch.tensor([0.03, 0.01]).log(), tree)
    assert worth_expanding(torch.tensor([0.03, 0.01]).log(), DynamicTree(8, 4, 4, adaptive=False))


@pytest.mark.parametrize("bad, match", [
    ([[]], "path \\[\\] is not a non-empty list of integer ranks"),
    ([[0], []], "path \\[\\] is not a non-empty list"),
    ([["a"]], "path \\['a'\\] is not"),
    ([0, 1], "path 0 is not a non-empty list"),  # flat list: one path meant, not two
    ([[0], [1.0]], "path \\[1.0\\] is not"),  # a float rank was accepted and crashed at decoding
    ([[0], [True]], "path \\[True\\] is not"),  # as in tree files, a bool is not a rank
    (5, "a tree is a name, a JSON file, a dynamic spec or a list of paths, not 5"),
    ([], "at least one node"),  # an explicit empty tree is refused, not replaced by the default
    ("", "unknown tree ''"),
])
def test_malformed_python_trees_rejected_clearly(bad, match):
    with pytest.raises(ValueError, match=match):
        resolve_tree(bad, HydraConfig(hydra_num_heads=4))


def test_tree_ranks_of_other_integer_types_are_accepted():
    np = pytest.importorskip("numpy")
    tree = resolve_tree([(0,), [np.int64(0), 0], (np.int32(1),)], HydraConfig(hydra_num_heads=4))
    assert tree.choices == [[0], [1], [0, 0]] and tree.topk == [2, 1]


@pytest.mark.parametrize("verify", [((1, 1.0),), ((1, 1.0), (1, 1.1), (4, 1.2))])
def test_step_costs_need_two_distinct_points(verify):
    with pytest.raises(ValueError, match="two or more"):
        StepCosts(verify=verify)
