"""Candidate trees: static trees ("choices") with the buffers built from them once, dynamic tree specs, the
per-step tree a dynamic proposal selects, and `resolve_tree`, the one place that decides which tree a
decoding run uses.

A static tree is a list of paths of child ranks: [a] is the a-th ranked guess after the root, [a, b] the b-th
ranked guess after [a], and so on. The root (the token the base model already decided) is implicit. For
Medusa heads rank k at depth d is head d's k-th token whatever the path; for Hydra heads it is the k-th token
of head d conditioned on that node's own path, so every expanded node gets its own top-k.

A dynamic tree (`"dynamic:N"`, `"dynamic:N:D:K"`) is grown anew at every step from the heads' own
probabilities (EAGLE-2): expand depth by depth keeping the K best nodes by cumulative draft log-probability,
then verify the N best nodes of everything proposed (`select_step_tree`).

Every step's tree may also get a prompt-lookup branch (`graft_chain`, hydra.model.lookup); the tree "none"
has no head nodes, so such a step verifies the lookup branch alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from itertools import pairwise
from numbers import Integral
from pathlib import Path

import torch

# Medusa's / Hydra's default tree for Vicuna-7B (63 nodes, depth 4), as shipped by both original repositories.
MC_SIM_7B_63 = [
    [0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0], [0, 5],
    [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2], [3, 0], [0, 9], [8], [9],
    [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1], [0, 0, 4], [0, 0, 5], [0, 0, 0, 0], [0, 1, 1],
    [0, 0, 6], [0, 3, 0], [5, 0], [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0], [1, 4], [7, 0],
    [0, 1, 2], [2, 0, 0], [3, 1], [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1], [9, 0], [0, 6, 0],
    [0, 0, 0, 1], [1, 6], [0, 7, 0],
]

# Small generic trees (depth <= 4): a top-1 chain and hand-made bushy-at-the-top trees of 8, 16 and 32 nodes.
CHAIN_4 = [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]]
TREE_8 = [[0], [1], [2], [0, 0], [1, 0], [0, 1], [0, 0, 0], [0, 0, 0, 0]]
TREE_16 = [[0], [1], [2], [3], [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [2, 0], [0, 0, 0], [0, 0, 1],
           [0, 1, 0], [1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
TREE_32 = [[0], [1], [2], [3], [4], [0, 0], [0, 1], [0, 2], [0, 3], [1, 0], [1, 1], [1, 2], [2, 0], [2, 1],
           [3, 0], [4, 0], [0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 2, 0], [1, 0, 0],
           [1, 0, 1], [1, 1, 0], [2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0], [0, 1, 0, 0],
           [1, 0, 0, 0], [0, 0, 0, 2]]

# The tree when neither the caller nor the heads' config.json names one.
DEFAULT_TREE = "mc_sim_7b_63"
# No head nodes: the heads never run and a step verifies only its prompt-lookup branch (hydra.model.lookup).
NO_TREE = "none"

TREES: dict[str, list[list[int]]] = {
    "mc_sim_7b_63": MC_SIM_7B_63, "chain_4": CHAIN_4, "tree_8": TREE_8, "tree_16": TREE_16,
    "tree_32": TREE_32,
}
# Trees measured for a specific model and machine (scripts/build_tree.py) live as JSON files next to this one.
_TREE_DIR = Path(__file__).parent / "tree_files"


def tree_spec(tree: str | list | DynamicTree | None, heads_config) -> str | list | DynamicTree:
    """Which tree a decoding run uses, as written: `tree`, else the heads' config.tree, else DEFAULT_TREE.
    Only None means "not given": an empty tree or name is refused by `resolve_tree`, not defaulted."""
    return tree if tree is not None else heads_config.tree or DEFAULT_TREE


_BUILT: dict[tuple[str, str], TreeBuffers] = {}


def resolve_tree(tree: str | list | DynamicTree | None, heads_config,
                 device: torch.device | str = "cpu") -> TreeBuffers | DynamicTree:
    """The tree a decoding run uses (see `tree_spec`), built (static trees once per process and device) and
    checked against the number of heads, so bad input fails before any work. A `DynamicTree` is used as
    given (e.g. with costs measured on other hardware)."""
    spec, num_heads = tree_spec(tree, heads_config), heads_config.hydra_num_heads
    if isinstance(spec, DynamicTree):
        built = spec
    elif isinstance(spec, str) and spec.split(":")[0] == "dynamic":
        built = parse_dynamic_tree(spec, num_heads)
    else:
        choices = None if spec == NO_TREE else get_tree(spec)
        key = (str(choices), str(device))
        if key not in _BUILT:
            built = root_only_tree() if choices is None else build_tree_buffers(choices)
            _BUILT[key] = built.to(device)
        built = _BUILT[key]
    if built.max_depth > num_heads:
        raise ValueError(f"tree depth {built.max_depth} exceeds the number of heads ({num_heads}); "
                         "choose a shallower tree")
    return built


def get_tree(tree: str | list[list[int]]) -> list[list[int]]:
    """A tree by name (built-in or a JSON file in hydra/model/tree_files), by JSON path, or as given."""
    if not isinstance(tree, str):
        if not isinstance(tree, (list, tuple)):  # a ValueError, as for every bad tree (callers report those)
            msg = f"a tree is a name, a JSON file, a dynamic spec or a list of paths, not {tree!r}"
            raise ValueError(msg)  # noqa: TRY004
        return [list(p) if isinstance(p, (list, tuple)) else p for p in tree]  # build_tree_buffers checks
    if tree in TREES:
        return TREES[tree]
    for path in (_TREE_DIR / f"{tree}.json", Path(tree).expanduser()):
        if path.is_file():
            return _read_tree_file(path)
    names = sorted(TREES) + sorted(p.stem for p in _TREE_DIR.glob("*.json"))
    raise ValueError(f"unknown tree {tree!r}; known trees: {names}, or a JSON file with a 'choices' list, or "
                     "dynamic[:N[:DEPTH[:K]]][:fixed] (e.g. dynamic:8), or \"none\" (prompt lookup alone)")


def _read_tree_file(path: Path) -> list[list[int]]:
    """`{"choices": [[int, ...], ...]}` or a bare list of paths; anything else is a ValueError naming the
    file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"tree file {path} is not valid JSON ({e})") from None
    choices = data.get("choices") if isinstance(data, dict) else data
    if not isinstance(choices, list) or not all(_is_path(p) and min(p) >= 0 for p in choices):
        raise ValueError(f"tree file {path} must hold {{\"choices\": [[rank, ...], ...]}} or a bare list of "
                         "paths, each a non-empty list of ranks >= 0")
    return choices


