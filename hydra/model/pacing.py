"""`Pacer`: speculate only while it pays, judged by the clock.

A speculative step pays when it decides more tokens than a plain one-token step would in the same time.
Whether it does depends on the heads' accuracy on this text and on what a forward costs on this machine: on
a 4-bit or compiled base the heads' own time is a larger share of a step, and on text the heads do not know
(e.g. translation) most steps decide one token at more than a plain step's cost. So the decoding loop times
its steps (`time.perf_counter`; the consumer's time between steps is not counted) and keeps two running
averages over speculative steps: their cost in plain-step times and the tokens they decide. While tokens
exceed cost, every step speculates. Otherwise each speculative step is a probe that loses (cost - tokens)
plain-step times, and the heads rest for enough plain steps that probing costs at most `PROBE_SHARE` of the
time (at most `MAX_REST` steps, and at most 2^probes so far: the averages start from priors, and a few
noisy early steps must not bench good heads for long); a probe that by itself decided more tokens than its
cost is followed by another speculative step at once, so text that turns easy is taken up after one winning
probe rather than after the averages have caught up. Plain steps keep the plain-step time current (with a
larger weight: it changes only with the context); a resting step is forced after `REMEASURE_EVERY`
speculative steps, and the first step of a reply is plain to time one.

What a pacer has measured outlives a reply: pass the same `Pacer` as `DecodeConfig.pace` to successive calls
(the chat CLI, the server, the answer scripts and the benchmark each keep one) and the next reply starts from
its averages instead of the priors, so heads known to lose on this machine rest from the first steps and
are not re-learned at the price of a few probes per reply (a 128-token reply of a 4-bit base on translation
spent about 5% of its time on them). `pace=True` takes a fresh pacer for the one call.

With prompt lookup on, a resting step is not a plain step but a lookup-alone step (the lookup branch grafted
onto the root; a plain step where the lookup finds nothing). The heads are then judged against what resting
achieves: the pacer also averages resting steps (cost in plain-step times, tokens), and a speculative step
loses `cost - tokens * rest_cost / rest_tokens` plain-step times. A one-token resting step counts as cost 1,
1 token (it is what defines the unit), so without a lookup the rule is the plain-step one above. The forced
resting step every `REMEASURE_EVERY` speculative steps keeps the resting average current while the heads pay;
a reply's first step stays plain, to time one at the reply's context (`look_up`). The lookup branch is
itself judged against plain steps, by the same rule one level down: a second `Pacer` (`lookup`) sees the
resting steps only, a lookup-alone step as its speculative step and a plain one as its rest, so where
verifying the branch costs more than it decides (a cheap base verifies extra tokens at a higher relative
cost), resting steps are plain ones but for its probes.

A lookup branch also tells what verifying it would have decided without being verified: its draft costs a
dictionary lookup, and the tokens decided after it show how much of it matched (hydra.model.lookup,
`PromptLookup.outcomes`). So the pacer that judges the lookup (the nested one, or the top one for the tree
"none") takes the tokens of every resting step's unverified branch as a sample of its token average
(`record_forgone`), and its probes are left only the step's cost to measure, which changes with the machine
and the context length, not with the text: they rest up to `FORGONE_MAX_REST` steps at a `FORGONE_PROBE_SHARE`
of the time, while a token average that turns winning sends it back to verifying the branch at once (a
losing lookup probe verifies up to 9 tokens, so on a cheap base it loses more than a heads probe; README,
Pacing).

Which steps speculate depends on timing and on earlier steps, never on what the current step draws, so greedy
output is unchanged (identical to plain greedy where the numerics allow, as without pacing) and exact
sampling stays exact; but bf16 rounding and seeded samples can differ between runs. `DecodeConfig.pace`
turns it on.
"""

from __future__ import annotations

import math

WEIGHT = 0.08  # the newest step's weight in the speculative averages (smaller: steadier, slower to follow)
PLAIN_WEIGHT = 0.3  # the newest plain step's weight in the plain-step time
# The averages before any speculative step: try the heads, but not for long if they lose. Priors rather than
# the first sample, because one step's time on a busy machine can be off by 2x.
START_TOKENS, START_COST = 1.5, 1.0
PROBE_SHARE = 0.01
MAX_REST = 64
# For a pacer whose token average is also fed from steps it did not run (`record_forgone`): probes then
# measure the cost alone, which drifts slowly, so they can be rare.
FORGONE_PROBE_SHARE = 0.0025
FORGONE_MAX_REST = 256
REMEASURE_EVERY = 32


def _average(old: float | None, new: float, weight: float) -> float:
    return new if old is None else old + weight * (new - old)


