"""hydra/model/acceptance.py: greedy, typical and exact acceptance on hand-built fixed logits.

The base model is replaced by a (T, V) logits table written by hand for a small tree, so every expected
outcome (accepted nodes, bonus token, typical thresholds, sampling distributions) is computed independently
of the code under test.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from helpers import assert_matches, chi2_pvalue, chi2_quantile

from hydra.model.acceptance import (
    exact_accept,
    greedy_accept,
    greedy_walk,
    tempered_probs,
    top1,
    typical_accept,
)
from hydra.model.trees import MC_SIM_7B_63, StepTree, build_tree_buffers

# Tree order: 0 root, 1 [0], 2 [1], 3 [0,0], 4 [0,1], 5 [1,0].
TREE = build_tree_buffers([[0], [1], [0, 0], [0, 1], [1, 0]])
V = 8
R, A, B, C, D, E = 7, 1, 2, 3, 4, 5  # the tokens on the tree nodes
TOKENS = torch.tensor([R, A, B, C, D, E])


def _argmax_logits(argmax: list[int]) -> torch.Tensor:
    """(T, V) logits whose row i has its argmax at argmax[i] (the base model's greedy token after node i)."""
    logits = torch.randn(len(argmax), V, generator=torch.Generator().manual_seed(0))
    logits[torch.arange(len(argmax)), torch.tensor(argmax)] = 10.0
    return logits


def _log(rows: list[list[float]]) -> torch.Tensor:
    p = torch.tensor(rows, dtype=torch.float64)
    assert torch.allclose(p.sum(-1), torch.ones(len(rows), dtype=torch.float64))
    return p.log().float()


def _spread(fixed: dict[int, float], v: int = V) -> list[float]:
    """A probability row with the given entries and the rest of the mass spread evenly."""
    rest = (1.0 - sum(fixed.values())) / (v - len(fixed))
    return [fixed.get(i, rest) for i in range(v)]


# --- greedy -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argmax, accepted, bonus", [
    # never: the base model's root token is neither draft -> only the root, next = argmax at the root
    ([6, 0, 0, 0, 0, 0], [0], 6),
    # always: every draft on the [0,0] path is the argmax -> deepest path, bonus from the leaf's row
    ([A, C, E, 6, 0, 0], [0, 1, 3], 6),
    # a second-ranked grandchild wins
    ([A, D, 0, 0, 3, 0], [0, 1, 4], 3),
    # the second branch wins at depth 1, then stops
    ([B, C, 6, 0, 0, 0], [0, 2], 6),
    # the second branch wins all the way
    ([B, C, E, 0, 0, 2], [0, 2, 5], 2),
    # first branch accepted at depth 1 only
    ([A, 0, E, 0, 0, 0], [0, 1], 0),
])
def test_greedy_fixed_logits(argmax, accepted, bonus):
    got, nxt = greedy_accept(_argmax_logits(argmax), TOKENS, TREE)
    assert got.tolist() == accepted
    assert nxt == bonus


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_top1_is_argmax_with_ties_and_nan(dtype):
    """top1 stands in for argmax: the same first index of the largest value, ties and NaN included."""
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0)).to(dtype)
    logits[:32, 7] = logits[:32].max(-1).values  # a tie with the row's maximum, at an earlier index
    logits[40, 500] = float("nan")  # NaN counts as the largest, as in argmax
    assert torch.equal(top1(logits), logits.argmax(-1))
    assert torch.equal(top1(logits[3]), logits[3].argmax())


def test_greedy_plain_step_is_the_root_and_its_argmax():
    plain = StepTree(torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, dtype=torch.long),
                     torch.zeros(1, 1, dtype=torch.long), torch.full((1,), -1))  # as generate's plain step
    logits = torch.zeros(1, V)
    logits[0, 4] = 2.0
    got, nxt = greedy_accept(logits, torch.tensor([9]), plain)
    assert got.tolist() == [0] and nxt == 4


