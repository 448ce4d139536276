"""Other base families (Qwen2 with biases and sliding layers, Qwen3 with q/k norms, Mistral with a sliding
window) on tiny random configs: fp32 greedy Medusa / Hydra / Hydra++ decoding equals plain greedy decoding and
transformers' `generate`; exact sampling keeps a Qwen3 model's distribution; the Hydra++ prefix layer is the
base family's own decoder layer; a family that cannot take the tree mask gets an error naming it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import assert_first_two_tokens_follow_base, randomize_
from test_generate import oracle_heads, random_heads
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from hydra.model import HEAD_ARCHS, HydraConfig, HydraModel
from hydra.model.families import check_tree_attention
from hydra.model.generate import DecodeConfig, generate

VOCAB = 64
WINDOW = 8  # short enough that the 40-token replies below run well past it
PROMPTS = [[7], [3, 17, 40, 5, 9], [11, 2, 33, 33, 60, 1, 0, 45, 12, 8, 19, 23]]
TREES = ["chain_4", "tree_16", "mc_sim_7b_63", [[0], [1], [2]]]

FAMILIES = {  # config class, family-specific settings
    # 2 layers: Qwen2's second layer slides (layer i >= max_window_layers), its first attends fully.
    "qwen2": (Qwen2Config, dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen3": (Qwen3Config, dict(head_dim=8)),
    "mistral": (MistralConfig, dict(sliding_window=WINDOW, head_dim=8)),
}


def make_family_base(family: str, seed: int = 0, scale: float = 0.3, **overrides):
    """A seeded 2-layer GQA model of `family` with O(1) logits (random weights, norms near one)."""
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              attn_implementation="sdpa", tie_word_embeddings=False)
    config_class, settings = FAMILIES[family]
    kw.update(settings)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_class(**kw)).float().eval()
    randomize_(model, seed, scale)
    return model.requires_grad_(False)


def make_family_cycle_base(family: str, vocab: int, seed: int, beta: float, scale: float = 0.2):
    """As test_generate.make_cycle_base: mostly x -> x+1 (mod vocab), context-dependent through the layers."""
    model = make_family_base(family, seed, scale, vocab_size=vocab)
    e = torch.randn(vocab, 32, generator=torch.Generator().manual_seed(seed + 100))
    e = e / e.norm(dim=-1, keepdim=True) * 32 ** 0.5
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(e)
        model.lm_head.weight.copy_(beta * e.roll(1, 0) / 32 ** 0.5)
    return model


def run(model, prompt, speculative=True, **cfg):
    cfg.setdefault("stop_token_ids", [])
    cfg.setdefault("max_new_tokens", 40)
    return generate(model, prompt, DecodeConfig(**cfg), speculative=speculative)


def hf_greedy(base, prompt, n):
    """transformers' greedy `generate`, cut before the first EOS (as our loop stops there)."""
    with torch.no_grad():
        out = base.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                            attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    out = out[0, len(prompt):].tolist()
    eos = base.generation_config.eos_token_id
    return out[: out.index(eos)] if eos in out else out


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_base(request):
    return request.param, make_family_base(request.param)


# --- losslessness -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", HEAD_ARCHS)
def test_greedy_lossless(family_base, arch):
    family, base = family_base
    model = random_heads(base, arch)
    for prompt in PROMPTS:
        ar = run(model, prompt, speculative=False)
        with_eos = run(model, prompt, speculative=False, stop_token_ids=None)
        assert with_eos.tokens == hf_greedy(base, prompt, 40)
        for tree in TREES:
            out = run(model, prompt, tree=tree)
            assert out.tokens == ar.tokens, (family, arch, tree, prompt)
            assert out.finish_reason == "max_new_tokens"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_lossless_with_high_acceptance(family):
    """Oracle heads on a cycle model: long accepted paths, so the sliding-window tree mask is exercised on
    nodes deep in the tree, and KV compaction of non-first paths too."""
    base = make_family_cycle_base(family, VOCAB, seed=0, beta=4.0)
    for arch in HEAD_ARCHS:
        model = oracle_heads(base, arch)
        for prompt in PROMPTS:
            ar = run(model, prompt, speculative=False)
            for tree in ("chain_4", "mc_sim_7b_63"):
                out = run(model, prompt, tree=tree)
                assert out.tokens == ar.tokens, (family, arch, tree, prompt)
        assert run(model, PROMPTS[1], tree="mc_sim_7b_63").tau > 1.5, (family, arch)  # long paths accepted


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_sliding_window_matters(family):
    """The sliding window in these configs changes greedy outputs, so the tests above check it is honoured."""
    windowed = make_family_base(family)
    full = make_family_base(family, sliding_window=None) if family == "mistral" else \
        make_family_base(family, use_sliding_window=False)
    assert any(hf_greedy(windowed, p, 40) != hf_greedy(full, p, 40) for p in PROMPTS)


def test_exact_sampling_matches_base_distribution():
    """As test_generate's test on Llama, on Qwen3: the first two sampled tokens follow the base softmax."""
    base = make_family_cycle_base("qwen3", 16, seed=2, beta=2.5)
    model = oracle_heads(base, "hydra-mlp", num_heads=2)
    assert_first_two_tokens_follow_base(model, [3, 9, 4], [[0], [1], [2], [0, 0], [0, 1], [1, 0]])


# --- the prefix layer is the family's own -----------------------------------------------------------------
def test_prefix_layer_is_the_base_familys_own(family_base):
    family, base = family_base
    model = HydraModel(base, HydraConfig(hydra_num_heads=2, hydra_head_arch="prefix-mlp"))
    prefix = model.heads.prefix
    assert type(prefix.layer) is type(base.model.layers[0])
    assert type(prefix.norm) is type(base.model.norm)
    assert type(prefix.rotary_emb) is type(base.model.rotary_emb)
    names = set(model.heads.state_dict())
    if family == "qwen3":
        assert {"prefix.layer.self_attn.q_norm.weight", "prefix.layer.self_attn.k_norm.weight"} <= names
    if family == "qwen2":
        assert "prefix.layer.self_attn.q_proj.bias" in names
    if family in ("qwen2", "mistral"):
        assert prefix.config.sliding_window == WINDOW
    assert not any("embed_tokens" in n for n in names)


def test_heads_round_trip(tmp_path, family_base):
    family, base = family_base
    model = random_heads(base, "prefix-mlp")
    model.save_pretrained(tmp_path)
    loaded = HydraModel.from_pretrained(tmp_path, base_model=base)
    for k, v in model.heads.state_dict().items():
        assert torch.equal(v, loaded.heads.state_dict()[k]), k
    assert run(loaded, PROMPTS[2], tree="tree_16").tokens == run(model, PROMPTS[2], tree="tree_16").tokens


# --- what cannot take the tree mask -------------------------------------------------------------------------
def test_unsupported_family_is_named():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=64))
    with pytest.raises(ValueError, match="family 'gpt2' is not supported.*tree"):
        HydraModel(gpt2, HydraConfig(hydra_num_heads=2))


def test_flash_attention_is_refused():
    config = SimpleNamespace(model_type="qwen3", _attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="qwen3 with attn_implementation='flash_attention_2'"):
        check_tree_attention(config)