class Pacer:
    """Decides, step by step, whether the heads propose a tree; told every step's time and decided tokens."""

    def __init__(self, weight: float = WEIGHT, judge_lookup: bool = True, probe_share: float = PROBE_SHARE,
                 max_rest: int = MAX_REST):
        self.weight = weight  # the newest speculative step's weight in the averages
        # Probes judged on their own steps alone cost at most `probe_share` of the time, resting at most
        # `max_rest` steps between them (arguments so that scripts/pacing_replay.py can compare them).
        self.probe_share, self.max_rest = probe_share, max_rest
        self.plain_seconds: float | None = None  # average time of a plain step; None until the first one
        self.cost = START_COST  # average speculative step time in plain-step times
        self.tokens = START_TOKENS  # average tokens a speculative step decides (bonus included)
        self.rest = 1  # resting steps left before the heads try again (the first step times a plain step)
        self.since_rest = 0  # speculative steps since the last resting step
        self.probes = 0  # speculative steps timed so far
        self.forgone = 0  # resting steps whose tokens, had they speculated, were known (`record_forgone`)
        # Resting steps (the lookup branch alone, or plain): average cost in plain-step times and tokens.
        # Plain resting steps count as exactly (1, 1), so without a lookup these stay at (1, 1).
        self.rest_cost, self.rest_tokens, self.rests = 1.0, 1.0, 0
        self.time_plain = True  # the next resting step is plain, to time one (set at each reply's start)
        # Whether a resting step verifies the lookup branch: lookup-alone steps against plain ones.
        self.lookup = Pacer(weight, False, probe_share, max_rest) if judge_lookup else None

    def start_reply(self) -> None:
        """A new reply begins: its first step is plain (the context, and with it a step's time, starts short
        again); the averages carry over, so heads known to lose go on resting after it."""
        self.since_rest = 0
        self.time_plain = True
        self.rest = 1 + self._rest_after(self._loss(self.cost, self.tokens))
        if self.lookup is not None:
            self.lookup.start_reply()

    def look_up(self) -> bool:
        """Whether this resting step may verify the lookup branch (call once per resting step): while the
        lookup pays against plain steps or is being probed, and not before a plain step of this reply has
        set the unit."""
        lookup_pays = self.lookup is None or self.lookup.speculate()
        return lookup_pays and not self.time_plain

    def speculate(self) -> bool:
        """Whether the next step runs the heads (call once per step that could run them)."""
        if self.rest > 0:
            self.rest -= 1
            return False
        return self.since_rest < REMEASURE_EVERY

    def record(self, seconds: float, tokens: int, speculated: bool, verified: int = 1) -> None:
        """A step took `seconds`, verified `verified` tokens (1: a plain step) and decided `tokens` (bonus
        included); `speculated`: the step ran what the pacer judges (the heads; for the tree "none", a lookup
        branch), not a resting step."""
        if not speculated:
            self.since_rest = 0
            if self.lookup is not None:
                self.lookup.record(seconds, tokens, speculated=verified > 1, verified=verified)
            if verified == 1:
                self.time_plain = False
                self.plain_seconds = _average(self.plain_seconds, seconds, PLAIN_WEIGHT)
                cost = 1.0
            elif self.plain_seconds is None:
                return
            else:
                cost = self._in_plain_steps(seconds)
            self.rests += 1
            weight = self._weight(self.rests)
            self.rest_cost = _average(self.rest_cost, cost, weight)
            self.rest_tokens = _average(self.rest_tokens, tokens, weight)
            return
        self.since_rest += 1
        if self.plain_seconds is None:  # no plain step timed yet: nothing to compare with
            return
        self.probes += 1
        weight = self._weight(self.probes)
        cost = self._in_plain_steps(seconds)
        self.cost = _average(self.cost, cost, weight)
        self.tokens = _average(self.tokens, tokens, weight)
        won = self._loss(cost, tokens) < 0  # this step by itself beat resting: try the heads again at once
        self.rest = 0 if won else self._rest_after(self._loss(self.cost, self.tokens))

    def record_forgone(self, tokens: int) -> None:
        """A resting step would have decided `tokens` (bonus included) had it speculated, known without
        running it (a prompt-lookup branch scored against the tokens decided after it): a free sample of the
        token average. The cost average moves only with steps that ran. Once the text makes speculating pay,
        the rest ends at once."""
        self.forgone += 1
        self.tokens = _average(self.tokens, tokens, self._weight(self.probes + self.forgone))
        if self._loss(self.cost, self.tokens) < 0:
            self.rest = 0

    def _weight(self, samples: int) -> float:
        """The newest of `samples` steps' weight: a running mean (the prior counting as one step) until the
        averages' own weight takes over."""
        return max(self.weight, 1 / (samples + 1))

    def _in_plain_steps(self, seconds: float) -> float:
        return seconds / max(self.plain_seconds, 1e-9)

    def _loss(self, cost: float, tokens: float) -> float:
        """Plain-step times a speculative step of this cost and these tokens loses against resting steps
        deciding the same tokens (negative: it gains)."""
        return cost - tokens * self.rest_cost / self.rest_tokens

    def _rest_after(self, loss: float) -> int:
        """Resting steps to take after a probe that loses `loss` plain-step times (none if it does not lose),
        so that probing costs at most `probe_share` of the time (FORGONE_PROBE_SHARE once steps it did not run
        feed the token average). Capped at 2^probes, so a few noisy early steps cannot bench good heads for
        long."""
        if loss <= 0:
            return 0
        share, most = (self.probe_share, self.max_rest)
        if self.forgone:
            share, most = FORGONE_PROBE_SHARE, FORGONE_MAX_REST
        return min(most, 1 << min(self.probes, 16), math.ceil(loss / (share * self.rest_cost)))
