"""Hydra vs plain decoding through a running `python -m hydra.serve`, interleaved on the same prompts.

    python -m hydra.serve &                                   # the shipped heads on the default model
    python scripts/bench_serve.py --url http://127.0.0.1:8000 --max-tokens 64 --rounds 2

Prints tokens, decoding seconds (the usage block's decode_seconds: prefill + decoding, queueing excluded),
tokens/s and mean tau per mode. Greedy, so both modes produce the same replies.
"""

from __future__ import annotations

import argparse

import httpx

PROMPTS = ["What are three tips for staying healthy?", "Write a short poem about the sea.",
           "Explain what a CPU does.", "Give me a recipe for pancakes."]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="passes over the prompts; the mode order alternates")
    args = p.parse_args()
    model = httpx.get(args.url + "/v1/models", timeout=30).json()["data"][0]["id"]
    rows: dict[str, list] = {"hydra": [], "plain": []}
    for r in range(args.rounds):
        for prompt in PROMPTS:
            for mode in ("hydra", "plain") if r % 2 == 0 else ("plain", "hydra"):
                body = {"model": model, "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": args.max_tokens, "temperature": 0, "speculative": mode == "hydra"}
                usage = httpx.post(args.url + "/v1/chat/completions", json=body, timeout=600).json()["usage"]
                rows[mode].append(usage)
    for mode, usages in rows.items():
        tokens = sum(u["completion_tokens"] for u in usages)
        seconds = sum(u["decode_seconds"] for u in usages)
        tau = sum(u["accepted_tokens_per_step"] for u in usages) / len(usages)
        rate = tokens / seconds
        print(f"{mode}: {tokens} tokens in {seconds:.2f} s = {rate:.2f} tokens/s, mean tau {tau:.2f}")


if __name__ == "__main__":
    main()
