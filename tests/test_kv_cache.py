"""hydra/model/kv_cache.py: the position-indexed TreeKVCache (update / keep / overflow) and its equivalence
with transformers' DynamicCache inside a real (tiny, GQA) Llama forward."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_base
from transformers import DynamicCache, LlamaForCausalLM

from hydra.model.families import tree_attention_mask
from hydra.model.kv_cache import TreeKVCache
from hydra.model.trees import build_tree_buffers

VOCAB = 96


def tiny_llama(attn: str = "sdpa", seed: int = 0) -> LlamaForCausalLM:
    """2-layer GQA Llama (4 query / 2 KV heads), fp32, weights large enough that logits are O(1)."""
    return make_tiny_base(VOCAB, seed=seed, scale=0.3, max_position_embeddings=128, attn_implementation=attn)


def _kv(n: int, start: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 2 heads, n, 3) keys/values whose entries identify the token: k = start + slot, v = -k."""
    k = (start + torch.arange(n, dtype=torch.float32))[None, None, :, None].expand(1, 2, n, 3).clone()
    return k, -k


# --- unit semantics ------------------------------------------------------------------------------------
def test_storage_dtype_keeps_values_exactly():
    """dtype=float32 stores bf16 keys/values exactly (a float32 cache for the fp32 attention of quantized
    bases) and returns float32 views; keep() moves rows the same way."""
    cache = TreeKVCache(num_layers=1, max_len=8, dtype=torch.float32)
    k, v = _kv(4, start=0.5)
    keys, values = cache.update(k.bfloat16(), v.bfloat16(), 0)
    assert keys.dtype == values.dtype == torch.float32
    assert torch.equal(keys, k.bfloat16().float()) and torch.equal(values, v.bfloat16().float())
    cache.keep(1, torch.tensor([3]))
    assert cache.get_seq_length() == 2
    assert torch.equal(cache.layers[0].buf_k[0, 0, :2, 0], torch.tensor([0.5, 3.5]))
    default = TreeKVCache(num_layers=1, max_len=4)
    assert default.update(k.bfloat16(), v.bfloat16(), 0)[0].dtype == torch.bfloat16


def test_update_appends_into_preallocated_buffer():
    cache = TreeKVCache(num_layers=1, max_len=10)
    assert cache.get_seq_length() == 0
    k, v = _kv(3)
    keys, values = cache.update(k, v, 0)
    assert torch.equal(keys, k) and torch.equal(values, v)
    buf = cache.layers[0].buf_k
    assert buf.shape == (1, 2, 10, 3)
    keys, values = cache.update(*_kv(4, start=3), 0)
    assert keys.shape == (1, 2, 7, 3) and keys[0, 0, :, 0].tolist() == list(range(7))
    assert torch.equal(values, -keys)
    assert cache.layers[0].buf_k.data_ptr() == buf.data_ptr()  # no reallocation
    assert keys.data_ptr() == buf.data_ptr()  # a view of the buffer


def test_one_length_moves_after_the_last_layer():
    """Every layer of a forward writes the same slots; the shared length moves once the last layer is written,
    so a forward interrupted part-way leaves the cache as it was."""
    cache = TreeKVCache(num_layers=3, max_len=10)
    cache.update(*_kv(2), 0)
    cache.update(*_kv(2), 1)
    assert cache.get_seq_length() == 0 and all(layer.get_seq_length() == 0 for layer in cache.layers)
    keys, _ = cache.update(*_kv(2), 2)
    assert keys.shape[2] == 2 and cache.get_seq_length() == 2
    assert all(layer.get_seq_length() == 2 and layer.keys.shape[2] == 2 for layer in cache.layers)
    keys, _ = cache.update(*_kv(3, start=50), 0)  # layer 0 of the next forward: slots 2..4
    assert keys[0, 0, :, 0].tolist() == [0, 1, 50, 51, 52] and cache.get_seq_length() == 2
    assert cache.layers[1].get_mask_sizes(3) == (5, 0)  # what transformers' mask code asks


