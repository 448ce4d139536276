"""--head_init medusa: a fresh grounded head computes what a fresh Medusa head computes from the same
context."""

from __future__ import annotations

import torch

from hydra.model import HydraConfig, HydraModel
from hydra.train.train import init_heads_like_medusa


def test_fresh_grounded_head_equals_fresh_medusa_head(tiny_base):
    torch.manual_seed(0)
    grounded = HydraModel(tiny_base, HydraConfig(hydra_num_heads=3, hydra_num_layers=2,
                                                 hydra_head_arch="hydra-mlp"))
    medusa = HydraModel(tiny_base, HydraConfig(hydra_num_heads=3, hydra_num_layers=2, hydra_head_arch="mlp"))
    ids = torch.randint(0, tiny_base.config.vocab_size, (2, 9))
    before = grounded(ids).head_hidden
    init_heads_like_medusa(grounded)
    with torch.no_grad():  # the weights a Medusa head has and a grounded one shares: take them over
        for g, m in zip(grounded.heads.mlps, medusa.heads.mlps, strict=True):
            m.blocks[0].linear.bias.copy_(g.blocks[0].linear.bias)
            for gb, mb in zip(g.blocks[1:], m.blocks[1:], strict=True):
                mb.load_state_dict(gb.state_dict())
    out_g, out_m = grounded(ids), medusa(ids)
    torch.testing.assert_close(out_g.head_hidden, out_m.head_hidden)
    assert not torch.allclose(before, out_g.head_hidden)  # the paper's init does not have this property
    # Still trainable: the token-embedding columns of the first block get a gradient.
    out_g.head_hidden[1].sum().backward()
    d = tiny_base.config.hidden_size
    assert grounded.heads.mlps[1].blocks[0].res_connection.weight.grad[:, d:].abs().sum() > 0
