"""One multi-turn conversation, timed turn by turn: the loop that the MT-Bench answer scripts and
scripts/bench_chat.py share (the chat CLI has its own, since it streams and can be interrupted).

Each turn is asked with the model's own earlier replies in the history, and with a `PromptCache` kept
across the turns (unless `cached=False`), so a later turn prefills only what follows the earlier ones.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hydra.inference.loading import render_prompt, synchronize
from hydra.model.generate import PromptTooLongError
from hydra.model.prompt_cache import PromptCache


@dataclass
class Turn:
    reply: str  # decoded, special tokens skipped, stripped; `error_reply` if the turn could not be generated
    tokens: list[int] = field(default_factory=list)  # emitted token ids (stop token excluded)
    accept_lengths: list[int] = field(default_factory=list)  # tokens decided per step, prefill step included
    finish_reason: str | None = None  # the engine's, or "error"
    prompt_tokens: int = 0
    reused_prompt_tokens: int = 0  # prompt tokens whose prefill the cache saved
    wall_time: float = 0.0  # seconds around the whole generate call
    first_token_time: float = 0.0  # seconds to the first step's tokens (the prefill and one token)


def converse(model, turns: list[str], generate: Callable, config, cached: bool = True,
             error_reply: str = "", label: str = "") -> list[Turn]:
    """Answer `turns` one after another. `generate` is hydra_generate or ar_generate; turn i runs with
    `config.seed + i` when the config has a seed. A turn whose conversation no longer fits the context is
    reported on stderr (prefixed by `label`) and recorded with finish_reason "error"; its reply in the
    history is `error_reply`, and the later turns are still asked."""
    device = next(model.parameters()).device
    cache = PromptCache() if cached else None
    messages: list[dict] = []
    out = []
    for i, text in enumerate(turns):
        messages.append({"role": "user", "content": text})
        ids = render_prompt(model.tokenizer, messages)
        cfg = dataclasses.replace(config, seed=None if config.seed is None else config.seed + i,
                                  prompt_cache=cache)
        turn = Turn(reply="", prompt_tokens=len(ids))
        try:
            synchronize(device)
            start = time.perf_counter()
            for step in generate(model, ids, cfg):
                if not turn.accept_lengths:
                    turn.first_token_time = time.perf_counter() - start
                turn.tokens += step.tokens
                turn.accept_lengths.append(step.accept_length)
                turn.finish_reason = step.finish_reason
            synchronize(device)
            turn.wall_time = time.perf_counter() - start
            turn.reply = model.tokenizer.decode(turn.tokens, skip_special_tokens=True).strip()
            turn.reused_prompt_tokens = cache.reused_tokens if cached else 0
        except PromptTooLongError as e:
            print(f"{label}turn {i + 1}: {e}", file=sys.stderr)
            turn = Turn(reply=error_reply, finish_reason="error", prompt_tokens=len(ids))
        messages.append({"role": "assistant", "content": turn.reply})
        out.append(turn)
    return out