def test_allocate_for_a_config_and_wrong_shapes():
    """allocate_for sizes the buffers from the model config before any forward (GQA heads, head_dim); keys of
    another shape are refused with the shapes named, and storage smaller than the capacity is refused."""
    config = tiny_llama().config  # 4 query heads, 2 KV heads, head_dim 8
    cache = TreeKVCache(config.num_hidden_layers, 10, storage_len=16)
    cache.allocate_for(config, torch.float32, "cpu", static=True)
    assert cache.layers[1].buf_k.shape == (1, 2, 16, 8) and cache.get_max_length() == 10
    k = torch.ones(1, 2, 3, 8)
    assert cache.update(k, -k, 0)[0].shape == (1, 2, 3, 8)
    with pytest.raises(ValueError, match=r"keys of shape \(1, 4, 3, 8\) do not fit"):
        cache.update(torch.ones(1, 4, 3, 8), torch.ones(1, 4, 3, 8), 1)
    with pytest.raises(ValueError, match="storage_len 4 < max_len 10"):
        TreeKVCache(2, 10, storage_len=4)


def test_keep_compacts_accepted_rows_and_drops_the_rest():
    cache = TreeKVCache(num_layers=2, max_len=12)
    for layer in range(2):
        cache.update(*_kv(3), layer)  # prefix: slots 0..2
    for layer in range(2):
        cache.update(*_kv(6, start=100), layer)  # a 6-node tree at slots 3..8 holding 100..105
    # Accept tree nodes 0, 2, 5 (a non-first branch): slots 3, 5, 8 move to 3, 4, 5.
    cache.keep(3, torch.tensor([3, 5, 8]))
    assert cache.get_seq_length() == 6
    for layer in cache.layers:
        assert layer.get_seq_length() == 6
        assert layer.buf_k[0, 0, :6, 0].tolist() == [0, 1, 2, 100, 102, 105]
        assert layer.buf_v[0, 1, :6, 2].tolist() == [0, -1, -2, -100, -102, -105]
    # The next update writes from slot 6; the returned view covers exactly the kept rows + the new ones.
    keys, _ = cache.update(*_kv(2, start=200), 0)
    assert keys[0, 0, :, 0].tolist() == [0, 1, 2, 100, 102, 105, 200, 201]


def test_keep_overlapping_and_contiguous_slots():
    cache = TreeKVCache(num_layers=1, max_len=10)
    cache.update(*_kv(8), 0)
    cache.keep(2, torch.tensor([3, 4, 6]))  # sources overlap the destinations 2..4
    assert cache.layers[0].buf_k[0, 0, :5, 0].tolist() == [0, 1, 3, 4, 6]
    assert cache.get_seq_length() == 5
    before = cache.layers[0].buf_k.clone()
    cache.keep(2, torch.tensor([2, 3]))  # already in place (the first branch): only the length moves
    assert torch.equal(cache.layers[0].buf_k, before) and cache.get_seq_length() == 4
    cache.keep(4, torch.tensor([], dtype=torch.long))
    assert cache.get_seq_length() == 4


def test_keep_on_layers_never_written_is_harmless():
    cache = TreeKVCache(num_layers=2, max_len=6)
    cache.keep(0, torch.tensor([0]))
    assert cache.get_seq_length() == 1


def test_batch_select_indices_keeps_chosen_rows_in_order():
    cache = TreeKVCache(num_layers=2, max_len=8)
    k = torch.arange(3, dtype=torch.float32)[:, None, None, None].expand(3, 2, 4, 3).clone()  # row b holds b
    for layer in range(2):
        cache.update(k, -k, layer)
    cache.batch_select_indices(torch.tensor([2, 0]))
    for layer in cache.layers:
        assert layer.keys.shape == (2, 2, 4, 3)
        assert torch.equal(layer.keys[:, 0, 0, 0], torch.tensor([2.0, 0.0]))
        assert torch.equal(layer.values[:, 0, 0, 0], torch.tensor([-2.0, 0.0]))
    assert cache.get_seq_length() == 4
    keys, _ = cache.update(k[:2, :, :1], -k[:2, :, :1], 0)  # later steps write the kept rows only
    assert keys.shape == (2, 2, 5, 3)


