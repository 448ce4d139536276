"""`DraftHeads`: all heads of one head set (Medusa, Hydra or Hydra++), for training and for decoding."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import DynamicCache, PretrainedConfig

from hydra.model.config import HydraConfig
from hydra.model.heads.dropout import Dropout
from hydra.model.heads.fusion import FeatureFusion
from hydra.model.heads.prefix_layer import PrefixLayer
from hydra.model.heads.resblock import HeadMLP
from hydra.model.quant import projection_rows


class DraftHeads(nn.Module):
    """Head i guesses token x_{t+i+2} at position t.

    Ungrounded (Medusa) head i reads c_t only; grounded (Hydra) head i reads
    [c_t, e(x_{t+1}), ..., e(x_{t+i+1})], the embeddings of the tokens already on its tree path, where
    e is the frozen base input embedding. c_t is the base hidden state h_t (fused with earlier layers' states
    if `feature_layers`), or for Hydra++ the prefix layer's output over those. The base embedding and output
    layer are passed in at call time, never stored here, so a checkpoint holds head weights only.
    """

    # Parameter groups (state-dict name prefixes) that start as a no-op, so heads saved without one load as
    # an exact starting point (hydra.train.checkpoint.load_heads): the zero W of prefix_reads_next_token,
    # extra prefix layers (zero output projections), feature fusion ([I | 0]).
    STARTS_AS_NO_OP = ("prefix.next_token_proj.", "prefix.extra_layers.", "fuse.")

    def __init__(self, config: HydraConfig, base_config: PretrainedConfig):
        super().__init__()
        d, vocab = base_config.hidden_size, base_config.vocab_size
        self.num_heads = config.hydra_num_heads
        self.grounded = config.grounded_heads
        self.hidden_size = d
        self.fuse = FeatureFusion(len(config.feature_layers), d) if config.feature_layers else None
        self.prefix = (PrefixLayer(base_config, config.prefix_reads_next_token, config.prefix_num_layers)
                       if config.hydra_head_arch == "prefix-mlp" else None)
        self.mlps = nn.ModuleList(
            HeadMLP((i + 2) * d if self.grounded else d, d, config.hydra_num_layers, config.dropout_rate)
            for i in range(self.num_heads))
        self.lm_dropout = Dropout(config.dropout_rate)
        # Own output layers (bias=True as in the paper); initialised from the base output layer by HydraModel.
        self.lm_heads = None if config.share_lm_head else nn.ModuleList(
            nn.Linear(d, vocab, bias=True) for _ in range(self.num_heads))
        # Optional reduced draft vocabulary (token ids), used only to pick candidates while decoding (see
        # draft_topk). Not part of state_dict: it lives in its own file next to the heads.
        self.draft_vocab: torch.Tensor | None = None
        self._projections: dict[int, tuple] = {}
        # Weight-only "int8" / "int4" linear layers for decoding on a CPU, computing in quant_dtype
        # (`hydra.model.quant.quantize_heads`); None for float heads.
        self.quant: str | None = None
        self.quant_dtype: torch.dtype | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the heads' weights (of their activations, once quantized)."""
        return self.quant_dtype or self.mlps[0].blocks[0].linear.weight.dtype

    # --- building blocks -------------------------------------------------------------------------------
    @property
    def context_reads_next_token(self) -> bool:
        """Whether c_t also depends on x_{t+1} (a prefix layer with `prefix_reads_next_token`)."""
        return self.prefix is not None and self.prefix.next_token_proj is not None

    def context(self, hidden: torch.Tensor, position_ids: torch.Tensor | None = None,
                cache: DynamicCache | None = None, next_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """c_t from what the heads read of the base (B, S, d), or (B, S, (1 + len(feature_layers)) * d) with
        fused features; the prefix layer (if any) appends to `cache`.
        next_embeds: (B, S, d) e(x_{t+1}) per position, read only if `context_reads_next_token`."""
        if self.fuse is not None:
            hidden = self.fuse(hidden)
        if self.prefix is None:
            return hidden
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + hidden.shape[1],
                                        device=hidden.device).expand(hidden.shape[:2])
        return self.prefix(hidden, position_ids, cache, next_embeds)

    def head_hidden(self, i: int, context: torch.Tensor,
                    path_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Head i's hidden state. path_embeds: (..., (i+1)*d) = [e(x_{t+1}), ..., e(x_{t+i+1})] if
        grounded."""
        if not self.grounded:
            return self.mlps[i](context)
        if torch.is_grad_enabled() and context.requires_grad and not path_embeds.requires_grad:
            return self.mlps[i](context, path_embeds)  # training: no input gradient for the frozen embeddings
        return self.mlps[i](torch.cat([context, path_embeds], dim=-1))  # one product is cheaper when decoding

    def head_logits(self, i: int, hidden: torch.Tensor, base_lm_head: nn.Module) -> torch.Tensor:
        hidden = self.lm_dropout(hidden)
        if self.lm_heads is None:  # (cast: fp32 heads trained on a bf16 base; a no-op otherwise)
            bias = getattr(base_lm_head, "bias", None)
            return F.linear(hidden, base_lm_head.weight.to(hidden.dtype),
                            None if bias is None else bias.to(hidden.dtype))
        return self.lm_heads[i](hidden)

    def set_draft_vocab(self, token_ids: torch.Tensor | None) -> None:
        self.draft_vocab = None if token_ids is None else token_ids.to(torch.long)
        self._projections.clear()

    def draft_topk(self, i: int, hidden: torch.Tensor, base_lm_head: nn.Module, k: int) -> torch.Tensor:
        """Head i's k best token ids. With a draft vocabulary, only its rows of the output layer are read:
        at batch size 1 projecting onto the full vocabulary is memory-bound, and the heads do it once per
        tree depth, so a smaller candidate vocabulary cuts the proposal cost (README, Trees). Verification
        still uses the full vocabulary, so outputs are unchanged; a token outside it just cannot be
        drafted."""
        top = self._draft_logits(i, hidden, base_lm_head).topk(k, dim=-1).indices
        return top if self.draft_vocab is None else self.draft_vocab[top]

    def draft_topk_logprobs(self, i: int, hidden: torch.Tensor, base_lm_head: nn.Module,
                            k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Head i's k best token ids and their log-probabilities (fp32; normalised over the draft vocabulary
        when there is one), for trees grown from the heads' own confidence."""
        logits = self._draft_logits(i, hidden, base_lm_head).float()
        top = logits.topk(k, dim=-1)
        ids = top.indices if self.draft_vocab is None else self.draft_vocab[top.indices]
        return top.values - logits.logsumexp(-1, keepdim=True), ids

    def _draft_logits(self, i: int, hidden: torch.Tensor, base_lm_head: nn.Module) -> torch.Tensor:
        """Head i's logits while decoding: over the draft vocabulary if there is one, else the whole one."""
        if self.draft_vocab is None and self.quant is None:
            return self.head_logits(i, hidden, base_lm_head)
        return self._projection(i, base_lm_head)(hidden)

    def _projection(self, i: int, base_lm_head: nn.Module) -> nn.Module:
        """The output layer's rows a head drafts from (the draft vocabulary's, else all), gathered once and
        kept while the layer's weight is unchanged; in the heads' weight-only kind if they are quantized."""
        layer = base_lm_head if self.lm_heads is None else self.lm_heads[i]
        key = 0 if self.lm_heads is None else i
        stamp = (layer.weight.data_ptr(), layer.weight._version)
        cached = self._projections.get(key)
        if cached is None or cached[0] != stamp:
            weight, bias = layer.weight, getattr(layer, "bias", None)
            if self.draft_vocab is not None:
                ids = self.draft_vocab = self.draft_vocab.to(weight.device)
                weight, bias = weight[ids], None if bias is None else bias[ids]
            rows = projection_rows(weight, bias, self.quant, self.dtype)
            cached = self._projections[key] = (stamp, rows)
        return cached[1]

    # --- training ----------------------------------------------------------------------------------------
    def forward(self, base_hidden: torch.Tensor, input_ids: torch.Tensor, embed_tokens: nn.Module,
                position_ids: torch.Tensor | None = None, noise_alpha: float = 0.0) -> torch.Tensor:
        """All heads at all positions in one call (teacher forcing). Returns head hidden states (H, B, S, d).

        Head i at position t reads the true tokens x_{t+1..t+i+1}, i.e. the embeddings shifted left by
        1..i+1. Positions whose shifted tokens run past the end of the row see zeros; their targets lie
        beyond the row too, so the loss never uses them. `noise_alpha` adds NEFTune-style uniform noise to
        the token embeddings (training only), as the original code does.
        """
        with torch.no_grad():
            emb = embed_tokens(input_ids)
        next_embeds = F.pad(emb[:, 1:], (0, 0, 0, 1)) if self.context_reads_next_token else None
        context = self.context(base_hidden, position_ids, next_embeds=next_embeds)
        emb = emb.to(context.dtype)
        if noise_alpha and self.training:
            scale = noise_alpha / (input_ids.shape[1] * self.hidden_size) ** 0.5
            emb = emb + torch.empty_like(emb).uniform_(-1, 1) * scale
        shifted = []
        for j in range(self.num_heads if self.grounded else 0):
            shifted.append(F.pad(emb[:, j + 1:], (0, 0, 0, j + 1)))  # row t holds e(x_{t+j+1})
        outs = []
        for i in range(self.num_heads):
            path = torch.cat(shifted[: i + 1], dim=-1) if self.grounded else None
            outs.append(self.head_hidden(i, context, path))
        return torch.stack(outs)
