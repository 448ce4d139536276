"""`HydraModel`: a frozen Hugging Face causal LM plus a set of draft heads.

Only the heads are ever saved: `config.json` (a `HydraConfig`) + `model.safetensors`.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hydra.model.attention import use_grouped_sdpa
from hydra.model.base_model import load_base_model, to_dtype
from hydra.model.config import HydraConfig
from hydra.model.families import check_tree_attention
from hydra.model.heads.draft_heads import DraftHeads
from hydra.model.quant import heads_quant_for, quantize_heads

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
LEGACY_WEIGHTS_NAME = "hydra_lm_head.pt"
DRAFT_VOCAB_NAME = "draft_vocab.safetensors"


@dataclass
class HydraTrainOutput:
    base_hidden: torch.Tensor  # (B, S, d) the base model's final hidden state (what its output layer reads)
    head_hidden: torch.Tensor  # (H, B, S, d) every head's hidden state at every position


def decoder_is_compiled(model: HydraModel) -> bool:
    """Whether `hydra.model.compiled.compile_decoder` compiled this model's base decoder (in place)."""
    torch_compiled = getattr(model.decoder, "_compiled_call_impl", None) is not None
    return torch_compiled or exported_decoder(model) is not None


def exported_decoder(model: HydraModel):
    """The ahead-of-time compiled stand-in for the base decoder (`hydra.model.exported.ExportedDecoder`) that
    decoding calls instead of it, if `compile_decoder` made one."""
    return getattr(model.decoder, "hydra_exported", None)


def reads_all_hidden_states(config: HydraConfig) -> bool:
    """Whether the heads read more than the decoder's final hidden state (the decoder must then run with
    output_hidden_states)."""
    return config.hidden_state_offset > 0 or bool(config.feature_layers)


def heads_input(decoder_output, config: HydraConfig) -> torch.Tensor:
    """The one rule for which base hidden states the heads read, from a decoder output: the final (post-norm)
    hidden state for hidden_state_offset 0, else hidden_states[-(k+1)]; then, with feature_layers, the
    states hidden_states[i] for each listed i, concatenated after it (B, S, (1 + len(feature_layers)) * d)."""
    k = config.hidden_state_offset
    main = decoder_output.last_hidden_state if k == 0 else decoder_output.hidden_states[-(k + 1)]
    if not config.feature_layers:
        return main
    return torch.cat([main, *(decoder_output.hidden_states[i] for i in config.feature_layers)], dim=-1)


