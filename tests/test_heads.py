"""hydra/model/heads: ResBlock, HeadMLP, PrefixLayer and DraftHeads on tiny random Llama bases."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hydra.model import HydraConfig, HydraModel
from hydra.model.heads import DraftHeads, HeadMLP, PrefixLayer, ResBlock

ARCHS = ["mlp", "hydra-mlp", "prefix-mlp"]
H, L = 3, 2  # heads, ResBlocks per head
B, S = 2, 12


def _heads(base, arch, randomize=None, share_lm_head=True, dropout=0.0, num_layers=L):
    cfg = HydraConfig(
        hydra_num_heads=H,
        hydra_num_layers=num_layers,
        hydra_head_arch=arch,
        share_lm_head=share_lm_head,
        dropout_rate=dropout,
    )
    model = HydraModel(base, cfg)
    if randomize is not None:
        randomize(model.heads)
    return model.eval()


def _ids(vocab, seed=0, shape=(B, S)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# --- shapes --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("share_lm_head", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_shapes(tiny_base, arch, share_lm_head):
    d, vocab = tiny_base.config.hidden_size, tiny_base.config.vocab_size
    model = _heads(tiny_base, arch, share_lm_head=share_lm_head)
    heads = model.heads
    assert heads.num_heads == H
    assert heads.grounded == (arch != "mlp")
    assert (heads.prefix is not None) == (arch == "prefix-mlp")
    assert (heads.lm_heads is None) == share_lm_head
    for i, mlp in enumerate(heads.mlps):
        assert len(mlp.blocks) == L
        first = mlp.blocks[0].linear
        assert first.in_features == ((i + 2) * d if arch != "mlp" else d) and first.out_features == d
        for block in mlp.blocks[1:]:
            assert (block.linear.in_features, block.linear.out_features) == (d, d)
            assert block.res_connection is None
    if not share_lm_head:
        for lm in heads.lm_heads:
            assert lm.weight.shape == (vocab, d) and lm.bias.shape == (vocab,)
            # initialised from the base output layer, zero bias
            assert torch.equal(lm.weight, tiny_base.get_output_embeddings().weight)
            assert torch.count_nonzero(lm.bias) == 0

    out = model(_ids(vocab))
    assert out.base_hidden.shape == (B, S, d)
    assert out.head_hidden.shape == (H, B, S, d)
    for i in range(H):
        logits = model.head_logits(i, out.head_hidden[i])
        assert logits.shape == (B, S, vocab)
        assert torch.isfinite(logits).all()
    assert model.base_logits(out.base_hidden).shape == (B, S, vocab)
    # base_hidden is the state the base output layer reads: the base model's own logits
    ref = tiny_base(_ids(vocab)).logits
    torch.testing.assert_close(model.base_logits(out.base_hidden), ref)


def test_shared_lm_head_uses_base_output_layer(tiny_base, randomize):
    model = _heads(tiny_base, "hydra-mlp", randomize)
    hidden = torch.randn(B, S, tiny_base.config.hidden_size)
    torch.testing.assert_close(model.head_logits(1, hidden), tiny_base.lm_head(hidden))
    # and no vocab-sized parameter is owned by the heads
    assert all(tiny_base.config.vocab_size not in p.shape for p in model.heads.parameters())


def test_fresh_medusa_head_predicts_like_base(tiny_base):
    """Fresh unconditioned heads start at h + silu(b): the base prediction shifted by a constant (W = 0)."""
    model = _heads(tiny_base, "mlp", share_lm_head=False, num_layers=1)
    with torch.no_grad():
        for mlp in model.heads.mlps:
            nn.init.zeros_(mlp.blocks[0].linear.bias)
    out = model(_ids(tiny_base.config.vocab_size))
    for i in range(H):
        torch.testing.assert_close(out.head_hidden[i], out.base_hidden)
        torch.testing.assert_close(
            model.head_logits(i, out.head_hidden[i]), model.base_logits(out.base_hidden)
        )


# --- ResBlock / HeadMLP --------------------------------------------------------------------------------
def test_resblock_zero_init_is_identity_up_to_bias():
    torch.manual_seed(0)
    block = ResBlock(16, 16)
    assert block.res_connection is None
    assert torch.count_nonzero(block.linear.weight) == 0
    x = torch.randn(5, 16)
    # W = 0: the block is x + silu(b), i.e. the identity plus a constant (the paper's code leaves b at its
    # default init; with b = 0 it is exactly the identity).
    torch.testing.assert_close(block(x), x + F.silu(block.linear.bias))
    jac = torch.autograd.functional.jacobian(block, x[0])
    torch.testing.assert_close(jac, torch.eye(16))
    with torch.no_grad():
        block.linear.bias.zero_()
    assert torch.equal(block(x), x)


def test_conditioned_resblock_has_linear_residual():
    torch.manual_seed(0)
    d = 8
    block = ResBlock(3 * d, d)
    assert isinstance(block.res_connection, nn.Linear)
    assert block.res_connection.weight.shape == (d, 3 * d)
    assert torch.count_nonzero(block.linear.weight) == 0
    assert torch.count_nonzero(block.res_connection.weight) > 0  # default (random) init, not zero
    x = torch.randn(4, 3 * d)
    torch.testing.assert_close(block(x), block.res_connection(x) + F.silu(block.linear(x)))


def test_training_forward_skips_the_embeddings_input_gradient(tiny_base, randomize):
    """Hydra++ training: the same loss and parameter gradients as with one product over [c_t, embeddings],
    with less backward arithmetic (the frozen embeddings' input gradient is never computed)."""
    from torch.utils.flop_counter import FlopCounterMode

    vocab, d = tiny_base.config.vocab_size, tiny_base.config.hidden_size
    model = _heads(tiny_base, "prefix-mlp", randomize).train()  # dropout 0: both ways see the same inputs
    heads, embed = model.heads, tiny_base.get_input_embeddings()
    ids, hidden = _ids(vocab), torch.randn(B, S, d, generator=torch.Generator().manual_seed(5))

    def run(concatenated: bool):
        heads.zero_grad(set_to_none=True)
        if concatenated:  # the path decoding takes: one product over the concatenated input
            for mlp in heads.mlps:
                mlp.forward = lambda x, frozen=None, m=mlp: HeadMLP.forward(m, torch.cat([x, frozen], -1))
        with FlopCounterMode(display=False) as flops:
            heads(hidden, ids, embed).square().sum().backward()
        for mlp in heads.mlps:
            mlp.__dict__.pop("forward", None)
        return flops.get_total_flops(), {n: p.grad.clone() for n, p in heads.named_parameters()}

    split_flops, split_grads = run(concatenated=False)
    cat_flops, cat_grads = run(concatenated=True)
    for name, grad in cat_grads.items():
        # fp32, summed in another order: equal to rounding relative to the gradient's scale
        scale = grad.abs().max().item()
        torch.testing.assert_close(split_grads[name], grad, rtol=1e-5, atol=1e-5 * scale, msg=name)
    # Saved per position: the input gradient of two (d x (i+1)d) products in every head's first block.
    saved = sum(2 * 2 * d * (i + 1) * d for i in range(H)) * B * S
    assert cat_flops - split_flops == saved


@pytest.mark.parametrize("arch", ARCHS)
def test_blocks_have_distinct_parameters(tiny_base, arch):
    """Every ResBlock owns its weights (the original `[ResBlock(d)] * n` shared one module across slots)."""
    model = _heads(tiny_base, arch, share_lm_head=False, num_layers=4)
    params = list(model.heads.named_parameters(remove_duplicate=False))
    ptrs = [p.data_ptr() for _, p in params]
    assert len(set(ptrs)) == len(ptrs), "some head parameters share storage"
    blocks = [b for mlp in model.heads.mlps for b in mlp.blocks]
    assert len({id(b) for b in blocks}) == H * 4
    # nothing from the base model is registered inside the heads
    base_ptrs = {p.data_ptr() for p in tiny_base.parameters()}
    assert base_ptrs.isdisjoint(ptrs)
    # training one block leaves the others unchanged
    randomize_block = model.heads.mlps[0].blocks[1]
    with torch.no_grad():
        randomize_block.linear.weight.fill_(0.5)
    assert torch.count_nonzero(model.heads.mlps[0].blocks[2].linear.weight) == 0
    assert torch.count_nonzero(model.heads.mlps[1].blocks[1].linear.weight) == 0


def test_headmlp_dropout_only_in_train_mode():
    torch.manual_seed(0)
    mlp = HeadMLP(8, 8, 2, dropout=0.5)
    with torch.no_grad():
        for b in mlp.blocks:
            b.linear.weight.normal_()
    x = torch.randn(64, 8)
    mlp.eval()
    assert torch.equal(mlp(x), mlp(x))
    mlp.train()
    assert not torch.equal(mlp(x), mlp(x))


@pytest.mark.parametrize("arch", ARCHS)
def test_dropout_only_in_train_mode(tiny_base, randomize, arch):
    torch.manual_seed(0)
    model = _heads(tiny_base, arch, randomize, share_lm_head=False, dropout=0.5)
    plain = _heads(tiny_base, arch, share_lm_head=False, dropout=0.0)
    plain.heads.load_state_dict(model.heads.state_dict())
    ids = _ids(tiny_base.config.vocab_size)

    def logits(m):
        out = m(ids)
        return torch.stack([m.head_logits(i, out.head_hidden[i]) for i in range(H)])

    model.eval()
    a, b = logits(model), logits(model)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, logits(plain))
    model.train()
    assert model.heads.training and not model.base_model.training  # the frozen base never trains
    c, d = logits(model), logits(model)
    assert not torch.equal(c, d)
    assert not torch.allclose(c, a)
    model.eval()
    assert torch.equal(logits(model), a)


