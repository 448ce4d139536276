"""Weight-only 4- and 8-bit linear layers on CPU (torch's own kernels), and the two ways to fill them.

- `load_gguf_int4(model, gguf)`: the default model's GGUF file stores its linear layers as Q4_1 blocks
  (32 weights: `w = d*q + m`, q in 0..15) and its tied output layer as Q8_0 blocks (32 weights: `w = d*q`,
  q in -127..127). The 4-bit codes go straight into torch's packed int4 layout, unchanged. torch's kernel
  computes `(q - 8) * scale + zero` per group of 32, so scale = d and zero = m + 8d; scale and zero are
  stored in the activation dtype (bf16 on the fast path), the one rounding this path adds.
- `quantize_model(model, "int4" | "int8")`: re-quantises any float Llama-family model: int4 with asymmetric
  groups of 32 (min/max, as the GGUF's Q4_1), int8 with one symmetric scale per output row.
- `quantize_heads(heads, "int8" | "int4")`: the draft heads the same way, for decoding; `heads_quant_for`
  holds the rule for when (by default: the kind of a quantized base, float heads on a float one).

Only `(batch, K) @ (K, N)` products change; norms, attention, RoPE and the embedding lookup stay in the
model's dtype. The output layer keeps its float `weight` next to its packed form, because the draft heads
take their draft vocabulary's rows from that weight (and quantize those rows when they are quantized).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from hydra.choices import HEADS_QUANT_CHOICES, QUANT_CHOICES

GROUP = 32  # weights per scale/zero group: the GGUF block size and torch's q_group_size
OUTPUT_CHOICES = ("int8", "q8_0")


class Int4Linear(nn.Module):
    """y = x W^T + b with W[n, k] = (q[n, k] - 8) * scale[n, k // 32] + zero[n, k // 32], q in 0..15.

    Runs `torch._weight_int4pack_mm_for_cpu` (fast for bf16 activations; float32/16 work but are slow)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        if int(codes.min()) < 0 or int(codes.max()) > 15:
            raise ValueError("int4 codes must lie in 0..15")
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1))
        # (K // 32, N, 2): [..., 0] the scale, [..., 1] the zero, as the kernel reads them
        self.register_buffer("scales_and_zeros",
                             torch.stack([scale.t(), zero.t()], -1).to(dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, self.packed.shape[1] * 2), self.packed, GROUP,
                                              self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (N, K) the kernel multiplies by, read back through the kernel itself."""
        eye = torch.eye(self.packed.shape[1] * 2, dtype=torch.float32)
        return torch._weight_int4pack_mm_for_cpu(eye, self.packed, GROUP, self.scales_and_zeros.float()).t()


class Q8Int4Linear(Int4Linear):
    """Q8_0 blocks exactly (w = d*q, q in -128..127) through the int4 kernel: q = 16*hi + lo with hi in -8..7
    and lo in 0..15, so W x = [W_hi | W_lo] [x; x] with W_hi = (hi + 8 - 8) * 16d and
    W_lo = (lo - 8) * d + 8d. One kernel call over K' = 2K reads 9 bits per weight (Q8_0 itself: 8.5)."""

    def __init__(self, q: torch.Tensor, d: torch.Tensor, dtype: torch.dtype,
                 weight: torch.Tensor | None = None):
        q = q.to(torch.int32)
        hi = torch.div(q, 16, rounding_mode="floor")
        lo = q - 16 * hi
        super().__init__(torch.cat([hi + 8, lo], 1), torch.cat([16 * d, d], 1),
                         torch.cat([torch.zeros_like(d), 8 * d], 1), dtype)
        self.in_features //= 2
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.cat([x, x], -1))

    def dequantize(self) -> torch.Tensor:
        w = super().dequantize()
        return w[:, :self.in_features] + w[:, self.in_features:]