def test_greedy_sentinel_never_matches():
    # Every argmax is token 0 and the padded slot would read node T-1 in the original's -1 padding bug: with
    # leaves of different depths, a wrong pad must not extend a path.
    tree = build_tree_buffers([[0], [1], [0, 0]])  # leaves [0,0] (depth 2) and [1] (depth 1, padded)
    tokens = torch.tensor([5, 0, 0, 0])  # all drafts are token 0
    logits = torch.zeros(4, V)
    logits[:, 0] = 1.0
    got, nxt = greedy_accept(logits, tokens, tree)
    assert got.tolist() == [0, 1, 3] and nxt == 0


def _all_paths(tree):
    """Every root-to-node path as a list of node ids."""
    out = set()
    t = tree.size
    for row in tree.retrieve.tolist():
        nodes = [x for x in row if x != t]
        for k in range(1, len(nodes) + 1):
            out.add(tuple(nodes[:k]))
    return sorted(out)


def test_greedy_matches_brute_force_on_mc_sim():
    tree = build_tree_buffers(MC_SIM_7B_63)
    paths = _all_paths(tree)
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        v = 4  # a tiny vocabulary so that long matches (and duplicate tokens) happen
        tokens = torch.randint(0, v, (tree.size,), generator=gen)
        logits = torch.randn(tree.size, v, generator=gen)
        pred = logits.argmax(-1)
        ok = [p for p in paths if all(tokens[c] == pred[u] for u, c in zip(p, p[1:], strict=False))]
        best = max(len(p) for p in ok)
        got, nxt = greedy_accept(logits, tokens, tree)
        assert tuple(got.tolist()) in ok and len(got) == best
        assert nxt == int(pred[got[-1]])


def _logged_row(logits: torch.Tensor, read: list[int], i: int) -> torch.Tensor:
    read.append(i)
    return logits[i]


def test_greedy_walk_equals_greedy_accept_reading_only_the_path():
    """The walk (siblings distinct, as every proposal and graft makes them) accepts what greedy_accept does
    and reads the logits of the root and the accepted nodes only."""
    tree = build_tree_buffers(MC_SIM_7B_63)
    gen = torch.Generator().manual_seed(1)
    v = 12  # more than any node's children, few enough that long matches happen
    lengths = set()
    for _ in range(200):
        tokens = torch.zeros(tree.size, dtype=torch.long)
        for kids in tree.children:
            tokens[kids] = torch.randperm(v, generator=gen)[:len(kids)]
        logits = torch.randn(tree.size, v, generator=gen)
        for u, kids in enumerate(tree.children):  # steer half the argmaxes onto a child
            if kids and torch.rand((), generator=gen) < 0.5:
                logits[u, tokens[kids[0]]] = 10.0
        read: list[int] = []
        got, nxt = greedy_walk(partial(_logged_row, logits, read), tokens, tree)
        want, want_next = greedy_accept(logits, tokens, tree)
        assert got.tolist() == want.tolist() and nxt == want_next
        assert read == got.tolist()
        lengths.add(len(got))
    assert len(lengths) >= 3  # short and long paths both walked


# --- typical ----------------------------------------------------------------------------------------------
def _threshold(p: list[float], eps: float = 0.09, alpha: float = 0.3) -> float:
    """min(eps, alpha * exp(-H(p))), H with the original's +1e-5 inside the log."""
    h = -sum(x * math.log(x + 1e-5) for x in p)
    return min(eps, alpha * math.exp(-h))


def _one_child_case(row: list[float], child: int):
    tree = build_tree_buffers([[0]])
    logits = _log([row, _spread({6: 0.5})])
    return typical_accept(logits, torch.tensor([R, child]), tree, temperature=1.0)


def test_typical_threshold_alpha_bound():
    """High entropy: alpha*exp(-H) < eps binds. Solve q = thr(q) by bisection, then probe q* +- 0.002."""
    v = 16

    def row(q):
        return [q] + [(1 - q) / (v - 1)] * (v - 1)  # child token 0 has probability q

    lo, hi = 1e-4, 0.09
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid < _threshold(row(mid)) else (lo, mid)
    q_star = lo
    assert 0.01 < q_star < 0.03  # about 0.3 / 16
    h = -sum(x * math.log(x + 1e-5) for x in row(q_star))
    assert 0.3 * math.exp(-h) < 0.09  # the alpha bound is the active one

    tree = build_tree_buffers([[0]])
    for q, accept in ((q_star + 0.002, True), (q_star - 0.002, False)):
        p = row(q)
        logits = torch.tensor([p, p], dtype=torch.float64).log().float()
        got, nxt = typical_accept(logits, torch.tensor([9, 0]), tree, temperature=1.0)
        assert got.tolist() == ([0, 1] if accept else [0]), q
        assert nxt == 1  # argmax of the last accepted row (tokens 1..15 tie; argmax takes the first)


