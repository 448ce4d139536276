"""Hydra++'s prefix layer: one extra decoder layer (the base architecture, its own weights) that reads the
base model's hidden states and feeds every head. It keeps its own KV cache while decoding."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding


class PrefixLayer(nn.Module):
    def __init__(self, base_config: PretrainedConfig):
        super().__init__()
        config = copy.deepcopy(base_config)
        config.num_hidden_layers = 1
        config.use_cache = True
        self.config = config
        self.layer = LlamaDecoderLayer(config, layer_idx=0)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        # Fresh init like the paper's code (HF normal init, std = initializer_range), norms at one.
        std = getattr(config, "initializer_range", 0.02)
        for module in self.layer.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor,
                cache: DynamicCache | None = None) -> torch.Tensor:
        """hidden: (B, S, d) base hidden states at `position_ids` (B, S). Causal self-attention over the
        cached prefix and these states; position-id resets (packed training rows) give a block-diagonal mask.
        """
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=None,
                                  past_key_values=cache, position_ids=position_ids)
        pos_emb = self.rotary_emb(hidden, position_ids=position_ids)
        out = self.layer(hidden, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                         use_cache=cache is not None, position_embeddings=pos_emb)
        return self.norm(out)