def _is_path(p) -> bool:
    """A non-empty list (or tuple) of integer ranks (bools are not ranks)."""
    return (isinstance(p, (list, tuple)) and len(p) > 0
            and all(isinstance(r, Integral) and not isinstance(r, bool) for r in p))


@dataclass
class StepTree:
    """What verification and acceptance read about the tree of one step, in tree order (root first, every
    parent before its children); T = number of nodes including the root, D = depth.

    attn_mask:        (T, T) bool, node i sees node j iff j is i or one of its ancestors.
    depth:            (T,) long, position offset of each node (root 0).
    retrieve:         (L, D+1) long, node indices of each root-to-leaf path, padded with T (a sentinel slot).
    parent:           (T,) long, each node's parent (-1 for the root).
    """

    attn_mask: torch.Tensor
    depth: torch.Tensor
    retrieve: torch.Tensor
    parent: torch.Tensor

    @property
    def size(self) -> int:
        return self.attn_mask.shape[0]

    @cached_property
    def grafted(self) -> dict[tuple[int, int], StepTree]:
        """Trees `graft_chain` made from this one, by (node grafted under, nodes added): their shape does not
        depend on the tokens, so a static tree builds each one once per process."""
        return {}

    @cached_property
    def children(self) -> list[list[int]]:
        """Child node indices per node, in tree order (exact sampling walks them)."""
        kids: list[list[int]] = [[] for _ in range(self.size)]
        for i, p in enumerate(self.parent.tolist()[1:], start=1):
            kids[p].append(i)
        return kids


