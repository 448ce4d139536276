"""`HydraConfig`: what a saved head set needs to be rebuilt next to its base model."""

from __future__ import annotations

from transformers import PretrainedConfig

from hydra.model.base_model import DEFAULT_BASE_MODEL

# mlp        Medusa heads: head i reads only the base hidden state h_t (ungrounded).
# hydra-mlp  Hydra heads: head i reads [h_t, e(x_{t+1}), ..., e(x_{t+i+1})] (grounded, sequentially
#            dependent).
# prefix-mlp Hydra++: one extra decoder layer over the base hidden states, then grounded MLP heads.
#            With prefix_reads_next_token, that layer's input at t is h_t + W rms_norm(e(x_{t+1})); with
#            prefix_num_layers > 1, more decoder layers follow it.
HEAD_ARCHS = ("mlp", "hydra-mlp", "prefix-mlp")


class HydraConfig(PretrainedConfig):
    """Configuration of a set of draft heads.

    Args:
        hydra_num_heads: number of draft heads; head i proposes token t+i+2.
        hydra_num_layers: ResBlocks per head.
        hydra_head_arch: one of "mlp" (Medusa), "hydra-mlp" (Hydra), "prefix-mlp" (Hydra++).
        grounded_heads: whether head i also reads the embeddings of the tokens guessed before it. Defaults to
            False for "mlp" and True otherwise; the original release wrote arch "mlp" + grounded_heads=True
            for Hydra heads, which is accepted and means the same as "hydra-mlp".
        dropout_rate: dropout before every ResBlock and before the output layer (training only).
        share_lm_head: heads project to the vocabulary with the frozen base output layer (small checkpoints,
            no vocab-sized matmul to train) instead of their own Linear(d, V) initialised from it.
        base_model_name_or_path: the base model the heads were trained on.
        hidden_state_offset: 0 = the base model's final (post-norm) hidden state; k > 0 = the output of
            hidden_states[-(k+1)].
        hidden_size, vocab_size: recorded from the base model so mismatches fail loudly at load time.
        tree: name of the default candidate tree for decoding (see hydra.model.trees).
        prefix_reads_next_token: "prefix-mlp" only. The prefix layer reads h_t + W rms_norm(e(x_{t+1})) at
            position t instead of h_t, so its attention over earlier positions knows the token that follows
            each of them (the pairing EAGLE's draft layer reads); W starts at zero, so heads trained without
            it continue unchanged. x_{t+1} is always known: the accepted token after t, or the step's root.
        feature_layers: indices into the base's `hidden_states` (0 = the input embeddings, i = the residual
            stream after decoder layer i, i < num_hidden_layers) whose states the heads read besides the final
            hidden state, fused into one d-wide input (EAGLE-3's low/mid/high features; heads.fusion). Empty:
            the final hidden state alone, as in the paper. Fusion starts as the identity on the final state,
            so heads trained without it continue unchanged.
        prefix_num_layers: "prefix-mlp" only. Decoder layers in the prefix (the paper's Hydra++: 1). Layers
            after the first start as the identity (zero output projections), so heads trained with fewer
            continue unchanged.
    """

    model_type = "hydra"

    def __init__(
        self,
        hydra_num_heads: int = 4,
        hydra_num_layers: int = 1,
        hydra_head_arch: str = "hydra-mlp",
        grounded_heads: bool | None = None,
        dropout_rate: float = 0.0,
        share_lm_head: bool = True,
        base_model_name_or_path: str = DEFAULT_BASE_MODEL,
        hidden_state_offset: int = 0,
        hidden_size: int | None = None,
        vocab_size: int | None = None,
        tree: str | None = None,
        prefix_reads_next_token: bool = False,
        prefix_num_layers: int = 1,
        feature_layers: list[int] | None = None,
        **kwargs,
    ):
        if hydra_head_arch not in HEAD_ARCHS:
            raise ValueError(f"unknown hydra_head_arch {hydra_head_arch!r}; expected one of {HEAD_ARCHS}")
        if grounded_heads is None:
            grounded_heads = hydra_head_arch != "mlp"
        if hydra_head_arch == "mlp" and grounded_heads:
            hydra_head_arch = "hydra-mlp"  # original release spelling of Hydra heads
        if not grounded_heads and hydra_head_arch != "mlp":
            raise ValueError(f"hydra_head_arch {hydra_head_arch!r} needs grounded_heads=True "
                             "(use 'mlp' for ungrounded Medusa heads)")
        if prefix_reads_next_token and hydra_head_arch != "prefix-mlp":
            raise ValueError("prefix_reads_next_token needs hydra_head_arch 'prefix-mlp' (only Hydra++ heads "
                             f"have a prefix layer), not {hydra_head_arch!r}")
        if prefix_num_layers != 1 and hydra_head_arch != "prefix-mlp":
            raise ValueError("prefix_num_layers needs hydra_head_arch 'prefix-mlp' (only Hydra++ heads have "
                             f"a prefix layer), not {hydra_head_arch!r}")
        if prefix_num_layers < 1:
            raise ValueError(f"prefix_num_layers must be >= 1, got {prefix_num_layers}")
        feature_layers = [int(i) for i in feature_layers or ()]
        if any(i < 0 for i in feature_layers) or len(set(feature_layers)) != len(feature_layers):
            raise ValueError(f"feature_layers must be distinct layer indices >= 0, got {feature_layers}")
        if hydra_num_heads < 1 or hydra_num_layers < 1:
            raise ValueError("hydra_num_heads and hydra_num_layers must be >= 1")
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
        self.hydra_num_heads = hydra_num_heads
        self.hydra_num_layers = hydra_num_layers
        self.hydra_head_arch = hydra_head_arch
        self.grounded_heads = bool(grounded_heads)
        self.dropout_rate = dropout_rate
        self.share_lm_head = share_lm_head
        self.base_model_name_or_path = base_model_name_or_path
        self.hidden_state_offset = hidden_state_offset
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.tree = tree
        self.prefix_reads_next_token = bool(prefix_reads_next_token)
        self.prefix_num_layers = int(prefix_num_layers)
        self.feature_layers = feature_layers
        kwargs.pop("tie_word_embeddings", None)
        super().__init__(**kwargs)