class HydraModel(nn.Module):
    """Frozen base model + draft heads.

    Args:
        base_model: a causal LM of a family in hydra.model.families (Llama, Mistral, Qwen2, Qwen3) exposing
            get_input_embeddings / get_output_embeddings.
        config: the heads' configuration. Its hidden_size / vocab_size, if set, must match the base model.
        tokenizer: optional, kept for convenience (CLI, evaluation).
    """

    def __init__(self, base_model: PreTrainedModel, config: HydraConfig,
                 tokenizer: PreTrainedTokenizerBase | None = None):
        super().__init__()
        base_cfg = base_model.config
        check_tree_attention(base_cfg)
        for field in ("hidden_size", "vocab_size"):
            want, have = getattr(config, field), getattr(base_cfg, field)
            if want is not None and want != have:
                raise ValueError(f"these heads were built for a base model with {field}={want}, but "
                                 f"{base_cfg.name_or_path or 'the base model'} has {field}={have}")
        config.hidden_size, config.vocab_size = base_cfg.hidden_size, base_cfg.vocab_size
        too_deep = [i for i in config.feature_layers if i >= base_cfg.num_hidden_layers]
        if too_deep:
            n = base_cfg.num_hidden_layers
            raise ValueError(f"feature_layers {too_deep} are not inside the base model: it has {n} decoder "
                             f"layers, so indices run 0..{n - 1} (its final hidden state is always read)")
        self.config = config
        self.tokenizer = tokenizer
        base_model.requires_grad_(False)
        use_grouped_sdpa(base_model)  # tree masks without repeated keys and values (hydra.model.attention)
        self.base_model = base_model
        param = next(base_model.parameters())
        self.heads = DraftHeads(config, base_cfg).to(device=param.device, dtype=param.dtype)
        if self.heads.lm_heads is not None:
            with torch.no_grad():
                for lm in self.heads.lm_heads:
                    lm.weight.copy_(self.lm_head.weight)
                    nn.init.zeros_(lm.bias)
        self._vocab_rows: dict[tuple, tuple] = {}  # frozen output-layer rows of a draft vocabulary (_project)
        self.eval()  # inference by default (no dropout); training code calls .train()

    # The base model's layers, used by the heads but not owned by them (never saved with the heads).
    @property
    def embed_tokens(self) -> nn.Module:
        return self.base_model.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module:
        return self.base_model.get_output_embeddings()

    @property
    def decoder(self) -> nn.Module:
        return self.base_model.get_decoder()

    def train(self, mode: bool = True) -> HydraModel:
        super().train(mode)
        self.base_model.eval()  # the base model is frozen: never dropout in it
        return self

    def heads_input(self, decoder_output) -> torch.Tensor:
        return heads_input(decoder_output, self.config)

    def base_hidden_states(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """The hidden states the heads read (see `heads_input`)."""
        out = self.decoder(input_ids=input_ids, output_hidden_states=reads_all_hidden_states(self.config),
                           **kwargs)
        return self.heads_input(out)

    @torch.no_grad()
    def base_features(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the heads read (`heads_input`), the final hidden state (B, S, d)) from one frozen base
        forward. The teacher's logits are base_logits(final hidden state), also when the heads read an
        earlier layer."""
        out = self.decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                           use_cache=False, output_hidden_states=reads_all_hidden_states(self.config))
        return self.heads_input(out), out.last_hidden_state

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, noise_alpha: float = 0.0,
                features: tuple[torch.Tensor, torch.Tensor] | None = None) -> HydraTrainOutput:
        """Training forward: the base model's final hidden states (no grad) and all heads' hidden states at
        all positions. `features`: `base_features`' output if already known (e.g. read from a feature
        cache).

        Logits come from `head_logits(i, hidden)` / `base_logits(hidden)` so a loss can project to the
        vocabulary in chunks instead of materialising (H, B, S, V) at once.
        """
        if features is None:
            features = self.base_features(input_ids, position_ids, attention_mask)
        heads_in, final = features
        if not torch.is_autocast_enabled(heads_in.device.type):  # fp32 heads on a bf16 base: cast the input
            heads_in = heads_in.to(self.heads.dtype)
        head_hidden = self.heads(heads_in, input_ids, self.embed_tokens, position_ids, noise_alpha)
        return HydraTrainOutput(final, head_hidden)

    def head_logits(self, i: int, hidden: torch.Tensor, vocab: torch.Tensor | None = None) -> torch.Tensor:
        """Head i's logits over the whole vocabulary, or over the token ids `vocab` only (a draft vocabulary:
        only those rows of the output layer are read)."""
        if vocab is None:
            return self.heads.head_logits(i, hidden, self.lm_head)
        layer = self.lm_head if self.heads.lm_heads is None else self.heads.lm_heads[i]
        return self._project(self.heads.lm_dropout(hidden), layer, vocab)

    def base_logits(self, hidden: torch.Tensor, vocab: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(hidden) if vocab is None else self._project(hidden, self.lm_head, vocab)

    def _project(self, hidden: torch.Tensor, layer: nn.Module, vocab: torch.Tensor) -> torch.Tensor:
        """Logits over the rows `vocab` of `layer`. The rows of a frozen layer are gathered once per dtype of
        `hidden` and kept (a training step projects many chunks with them; fp32 heads trained on a bf16 base
        project in fp32, the teacher in bf16); a trainable layer's are gathered per call."""
        bias = getattr(layer, "bias", None)
        if layer.weight.requires_grad:
            return F.linear(hidden, layer.weight[vocab], None if bias is None else bias[vocab])
        stamp = (layer.weight.data_ptr(), layer.weight._version, vocab.data_ptr(), len(vocab))
        key = (id(layer), hidden.dtype)
        cached = self._vocab_rows.get(key)
        if cached is None or cached[0] != stamp:
            rows = layer.weight[vocab].to(hidden.dtype)
            cached = (stamp, rows, None if bias is None else bias[vocab].to(hidden.dtype))
            self._vocab_rows[key] = cached
        return F.linear(hidden, cached[1], cached[2])

    # --- persistence -----------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | str | None = None) -> None:
        """Write config.json + heads-only model.safetensors (optionally cast, e.g. to bfloat16)."""
        if self.heads.quant is not None:
            raise ValueError(f"these heads are quantized ({self.heads.quant}) for decoding; save heads "
                             "loaded with heads_quant='none'")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", to_dtype(dtype) if dtype else v.dtype).contiguous()
                 for k, v in self.heads.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        if self.heads.draft_vocab is not None:
            save_file({"token_ids": self.heads.draft_vocab.cpu()}, str(folder / DRAFT_VOCAB_NAME))
        self.config.save_pretrained(folder)

    @classmethod
    def from_pretrained(cls, heads: str | Path, base_model: str | PreTrainedModel | None = None,
                        dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
                        tokenizer: PreTrainedTokenizerBase | None = None, quant: str | None = None,
                        heads_quant: str | None = "auto") -> HydraModel:
        """Load heads from a folder or Hub repo id and put them on a base model.

        Args:
            heads: folder or Hub repo id holding config.json + model.safetensors (or the original release's
                config.json + hydra_lm_head.pt, converted on the fly without unpickling arbitrary objects).
            base_model: a loaded model, or a model id / folder overriding the config's
                base_model_name_or_path, or None to use the config's.
            dtype, device: for the base model (when loaded here) and the heads.
            quant: None, "int4" or "int8" for the base model when loaded here (see `load_base_model`).
            heads_quant: "auto" (the kind of a quantized base, else float), "none", "int8" or "int4":
                weight-only heads for decoding on a CPU (`hydra.model.quant.heads_quant_for`).
        """
        folder = _resolve_heads_folder(heads)
        config = load_hydra_config(folder / CONFIG_NAME)
        if isinstance(base_model, PreTrainedModel):
            base = base_model
        else:
            base, loaded_tok = load_base_model(base_model or config.base_model_name_or_path, dtype, device,
                                               quant=quant)
            tokenizer = tokenizer or loaded_tok
        weights = folder / WEIGHTS_NAME
        if weights.is_file():
            state = _read_safetensors(weights)
        elif (folder / LEGACY_WEIGHTS_NAME).is_file():
            from hydra.model.legacy import convert_legacy_state_dict, read_legacy_weights

            state = convert_legacy_state_dict(read_legacy_weights(folder / LEGACY_WEIGHTS_NAME), config)
        else:
            raise FileNotFoundError(f"no {WEIGHTS_NAME} (or legacy {LEGACY_WEIGHTS_NAME}) in {folder}")
        model = cls(base, config, tokenizer)
        _load_heads_state(model.heads, state, folder)
        if (folder / DRAFT_VOCAB_NAME).is_file():
            ids = _read_safetensors(folder / DRAFT_VOCAB_NAME).get("token_ids")
            if ids is None or ids.dim() != 1 or (ids.numel() and int(ids.max()) >= config.vocab_size):
                raise ValueError(f"{folder / DRAFT_VOCAB_NAME} does not hold 1-D token_ids within the "
                                 "vocabulary")
            model.heads.set_draft_vocab(ids.to(next(model.heads.parameters()).device))
        kind = heads_quant_for(base, heads_quant)
        if kind is not None:
            quantize_heads(model.heads, kind)
        return model


