"""hydra/model/prompt_cache.py: a call that reuses what the previous one computed for a shared prefix decodes
the same tokens as a fresh call (fp32 greedy, tiny random models, every head type), reuses what it should,
and falls back to a full prefill where the kept state does not fit."""

from __future__ import annotations

import pytest
import torch
from test_generate import ARCHS, NEXT, make_base, make_cycle_base, random_heads

from hydra.model.generate import DecodeConfig, generate, hydra_generate
from hydra.model.prompt_cache import PromptCache

PROMPT = [3, 17, 40, 5, 9, 22, 8]


def reply(model, prompt, cache=None, speculative=True, max_new_tokens=24, **cfg):
    """(tokens, accepted lengths per step): the heads' drafts are a function of the context, so a call on
    reused rows and heads' state must accept exactly what a fresh call accepts, step by step."""
    config = DecodeConfig(stop_token_ids=[], max_new_tokens=max_new_tokens, prompt_cache=cache, **cfg)
    result = generate(model, prompt, config, speculative=speculative)
    return result.tokens, result.accept_lengths


def plain(model, prompt, max_new_tokens=24):
    return reply(model, prompt, speculative=False, max_new_tokens=max_new_tokens)[0]


@pytest.fixture(scope="module")
def base():
    return make_base(max_pos=256)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tree", ["tree_16", "dynamic:8", "none"])
def test_a_second_turn_reuses_the_first_and_decodes_the_same_tokens(base, arch, tree):
    model = random_heads(base, arch)
    cache = PromptCache()
    first = reply(model, PROMPT, cache, tree=tree)
    assert first == reply(model, PROMPT, tree=tree)
    second_prompt = PROMPT + first[0] + [11, 2, 33]
    second = reply(model, second_prompt, cache, tree=tree)
    # every token the first call handed out is cached but perhaps its last (a bonus token, never verified)
    assert cache.reused_tokens >= len(PROMPT) + len(first[0]) - 1
    assert second == reply(model, second_prompt, tree=tree)
    assert second[0] == plain(model, second_prompt)
    # a third turn that edits the history: only the shared prefix is reused
    edited = PROMPT[:4] + [1, 2, 3]
    third = reply(model, edited, cache, tree=tree)
    # (a prefix layer that reads the next token read the old token 4 into its row 3: that row is redone)
    assert cache.reused_tokens == (3 if arch == NEXT and tree != "none" else 4)
    assert third == reply(model, edited, tree=tree)


@pytest.mark.parametrize("arch", ["prefix-mlp", "prefix-mlp+next"])
def test_a_prefix_layer_needs_the_heads_state_of_the_kept_call(base, arch):
    """A plain (AR) call keeps no prefix-layer state, so a Hydra++ call after it prefills everything; a
    plain call after a Hydra++ one needs only the base model's rows."""
    model = random_heads(base, arch)
    cache = PromptCache()
    first = plain(model, PROMPT)
    reply(model, PROMPT, cache, speculative=False)
    prompt = PROMPT + first + [4]
    assert reply(model, prompt, cache) == reply(model, prompt)
    assert cache.reused_tokens == 0
    longer = prompt + reply(model, prompt)[0] + [5]
    assert reply(model, longer, cache, speculative=False)[0] == plain(model, longer)
    assert cache.reused_tokens >= len(prompt)


def test_rows_of_another_model_are_not_reused(base):
    cache = PromptCache()
    one, other = random_heads(base, "hydra-mlp"), random_heads(make_base(seed=3, max_pos=256), "hydra-mlp")
    prompt = PROMPT + reply(one, PROMPT, cache)[0]
    assert reply(other, prompt, cache) == reply(other, prompt)
    assert cache.reused_tokens == 0


def test_rows_of_another_dtype_are_not_reused():
    model = random_heads(make_base(max_pos=256), "hydra-mlp")
    cache = PromptCache()
    prompt = PROMPT + reply(model, PROMPT, cache)[0]
    model.to(torch.float64)
    assert reply(model, prompt, cache) == reply(model, prompt)
    assert cache.reused_tokens == 0


@pytest.mark.parametrize("part", ["heads", "base"])
def test_rows_of_weights_changed_in_place_are_not_reused(part):
    """Training between calls (an optimizer step, load_state_dict) changes the weights of the same model
    object: the kept rows and the prefix layer's state were computed with the old ones."""
    model = random_heads(make_base(max_pos=256), "prefix-mlp")
    cache = PromptCache()
    prompt = PROMPT + reply(model, PROMPT, cache)[0]
    module = model.heads.prefix if part == "heads" else model.base_model.model.layers[0].mlp
    with torch.no_grad():
        for weight in module.parameters():
            weight.copy_(torch.randn_like(weight) * weight.std())
    assert reply(model, prompt, cache) == reply(model, prompt)
    assert cache.reused_tokens == 0
    longer = prompt + [6, 7]  # unchanged weights since the last call: reused again
    assert reply(model, longer, cache) == reply(model, longer)
    assert cache.reused_tokens >= len(prompt)