class Int8Linear(nn.Module):
    """y = x W^T + b with W[n, k] = q[n, k] * scale[n], q int8: `torch._weight_int8pack_mm`."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                 bias: torch.Tensor | None = None, weight: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("q", q.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(dtype))
        self.weight = weight  # the float weight the draft heads read, when this is the output layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.q, self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.float()[:, None]


# --- re-quantising a float model ----------------------------------------------------------------------------
def int4_from_weight(weight: torch.Tensor, dtype: torch.dtype,
                     bias: torch.Tensor | None = None) -> Int4Linear:
    """Asymmetric 4-bit groups of 32 (the GGUF's Q4_1 rule): scale = (max - min) / 15, q = round((w - min) /
    scale), so w ~ scale * q + min, i.e. zero = min + 8 * scale."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // GROUP, GROUP)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    codes = ((w - lo[..., None]) / scale[..., None]).round().clamp(0, 15).reshape(n, k)
    return Int4Linear(codes, scale, lo + 8 * scale, dtype, bias)


def int8_from_weight(weight: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None = None,
                     keep_weight: torch.Tensor | None = None) -> Int8Linear:
    """Symmetric int8 with one scale per output row: scale = max|w| / 127."""
    w = weight.detach().float()
    scale = (w.abs().amax(1) / 127).clamp_min(1e-12)
    return Int8Linear((w / scale[:, None]).round().clamp(-127, 127), scale, dtype, bias, keep_weight)


def q8_from_weight(weight: torch.Tensor, dtype: torch.dtype) -> Q8Int4Linear:
    """8-bit symmetric groups of 32 (the GGUF's Q8_0 rule): d = max|w| / 127, q = round(w / d)."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // GROUP, GROUP)
    d = (w.abs().amax(-1) / 127).clamp_min(1e-12)
    q = (w / d[..., None]).round().clamp(-127, 127).reshape(n, k)
    return Q8Int4Linear(q, d, dtype, weight=weight)


def quantize_model(model: nn.Module, quant: str) -> nn.Module:
    """Swap every `nn.Linear` of the decoder, and the output layer, for its int4 / int8 form, in place.

    For int4 a layer whose shape the kernel cannot take (`_fits`) stays in float. The output layer becomes
    8-bit groups of 32 in both modes (`Q8Int4Linear`, as the default model's Q8_0 output layer; one int8 scale
    per row where the int4 kernel cannot take its shape) and keeps its float weight for the draft heads (tied
    to the input embedding in most small Llamas, so that costs nothing extra)."""
    if quant not in QUANT_CHOICES:
        raise ValueError(f"unknown quantization {quant!r}; choose one of {QUANT_CHOICES}")
    dtype = model.get_input_embeddings().weight.dtype
    for parent in list(model.get_decoder().modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and _fits(child.weight, quant):
                parent.set_submodule(name, quantized_linear(child.weight, quant, dtype, child.bias))
    out = model.get_output_embeddings()
    if type(out) is nn.Linear and _fits(out.weight, "int8"):
        if out.bias is None and _fits(out.weight, "int4"):
            model.set_output_embeddings(q8_from_weight(out.weight, dtype))
        else:
            model.set_output_embeddings(int8_from_weight(out.weight, dtype, out.bias, keep_weight=out.weight))
    return model


def _fits(weight: torch.Tensor, quant: str) -> bool:
    """torch's int4 packing needs whole groups along K and N a multiple of 16."""
    return weight.device.type == "cpu" and (quant == "int8" or (weight.shape[1] % GROUP == 0
                                                                  and weight.shape[0] % 16 == 0))


def quantized_linear(weight: torch.Tensor, quant: str, dtype: torch.dtype,
                     bias: torch.Tensor | None) -> nn.Module:
    """`weight` (N, K) as an int4 (groups of 32) or int8 (per row) layer computing in `dtype`."""
    return int4_from_weight(weight, dtype, bias) if quant == "int4" else int8_from_weight(weight, dtype, bias)


