"""The residual MLP block shared by Medusa and Hydra heads."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from hydra.model.heads.dropout import Dropout


class ResBlock(nn.Module):
    """y = R(x) + SiLU(W x + b).

    W starts at zero, so an unconditioned block (in_dim == out_dim, R = identity) starts as the identity and
    a fresh head initially predicts what the base model's output layer predicts from h_t. A conditioned block
    (in_dim = (i+2)*d for grounded head i) cannot be an identity; as in the paper's code its residual R is a
    learned Linear(in_dim -> d) with default init.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        nn.init.zeros_(self.linear.weight)
        self.res_connection = nn.Linear(in_dim, out_dim) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor, frozen: torch.Tensor | None = None) -> torch.Tensor:
        """`frozen`: further input columns, after those of `x`, that need no input gradient (a grounded head's
        token embeddings). Each product is then split at x's width, so backward computes the input gradient
        of x only; with one product over [x, frozen] it would also compute the embeddings' (a sixth of a
        Hydra++ trunk's arithmetic, all wasted)."""
        if frozen is None:
            residual = x if self.res_connection is None else self.res_connection(x)
            return residual + F.silu(self.linear(x))
        width = x.shape[-1]

        def product(layer: nn.Linear) -> torch.Tensor:
            weight = layer.weight
            return F.linear(x, weight[:, :width], layer.bias) + F.linear(frozen, weight[:, width:])

        return product(self.res_connection) + F.silu(product(self.linear))


class HeadMLP(nn.Module):
    """One draft head's trunk: `num_layers` ResBlocks, dropout before each.

    Every block has its own weights. (The original Hydra and Medusa code built `[ResBlock(d)] * n`, which
    repeats one module object, so blocks 2..n of a head silently shared one set of weights; Hydra issue #8.
    Legacy checkpoints keep loading: their identical tied tensors are copied into each block.)
    """

    def __init__(self, in_dim: int, hidden_size: int, num_layers: int, dropout: float):
        super().__init__()
        dims = [in_dim] + [hidden_size] * num_layers
        self.blocks = nn.ModuleList(ResBlock(dims[k], dims[k + 1]) for k in range(num_layers))
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, frozen: torch.Tensor | None = None) -> torch.Tensor:
        """`frozen`: input columns after x's that need no gradient (see ResBlock); the result equals that of
        the concatenated input."""
        first, *rest = self.blocks
        x = first(self.dropout(x), None if frozen is None else self.dropout(frozen))
        for block in rest:
            x = block(self.dropout(x))
        return x