def test_overflow_raises_and_crop():
    cache = TreeKVCache(num_layers=1, max_len=5)
    cache.update(*_kv(4), 0)
    with pytest.raises(RuntimeError, match="overflow: 6 tokens > capacity 5"):
        cache.update(*_kv(2), 0)
    assert cache.get_seq_length() == 4  # the failed update left the cache as it was
    assert cache.layers[0].get_max_length() == 5


def test_crop_means_what_it_means_in_transformers():
    """Cache.crop(-k) removes k tokens, crop(0) removes none, crop(k > 0) is refused: checked side by side
    with transformers' own DynamicCache."""
    ours, theirs = TreeKVCache(num_layers=1, max_len=8), DynamicCache()
    for cache in (ours, theirs):
        cache.update(*_kv(5), 0)
    for arg in (0, -2, 0, -1):
        ours.crop(arg)
        theirs.crop(arg)
        assert ours.get_seq_length() == theirs.get_seq_length()
        torch.testing.assert_close(ours.layers[0].keys, theirs.layers[0].keys)
    assert ours.get_seq_length() == 2
    for cache in (ours, theirs):
        with pytest.raises(ValueError):
            cache.crop(1)
    ours.update(*_kv(1, start=10.0), 0)  # the next token lands right after the kept ones
    assert ours.get_seq_length() == 3 and float(ours.layers[0].keys[0, 0, 2, 0]) == 10.0


# --- inside a real forward ---------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_forward_matches_dynamic_cache(attn):
    model = tiny_llama(attn)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, VOCAB, (1, 7), generator=gen)
    chunks = [torch.randint(0, VOCAB, (1, n), generator=gen) for n in (1, 1, 3, 1)]
    ours, ref = TreeKVCache(model.config.num_hidden_layers, 32), DynamicCache(config=model.config)
    n = 0
    with torch.no_grad():
        for ids in [prompt] + chunks:
            pos = torch.arange(n, n + ids.shape[1])[None]
            a = model(input_ids=ids, position_ids=pos, past_key_values=ours, use_cache=True).logits
            b = model(input_ids=ids, past_key_values=ref, use_cache=True).logits
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            n += ids.shape[1]
            assert ours.get_seq_length() == ref.get_seq_length() == n


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("path", [[0, 1, 3], [0, 2, 5], [0, 1], [0]])
def test_tree_forward_then_keep_matches_plain_forward(attn, path):
    """Prefill, verify a tree in one forward, keep one root-to-node path (compaction), decode one more token:
    the logits equal a cache-free forward over prompt + path + next token."""
    model = tiny_llama(attn, seed=2)
    tree = build_tree_buffers([[0], [1], [0, 0], [0, 1], [1, 0]])
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, VOCAB, (1, 5), generator=gen)
    tokens = torch.randint(0, VOCAB, (tree.size,), generator=gen)
    nxt = torch.randint(0, VOCAB, (1, 1), generator=gen)
    n = prompt.shape[1]
    cache = TreeKVCache(model.config.num_hidden_layers, n + tree.size + 1)
    with torch.no_grad():
        model(input_ids=prompt, position_ids=torch.arange(n)[None], past_key_values=cache, use_cache=True)
        mask = tree_attention_mask(tree.attn_mask, n, torch.float32, as_bool=attn == "sdpa")
        model(input_ids=tokens[None], position_ids=(n + tree.depth)[None], past_key_values=cache,
              attention_mask=mask, use_cache=True)
        cache.keep(n, n + torch.tensor(path))
        assert cache.get_seq_length() == n + len(path)
        got = model(input_ids=nxt, position_ids=torch.tensor([[n + len(path)]]), past_key_values=cache,
                    use_cache=True).logits[0, -1]
        full = torch.cat([prompt, tokens[path][None], nxt], dim=1)
        want = model(input_ids=full).logits[0, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