def test_a_longer_call_than_the_kept_buffers_hold_copies_the_rows(base):
    model = random_heads(base, "prefix-mlp")
    cache = PromptCache()
    first, _ = reply(model, PROMPT, cache, max_new_tokens=4)
    kept = cache._kept[0].kv
    prompt = PROMPT + first + list(range(20, 40))
    assert reply(model, prompt, cache, max_new_tokens=100) == reply(model, prompt, max_new_tokens=100)
    assert cache.reused_tokens >= len(PROMPT) + len(first) - 1
    assert cache._kept[0].kv is not kept and cache._kept[0].kv.storage_len > kept.storage_len


@pytest.mark.parametrize("arch", ["hydra-mlp", "prefix-mlp+next"])
def test_a_call_stopped_between_steps_leaves_what_it_had_decided(arch):
    """A client that goes away closes the generator between steps: the next call reuses the rows of the
    tokens decided until then, and the stale rows after them are never read."""
    base = make_cycle_base(max_pos=256)
    model = random_heads(base, arch)
    cache = PromptCache()
    config = DecodeConfig(stop_token_ids=[], max_new_tokens=60, prompt_cache=cache)
    steps = hydra_generate(model, PROMPT, config)
    decided = [t for _, step in zip(range(4), steps, strict=False) for t in step.tokens]
    steps.close()
    prompt = PROMPT + decided + [1, 2]
    assert reply(model, prompt, cache) == reply(model, prompt)
    assert len(PROMPT) + len(decided) - 1 <= cache.reused_tokens


def test_cleared_and_identical_prompts(base):
    model = random_heads(base, "prefix-mlp")
    cache = PromptCache()
    prompt = PROMPT + reply(model, PROMPT, cache)[0]
    cache.clear()
    assert reply(model, prompt, cache) == reply(model, prompt)
    assert cache.reused_tokens == 0
    # the same prompt again (a regenerated reply): all but its last token reused, the same reply
    assert reply(model, prompt, cache) == reply(model, prompt)
    assert cache.reused_tokens == len(prompt) - 1


def test_a_refused_call_reports_nothing_reused(base):
    model = random_heads(base, "hydra-mlp")
    cache = PromptCache()
    prompt = PROMPT + reply(model, PROMPT, cache)[0]
    reply(model, prompt, cache)
    assert cache.reused_tokens > 0
    with pytest.raises(ValueError, match="temperature"):
        reply(model, prompt, cache, temperature=-1.0)
    assert cache.reused_tokens == 0


def test_a_prompt_cache_that_is_not_one_is_refused(base):
    model = random_heads(base, "hydra-mlp")
    with pytest.raises(ValueError, match="prompt_cache must be"):
        reply(model, PROMPT, cache={})


def test_exact_sampling_with_a_prompt_cache_is_seeded_like_a_fresh_call(base):
    """With a seed, a sampled reply on reused rows is the reply a fresh call samples (fp32: the kept rows
    equal a prefill's up to rounding far below these tiny models' probability gaps)."""
    model = random_heads(base, "prefix-mlp")
    cache = PromptCache()
    first, _ = reply(model, PROMPT, cache, temperature=1.0, seed=5)
    prompt = PROMPT + first + [9]
    sampled = reply(model, prompt, cache, temperature=1.0, seed=6)
    assert sampled == reply(model, prompt, temperature=1.0, seed=6)
    assert cache.reused_tokens > len(PROMPT)


def test_a_call_taken_over_by_a_later_one_stops(base):
    """Two calls cannot share one prompt cache at once: the later one takes the kept rows over (and writes
    into their buffers), so the earlier one, resumed, refuses to go on rather than decode from them."""
    model = random_heads(base, "prefix-mlp")
    cache = PromptCache()
    first, _ = reply(model, PROMPT, cache)
    earlier = hydra_generate(model, PROMPT + first, DecodeConfig(stop_token_ids=[], prompt_cache=cache))
    next(earlier)
    prompt = PROMPT + first + [7, 7]
    assert reply(model, prompt, cache) == reply(model, prompt)
    with pytest.raises(RuntimeError, match="taken over"):
        next(earlier)
    assert reply(model, prompt + [1], cache) == reply(model, prompt + [1])
    assert cache.reused_tokens >= len(prompt)


def test_entries_keep_interleaved_conversations_apart(base):
    """With two entries, two conversations taking turns each reuse their own earlier turns; with one, each
    turn finds the other conversation's tokens and shares nothing with them."""
    model = random_heads(base, "prefix-mlp")
    one, other = PROMPT, [30, 31, 32, 33, 34]
    for entries, expect_reuse in ((2, True), (1, False)):
        cache = PromptCache(entries)
        first_one = reply(model, one, cache)[0]
        first_other = reply(model, other, cache)[0]
        for prompt in (one + first_one + [5], other + first_other + [6]):
            assert reply(model, prompt, cache) == reply(model, prompt)
            assert (cache.reused_tokens >= len(prompt) - 8) == expect_reuse, (entries, cache.reused_tokens)
        assert len(cache._kept) == entries
    with pytest.raises(ValueError, match="at least one entry"):
        PromptCache(0)
