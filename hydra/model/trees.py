"""Candidate trees ("choices") and the static buffers built from them once per tree.

A tree is a list of paths of child ranks: [a] is the a-th ranked guess after the root, [a, b] the b-th
ranked guess after [a], and so on. The root (the token the base model already decided) is implicit. For
Medusa heads rank k at depth d is head d's k-th token whatever the path; for Hydra heads it is the k-th token
of head d conditioned on that node's own path, so every expanded node gets its own top-k.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

# Medusa's / Hydra's default tree for Vicuna-7B (63 nodes, depth 4), as shipped by both original repositories.
MC_SIM_7B_63 = [
    [0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0], [0, 5], [0, 0, 1],
    [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2], [3, 0], [0, 9], [8], [9], [1, 0, 0],
    [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1], [0, 0, 4], [0, 0, 5], [0, 0, 0, 0], [0, 1, 1], [0, 0, 6],
    [0, 3, 0], [5, 0], [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0], [1, 4], [7, 0], [0, 1, 2],
    [2, 0, 0], [3, 1], [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1], [9, 0], [0, 6, 0],
    [0, 0, 0, 1], [1, 6], [0, 7, 0],
]

# Small generic trees (depth <= 4): a top-1 chain and hand-made bushy-at-the-top trees of 8, 16 and 32 nodes.
CHAIN_4 = [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]]
TREE_8 = [[0], [1], [2], [0, 0], [1, 0], [0, 1], [0, 0, 0], [0, 0, 0, 0]]
TREE_16 = [[0], [1], [2], [3], [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [2, 0], [0, 0, 0], [0, 0, 1], [0, 1, 0],
           [1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
TREE_32 = [[0], [1], [2], [3], [4], [0, 0], [0, 1], [0, 2], [0, 3], [1, 0], [1, 1], [1, 2], [2, 0], [2, 1], [3, 0],
           [4, 0], [0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 2, 0], [1, 0, 0], [1, 0, 1],
           [1, 1, 0], [2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0],
           [0, 0, 0, 2]]

TREES: dict[str, list[list[int]]] = {
    "mc_sim_7b_63": MC_SIM_7B_63, "chain_4": CHAIN_4, "tree_8": TREE_8, "tree_16": TREE_16, "tree_32": TREE_32,
}
# Trees measured for a specific model and machine (scripts/build_tree.py) live as JSON files next to this one.
_TREE_DIR = Path(__file__).parent / "tree_files"


def get_tree(tree: str | list[list[int]]) -> list[list[int]]:
    """A tree by name (built-in or a JSON file in hydra/model/tree_files), by JSON path, or as given."""
    if not isinstance(tree, str):
        return [list(p) for p in tree]
    if tree in TREES:
        return TREES[tree]
    for path in (_TREE_DIR / f"{tree}.json", Path(tree).expanduser()):
        if path.is_file():
            return _read_tree_file(path)
    names = sorted(TREES) + sorted(p.stem for p in _TREE_DIR.glob("*.json"))
    raise ValueError(f"unknown tree {tree!r}; known trees: {names} (or pass a JSON file with a 'choices' list)")


def _read_tree_file(path: Path) -> list[list[int]]:
    """`{"choices": [[int, ...], ...]}` or a bare list of paths; anything else is a ValueError naming the
    file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"tree file {path} is not valid JSON ({e})") from None
    choices = data.get("choices") if isinstance(data, dict) else data
    def is_rank(r) -> bool:
        return isinstance(r, int) and not isinstance(r, bool) and r >= 0

    if not isinstance(choices, list) or not all(isinstance(p, list) and p and all(map(is_rank, p)) for p in choices):
        raise ValueError(f"tree file {path} must hold {{\"choices\": [[rank, ...], ...]}} or a bare list of "
                         "paths, each a non-empty list of ranks >= 0")
    return choices


