"""hydra.train.hidden_cache.HiddenCache: rows found by content, so a run on more data reuses the rows it
shares with earlier runs (the training loop's use of the cache is tested in test_train_script.py)."""

from __future__ import annotations

import pytest
import torch

from hydra.data.sharegpt import pack
from hydra.train.hidden_cache import HiddenCache

D, ARRAYS = 8, 2


def _cache(root, rows, create=True):
    cache = HiddenCache(root, {"model": "tiny"}, rows, D, ARRAYS, torch.bfloat16, create=create)
    return cache.open()


def _chats(n, start=0):
    return [{"input_ids": [start + i] * (3 + i % 4), "labels": [1] * (3 + i % 4)} for i in range(n)]


def test_more_data_reuses_the_rows_it_shares(tmp_path):
    """Chats appended to a training file pack into the same rows plus new ones (the last old row may take
    some of them): the shared rows are read back as written, only the others are missing, and the folder
    is the same."""
    old_rows = pack(_chats(10), max_length=12)
    new_rows = pack(_chats(10) + _chats(6, start=100), max_length=12)
    assert new_rows[:len(old_rows) - 1] == old_rows[:-1] and new_rows[len(old_rows) - 1] != old_rows[-1]

    old = _cache(tmp_path, old_rows)
    written = {}
    for r in range(len(old_rows)):
        written[r] = torch.randn(old.lengths[r], ARRAYS, D).bfloat16()
        old.put(r, written[r])
    assert old.filled() == len(old_rows)

    new = _cache(tmp_path, new_rows)
    assert new.folder == old.folder and len(list(tmp_path.iterdir())) == 1
    shared = len(old_rows) - 1
    for r in range(shared):
        assert torch.equal(new.get(r), written[r])
    assert new.missing(list(range(len(new_rows)))) == list(range(shared, len(new_rows)))
    fresh = torch.randn(new.lengths[shared], ARRAYS, D).bfloat16()
    new.put(shared, fresh)
    assert torch.equal(_cache(tmp_path, new_rows).get(shared), fresh)
    assert torch.equal(_cache(tmp_path, old_rows).get(0), written[0])  # the old run still finds its rows
    table = (old.folder / "rows.tsv").read_text().splitlines()
    assert len(table) == len(old_rows) + len(new_rows) - shared


def test_rows_differing_only_in_conversation_boundaries_are_different_rows(tmp_path):
    """The same tokens packed as one conversation or as two give different hidden states (position ids
    restart), so they must not share a row."""
    one = {"input_ids": [5, 6, 7, 8], "position_ids": [0, 1, 2, 3]}
    two = {"input_ids": [5, 6, 7, 8], "position_ids": [0, 1, 0, 1]}
    cache = _cache(tmp_path, [one, two])
    cache.put(0, torch.ones(4, ARRAYS, D))
    assert cache.get(1) is None and cache.missing([0, 1]) == [1]


def test_a_process_that_does_not_allocate_needs_the_rows_allocated(tmp_path):
    """Only the main process allocates; another process opening rows the table lacks is an error, not a
    read of another row's data."""
    rows = pack(_chats(4), max_length=12)
    _cache(tmp_path, rows)  # the main process
    assert _cache(tmp_path, rows, create=False).filled() == 0
    more = pack(_chats(4, start=50), max_length=12)
    with pytest.raises(RuntimeError, match="lacks 2 of this run's rows"):
        HiddenCache(tmp_path, {"model": "tiny"}, more, D, ARRAYS, torch.bfloat16, create=False).open()