@dataclass
class TreeBuffers(StepTree):
    """A static tree: its `StepTree` plus the plan the proposal follows to fill it (built once per tree).

    parent_row[d]:    (N_{d+1},) for each node at depth d+1, the row of its parent among the expanded nodes
                      at depth d (the rows head d is evaluated on).
    rank[d]:          (N_{d+1},) its rank among its parent's children.
    expand[d]:        (E_{d+1},) indices, within depth d+1, of the nodes that have children (next rows).
    topk[d]:          how many ranks head d must provide (max rank + 1 at depth d+1).
    """

    choices: list[list[int]] = field(default_factory=list)
    parent_row: list[torch.Tensor] = field(default_factory=list)
    rank: list[torch.Tensor] = field(default_factory=list)
    expand: list[torch.Tensor] = field(default_factory=list)
    topk: list[int] = field(default_factory=list)

    @property
    def spec(self) -> list[list[int]]:
        return self.choices

    @property
    def max_depth(self) -> int:
        return len(self.topk)

    def to(self, device: torch.device | str) -> TreeBuffers:
        move = lambda xs: [x.to(device) for x in xs]  # noqa: E731
        return TreeBuffers(self.attn_mask.to(device), self.depth.to(device), self.retrieve.to(device),
                           self.parent.to(device), self.choices, move(self.parent_row), move(self.rank),
                           move(self.expand), self.topk)


def build_tree_buffers(choices: list[list[int]]) -> TreeBuffers:
    """Validate a tree (every prefix of a path is in the tree; ranks of siblings are 0..k-1) and build its
    buffers."""
    for p in choices:
        if not _is_path(p):
            raise ValueError(f"invalid tree: path {p!r} is not a non-empty list of integer ranks")
    paths = sorted({tuple(int(r) for r in p) for p in choices}, key=lambda p: (len(p), p))
    if not paths:
        raise ValueError("a tree needs at least one node")
    index = {(): 0} | {p: i + 1 for i, p in enumerate(paths)}
    for p in paths:
        if any(r < 0 for r in p) or p[:-1] not in index:
            raise ValueError(f"invalid tree: path {list(p)} has a negative rank or a missing parent "
                             f"{list(p[:-1])}")
        if p[-1] > 0 and p[:-1] + (p[-1] - 1,) not in index:
            raise ValueError(f"invalid tree: {list(p)} is listed but its older sibling "
                             f"{list(p[:-1] + (p[-1] - 1,))} is not")
    nodes = [()] + paths
    max_depth = max(len(p) for p in paths)
    step = build_step_tree(torch.tensor([-1] + [index[p[:-1]] for p in nodes[1:]]),
                           torch.tensor([len(p) for p in nodes]))
    children = step.children  # nodes are sorted, so children come in rank order
    parent_row, rank, expand, topk = [], [], [], []
    for d in range(max_depth):
        level = [p for p in nodes if len(p) == d]
        rows = {p: r for r, p in enumerate(q for q in level if children[index[q]])}
        nxt = [p for p in nodes if len(p) == d + 1]
        parent_row.append(torch.tensor([rows[p[:-1]] for p in nxt]))
        rank.append(torch.tensor([p[-1] for p in nxt]))
        expand.append(torch.tensor([k for k, p in enumerate(nxt) if children[index[p]]], dtype=torch.long))
        topk.append(max(p[-1] for p in nxt) + 1)
    return TreeBuffers(step.attn_mask, step.depth, step.retrieve, step.parent, [list(p) for p in paths],
                       parent_row, rank, expand, topk)


def root_only_tree(device: torch.device | str = "cpu") -> TreeBuffers:
    """The tree `NO_TREE`: the root alone, with nothing for the heads to fill."""
    root = torch.zeros(1, dtype=torch.long, device=device)
    step = build_step_tree(root - 1, root)
    return TreeBuffers(step.attn_mask, step.depth, step.retrieve, step.parent)


def build_step_tree(parent: torch.Tensor, depth: torch.Tensor) -> StepTree:
    """Mask and root-to-leaf paths of a tree given as parent indices (root first, parents before children)
    and depths, with tensor ops only: one pass per depth level, never one per node."""
    t, max_depth = parent.numel(), int(depth.max())
    device = parent.device
    # Walk every node up to the root at once; column depth(a) of row i holds ancestor a of node i. The walk
    # past the root lands on the sentinel T, whose writes go to a spare last column.
    up = torch.cat([torch.where(parent >= 0, parent, t), parent.new_full((1,), t)])
    col = torch.cat([depth, depth.new_full((1,), max_depth + 1)])
    ancestors = torch.full((t, max_depth + 2), t, dtype=torch.long, device=device)
    node = torch.arange(t, device=device)
    for _ in range(max_depth + 1):
        ancestors.scatter_(1, col[node][:, None], node[:, None])
        node = up[node]
    ancestors = ancestors[:, : max_depth + 1]
    mask = torch.zeros(t, t + 1, dtype=torch.bool, device=device).scatter_(1, ancestors, True)[:, :t]
    has_child = torch.zeros(t + 1, dtype=torch.bool, device=device).index_fill_(0, up[1:t], True)[:t]
    return StepTree(mask, depth, ancestors[~has_child], parent)


