"""What the server tests share: a tiny random model with the default model's tokenizer and random Hydra++
heads saved to a folder (so `python -m hydra.serve --model FOLDER` loads in seconds), and a server
subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
from helpers import make_heads, make_tiny_base

from hydra.model import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 1024


def save_tiny_served_model(folder: Path, never_ends: bool = False) -> Path:
    """Write folder/base (a 2-layer random Llama with O(1) logits and the default tokenizer) and folder/heads
    (random prefix-mlp heads naming that base); returns the heads folder. As helpers.save_tiny_model, with
    well-separated greedy choices (scale 0.3) so speculative and plain greedy replies agree exactly.
    `never_ends`: the EOS token's output row is zero, so its logit (0) is never the greedy choice among
    ~49,000 O(1) logits: a greedy reply runs to its max_tokens whatever text it takes."""
    tokenizer = load_tokenizer(None)
    base = make_tiny_base(vocab_size=len(tokenizer), scale=0.3, max_position_embeddings=CONTEXT,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if never_ends:
        base.lm_head.weight[tokenizer.eos_token_id] = 0.0
    base.save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    heads = make_heads(base, "prefix-mlp", num_heads=4, base_model_name_or_path=str(folder / "base"),
                       tree="tree_8")
    heads.save_pretrained(folder / "heads")
    return folder / "heads"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m hydra.serve ARGS` on 127.0.0.1, started and waited for; `stop()` ends it."""

    def __init__(self, *args: str, log: Path, timeout: float = 180.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hydra.serve", "--port", str(self.port), *args],
            cwd=REPO,
            env=env,
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not start in {timeout} s:\n{log.read_text()}")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def serving_in_thread(app):
    """An ASGI app on 127.0.0.1 under uvicorn in this process (so a test can reach into its engine); yields
    its URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
