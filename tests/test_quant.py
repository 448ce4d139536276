"""Weight-only int4 / int8 base models (`hydra.model.quant`): the packed layers hold exactly the weights they
were given (the GGUF's own Q4_1 / Q8_0 blocks, or a re-quantised float model), and speculative decoding on a
quantized base reproduces plain greedy decoding of that same quantized base."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from helpers import make_heads

from hydra.model import HydraConfig, HydraModel
from hydra.model.attention import FP32_ATTENTION, attention_dtype, use_fp32_attention
from hydra.model.fused import FusedMember
from hydra.model.generate import DecodeConfig, generate
from hydra.model.quant import (
    GROUP,
    Int4Linear,
    Int8Linear,
    Q8Int4Linear,
    heads_quant_for,
    int4_from_weight,
    q4_1_blocks,
    q8_0_blocks,
    quantize_heads,
    quantize_model,
)

PROMPTS = [[7], [3, 17, 40, 5, 9], [11, 2, 33, 33, 60, 1, 0, 45, 12, 8, 19, 23]]
TREES = ["chain_4", "tree_16", [[0], [1], [0, 0], [0, 1], [1, 0]]]


def _random_weight(n: int, k: int, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    return (g.standard_normal((n, k)) * g.uniform(0.01, 1, (n, 1))).astype(np.float32)


def test_int4_kernel_layout():
    """Codes, scales and zeros go into torch's packed layout unchanged: W = (q - 8) * scale + zero."""
    torch.manual_seed(0)
    n, k = 48, 96
    codes = torch.randint(0, 16, (n, k))
    scale, zero = torch.rand(n, k // GROUP), torch.randn(n, k // GROUP)
    layer = Int4Linear(codes, scale, zero, torch.float32)
    want = (codes - 8) * scale.repeat_interleave(GROUP, 1) + zero.repeat_interleave(GROUP, 1)
    torch.testing.assert_close(layer.dequantize(), want, rtol=1e-6, atol=1e-6)
    x = torch.randn(2, 3, k)
    torch.testing.assert_close(layer(x), x @ want.T, rtol=1e-5, atol=1e-5)


def test_q4_1_blocks_match_gguf_dequantize():
    """The packed layer built from Q4_1 blocks (zero = m + 8d) is gguf's own dequantisation of those
    blocks."""
    n, k = 32, 128
    raw = quants.quantize(_random_weight(n, k), GGMLQuantizationType.Q4_1)
    ref = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType.Q4_1))
    codes, d, m = q4_1_blocks(raw, n, k)
    layer = Int4Linear(codes, d, m + 8 * d, torch.float32)
    torch.testing.assert_close(layer.dequantize(), ref, rtol=0, atol=1e-6 * float(ref.abs().max()))
    # bf16, the fast path: the codes are exact; only scale and zero are rounded to bf16 (8 significant bits).
    fast = Int4Linear(codes, d, m + 8 * d, torch.bfloat16).dequantize()
    bound = (8 * d.abs() + (m + 8 * d).abs()).repeat_interleave(GROUP, 1) * 2 ** -8
    assert ((fast - ref).abs() <= bound + 1e-6).all()


def test_q8_0_blocks_exact_through_the_int4_kernel():
    n, k = 32, 64
    raw = quants.quantize(_random_weight(n, k, seed=1), GGMLQuantizationType.Q8_0)
    ref = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType.Q8_0))
    q, d = q8_0_blocks(raw, n, k)
    layer = Q8Int4Linear(q, d, torch.float32)
    torch.testing.assert_close(layer.dequantize(), ref, rtol=0, atol=1e-6 * float(ref.abs().max()))
    x = torch.randn(5, k)
    torch.testing.assert_close(layer(x), x @ ref.T, rtol=1e-4, atol=1e-4)