def test_noise_alpha_only_in_train_mode(tiny_base, randomize):
    model = _heads(tiny_base, "hydra-mlp", randomize)
    ids = _ids(tiny_base.config.vocab_size)
    ref = model(ids).head_hidden
    assert torch.equal(model(ids, noise_alpha=5.0).head_hidden, ref)
    model.train()
    assert not torch.allclose(model(ids, noise_alpha=5.0).head_hidden, ref)


# --- what each head reads ------------------------------------------------------------------------------
def _perturbed_batch(ids, vocab):
    """(S+1)*B rows: the original ids, then for p = 0..S-1 a copy with token p changed."""
    variants = [ids]
    for p in range(ids.shape[1]):
        v = ids.clone()
        v[:, p] = (v[:, p] + 1 + torch.arange(v.shape[0])) % vocab
        variants.append(v)
    return torch.cat(variants)


def _changes(out, rows):
    """out: (..., (S+1)*B, S, d) from _perturbed_batch -> bool (..., S_perturbed, S_position) as nested lists:
    did perturbing token p change the output at position t (in any batch row)?"""
    out = out.unflatten(-3, (-1, rows))  # (..., S+1, B, S, d)
    diff = (out[..., 1:, :, :, :] - out[..., :1, :, :, :]).abs().amax(dim=-1).amax(dim=-2)
    return (diff > 1e-5).tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_head_dependency_on_tokens_given_fixed_hidden_states(tiny_base, randomize, arch):
    """With the base hidden states fixed, grounded head i at position t reads exactly x_{t+1..t+i+1}.

    Perturbing input token x_p changes head i at position t iff 1 <= p - t <= i + 1 (grounded heads); Medusa
    heads never read tokens at all. The prefix layer reads only the (fixed) hidden states.
    """
    vocab, d = tiny_base.config.vocab_size, tiny_base.config.hidden_size
    model = _heads(tiny_base, arch, randomize)
    heads, embed = model.heads, tiny_base.get_input_embeddings()
    hidden = torch.randn(B, S, d, generator=torch.Generator().manual_seed(3))
    ids = _perturbed_batch(_ids(vocab), vocab)
    with torch.no_grad():
        changes = _changes(heads(hidden.repeat(S + 1, 1, 1), ids, embed), B)
    for i in range(H):
        for p in range(S):
            for t in range(S):
                expect = arch != "mlp" and 1 <= p - t <= i + 1
                assert changes[i][p][t] == expect, f"head {i}, position {t}, perturbed token {p} (k={p - t})"


