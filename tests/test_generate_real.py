"""Losslessness on the real default model (SmolLM2-135M-Instruct, fp32, GQA 9/3): greedy speculative decoding
with each head type yields token for token the output of plain greedy decoding on MT-Bench prompts, and the
plain loop equals Hugging Face `generate`.

Expensive on CPU, so random heads draft from a random 2,048-token draft vocabulary (the proposal then reads
a small slice of the output layer, and the draft-vocabulary path is exercised too) and verify an 8-node tree.
HYDRA_LOSSLESS_PROMPTS / HYDRA_LOSSLESS_TOKENS change
the number of prompts / new tokens: defaults 4 x 64, which keep these tests to ~2 minutes on one thread;
`HYDRA_LOSSLESS_PROMPTS=10` is the decoding-engine issue's acceptance criterion (all 80 questions, both turns:
the answer scripts, README Results, "Losslessness, fp32").
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from hydra.model import HEAD_ARCHS, HydraConfig, HydraModel
from hydra.model import generate as gen_mod
from hydra.model.generate import DecodeConfig, StepOutput, ar_generate, hydra_generate, stream_text

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = REPO / "llm_judge" / "data" / "mt_bench" / "question.jsonl"
TRAINED_HEADS = REPO / "hydra" / "heads" / "default"
N_PROMPTS = int(os.environ.get("HYDRA_LOSSLESS_PROMPTS", "4"))
NEW_TOKENS = int(os.environ.get("HYDRA_LOSSLESS_TOKENS", "64"))
TREE = "tree_8"
CHAIN = [[0] * k for k in range(1, 5)]


@pytest.fixture(scope="module")
def real(request):
    """(model, tokenizer): the session-wide fixture from conftest.py when there is one."""
    try:
        return request.getfixturevalue("real_base")
    except pytest.FixtureLookupError:
        from hydra.model import load_base_model

        return load_base_model(None, dtype=torch.float32)


@pytest.fixture(scope="module")
def prompts(real):
    if not QUESTIONS.is_file():
        pytest.skip(f"{QUESTIONS} not found")
    _, tokenizer = real
    lines = [json.loads(x) for x in QUESTIONS.read_text().splitlines() if x.strip()][:N_PROMPTS]
    return [tokenizer.apply_chat_template([{"role": "user", "content": q["turns"][0]}],
                                          add_generation_prompt=True, tokenize=True, return_dict=False)
            for q in lines]


def _collect(steps) -> tuple[list[int], list[StepOutput]]:
    steps = list(steps)
    return [t for s in steps for t in s.tokens], steps


@pytest.fixture(scope="module")
def reference(real, prompts):
    """Plain greedy decoding (AR loop) of every prompt: (tokens, finish_reason)."""
    base, tokenizer = real
    model = HydraModel(base, HydraConfig(hydra_num_heads=1, hydra_head_arch="mlp"), tokenizer).eval()
    out = []
    for ids in prompts:
        tokens, steps = _collect(ar_generate(model, ids, DecodeConfig(max_new_tokens=NEW_TOKENS)))
        out.append((tokens, steps[-1].finish_reason))
    return out


def _random_heads(base, tokenizer, arch: str, seed: int) -> HydraModel:
    torch.manual_seed(seed)
    model = HydraModel(base, HydraConfig(hydra_num_heads=4, hydra_num_layers=1, hydra_head_arch=arch,
                                         share_lm_head=True), tokenizer)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # fresh ResBlocks start at W = 0 (identity for Medusa heads): randomize them all
        for mlp in model.heads.mlps:
            for block in mlp.blocks:
                block.linear.weight.copy_(0.02 * torch.randn(block.linear.weight.shape, generator=gen))
    model.heads.set_draft_vocab(torch.randperm(base.config.vocab_size, generator=gen)[:2048])
    return model.eval()


def _check_lossless(model, prompts, reference, tree=TREE) -> float:
    tokenizer = model.tokenizer
    total_tokens = total_steps = 0
    for i, (ids, (want, reason)) in enumerate(zip(prompts, reference, strict=True)):
        config = DecodeConfig(tree=tree, max_new_tokens=NEW_TOKENS)
        tokens, steps = _collect(hydra_generate(model, ids, config))
        assert tokens == want, f"prompt {i}: speculative output differs from greedy decoding"
        assert steps[-1].finish_reason == reason
        total_tokens += len(tokens)
        total_steps += len(steps)
        if i == 0:  # the streamed text deltas join to the decoded output
            text = "".join(delta for delta, _ in stream_text(tokenizer, steps))
            assert text == tokenizer.decode(tokens, skip_special_tokens=True)
    return total_tokens / total_steps


@pytest.mark.parametrize("arch", HEAD_ARCHS)
def test_greedy_lossless_random_heads(real, prompts, reference, arch):
    base, tokenizer = real
    model = _random_heads(base, tokenizer, arch, seed=HEAD_ARCHS.index(arch))
    tau = _check_lossless(model, prompts, reference)
    assert tau >= 1.0


def test_greedy_lossless_long_acceptance(real, prompts, reference, monkeypatch):
    """Random heads are almost never accepted, so the runs above keep only the root at most steps and the KV
    compaction barely moves anything. Here the proposal is replaced by an oracle that writes the true greedy
    continuation along a random root-to-leaf path of the tree (often not the first branch), truncated at a
    random depth, with random tokens everywhere else: long, non-contiguous acceptances on the real model."""
    base, tokenizer = real
    model = _random_heads(base, tokenizer, "prefix-mlp", seed=7)  # heads still run (c_t, prefix-layer cache)
    gen = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    state = {"emitted": [], "truth": [], "moved": 0}

    def oracle(model_, tree, ctx, root):
        k = len(state["emitted"]) - 1  # the root is the last emitted token
        assert state["emitted"][k] == root
        truth = state["truth"][k + 1:]
        tokens = torch.randint(0, vocab, (tree.size,), generator=gen)
        tokens[0] = root
        rows = tree.retrieve
        row = rows[int(torch.randint(0, rows.shape[0], (1,), generator=gen))].tolist()
        nodes = [x for x in row if x != tree.size][1:]
        depth = int(torch.randint(0, len(nodes) + 1, (1,), generator=gen))
        for node, tok in zip(nodes[:depth], truth, strict=False):
            tokens[node] = tok
        state["moved"] += depth > 0 and nodes[0] != 1
        return tokens.to(ctx.device)

    monkeypatch.setattr(gen_mod, "_propose", oracle)
    total_tokens = total_steps = longest = 0
    for ids, (want, reason) in list(zip(prompts, reference, strict=True))[:3]:
        state["emitted"], state["truth"] = [], want
        steps = []
        # lookup=0: the accepted paths are the oracle's own (a lookup branch would add deeper ones)
        config = DecodeConfig(tree=TREE, max_new_tokens=NEW_TOKENS, lookup=0)
        for step in hydra_generate(model, ids, config):
            state["emitted"] += step.tokens
            steps.append(step)
        assert state["emitted"] == want and steps[-1].finish_reason == reason
        total_tokens += len(want)
        total_steps += len(steps)
        longest = max([longest] + [len(s.tokens) for s in steps])
    # A uniform random depth on a random path of the depth-4 tree averages ~1 accepted draft per step.
    assert total_tokens / total_steps > 1.6
    assert longest == 5  # tree_8 has depth 4: some steps took a whole root-to-leaf path + the bonus token
    assert state["moved"] >= 10  # accepted paths outside the first branch: rows really moved in the cache


@pytest.mark.parametrize("dynamic", [False, True])
def test_greedy_lossless_trained_heads(real, prompts, reference, dynamic):
    if not (TRAINED_HEADS / "config.json").is_file():
        pytest.skip(f"no trained heads in {TRAINED_HEADS}")
    base, tokenizer = real
    model = HydraModel.from_pretrained(TRAINED_HEADS, base_model=base, tokenizer=tokenizer).eval()
    num_heads = model.config.hydra_num_heads
    # the heads' own tree when they name one, else the default tree (or a chain if there are fewer heads);
    # or a dynamic tree grown from the trained heads' probabilities
    tree = None if model.config.tree else "mc_sim_7b_63" if num_heads >= 4 else CHAIN[:num_heads]
    tree = "dynamic:8" if dynamic else tree
    tau = _check_lossless(model, prompts, reference, tree=tree)
    assert tau > 1.2  # trained heads must actually be accepted


def test_ar_generate_equals_hf_generate(real, prompts, reference):
    base, _ = real
    eos = base.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for ids, (want, _) in list(zip(prompts, reference, strict=True))[:2]:
        with torch.no_grad():
            hf = base.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(ids):].tolist()
        cut = next((k for k, t in enumerate(hf) if t in eos), len(hf))
        assert want == hf[:cut]
