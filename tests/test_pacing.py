"""hydra/model/pacing.py: the heads rest while speculative steps decide fewer tokens than plain steps would in
the same time, for long enough that probing costs little, and speculate on every step while they pay. Times
here are made up; tests/test_generate.py runs the pacer inside the decoding loop."""

from __future__ import annotations

import random
import sys
from itertools import pairwise
from pathlib import Path

import pytest

from hydra.model.pacing import MAX_REST, PROBE_SHARE, REMEASURE_EVERY, Pacer


def drive(pacer: Pacer, steps: int, spec_cost: float, spec_tokens, seed: int = 0,
          lookup=None, forgone: bool = False) -> tuple[list[bool], float]:
    """Run `steps` steps, a plain one taking 1 s and a speculative one `spec_cost` s and deciding
    `spec_tokens(rng)` tokens. `lookup(rng)`: a resting step that may look up finds a branch, (cost, tokens),
    or None (a plain step). `forgone`: a resting step that may not look up still drafts, and the pacer judging
    the lookup is told what the branch would have decided (as decoding does). Returns which steps speculated
    and the tokens per second (plain decoding: 1)."""
    rng = random.Random(seed)
    decisions, tokens, seconds = [], 0, 0.0
    for _ in range(steps):
        speculated = pacer.speculate()
        decisions.append(speculated)
        looks = lookup is not None and not speculated and pacer.look_up()
        branch = lookup(rng) if looks or (forgone and lookup is not None and not speculated) else None
        if branch is not None and not looks:
            pacer.lookup.record_forgone(branch[1])
            branch = None
        if speculated:
            n, dt, verified = spec_tokens(rng), spec_cost, 4
        elif branch is not None:
            (dt, n), verified = branch, 9
        else:
            n, dt, verified = 1, 1.0, 1
        pacer.record(dt, n, speculated, verified)
        tokens, seconds = tokens + n, seconds + dt
    return decisions, tokens / seconds


def test_first_step_is_plain_then_the_heads_try():
    pacer = Pacer()
    assert drive(pacer, 3, 1.2, lambda rng: 2)[0] == [False, True, True]
    # the averages start from priors (1 plain-step time, 1.5 tokens) that count as one step
    assert pacer.plain_seconds == 1.0 and 1.0 < pacer.cost < 1.2 and pacer.probes == 2


def test_heads_that_lose_rest_and_cost_little():
    """One token per 1.9 plain-step times (a 4-bit base on translation with these heads): the heads soon rest
    for MAX_REST steps at a time and decoding over 300 steps is within 5% of plain decoding (learning that
    the heads lose costs a few probes; after that each probe costs 0.9 / (MAX_REST + 1) of the time)."""
    pacer = Pacer()
    decisions, speed = drive(pacer, 300, 1.9, lambda rng: 1)
    probes = [i for i, d in enumerate(decisions) if d]
    assert [b - a for a, b in pairwise(probes)][-3:] == [MAX_REST + 1] * 3
    assert sum(decisions) <= 300 / MAX_REST + 6  # the rests grow 2, 4, ... while the averages settle
    assert speed > 0.95
    decisions, _ = drive(Pacer(probe_share=0.02, max_rest=32), 300, 1.9, lambda rng: 1)  # other limits
    probes = [i for i, d in enumerate(decisions) if d]
    assert [b - a for a, b in pairwise(probes)][-4:] == [33] * 4


def test_a_small_loss_rests_briefly():
    """Barely losing heads (0.05 plain-step times per probe) rest only as long as needed to keep probing
    under PROBE_SHARE of the time: probes every few steps, not every MAX_REST."""
    decisions, speed = drive(Pacer(), 200, 1.05, lambda rng: 1)
    probes = [i for i, d in enumerate(decisions) if d][-5:]
    gaps = [b - a for a, b in pairwise(probes)]
    assert all(2 <= g <= 0.05 / PROBE_SHARE + 2 for g in gaps), gaps
    assert speed > 0.98


def test_heads_that_pay_keep_speculating():
    """About 1.6 tokens per 1.22 plain-step times (the shipped heads on MT-Bench, bf16): the heads run on
    nearly every step and decoding is near the 1.31x that speculating on every step gives. The plain steps are
    the first and one per REMEASURE_EVERY speculative steps, plus a few rests after runs of one-token steps
    (15 of 300 steps on seed 0, where a newest-step weight of 0.15 benched the heads for 52)."""
    for seed in range(4):
        decisions, speed = drive(Pacer(), 300, 1.22,
                                 lambda rng: 1 + (rng.random() < 0.45) + (rng.random() < 0.15), seed)
        assert sum(not d for d in decisions) <= 300 // (REMEASURE_EVERY + 1) + 16
        assert speed > 1.25


def test_a_plain_step_is_timed_again_every_so_often():
    decisions, _ = drive(Pacer(), 200, 1.2, lambda rng: 3)
    assert [i for i, d in enumerate(decisions) if not d] == list(range(0, 200, REMEASURE_EVERY + 1))