@pytest.mark.parametrize("arch", ARCHS)
def test_head_dependency_on_hidden_states(tiny_base, randomize, arch):
    """Perturbing h_p changes position t iff p == t (MLP heads) or p <= t (prefix layer: causal attention)."""
    vocab, d = tiny_base.config.vocab_size, tiny_base.config.hidden_size
    model = _heads(tiny_base, arch, randomize)
    heads, embed = model.heads, tiny_base.get_input_embeddings()
    hidden = torch.randn(B, S, d, generator=torch.Generator().manual_seed(3))
    variants = [hidden]
    for p in range(S):
        h2 = hidden.clone()
        h2[:, p] += 0.5
        variants.append(h2)
    with torch.no_grad():
        changes = _changes(heads(torch.cat(variants), _ids(vocab).repeat(S + 1, 1), embed), B)
    for i in range(H):
        for p in range(S):
            for t in range(S):
                expect = p <= t if arch == "prefix-mlp" else p == t
                assert changes[i][p][t] == expect, f"head {i}, position {t}, perturbed h_{p}"


@pytest.mark.parametrize("arch", ARCHS)
def test_no_dependency_on_later_tokens_through_base(tiny_base, randomize, arch):
    """End to end (hidden states from the base model): head i at t never reads tokens beyond t+i+1 (beyond t
    for Medusa heads), and does read x_t (through the base model)."""
    vocab = tiny_base.config.vocab_size
    model = _heads(tiny_base, arch, randomize)
    with torch.no_grad():
        out = model(_perturbed_batch(_ids(vocab), vocab))
    base_changes = _changes(out.base_hidden, B)
    head_changes = _changes(out.head_hidden, B)
    for p in range(S):
        assert base_changes[p] == [t >= p for t in range(S)]
        for i in range(H):
            reach = i + 1 if arch != "mlp" else 0  # head i reads up to x_{t+reach}
            for t in range(S):
                if p > t + reach:
                    assert not head_changes[i][p][t], f"head {i} at {t} depends on later token {p}"
                elif p == t:
                    assert head_changes[i][p][t], f"head {i} at {t} ignores x_t"