def load_hydra_config(path: Path) -> HydraConfig:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a heads folder needs config.json")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or "hydra_num_heads" not in raw:
        raise ValueError(f"{path} is not a Hydra heads config (no 'hydra_num_heads' field)")
    raw.pop("model_type", None)
    for key, hint in typing.get_type_hints(HydraConfig.__init__).items():
        if key in raw and not _json_fits(raw[key], hint):
            name = hint.__name__ if isinstance(hint, type) else str(hint)
            raise ValueError(f"{path}: {key!r} must be {name}, not {raw[key]!r}")
    known = {"transformers_version", "architectures"}
    try:
        return HydraConfig(**{k: v for k, v in raw.items() if k not in known})
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _json_fits(value, hint) -> bool:
    """Whether a JSON value fits a simple annotation (int, float, str, bool, list[int], X | None); a bool is
    not a number."""
    allowed = typing.get_args(hint) or (hint,)
    if value is None:
        return type(None) in allowed
    if isinstance(value, list):
        return list[int] in allowed and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int) and float in allowed:
        return True
    return any(isinstance(value, t) for t in allowed if isinstance(t, type))


def _resolve_heads_folder(heads: str | Path) -> Path:
    path = Path(heads)
    if path.is_dir():
        return path
    if path.exists() or str(heads).startswith((".", "/", "~")) or str(heads).count("/") != 1:
        raise FileNotFoundError(f"heads folder {heads} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(heads), allow_patterns=[CONFIG_NAME, WEIGHTS_NAME,
                                                                   LEGACY_WEIGHTS_NAME, DRAFT_VOCAB_NAME]))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise FileNotFoundError(f"could not find heads {heads!r}: not a local folder, and the Hub could not "
                                f"provide it ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None


def _load_heads_state(heads: DraftHeads, state: dict[str, torch.Tensor], folder: Path) -> None:
    expected = heads.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"heads in {folder} do not match their config.json: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"heads in {folder} do not fit this base model: {k} has shape {tuple(v.shape)}, "
                             f"expected {tuple(expected[k].shape)}")
    heads.load_state_dict(state, strict=True)
