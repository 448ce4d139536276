"""The small models and statistics the tests share (one place, as litgpt's tests/ keeps its fixtures).

- `make_tiny_base`: a seeded 2-layer GQA Llama (4 query / 2 KV heads), fp32, eval mode, frozen.
- `randomize_`: overwrite every parameter with seeded noise (fresh heads have zero weights that hide bugs).
- `make_heads`: a HydraModel with seeded random heads on a given base model.
- `save_tiny_model`: a tiny base with SmolLM2's real tokenizer saved as a model folder, plus random heads.
- `chi2_*`, `assert_matches`: a chi-square goodness-of-fit test with a power check (scipy is not a
  dependency: the quantile comes from torch's regularized incomplete gamma function).
- `write_jsonl`: a JSONL file from records (and raw malformed lines).
- `LocalServer`: a real HTTP server on 127.0.0.1 in a thread, for the fake Hub and the fake judge.
"""

from __future__ import annotations

import itertools
import json
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

TINY_VOCAB = 100  # not a multiple of TINY_HIDDEN, so vocab-sized tensors are recognisable
TINY_HIDDEN = 32


def randomize_(module: nn.Module, seed: int = 1, scale: float = 0.3) -> nn.Module:
    """Overwrite every parameter with seeded noise of standard deviation `scale`.

    Norm weights are kept near one so hidden states stay well scaled.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(scale * noise)
    return module


def make_tiny_base(
    vocab_size: int = TINY_VOCAB, hidden_size: int = TINY_HIDDEN, seed: int = 0, scale: float | None = None,
    **overrides,
) -> LlamaForCausalLM:
    """A seeded 2-layer random Llama (fp32, eval mode, frozen); `overrides` are LlamaConfig fields.

    With `scale`, every weight is re-drawn by `randomize_(model, seed, scale)`: 0.3 gives O(1) logits with
    well-separated argmaxes (no fp ties), which greedy-equality tests need; transformers' own initialisation
    (std 0.02) gives near-uniform logits.
    """
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).to(torch.float32).eval()
    if scale is not None:
        randomize_(model, seed, scale)
    model.requires_grad_(False)
    return model


def make_heads(base, arch: str = "hydra-mlp", num_heads: int = 4, num_layers: int = 1, seed: int = 1,
               scale: float = 0.3, tokenizer=None, **cfg):
    """HydraModel(base, HydraConfig(...)) in eval mode with every head weight re-drawn by randomize_."""
    from hydra.model import HydraConfig, HydraModel

    torch.manual_seed(seed)
    config = HydraConfig(hydra_num_heads=num_heads, hydra_num_layers=num_layers, hydra_head_arch=arch, **cfg)
    model = HydraModel(base, config, tokenizer)
    randomize_(model.heads, seed, scale)
    return model.eval()


def save_tiny_model(root: Path, context: int = 256, heads: dict | None = None) -> Path:
    """root/base: a tiny Llama (make_tiny_base) with SmolLM2's real tokenizer, chat template and special
    tokens, and `context` positions. With `heads` (make_heads keywords), also root/heads: random heads whose
    config names root/base, loadable like any heads folder. Returns root."""
    from hydra.model import load_tokenizer

    tok = load_tokenizer(None)
    base = make_tiny_base(vocab_size=len(tok), max_position_embeddings=context, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    if heads is not None:
        model = make_heads(base, tokenizer=tok, base_model_name_or_path=str(root / "base"), **heads)
        model.save_pretrained(root / "heads")
    return root


# --- chi-square ---------------------------------------------------------------------------------------------
def chi2_pvalue(stat: float, df: int) -> float:
    """P(X >= stat) for X ~ chi-square(df)."""
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def chi2_quantile(q: float, df: int) -> float:
    """The q-quantile of chi-square(df), by bisection on the regularized incomplete gamma function."""
    lo, hi = 0.0, 10.0 * df + 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if 1 - chi2_pvalue(mid, df) > q else (mid, hi)
    return (lo + hi) / 2


def chi2_stat(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = counts.sum() * probs
    return float(((counts - expected) ** 2 / expected).sum())


def assert_matches(counts: torch.Tensor, probs: torch.Tensor) -> None:
    """Chi-square goodness of fit at the 0.001 level, plus the power check the test needs: moving 5% of the
    probability mass between any two cells (the alternative a lossy sampler would produce) is rejected on the
    very same sample.

    Power, for the record: with N samples the statistic under such an alternative is roughly noncentral
    chi-square with lambda = N * 0.05^2 * (1/p_i + 1/p_j) >= N * 0.0025 * 2 / max(p) (a shift between the two
    largest cells is the hardest to see). The loop below checks it empirically instead of trusting the
    approximation.
    """
    counts, probs = counts.double(), probs.double()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token with zero probability was emitted"
    counts, probs = counts[keep], probs[keep]
    assert float((counts.sum() * probs).min()) >= 5, "cells too small for a chi-square test"
    df = len(probs) - 1
    crit = chi2_quantile(0.999, df)
    stat = chi2_stat(counts, probs)
    assert stat < crit, f"chi2 {stat:.1f} >= {crit:.1f} (df {df}): distribution differs from the base model's"
    checked = 0
    for i, j in itertools.permutations(range(len(probs)), 2):
        if probs[i] >= 0.05:
            shifted = probs.clone()
            shifted[i] -= 0.05
            shifted[j] += 0.05
            if shifted[i] > 0:
                assert chi2_stat(counts, shifted) > crit, f"too few samples to detect a 5% shift {i}->{j}"
                checked += 1
    assert checked > 0, "no cell holds 5% of the mass: the power check tested nothing"


def assert_first_two_tokens_follow_base(model, prompt: list[int], tree, n: int = 5000,
                                        max_cell: float = 1.0, **config) -> None:
    """Exact sampling end to end: over n seeds, the pair of the first two emitted tokens follows
    p(x1 | prompt) p(x2 | prompt, x1) from the base model's own softmax (cells expected below 5 pooled into
    one). Also checks that the run exercised both a rejection at the root and multi-token acceptance often,
    so the test says something about the tree and not only about plain sampling. `max_cell` bounds the
    largest pooled probability (a small one keeps the power estimate of `assert_matches` meaningful);
    `config`: more `DecodeConfig` fields."""
    from hydra.model.generate import DecodeConfig, generate

    base = model.base_model
    v = base.config.vocab_size
    with torch.no_grad():
        p1 = torch.softmax(base(torch.tensor([prompt])).logits[0, -1].double(), -1)
        p2 = torch.softmax(base(torch.tensor([prompt + [x] for x in range(v)])).logits[:, -1].double(), -1)
    joint = (p1[:, None] * p2).flatten()
    counts = torch.zeros(v * v, dtype=torch.float64)
    verify_lengths = torch.zeros(model.config.hydra_num_heads + 2)
    for seed in range(n):
        out = generate(model, prompt, DecodeConfig(tree=tree, temperature=1.0, sampling="exact", seed=seed,
                                                   max_new_tokens=2, stop_token_ids=[], **config))
        assert len(out.tokens) == 2 and out.steps == 2
        counts[out.tokens[0] * v + out.tokens[1]] += 1
        verify_lengths[out.accept_lengths[1] - 1] += 1
    assert verify_lengths[0] > 200 and verify_lengths[1:].sum() > 1000, verify_lengths
    big = joint * n >= 5
    pooled_counts = torch.cat([counts[big], counts[~big].sum()[None]])
    pooled_probs = torch.cat([joint[big], joint[~big].sum()[None]])
    assert big.sum() >= 15 and pooled_probs.max() < max_cell
    assert_matches(pooled_counts, pooled_probs)


def sampling_fit_statistic(base, prompt: list[int], replies: list[list[int]],
                           temperature: float = 1.0) -> float:
    """How far whole sampled replies are from the base model's own sampling, as a chi-square(V - 1) statistic.

    Each emitted token x_j should be a draw from p_j = p(. | prompt, x_<j) (softmax at `temperature`). Then
    S = sum over all tokens of (one-hot(x_j) - p_j) has mean 0 and covariance sum_j diag(p_j) - p_j p_j^T,
    whatever decided how each step was drafted, as long as that was decided before the step's own draws (S
    is a martingale); S^T C^+ S is then ~chi-square(V - 1) by the martingale central limit theorem."""
    v = base.config.vocab_size
    s = torch.zeros(v, dtype=torch.float64)
    c = torch.zeros(v, v, dtype=torch.float64)
    with torch.no_grad():
        for reply in replies:
            logits = base(torch.tensor([prompt + reply])).logits[0, len(prompt) - 1: -1].double()
            p = torch.softmax(logits / temperature, -1)
            s += (torch.nn.functional.one_hot(torch.tensor(reply), v).double() - p).sum(0)
            c += torch.diag(p.sum(0)) - p.T @ p
    return float(s @ torch.linalg.pinv(c) @ s)


def write_jsonl(path: Path, records, raw_lines: tuple[bytes, ...] = ()) -> Path:
    """One JSON line per record, then `raw_lines` as given (for malformed-line tests); creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for r in records:
            f.write((json.dumps(r) + "\n").encode())
        for line in raw_lines:
            f.write(line + b"\n")
    return path


class LocalServer:
    """`with Server(...) as s:` serves `handler` (a BaseHTTPRequestHandler class) at `s.url` + `path`."""

    def __init__(self, handler, path: str = ""):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{path}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