def test_training_forward_matches_per_head_calls(tiny_base, randomize):
    """DraftHeads.forward (teacher forcing, all heads at once) == head_hidden with explicit path inputs."""
    vocab, d = tiny_base.config.vocab_size, tiny_base.config.hidden_size
    model = _heads(tiny_base, "prefix-mlp", randomize)
    heads, embed = model.heads, tiny_base.get_input_embeddings()
    ids = _ids(vocab)
    hidden = torch.randn(B, S, d, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = heads(hidden, ids, embed)
        ctx = heads.context(hidden)
        e = embed(ids)
        for i in range(H):
            for t in range(S - i - 1):
                path = torch.cat([e[:, t + j + 1] for j in range(i + 1)], dim=-1)
                torch.testing.assert_close(heads.head_hidden(i, ctx[:, t], path), out[i][:, t])


def test_prefix_reads_next_token(tiny_base, randomize):
    """prefix_reads_next_token: W starts at zero, so the heads equal the same heads without it; once W is
    trained, c_t depends on x_{t+1} but not on x_{t+2}, and the training forward still equals explicit calls
    with e(x_{t+1}) passed per position."""
    vocab, d = tiny_base.config.vocab_size, tiny_base.config.hidden_size
    plain = _heads(tiny_base, "prefix-mlp", randomize)
    config = HydraConfig(hydra_num_heads=H, hydra_num_layers=L, hydra_head_arch="prefix-mlp",
                         prefix_reads_next_token=True)
    reads = HydraModel(tiny_base, config).eval()
    assert not reads.heads.prefix.next_token_proj.weight.any()
    missing, unexpected = reads.heads.load_state_dict(plain.heads.state_dict(), strict=False)
    assert missing == ["prefix.next_token_proj.weight"] and not unexpected
    embed = tiny_base.get_input_embeddings()
    ids = _ids(vocab)
    hidden = torch.randn(B, S, d, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(reads.heads(hidden, ids, embed), plain.heads(hidden, ids, embed))
        reads.heads.prefix.next_token_proj.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(6))
        t = 5
        for changed, affects in ((t + 1, True), (t + 2, False)):
            other = ids.clone()
            other[:, changed] = (other[:, changed] + 1) % vocab
            ctx = [reads.heads.context(hidden, next_embeds=F.pad(embed(x)[:, 1:], (0, 0, 0, 1)))
                   for x in (ids, other)]
            assert torch.equal(ctx[0][:, :t], ctx[1][:, :t])  # earlier positions never see it
            assert (not torch.allclose(ctx[0][:, t], ctx[1][:, t])) == affects, changed
        out = reads.heads(hidden, ids, embed)
        ctx = reads.heads.context(hidden, next_embeds=F.pad(embed(ids)[:, 1:], (0, 0, 0, 1)))
        e = embed(ids)
        for i in range(H):
            for t in range(S - i - 1):
                path = torch.cat([e[:, t + j + 1] for j in range(i + 1)], dim=-1)
                torch.testing.assert_close(reads.heads.head_hidden(i, ctx[:, t], path), out[i][:, t])
    with pytest.raises(ValueError, match="pass next_embeds"):
        reads.heads.context(hidden)
    with pytest.raises(ValueError, match="prefix_reads_next_token needs hydra_head_arch 'prefix-mlp'"):
        HydraConfig(hydra_head_arch="hydra-mlp", prefix_reads_next_token=True)


def test_prefix_extra_layers_start_as_the_identity(tiny_base, randomize):
    """prefix_num_layers=2: the second decoder layer starts with zero output projections, so heads loaded
    from one-layer heads give exactly their outputs; once it is trained, the heads change."""
    vocab, d = tiny_base.config.vocab_size, tiny_base.config.hidden_size
    plain = _heads(tiny_base, "prefix-mlp", randomize)
    config = HydraConfig(hydra_num_heads=H, hydra_num_layers=L, hydra_head_arch="prefix-mlp",
                         prefix_num_layers=2)
    deep = HydraModel(tiny_base, config).eval()
    assert len(deep.heads.prefix.extra_layers) == 1 and not plain.heads.prefix.extra_layers
    assert not any(k.startswith("prefix.extra_layers.") for k in plain.heads.state_dict())
    missing, unexpected = deep.heads.load_state_dict(plain.heads.state_dict(), strict=False)
    assert missing and all(k.startswith("prefix.extra_layers.0.") for k in missing) and not unexpected
    embed = tiny_base.get_input_embeddings()
    ids = _ids(vocab)
    hidden = torch.randn(B, S, d, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(deep.heads(hidden, ids, embed), plain.heads(hidden, ids, embed))
        randomize(deep.heads.prefix.extra_layers)
        assert not torch.allclose(deep.heads(hidden, ids, embed), plain.heads(hidden, ids, embed))
    with pytest.raises(ValueError, match="prefix_num_layers needs hydra_head_arch 'prefix-mlp'"):
        HydraConfig(hydra_head_arch="hydra-mlp", prefix_num_layers=2)
    with pytest.raises(ValueError, match="prefix_num_layers must be >= 1"):
        HydraConfig(hydra_head_arch="prefix-mlp", prefix_num_layers=0)


@pytest.mark.parametrize("option", [dict(feature_layers=[0, 1]), dict(prefix_reads_next_token=True)])
def test_options_that_start_as_no_ops_leave_the_other_weights_init_alone(tiny_base, option):
    """With the same seed, fresh heads with and without such an option start from the same other weights, so
    an A/B of the option from scratch differs in the option only."""
    def fresh(**extra):
        torch.manual_seed(0)
        config = HydraConfig(hydra_num_heads=H, hydra_num_layers=L, hydra_head_arch="prefix-mlp", **extra)
        return HydraModel(tiny_base, config).heads.state_dict()

    plain, with_option = fresh(), fresh(**option)
    assert set(plain) < set(with_option)
    for name, value in plain.items():
        assert torch.equal(value, with_option[name]), name


@pytest.mark.parametrize("arch", ["hydra-mlp", "prefix-mlp"])
def test_feature_fusion_starts_as_the_identity(tiny_base, randomize, arch):
    """feature_layers: the heads read [h_final, h_0, h_1] fused by W = [I | 0 | 0] at first, so heads loaded
    from heads without fusion give exactly their outputs; once W reads the earlier layers, they matter. The
    base model's forward hands the heads exactly those states (heads_input)."""
    from hydra.model.hydra_model import heads_input

    vocab, d = tiny_base.config.vocab_size, tiny_base.config.hidden_size
    plain = _heads(tiny_base, arch, randomize)
    config = HydraConfig(hydra_num_heads=H, hydra_num_layers=L, hydra_head_arch=arch, feature_layers=[0, 1])
    fused = HydraModel(tiny_base, config).eval()
    missing, unexpected = fused.heads.load_state_dict(plain.heads.state_dict(), strict=False)
    assert missing == ["fuse.proj.weight"] and not unexpected
    embed = tiny_base.get_input_embeddings()
    ids = _ids(vocab)
    with torch.no_grad():
        out = fused.decoder(input_ids=ids, output_hidden_states=True)
        feats, final = fused.base_features(ids)
        assert feats.shape == (B, S, 3 * d) and torch.equal(final, out.last_hidden_state)
        assert torch.equal(feats, heads_input(out, config))
        assert torch.equal(feats[..., d:2 * d], out.hidden_states[0])  # the input embeddings
        torch.testing.assert_close(fused.heads(feats, ids, embed), plain.heads(final, ids, embed))
        fused.heads.fuse.proj.weight[:, d:].normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
        assert not torch.allclose(fused.heads(feats, ids, embed), plain.heads(final, ids, embed))
    with pytest.raises(ValueError, match=r"feature_layers \[2\] are not inside the base model"):
        HydraModel(tiny_base, HydraConfig(hydra_head_arch=arch, feature_layers=[0, 2]))
    with pytest.raises(ValueError, match="feature_layers must be distinct layer indices"):
        HydraConfig(feature_layers=[1, 1])


@pytest.mark.parametrize("num_layers", [1, 2])
def test_prefix_layer_cache_matches_full_pass(tiny_base, randomize, num_layers):
    """Feeding the prefix layer chunk by chunk through its own cache == one pass over the whole prefix."""
    layer = randomize(PrefixLayer(tiny_base.config, num_layers=num_layers))
    d = tiny_base.config.hidden_size
    hidden = torch.randn(1, S, d, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = layer(hidden, torch.arange(S)[None])
        cache = layer.new_cache()
        parts, start = [], 0
        for n in (5, 1, 4, 2):
            parts.append(layer(hidden[:, start : start + n], torch.arange(start, start + n)[None], cache))
            start += n
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == S


def test_draft_heads_hold_no_base_weights(tiny_base):
    heads = DraftHeads(HydraConfig(hydra_num_heads=2, hydra_head_arch="prefix-mlp"), tiny_base.config)
    names = [n for n, _ in heads.named_parameters()]
    assert not any("embed_tokens" in n for n in names)
    assert heads.lm_heads is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_mask(dtype):
    """The cheap CPU mask drops each element independently with probability p (within 5 standard errors over
    10^6 elements, in each of the four 16-bit lanes of a 64-bit draw and for neighbouring pairs), scales the
    rest by 1/(1-p), passes gradients through the same mask, and is the identity in eval mode."""
    from hydra.model.heads.dropout import Dropout

    torch.manual_seed(0)
    p, n = 0.2, 1_000_000
    layer = Dropout(p).train()
    x = torch.ones(n, dtype=dtype, requires_grad=True)
    y = layer(x)
    kept = y.detach() != 0
    assert torch.allclose(y.detach()[kept].float(), torch.tensor(1 / (1 - p)), rtol=1e-2)
    se = (p * (1 - p) / (n / 4)) ** 0.5
    for lane in range(4):
        assert abs((~kept[lane::4]).float().mean().item() - p) < 5 * se
    both = (~kept[0::2] & ~kept[1::2]).float().mean().item()  # independence of neighbours
    assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / (n / 2)) ** 0.5
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)
    assert torch.equal(Dropout(p).eval()(x.detach()), x.detach())
    assert not torch.equal(layer(x.detach()) != 0, kept)  # a new mask per call
