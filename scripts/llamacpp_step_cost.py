"""Could llama.cpp itself verify Hydra's draft trees faster than it decodes plainly? What a verification step
costs in llama.cpp (T tokens in one batch against one token), and whether a tree batch works there: each node
gets the set of sequence ids of the leaves below it, so it sees the prefix and its own ancestors only.

    python scripts/llamacpp_step_cost.py --gguf <the GGUF file>            # needs pip install '.[llamacpp]'
    python scripts/llamacpp_step_cost.py --gguf <the GGUF file> --threads 2 --reps 30
    python scripts/llamacpp_step_cost.py --gguf <another GGUF> --base-model <that model's HF id or folder>

It decodes a prompt greedily one token at a time (llama.cpp's plain decoding), then verifies a 4-node tree
over the same context (root, the right child and a wrong sibling, the right grandchild) and prints whether
the tree's argmax tokens and final-norm hidden states (what the heads read) equal plain decoding's. Then
it times batches of T = 1, 2, 3, 4, 8 consecutive tokens after a --context-token cache (the prompt's tokens
repeated: timing does not depend on what they say), interleaved, medians of --reps.
A speculative step of T tokens pays only if it decides more tokens on average than its cost in one-token
steps.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from hydra.model.base_model import load_tokenizer

PROMPT = "Write a short poem about the sea."
SIZES = (1, 2, 3, 4, 8)


class LlamaCpp:
    """A llama.cpp context through llama-cpp-python's C API: batches with per-token sequence-id sets, logits
    and final-norm hidden states (`embeddings` with no pooling) for every token."""

    def __init__(self, gguf: Path, threads: int, max_seqs: int = 4):
        import llama_cpp as lib

        self.lib = lib
        self._quiet = lib.llama_log_callback(lambda level, text, data: None)  # kept: C holds the pointer
        lib.llama_log_set(self._quiet, None)
        lib.llama_backend_init()
        self.model = lib.llama_model_load_from_file(str(gguf).encode(), lib.llama_model_default_params())
        params = lib.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 2048, 512, 512, max_seqs
        params.n_threads = params.n_threads_batch = threads
        # one KV store shared by all sequences, so a cell can belong to several (the tree's shared nodes)
        params.embeddings, params.pooling_type, params.kv_unified = True, 0, True
        self.ctx = lib.llama_init_from_model(self.model, params)
        self.mem = lib.llama_get_memory(self.ctx)
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.n_embd = lib.llama_model_n_embd(self.model)
        self.batch = lib.llama_batch_init(512, 0, max_seqs)

    def decode(self, tokens: list[int], positions: list[int], seqs: list[list[int]]) -> None:
        """One forward over `tokens`; every token outputs logits and its hidden state."""
        b = self.batch
        b.n_tokens = len(tokens)
        for i, (token, pos, ids) in enumerate(zip(tokens, positions, seqs, strict=True)):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, len(ids), 1
            for j, s in enumerate(ids):
                b.seq_id[i][j] = s
        if self.lib.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax(self, i: int) -> int:
        logits = self.lib.llama_get_logits_ith(self.ctx, i)
        return int(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())

    def hidden(self, i: int) -> np.ndarray:
        state = self.lib.llama_get_embeddings_ith(self.ctx, i)
        return np.ctypeslib.as_array(state, shape=(self.n_embd,)).copy()

    def reset(self, prompt: list[int]) -> None:
        self.lib.llama_memory_clear(self.mem, True)
        self.decode(prompt, list(range(len(prompt))), [[0]] * len(prompt))

    def copy_seq(self, src: int, dst: int) -> None:
        self.lib.llama_memory_seq_cp(self.mem, src, dst, -1, -1)

    def drop(self, seq: int, start: int = -1) -> None:
        self.lib.llama_memory_seq_rm(self.mem, seq, start, -1)


def check_tree(llm: LlamaCpp, prompt: list[int]) -> list[int]:
    """Plain greedy decoding, then the same first tokens verified as a tree; prints the comparison and returns
    the plain tokens."""
    n = len(prompt)
    llm.reset(prompt)
    plain, hidden = [llm.argmax(n - 1)], []
    for step in range(12):
        llm.decode([plain[-1]], [n + step], [[0]])
        plain.append(llm.argmax(0))
        hidden.append(llm.hidden(0))
    llm.reset(prompt)
    for seq in (1, 2):  # leaf sequences: 1 = root, right child, grandchild; 2 = root, wrong child
        llm.copy_seq(0, seq)
    wrong = (plain[1] + 7) % llm.n_vocab
    llm.decode([plain[0], plain[1], wrong, plain[2]], [n, n + 1, n + 1, n + 2], [[1, 2], [1], [2], [1]])
    tree_next = [llm.argmax(i) for i in (0, 1, 3)]
    diff = max(float(np.abs(llm.hidden(i) - hidden[k]).max()) for i, k in ((0, 0), (1, 1), (3, 2)))
    print(f"tree verification: argmax on the right path {tree_next}, plain decoding {plain[1:4]} "
          f"({'equal' if tree_next == plain[1:4] else 'DIFFERENT'}); hidden states max |diff| {diff:.3g}; "
          f"the wrong sibling's argmax {llm.argmax(2)}")
    return plain


def time_batches(llm: LlamaCpp, prompt: list[int], tokens: list[int], reps: int) -> dict[int, float]:
    """Median ms of one forward over T consecutive tokens after the prompt; each batch is dropped again."""
    llm.reset(prompt)
    n, times = len(prompt), {t: [] for t in SIZES}
    for _ in range(reps):
        for t in SIZES:
            start = time.perf_counter()
            llm.decode(tokens[:t], list(range(n, n + t)), [[0]] * t)
            times[t].append(time.perf_counter() - start)
            llm.drop(0, n)
    return {t: 1000 * float(np.median(v)) for t, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=lambda p: Path(os.path.expanduser(p)), required=True,
                    help="a GGUF file, e.g. the default model's")
    ap.add_argument("--base-model", type=os.path.expanduser, default=None,
                    help="the model whose tokenizer encodes the prompt "
                    "(default: the default model, SmolLM2-135M-Instruct)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--context", type=int, default=400, help="cached tokens before the timed batches")
    args = ap.parse_args()
    if not args.gguf.is_file():
        raise SystemExit(f"[hydra] error: --gguf {args.gguf}: no such file")
    if not 0 < args.context <= 2048 - max(SIZES):
        raise SystemExit(f"[hydra] error: --context {args.context}: choose 1..{2048 - max(SIZES)}")
    try:
        llm = LlamaCpp(args.gguf, args.threads)
    except ImportError:
        raise SystemExit("[hydra] error: this script needs llama-cpp-python: "
                         "pip install '.[llamacpp]'") from None
    tok = load_tokenizer(args.base_model)
    prompt = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                     tokenize=True, return_dict=False)
    plain = check_tree(llm, prompt)
    context = (prompt * (args.context // len(prompt) + 1))[:args.context]
    ms = time_batches(llm, context, plain, args.reps)
    print(f"# llama.cpp, {args.threads} threads, {len(context)}-token context, medians of {args.reps}")
    print("| tokens in the batch | ms | x one token |\n|---:|---:|---:|")
    for t, v in ms.items():
        print(f"| {t} | {v:.2f} | {v / ms[1]:.2f}x |")


if __name__ == "__main__":
    main()
