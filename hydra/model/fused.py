"""Sibling projections fused into one matrix product, for decoding on a CPU.

A decoder layer's q/k/v projections read the same input, and so do its MLP's gate and up projections. At batch
size 1 each product of a small model costs more in per-call work than in arithmetic, so one product over
the stacked weights replaces three (two): 210 products per forward of the default model become 120, and the
compiled decoder has 180 fewer weight tensors to check on every call (README, "Quantized base model").

transformers' modeling code runs unmodified: each sibling (`q_proj`, ...) is swapped for a `FusedMember` of
one shared `FusedProjection`. Whichever member is called first runs the fused product on its input and hands
each sibling its slice when that sibling is called, so the result does not depend on the order in which the
model calls them; all siblings must be called on the same input, one after the other (as every Llama-family
attention and MLP does); a sibling called again starts a new product. The fused weights hold exactly the
siblings' weights (int4 codes, scales and zeros; int8 codes and scales; float rows), so each output equals the
sibling's own product.
"""

from __future__ import annotations

import torch
from torch import nn

from hydra.model.quant import GROUP, Int4Linear, Int8Linear

SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # names in transformers' Llama family


class FusedProjection(nn.Module):
    """One layer computing several siblings' outputs side by side; `part(i, x)` returns sibling i's."""

    def __init__(self, layer: nn.Module, sizes: list[int]):
        super().__init__()
        self.layer, self.sizes = layer, sizes
        self.pending: list[torch.Tensor | None] | None = None  # slices not yet handed out

    def part(self, i: int, x: torch.Tensor) -> torch.Tensor:
        # A sibling whose slice was already handed out starts a new product: so a forward that was interrupted
        # between siblings (Ctrl-C in the chat CLI) leaves nothing stale for the next one, whose first call
        # replaces whatever was left.
        if self.pending is None or self.pending[i] is None:
            self.pending = list(self.layer(x).split(self.sizes, -1))
        out = self.pending[i]
        self.pending[i] = None
        if all(p is None for p in self.pending):
            self.pending = None
        return out


class FusedMember(nn.Module):
    """Stands in for sibling `index` of `fused` (registered on the parent, not here, so it counts once)."""

    def __init__(self, fused: FusedProjection, index: int):
        super().__init__()
        self.__dict__["fused"] = fused
        self.index = index
        self.in_features, self.out_features = fused.layer.in_features, fused.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.part(self.index, x)

    def dequantize(self) -> torch.Tensor:
        """This sibling's float32 weight (out_features, in_features): its rows of the fused layer's."""
        layer, start = self.fused.layer, sum(self.fused.sizes[:self.index])
        weight = layer.dequantize() if hasattr(layer, "dequantize") else layer.weight.float()
        return weight[start:start + self.out_features]


def fuse_siblings(model: nn.Module) -> int:
    """Fuse every group of sibling projections in `model` (in place) whose members are all of one kind
    (`nn.Linear`, `Int4Linear` or `Int8Linear`) and read inputs of one width. Returns the number of groups
    fused. For decoding: the members' own weights are gone afterwards, so train and save an unfused model."""
    fused = 0
    for parent in list(model.modules()):
        for names in SIBLINGS:
            layers = [getattr(parent, name, None) for name in names]
            kinds = {type(layer) for layer in layers}
            if len(kinds) != 1 or kinds.isdisjoint({nn.Linear, Int4Linear, Int8Linear}) \
                    or len({layer.in_features for layer in layers}) != 1:
                continue
            group = FusedProjection(stack_layers(layers), [layer.out_features for layer in layers])
            parent.add_module("_".join(name.removesuffix("_proj") for name in names) + "_proj", group)
            for i, name in enumerate(names):
                setattr(parent, name, FusedMember(group, i))
            fused += 1
    return fused


def stack_layers(layers: list[nn.Module]) -> nn.Module:
    """One layer whose output is the layers' outputs side by side, with exactly their weights."""
    given = [layer.bias for layer in layers if layer.bias is not None]
    bias = torch.cat([given[0].new_zeros(layer.out_features) if layer.bias is None else layer.bias
                      for layer in layers]) if given else None
    if type(layers[0]) is nn.Linear:
        weight = torch.cat([layer.weight for layer in layers])
        out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype,
                        device=weight.device)
        out.requires_grad_(layers[0].weight.requires_grad)
        with torch.no_grad():
            out.weight.copy_(weight)
            if bias is not None:
                out.bias.copy_(bias)
        return out
    if type(layers[0]) is Int8Linear:
        scale = torch.cat([layer.scale for layer in layers])
        return Int8Linear(torch.cat([layer.q for layer in layers]), scale, scale.dtype, bias)
    sz = torch.cat([layer.scales_and_zeros for layer in layers], 1)  # (K / 32, N, [scale, zero])
    return Int4Linear(torch.cat([int4_codes(layer) for layer in layers]), sz[..., 0].t(), sz[..., 1].t(),
                      sz.dtype, bias)


def int4_codes(layer: Int4Linear) -> torch.Tensor:
    """The layer's 4-bit codes (N, K) as int32, read back through the kernel with scale 1 and zero 8, so the
    kernel's (q - 8) * 1 + 8 returns q exactly, whatever the packed layout. In bf16, which holds 0..15
    exactly: the kernel's float32 path is ~25x slower (it made loading the default model take ~40 s)."""
    k = layer.packed.shape[1] * 2
    groups = (k // GROUP, layer.out_features)
    unit = torch.stack([torch.ones(groups), torch.full(groups, 8.0)], -1).to(torch.bfloat16)
    eye = torch.eye(k, dtype=torch.bfloat16)
    return torch._weight_int4pack_mm_for_cpu(eye, layer.packed, GROUP, unit).t().round().to(torch.int32)
