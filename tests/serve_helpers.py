"""What the server tests share: a tiny random model with the default model's tokenizer and random Hydra++
heads saved to a folder (so `python -m hydra.serve --model FOLDER` loads in seconds), and a server
subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hydra.model import HydraConfig, HydraModel, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 1024


def save_tiny_served_model(folder: Path) -> Path:
    """Write folder/base (a 2-layer random Llama with the default tokenizer) and folder/heads (random
    prefix-mlp heads naming that base); returns the heads folder."""
    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=CONTEXT,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            attn_implementation="sdpa",
        )
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in base.named_parameters():  # O(1) logits: well-separated greedy choices
            p.copy_(
                1 + 0.1 * torch.randn(p.shape, generator=gen)
                if "norm" in name
                else 0.3 * torch.randn(p.shape, generator=gen)
            )
    base.save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    heads = HydraModel(
        base,
        HydraConfig(
            hydra_num_heads=4,
            hydra_num_layers=1,
            hydra_head_arch="prefix-mlp",
            base_model_name_or_path=str(folder / "base"),
            tree="tree_8",
        ),
    )
    with torch.no_grad():
        for p in heads.heads.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
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
