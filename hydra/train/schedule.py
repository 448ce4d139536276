"""Learning-rate schedules as a pure function of the optimizer step (so resuming needs no scheduler state).

All schedules warm up linearly from 0 over `warmup_steps` (lr multiplier step / warmup_steps, the Hugging Face
convention), then:
  cosine    f + (1 - f) * 0.5 * (1 + cos(pi * progress)), progress = (step - warmup) / (total - warmup)
  linear    f + (1 - f) * (total - step) / (total - warmup)
  constant  1
where f = final_lr_multiplier (the original Hydra `--final_lr_multiplier`; 0 = decay to zero).

With a time budget (`--time_budget_minutes`) the total is fixed once, at the end of the warm-up, whose
learning rates do not depend on it (`steps_within_budget`), so the decay still ends at the last step.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "linear", "constant")
_ALIASES = {"constant_with_warmup": "constant", "cosine_with_warmup": "cosine"}


def check_schedule(kind: str, final_lr_multiplier: float) -> str:
    kind = _ALIASES.get(kind, kind)
    if kind not in SCHEDULES:
        raise ValueError(f"unknown lr_scheduler_type {kind!r}; choose one of {SCHEDULES}")
    if not 0.0 <= final_lr_multiplier <= 1.0:
        raise ValueError(f"final_lr_multiplier must be in [0, 1], got {final_lr_multiplier}")
    return kind


def lr_multiplier(step: int, total_steps: int, warmup_steps: int = 0, kind: str = "cosine",
                  final_lr_multiplier: float = 0.0, restarted_at: int = 0) -> float:
    """The factor on the peak learning rate for optimizer step `step` (0-based: the update about to run).
    `restarted_at`: the step a run continued from with fresh optimizer moments; the schedule's factor is
    warmed up again over `warmup_steps` from there (Adam's first updates from zero moments are full-size in
    every coordinate)."""
    if restarted_at and step >= restarted_at and warmup_steps:
        rewarm = min(1.0, (step - restarted_at + 1) / warmup_steps)
        return rewarm * lr_multiplier(step, total_steps, warmup_steps, kind, final_lr_multiplier)
    kind = check_schedule(kind, final_lr_multiplier)
    f = final_lr_multiplier
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "cosine":
        return f + (1.0 - f) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return f + (1.0 - f) * (1.0 - progress)


def cooldown_multiplier(start_multiplier: float, step: int, start: int, steps: int) -> float:
    """A cool-down branch (`--decay_from`, `--decay_steps`): from the schedule's factor at step `start`, down
    linearly over `steps` updates towards zero, as warmup-stable-decay schedules end (Hu et al. 2024, MiniCPM;
    Hägele et al. 2024). Update `start` takes steps/(steps+1) of it, the last 1/(steps+1): no update is
    wasted at zero."""
    return start_multiplier * (start + steps - step) / (steps + 1)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# Steps timed before a time budget fixes the total, when the warm-up is shorter than that.
MIN_TIMED_STEPS = 3


def steps_within_budget(budget_s: float, elapsed_s: float, steps_timed: int, done: int, planned: int) -> int:
    """The total step count that fits a wall-time budget: the `done` steps plus as many more as the time left
    allows at the rate of the `steps_timed` steps that took `elapsed_s` (their evaluations and checkpoints
    included); never more than `planned`, never fewer than `done`."""
    if steps_timed <= 0 or elapsed_s <= 0:
        return planned
    more = int(max(0.0, budget_s - elapsed_s) * steps_timed / elapsed_s)
    return max(done, min(planned, done + more))
