"""Reading the original Hydra release format (config.json with hydra_* keys + pickled `hydra_lm_head.pt`).

The file is read with `torch.load(weights_only=True)`, which only rebuilds tensors and plain containers and
refuses arbitrary pickled objects. Its state dict differs from ours in three ways:
- it carries copies of base-model tensors (`input_embed_fn.weight`, the prefix layer's unused
  `embed_tokens`, RoPE `inv_freq`): dropped;
- its head trunks are `nn.Sequential`s (with Dropout modules at even indices for prefix-mlp), ours are
  `blocks` lists: renamed;
- ResBlocks 2..n of a head were one shared module (`[ResBlock(d)] * n`), so their state-dict slots hold the
  same tensor: each of our untied blocks gets a copy, which computes exactly what the original computed.
Legacy heads always have their own output layers (share_lm_head=False).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from hydra.model.config import HydraConfig

_DROPPED = re.compile(r"^(input_embed_fn\.|prefix_embeding_layer\.embed_tokens\.|.*rotary_emb\.inv_freq$)")


def read_legacy_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything that is not plain tensors/containers
        raise ValueError(f"{path} is not a loadable legacy Hydra checkpoint "
                         f"({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


def convert_legacy_state_dict(state: dict[str, torch.Tensor], config: HydraConfig) -> dict[str, torch.Tensor]:
    """Map an original `hydra_head.state_dict()` onto `DraftHeads` keys (config must say
    share_lm_head=False)."""
    config.share_lm_head = False
    # Sequential(Dropout, ResBlock, Dropout, ResBlock...)
    with_dropout = config.hydra_head_arch == "prefix-mlp"
    out = {}
    for key, value in state.items():
        if _DROPPED.match(key):
            continue
        if m := re.match(r"^hydra_mlp\.(\d+)\.(\d+)\.(.+)$", key):
            head, slot, rest = int(m[1]), int(m[2]), m[3]
            block = (slot - 1) // 2 if with_dropout else slot
            out[f"mlps.{head}.blocks.{block}.{rest}"] = value
        elif m := re.match(r"^hydra_lm_head\.(\d+)\.(?:1\.)?(weight|bias)$", key):
            out[f"lm_heads.{m[1]}.{m[2]}"] = value
        elif m := re.match(r"^prefix_embeding_layer\.layers\.0\.(.+)$", key):
            out[f"prefix.layer.{m[1]}"] = value
        elif key == "prefix_embeding_layer.norm.weight":
            out["prefix.norm.weight"] = value
        else:
            raise ValueError(f"unexpected key {key!r} in legacy Hydra checkpoint")
    return out