def test_heads_come_back_when_the_text_gets_easy():
    pacer = Pacer()
    drive(pacer, 100, 1.3, lambda rng: 1)
    assert pacer.rest > 0
    decisions, _ = drive(pacer, 100, 1.3, lambda rng: 3)
    assert sum(decisions[MAX_REST + 1:]) >= 0.9 * (100 - MAX_REST - 1)
    assert pacer.rest == 0


def test_one_slow_step_does_not_bench_good_heads():
    """The first speculative step takes 3 plain-step times (a busy machine); the heads, really worth 2 tokens
    per 1.2, rest for at most 2 steps and then speculate."""
    pacer = Pacer()
    pacer.speculate()
    pacer.record(1.0, 1, speculated=False)
    assert pacer.speculate()
    pacer.record(3.0, 1, speculated=True)
    assert pacer.rest <= 2
    decisions, speed = drive(pacer, 100, 1.2, lambda rng: 2)
    assert sum(decisions) >= 95 - 100 // 32 and speed > 1.5


def test_plain_step_time_follows_the_context():
    """Plain steps get dearer as the context grows; the average follows, so speculation is judged against
    the current plain step, not the first one."""
    pacer = Pacer()
    for k in range(20):
        pacer.speculate()
        pacer.record(1.0 + k, 1, speculated=False)
    assert pacer.plain_seconds > 13  # the last is 20 s: the average lags by a few steps


def test_the_next_reply_starts_from_what_the_last_one_measured():
    """Heads that lose (1 token per 1.9 plain-step times): a fresh pacer probes 2, 4, 8, ... steps apart in
    every 128-step reply; one kept across replies probes a reply after the first only every MAX_REST + 1
    steps (its first step is plain), so the later replies run within 3% of plain decoding."""
    def replies(pacer_for_reply) -> list[tuple[list[bool], float]]:
        out = []
        for k in range(4):
            pacer = pacer_for_reply()
            pacer.start_reply()
            out.append(drive(pacer, 128, 1.9, lambda rng: 1, seed=k))
        return out

    kept = Pacer()
    fresh, carried = replies(Pacer), replies(lambda: kept)
    assert [r[0] for r in fresh[1:]] == [fresh[0][0]] * 3  # a fresh pacer learns it all again
    for decisions, speed in carried[1:]:
        assert decisions[0] is False and not any(decisions[:MAX_REST])
        assert sum(decisions) <= 128 // MAX_REST + 1 and speed > 0.97
    assert min(speed for _, speed in fresh) < 0.97  # what carrying over saves


def test_heads_that_paid_last_reply_speculate_after_its_first_step():
    kept = Pacer()
    drive(kept, 100, 1.2, lambda rng: 2)
    kept.start_reply()
    assert drive(kept, 5, 1.2, lambda rng: 2)[0] == [False, True, True, True, True]


def test_heads_that_beat_plain_steps_but_not_the_lookup_rest():
    """With prompt lookup, resting steps verify the lookup branch: here it matches on 60% of them and then
    decides 3 tokens for 1.3 plain-step times (resting: 2.2 tokens per 1.18, 1.86x plain decoding). Heads
    deciding 1.6 tokens in 1.2 plain-step times (1.33x plain) lose to resting: they mostly rest and decoding
    runs near the resting speed. Heads deciding 3 tokens in 1.2 beat it and keep speculating."""
    def lookup(rng):
        return (1.3, 3) if rng.random() < 0.6 else None

    for seed in range(4):
        pacer = Pacer()
        decisions, speed = drive(pacer, 400, 1.2, lambda rng: 1 + (rng.random() < 0.6), seed, lookup)
        assert sum(decisions[100:]) < 0.15 * 300 and speed > 1.6, (sum(decisions[100:]), speed)
        assert 1.1 < pacer.rest_cost < 1.3 and 1.8 < pacer.rest_tokens < 2.6  # 1.18, 2.2 expected
        decisions, speed = drive(Pacer(), 400, 1.2, lambda rng: 3, seed, lookup)
        assert sum(decisions) > 0.9 * 400 and speed > 2.3


def test_resting_steps_look_up_only_after_a_plain_step_of_the_reply():
    """The first step of every reply is plain (it sets the unit the other steps are timed in), even when the
    lookup would find a branch; a resting step that looks up does not change the plain-step time."""
    pacer = Pacer()
    assert not pacer.speculate() and not pacer.look_up()
    pacer.record(1.0, 1, speculated=False)
    assert pacer.look_up()  # a resting step now may look up
    pacer.record(5.0, 4, speculated=False, verified=9)
    # a running mean with the prior (1, 1) counting as one step: (1 + 1 + 5) / 3 and (1 + 1 + 4) / 3
    assert pacer.plain_seconds == 1.0 and pacer.rest_cost == pytest.approx(7 / 3) and pacer.rest_tokens == 2.0
    pacer.start_reply()
    assert not pacer.look_up()


