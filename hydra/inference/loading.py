"""What the chat CLI and the MT-Bench scripts share: finding the heads, loading the model, rendering prompts,
and timing on the right device."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from hydra.model import DEFAULT_BASE_MODEL, HydraConfig, HydraModel, load_base_model

# Trained heads shipped with the package (config.json + model.safetensors); absent until someone trains them.
DEFAULT_HEADS_DIR = Path(__file__).resolve().parents[1] / "heads" / "default"


def default_heads_folder() -> Path | None:
    """The shipped heads folder, or None if the package does not ship one."""
    return DEFAULT_HEADS_DIR if (DEFAULT_HEADS_DIR / "config.json").is_file() else None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(heads: str | Path | None = None, base_model: str | None = None, dtype: str = "bfloat16",
               device: str | None = None, heads_required: bool = False,
               quant: str | None = None, compile: bool = False,
               heads_quant: str | None = "auto") -> tuple[HydraModel, bool]:
    """Load heads (folder or Hub id; None: the shipped heads) on their base model. `compile`: compile the base
    decoder (`hydra.model.compiled`; the first forwards then take minutes, see `warm_up`). `heads_quant`:
    the heads' weights ("auto": the kind of a quantized base, else float; `HydraModel.from_pretrained`).

    Returns (model, has_heads). With no heads given and none shipped, returns the base model wrapped in a
    HydraModel with an unused placeholder head (enough for `ar_generate`) and has_heads=False, unless
    `heads_required`, in which case it raises FileNotFoundError.
    """
    device = device or default_device()
    if heads is None:
        heads = default_heads_folder()
    if heads is None:
        if heads_required:
            raise FileNotFoundError(
                f"no heads given and none shipped in "
                f"{DEFAULT_HEADS_DIR.relative_to(DEFAULT_HEADS_DIR.parents[2])}: "
                "pass a heads folder or Hub repo id")
        base, tokenizer = load_base_model(base_model, dtype, device, quant=quant)
        config = HydraConfig(hydra_num_heads=1, hydra_head_arch="mlp",
                             base_model_name_or_path=base_model or DEFAULT_BASE_MODEL)
        model, has_heads = HydraModel(base, config, tokenizer).eval(), False
    else:
        model = HydraModel.from_pretrained(heads, base_model=base_model, dtype=dtype, device=device,
                                           quant=quant, heads_quant=heads_quant)
        model, has_heads = model.eval(), True
    if compile:
        from hydra.model.compiled import compile_decoder

        compile_decoder(model)
    return model, has_heads


def check_decoding(model: HydraModel, config, speculative: bool) -> None:
    """Raise ValueError now for a bad tree, temperature or sampling rule, before anything is generated or
    written: the generators check their arguments when called, before their first forward."""
    from hydra.model.generate import ar_generate, hydra_generate

    (hydra_generate if speculative else ar_generate)(model, [0], config).close()


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """Token ids of a conversation rendered with the model's chat template, ready for the assistant's turn."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    if out and isinstance(out[0], list):
        out = out[0]
    return list(out)


def context_length(model: HydraModel) -> int:
    return int(model.base_model.config.max_position_embeddings)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work so wall-clock timings are real (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
