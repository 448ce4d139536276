"""Fused sibling projections (hydra.model.fused): every sibling's output is exactly its own product, whatever
the call order; decoding on a fused quantized base stays lossless; the loader fuses quantized bases only."""

from __future__ import annotations

import pytest
import torch
from test_families import make_family_base
from torch import nn

from hydra.model import HydraConfig, HydraModel
from hydra.model.base_model import _quantize
from hydra.model.fused import FusedMember, FusedProjection, fuse_siblings, int4_codes, stack_layers
from hydra.model.generate import DecodeConfig, generate
from hydra.model.quant import Int4Linear, Int8Linear, int4_from_weight, quantize_model

PROMPT = [3, 17, 40, 5, 9, 21]
KIND = {"float": nn.Linear, "int8": Int8Linear, "int4": Int4Linear}


def _weight(layer: nn.Module) -> torch.Tensor:
    return layer.weight.float() if type(layer) is nn.Linear else layer.dequantize()


def _base(family: str, kind: str):
    base = make_family_base(family, seed=2)
    if kind != "float":
        quantize_model(base, kind)
    return base


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])  # qwen2: q/k/v biases; qwen3: q/k norms after q/k_proj
@pytest.mark.parametrize("kind", ["float", "int8", "int4"])
def test_fused_siblings_give_the_same_logits(family, kind):
    base = _base(family, kind)
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        before = base(ids).logits
    attn = base.model.layers[0].self_attn
    weights = [_weight(attn.q_proj), _weight(attn.k_proj), _weight(attn.v_proj)]
    assert fuse_siblings(base) == 2 * base.config.num_hidden_layers  # q/k/v and gate/up in every layer
    layer = base.model.layers[0]
    assert isinstance(layer.self_attn.q_k_v_proj, FusedProjection)
    assert isinstance(layer.mlp.up_proj, FusedMember)
    assert type(layer.self_attn.q_k_v_proj.layer) is KIND[kind]
    products = [m for m in base.model.modules() if type(m) is KIND[kind]]
    assert len(products) == 4 * base.config.num_hidden_layers  # q_k_v, o, gate_up, down
    assert all(torch.equal(_weight(m), w)
               for m, w in zip((attn.q_proj, attn.k_proj, attn.v_proj), weights, strict=True))
    with torch.inference_mode():
        after = base(ids).logits
    if kind == "float":  # one GEMM over stacked rows may block its sums differently from three
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    else:  # the weight-only kernels compute each output row on its own
        assert torch.equal(after, before)


def test_siblings_take_their_own_slice_in_any_order():
    gen = torch.Generator().manual_seed(0)
    layers = [int4_from_weight(torch.randn(n, 64, generator=gen), torch.float32) for n in (32, 16, 16)]
    x = torch.randn(3, 64, generator=gen)
    want = [layer(x) for layer in layers]
    group = FusedProjection(stack_layers(layers), [32, 16, 16])
    members = [FusedMember(group, i) for i in range(3)]
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        got = {i: members[i](x) for i in order}
        assert all(torch.equal(got[i], want[i]) for i in range(3)) and group.pending is None
    # a forward interrupted after its first sibling leaves nothing stale: a sibling called again (the next
    # forward's first) starts a new product on its own input
    members[0](x)
    y = torch.randn(3, 64, generator=gen)
    got = {i: members[i](y) for i in (0, 1, 2)}
    assert all(torch.equal(got[i], layers[i](y)) for i in range(3)) and group.pending is None


def test_int4_codes_read_back_exactly():
    codes = torch.randint(0, 16, (48, 64), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    layer = Int4Linear(codes, torch.rand(48, 2) + 0.1, torch.randn(48, 2), torch.float32)
    assert torch.equal(int4_codes(layer), codes)


def test_mixed_siblings_stay_unfused():
    base = _base("qwen3", "int4")
    attn = base.model.layers[0].self_attn
    attn.k_proj = nn.Linear(32, attn.k_proj.out_features, bias=False)  # one sibling left in float
    assert fuse_siblings(base) == 2 * 2 - 1
    assert type(attn.q_proj) is Int4Linear and not hasattr(attn, "q_k_v_proj")


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_loader_fuses_quantized_bases_and_decoding_stays_lossless(kind):
    base = make_family_base("qwen2", seed=3)
    _quantize(base, kind, is_default=False)
    assert isinstance(base.model.layers[1].self_attn.v_proj, FusedMember)
    torch.manual_seed(1)
    model = HydraModel(base, HydraConfig(hydra_num_heads=4, hydra_num_layers=1, hydra_head_arch="prefix-mlp"))
    for p in model.heads.parameters():
        nn.init.normal_(p, std=0.3)
    ar = generate(model, PROMPT, DecodeConfig(max_new_tokens=30, stop_token_ids=[]), speculative=False)
    for tree in ("chain_4", "mc_sim_7b_63", "dynamic:6"):
        config = DecodeConfig(tree=tree, max_new_tokens=30, stop_token_ids=[])
        assert generate(model, PROMPT, config).tokens == ar.tokens, tree