def select_step_tree(scores: torch.Tensor, parent: torch.Tensor, depth: torch.Tensor,
                     nodes: int) -> tuple[torch.Tensor, StepTree]:
    """The root and the `nodes` best candidates by cumulative draft log-probability, as a `StepTree`.

    Candidates come in proposal order (0 = the root, every parent before its children). A child's cumulative
    log-probability is its parent's plus a log-probability <= 0, so it never exceeds its parent's; with ties
    going to the lower index (a stable sort), the parent, proposed first, always ranks before the child and
    the selection holds every selected node's ancestors. Returns the selected candidates' indices in tree
    order and their tree."""
    best = torch.sort(scores[1:], descending=True, stable=True).indices[:nodes] + 1
    keep = torch.cat([best.new_zeros(1), best]).sort().values
    local = torch.full_like(parent, -1)
    local[keep] = torch.arange(keep.numel(), device=keep.device)
    kept_parent = torch.where(keep > 0, local[parent[keep].clamp(min=0)], -1)
    return keep, build_step_tree(kept_parent, depth[keep])


def graft_chain(tokens: torch.Tensor, tree: StepTree, chain: list[int]) -> tuple[torch.Tensor, StepTree]:
    """Add `chain`, guesses for the tokens after the root, to a step's tree as a path from the root: it
    follows the nodes whose tokens agree and goes on as new nodes (appended, so parents stay before children)
    from where it leaves them. Siblings stay distinct tokens, as the acceptance rules expect. Returns the
    tokens and tree unchanged when the tree already holds the whole chain."""
    node_tokens, children = tokens.tolist(), tree.children
    start, taken = 0, 0  # the deepest node on the chain's path so far, and the chain tokens it covers
    while taken < len(chain):
        child = next((c for c in children[start] if node_tokens[c] == chain[taken]), None)
        if child is None:
            break
        start, taken = child, taken + 1
    if taken == len(chain):
        return tokens, tree
    first, new = tree.size, len(chain) - taken
    if (start, new) not in tree.grafted:
        parent = torch.tensor([start, *range(first, first + new - 1)], dtype=tree.parent.dtype,
                              device=tree.parent.device)
        depth = torch.arange(1, new + 1, dtype=tree.depth.dtype, device=tree.depth.device)
        depth += int(tree.depth[start])
        tree.grafted[start, new] = build_step_tree(torch.cat([tree.parent, parent]),
                                                   torch.cat([tree.depth, depth]))
    added = torch.tensor(chain[taken:], dtype=tokens.dtype, device=tokens.device)
    return torch.cat([tokens, added]), tree.grafted[start, new]


@dataclass(frozen=True)
class StepCosts:
    """What the pieces of a speculative step cost, in one-token verification forwards (decoder + output
    layer): verification of T tokens (points (T, cost), interpolated linearly, extrapolated from the last
    two), one head call (head + draft projection + top-k), and the head context update. The defaults were
    measured with `scripts/profile_step.py --costs` for the default model in bf16 (eager, 2 threads, CPU);
    `INT4_STEP_COSTS` for its int4 base (README "Dynamic trees")."""

    verify: tuple[tuple[int, float], ...] = ((1, 1.0), (2, 1.05), (4, 1.12), (8, 1.23), (16, 1.48),
                                             (24, 1.75))
    head_call: float = 0.046
    context: float = 0.049

    def __post_init__(self):
        counts = [t for t, _ in self.verify]
        if len(counts) < 2 or len(set(counts)) != len(counts):
            raise ValueError(f"StepCosts.verify needs two or more (tokens, cost) points with distinct token "
                             f"counts to interpolate, got {self.verify!r}")

    def verify_costs(self, max_tokens: int) -> torch.Tensor:
        """(max_tokens + 1,) cost of verifying T tokens at index T (index 0 unused)."""
        pts = sorted(self.verify)
        out = [pts[0][1]]
        for t in range(1, max_tokens + 1):
            (t0, c0), (t1, c1) = next(((a, b) for a, b in pairwise(pts) if t <= b[0]), pts[-2:])
            out.append(c0 + (c1 - c0) * (t - t0) / (t1 - t0))
        return torch.tensor(out)


