"""Reuse across calls: what a decoding call computed for its tokens, kept for the next call whose prompt
starts with them.

A chat sends the whole conversation every turn, and without reuse every turn prefills all of it again: the
earlier turns' keys and values, and for a Hydra++ prefix layer its own cache over them. Pass one
`PromptCache` in `DecodeConfig.prompt_cache` to successive calls (the chat CLI and the server keep one): each
call keeps its KV cache and the tokens in its slots, and the next call takes over the rows of the longest
prefix its prompt shares with them, drops the rest (later slots are simply overwritten, as after a rejected
tree) and prefills only what follows. Matching tokens rather than messages makes every edit safe: a removed
exchange, a regenerated reply, a reply whose text re-tokenises differently, or another conversation share
less or nothing, and are prefilled from where they differ. `PromptCache(entries=N)` keeps the states of the
latest N calls, for a server whose requests interleave several conversations.

The kept rows were computed by tree and one-token forwards rather than by one prefill: the same values up to
rounding, so a reply can differ from the one a fresh prefill gives where two tokens are near-tied (as a tree
forward and a one-token forward do; in fp32 rarely, in bf16 more often).

What a call keeps is updated after each step it hands out, never in the middle of one, so a call stopped
between steps (a client that went away) leaves a consistent state. A call interrupted inside a step (Ctrl-C
during a forward) should `clear()` it (the chat CLI does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from hydra.model.kv_cache import TreeKVCache


@dataclass
class Kept:
    """One call's state after its latest step: cache slots [0, n) hold `tokens[:n]`."""

    key: tuple  # which model, weights and cache kind the rows belong to (rows of another are not reused)
    kv: TreeKVCache
    tokens: list[int]  # the token at each slot; may run past n (a step stopped after it was written)
    n: int = 0
    # The heads' state, where the run had a prefix layer: its cache holds positions [0, unread_from), and
    # `unread` the base hidden states of [unread_from, n), which it has not read yet.
    prefix_cache: DynamicCache | None = None
    unread_from: int = 0
    unread: list[torch.Tensor] = field(default_factory=list)


@dataclass
class Reused:
    """What a new call takes over: the cache rows of `length` prompt tokens and, for a prefix layer, its cache
    over [0, unread_from) and the hidden states of [unread_from, length) (None where that is empty)."""

    kv: TreeKVCache
    length: int
    prefix_cache: DynamicCache | None = None
    unread_from: int = 0
    unread: torch.Tensor | None = None


class PromptCache:
    """The state the latest `entries` calls kept, newest first (see the module docstring). One entry serves
    one conversation; a server that interleaves several keeps more, each holding its own KV buffers (on the
    default model ~23 KB per token in bf16, 46 KB on an int4 base, whose cache is float32). With several
    entries a call takes one over only if its prompt shares at least half of that entry's tokens.
    `reused_tokens`: how many prompt tokens the latest call took from it rather than prefilling."""

    def __init__(self, entries: int = 1):
        if not isinstance(entries, int) or entries < 1:
            raise ValueError(f"a prompt cache keeps at least one entry, not {entries!r}")
        self.entries = entries
        self._kept: list[Kept] = []
        self._owner: object | None = None
        self.reused_tokens = 0

    def clear(self) -> None:
        """Forget what was kept (the next call prefills its whole prompt)."""
        self._kept, self._owner, self.reused_tokens = [], None, 0

    def owned_by(self, owner: object) -> bool:
        """Whether `owner` is the call that took the cache last (the one whose state it keeps)."""
        return owner is self._owner

    def keep(self, kept: Kept) -> None:
        """Called by the owning run after each step it hands out; the oldest entry beyond `entries` goes."""
        if not self._kept or self._kept[0] is not kept:
            self._kept = [kept, *(k for k in self._kept if k is not kept)][: self.entries]

    def take(self, owner: object, prompt: list[int], key: tuple, needs_prefix: bool,
             prefix_reads_next: bool = False) -> Reused | None:
        """Hand the rows of the longest prefix `prompt` shares with an entry's tokens to a new call (`owner`),
        which from now on is the one that keeps; that entry leaves the cache (its buffers are the new
        call's). The prompt's last token is always prefilled (its forward gives the first token's logits).
        `key`: the new call's model and cache kind; `needs_prefix`: it runs a prefix layer, so the kept heads'
        state must come too; `prefix_reads_next`: that layer's row at t also read token t+1. None when nothing
        is reused."""
        self._owner, self.reused_tokens = owner, 0
        kept, length = None, 0
        for entry in self._kept:
            if entry.key != key or (needs_prefix and entry.prefix_cache is None):
                continue
            shared = _shared_prefix(entry.tokens, min(entry.n, len(prompt) - 1), prompt)
            if needs_prefix and prefix_reads_next and shared <= entry.unread_from:
                # The prefix layer's row at shared-1 read the kept token at `shared`, which the prompt may
                # not share, and the hidden state of shared-1 is gone with it: prefill that position again.
                shared -= 1
            # With room for several conversations, a prompt that shares less than half of an entry's tokens
            # (a system prompt, say) belongs to another one: it is prefilled whole and leaves the entry be
            # (llama.cpp's server picks its slots by the same similarity, 0.5 by default).
            if self.entries > 1 and 2 * shared < entry.n:
                continue
            if shared > length:
                kept, length = entry, shared
        if kept is None:
            return None
        self._kept.remove(kept)
        reused = Reused(kept.kv, length)
        if needs_prefix:
            # Positions the prefix layer read past `length` go; those it had not read yet stay unread.
            reused.unread_from = min(kept.unread_from, length)
            reused.prefix_cache = kept.prefix_cache
            reused.prefix_cache.crop(reused.unread_from - reused.prefix_cache.get_seq_length())
            if length > kept.unread_from:
                reused.unread = torch.cat(kept.unread)[: length - kept.unread_from]
        self.reused_tokens = length
        return reused


def weights_version(model: torch.nn.Module) -> tuple[int, ...]:
    """A stamp of the model's parameters that changes when any of them is changed in place (an optimizer
    step, `load_state_dict`): rows and heads' state computed with other weights are not reused. Torch counts
    in-place writes per tensor; parameters created under `torch.inference_mode` have no count (-1), and are
    read-only outside it. Buffers are left out: some rotary embeddings rewrite theirs during a forward."""
    return tuple(-1 if t.is_inference() else t._version for t in model.parameters())


def _shared_prefix(tokens: list[int], limit: int, prompt: list[int]) -> int:
    """How many leading tokens, at most `limit`, `tokens` and `prompt` have in common."""
    length = 0
    while length < limit and tokens[length] == prompt[length]:
        length += 1
    return length
