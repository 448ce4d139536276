"""hydra/model/generate.py on tiny random Llamas (fp32, GQA 4/2 heads): greedy speculative decoding is
lossless for every head type and tree, the tree forward equals per-path sequential decoding, the proposals
equal a per-node reference, exact sampling preserves the base model's distribution, and stopping / bad input
are handled cleanly."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_first_two_tokens_follow_base, make_heads, make_tiny_base, randomize_
from transformers import LlamaForCausalLM

from hydra.model import HEAD_ARCHS, HydraConfig, HydraModel
from hydra.model import generate as gen_mod
from hydra.model.generate import DecodeConfig, StepOutput, ar_generate, generate, hydra_generate, stream_text
from hydra.model.pacing import Pacer

VOCAB = 64
EXAMPLE = [[0], [1], [0, 0], [0, 1], [1, 0]]  # the worked example of test_trees.py (depth 2)
TREES = ["chain_4", "tree_8", "tree_16", "mc_sim_7b_63", EXAMPLE, [[0], [1], [2]]]
DYNAMIC = ["dynamic:4", "dynamic:16", "dynamic:8:4:4:fixed", "dynamic:3:2:2:fixed"]
PROMPTS = [[7], [3, 17, 40, 5, 9], [11, 2, 33, 33, 60, 1, 0, 45, 12, 8, 19, 23]]
# Every head type, plus Hydra++ whose prefix layer also reads the next token (prefix_reads_next_token),
# Hydra++ with two prefix decoder layers (prefix_num_layers; the second cached and run like the first) and
# Hydra heads that also read the base's earlier layers (feature_layers; the decoder returns all its states).
NEXT, DEEP, FUSED = "prefix-mlp+next", "prefix-mlp+deep", "hydra-mlp+fused"
ARCHS = [*HEAD_ARCHS, NEXT, DEEP, FUSED]


def arch_config(arch: str) -> tuple[str, dict]:
    """(hydra_head_arch, further HydraConfig fields) for an entry of ARCHS."""
    variants = {NEXT: {"prefix_reads_next_token": True}, DEEP: {"prefix_num_layers": 2},
                FUSED: {"feature_layers": [0, 1]}}
    return (arch.split("+")[0], variants[arch]) if arch in variants else (arch, {})


# --- tiny models ------------------------------------------------------------------------------------------
def make_base(vocab: int = VOCAB, max_pos: int = 128, attn: str = "sdpa", seed: int = 0) -> LlamaForCausalLM:
    """A random 2-layer GQA Llama with O(1) logits (well-separated argmaxes, no fp ties)."""
    return make_tiny_base(vocab, seed=seed, scale=0.3, max_position_embeddings=max_pos,
                          attn_implementation=attn)


def make_cycle_base(vocab: int = VOCAB, max_pos: int = 128, beta: float = 4.0, scale: float = 0.2,
                    seed: int = 0, attn: str = "sdpa") -> LlamaForCausalLM:
    """A Llama that mostly continues x -> x+1 (mod vocab) but depends on its context through random attention
    and MLP layers: unit-norm token embeddings e_x and output rows e_{v-1}, so the residual stream's own
    token wins unless the layers (scale) push it elsewhere. With scale 0.2 about a third of its greedy steps
    leave the cycle, so oracle heads that predict the cycle get long but not always full acceptances."""
    model = make_tiny_base(vocab, seed=seed, scale=scale, max_position_embeddings=max_pos,
                           attn_implementation=attn)
    gen = torch.Generator().manual_seed(seed + 100)
    e = torch.randn(vocab, 32, generator=gen)
    e = e / e.norm(dim=-1, keepdim=True) * 32 ** 0.5
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(e)
        model.lm_head.weight.copy_(beta * e.roll(1, 0) / 32 ** 0.5)  # row v = e_{v-1}
    return model


def random_heads(base, arch: str, num_heads: int = 4, seed: int = 1, tokenizer=None, **cfg) -> HydraModel:
    arch, extra = arch_config(arch)
    return make_heads(base, arch, num_heads, num_layers=2, seed=seed, tokenizer=tokenizer, **extra, **cfg)


def oracle_heads(base, arch: str, num_heads: int = 4) -> HydraModel:
    """Heads that predict the cycle of make_cycle_base exactly.

    Grounded head i reads [c_t, e(x_{t+1}), ..., e(x_{t+i+1})]: its residual projection keeps only the last
    embedding, and the shared base output layer maps e(x) to x+1. Medusa head i sees only h_t ~ e(x_t): an
    identity trunk and its own output layer with rows e_{v-i-2} give x_t + i + 2.
    """
    arch, extra = arch_config(arch)
    model = HydraModel(base, HydraConfig(hydra_num_heads=num_heads, hydra_head_arch=arch,
                                         share_lm_head=arch != "mlp", **extra))
    e = base.model.embed_tokens.weight
    d = e.shape[1]
    with torch.no_grad():
        for _i, mlp in enumerate(model.heads.mlps):
            for block in mlp.blocks:
                block.linear.weight.zero_()
                block.linear.bias.zero_()
            res = mlp.blocks[0].res_connection
            if res is not None:
                res.weight.zero_()
                res.bias.zero_()
                res.weight[:, -d:] = torch.eye(d)
        if arch == "mlp":
            for i, lm in enumerate(model.heads.lm_heads):
                lm.weight.copy_(e.roll(i + 2, 0))
                lm.bias.zero_()
    return model.eval()


def run(model, prompt, speculative: bool = True, **cfg):
    cfg.setdefault("stop_token_ids", [])
    cfg.setdefault("max_new_tokens", 40)
    return generate(model, prompt, DecodeConfig(**cfg), speculative=speculative)


@pytest.fixture(scope="module")
def base():
    return make_base()


@pytest.fixture(scope="module")
def cycle_base():
    return make_cycle_base()


def test_steps_leave_the_callers_grad_mode_and_each_others_alone(base):
    """A decoding call runs its steps in inference mode but hands the caller back its own mode between them;
    and a call closed while another is suspended (a server whose client left) does not take inference mode
    away from the other, which decodes on as a fresh call does."""
    model = random_heads(base, "prefix-mlp")
    config = DecodeConfig(stop_token_ids=[], max_new_tokens=30)
    first = hydra_generate(model, [3, 17, 40, 5], config)
    next(first)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    second = hydra_generate(model, [9, 22, 8], config)
    decided = list(next(second).tokens)
    first.close()
    decided += [t for step in second for t in step.tokens]
    assert decided == run(model, [9, 22, 8], max_new_tokens=30).tokens


# --- losslessness -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_lossless_random_heads(base, arch):
    model = random_heads(base, arch)
    for prompt in PROMPTS:
        ar = run(model, prompt, speculative=False)
        assert len(ar.tokens) == 40 and ar.accept_lengths == [1] * 40
        for tree in TREES + DYNAMIC:
            out = run(model, prompt, tree=tree)
            assert out.tokens == ar.tokens, (arch, tree, prompt)
            assert out.finish_reason == "max_new_tokens"
            assert sum(out.accept_lengths) >= len(out.tokens)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_lossless_with_high_acceptance(cycle_base, arch):
    """Oracle heads: several tokens accepted per step, so KV compaction of long (and non-first) paths and the
    prefix layer's cache are exercised; the output must still be the base model's own greedy output."""
    model = oracle_heads(cycle_base, arch)
    taus = []
    for prompt in PROMPTS:
        ar = run(model, prompt, speculative=False, max_new_tokens=60)
        deviations = sum((b - a) % VOCAB != 1 for a, b in zip(ar.tokens, ar.tokens[1:], strict=False))
        assert 5 <= deviations <= 45  # the base model is neither purely periodic nor unpredictable
        for tree in ("chain_4", "tree_16", "mc_sim_7b_63", EXAMPLE, *DYNAMIC):
            out = run(model, prompt, tree=tree, max_new_tokens=60)
            assert out.tokens == ar.tokens, (arch, tree, prompt)
            taus.append(len(out.tokens) / out.steps)
            assert max(out.accept_lengths) >= 3
    assert sum(taus) / len(taus) > 1.5, taus


def test_greedy_lossless_eager_attention():
    base = make_base(attn="eager", seed=3)
    for arch in HEAD_ARCHS:
        model = random_heads(base, arch, seed=4)
        ar = run(model, PROMPTS[1], speculative=False)
        assert run(model, PROMPTS[1], tree="tree_16").tokens == ar.tokens
    cyc = make_cycle_base(attn="eager")
    model = oracle_heads(cyc, "hydra-mlp")
    ar = run(model, PROMPTS[2], speculative=False)
    out = run(model, PROMPTS[2], tree="mc_sim_7b_63")
    assert out.tokens == ar.tokens and len(out.tokens) / out.steps > 1.5


def test_low_temperature_sampling_equals_greedy(base, cycle_base):
    """At temperature 1e-4 exact and typical acceptance (and AR sampling) reduce to greedy decoding."""
    for b, make in ((base, random_heads), (cycle_base, oracle_heads)):
        model = make(b, "hydra-mlp")
        greedy = run(model, PROMPTS[1], speculative=False).tokens
        assert run(model, PROMPTS[1], speculative=False, temperature=1e-4, seed=0).tokens == greedy
        for sampling in ("exact", "typical"):
            for tree in ("tree_16", "dynamic:8"):
                out = run(model, PROMPTS[1], tree=tree, temperature=1e-4, sampling=sampling, seed=0)
                assert out.tokens == greedy, (sampling, tree)


def test_ar_generate_equals_hf_generate(base):
    model = HydraModel(base, HydraConfig(hydra_num_heads=1))
    eos = base.generation_config.eos_token_id
    assert eos == 2  # LlamaConfig's default: both loops must stop on it
    for prompt in PROMPTS:
        ours = run(model, prompt, speculative=False, max_new_tokens=30, stop_token_ids=None)
        with torch.no_grad():
            hf = base.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False,
                               attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):]
        hf = hf.tolist()
        assert ours.finish_reason == ("eos" if eos in hf else "max_new_tokens")
        if eos in hf:
            hf = hf[: hf.index(eos)]
        assert ours.tokens == hf


def test_hidden_state_offset_only_changes_what_the_heads_read(base, monkeypatch):
    """With hidden_state_offset = 1 the heads read hidden_states[-2], but the base model's own logits (and so
    the output) must still come from its final hidden state: AR == HF generate and speculative == AR."""
    model = random_heads(base, "hydra-mlp", hidden_state_offset=1)
    spy = _Spy(monkeypatch, model)
    for prompt in PROMPTS:
        ours = run(model, prompt, speculative=False, max_new_tokens=20, stop_token_ids=None)
        with torch.no_grad():
            hf = base.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                               attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        hf = hf[0, len(prompt):].tolist()
        assert ours.tokens == hf[: hf.index(2) if 2 in hf else len(hf)]  # HF keeps the EOS (2), we cut it
        ar = run(model, prompt, speculative=False)
        steps = spy.consume(hydra_generate(model, prompt, DecodeConfig(tree="tree_16", max_new_tokens=40,
                                                                        stop_token_ids=[])))
        assert [t for s in steps for t in s.tokens] == ar.tokens
        with torch.no_grad():
            for _, ctx, _, emitted, _ in spy.proposals[:5]:
                want = model.base_hidden_states(torch.tensor([prompt + emitted[:-1]]))[0, -1]
                torch.testing.assert_close(ctx, want, atol=1e-5, rtol=1e-5)


# --- tree verification == per-path sequential decoding ------------------------------------------------------
def _sequential_logits(base, context: list[int], path_tokens: list[int]) -> torch.Tensor:
    """Feed the context, then the path's tokens one at a time with a normal DynamicCache."""
    with torch.no_grad():
        out = base(input_ids=torch.tensor([context]), use_cache=True)
        cache, rows = out.past_key_values, []
        for tok in path_tokens:
            out = base(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            rows.append(out.logits[0, -1])
    return torch.stack(rows)


class _Spy:
    """Records what the decoding loop proposed (tree, c_t, root, tokens emitted so far, tree tokens) and, with
    `logits=True`, what it verified (the (T, V) logits of every tree forward)."""

    def __init__(self, monkeypatch, model, logits: bool = False):
        self.proposals, self.verified, self.emitted = [], [], []
        original, original_dynamic = gen_mod._propose, gen_mod._propose_dynamic

        def propose(model_, tree, ctx, root):
            tokens = original(model_, tree, ctx, root)
            self.proposals.append((tree, ctx.clone(), root, list(self.emitted), tokens.clone()))
            return tokens

        def propose_dynamic(model_, spec, ctx, root):  # records the tree selected for this step
            tokens, tree = original_dynamic(model_, spec, ctx, root)
            self.proposals.append((tree, ctx.clone(), root, list(self.emitted), tokens.clone()))
            return tokens, tree

        monkeypatch.setattr(gen_mod, "_propose", propose)
        monkeypatch.setattr(gen_mod, "_propose_dynamic", propose_dynamic)
        self.handle = model.lm_head.register_forward_hook(self._hook) if logits else None

    def _hook(self, module, args, output):
        if output.dim() == 2:  # a verification forward: (T, V); the prefill reads one row (V,)
            self.verified.append(output.detach().clone())

    def consume(self, steps) -> list[StepOutput]:
        """Iterate the decoding generator, keeping `emitted` current (proposals run inside next())."""
        self.proposals.clear()
        self.verified.clear()
        self.emitted = []
        out = []
        for step in steps:
            self.emitted += step.tokens
            out.append(step)
        return out

    def close(self):
        if self.handle is not None:
            self.handle.remove()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("tree", ["mc_sim_7b_63", "tree_16", "dynamic:12:4:3:fixed"])
def test_tree_forward_equals_per_path_sequential_decoding(monkeypatch, attn, tree):
    """For each verification step of a real decoding run, every root-to-leaf path's tree logits equal the
    logits of decoding that path token by token after the same context (fp32, GQA 4/2)."""
    base = make_base(attn=attn, seed=5)
    model = random_heads(base, "hydra-mlp", seed=6)
    spy = _Spy(monkeypatch, model, logits=True)
    prompt = PROMPTS[1]
    spy.consume(hydra_generate(model, prompt, DecodeConfig(tree=tree, max_new_tokens=4, stop_token_ids=[])))
    spy.close()
    assert len(spy.proposals) >= 2 and len(spy.verified) == len(spy.proposals)
    for (buffers, _, root, emitted, tokens), logits in zip(spy.proposals, spy.verified, strict=True):
        assert emitted[-1] == root and int(tokens[0]) == root
        assert logits.shape == (buffers.size, VOCAB)
        context = prompt + emitted[:-1]
        t = buffers.size
        for row in buffers.retrieve.tolist():
            nodes = [x for x in row if x != t]
            want = _sequential_logits(base, context, tokens[nodes].tolist())
            torch.testing.assert_close(logits[nodes], want, atol=1e-5, rtol=1e-5)


# --- proposals ----------------------------------------------------------------------------------------------
def _reference_proposal(model, tree_choices, ctx, root) -> list[int]:
    """Node by node (no vectorisation): node p's token is the p[-1]-th best guess of head len(p)-1, read on
    [c_t, e(root), e(tokens on p's parent path)] (grounded) or on c_t alone (Medusa)."""
    heads, embed, lm_head = model.heads, model.embed_tokens, model.lm_head
    token = {(): root}
    for p in sorted({tuple(q) for q in tree_choices}, key=lambda q: (len(q), q)):
        i = len(p) - 1
        if heads.grounded:
            path = torch.tensor([token[p[:k]] for k in range(len(p))])
            hid = heads.head_hidden(i, ctx[None], embed(path).reshape(1, -1))
        else:
            hid = heads.head_hidden(i, ctx[None])
        token[p] = int(heads.draft_topk(i, hid, lm_head, p[-1] + 1)[0, p[-1]])
    return list(token.values())


@pytest.mark.parametrize("paced", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_proposals_and_context_match_unvectorised_reference(monkeypatch, cycle_base, arch, paced):
    """The vectorised depth-by-depth proposal equals a per-node reference, and the c_t it reads (base hidden
    state, or the prefix layer's output with its own cache kept in step with accepted tokens) equals c_t
    recomputed from scratch on the accepted sequence. `paced`: the heads rest on a fixed pattern (3 plain
    steps, then 1 speculative), so c_t catches up over several accepted tokens at once."""
    if paced:
        pattern = iter([False, False, False, True] * 50)
        # the heads' pacer follows the pattern; the one judging the lookup on resting steps lets it run
        monkeypatch.setattr(gen_mod.Pacer, "speculate", lambda self: next(pattern) if self.lookup else True)
    model = oracle_heads(cycle_base, arch)
    if model.heads.prefix is not None:
        randomize_(model.heads.prefix, 9, 0.3)  # a prefix layer whose output (c_t) is far from h_t
    with torch.no_grad():  # let c_t influence the guesses a little (the oracle heads ignore it otherwise)
        for mlp in model.heads.mlps:
            mlp.blocks[0].linear.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    spy = _Spy(monkeypatch, model)
    prompt = PROMPTS[2]
    for tree in ("mc_sim_7b_63", EXAMPLE):
        steps = spy.consume(hydra_generate(model, prompt, DecodeConfig(tree=tree, max_new_tokens=25,
                                                                        stop_token_ids=[], pace=paced)))
        assert any(s.accept_length > 2 for s in steps)
        assert len(spy.proposals) >= 3
        with torch.no_grad():
            for buffers, ctx, root, emitted, tokens in spy.proposals:
                assert tokens.tolist() == _reference_proposal(model, buffers.choices, ctx, root)
                assert emitted[-1] == root  # the root is the last decided token, not yet in the cache
                seq = torch.tensor([prompt + emitted[:-1]])
                hidden = model.base_hidden_states(seq)  # with fused features: all that the heads read
                positions = torch.arange(seq.shape[1])[None]
                next_embeds = model.embed_tokens(torch.tensor([prompt + emitted])[:, 1:])
                # the prefix layer without a cache (reading x_{t+1}, the last one the root, if it does)
                want = model.heads.context(hidden, positions, next_embeds=next_embeds)[0, -1]
                torch.testing.assert_close(ctx, want, atol=1e-5, rtol=1e-5)


def _reference_dynamic(model, spec, ctx, root) -> set[tuple[int, ...]]:
    """EAGLE-2 expansion and selection node by node: token paths (after the root) of the N best candidates."""
    heads, embed, lm_head = model.heads, model.embed_tokens, model.lm_head
    score = {(): 0.0}
    frontier = [()]
    for d in range(spec.depth):
        new = {}
        for path in frontier:
            if heads.grounded:
                hid = heads.head_hidden(d, ctx[None], embed(torch.tensor([root, *path])).reshape(1, -1))
            else:
                hid = heads.head_hidden(d, ctx[None])
            logp = torch.log_softmax(heads.head_logits(d, hid, lm_head)[0].float(), -1)
            top = logp.topk(spec.topk)
            for lp, tok in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                new[path + (tok,)] = score[path] + lp
        score |= new
        frontier = sorted(new, key=lambda p: -new[p])[: spec.topk]
    return set(sorted((p for p in score if p), key=lambda p: -score[p])[: spec.nodes])


def _token_paths(tree, tokens) -> set[tuple[int, ...]]:
    paths = {0: ()}
    for j, parent in enumerate(tree.parent.tolist()[1:], start=1):
        paths[j] = paths[parent] + (int(tokens[j]),)
    return set(paths.values()) - {()}


@pytest.mark.parametrize("arch", HEAD_ARCHS)
def test_dynamic_proposals_match_unvectorised_reference(monkeypatch, base, arch):
    """The vectorised dynamic proposal (one head call per depth over the kept nodes, selection by stable
    sort) selects the same token paths as expanding and ranking candidates node by node."""
    model = random_heads(base, arch, seed=11)
    spy = _Spy(monkeypatch, model)
    for spec in ("dynamic:10:4:3:fixed", "dynamic:4:3:2:fixed"):
        spy.consume(hydra_generate(model, PROMPTS[2],
                                   DecodeConfig(tree=spec, max_new_tokens=12, stop_token_ids=[])))
        assert len(spy.proposals) >= 5
        parsed = gen_mod.resolve_tree(spec, model.config)
        with torch.no_grad():
            for tree, ctx, root, _, tokens in spy.proposals:
                assert tree.size == parsed.nodes + 1 and int(tokens[0]) == root
                assert _token_paths(tree, tokens) == _reference_dynamic(model, parsed, ctx, root)


def test_dynamic_tree_adapts_to_the_heads_confidence(monkeypatch, base, cycle_base):
    """Unsure heads (near-uniform guesses): small trees, and the output is still plain greedy. Sure heads
    (oracle): large trees on most steps, long paths accepted."""
    unsure = random_heads(base, "hydra-mlp")
    randomize_(unsure.heads, 5, 0.01)  # tiny head outputs: flat draft distributions over the 64 tokens
    spy = _Spy(monkeypatch, unsure)
    steps = spy.consume(hydra_generate(unsure, PROMPTS[1], DecodeConfig(tree="dynamic:16", max_new_tokens=40,
                                                                         stop_token_ids=[])))
    assert [t for s in steps for t in s.tokens] == run(unsure, PROMPTS[1], speculative=False).tokens
    # near-uniform guesses (p ~ 1/64) are worth only the nodes that verify almost for free: at most 3 of 16
    assert max(tree.size for tree, *_ in spy.proposals) <= 4
    sure = oracle_heads(cycle_base, "hydra-mlp")
    spy = _Spy(monkeypatch, sure)
    steps = spy.consume(hydra_generate(sure, PROMPTS[1], DecodeConfig(tree="dynamic:16", max_new_tokens=40,
                                                                       stop_token_ids=[])))
    assert [t for s in steps for t in s.tokens] == run(sure, PROMPTS[1], speculative=False).tokens
    assert sum(tree.size > 4 for tree, *_ in spy.proposals) >= (len(steps) - 1) * 0.7
    assert sum(s.accept_length for s in steps[1:]) / (len(steps) - 1) > 1.5


# --- pacing (hydra/model/pacing.py) -------------------------------------------------------------------------
@pytest.mark.parametrize("arch", HEAD_ARCHS)
def test_paced_greedy_lossless(base, cycle_base, arch):
    """Steps with and without the heads interleave as the clock says; every interleaving is plain greedy."""
    for model in (random_heads(base, arch), oracle_heads(cycle_base, arch)):
        for prompt in PROMPTS:
            ar = run(model, prompt, speculative=False)
            for tree in ("mc_sim_7b_63", EXAMPLE, "dynamic:8"):
                assert run(model, prompt, tree=tree, pace=True).tokens == ar.tokens, (arch, tree, prompt)


class _Clock:
    """A fake `perf_counter`: a base forward costs 1 s plus `per_token` s for each token after the first, the
    heads' context update `heads` s."""

    def __init__(self, monkeypatch, heads: float, per_token: float = 0.0):
        self.now = 0.0
        forward, context = gen_mod._forward, gen_mod._context

        def timed_forward(run, tokens, *args):
            self.now += 1.0 + per_token * (tokens.numel() - 1)
            return forward(run, tokens, *args)

        def timed_context(*args):
            self.now += heads
            return context(*args)

        monkeypatch.setattr(gen_mod, "perf_counter", lambda: self.now)
        monkeypatch.setattr(gen_mod, "_forward", timed_forward)
        monkeypatch.setattr(gen_mod, "_context", timed_context)


def test_a_pacer_kept_across_calls_starts_from_what_it_measured(monkeypatch, base):
    """The same Pacer passed to two calls: the second reply does not learn again that these heads (random,
    costing half a forward) lose, so it probes less; both replies are plain greedy. A `pace` that is neither
    a bool nor a Pacer is refused at the call."""
    _Clock(monkeypatch, heads=0.5)
    model, pacer = random_heads(base, "hydra-mlp"), Pacer()
    ar = run(model, PROMPTS[1], speculative=False, max_new_tokens=60).tokens
    config = DecodeConfig(tree="tree_16", max_new_tokens=60, stop_token_ids=[], pace=pacer)
    probes = []
    for _ in range(2):
        before = pacer.probes
        assert [t for s in hydra_generate(model, PROMPTS[1], config) for t in s.tokens] == ar
        probes.append(pacer.probes - before)
    assert probes[1] < probes[0], probes
    with pytest.raises(ValueError, match="pace must be"):
        hydra_generate(model, PROMPTS[1], DecodeConfig(pace="yes"))


@pytest.mark.parametrize("tree", ["tree_16", "dynamic:8"])
def test_pacing_rests_heads_that_do_not_pay(monkeypatch, base, cycle_base, tree):
    """Heads costing half a forward: random heads (about one token per step) mostly rest, oracle heads (long
    accepted paths) speculate on nearly every step; both outputs are plain greedy."""
    _Clock(monkeypatch, heads=0.5)
    unsure, sure = random_heads(base, "hydra-mlp"), oracle_heads(cycle_base, "hydra-mlp")
    for model, most in ((unsure, False), (sure, True)):
        spy = _Spy(monkeypatch, model)
        steps = spy.consume(hydra_generate(model, PROMPTS[1], DecodeConfig(tree=tree, max_new_tokens=60,
                                                                             stop_token_ids=[], pace=True)))
        assert [t for s in steps for t in s.tokens] == run(model, PROMPTS[1], speculative=False,
                                                             max_new_tokens=60).tokens
        share = len(spy.proposals) / (len(steps) - 1)
        assert share > 0.7 if most else share < 0.35, (tree, most, share)


def test_resting_steps_verify_the_lookup_branch(monkeypatch, cycle_base):
    """Heads that lose (random, costing half a forward) rest; with the lookup on, resting steps verify the
    lookup branch alone, so on the cycle model (whose output comes round again after its 64 tokens) the reply
    takes far fewer forwards than with the lookup off, where resting steps are plain. Plain greedy either
    way."""
    _Clock(monkeypatch, heads=0.5)
    counter = _GraftCounter(monkeypatch)
    model = random_heads(cycle_base, "hydra-mlp")
    spy = _Spy(monkeypatch, model)
    ar = run(model, REPEATING, speculative=False, max_new_tokens=160).tokens
    forwards, resting_grafts, grafts = {}, {}, {}
    for lookup in (8, 0):
        counter.grafts = 0
        steps = spy.consume(hydra_generate(model, REPEATING, DecodeConfig(tree="tree_16", max_new_tokens=160,
                                                                            lookup=lookup, stop_token_ids=[],
                                                                            pace=True)))
        assert [t for s in steps for t in s.tokens] == ar
        rested = len(steps) - 1 - len(spy.proposals)
        assert rested > 0.6 * (len(steps) - 1), (lookup, rested, len(steps))
        forwards[lookup], grafts[lookup] = len(steps), counter.grafts
        resting_grafts[lookup] = counter.grafts - len(spy.proposals)  # at most one graft per heads' step
    assert resting_grafts[8] >= 5 and grafts[0] == 0, (resting_grafts, grafts)
    assert forwards[8] < 0.7 * forwards[0], forwards


@pytest.mark.parametrize("tree", ["tree_16", "none"])
def test_rested_lookup_branches_are_scored_for_the_pacer(monkeypatch, base, tree):
    """A lookup that loses (random base: its branches seldom match; a 9-token verification costs 5 forwards):
    resting steps that skip the branch still draft it, and the pacer judging the lookup (one level down, or
    the pacer itself for the tree "none") is told what each would have decided, scored against the tokens
    decided after it; the other pacer is told nothing. It probes the lookup no more than a pacer that learns
    from probes alone. Plain greedy either way."""
    _Clock(monkeypatch, heads=0.5, per_token=0.5)
    model = random_heads(base, "hydra-mlp")
    ar = run(model, REPEATING, speculative=False, max_new_tokens=150).tokens

    class ProbesOnly(Pacer):
        def __init__(self, judge_lookup: bool = True):
            super().__init__(judge_lookup=judge_lookup)
            self.lookup = ProbesOnly(judge_lookup=False) if judge_lookup else None

        def record_forgone(self, tokens: int) -> None:
            pass

    probes = {}
    for pacer in (Pacer(), ProbesOnly()):
        judge, other = (pacer, pacer.lookup) if tree == "none" else (pacer.lookup, pacer)
        config = DecodeConfig(tree=tree, max_new_tokens=150, lookup=8, stop_token_ids=[], pace=pacer)
        for _ in range(3):  # replies in a row, one pacer, as the chat CLI keeps one
            assert [t for s in hydra_generate(model, REPEATING, config) for t in s.tokens] == ar
        probes[type(pacer).__name__] = judge.probes
        assert other.forgone == 0
        if type(pacer) is Pacer:
            assert judge.forgone > 5 and judge.tokens < 1.5 < judge.cost, (judge.forgone, judge.tokens)
    assert probes["Pacer"] <= probes["ProbesOnly"], probes


# --- exact sampling end to end ------------------------------------------------------------------------------
@pytest.mark.parametrize("tree", [[[0], [1], [2], [0, 0], [0, 1], [1, 0]], "dynamic:5:2:3"])
def test_exact_sampling_matches_base_distribution(tree):
    """hydra_generate(temperature=1, sampling="exact") on a tiny model: the pair of the first two emitted
    tokens follows p(x1 | prompt) p(x2 | prompt, x1) computed directly from the base model's softmax. The
    dynamic tree is chosen from the heads' probabilities, a deterministic function of the context, so the
    same zero-and-renormalise rule must stay exact with it."""
    base = make_cycle_base(vocab=16, beta=2.5, scale=0.2, seed=2)
    assert_first_two_tokens_follow_base(oracle_heads(base, "hydra-mlp", num_heads=2), [3, 9, 4], tree,
                                        max_cell=0.3)


def test_exact_sampling_with_pacing(monkeypatch):
    """Pacing decides from the clock and from earlier steps whether a step runs the heads; any choice made
    before the step's own draws keeps exact sampling exact. Here the second step speculates or not depending
    on the first token drawn (the root): a choice that depends on an earlier random draw."""
    draft = gen_mod._draft

    def draft_by_parity(run, root):
        return draft(run, root) if root % 3 else gen_mod.Draft(torch.tensor([root]), run.plain)

    monkeypatch.setattr(gen_mod.Pacer, "speculate", lambda self: True)
    monkeypatch.setattr(gen_mod, "_draft", draft_by_parity)
    base = make_cycle_base(vocab=16, beta=2.5, scale=0.2, seed=2)
    assert_first_two_tokens_follow_base(oracle_heads(base, "hydra-mlp", num_heads=2), [3, 9, 4],
                                        [[0], [1], [2], [0, 0], [0, 1], [1, 0]], max_cell=0.3, pace=True)


# --- prompt lookup ------------------------------------------------------------------------------------------
# A prompt whose 2-grams recur, so that lookup drafts from the first step on.
REPEATING = [5, 6, 7, 30, 5, 6, 7, 31, 40, 5, 6, 7]


class _GraftCounter:
    """Counts the steps whose tree got a prompt-lookup branch (graft_chain added nodes)."""

    def __init__(self, monkeypatch):
        self.grafts = 0
        graft = gen_mod.graft_chain

        def counting(tokens, tree, chain):
            out = graft(tokens, tree, chain)
            self.grafts += out[0].numel() > tokens.numel()
            return out

        monkeypatch.setattr(gen_mod, "graft_chain", counting)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_lossless_with_prompt_lookup(monkeypatch, base, cycle_base, arch):
    """A lookup branch grafted onto static and dynamic trees keeps greedy decoding plain greedy, for heads
    that are mostly wrong and for heads that are mostly right; on the cycle model, whose output repeats,
    it is accepted beyond the heads' depth (an accepted length above heads + 1 can only come from it)."""
    counter = _GraftCounter(monkeypatch)
    deepest = 0
    for b, make in ((base, random_heads), (cycle_base, oracle_heads)):
        model = make(b, arch)
        for prompt in (PROMPTS[1], REPEATING):
            ar = run(model, prompt, speculative=False, max_new_tokens=80)
            for tree in ("tree_16", "dynamic:8", "none"):
                for lookup in (2, 8):
                    out = run(model, prompt, tree=tree, lookup=lookup, max_new_tokens=80)
                    assert out.tokens == ar.tokens, (arch, tree, lookup, prompt)
                    deepest = max(deepest, *out.accept_lengths)
    assert counter.grafts > 50 and deepest > model.config.hydra_num_heads + 1, (counter.grafts, deepest)


def test_tree_none_verifies_the_lookup_alone(monkeypatch, cycle_base):
    """tree="none": the heads never run (no context, no proposal), steps without a lookup match are plain
    steps, and the output is still plain greedy, decided in fewer forwards than tokens."""
    def fail(*args):
        raise AssertionError("the heads ran")

    monkeypatch.setattr(gen_mod, "_context", fail)
    for arch in ARCHS:
        model = oracle_heads(cycle_base, arch)
        ar = run(model, REPEATING, speculative=False, max_new_tokens=80)
        out = run(model, REPEATING, tree="none", max_new_tokens=80)
        assert out.tokens == ar.tokens and out.steps < len(out.tokens) * 0.8, (arch, out.steps)
        assert run(model, REPEATING, tree="none", lookup=0, max_new_tokens=80).accept_lengths == [1] * 80


def test_exact_sampling_with_prompt_lookup(monkeypatch):
    """The lookup's guesses are a function of the context, like the heads' drafts, so the zero-and-renormalise
    rule stays exact with them: here a first token x1 in {4, 2, 1, 5} (a third of p(x1); 4 -> x1 occurred in
    the prompt) makes the second step's tree carry a lookup branch beside the heads' own children of the
    root."""
    counter = _GraftCounter(monkeypatch)
    base = make_cycle_base(vocab=16, beta=2.5, scale=0.2, seed=2)
    prompt = [4, 4, 6, 4, 2, 1, 4, 1, 0, 4, 5, 15, 4]
    assert_first_two_tokens_follow_base(oracle_heads(base, "hydra-mlp", num_heads=2), prompt,
                                        [[0], [1], [2], [0, 0], [0, 1], [1, 0]], max_cell=0.3, lookup=2)
    assert counter.grafts > 1000, counter.grafts  # of 5000 runs


def test_exact_sampling_with_paced_lookup_over_whole_replies(monkeypatch):
    """Every token of whole sampled replies follows the base model's distribution given the tokens before it,
    with a shared pacer that rests and probes the heads and the lookup (made-up timings where each about
    breaks even) and scores rested lookup branches on the tokens decided after them (`record_forgone`): all
    those choices are made before a step's own draws. 600 replies of 24 tokens; the same statistic rejects
    the replies against the base at temperature 1.15 (its power), and rejected a lossy acceptance (drafts
    accepted with probability 1.3 p) at 92 against a bound of 38 when tried."""
    from helpers import chi2_quantile, sampling_fit_statistic

    _Clock(monkeypatch, heads=0.5, per_token=0.2)
    base = make_cycle_base(vocab=16, beta=2.5, scale=0.2, seed=2)
    model = oracle_heads(base, "hydra-mlp", num_heads=2)
    prompt = [4, 4, 6, 4, 2, 1, 4, 1, 0, 4, 5, 15, 4]
    pacer, replies, lengths = Pacer(), [], []
    for seed in range(600):
        out = generate(model, prompt, DecodeConfig(tree=[[0], [1], [0, 0]], temperature=1.0, sampling="exact",
                                                   seed=seed, max_new_tokens=24, stop_token_ids=[], lookup=4,
                                                   pace=pacer))
        replies.append(out.tokens)
        lengths += out.accept_lengths[1:]
    bound = chi2_quantile(0.999, base.config.vocab_size - 1)
    assert sampling_fit_statistic(base, prompt, replies) < bound
    assert sampling_fit_statistic(base, prompt, replies, temperature=1.15) > bound
    multi = sum(n > 1 for n in lengths)
    assert pacer.probes > 100 and pacer.lookup.probes > 100 and pacer.lookup.forgone > 100, vars(pacer)
    assert 1000 < multi < len(lengths) - 1000, (multi, len(lengths))  # speculated and rested often


# --- stopping -----------------------------------------------------------------------------------------------
def test_eos_cuts_output(cycle_base):
    model = oracle_heads(cycle_base, "hydra-mlp")
    prompt = PROMPTS[1]
    ar = run(model, prompt, speculative=False, max_new_tokens=60)
    cut_mid_step = False
    for k in (0, 5, 11, 20, 33):
        eos = ar.tokens[k]
        first = ar.tokens.index(eos)
        for speculative in (False, True):
            out = run(model, prompt, speculative=speculative, tree="tree_16", max_new_tokens=60,
                      stop_token_ids=[eos])
            assert out.tokens == ar.tokens[:first] and out.finish_reason == "eos"
            if speculative:
                # accept_length counts the tokens this forward decided, including any after the stop token
                emitted_last = len(out.tokens) - (sum(out.accept_lengths[:-1]))
                cut_mid_step |= out.accept_lengths[-1] > emitted_last + 1
    assert cut_mid_step  # at least once the stop token sat inside a multi-token acceptance


def test_eos_from_generation_config_and_tokenizer(cycle_base):
    model = oracle_heads(cycle_base, "mlp")
    prompt = PROMPTS[0]
    ar = run(model, prompt, speculative=False)
    eos = ar.tokens[7]
    first = ar.tokens.index(eos)
    old = cycle_base.generation_config.eos_token_id
    try:
        cycle_base.generation_config.eos_token_id = [eos, VOCAB + 5]
        out = run(model, prompt, tree="tree_8", stop_token_ids=None)
        assert out.tokens == ar.tokens[:first] and out.finish_reason == "eos"
        cycle_base.generation_config.eos_token_id = None
        model.tokenizer = type("Tok", (), {"eos_token_id": eos})()
        out = run(model, prompt, tree="tree_8", stop_token_ids=None)
        assert out.tokens == ar.tokens[:first] and out.finish_reason == "eos"
    finally:
        cycle_base.generation_config.eos_token_id = old
        model.tokenizer = None


def test_max_new_tokens_exact(cycle_base):
    model = oracle_heads(cycle_base, "prefix-mlp")
    prompt = PROMPTS[2]
    ar = run(model, prompt, speculative=False, max_new_tokens=30)
    overshoot = False
    for m in range(1, 14):
        out = run(model, prompt, tree="mc_sim_7b_63", max_new_tokens=m)
        assert out.tokens == ar.tokens[:m] and out.finish_reason == "max_new_tokens"
        assert sum(out.accept_lengths) >= m
        overshoot |= sum(out.accept_lengths) > m  # the last step accepted more than the budget left
        ar_m = run(model, prompt, speculative=False, max_new_tokens=m)
        assert ar_m.tokens == ar.tokens[:m] and ar_m.steps == m
    assert overshoot


def test_max_steps(cycle_base):
    model = oracle_heads(cycle_base, "hydra-mlp")
    prompt = PROMPTS[1]
    ar = run(model, prompt, speculative=False, max_new_tokens=60)
    for steps in (1, 2, 5):
        out = run(model, prompt, tree="tree_16", max_new_tokens=60, max_steps=steps)
        assert out.steps == steps and out.finish_reason == "max_steps"
        assert out.tokens == ar.tokens[: len(out.tokens)] and len(out.tokens) == sum(out.accept_lengths)
        a = run(model, prompt, speculative=False, max_new_tokens=60, max_steps=steps)
        assert a.tokens == ar.tokens[:steps] and a.finish_reason == "max_steps"
    assert run(model, prompt, tree="tree_16", max_steps=1).tokens == ar.tokens[:1]  # the prefill's token only
    # max_new_tokens wins when both are reached by the same step
    both = run(model, prompt, speculative=False, max_new_tokens=3, max_steps=3)
    assert both.finish_reason == "max_new_tokens"


@pytest.mark.parametrize("tree, lookup", [("chain_4", 0), ("tree_16", 0), ("mc_sim_7b_63", 0),
                                          ("dynamic:6:4:4:fixed", 0), ("tree_8", 6), ("dynamic:6", 9),
                                          ("none", 7)])
@pytest.mark.parametrize("prompt_len", [1, 5, 23])
def test_context_limit_stops_cleanly(tree, lookup, prompt_len):
    """max_position_embeddings = 24: decoding stops with finish_reason "length" once every position is used
    (all emitted tokens but the last were fed at positions < 24), never overflows, and equals AR until then.
    The 64-node tree never fits next to the prompt and must fall back to one-token steps."""
    context = 24
    cyc = make_cycle_base(max_pos=context, seed=2)
    model = oracle_heads(cyc, "hydra-mlp")
    prompt = PROMPTS[2][:prompt_len] + list(range(30, 30 + max(0, prompt_len - 12)))
    assert len(prompt) == prompt_len
    ar = run(model, prompt, speculative=False, max_new_tokens=100)
    out = run(model, prompt, tree=tree, max_new_tokens=100, lookup=lookup)
    assert ar.finish_reason == out.finish_reason == "length"
    assert out.tokens == ar.tokens
    assert prompt_len + len(out.tokens) - 1 == context
    # A budget that ends exactly at the limit reports the budget.
    exact = run(model, prompt, tree=tree, max_new_tokens=context - prompt_len + 1, lookup=lookup)
    assert exact.tokens == ar.tokens and exact.finish_reason == "max_new_tokens"


# --- bad input ----------------------------------------------------------------------------------------------
def test_bad_input(base):
    model = random_heads(base, "hydra-mlp", num_heads=2)
    context = base.config.max_position_embeddings

    def run(model, prompt, speculative=True, **cfg):  # noqa: F811 - a tree that fits the two heads
        return globals()["run"](model, prompt, speculative, **({"tree": EXAMPLE} | cfg))

    for speculative in (True, False):
        with pytest.raises(ValueError, match="empty"):
            run(model, [], speculative=speculative)
        with pytest.raises(ValueError, match="empty"):
            run(model, torch.zeros(1, 0, dtype=torch.long), speculative=speculative)
        too_long = list(range(VOCAB)) * 3
        with pytest.raises(ValueError, match=f"{len(too_long)}.*{context}"):
            run(model, too_long, speculative=speculative)
        with pytest.raises(ValueError, match="prompt is 128 tokens; the context holds 128"):
            run(model, [1] * context, speculative=speculative)
        with pytest.raises(ValueError, match="batch size 2"):
            run(model, torch.ones(2, 5, dtype=torch.long), speculative=speculative)
        with pytest.raises(ValueError, match="not \\(1, 1, 3\\)"):
            run(model, torch.ones(1, 1, 3, dtype=torch.long), speculative=speculative)
        for bad_id in (-1, VOCAB):
            with pytest.raises(ValueError, match=f"outside the base model's vocabulary \\[0, {VOCAB}\\)"):
                run(model, [1, bad_id, 2], speculative=speculative)
        fn = hydra_generate if speculative else ar_generate
        with pytest.raises(ValueError, match="empty"):  # at the call, before the first step is asked for
            fn(model, [], DecodeConfig(tree=EXAMPLE))
        with pytest.raises(ValueError, match="temperature"):
            run(model, [1, 2], speculative=speculative, temperature=-1.0)
        with pytest.raises(ValueError, match="sampling"):
            run(model, [1, 2], speculative=speculative, temperature=1.0, sampling="nucleus")
        for bad in (-1, 1.5, True, "4"):
            with pytest.raises(ValueError, match="lookup must be a number of tokens >= 0"):
                run(model, [1, 2], speculative=speculative, lookup=bad)
        empty = run(model, [1, 2, 3], speculative=speculative, max_new_tokens=0)
        assert empty.tokens == [] and empty.steps == 0
        assert list(fn(model, [1, 2], DecodeConfig(tree=EXAMPLE, max_new_tokens=0))) == []
    # a tree deeper than the number of heads: refused when the generator is created, before any work
    with pytest.raises(ValueError, match="tree depth 4 exceeds the number of heads \\(2\\)"):
        hydra_generate(model, [1, 2, 3], DecodeConfig(tree="chain_4"))
    with pytest.raises(ValueError, match="unknown tree"):
        run(model, [1, 2, 3], tree="no_such_tree")
    # a (1, S) batch and a 1-D prompt are the same request; the longest allowed prompt works
    a = run(model, torch.tensor([[5, 6, 7]]), tree=EXAMPLE, max_new_tokens=5)
    assert a.tokens == run(model, [5, 6, 7], tree=EXAMPLE, max_new_tokens=5).tokens
    last = run(model, [1] * (context - 1), tree=EXAMPLE, max_new_tokens=10)
    assert len(last.tokens) == 2 and last.finish_reason == "length"


def test_tree_wider_than_the_draft_vocabulary_refused_at_the_call(base):
    """K (dynamic) or a static rank beyond the tokens the heads draft from failed inside the first proposal
    ("selected index k out of range"); it is refused when the generator is created, with a message."""
    model = random_heads(base, "hydra-mlp", num_heads=2)
    for tree in (f"dynamic:8:2:{VOCAB + 1}", [[k] for k in range(VOCAB + 1)]):
        with pytest.raises(ValueError, match=f"top {VOCAB + 1} guesses.*draft from {VOCAB} tokens"):
            hydra_generate(model, [1, 2, 3], DecodeConfig(tree=tree))
    assert len(run(model, [1, 2, 3], tree=f"dynamic:8:2:{VOCAB}", max_new_tokens=3).tokens) == 3  # K = V fits
    model.heads.set_draft_vocab(torch.arange(10))
    try:
        with pytest.raises(ValueError, match="top 11 guesses.*draft from 10 tokens"):
            hydra_generate(model, [1, 2, 3], DecodeConfig(tree="dynamic:8:2:11"))
    finally:
        model.heads.set_draft_vocab(None)


def test_default_tree_comes_from_heads_config(base):
    model = random_heads(base, "hydra-mlp", num_heads=2)
    with pytest.raises(ValueError, match="exceeds the number of heads"):  # default mc_sim_7b_63 has depth 4
        run(model, [1, 2, 3])
    model.config.tree = [[0], [1], [0, 0]]
    assert run(model, [1, 2, 3]).tokens == run(model, [1, 2, 3], speculative=False).tokens


# --- streaming ----------------------------------------------------------------------------------------------
class ByteTokenizer:
    """Token i -> one byte; ids 60..63 are pieces of multi-byte UTF-8 characters, id 0 is special."""

    eos_token_id = None
    PIECES = {60: b"\xc3", 61: b"\xa9", 62: b"\xe2\x82", 63: b"\xac"}  # e-acute = c3 a9, euro = e2 82 ac

    def decode(self, ids, skip_special_tokens=True):
        ids = [i for i in ids if not (skip_special_tokens and i == 0)]
        out = b"".join(self.PIECES.get(i, bytes([97 + i % 26])) for i in ids)
        return out.decode("utf-8", errors="replace")


def test_stream_text_holds_back_incomplete_characters():
    tok = ByteTokenizer()
    steps = [StepOutput([1, 60], 2), StepOutput([61, 62], 2), StepOutput([63, 0, 2], 3),
             StepOutput([3], 1, "eos")]
    deltas = [d for d, _ in stream_text(tok, steps)]
    assert len(deltas) == len(steps)
    assert not any("\ufffd" in d for d in deltas)  # never a half character
    assert "".join(deltas) == tok.decode([1, 60, 61, 62, 63, 0, 2, 3]) == "b\u00e9\u20accd"
    assert deltas[-1] == "d"
    # an incomplete character at the very end is flushed (as a replacement character) when decoding finishes
    deltas = [d for d, _ in stream_text(tok, [StepOutput([1], 1), StepOutput([60], 1, "max_new_tokens")])]
    assert deltas == ["b", "\ufffd"]


@pytest.mark.parametrize("speculative", [True, False])
def test_stream_text_deltas_join_to_full_text(base, speculative):
    tok = ByteTokenizer()
    model = random_heads(base, "prefix-mlp", tokenizer=tok)
    cfg = DecodeConfig(tree="tree_16", max_new_tokens=50, stop_token_ids=[])
    steps = list((hydra_generate if speculative else ar_generate)(model, PROMPTS[1], cfg))
    tokens = [t for s in steps for t in s.tokens]
    assert any(t in ByteTokenizer.PIECES for t in tokens)
    pairs = list(stream_text(tok, steps))
    assert [s for _, s in pairs] == steps
    assert "".join(d for d, _ in pairs) == tok.decode(tokens)
