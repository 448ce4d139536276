"""Hydra++'s prefix layer: one extra decoder layer (the base architecture, its own weights) that reads the
base model's hidden states and feeds every head. It keeps its own KV cache while decoding. Optionally more
decoder layers follow the first (`HydraConfig.prefix_num_layers`); they start as the identity.

The layer is the base family's own: a one-layer copy of the base model's decoder (transformers' AutoModel
for its config), so its decoder-layer class, attention details (Qwen3's q/k norms, Qwen2's biases, Mistral's
sliding window), rotary embedding, final norm and mask construction are exactly the base model's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel, DynamicCache, PretrainedConfig


class PrefixLayer(nn.Module):
    def __init__(self, base_config: PretrainedConfig, reads_next_token: bool = False, num_layers: int = 1):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"a prefix layer needs at least one decoder layer, got num_layers={num_layers}")
        config = copy.deepcopy(base_config)
        config.num_hidden_layers = num_layers
        config.use_cache = True
        # The prefix layer reads hidden states, never token ids: a one-row embedding saves allocating and
        # initialising a vocabulary-sized one that would be dropped at once.
        config.vocab_size, config.pad_token_id = 1, None
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[-1:] * num_layers  # the kind of the base's top layer
        family = getattr(config, "model_type", type(config).__name__)
        decoder = AutoModel.from_config(config)
        if not all(hasattr(decoder, a) for a in ("layers", "norm", "rotary_emb")):
            raise ValueError(f"cannot build a Hydra++ prefix layer for base model family {family!r}: its "
                             f"decoder ({type(decoder).__name__}) has no layers / norm / rotary_emb")
        decoder.embed_tokens = None
        self.config = config
        # Registered under the names the checkpoints use (prefix.layer.*, prefix.norm.*); the one-layer
        # decoder that runs them is kept outside the module tree so it adds nothing to the state dict.
        self.layer = decoder.layers[0]
        self.extra_layers = nn.ModuleList(decoder.layers[1:])  # no state-dict entries when there are none
        self.norm = decoder.norm
        self.rotary_emb = decoder.rotary_emb
        self.__dict__["_decoder"] = decoder
        # Fresh init like the paper's code (HF normal init, std = initializer_range), norms at one.
        std = getattr(config, "initializer_range", 0.02)
        for module in decoder.layers.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # An extra layer writes nothing to the residual stream until trained (zero attention and MLP output
        # projections), so heads gain depth from exactly where they were; its other weights get gradients
        # once the output projections move off zero, after the first step.
        for extra in self.extra_layers:
            for name, module in extra.named_modules():
                if isinstance(module, nn.Linear) and name.endswith(("o_proj", "down_proj")):
                    nn.init.zeros_(module.weight)
        # Optional W of the input h_t + W rms_norm(e(x_{t+1})) (HydraConfig.prefix_reads_next_token).
        self.next_token_proj = None
        if reads_next_token:
            # skip_init leaves the global RNG alone, as FeatureFusion's W
            d = config.hidden_size
            self.next_token_proj = nn.utils.skip_init(nn.Linear, d, d, bias=False)
            nn.init.zeros_(self.next_token_proj.weight)

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache | None = None,
                next_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """hidden: (B, S, d) base hidden states at `position_ids` (B, S). Causal self-attention over the
        cached prefix and these states; position-id resets (packed training rows) give a block-diagonal mask.
        next_embeds: (B, S, d) e(x_{t+1}) for each position t, needed when the layer reads the next token.
        """
        if self.next_token_proj is not None:
            if next_embeds is None:
                raise ValueError("this prefix layer reads the next token's embedding: pass next_embeds")
            # e at unit RMS: Adam moves W's entries by ~lr a step whatever the input's scale, and raw
            # embeddings are ~13x smaller than h_t on SmolLM2 (RMS 0.14 vs 1.8): W e would start ~13x slower.
            unit = F.rms_norm(next_embeds.to(hidden.dtype), (hidden.shape[-1],))
            hidden = hidden + self.next_token_proj(unit)
        out = self._decoder(inputs_embeds=hidden, position_ids=position_ids, past_key_values=cache,
                            use_cache=cache is not None)
        return out.last_hidden_state
