"""Base-model families Hydra decodes, and how their attention takes the tree mask.

Verification runs the whole candidate tree in one forward with a 4D attention mask (every node sees the
prefix, itself and its ancestors). A family is listed here once its stock transformers model was shown to
take such a mask and decode losslessly (tests/test_families.py). Sliding-window attention is honoured by
building the windowed mask too: Mistral applies `config.sliding_window` to every layer and takes one mask;
families with `config.layer_types` (Qwen2, Qwen3) take a mask per layer type.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from hydra.model.attention import FP32_ATTENTION, GROUPED_SDPA

TREE_MASK_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# flash-attention kernels take no arbitrary 4D mask; sdpa_grouped and sdpa_fp32 are SDPA
# (hydra.model.attention)
TREE_MASK_ATTENTION = ("sdpa", "eager", GROUPED_SDPA, FP32_ATTENTION)


def check_tree_attention(config: PretrainedConfig) -> None:
    """Raise a ValueError naming the family when tree verification cannot run on this base model."""
    family = getattr(config, "model_type", None) or type(config).__name__
    if family not in TREE_MASK_FAMILIES:
        raise ValueError(
            f"base model family {family!r} is not supported: Hydra verifies its draft tree in one forward "
            f"with a custom 4D attention mask, and {family} is not known to take one "
            f"(supported families: {', '.join(TREE_MASK_FAMILIES)})")
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in TREE_MASK_ATTENTION:
        raise ValueError(f"{family} with attn_implementation={impl!r} cannot take the tree attention mask; "
                         f"load the base model with attn_implementation='sdpa' or 'eager'")


def chain_attention_mask(new: int, past: int, dtype: torch.dtype, as_bool: bool,
                         config: PretrainedConfig | None = None,
                         device: torch.device | str | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
    """The causal mask of `new` tokens after `past` cached ones: `tree_attention_mask` of a chain."""
    chain = torch.ones(new, new, dtype=torch.bool, device=device).tril_()
    return tree_attention_mask(chain, past, dtype, as_bool, config, torch.arange(new, device=device))


def tree_attention_mask(tree_mask: torch.Tensor, past: int, dtype: torch.dtype, as_bool: bool,
                        config: PretrainedConfig | None = None,
                        depth: torch.Tensor | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
    """(1, 1, T, past + T): tree node i (at position past + depth[i]) sees the prefix, itself and its
    ancestors; for sliding-window layers, only keys less than `sliding_window` positions back. Returns a dict
    by layer type when the family takes one (config.layer_types)."""
    t = tree_mask.shape[0]
    full = torch.ones(t, past + t, dtype=torch.bool, device=tree_mask.device)
    full[:, past:] = tree_mask
    masks = {"full_attention": full}
    window = getattr(config, "sliding_window", None) if config is not None else None
    if window is not None:
        if depth is None:
            raise ValueError("a sliding-window mask needs the tree nodes' depths")
        q_pos = past + depth.to(full.device)
        k_pos = torch.cat([torch.arange(past, device=full.device), q_pos])
        masks["sliding_attention"] = full & (q_pos[:, None] - k_pos[None, :] < window)
    if not as_bool:  # eager attention adds the mask to the scores
        lowest = torch.finfo(dtype).min
        masks = {k: torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, lowest)
                 for k, m in masks.items()}
    masks = {k: m[None, None] for k, m in masks.items()}
    layer_types = getattr(config, "layer_types", None) if config is not None else None
    if layer_types is not None:
        return {k: masks[k] for k in set(layer_types)}
    return masks["sliding_attention" if window is not None else "full_attention"]
