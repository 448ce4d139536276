"""Serve a model with its Hydra heads over OpenAI's HTTP API, with a browser chat at /.

Usage:
    python -m hydra.serve                                   # the shipped heads on the default model
    python -m hydra.serve --model HEADS_DIR_OR_HUB_ID [--base-model MODEL] [--port 8000] [--max-queue 16]
    python -m hydra.serve --open                            # and open the web chat in a browser
Then open http://127.0.0.1:8000/ for the chat, or point any OpenAI client at http://127.0.0.1:8000/v1.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import webbrowser
from pathlib import Path

from hydra.choices import add_model_options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hydra.serve",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        type=os.path.expanduser,
        default=None,
        help="heads folder or Hub repo id (default: the shipped heads, hydra/heads/default)",
    )
    p.add_argument("--base-model", type=os.path.expanduser, default=None,
                   help="base model id or folder, overriding the heads' config")
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model id clients send (default: the heads folder's name, 'hydra' for the shipped heads)",
    )
    p.add_argument("--tree", type=os.path.expanduser, default=None,
                   help="candidate tree: a name, a JSON file or dynamic[:N[:DEPTH[:K]]][:fixed] "
                        "(default: the heads' own)")
    p.add_argument("--lookup", type=int, default=None,
                   help="prompt-lookup tokens drafted per step besides the heads' tree (0: off; default: the "
                        "engine's)")
    add_model_options(p, compile_help="compile the base decoder (ahead of time on a CPU; before serving: "
                                      "minutes on a CPU)")
    p.add_argument("--no-pace", action="store_true",
                   help="run the heads on every step, even while they decide fewer tokens per second than "
                        "plain steps (default: they rest then; seeded requests are never paced)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--max-queue",
        type=int,
        default=16,
        help="requests that may wait behind the running one; more get 503 with Retry-After",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=512,
        help="reply length when a chat request sets no max_tokens (completions default to 16, as OpenAI's)",
    )
    p.add_argument(
        "--prompt-cache-entries",
        type=int,
        default=1,
        help="conversations whose KV cache is kept between requests, so that each request prefills only what "
        "follows the prefix it shares with one of them (each keeps its own KV buffers)",
    )
    p.add_argument("--open", action="store_true", help="open the web chat in a browser once serving")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_queue < 0 or args.max_tokens < 1 or args.prompt_cache_entries < 1:
        print("[hydra] error: --max-queue must be >= 0, --max-tokens >= 1 and --prompt-cache-entries >= 1",
              file=sys.stderr)
        return 2
    try:
        import uvicorn

        from hydra.inference.loading import load_model
        from hydra.model.generate import DecodeConfig, hydra_generate
        from hydra.serve.app import create_app
        from hydra.serve.engine import Engine
    except ImportError as e:
        print(
            f"[hydra] error: the server needs its extra: pip install 'hydra-heads[serve]' ({e})",
            file=sys.stderr,
        )
        return 1
    try:
        model, has_heads = load_model(args.model, args.base_model, args.dtype, args.device, quant=args.quant,
                                      compile=args.compile, heads_quant=args.heads_quant)
        decoding = DecodeConfig(tree=args.tree, **({} if args.lookup is None else {"lookup": args.lookup}))
        if has_heads:  # a bad tree or lookup fails here, not at every request
            hydra_generate(model, [0], decoding)
        if args.compile:
            from hydra.model.compiled import warm_up

            print("[hydra] compiling the decoder ...", flush=True)
            print(f"[hydra] compiled in {warm_up(model, decoding, has_heads):.0f} s", flush=True)
    except (OSError, ValueError) as e:
        print(f"[hydra] error: {e}", file=sys.stderr)
        return 1
    if model.tokenizer is None:
        print("[hydra] error: the base model has no tokenizer", file=sys.stderr)
        return 1
    if not has_heads:
        print("[hydra] note: no heads found; every reply uses plain autoregressive decoding", file=sys.stderr)
    name = args.served_model_name or (Path(args.model).name if args.model else "hydra")
    app = create_app(Engine(model, has_heads, args.max_queue), name, args.max_tokens, args.tree,
                     pace=not args.no_pace, lookup=args.lookup,
                     prompt_cache_entries=args.prompt_cache_entries)
    url = f"http://{args.host}:{args.port}"
    print(f"[hydra] serving {name!r} at {url}/v1 (web chat: {url}/)", flush=True)
    if args.open:  # the model is loaded; uvicorn binds the port well within this delay
        threading.Timer(1.0, webbrowser.open, [url + "/"]).start()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