def test_requantised_layers_stay_within_half_a_step():
    w = torch.from_numpy(_random_weight(64, 96, seed=2))
    int4 = int4_from_weight(w, torch.float32)
    steps = int4.scales_and_zeros[..., 0].T.repeat_interleave(GROUP, 1)
    assert ((int4.dequantize() - w).abs() <= steps / 2 + 1e-6).all()
    from hydra.model.quant import int8_from_weight, q8_from_weight

    int8 = int8_from_weight(w, torch.float32)
    assert ((int8.dequantize() - w).abs() <= int8.scale[:, None] / 2 + 1e-6).all()
    q8 = q8_from_weight(w, torch.float32)
    # d = (16d) / 16
    steps = q8.scales_and_zeros[:w.shape[1] // GROUP, :, 0].T.repeat_interleave(GROUP, 1) / 16
    assert ((q8.dequantize() - w).abs() <= steps / 2 + 1e-6).all() and q8.weight is w


@pytest.mark.parametrize("quant,attention", [("int4", "sdpa"), ("int8", "sdpa"), ("int4", FP32_ATTENTION)])
def test_greedy_speculative_equals_greedy_on_the_quantized_base(tiny_base_factory, randomize, quant,
                                                                attention):
    """Verification runs the quantized base itself, so greedy speculative decoding == plain greedy decoding
    of the quantized base (fp32 activations here, as the fp32 losslessness tests; bf16 is measured, README).
    With the fp32 attention that quantized bases use, tree masks reach it in additive form."""
    base = randomize(tiny_base_factory(seed=3), seed=3, scale=0.3)
    with torch.inference_mode():
        float_logits = base(torch.tensor([PROMPTS[2]])).logits
    float_out = base.lm_head.weight
    quantize_model(base, quant)
    assert isinstance(base.lm_head, Int8Linear)  # vocab 100 is no multiple of 16: per-row int8, not Q8 blocks
    if attention == FP32_ATTENTION:
        use_fp32_attention(base)
    linear = Int4Linear if quant == "int4" else Int8Linear
    layer = base.model.layers[0]
    assert all(isinstance(m, linear)
               for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.down_proj))
    assert base.lm_head.weight is float_out  # what the heads read
    with torch.inference_mode():
        quant_logits = base(torch.tensor([PROMPTS[2]])).logits
    assert not torch.equal(quant_logits, float_logits)  # the quantized weights are really in use
    for arch in ("hydra-mlp", "prefix-mlp"):
        torch.manual_seed(1)
        model = HydraModel(base, HydraConfig(hydra_num_heads=4, hydra_num_layers=2, hydra_head_arch=arch))
        randomize(model.heads, seed=1, scale=0.3)
        for prompt in PROMPTS:
            ar = generate(model, prompt, DecodeConfig(max_new_tokens=30, stop_token_ids=[]),
                          speculative=False)
            for tree in TREES:
                out = generate(model, prompt, DecodeConfig(tree=tree, max_new_tokens=30, stop_token_ids=[]))
                assert out.tokens == ar.tokens, (quant, arch, tree, prompt)


def test_fp32_attention_reads_a_float32_cache_with_the_same_logits(tiny_base_factory, randomize):
    """A bf16 int4 base with fp32 attention: decoding stores its KV cache in float32 (`attention_dtype`),
    which holds the bf16 keys/values exactly, so prefill and one-token logits equal those of a bf16 cache
    cast per forward."""
    from hydra.model.kv_cache import TreeKVCache

    base = randomize(tiny_base_factory(seed=5), seed=5, scale=0.3)
    quantize_model(base, "int4")
    base.to(torch.bfloat16)
    assert attention_dtype(base.config) is None
    use_fp32_attention(base)
    assert attention_dtype(base.config) == torch.float32
    caches = [TreeKVCache(base.config.num_hidden_layers, 32, dtype) for dtype in (None, torch.float32)]
    ids = torch.tensor([PROMPTS[2]])
    with torch.inference_mode():
        for step in range(4):
            logits = [base(input_ids=ids, past_key_values=c, use_cache=True).logits for c in caches]
            assert torch.equal(logits[0], logits[1]), step
            ids = logits[0][:, -1:].argmax(-1)
    assert [c.layers[0].keys.dtype for c in caches] == [torch.bfloat16, torch.float32]


def test_gguf_q4_1_output_layer_keeps_the_heads_weight(tiny_base_factory, randomize):
    """A GGUF whose (untied) output layer is Q4_1: the layer computes with the file's blocks, and the draft
    heads still project with its float weight."""
    from hydra.model.quant import load_gguf_int4

    base = randomize(tiny_base_factory(seed=4, tie_word_embeddings=False), seed=4, scale=0.3)
    n, k = base.lm_head.weight.shape
    n = n - n % 16  # the kernel's row multiple: quantize a vocabulary of whole 16-row groups
    base.lm_head = torch.nn.Linear(k, n, bias=False)
    base.config.vocab_size = n
    raw = quants.quantize(_random_weight(n, k, seed=2), GGMLQuantizationType.Q4_1)
    float_weight = base.lm_head.weight
    load_gguf_int4(base, {"output.weight": ("Q4_1", torch.from_numpy(raw))})
    assert isinstance(base.lm_head, Int4Linear) and base.lm_head.weight is float_weight
    want = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType.Q4_1)).reshape(n, k)
    torch.testing.assert_close(base.lm_head.dequantize(), want, rtol=0, atol=1e-6)
    model = HydraModel(base, HydraConfig(hydra_num_heads=4, hydra_head_arch="hydra-mlp"))
    out = generate(model, PROMPTS[1], DecodeConfig(tree="chain_4", max_new_tokens=8, stop_token_ids=[]))
    assert len(out.tokens) == 8


