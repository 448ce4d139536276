"""Resumable checkpoints: `<output_dir>/checkpoint-<step>/`, written to a temporary folder and renamed.

A checkpoint holds
  config.json + model.safetensors   the heads (HydraModel.save_pretrained / HydraModel.from_pretrained)
  optimizer.pt                      the optimizer's state_dict (tensors, numbers, strings only; read back with
                                    torch.load(weights_only=True), never unpickling arbitrary objects)
  deepspeed/                        instead of optimizer.pt under --deepspeed (DeepSpeed's own format)
  trainer_state.json                step, epoch, tokens seen, run arguments; written last
The learning rate is a function of the step and the random state is re-seeded from (seed, step, rank) every
step, and the batch order is a function of the step, so nothing else is needed to continue exactly.
A folder without trainer_state.json, or a `*.partial` one, is an interrupted save and is ignored.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from hydra.model.heads import DraftHeads
from hydra.model.hydra_model import CONFIG_NAME, WEIGHTS_NAME, load_hydra_config

STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"
DEEPSPEED_DIR = "deepspeed"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    out = []
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for child in root.iterdir():
        m = _CKPT_RE.match(child.name)
        if m and child.is_dir() and (child / STATE_NAME).is_file():
            out.append((int(m.group(1)), child))
    return sorted(out)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def remove_partial(output_dir: str | Path) -> None:
    root = Path(output_dir)
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith("checkpoint-") and child.name.endswith(".partial") and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)


def partial_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}.partial"


def write_checkpoint(output_dir: str | Path, step: int, model, optimizer: torch.optim.Optimizer | None,
                     state: dict[str, Any], keep: int = 2) -> Path:
    """Main process only. Writes heads, optimizer state and trainer_state.json into checkpoint-<step>.partial,
    renames it to checkpoint-<step>, then deletes all but the newest `keep` checkpoints.
    (Under DeepSpeed every rank has already written partial_dir(...)/deepspeed; optimizer is None then.)"""
    tmp = partial_dir(output_dir, step)
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, dtype=torch.float32)
    if optimizer is not None:
        torch.save(_to_cpu(optimizer.state_dict()), tmp / OPTIMIZER_NAME)
    (tmp / STATE_NAME).write_text(json.dumps(state, indent=2, sort_keys=True))
    final = Path(output_dir) / f"checkpoint-{step}"
    if final.exists():
        shutil.rmtree(final)
    tmp.replace(final)
    if keep > 0:
        for _, old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(checkpoint: str | Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / STATE_NAME).read_text())


def load_heads(checkpoint: str | Path, model) -> None:
    state = load_file(str(Path(checkpoint) / WEIGHTS_NAME))
    heads = model.heads
    with torch.no_grad():
        own = heads.state_dict()
        # Parameter groups that start as a no-op may be absent (all of a group or none): heads saved without
        # them then start from exactly themselves.
        optional = set()
        for group in DraftHeads.STARTS_AS_NO_OP:
            if not any(k.startswith(group) for k in state):
                optional |= {k for k in own if k.startswith(group)}
        missing = sorted(set(own) - set(state) - optional)
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"{checkpoint} does not match these heads (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}); was it written with different --hydra_* flags?")
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))


def saved_tree(heads_dir: str | Path):
    """The decoding tree named in a heads folder's config.json (None where it names none or has no config)."""
    path = Path(heads_dir) / CONFIG_NAME
    return load_hydra_config(path).tree if path.is_file() else None


def load_optimizer(checkpoint: str | Path, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    sd = torch.load(Path(checkpoint) / OPTIMIZER_NAME, map_location=device, weights_only=True)
    optimizer.load_state_dict(sd)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
