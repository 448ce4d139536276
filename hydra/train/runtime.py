"""What train.py needs from its surroundings: the process group, the device, seeds, autocast and the log."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t)
        return t

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """The main rank's `t`, on every rank (in place)."""
        if self.enabled:
            dist.broadcast(t, src=0)
        return t

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients over ranks in one flat all-reduce (the loss is already normalised by the global
        batch's token count, so a sum is the mean gradient)."""
        if not self.enabled:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p)
            offset += n

    def close(self) -> None:
        self.barrier()
        if dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(local_rank: int = -1, use_cpu: bool = False) -> Dist:
    """Read torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK); nccl on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank if local_rank >= 0 else 0))
    use_cuda = torch.cuda.is_available() and not use_cpu
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                device_id=device if use_cuda else None)
    return Dist(rank, world, local_rank, device)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The random state of a step is a function of (seed, step, rank): a resumed run continues exactly."""
    return ((seed * 1_000_003 + step) * 1_009 + rank) % (2 ** 63)


def autocast_ctx(enabled: bool, device: torch.device):
    if not enabled:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def every(value: float, total_steps: int) -> int:
    """eval_steps / save_steps: >= 1 is a step count, (0, 1) a fraction of the run, <= 0 disabled (0)."""
    if value <= 0:
        return 0
    if value < 1:
        return max(1, math.ceil(value * total_steps))
    return int(value)


class Logger:
    """Prints on the main process and appends one JSON object per event to <output_dir>/log.jsonl."""

    def __init__(self, output_dir: Path, enabled: bool):
        self.path = output_dir / "log.jsonl"
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """On resume: drop events logged after the checkpoint we continue from (they are redone)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
        self.path.write_text("".join(k + "\n" for k in kept))

    def event(self, record: dict, line: str) -> None:
        if not self.enabled:
            return
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def info(self, msg: str) -> None:
        if self.enabled:
            print(f"[hydra.train] {msg}", flush=True)
