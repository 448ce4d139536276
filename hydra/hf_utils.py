"""Push a heads folder to the Hugging Face Hub, and export ungrounded heads for serving engines.

Usage:
    python -m hydra.hf_utils --folder HEADS_DIR --repo USER/NAME [--private] [--endpoint URL]
    python -m hydra.hf_utils export-medusa --folder HEADS_DIR --out OUT_DIR [--format medusa|vllm]
        [--base-model MODEL] [--dtype float16]

Upload: validates the folder (a Hydra heads folder: config.json readable as HydraConfig + model.safetensors
matching it; or a folder written by export-medusa), creates the repo if needed and uploads every file in the
folder. The token comes from $HF_TOKEN or `hf auth login`; --endpoint (or $HF_ENDPOINT) points at another Hub
(e.g. a private mirror). Afterwards `HydraModel.from_pretrained("USER/NAME")` and
`python -m hydra.inference.cli --model USER/NAME` load the heads by id; their config names the base model.

export-medusa: writes ungrounded (`mlp`) heads as FasterDecoding Medusa v1 (`medusa_lm_head.safetensors`, read
by Medusa, TGI and TensorRT-LLM) or as vLLM's `model_type: medusa` draft model; see hydra/export.py. Grounded
Hydra heads (`hydra-mlp`, `prefix-mlp`) are refused: no serving engine runs them today.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from hydra.model.hydra_model import (
    CONFIG_NAME,
    DRAFT_VOCAB_NAME,
    LEGACY_WEIGHTS_NAME,
    WEIGHTS_NAME,
    load_hydra_config,
)

IGNORE_PATTERNS = [".*", "**/.*", "__pycache__/*", "*.tmp", "*.partial"]


class FolderError(ValueError):
    pass


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
        raise FolderError(f"{path} is not a readable safetensors file ({e})") from None


def validate_folder(folder: str | Path) -> str:
    """Check a folder before uploading. Returns its kind: "hydra", "medusa" or "vllm"; raises FolderError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FolderError(f"{folder} is not a folder")
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise FolderError(f"{folder} has no {CONFIG_NAME}: not a heads folder (save heads with "
                          "HydraModel.save_pretrained or the training script)")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FolderError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise FolderError(f"{cfg_path} does not hold a JSON object")
    if "medusa_num_heads" in raw:
        keys = _require_weights(folder, "medusa_lm_head.safetensors")
        _check_head_indices(keys, r"^(\d+)\.", raw["medusa_num_heads"], folder)
        return "medusa"
    if raw.get("model_type") == "medusa":
        keys = _require_weights(folder, WEIGHTS_NAME)
        if not raw.get("original_lm_head"):
            _check_head_indices(keys, r"^blocks\.(\d+)\.", raw.get("num_heads"), folder)
        return "vllm"
    try:
        config = load_hydra_config(cfg_path)
    except (ValueError, TypeError) as e:
        raise FolderError(f"{cfg_path} is not a Hydra heads config: {e}") from None
    if not (folder / WEIGHTS_NAME).is_file():
        if (folder / LEGACY_WEIGHTS_NAME).is_file():
            return "hydra"  # original release format; HydraModel.from_pretrained converts it when loading
        raise FolderError(f"{folder} has no {WEIGHTS_NAME}")
    keys = _safetensors_keys(folder / WEIGHTS_NAME)
    if not keys:
        raise FolderError(f"{folder / WEIGHTS_NAME} holds no tensors")
    _check_head_indices(keys, r"^mlps\.(\d+)\.", config.hydra_num_heads, folder)
    has_lm = any(k.startswith("lm_heads.") for k in keys)
    if has_lm == config.share_lm_head:
        raise FolderError(f"{folder}: share_lm_head={config.share_lm_head} in config.json, but the weights "
                          f"{'have' if has_lm else 'lack'} per-head output layers")
    if any(k.startswith("prefix.") for k in keys) != (config.hydra_head_arch == "prefix-mlp"):
        raise FolderError(f"{folder}: the weights do not match hydra_head_arch={config.hydra_head_arch!r}")
    if (folder / DRAFT_VOCAB_NAME).exists() and _safetensors_keys(folder / DRAFT_VOCAB_NAME) != ["token_ids"]:
        raise FolderError(f"{folder / DRAFT_VOCAB_NAME} should hold exactly one tensor, token_ids")
    return "hydra"


def _require_weights(folder: Path, name: str) -> list[str]:
    if not (folder / name).is_file():
        raise FolderError(f"{folder} has no {name}")
    return _safetensors_keys(folder / name)


