"""Prompt lookup: draft tokens copied from the context, added to each step's tree as one more branch.

Replies often repeat what the conversation already holds: code being edited, names and numbers from the
prompt, a list restated in a second turn, a sentence the model itself wrote a moment ago. When the last n
tokens of the context (n from `max_ngram` down to `min_ngram`) occurred before, the tokens that followed
that earlier occurrence are a guess for what follows now (prompt lookup decoding, Saxena 2023; transformers'
`prompt_lookup_num_tokens`; vLLM's n-gram speculator). The heads guess what a language model would say;
the lookup guesses where it will copy, so the two miss on different steps.

The guess is a deterministic function of the tokens decided so far, like the heads' drafts, so greedy
decoding stays identical to plain greedy decoding and exact sampling stays exact.

A draft is also free to make, so a step that does not verify it can still learn what verifying it would
have decided: `follow` keeps it, and once the tokens decided after it settle the outcome, `outcomes` gives
its matched prefix plus the bonus token. Under greedy decoding that is exactly what the verification would
have accepted; under exact sampling it has the same distribution (a fixed draft token is accepted with the
probability that the sampled token equals it); typical acceptance accepts at least as much. Pacing uses it
to judge the lookup without paying for probes (hydra.model.pacing).
"""

from __future__ import annotations

# n-gram sizes tried, longest first. Matching single tokens too drafts 2-3x as many tokens per step for a
# fifth more confirmed ones (scripts/lookup_replay.py on the default model's replies, README "Prompt
# lookup"): verification a CPU pays for on every matched step.
MIN_NGRAM, MAX_NGRAM = 2, 3


class PromptLookup:
    """The context's n-grams, each mapped to the position after its latest occurrence that has a following
    token, so a draft is one dictionary lookup per n-gram size and the index grows in O(new tokens)."""

    def __init__(self, max_tokens: int, min_ngram: int = MIN_NGRAM, max_ngram: int = MAX_NGRAM):
        if max_tokens < 1 or not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"prompt lookup needs max_tokens >= 1 and 1 <= min_ngram <= max_ngram, got "
                             f"{max_tokens}, {min_ngram}, {max_ngram}")
        self.max_tokens, self.min_ngram, self.max_ngram = max_tokens, min_ngram, max_ngram
        self.tokens: list[int] = []
        self._after: dict[tuple[int, ...], int] = {}
        self._followed: list[tuple[int, list[int]]] = []  # (position of its first token, draft), unsettled

    def extend(self, tokens: list[int]) -> None:
        """Append decided tokens; the n-grams they complete point at the token after them."""
        for token in tokens:
            j = len(self.tokens)
            for n in range(self.min_ngram, min(self.max_ngram, j) + 1):
                self._after[tuple(self.tokens[j - n: j])] = j
            self.tokens.append(token)

    def draft(self) -> list[int]:
        """Up to `max_tokens` tokens that followed the latest earlier occurrence of the context's longest
        matching suffix; empty when no suffix of `min_ngram` tokens or more occurred before."""
        for n in range(min(self.max_ngram, len(self.tokens)), self.min_ngram - 1, -1):
            j = self._after.get(tuple(self.tokens[-n:]))
            if j is not None:
                return self.tokens[j: j + self.max_tokens]
        return []

    def follow(self, draft: list[int]) -> None:
        """Keep a draft that this step does not verify (it guesses the tokens after the context's last one),
        to score it against the tokens decided after it (`outcomes`)."""
        self._followed.append((len(self.tokens), draft))

    def outcomes(self) -> list[int]:
        """For each followed draft that the tokens decided since settle (a token that differs from it, or all
        of it matched): the tokens a step verifying it would have decided, its matched prefix plus the
        bonus token. Each draft is reported once."""
        settled, waiting = [], []
        for start, draft in self._followed:
            decided = self.tokens[start: start + len(draft)]
            matched = next((i for i, (a, b) in enumerate(zip(decided, draft, strict=False)) if a != b),
                           len(decided))
            if matched < len(decided) or matched == len(draft):
                settled.append(matched + 1)
            else:
                waiting.append((start, draft))
        self._followed = waiting
        return settled