def test_bad_quant_is_one_clear_error(tiny_base):
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        quantize_model(tiny_base, "int3")


@pytest.mark.slow
def test_default_model_int4_is_the_gguf_blocks():
    """--quant int4 on the default model: its linear layers hold the GGUF file's Q4_1 blocks (checked against
    gguf's dequantisation of the file) in transformers' row order (checked against the fp32 conversion)."""
    from gguf import GGUFReader
    from safetensors import safe_open

    from hydra.model.base_model import _gguf_path, default_model_path, load_base_model

    model, _ = load_base_model(None, dtype="bfloat16", quant="int4")
    tensors = {t.name: t for t in GGUFReader(str(_gguf_path())).tensors}
    with safe_open(str(default_model_path() / "model.safetensors"), "pt") as f:
        for name, gname in [("model.layers.0.self_attn.k_proj", "blk.0.attn_k.weight"),
                            ("model.layers.29.mlp.down_proj", "blk.29.ffn_down.weight")]:
            layer = model.get_submodule(name)  # k_proj: its rows of the fused q/k/v layer (hydra.model.fused)
            assert isinstance(layer.fused.layer if isinstance(layer, FusedMember) else layer, Int4Linear)
            got = layer.dequantize()
            converted = f.get_tensor(name + ".weight")  # transformers' own GGUF dequantisation, fp32
            scale = float(converted.abs().max())
            assert (got - converted).abs().max() < 2 ** -7 * scale  # bf16 scale/zero rounding only
            if "down_proj" in name:  # no row permutation: compare with gguf directly
                t = tensors[gname]
                ref = torch.from_numpy(quants.dequantize(t.data, t.tensor_type))
                torch.testing.assert_close(ref, converted, rtol=0, atol=1e-6 * scale)
    assert isinstance(model.lm_head, Q8Int4Linear) and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config._attn_implementation == FP32_ATTENTION


# --- quantized draft heads ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("arch", ["mlp", "hydra-mlp", "prefix-mlp"])
def test_quantized_heads_draft_nearly_as_float_heads_and_decode_losslessly(tiny_base_factory, arch, kind):
    """Weight-only heads (`quantize_heads`): every linear layer of the trunks and the prefix layer, and the
    projection onto the draft vocabulary, run the int8 / int4 kernel; their hidden states stay within
    quantisation error of the float heads' (random weights, so int4's error is large); verification is the
    base's, so greedy speculative decoding still equals plain greedy decoding."""

    base = tiny_base_factory(seed=3, scale=0.3, hidden_size=64)  # int4 groups need inputs of 32s
    model = make_heads(base, arch=arch, num_layers=2)
    model.heads.set_draft_vocab(torch.arange(0, 96, 2))  # 48 rows: whole int4 groups of 16
    ctx, path = torch.randn(3, 64), torch.randn(3, 64)

    def head_hidden() -> torch.Tensor:
        with torch.inference_mode():
            context = model.heads.context(ctx[None])[0]
            return model.heads.head_hidden(0, context, path if arch != "mlp" else None)

    want = head_hidden()
    quantize_heads(model.heads, kind)
    linear = Int8Linear if kind == "int8" else Int4Linear
    swapped = [m for m in model.heads.modules() if isinstance(m, linear)]
    assert not any(type(m) is torch.nn.Linear for m in model.heads.modules())
    # trunks, first blocks' residual products, the prefix layer's 7 (q/k/v and gate/up fused: 4 products)
    assert len(swapped) == 2 * 4 + 4 * (arch != "mlp") + 4 * (arch == "prefix-mlp")
    assert model.heads.dtype == model.heads.quant_dtype == torch.float32 and model.heads.quant == kind
    got = head_hidden()
    error = float((got - want).norm() / want.norm())
    assert 0 < error < (0.05 if kind == "int8" else 0.4), error  # measured: <= 0.023 / 0.27
    assert isinstance(model.heads._projection(0, model.lm_head), linear)
    with torch.inference_mode():
        assert (model.heads.draft_topk_logprobs(0, got, model.lm_head, 5)[1] % 2 == 0).all()  # draft vocab
    for prompt in PROMPTS:
        ar = generate(model, prompt, DecodeConfig(max_new_tokens=20, stop_token_ids=[]), speculative=False)
        for tree in ("chain_4", "dynamic:6"):
            out = generate(model, prompt, DecodeConfig(tree=tree, max_new_tokens=20, stop_token_ids=[]))
            assert out.tokens == ar.tokens, (arch, kind, tree, prompt)


