"""Export ungrounded (Medusa-style, `hydra_head_arch="mlp"`) heads in the formats serving engines read.

Two layouts (see `python -m hydra.hf_utils export-medusa -h`):

- `medusa`: FasterDecoding Medusa v1, also read by TGI (`MedusaHeadV1`) and TensorRT-LLM's Medusa converter.
  `config.json` = {medusa_num_heads, medusa_num_layers, base_model_name_or_path} (no `architectures` key: TGI
  disables speculation when it finds one) and `medusa_lm_head.safetensors` holding, per head h,
  `{h}.{l}.linear.weight/bias` for ResBlocks l < L and `{h}.{L}.weight`, the head's own output layer. Heads
  trained with `share_lm_head=True` project with the base model's output layer; it is copied into every head
  (v1 readers need a per-head output layer), which costs V x d per head.
- `vllm`: vLLM's `Medusa` draft model: `config.json` with model_type "medusa", hidden_size, vocab_size,
  num_heads, num_hidden_layers, medusa_fc_bias=true; `model.safetensors` with `blocks.{h}.layers.{l}.weight/
  bias` and `lm_heads.{h}.weight` (shared heads: `original_lm_head: true` and a single `lm_heads.0.weight`).
  vLLM proposes the top-1 chain only (no tree) and verifies with its lossless rejection sampler. A draft
  vocabulary saved with the heads (draft_vocab.safetensors) becomes vLLM's `token_map` tensor plus
  `truncated_vocab_size`; the Medusa layout has no such field and drafts over the full vocabulary.

Both formats compute head h as `W_out (x + SiLU(W_l x + b_l) ...)` on the base model's final hidden state,
which is exactly what `mlp` heads compute, except that neither has an output-layer bias: a trained nonzero
bias of our own output layers is dropped (with a warning). Verification keeps the output exact regardless;
only the acceptance rate can change.

Grounded heads (`hydra-mlp`, `prefix-mlp`: each head also reads the embeddings of the draft tokens before it
on its tree path) cannot be expressed in either format; no serving engine runs grounded Hydra heads today.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hydra.model.base_model import to_dtype
from hydra.model.config import HydraConfig
from hydra.model.hydra_model import (
    CONFIG_NAME,
    DRAFT_VOCAB_NAME,
    LEGACY_WEIGHTS_NAME,
    WEIGHTS_NAME,
    load_hydra_config,
)

FORMATS = ("medusa", "vllm")
MEDUSA_WEIGHTS = "medusa_lm_head.safetensors"
VLLM_WEIGHTS = "model.safetensors"


class GroundedHeadsError(ValueError):
    pass


def grounded_message(config: HydraConfig) -> str:
    return (f"these are grounded Hydra heads (hydra_head_arch={config.hydra_head_arch!r}): each head also "
            "reads the embeddings of the draft tokens before it on its tree path. Medusa-format readers "
            "(FasterDecoding Medusa, TGI, TensorRT-LLM, vLLM) only run ungrounded heads that read the base "
            "hidden state, and no serving engine runs grounded Hydra heads today. Decode them with this "
            "package (python -m hydra.inference.cli --model FOLDER), or train ungrounded heads "
            "(--head-arch mlp) to export.")


def _load_heads(folder: Path) -> tuple[HydraConfig, dict[str, torch.Tensor]]:
    config = load_hydra_config(folder / CONFIG_NAME)
    if config.grounded_heads or config.hydra_head_arch != "mlp":
        raise GroundedHeadsError(grounded_message(config))
    if config.hidden_state_offset:
        raise ValueError(f"these heads read hidden_states[-{config.hidden_state_offset + 1}] "
                         "(hidden_state_offset > 0); serving engines feed Medusa heads the final hidden "
                         "state only")
    if config.feature_layers:
        raise ValueError(f"these heads also read hidden_states{config.feature_layers} (feature_layers); "
                         "serving engines feed Medusa heads the final hidden state only")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        legacy = (" (legacy hydra_lm_head.pt files hold grounded heads)"
                  if (folder / LEGACY_WEIGHTS_NAME).exists() else "")
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder}{legacy}")
    return config, load_file(str(weights))


def _base_lm_head(config: HydraConfig, base_model: str | None) -> torch.Tensor:
    """The base model's output layer weight (V, d): read straight from a local safetensors checkpoint when
    possible (no full model load), else by loading the model."""
    from hydra.model.base_model import resolve_base_model

    name = resolve_base_model(base_model or config.base_model_name_or_path)
    weight = _lm_head_from_folder(Path(name)) if Path(name).is_dir() else None
    if weight is None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
        out = model.get_output_embeddings()
        if getattr(out, "bias", None) is not None:
            raise ValueError(f"the output layer of {name} has a bias, which Medusa formats cannot hold")
        weight = out.weight.detach().clone()
    want = (config.vocab_size, config.hidden_size)
    if None not in want and tuple(weight.shape) != want:
        raise ValueError(f"base model {name} has an output layer of shape {tuple(weight.shape)}, but the "
                         f"heads were trained for (vocab_size, hidden_size) = {want}")
    return weight.float()


def _lm_head_from_folder(folder: Path) -> torch.Tensor | None:
    from safetensors import safe_open

    try:
        tied = json.loads((folder / "config.json").read_text()).get("tie_word_embeddings", False)
    except (OSError, json.JSONDecodeError):
        return None
    names = ["model.embed_tokens.weight"] if tied else ["lm_head.weight"]
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            present = set(f.keys())
            for key in names:
                if key in present:
                    return f.get_tensor(key)
    return None


def convert_state(config: HydraConfig, state: dict[str, torch.Tensor], fmt: str,
                  base_lm_head: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Rename (and for shared output layers, materialise) head tensors into the `fmt` layout."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    H, L = config.hydra_num_heads, config.hydra_num_layers
    expected = {f"mlps.{h}.blocks.{b}.linear.{p}"
                for h in range(H) for b in range(L) for p in ("weight", "bias")}
    if not config.share_lm_head:
        expected |= {f"lm_heads.{h}.{p}" for h in range(H) for p in ("weight", "bias")}
    if set(state) != expected:
        raise ValueError(f"the heads file does not match its config: missing "
                         f"{sorted(expected - set(state))[:4]}, "
                         f"unexpected {sorted(set(state) - expected)[:4]}")
    if config.share_lm_head and base_lm_head is None:
        raise ValueError("heads with share_lm_head=True need the base model's output layer")
    if not config.share_lm_head:
        bias = max(float(state[f"lm_heads.{h}.bias"].abs().max()) for h in range(H))
        if bias > 0:
            warnings.warn(f"the heads' output layers have biases (max |b| = {bias:.3g}); Medusa and vLLM "
                          "output layers have none, so they are dropped. Outputs stay exact (every draft is "
                          "verified); the acceptance rate may change.", stacklevel=2)
    out: dict[str, torch.Tensor] = {}
    for h in range(H):
        for b in range(L):
            for p in ("weight", "bias"):
                src = state[f"mlps.{h}.blocks.{b}.linear.{p}"]
                out[f"{h}.{b}.linear.{p}" if fmt == "medusa" else f"blocks.{h}.layers.{b}.{p}"] = src
        lm = base_lm_head if config.share_lm_head else state[f"lm_heads.{h}.weight"]
        if fmt == "medusa":
            out[f"{h}.{L}.weight"] = lm
        elif not config.share_lm_head or h == 0:
            out[f"lm_heads.{h}.weight"] = lm
    dtype = state["mlps.0.blocks.0.linear.weight"].dtype
    return {k: v.to(dtype).contiguous().clone() for k, v in out.items()}


def export_heads(folder: str | Path, out: str | Path, fmt: str = "medusa", base_model: str | None = None,
                 dtype: str | None = None) -> list[Path]:
    """Write `folder`'s ungrounded heads into `out` in the `fmt` layout. Returns the written files.

    Args:
        base_model: where to read the base output layer from when the heads share it (default: the model
            named in the heads' config).
        dtype: cast the tensors (e.g. "float16" for serving); default: as stored.
    """
    folder, out = Path(folder), Path(out)
    config, state = _load_heads(folder)
    base_lm = _base_lm_head(config, base_model) if config.share_lm_head else None
    tensors = convert_state(config, state, fmt, base_lm)
    if dtype:
        tensors = {k: v.to(to_dtype(dtype)) for k, v in tensors.items()}
    d = tensors["0.0.linear.weight" if fmt == "medusa" else "blocks.0.layers.0.weight"].shape[0]
    vocab = (base_lm if base_lm is not None else state["lm_heads.0.weight"]).shape[0]
    base_name = base_model or config.base_model_name_or_path
    if fmt == "medusa":
        cfg = {"medusa_num_heads": config.hydra_num_heads, "medusa_num_layers": config.hydra_num_layers,
               "base_model_name_or_path": base_name}
        weights = out / MEDUSA_WEIGHTS
    else:
        cfg = {"model_type": "medusa", "hidden_size": int(d), "vocab_size": int(vocab),
               "num_heads": config.hydra_num_heads, "num_hidden_layers": config.hydra_num_layers,
               "medusa_fc_bias": True, "truncated_vocab_size": int(vocab),
               "base_model_name_or_path": base_name}
        if config.share_lm_head:
            cfg["original_lm_head"] = True
        draft_vocab = folder / DRAFT_VOCAB_NAME
        if draft_vocab.is_file():  # vLLM's equivalent: token_map + truncated_vocab_size (it slices lm_heads)
            token_map = load_file(str(draft_vocab))["token_ids"].to(torch.long)
            tensors["token_map"] = token_map.contiguous()
            cfg["truncated_vocab_size"] = int(token_map.numel())
        weights = out / VLLM_WEIGHTS
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    readme = out / "README.md"
    readme.write_text(_readme(config, fmt, base_name))
    return [out / CONFIG_NAME, weights, readme]


def _readme(config: HydraConfig, fmt: str, base_name: str) -> str:
    shared = ("The heads were trained with `share_lm_head=True`: "
              + ("the base model's output layer is copied into every head's output layer `{h}.{L}.weight`, "
                 "because Medusa v1 readers expect one per head.\n" if fmt == "medusa" else
                 "the file holds it once as `lm_heads.0.weight` and the config sets "
                 "`original_lm_head: true`.\n")
              if config.share_lm_head else "")
    use = ("FasterDecoding Medusa (`MedusaModel.from_pretrained(DIR)`), TGI (`--model-id DIR`; the base "
           "model is read from `base_model_name_or_path`) and TensorRT-LLM "
           "(`examples/medusa/convert_checkpoint.py --medusa_model_dir DIR`)" if fmt == "medusa" else
           "vLLM: `speculative_config={\"method\": \"medusa\", \"model\": DIR, \"num_speculative_tokens\": "
           f"{config.hydra_num_heads}}}` (top-1 chain proposals, lossless verification)")
    return (f"# {config.hydra_num_heads} Medusa heads for {base_name}\n\n"
            f"Exported from ungrounded Hydra-package heads (`hydra_head_arch=mlp`, {config.hydra_num_layers} "
            f"ResBlock(s) per head) in the `{fmt}` layout, for {use}.\n\n{shared}")