def _check_head_indices(keys: list[str], pattern: str, num_heads, folder: Path) -> None:
    heads = {int(m[1]) for k in keys if (m := re.match(pattern, k))}
    if num_heads is not None and heads != set(range(int(num_heads))):
        raise FolderError(f"{folder}: config.json says {num_heads} heads, but the weights hold heads "
                          f"{sorted(heads)}")


def upload(folder: str | Path, repo: str, private: bool = False, endpoint: str | None = None,
           token: str | None = None, commit_message: str | None = None) -> str:
    """Create `repo` (if needed) and upload `folder` into it. Returns the repo URL."""
    from huggingface_hub import HfApi

    kind = validate_folder(folder)
    api = HfApi(endpoint=endpoint, token=token)
    url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                      ignore_patterns=IGNORE_PATTERNS,
                      commit_message=commit_message or f"Upload {kind} heads")
    return str(url)


def _upload_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m hydra.hf_utils",
                                description="Upload a heads folder to the Hugging Face Hub "
                                            "(or: python -m hydra.hf_utils export-medusa -h).")
    p.add_argument("--folder", type=os.path.expanduser,
                   required=True, help="heads folder (config.json + model.safetensors)")
    p.add_argument("--repo", required=True, help="target repo id, e.g. USER/hydra-heads")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--endpoint", default=None, help="Hub URL (default: $HF_ENDPOINT or https://huggingface.co)")
    p.add_argument("--commit-message", default=None)
    args = p.parse_args(argv)
    try:
        kind = validate_folder(args.folder)
        files = sorted(str(f.relative_to(args.folder)) for f in Path(args.folder).rglob("*")
                       if f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(args.folder).parts))
        print(f"[hydra] uploading {kind} heads ({', '.join(files)}) to {args.repo}", flush=True)
        url = upload(args.folder, args.repo, args.private, args.endpoint, commit_message=args.commit_message)
    except FolderError as e:
        print(f"[hydra] error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001  (HTTP and connection errors of several libraries, file errors)
        msg = (str(e).splitlines() or [""])[0]
        hint = " (log in with `hf auth login` or set HF_TOKEN)" if "401" in msg or "403" in msg else ""
        print(f"[hydra] upload failed{hint}: {type(e).__name__}: {msg}", file=sys.stderr)
        return 1
    print(f"[hydra] uploaded to {url}")
    if kind == "hydra":
        print(f"[hydra] load with HydraModel.from_pretrained({args.repo!r}) or "
              f"python -m hydra.inference.cli --model {args.repo}")
    return 0


def _export_main(argv: list[str]) -> int:
    from hydra.export import FORMATS, GroundedHeadsError, export_heads

    p = argparse.ArgumentParser(prog="python -m hydra.hf_utils export-medusa",
                                description="Export ungrounded (mlp) heads for Medusa / TGI / TensorRT-LLM "
                                            "(--format medusa) or vLLM (--format vllm).")
    p.add_argument("--folder", type=os.path.expanduser,
                   required=True, help="Hydra heads folder with hydra_head_arch 'mlp'")
    p.add_argument("--out", type=os.path.expanduser, required=True, help="output folder")
    p.add_argument("--format", choices=FORMATS, default="medusa")
    p.add_argument("--base-model", type=os.path.expanduser, default=None,
                   help="base model to read the shared output layer from (default: the one in the heads' "
                        "config)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="cast the exported tensors (default: as stored)")
    args = p.parse_args(argv)
    import warnings

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            files = export_heads(args.folder, args.out, args.format, args.base_model, args.dtype)
    except GroundedHeadsError as e:
        print(f"[hydra] cannot export: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"[hydra] error: {e}", file=sys.stderr)
        return 1
    for w in caught:
        print(f"[hydra] warning: {w.message}", file=sys.stderr)
    config = load_hydra_config(Path(args.folder) / CONFIG_NAME)
    if config.share_lm_head:
        print("[hydra] note: the heads share the base model's output layer; "
              + ("it was copied into every head's {h}.{L}.weight (Medusa v1 readers need one per head)"
                 if args.format == "medusa"
                 else "written once as lm_heads.0.weight with original_lm_head: true"))
    print(f"[hydra] wrote {', '.join(str(f) for f in files)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export-medusa":
        return _export_main(argv[1:])
    if argv and argv[0] == "upload":
        argv = argv[1:]
    return _upload_main(argv)


if __name__ == "__main__":
    sys.exit(main())