def test_heads_quant_auto_follows_the_base(tiny_base_factory, tmp_path):
    """One rule (`heads_quant_for`): auto = the kind of a quantized base, float heads on a float one; none
    / int8 / int4 as asked; a bad kind is one clear error. `from_pretrained` applies it; quantized heads
    refuse to be saved (their weights are no longer the checkpoint's)."""

    base = tiny_base_factory(vocab_size=96, seed=3, scale=0.3, hidden_size=64)
    make_heads(base, arch="prefix-mlp").save_pretrained(tmp_path / "heads")
    assert heads_quant_for(base) is None and heads_quant_for(base, "int4") == "int4"
    int4_base = quantize_model(tiny_base_factory(vocab_size=96, seed=3, scale=0.3, hidden_size=64), "int4")
    assert heads_quant_for(int4_base) == "int4"
    assert HydraModel.from_pretrained(tmp_path / "heads", base_model=base).heads.quant is None
    quantize_model(base, "int8")
    assert isinstance(base.lm_head, Q8Int4Linear)  # an int4-kernel output layer on an int8 base: not counted
    assert heads_quant_for(base) == "int8" and heads_quant_for(base, "none") is None
    assert heads_quant_for(base, None) is None
    model = HydraModel.from_pretrained(tmp_path / "heads", base_model=base)
    assert (model.heads.quant, model.heads.quant_dtype) == ("int8", torch.float32)
    float_heads = HydraModel.from_pretrained(tmp_path / "heads", base_model=base, heads_quant="none")
    assert float_heads.heads.quant is None
    with pytest.raises(ValueError, match="unknown heads quantization 'int3'"):
        heads_quant_for(base, "int3")
    with pytest.raises(ValueError, match=r"quantized \(int8\) for decoding"):
        model.save_pretrained(tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_heads_quant_flag_is_the_same_everywhere():
    """The chat CLI, the server and the answer scripts offer the heads' kinds `heads_quant_for` knows."""
    from hydra.choices import HEADS_QUANT_CHOICES, QUANT_CHOICES
    from hydra.inference.cli import build_parser as cli_parser
    from hydra.serve.__main__ import build_parser as serve_parser
    from llm_judge.answer_common import build_parser as answer_parser

    for parser in (cli_parser(), serve_parser(), answer_parser("hydra")):
        action = next(a for a in parser._actions if a.dest == "heads_quant")
        assert tuple(action.choices) == HEADS_QUANT_CHOICES and action.default == "auto"
        assert tuple(next(a for a in parser._actions if a.dest == "quant").choices) == QUANT_CHOICES


def test_greedy_walk_on_an_int4_output_layer_reads_only_path_rows(tiny_base_factory, monkeypatch):
    """On an int4-kernel output layer (Q8 blocks, vocabulary a multiple of 16), greedy decoding computes the
    output layer for the nodes it accepts only (`_Run.walk`), one row at a time: same tokens and same accepted
    lengths as computing every node's logits, and greedy speculative == plain greedy decoding (fp32)."""
    import hydra.model.generate as generate_module

    base = tiny_base_factory(vocab_size=96, seed=3, scale=0.3)
    quantize_model(base, "int4")
    assert isinstance(base.lm_head, Q8Int4Linear)
    model = make_heads(base, arch="prefix-mlp", num_layers=2)
    monkeypatch.setattr(generate_module, "WALK_ABOVE", 1)  # every tree walks (the default walks > 4 nodes)
    rows_per_call = []
    forward = base.lm_head.forward
    monkeypatch.setattr(base.lm_head, "forward", lambda x: rows_per_call.append(x.shape) or forward(x))
    for prompt in PROMPTS:
        config = DecodeConfig(max_new_tokens=24, stop_token_ids=[], lookup=4)
        ar = generate(model, prompt, config, speculative=False)
        for tree in ("tree_16", "dynamic:6"):
            rows_per_call.clear()
            walked = generate(model, prompt, replace(config, tree=tree))
            assert walked.tokens == ar.tokens, (tree, prompt)
            assert all(len(shape) == 1 for shape in rows_per_call[1:])  # after the prefill: one row a call
            assert len(rows_per_call) - 1 == sum(walked.accept_lengths[1:])  # tau rows, not T
            with monkeypatch.context() as m:
                m.setattr(generate_module, "Int4Linear", type(None))  # every node's logits at once
                batched = generate(model, prompt, replace(config, tree=tree))
            assert (batched.tokens, batched.accept_lengths) == (walked.tokens, walked.accept_lengths)


def test_int4_heads_without_a_draft_vocabulary_project_in_int8_where_int4_cannot(tiny_base_factory):
    """Without a draft vocabulary the heads project onto the whole vocabulary; 100 rows are no multiple
    of the int4 kernel's 16, so that projection falls back to int8 (the trunks stay int4); decoding runs."""

    model = make_heads(tiny_base_factory(seed=3, scale=0.3, hidden_size=64), arch="hydra-mlp")
    quantize_heads(model.heads, "int4")
    assert isinstance(model.heads._projection(0, model.lm_head), Int8Linear)
    assert isinstance(model.heads.mlps[0].blocks[0].linear, Int4Linear)
    ar = generate(model, PROMPTS[2], DecodeConfig(max_new_tokens=12, stop_token_ids=[]), speculative=False)
    out = generate(model, PROMPTS[2], DecodeConfig(tree="tree_16", max_new_tokens=12, stop_token_ids=[]))
    assert out.tokens == ar.tokens


def test_lookup_default_stays_within_one_int4_row_block(monkeypatch, tiny_base_factory):
    """DecodeConfig(lookup=None) drafts up to 8 prompt-lookup tokens on a float base and 3 on an int4 one
    (torch's int4 kernel computes rows four at a time, so root + 3 guesses is one block); a number given is
    kept, 0 included."""
    from hydra.model import generate as gen_mod
    from hydra.model.generate import INT4_LOOKUP_TOKENS, LOOKUP_TOKENS, lookup_tokens

    made = []
    lookup_class = gen_mod.PromptLookup
    monkeypatch.setattr(gen_mod, "PromptLookup", lambda n: made.append(n) or lookup_class(n))
    for quant, want in ((None, LOOKUP_TOKENS), ("int4", INT4_LOOKUP_TOKENS)):
        base = tiny_base_factory(seed=3)
        if quant:
            quantize_model(base, quant)
        model = HydraModel(base, HydraConfig(hydra_num_heads=2))
        assert [lookup_tokens(model, DecodeConfig(lookup=n)) for n in (None, 5, 0)] == [want, 5, 0]
        generate(model, [5, 6, 7, 5, 6], DecodeConfig(tree="none", max_new_tokens=4, stop_token_ids=[]))
        assert made[-1] == want
    assert (LOOKUP_TOKENS, INT4_LOOKUP_TOKENS) == (8, 3)


def test_dynamic_trees_price_steps_with_the_base_s_measured_costs(monkeypatch, tiny_base_factory):
    """A dynamic tree's size rule reads the costs measured for the base it decodes on (int4: verification in
    blocks of four tokens); costs given with the tree are kept."""
    from hydra.model import generate as gen_mod
    from hydra.model.trees import INT4_STEP_COSTS, DynamicTree, StepCosts

    seen = []
    choose = gen_mod.choose_size
    monkeypatch.setattr(gen_mod, "choose_size",
                        lambda scores, overhead, tree: (seen.append(tree.costs)
                                                        or choose(scores, overhead, tree)))
    for quant, want in ((None, StepCosts()), ("int4", INT4_STEP_COSTS)):
        base = tiny_base_factory(seed=3)
        if quant:
            quantize_model(base, quant)
        model = make_heads(base, "hydra-mlp", num_heads=2)
        seen.clear()
        generate(model, [5, 6, 7], DecodeConfig(tree="dynamic:4", max_new_tokens=3, stop_token_ids=[]))
        assert seen and all(c == want for c in seen)
        mine = StepCosts(head_call=0.5)
        seen.clear()
        generate(model, [5, 6, 7], DecodeConfig(tree=DynamicTree(4, 2, 2, costs=mine), max_new_tokens=3,
                                                stop_token_ids=[]))
        assert seen and all(c is mine for c in seen)
    assert INT4_STEP_COSTS.verify_costs(8)[5] > 1.5 * INT4_STEP_COSTS.verify_costs(8)[4]  # a new block