def projection_rows(weight: torch.Tensor, bias: torch.Tensor | None, quant: str | None,
                    dtype: torch.dtype) -> nn.Module:
    """Rows of another layer (e.g. a draft vocabulary's rows of the output layer) as a layer of their own:
    float for `quant` None, else weight-only int8 / int4 computing in `dtype` (int8 where the int4 kernel
    cannot take the shape)."""
    if quant is None:
        return FloatRows(weight.contiguous(), None if bias is None else bias.contiguous())
    return quantized_linear(weight, quant if _fits(weight, quant) else "int8", dtype, bias)


class FloatRows(nn.Module):
    """y = x W^T + b with float weights that belong to another layer (e.g. a draft vocabulary's rows of the
    output layer): the float counterpart of the quantized layers above, not registered as parameters."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


# --- the draft heads ----------------------------------------------------------------------------------------
def base_quant(base_model: nn.Module) -> str | None:
    """The kind of a quantized base's decoder layers, "int4" or "int8" (its 8-bit output layer, a
    `Q8Int4Linear` in both kinds, does not count); None for a float base."""
    kinds = {type(m) for m in base_model.modules()}
    return "int4" if Int4Linear in kinds else "int8" if Int8Linear in kinds else None


def heads_quant_for(base_model: nn.Module, heads_quant: str | None = "auto") -> str | None:
    """The one rule for the heads' kind: "auto" is the base's kind (`base_quant`), so the bf16 and fp32 paths
    keep their float heads (README, Quantized base model); None or "none" is float; "int8" / "int4" as
    asked."""
    if heads_quant == "auto":
        return base_quant(base_model)
    if heads_quant in (None, "none"):
        return None
    if heads_quant not in QUANT_CHOICES:
        raise ValueError(f"unknown heads quantization {heads_quant!r}; choose one of {HEADS_QUANT_CHOICES}")
    return heads_quant


def quantize_heads(heads: nn.Module, quant: str) -> None:
    """Swap the draft heads' linear layers (head trunks, Hydra++ prefix layer, feature fusion) for int8 or
    int4 weight-only ones, in place, for decoding on a CPU (a layer the int4 kernel cannot take stays float);
    their projection onto the draft vocabulary follows (`DraftHeads._projection`), and sibling projections
    are fused (`hydra.model.fused`). The heads' own output layers, if any, stay float: that projection
    quantizes their rows. Training and saving need float heads (`HydraModel.save_pretrained` refuses
    these)."""
    if quant not in QUANT_CHOICES:
        raise ValueError(f"unknown heads quantization {quant!r}; choose one of {QUANT_CHOICES}")
    if heads.quant is not None:
        raise ValueError(f"the heads are already quantized ({heads.quant})")
    device = next(heads.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"quantized heads use torch's CPU kernels; the heads are on {device.type}")
    dtype = heads.dtype
    own_output = set(heads.lm_heads.modules()) if heads.lm_heads is not None else set()
    for parent in list(heads.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child not in own_output and _fits(child.weight, quant):
                parent.set_submodule(name, quantized_linear(child.weight, quant, dtype, child.bias))
    from hydra.model.fused import fuse_siblings  # fused.py builds on this module's layers

    fuse_siblings(heads)  # the Hydra++ prefix layer's q/k/v and gate/up, as on a quantized base
    heads.quant, heads.quant_dtype = quant, dtype
    heads.set_draft_vocab(heads.draft_vocab)  # rebuild the projection in the new kind


# --- the GGUF file's own blocks -----------------------------------------------------------------------------
def q4_1_blocks(data: np.ndarray, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw Q4_1 rows (n, k/32 * 20 bytes) -> codes (n, k) uint8, d (n, k/32), m (n, k/32) float32.

    A block is fp16 d, fp16 m, then 16 bytes: byte j holds weight j in its low nibble, weight j+16 in its
    high."""
    blocks = np.ascontiguousarray(data).reshape(n, k // GROUP, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, k)
    return torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(m)


def q8_0_blocks(data: np.ndarray, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw Q8_0 rows (n, k/32 * 34 bytes) -> codes (n, k) int8, d (n, k/32) float32.
    A block: fp16 d, 32 int8."""
    blocks = np.ascontiguousarray(data).reshape(n, k // GROUP, 34)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = blocks[..., 2:].copy().view(np.int8).reshape(n, k)
    return torch.from_numpy(q), torch.from_numpy(d)


def _unpermute_rows(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter interleaves the rows of q/k projections for its RoPE layout; undo it (the same
    row order transformers' GGUF loader restores, `LlamaTensorProcessor`). Blocks run along a row, so whole
    rows of codes and scales move together."""
    return x.reshape(n_head, x.shape[0] // n_head // 2, 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)


def read_gguf_blocks(gguf_file: str | Path) -> dict[str, tuple[str, torch.Tensor]]:
    """Every Q4_1 / Q8_0 tensor of a GGUF file as (type name, raw block bytes as a uint8 (rows, bytes)
    tensor)."""
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, torch.from_numpy(np.array(t.data)))
            for t in GGUFReader(str(gguf_file)).tensors if t.tensor_type.name in ("Q4_1", "Q8_0")}


def load_gguf_int4(model: nn.Module, blocks: dict[str, tuple[str, torch.Tensor]],
                   output: str = "q8_0") -> nn.Module:
    """Put a Llama GGUF's Q4_1 linear layers, as stored, into `model` (the same model loaded in float), in
    place.

    blocks: `read_gguf_blocks(file)`. output: what the Q8_0 output layer becomes: "q8_0" keeps its blocks
    exactly (`Q8Int4Linear`, 9 bits per weight through the int4 kernel), "int8" re-quantises them to one scale
    per row (`torch._weight_int8pack_mm`). On this CPU "q8_0" is both closer to the file and faster (README).
    """
    from gguf import MODEL_ARCH, get_tensor_name_map

    if output not in OUTPUT_CHOICES:
        raise ValueError(f"unknown output layer mode {output!r}; choose one of {OUTPUT_CHOICES}")
    cfg = model.config
    dtype = model.get_input_embeddings().weight.dtype
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    out_layer = model.get_output_embeddings()
    swapped = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        gname = names.get_name(name + ".weight", try_suffixes=(".weight",))
        kind, data = blocks.get(gname, (None, None))
        if kind is None and module is out_layer:
            kind, data = blocks.get("token_embd.weight", (None, None))  # tied output layer
        n, k = module.out_features, module.in_features
        if kind == "Q4_1":
            codes, d, m = q4_1_blocks(data.numpy(), n, k)
            heads = (cfg.num_attention_heads if gname.endswith("attn_q.weight") else
                     cfg.num_key_value_heads if gname.endswith("attn_k.weight") else None)
            if heads:
                codes, d, m = (_unpermute_rows(x, heads) for x in (codes, d, m))
            new = Int4Linear(codes, d, m + 8 * d, dtype, module.bias)
            if module is out_layer:
                new.weight = module.weight  # the float weight the draft heads project with
        elif kind == "Q8_0" and module is out_layer:
            q, d = q8_0_blocks(data.numpy(), n, k)
            if output == "q8_0":
                new = Q8Int4Linear(q, d, dtype, weight=module.weight)
            else:
                new = int8_from_weight(q.float() * d.repeat_interleave(GROUP, 1), dtype, module.bias,
                                       keep_weight=module.weight)
        else:
            continue
        if module is out_layer:
            model.set_output_embeddings(new)
        else:
            model.set_submodule(name, new)
        swapped += 1
    if swapped == 0:
        raise ValueError("the GGUF file has no Q4_1 / Q8_0 tensors matching this model")
    return model