def test_typical_threshold_eps_bound():
    """Low entropy: eps = 0.09 binds (alpha*exp(-H) is larger)."""
    for q, accept in ((0.092, True), (0.088, False)):
        row = _spread({0: 0.85, 1: q}, v=V)
        thr = _threshold(row)
        assert thr == 0.09 and (q > thr) == accept
        got, nxt = _one_child_case(row, child=1)
        assert got.tolist() == ([0, 1] if accept else [0])
        assert nxt == (6 if accept else 0)  # argmax of the accepted node's row / of the root row


def test_typical_temperature_changes_the_decision():
    # At T=1 the child (p=0.06) is below eps=0.09 (alpha bound 0.3*exp(-H) ~ 0.13 is inactive); at T=3 the
    # row flattens and the alpha bound drops below the child's tempered probability.
    row = _spread({0: 0.8, 1: 0.06}, v=V)
    logits = _log([row, _spread({6: 0.5})])
    tree = build_tree_buffers([[0]])
    decisions = {}
    for t in (1.0, 3.0):
        p = torch.softmax(logits[0].double() / t, -1).tolist()
        expect = p[1] > _threshold(p)
        got, _ = typical_accept(logits, torch.tensor([R, 1]), tree, temperature=t)
        assert (len(got) == 2) == expect
        decisions[t] = expect
    assert decisions == {1.0: False, 3.0: True}


def test_typical_never_and_always():
    never = _log([_spread({0: 0.99}), *[_spread({0: 0.99})] * 5])  # drafts all have p ~ 0.0014
    got, nxt = typical_accept(never, TOKENS, TREE, temperature=1.0)
    assert got.tolist() == [0] and nxt == 0
    onehot = torch.full((6, V), -30.0)
    for node, tok in enumerate([A, C, E, 6, 6, 6]):
        onehot[node, tok] = 0.0
    got, nxt = typical_accept(onehot, TOKENS, TREE, temperature=1.0)
    assert got.tolist() == [0, 1, 3] and nxt == 6


@pytest.mark.parametrize("p_c, winner", [(0.2, [0, 2, 5]), (0.7, [0, 1, 3])])
def test_typical_tie_break_by_log_prob(p_c, winner):
    """Two paths of accepted length 2: [a, c] with 0.5 * p_c and [b, e] with 0.4 * 0.6 = 0.24; the larger
    product wins whatever the branch order."""
    rows = [
        _spread({A: 0.5, B: 0.4}),
        _spread({0: 0.75 - p_c, C: p_c, D: 0.01}),  # D below every threshold
        _spread({E: 0.6, 0: 0.3}),
        _spread({6: 0.9}), _spread({6: 0.9}), _spread({7: 0.9}),
    ]
    for parent, child in ((0, A), (0, B), (1, C), (2, E)):
        assert rows[parent][child] > _threshold(rows[parent])
    assert rows[1][D] < _threshold(rows[1])
    got, nxt = typical_accept(_log(rows), TOKENS, TREE, temperature=1.0)
    assert got.tolist() == winner
    assert nxt == (7 if winner[-1] == 5 else 6)


def test_typical_longest_path_beats_higher_probability():
    rows = [
        _spread({A: 0.6, B: 0.3}),
        _spread({0: 0.9}),  # nothing accepted after a
        _spread({E: 0.15, 0: 0.8}),  # e just accepted: 0.3 * 0.15 < 0.6
        _spread({6: 0.9}), _spread({6: 0.9}), _spread({7: 0.9}),
    ]
    assert rows[2][E] > _threshold(rows[2])
    got, nxt = typical_accept(_log(rows), TOKENS, TREE, temperature=1.0)
    assert got.tolist() == [0, 2, 5] and nxt == 7


