"""scripts/build_tree.py: the path-conditional statistic, greedy tree growth and the saved counts."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import build_tree  # noqa: E402
from build_tree import grow_tree, load_counts, rank_vectors, save_counts, step_time  # noqa: E402

V = 16


class FixedLogitModel:
    """Stands in for HydraModel: the base model's greedy choices and each head's rank of its target are
    given."""

    def __init__(self, greedy: list[int], head_ranks: list[list[int]]):
        self.greedy, self.head_ranks = greedy, head_ranks
        self.config = SimpleNamespace(hydra_num_heads=len(head_ranks))
        self.heads = SimpleNamespace(draft_vocab=None)

    def __call__(self, x: torch.Tensor):
        t = x.shape[1]
        base = torch.full((t, V), -1.0)
        base[torch.arange(t), torch.tensor(self.greedy)] = 1.0
        heads = []
        for d, ranks in enumerate(self.head_ranks):
            logits = torch.zeros(t, V)
            for pos, rank in enumerate(ranks):
                if pos + d + 1 >= t:
                    continue
                target = self.greedy[pos + d + 1]
                logits[pos, target] = 0.5
                others = [v for v in range(V) if v != target][:rank]
                logits[pos, others] = 1.0  # exactly `rank` tokens score above the target
            heads.append(logits)
        return SimpleNamespace(base_hidden=base[None], head_hidden=torch.stack(heads)[:, None])

    def base_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def head_logits(self, d: int, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def test_rank_vectors_counts_accepted_path_prefixes():
    # data 1 2 3 4; the base model's greedy choice after each position is 2 3 4 9 (the data is its own output)
    model = FixedLogitModel(greedy=[2, 3, 4, 9], head_ranks=[[0, 1, 0, 0], [2, 0, 0, 0]])
    counts = rank_vectors(model, [[1, 2, 3, 4]], [[True] * 4], max_rank=10)
    # t=0: head 0 right at rank 0, head 1 at rank 2; t=1: ranks 1 then 0; t=2: head 0 rank 0, head 1 has no
    # target inside the row; t=3: nothing to guess.
    assert counts == Counter({(): 4, (0,): 2, (0, 2): 1, (1,): 1, (1, 0): 1})


def test_rank_vectors_stops_where_the_data_leaves_the_greedy_path():
    # the data token at position 2 (4) is not the base model's choice there (5): depth 2 is unreachable from
    # t=0
    model = FixedLogitModel(greedy=[2, 5, 4, 9], head_ranks=[[0, 0, 0, 0], [0, 0, 0, 0]])
    counts = rank_vectors(model, [[1, 2, 3, 4]], [[True, True, False, False]], max_rank=10)
    # t=1 is off the path already; masked positions are not counted
    assert counts == Counter({(): 2, (0,): 1})


def test_rank_vectors_caps_ranks():
    model = FixedLogitModel(greedy=[2, 3, 4, 9], head_ranks=[[5, 0, 0, 0], [0, 0, 0, 0]])
    counts = rank_vectors(model, [[1, 2, 3, 4]], [[True, False, False, False]], max_rank=5)
    assert counts == Counter({(): 1})  # rank 5 is outside a max_rank of 5: no node can hold it


def test_grow_tree_is_greedy_by_frequency_and_keeps_parents_first():
    counts = Counter({(): 100, (0,): 50, (1,): 20, (2,): 5, (0, 0): 30, (0, 1): 10, (0, 0, 0): 25,
                      (1, 0): 12})
    choices, gain = grow_tree(counts, 4)
    assert choices == [[0], [0, 0], [0, 0, 0], [1]]
    assert abs(gain - (50 + 30 + 25 + 20) / 100) < 1e-12
    choices, _ = grow_tree(counts, 100)  # never more nodes than were ever accepted
    assert len(choices) == 7
    for path in choices:  # every node's parent and older sibling come before it
        seen = choices[: choices.index(path)]
        assert len(path) == 1 or path[:-1] in seen
        assert path[-1] == 0 or path[:-1] + [path[-1] - 1] in seen


def test_counts_round_trip(tmp_path):
    counts = Counter({(): 7, (0,): 3, (0, 2): 1, (1,): 2})
    save_counts(counts, tmp_path / "sub" / "counts.json")
    assert load_counts(tmp_path / "sub" / "counts.json") == counts


def test_a_step_time_lost_in_noise_is_an_error_not_a_choice(monkeypatch):
    """step_time is (longer runs - shorter runs) / steps; where noise makes that <= 0 (a slow prefill, too few
    timed steps) it refuses rather than hand the size choice a step that costs nothing."""
    import pytest

    durations = {}
    monkeypatch.setattr(build_tree, "generate", lambda model, prompt, cfg, speculative: durations.update(
        now=durations.get("now", 0.0) + durations["cost"](cfg.max_steps)))
    monkeypatch.setattr(build_tree.time, "perf_counter", lambda: durations.get("now", 0.0))
    durations["cost"] = lambda steps: 5.0 + 0.1 * steps  # a 5 s prefill, 0.1 s a step
    assert step_time(None, [1, 2], [[0]], steps=4) == pytest.approx(0.1)
    # the short runs' prefills happened to be 0.1 s slower: more than 4 steps cost
    durations["cost"] = lambda steps: (5.1 if steps == 2 else 5.0) + 0.01 * steps
    with pytest.raises(ValueError, match="raise --timing-steps"):
        step_time(None, [1, 2], [[0]], steps=4)
