"""Choose the pacer's constants on real step times: record traces of speculative decoding, then replay them
through pacers with different averaging weights and probing limits.

    python scripts/pacing_replay.py --record runs/pace/bf16.json                   # bf16 base, <= 16 prompts
    python scripts/pacing_replay.py --record runs/pace/int4.json --quant int4 --compile # 4-bit compiled base
    python scripts/pacing_replay.py --replay runs/pace/bf16.json runs/pace/int4.json --weights 0.15 0.08 0.05
    python scripts/pacing_replay.py --replay runs/pace/int4.json --limits 0.02:32 0.01:64  # probe share:rest

Recording decodes prompts of data/train_prompts.jsonl.gz whose replies are in no self-distilled file (so no
shipped head was trained on them; MT-Bench and the evaluation sets stay unseen; nearly all training prompts
are distilled now, so 5 are left, and it says how many it found) with the shipped heads and tree,
speculating on three steps of every four, with the prompt lookup off (a resting step is then a plain step, as
the replay assumes); every step's time and decided tokens go into the trace.

Replaying walks each reply token by token: a paced plain step costs the nearest recorded plain step's time
and decides one token; a speculative step starting at a position a recorded step covered decides the rest of
that step's tokens (at least one) in that step's time. Acceptance is then thinned (each speculative step keeps
only its bonus token with probability q) to cover heads from winning to losing, and replies are mixed (every
other reply thinned hard) to test following a change of text. Each figure is the time of an oracle that
chooses "always speculate" or "never speculate" per reply, over the paced time (one pacer kept across the
replies): 1.0 is a pacer that knew in advance. One column per weight and per probing limit (--limits: the
share of the time probes may cost and the most steps to rest between them). Replaying needs no model and
runs in seconds.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import statistics
from pathlib import Path

from hydra.data.jsonl import read_jsonl
from hydra.model.pacing import MAX_REST, PROBE_SHARE, WEIGHT, Pacer

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"


class RecordingPacer(Pacer):
    """Speculates on three steps of four (the plain ones time a plain step at every context length) and
    keeps (seconds, tokens, speculated) of every step."""

    def __init__(self):
        super().__init__()
        self.steps: list[tuple[float, int, bool]] = []

    def start_reply(self) -> None:
        self.steps = []

    def speculate(self) -> bool:
        return len(self.steps) % 4 != 0

    def record(self, seconds: float, tokens: int, speculated: bool, verified: int = 1) -> None:
        self.steps.append((seconds, tokens, speculated))


def unseen_prompts(n: int) -> list[str]:
    """First turns (under 1,500 characters) of training prompts that no self-distilled chat answers."""
    seen = {r["id"] for path in DATA.glob("self_distill_*.jsonl.gz") for r in read_jsonl(path)}
    rows = read_jsonl(DATA / "train_prompts.jsonl.gz")
    turns = [r["turns"][0] for r in rows if r["id"] not in seen and len(r["turns"][0]) < 1500]
    return turns[-n:]


def record(args: argparse.Namespace) -> None:
    import torch

    from hydra.inference.loading import load_model
    from hydra.model.compiled import warm_up
    from hydra.model.generate import DecodeConfig, generate

    torch.set_num_threads(args.threads)
    model, _ = load_model(None, None, "bfloat16", "cpu", quant=args.quant, compile=args.compile)
    warm_up(model, DecodeConfig(tree=args.tree, max_new_tokens=args.max_new_tokens), speculative=True)
    traces = []
    turns = unseen_prompts(args.num_prompts)
    print(f"[hydra] {len(turns)} unseen prompts (asked for {args.num_prompts})", flush=True)
    for turn in turns:
        ids = model.tokenizer.apply_chat_template([{"role": "user", "content": turn}],
                                                  add_generation_prompt=True, tokenize=True,
                                                  return_dict=False)
        pacer = RecordingPacer()
        # The lookup off: replaying models a resting step as a plain step.
        generate(model, ids, DecodeConfig(tree=args.tree, max_new_tokens=args.max_new_tokens, pace=pacer,
                                          lookup=0))
        traces.append(pacer.steps)
        print(f"[hydra] {len(traces)}/{len(turns)}: {len(pacer.steps)} steps", flush=True)
    Path(args.record).parent.mkdir(parents=True, exist_ok=True)
    Path(args.record).write_text(json.dumps(traces))


class Reply:
    """One recorded reply, indexed by token position."""

    def __init__(self, steps: list[tuple[float, int, bool]]):
        self.spec, self.plain, position = [], [], 0  # spec: (start, tokens, seconds); plain: (start, seconds)
        for seconds, tokens, speculated in steps:
            if speculated:
                self.spec.append((position, tokens, seconds))
            else:
                self.plain.append((position, seconds))
            position += tokens
        self.length = position
        self._spec_starts = [s for s, _, _ in self.spec]
        self._plain_starts = [s for s, _ in self.plain]

    def speculative_step(self, position: int) -> tuple[int, float]:
        i = bisect.bisect_right(self._spec_starts, position) - 1
        if i >= 0 and self.spec[i][0] + self.spec[i][1] > position:
            start, tokens, seconds = self.spec[i]
            return max(1, start + tokens - position), seconds
        start, tokens, seconds = self.spec[min(i + 1, len(self.spec) - 1)]
        return tokens, seconds

    def plain_step(self, position: int) -> float:
        return self.plain[max(0, bisect.bisect_right(self._plain_starts, position) - 1)][1]

    def seconds(self, pacer: Pacer | None, speculate: bool = True) -> float:
        """Time to decode the reply: paced by `pacer`, else always (or never) speculating."""
        if pacer is not None:
            pacer.start_reply()
        position, total = 0, 0.0
        while position < self.length:
            spec = pacer.speculate() if pacer is not None else speculate
            tokens, seconds = self.speculative_step(position) if spec else (1, self.plain_step(position))
            if pacer is not None:
                pacer.record(seconds, tokens, spec)
            position, total = position + tokens, total + seconds
        return total


def thinned(steps: list, q: float, rng: random.Random) -> list:
    return [(s, 1 if (spec and rng.random() < q) else t, spec) for s, t, spec in steps]


def oracle_seconds(replies: list[Reply]) -> float:
    """Time when each reply either always or never speculates, whichever is faster for it."""
    return sum(min(r.seconds(None, True), r.seconds(None, False)) for r in replies)


def score(replies: list[Reply], weight: float, oracle: float | None = None,
          limits: tuple[float, int] = (PROBE_SHARE, MAX_REST)) -> float:
    """`oracle_seconds` / paced time, one pacer kept across the replies; `limits`: (probe share, most resting
    steps)."""
    pacer = Pacer(weight, probe_share=limits[0], max_rest=limits[1])
    return (oracle or oracle_seconds(replies)) / sum(r.seconds(pacer) for r in replies)


def parse_limits(text: str) -> tuple[float, int]:
    """--limits' SHARE:STEPS."""
    share, _, steps = text.partition(":")
    try:
        return float(share), int(steps)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SHARE:STEPS, e.g. 0.01:64, got {text!r}") from None