def test_a_lookup_that_loses_to_plain_steps_rests_too():
    """Resting steps are judged one level down: a lookup branch found on 70% of them that decides 1.1 tokens
    for 1.6 plain-step times loses to plain steps (resting at 0.75x plain decoding if it always looked up),
    so resting steps become plain ones but for probes, and with losing heads decoding runs near plain speed.
    A lookup that pays (the test above) goes on being verified."""
    def lookup(rng):
        return (1.6, 1 + (rng.random() < 0.1)) if rng.random() < 0.7 else None

    for seed in range(4):
        pacer = Pacer()
        _, speed = drive(pacer, 400, 2.0, lambda rng: 1 + (rng.random() < 0.3), seed, lookup)
        assert speed > 0.9, speed
        assert pacer.lookup.cost > pacer.lookup.tokens  # it measured the lookup losing
        unjudged = Pacer(judge_lookup=False)
        assert drive(unjudged, 400, 2.0, lambda rng: 1 + (rng.random() < 0.3), seed, lookup)[1] < 0.85


def test_replay_walks_recorded_steps_by_token_position():
    """scripts/pacing_replay.py: a speculative step replayed from inside a recorded one decides the rest of
    its tokens; always and never speculating cost the recorded step times; thinning keeps plain steps."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from pacing_replay import RecordingPacer, Reply, score, thinned

    # plain 1 s at 0; spec 1.2 s deciding 3 at 1..3; plain 1 s at 4; spec 1.3 s deciding 2 at 5..6
    steps = [(1.0, 1, False), (1.2, 3, True), (1.0, 1, False), (1.3, 2, True)]
    reply = Reply(steps)
    assert reply.length == 7
    assert reply.speculative_step(1) == (3, 1.2) and reply.speculative_step(2) == (2, 1.2)
    assert reply.speculative_step(0) == (3, 1.2)  # before any recorded one: the next one
    assert reply.speculative_step(4) == (2, 1.3) and reply.plain_step(6) == 1.0
    assert reply.seconds(None, speculate=False) == 7.0
    # from 0: 3 tokens (the next recorded step); from 3: the 1 left of it; from 4: 2; from 6: the 1 left
    assert reply.seconds(None, speculate=True) == 1.2 + 1.2 + 1.3 + 1.3
    assert all(t == 1 for _, t, s in thinned(steps, 1.0, random.Random(0)) if s)
    assert thinned(steps, 0.0, random.Random(0)) == steps
    # heads that lose (one token in two plain-step times): always speculating takes 2x the oracle (plain)
    losing = Reply([(1.0, 1, False), (2.0, 1, True)] * 20)
    assert losing.seconds(None, speculate=True) == 2 * losing.seconds(None, speculate=False)
    assert score([losing] * 4, 0.08) > 0.9

    recorder = RecordingPacer()
    for _k in range(8):
        speculated = recorder.speculate()
        recorder.record(0.1, 2 if speculated else 1, speculated)
    assert [s for _, _, s in recorder.steps] == [False, True, True, True] * 2


def losing_lookup(rng):
    """A branch on 70% of resting steps that decides 1.1 tokens for 1.6 plain-step times."""
    return (1.6, 1 + (rng.random() < 0.1)) if rng.random() < 0.7 else None


def test_a_lookup_judged_on_the_branches_it_rested_probes_rarely():
    """The losing lookup above, with every rested branch scored for free (`record_forgone`): its probes then
    only measure the step's cost, so they are rarer (down to one per FORGONE_MAX_REST resting steps) and
    decoding comes closer to plain speed than when probes alone judge it."""
    for seed in range(4):
        probed, judged = Pacer(), Pacer()
        _, probed_speed = drive(probed, 1200, 2.0, lambda rng: 1, seed, losing_lookup)
        _, judged_speed = drive(judged, 1200, 2.0, lambda rng: 1, seed, losing_lookup, forgone=True)
        assert judged.lookup.forgone > 600 and judged.lookup.probes < probed.lookup.probes / 2
        assert judged.lookup.cost > judged.lookup.tokens  # it measured the lookup losing
        assert judged_speed > probed_speed + 0.005, (judged_speed, probed_speed)


def test_a_lookup_judged_on_rested_branches_comes_back_at_once():
    """After 600 steps of the losing lookup (and until its pacer has over 20 steps of rest left) the text
    turns to copying (a branch on 70% of steps, 6 tokens for 1.3 plain-step times): the rested branches'
    outcomes end the rest within a few steps, where probes alone would wait for the rest to run out."""
    def winning(rng):
        return (1.3, 6) if rng.random() < 0.7 else None

    for seed in range(4):
        pacer = Pacer()
        drive(pacer, 600, 2.0, lambda rng: 1, seed, losing_lookup, forgone=True)
        for extra in range(1000):
            if pacer.lookup.rest > 20:
                break
            drive(pacer, 1, 2.0, lambda rng: 1, seed * 1000 + extra, losing_lookup, forgone=True)
        assert pacer.lookup.rest > 20
        before = pacer.lookup.probes
        drive(pacer, 10, 2.0, lambda rng: 1, seed, winning, forgone=True)
        assert pacer.lookup.probes - before >= 3 and pacer.lookup.rest == 0