@dataclass
class TreeBuffers:
    """Everything decoding needs about one tree, in tree order (root first, then paths sorted by
    (depth, ranks)); T = number of nodes including the root, D = depth.

    attn_mask:        (T, T) bool, node i sees node j iff j is i or one of its ancestors.
    depth:            (T,) long, position offset of each node (root 0).
    retrieve:         (L, D+1) long, node indices of each root-to-leaf path, padded with T (a sentinel slot).
    parent_row[d]:    (N_{d+1},) for each node at depth d+1, the row of its parent among the expanded nodes
                      at depth d (the rows head d is evaluated on).
    rank[d]:          (N_{d+1},) its rank among its parent's children.
    expand[d]:        (E_{d+1},) indices, within depth d+1, of the nodes that have children (next rows).
    topk[d]:          how many ranks head d must provide (max rank + 1 at depth d+1).
    children:         python lists of child node indices per node, in rank order (for exact sampling).
    """

    choices: list[list[int]]
    attn_mask: torch.Tensor
    depth: torch.Tensor
    retrieve: torch.Tensor
    parent_row: list[torch.Tensor]
    rank: list[torch.Tensor]
    expand: list[torch.Tensor]
    topk: list[int]
    children: list[list[int]]

    @property
    def size(self) -> int:
        return self.attn_mask.shape[0]

    @property
    def max_depth(self) -> int:
        return len(self.topk)

    def to(self, device: torch.device | str) -> TreeBuffers:
        move = lambda xs: [x.to(device) for x in xs]  # noqa: E731
        return TreeBuffers(self.choices, self.attn_mask.to(device), self.depth.to(device), self.retrieve.to(device),
                           move(self.parent_row), move(self.rank), move(self.expand), self.topk, self.children)


def build_tree_buffers(choices: list[list[int]]) -> TreeBuffers:
    """Validate a tree (every prefix of a path is in the tree; ranks of siblings are 0..k-1) and build its
    buffers."""
    paths = sorted({tuple(p) for p in choices}, key=lambda p: (len(p), p))
    if not paths:
        raise ValueError("a tree needs at least one node")
    index = {(): 0} | {p: i + 1 for i, p in enumerate(paths)}
    for p in paths:
        if any(r < 0 for r in p) or p[:-1] not in index:
            raise ValueError(f"invalid tree: path {list(p)} has a negative rank or a missing parent {list(p[:-1])}")
        if p[-1] > 0 and p[:-1] + (p[-1] - 1,) not in index:
            raise ValueError(f"invalid tree: {list(p)} is listed but its older sibling "
                             f"{list(p[:-1] + (p[-1] - 1,))} is not")
    nodes = [()] + paths
    size, max_depth = len(nodes), max(len(p) for p in paths)
    mask = torch.zeros(size, size, dtype=torch.bool)
    for i, p in enumerate(nodes):
        for k in range(len(p) + 1):
            mask[i, index[p[:k]]] = True
    depth = torch.tensor([len(p) for p in nodes])
    children: list[list[int]] = [[] for _ in nodes]
    for i, p in enumerate(nodes[1:], start=1):
        children[index[p[:-1]]].append(i)  # nodes are sorted, so children come in rank order
    leaves = [p for p in nodes if not children[index[p]]]
    retrieve = torch.full((len(leaves), max_depth + 1), size, dtype=torch.long)
    for row, leaf in enumerate(leaves):
        for k in range(len(leaf) + 1):
            retrieve[row, k] = index[leaf[:k]]
    parent_row, rank, expand, topk = [], [], [], []
    for d in range(max_depth):
        level = [p for p in nodes if len(p) == d]
        rows = {p: r for r, p in enumerate(q for q in level if children[index[q]])}
        nxt = [p for p in nodes if len(p) == d + 1]
        parent_row.append(torch.tensor([rows[p[:-1]] for p in nxt]))
        rank.append(torch.tensor([p[-1] for p in nxt]))
        expand.append(torch.tensor([k for k, p in enumerate(nxt) if children[index[p]]], dtype=torch.long))
        topk.append(max(p[-1] for p in nxt) + 1)
    return TreeBuffers([list(p) for p in paths], mask, depth, retrieve, parent_row, rank, expand, topk, children)