def test_typical_matches_brute_force_on_mc_sim():
    tree = build_tree_buffers(MC_SIM_7B_63)
    paths = _all_paths(tree)
    gen = torch.Generator().manual_seed(1)
    for _ in range(60):
        v = 5
        tokens = torch.randint(0, v, (tree.size,), generator=gen)
        logits = 2.0 * torch.randn(tree.size, v, generator=gen)
        p = torch.softmax(logits.double(), -1)
        thr = [_threshold(row) for row in p.tolist()]
        ok = [q for q in paths if all(p[u, tokens[c]] > thr[u] for u, c in zip(q, q[1:], strict=False))]
        best = max(len(q) for q in ok)
        score = {q: sum(math.log(p[u, tokens[c]]) for u, c in zip(q, q[1:], strict=False))
                 for q in ok if len(q) == best}
        got, nxt = typical_accept(logits, tokens, tree, temperature=1.0)
        got = tuple(got.tolist())
        assert got in score and score[got] == pytest.approx(max(score.values()), abs=1e-5)
        assert nxt == int(logits[got[-1]].argmax())


# --- exact sampling -----------------------------------------------------------------------------------------
def test_chi2_helpers():
    # Known quantiles: chi2_{0.999}(1) = 10.828, (10) = 29.588, (24) = 51.179.
    assert chi2_quantile(0.999, 1) == pytest.approx(10.828, abs=1e-3)
    assert chi2_quantile(0.999, 10) == pytest.approx(29.588, abs=1e-3)
    assert chi2_quantile(0.999, 24) == pytest.approx(51.179, abs=1e-3)
    assert abs(chi2_pvalue(chi2_quantile(0.999, 24), 24) - 0.001) < 1e-9
    # A sampler that is off by 5% fails the test.
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    gen = torch.Generator().manual_seed(0)
    biased = p + torch.tensor([-0.05, 0.05, 0.0, 0.0])
    counts = torch.bincount(torch.multinomial(biased, 20000, replacement=True, generator=gen), minlength=4)
    with pytest.raises(AssertionError, match="distribution differs"):
        assert_matches(counts, p)
    counts = torch.bincount(torch.multinomial(p, 20000, replacement=True, generator=gen), minlength=4)
    assert_matches(counts, p)


N_SAMPLES = 20000
P_ROOT = [0.28, 0.25, 0.2, 0.12, 0.08, 0.04, 0.02, 0.01]  # the base model's next-token distribution


def _emitted(path: torch.Tensor, nxt: int, tokens: torch.Tensor) -> list[int]:
    return tokens[path[1:]].tolist() + [nxt]


def test_exact_first_token_distribution():
    """Drafts a = token 1 (p 0.25) and b = token 0 (p 0.28) at the root; whatever is accepted or rejected,
    the first emitted token must be distributed as P_ROOT."""
    tokens = torch.tensor([R, 1, 0, 3, 4, 5])
    rows = [P_ROOT] + [_spread({6: 0.5})] * 5
    logits = _log(rows)
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(V)
    lengths = torch.zeros(3)
    for _ in range(N_SAMPLES):
        path, nxt = exact_accept(logits, tokens, TREE, temperature=1.0, generator=gen)
        counts[_emitted(path, nxt, tokens)[0]] += 1
        lengths[len(path) - 1] += 1
    assert_matches(counts, torch.tensor(P_ROOT))
    # P(first draft accepted) = 0.25; P(second) = 0.75 * 0.28 / 0.75 = 0.28: checks the renormalisation.
    assert lengths[0] / N_SAMPLES == pytest.approx(1 - 0.25 - 0.28, abs=0.015)


