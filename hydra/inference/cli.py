r"""Chat with a model through its Hydra draft heads, streaming each reply as it is accepted.

Usage:
    python -m hydra.inference.cli                                  # the shipped heads on the default model
    python -m hydra.inference.cli --model HEADS_DIR_OR_HUB_ID [--base-model MODEL] [--stats]
    python -m hydra.inference.cli --temperature 0.7 --sampling typical --tree mc_sim_7b_63 \
        --max-new-tokens 256

Commands typed at the prompt (FastChat conventions):
    !!exit            leave (so do Ctrl-D and Ctrl-C at the prompt)
    !!reset           start a new conversation (the --system message is kept)
    !!remove          drop the last exchange
    !!regen           regenerate the last reply
    !!save FILE       write the conversation as JSON;  !!load FILE  reads one back
    !!help            list the commands
Ctrl-C during a reply stops it; the unfinished exchange is dropped and the prompt comes back.

`--model` is a heads folder or Hub repo id whose config.json names its base model (`--base-model` overrides
it). Without `--model`, the heads shipped in hydra/heads/default are used; if the package ships none, the
default model answers with plain autoregressive decoding (a note says so). `--ar` forces plain decoding.
The whole conversation is rendered with the model's chat template at every turn; only the tokens after the
part it shares with the previous call are prefilled (hydra.model.prompt_cache).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from hydra.choices import add_model_options

USER, ASSISTANT = "USER", "ASSISTANT"
ROLES = ("system", "user", "assistant")
COMMANDS = ("!!exit", "!!reset", "!!remove", "!!regen", "!!save", "!!load", "!!help")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hydra.inference.cli",
                                description="Chat with Hydra speculative decoding (streams accepted tokens).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=os.path.expanduser, default=None,
                   help="heads folder or Hub repo id (default: the shipped heads, hydra/heads/default)")
    p.add_argument("--base-model", type=os.path.expanduser, default=None,
                   help="base model id or folder, overriding the one named in the heads' config")
    p.add_argument("--ar", action="store_true", help="plain autoregressive decoding (no draft heads)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--sampling", choices=("typical", "exact"), default=None,
                   help="acceptance rule when temperature > 0: 'exact' speculative sampling (lossless) or "
                        "Medusa/Hydra 'typical' acceptance (lossy, faster); default: the engine's")
    p.add_argument("--posterior-threshold", type=float, default=None, help="typical acceptance epsilon")
    p.add_argument("--posterior-alpha", type=float, default=None, help="typical acceptance delta")
    p.add_argument("--tree", type=os.path.expanduser, default=None,
                   help="candidate tree: a name in hydra.model.trees, a JSON file, or "
                        "dynamic[:N[:DEPTH[:K]]][:fixed] (grown per step from the heads' confidence) "
                        "(default: the heads' own)")
    p.add_argument("--lookup", type=int, default=None,
                   help="draft up to this many tokens per step by prompt lookup too, copied from where the "
                        "conversation's last tokens occurred before (0: off; default: the engine's)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="cap per reply")
    add_model_options(p, compile_help="compile the base decoder (ahead of time on a CPU): faster replies "
                                      "after a start-up compilation of a minute or two on a CPU the first "
                                      "time, seconds later; see README, Compiled decoder")
    p.add_argument("--no-pace", action="store_true",
                   help="run the heads on every step, even while they decide fewer tokens per second than "
                        "plain steps (default: they rest then, unless --seed is given, so seeded replies "
                        "repeat)")
    p.add_argument("--system", default=None, help="system message for the conversation")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--stats", action="store_true",
                   help="after each reply print tokens, tokens/s and the mean accepted length tau")
    return p


class Chat:
    """The conversation state and one reply at a time; the terminal loop is `run`."""

    def __init__(self, model, speculative: bool, config, system: str | None, out: TextIO, stats: bool):
        self.model, self.tokenizer = model, model.tokenizer
        self.speculative, self.config, self.system = speculative, config, system
        self.out, self.stats = out, stats
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _turns(self) -> int:
        return sum(m["role"] == "user" for m in self.messages)

    def remove_last(self) -> bool:
        """Drop the last user message and everything after it."""
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i]["role"] == "user":
                del self.messages[i:]
                return True
        return False

    def reply(self) -> bool:
        """Generate the assistant's answer to the conversation so far, streaming it. Returns False (and drops
        the last user message) when the reply could not be produced or was interrupted."""
        from hydra.inference.loading import context_length, render_prompt, synchronize
        from hydra.model.generate import ar_generate, hydra_generate, mean_accept_length, stream_text

        ids = render_prompt(self.tokenizer, self.messages)
        context = context_length(self.model)
        if len(ids) + 1 > context:
            self.remove_last()
            self._say(f"[the conversation is {len(ids)} tokens but the model's context holds {context}; "
                      "type !!reset to start over, or !!remove to drop the last exchange]")
            return False
        device = next(self.model.parameters()).device
        generate = hydra_generate if self.speculative else ar_generate
        self.out.write(f"{ASSISTANT}: ")
        self.out.flush()
        tokens: list[int] = []
        accept_lengths: list[int] = []
        reason = None
        synchronize(device)
        start = time.perf_counter()
        try:
            for delta, step in stream_text(self.tokenizer, generate(self.model, ids, self.config)):
                tokens += step.tokens
                accept_lengths.append(step.accept_length)
                reason = step.finish_reason
                if delta:
                    self.out.write(delta)
                    self.out.flush()
        except KeyboardInterrupt:
            if self.config.prompt_cache is not None:  # it may have stopped inside a step (prompt_cache docs)
                self.config.prompt_cache.clear()
            self.remove_last()
            self._say("\n[reply interrupted; the unfinished exchange was dropped]")
            return False
        except ValueError as e:  # e.g. the prompt does not fit the context
            self.remove_last()
            self._say(f"\n[error: {e}; type !!reset to start over]")
            return False
        synchronize(device)
        elapsed = time.perf_counter() - start
        self.out.write("\n")
        self.messages.append({"role": "assistant",
                              "content": self.tokenizer.decode(tokens, skip_special_tokens=True).strip()})
        if reason == "length":
            self._say(f"[the context ({context} tokens) is full: the reply was cut; "
                      "type !!reset to start over]")
        elif reason == "max_new_tokens":
            self._say(f"[reply stopped at --max-new-tokens {self.config.max_new_tokens}]")
        if self.stats:
            n = len(tokens)
            tau = mean_accept_length(accept_lengths) if len(accept_lengths) > 1 else 1.0
            cache = self.config.prompt_cache
            reused = (f", {cache.reused_tokens} of {len(ids)} prompt tokens reused" if cache is not None
                      else "")
            self._say(f"[stats] {n} tokens in {elapsed:.2f} s, "
                      f"{n / elapsed if elapsed > 0 else 0.0:.1f} tokens/s, "
                      f"tau {tau:.2f} tokens/step ({len(accept_lengths)} steps){reused}")
        return True

    def _say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def command(self, line: str) -> bool:
        """Handle a `!!` command. Returns False when the session should end."""
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd == "!!exit":
            return False
        if cmd == "!!reset":
            self.reset()
            self._say("[new conversation]")
        elif cmd == "!!remove":
            self._say("[removed the last exchange]" if self.remove_last() else "[nothing to remove]")
        elif cmd == "!!regen":
            if self.messages and self.messages[-1]["role"] == "assistant":
                self.messages.pop()
                self._say(f"[regenerating the reply to: {self.messages[-1]['content'][:60]!r}]")
                self.reply()
            else:
                self._say("[nothing to regenerate]")
        elif cmd == "!!save":
            if not arg:
                self._say("[usage: !!save FILE]")
            else:
                text = json.dumps({"messages": self.messages}, indent=2, ensure_ascii=False) + "\n"
                try:
                    Path(arg).expanduser().write_text(text, encoding="utf-8")
                except OSError as e:
                    self._say(f"[could not save to {arg!r}: {e.strerror or e}; the conversation is kept]")
                else:
                    self._say(f"[saved {self._turns()} turns to {arg}]")
        elif cmd == "!!load":
            try:
                data = json.loads(Path(arg).expanduser().read_text(encoding="utf-8"))
                messages = data["messages"] if isinstance(data, dict) else data
                if not isinstance(messages, list) or not all(
                        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                        for m in messages):
                    raise ValueError("not a list of {role, content} messages with string content")
            except (OSError, ValueError, KeyError, TypeError) as e:
                self._say(f"[could not load {arg!r}: {e}; the conversation is kept]")
            else:
                self.messages = messages
                self._say(f"[loaded {self._turns()} turns from {arg}]")
        else:
            self._say("[commands: " + ", ".join(COMMANDS) + "; Ctrl-D exits, Ctrl-C stops a reply]")
        return True


def run(chat: Chat, read=input) -> None:
    """The prompt loop. `read` is `input` (readline editing when stdin is a terminal)."""
    while True:
        try:
            line = read(f"{USER}: ")
        except (EOFError, KeyboardInterrupt):
            chat.out.write("\n")
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("!!"):
            if not chat.command(line):
                break
            continue
        chat.messages.append({"role": "user", "content": line})
        chat.reply()
    chat.out.write("exit...\n")
    chat.out.flush()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise SystemExit("--max-new-tokens must be >= 1")
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    from transformers.utils import logging as hf_logging

    from hydra.inference.loading import DEFAULT_HEADS_DIR, check_decoding, load_model
    from hydra.model.generate import DecodeConfig, lookup_tokens
    from hydra.model.pacing import Pacer
    from hydra.model.prompt_cache import PromptCache
    from hydra.model.trees import tree_spec

    hf_logging.disable_progress_bar()
    print("[hydra] loading ...", flush=True)
    try:
        model, has_heads = load_model(args.model, args.base_model, args.dtype, args.device, quant=args.quant,
                                      compile=args.compile, heads_quant=args.heads_quant)
    except (OSError, ValueError) as e:
        print(f"[hydra] error: {e}", file=sys.stderr)
        return 1
    speculative = has_heads and not args.ar
    if not has_heads and not args.ar:
        print(f"[hydra] note: no trained heads in "
              f"hydra/{DEFAULT_HEADS_DIR.parent.name}/{DEFAULT_HEADS_DIR.name} "
              "and no --model given: plain autoregressive decoding", flush=True)
    optional = {"sampling": args.sampling, "posterior_threshold": args.posterior_threshold,
                "posterior_alpha": args.posterior_alpha, "lookup": args.lookup}
    kwargs = {k: v for k, v in optional.items() if v is not None}
    # One Pacer for the session: each reply starts from what the earlier ones measured.
    pace = Pacer() if not args.no_pace and args.seed is None else False
    # One prompt cache for the session: each turn prefills only what the previous call did not compute.
    config = DecodeConfig(tree=args.tree, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                          seed=args.seed, pace=pace, prompt_cache=PromptCache(), **kwargs)
    try:  # fail now, not at the first message, on a bad --tree, --temperature or --sampling
        check_decoding(model, config, speculative)
    except ValueError as e:
        print(f"[hydra] error: {e}", file=sys.stderr)
        return 1
    if args.compile:
        from hydra.model.compiled import warm_up

        print("[hydra] compiling the decoder (a minute or two the first time; later starts load it) ...",
              flush=True)
        print(f"[hydra] compiled in {warm_up(model, config, speculative):.0f} s", flush=True)
    cfg = model.config
    device = next(model.parameters()).device
    heads_kind = f"{model.heads.quant} " if model.heads.quant else ""
    lookup = lookup_tokens(model, config)
    what = (f"{cfg.hydra_num_heads} {heads_kind}{cfg.hydra_head_arch} heads, tree {tree_spec(args.tree, cfg)}"
            + (f", prompt lookup {lookup} tokens" if lookup else "")
            if speculative else "plain autoregressive decoding")
    print(f"[hydra] {args.base_model or cfg.base_model_name_or_path} on {device} "
          f"({args.dtype}{', ' + args.quant if args.quant else ''}), {what}. "
          "Commands: !!exit !!reset !!remove !!regen !!save !!load; Ctrl-D exits.", flush=True)
    chat = Chat(model, speculative, config, args.system, sys.stdout, args.stats)
    run(chat)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C while loading
        print("\nexit...")
        sys.exit(130)