# The default model on its int4 base, decoder exported, 2 threads (`profile_step.py --quant int4 --compile
# --costs`): torch's int4 kernel computes rows four at a time, so verification cost rises in steps of 4
# tokens.
INT4_STEP_COSTS = StepCosts(
    verify=((1, 1.0), (2, 1.29), (3, 1.53), (4, 1.67), (5, 2.67), (8, 2.72), (9, 3.84), (12, 3.89),
            (13, 4.85), (16, 4.90), (20, 6.11), (24, 7.12)),
    head_call=0.115, context=0.179)


def base_step_costs(quant: str | None) -> StepCosts:
    """The measured costs for a base whose linears are `quant` (`hydra.model.quant.base_quant`)."""
    return INT4_STEP_COSTS if quant == "int4" else StepCosts()


@dataclass(frozen=True)
class DynamicTree:
    """A tree grown anew at every step from the heads' own confidence (EAGLE-2, Li et al. 2024).

    Expansion: depth by depth, the `topk` best nodes of the newest depth by cumulative draft log-probability
    each get their `topk` best children (one head call per depth over those nodes). Selection: the best
    `nodes` of all proposed nodes by the same score, which always includes their ancestors (see
    `select_step_tree`).
    Adaptive (the default): fewer nodes when the heads are unsure, chosen by `choose_size` from `costs`, and
    expansion stops early when the next depth cannot pay for its head call (`worth_expanding`).
    """

    nodes: int  # N: draft tokens verified at most (the root is verified too: N + 1 tokens)
    depth: int
    topk: int
    adaptive: bool = True
    costs: StepCosts | None = None  # None: the decoding base's (`base_step_costs`), filled in per run

    @property
    def size(self) -> int:  # tokens verified at most, root included
        return self.nodes + 1

    @property
    def max_depth(self) -> int:
        return self.depth

    @cached_property
    def verify_cost(self) -> torch.Tensor:
        return self.costs.verify_costs(self.size)


DYNAMIC_NODES, DYNAMIC_TOPK = 8, 4  # defaults of "dynamic" (N) and of K


def parse_dynamic_tree(spec: str, num_heads: int) -> DynamicTree:
    """`dynamic[:N[:DEPTH[:K]]][:fixed]`: N verified draft tokens at most (8), expansion depth (the number of
    heads), K nodes kept per depth (4); `fixed` verifies exactly N every step (no adaptive size)."""
    parts = spec.split(":")[1:]
    fixed = bool(parts) and parts[-1] == "fixed"
    numbers = parts[:-1] if fixed else parts
    try:
        values = [int(x) for x in numbers]
    except ValueError:
        values = []
    if len(values) != len(numbers) or len(values) > 3 or any(v < 1 for v in values):
        raise ValueError(f"bad dynamic tree {spec!r}: expected dynamic[:N[:DEPTH[:K]]][:fixed] with positive "
                         "integers, e.g. dynamic:8 or dynamic:16:4:4")
    nodes, depth, topk = values + [DYNAMIC_NODES, num_heads, DYNAMIC_TOPK][len(values):]
    return DynamicTree(nodes, depth, topk, adaptive=not fixed)


def worth_expanding(frontier_logp: torch.Tensor, tree: DynamicTree) -> bool:
    """Whether one more depth can pay for its head call: the nodes it adds are children of the frontier, and
    children's path probabilities sum to at most their parent's, so the frontier's total probability bounds
    the tokens the next depth can add (with draft probabilities read as acceptance rates)."""
    return not tree.adaptive or float(frontier_logp.exp().sum()) > tree.costs.head_call


def choose_size(scores: torch.Tensor, overhead: float, tree: DynamicTree) -> tuple[int, float]:
    """How many of the best candidates to verify: the n in [0, N] with the most expected tokens per unit of
    step time, (1 + sum of the n best path probabilities) / (overhead + verify cost of n + 1 tokens), where
    `overhead` is what the proposal already cost (head calls, context). Returns n and that rate; a rate
    below 1 (a plain forward's) means speculating did not pay this step. Not adaptive: always N (all the
    candidates when there are fewer)."""
    best = torch.sort(scores[1:], descending=True).values[: tree.nodes]
    expected = torch.cat([best.new_zeros(1), best.exp().cumsum(0)]) + 1
    rate = expected / (overhead + tree.verify_cost[1: best.numel() + 2].to(expected))
    n = int(rate.argmax()) if tree.adaptive else best.numel()
    return n, float(rate[n])
