"""Fused features (an option, after EAGLE-3): the heads read the base model's final hidden state together with
residual-stream states of earlier layers, projected back to the model width."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class FeatureFusion(nn.Module):
    """c = W [h ; rms_norm(h_a) ; rms_norm(h_b) ; ...]: h the final (post-norm) hidden state, h_a, h_b the
    residual streams after earlier layers (HydraConfig.feature_layers).

    The earlier states are normalised (no weights) because the residual stream's scale grows with depth; the
    final state is read as it is. W starts as [I | 0 ...], so fresh fusion passes h through exactly and heads
    trained without it continue unchanged; training decides what the earlier layers add.
    """

    def __init__(self, num_extra: int, hidden_size: int):
        super().__init__()
        d = hidden_size
        # skip_init: the default init would be overwritten below, and skipping it leaves the global RNG alone,
        # so with one seed the heads' other weights start the same with or without fusion (a fair A/B).
        self.proj = nn.utils.skip_init(nn.Linear, (1 + num_extra) * d, d, bias=False)
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.weight[:, :d].copy_(torch.eye(d))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: (..., (1 + num_extra) * d), the final state first (`hydra_model.heads_input`)."""
        d = self.proj.out_features
        extra = features[..., d:].unflatten(-1, (-1, d))
        extra = F.rms_norm(extra, (d,)).flatten(-2)
        return self.proj(torch.cat([features[..., :d], extra], dim=-1))