def _conditional(seed: int = 0) -> torch.Tensor:
    """p(x2 | x1) for a 5-token vocabulary: distinct, spread rows with every entry >= 0.03."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(5, 5, generator=gen, dtype=torch.float64) + 0.25
    return p / p.sum(-1, keepdim=True)


def test_exact_two_tokens_match_joint_distribution():
    """A synthetic base model over 5 tokens: p1 = P(x1), p2[x1] = P(x2 | x1). Each step verifies the tree
    [[0],[1],[0,0],[0,1],[1,0]] with fixed drafts; when a step emits fewer than two tokens, a second step is
    run from the new context, as the decoding loop does. The pair (x1, x2) must follow p1(x1) p2(x2|x1)."""
    v = 5
    p1 = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1], dtype=torch.float64)
    p2 = _conditional()
    tree = TREE
    tokens = torch.tensor([4, 1, 0, 2, 3, 1])  # a=1, b=0; a's children 2, 3; b's child 1
    third = torch.full((v,), 1.0 / v, dtype=torch.float64)  # rows of depth-2 nodes: irrelevant to (x1, x2)

    def logits_for(root_probs, after):
        rows = [root_probs] + [p2[int(tokens[i])] if after else third for i in (1, 2)] + [third] * 3
        return torch.stack(rows).log().float()

    first = logits_for(p1, after=True)
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(v, v)
    steps = torch.zeros(3)
    for _ in range(N_SAMPLES):
        path, nxt = exact_accept(first, tokens, tree, temperature=1.0, generator=gen)
        out = _emitted(path, nxt, tokens)
        steps[min(len(out), 3) - 1] += 1
        if len(out) < 2:  # next step: the context is now x1; verify a fresh tree rooted at x1
            x1 = out[0]
            path, nxt = exact_accept(logits_for(p2[x1], after=False), tokens, tree, 1.0, generator=gen)
            out = out + _emitted(path, nxt, tokens)
        counts[out[0], out[1]] += 1
    assert_matches(counts.flatten(), (p1[:, None] * p2).flatten())
    assert (steps > 500).all()  # all three cases (1, 2, 3 tokens in the first step) were exercised


def test_exact_rejected_siblings_are_never_the_next_token():
    tokens = torch.tensor([R, 1, 0, 3, 4, 5])
    logits = _log([P_ROOT] + [_spread({6: 0.5})] * 5)
    gen = torch.Generator().manual_seed(2)
    for _ in range(2000):
        path, nxt = exact_accept(logits, tokens, TREE, temperature=1.0, generator=gen)
        last = int(path[-1])
        assert nxt not in [int(tokens[c]) for c in TREE.children[last]]


def test_exact_certain_and_impossible_drafts():
    onehot = torch.full((6, V), -1e4)
    for node, tok in enumerate([A, C, E, 6, 6, 6]):
        onehot[node, tok] = 0.0
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        path, nxt = exact_accept(onehot, TOKENS, TREE, temperature=1.0, generator=gen)
        assert path.tolist() == [0, 1, 3] and nxt == 6
    onehot[0] = -1e4
    onehot[0, 6] = 0.0  # the base model is certain of a token that was not drafted
    for _ in range(50):
        path, nxt = exact_accept(onehot, TOKENS, TREE, temperature=1.0, generator=gen)
        assert path.tolist() == [0] and nxt == 6


def test_exact_is_reproducible_with_a_generator():
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(0))
    runs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(7)
        draws = (exact_accept(logits, TOKENS, TREE, 0.7, gen) for _ in range(30))
        runs.append([(p.tolist(), n) for p, n in draws])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 1e-9])
def test_tiny_temperatures_sample_the_argmax(temperature):
    """softmax(logits / T) overflows for a tiny T (nan); the limit is the argmax, and both sampling rules
    must act greedily there rather than fail (the server takes any temperature > 0)."""
    logits = _argmax_logits([A, C, E, 0, 0, 0]) * 50
    probs = tempered_probs(logits, temperature)
    assert torch.isfinite(probs).all()
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), V).float())
    greedy = greedy_accept(logits, TOKENS, TREE)
    gen = torch.Generator().manual_seed(0)
    exact = exact_accept(logits, TOKENS, TREE, temperature, generator=gen)
    typical = typical_accept(logits, TOKENS, TREE, temperature)
    for accepted, bonus in (exact, typical):
        assert accepted.tolist() == greedy[0].tolist() and bonus == greedy[1]


def test_tempered_probs_is_softmax_at_ordinary_temperatures():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1)) * 3
    for t in (0.3, 1.0, 2.0):
        torch.testing.assert_close(tempered_probs(logits, t), torch.softmax(logits / t, -1))