def replay(args: argparse.Namespace) -> None:
    columns = [(w, lim) for w in args.weights for lim in args.limits]
    header = " ".join(f"{f'w {w} {lim[0]}:{lim[1]}':>14s}" for w, lim in columns)
    for path in args.replay:
        traces = json.loads(Path(path).read_text())
        print(f"{path}: {len(traces)} replies")
        print(f"  {'acceptance':26s} {'spec/plain':>10s} {header}")
        cases = [(f"thinned q={q:.1f}", [q]) for q in (0, .2, .4, .6, .8)]
        cases += [("mixed q=0 / 0.8 per reply", [0, .8]), ("mixed q=0.4 / 0.8", [.4, .8]),
                  ("4 replies q=0, 4 q=0.8", [0] * 4 + [.8] * 4)]
        for label, qs in cases:
            scores, ratios = {c: [] for c in columns}, []
            for seed in range(args.seeds):
                rng = random.Random(seed)
                replies = [Reply(thinned(t, qs[i % len(qs)], rng)) for i, t in enumerate(traces)]
                ratios.append(sum(r.seconds(None, False) for r in replies)
                              / sum(r.seconds(None) for r in replies))
                oracle = oracle_seconds(replies)
                for w, lim in columns:
                    scores[w, lim].append(score(replies, w, oracle, lim))
            cells = " ".join(f"{statistics.mean(scores[c]):14.3f}" for c in columns)
            print(f"  {label:26s} {statistics.mean(ratios):9.3f}x {cells}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--record", type=os.path.expanduser,
                    help="write a trace file (JSON) of --num-prompts replies")
    ap.add_argument("--replay", nargs="*", type=os.path.expanduser, default=[], help="trace files to replay")
    ap.add_argument("--weights", nargs="*", type=float, default=[0.15, WEIGHT, 0.05],
                    help="newest-step weights of the pacers compared (hydra.model.pacing.WEIGHT is the "
                         "default)")
    ap.add_argument("--limits", nargs="*", type=parse_limits, default=[(PROBE_SHARE, MAX_REST)],
                    help="probing limits compared, SHARE:STEPS each (the pacer's default: "
                         f"{PROBE_SHARE}:{MAX_REST})")
    ap.add_argument("--seeds", type=int, default=4, help="thinning seeds averaged per case")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--tree", type=os.path.expanduser, default="smollm2_hydrapp")
    ap.add_argument("--quant", choices=("int4", "int8"), default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not args.record and not args.replay:
        ap.error("give --record FILE or --replay FILE...")
    if args.record:
        record(args)
    if args.replay:
        replay(args)


if __name__ == "__main__":
    main()
