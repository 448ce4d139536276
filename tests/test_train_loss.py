"""hydra/train/loss.py and schedule.py: chunked loss == unchunked reference, packed-boundary mask, schedules,
and a few optimizer steps lowering the loss for every head arch and both loss kinds."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from hydra.model import HydraConfig, HydraModel
from hydra.train.loss import STAT_FIELDS, count_targets, hydra_loss, summarize, target_mask
from hydra.train.schedule import lr_multiplier

ARCHS = ["mlp", "hydra-mlp", "prefix-mlp"]
H = 3


def _model(base, arch, share_lm_head=True, randomize=None, dropout=0.0):
    cfg = HydraConfig(hydra_num_heads=H, hydra_num_layers=1, hydra_head_arch=arch,
                      share_lm_head=share_lm_head,
                      dropout_rate=dropout)
    torch.manual_seed(0)
    model = HydraModel(base, cfg)
    if randomize is not None:
        randomize(model.heads, scale=0.1)
    return model.train()


def _packed_batch(vocab, lengths_per_row, seed=0, label_frac=0.7):
    """Packed rows: labels on ~label_frac of the tokens, position_ids restarting per conversation."""
    gen = torch.Generator().manual_seed(seed)
    width = max(sum(r) for r in lengths_per_row)
    ids, labels, pos = [], [], []
    for row in lengths_per_row:
        p = [q for n in row for q in range(n)]
        p += list(range(width - len(p)))  # padding = its own "conversation", unlabelled
        x = torch.randint(0, vocab, (width,), generator=gen)
        lab = torch.where(torch.rand(width, generator=gen) < label_frac, x, torch.full_like(x, -100))
        lab[sum(row):] = -100
        ids.append(x), labels.append(lab), pos.append(torch.tensor(p))
    return torch.stack(ids), torch.stack(labels), torch.stack(pos)


def reference_loss(model, head_hidden, teacher_hidden, labels, position_ids, lm_w, t_w, f_w=0.0,
                   temperature=1.0):
    """The original's formulation on full (B, S, V) logits, plus the packed-conversation mask; with f_w,
    EAGLE's smooth-L1 feature regression onto the base's final hidden state, averaged over the hidden
    dimension"""
    total = 0.0
    t_probs = F.softmax(model.base_logits(teacher_hidden).float() / temperature, dim=-1)
    for i in range(head_hidden.shape[0]):
        s = i + 2
        z = model.head_logits(i, head_hidden[i]).float()[:, :-s]
        y = labels[:, s:]
        q = t_probs[:, s - 1:-1]
        m = (y != -100) & (position_ids[:, s:] == position_ids[:, :-s] + s)
        logp = F.log_softmax(z, dim=-1)
        lm = -logp[m].gather(1, y[m][:, None]).mean()
        teacher = -(q[m] * logp[m]).sum(-1).mean()
        g, target = head_hidden[i][:, :-s][m].float(), teacher_hidden[:, s - 1:-1][m].float()
        feature = F.smooth_l1_loss(g, target, reduction="none").mean(-1).mean()
        total = total + lm_w * lm + t_w * teacher + f_w * feature
    return total


def _assert_grads_close(grads, ref_grads):
    """Parameter gradients equal the reference's; a parameter the reference does not reach gets none."""
    for g, r in zip(grads, ref_grads, strict=True):
        if r is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("share_lm_head", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_equals_reference(tiny_base, randomize, arch, share_lm_head):
    model = _model(tiny_base, arch, share_lm_head, randomize)
    vocab = tiny_base.config.vocab_size
    ids, labels, pos = _packed_batch(vocab, [[5, 9, 3], [11, 4]])
    lm_w, t_w = 0.7, 1.3
    out = model(ids, position_ids=pos)
    params = [p for p in model.heads.parameters() if p.requires_grad]

    ref = reference_loss(model, out.head_hidden, out.base_hidden, labels, pos, lm_w, t_w)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    for chunk in (1, 5, 7, 64):
        out = model(ids, position_ids=pos)
        loss, stats = hydra_loss(model, out.head_hidden, labels, pos, out.base_hidden, lm_w, t_w,
                                 chunk_size=chunk)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        torch.testing.assert_close(loss, ref.float(), rtol=1e-5, atol=1e-5)
        _assert_grads_close(grads, ref_grads)
        assert stats.shape == (H, len(STAT_FIELDS))


@pytest.mark.parametrize("arch", ARCHS)
def test_feature_loss_and_teacher_temperature_equal_reference(tiny_base, randomize, arch):
    model = _model(tiny_base, arch, randomize=randomize)
    ids, labels, pos = _packed_batch(tiny_base.config.vocab_size, [[5, 9, 3], [11, 4]])
    params = [p for p in model.heads.parameters() if p.requires_grad]
    lm_w, t_w, f_w, temp = 0.3, 1.0, 2.0, 0.5
    out = model(ids, position_ids=pos)
    ref = reference_loss(model, out.head_hidden, out.base_hidden, labels, pos, lm_w, t_w, f_w, temp)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    plain = reference_loss(model, out.head_hidden, out.base_hidden, labels, pos, lm_w, t_w)
    assert abs(ref.item() - plain.item()) > 1e-2  # both options change the loss
    for chunk in (1, 7, 64):
        out = model(ids, position_ids=pos)
        loss, stats = hydra_loss(model, out.head_hidden, labels, pos, out.base_hidden, lm_w, t_w,
                                 chunk_size=chunk, feature_weight=f_w, teacher_temperature=temp)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        torch.testing.assert_close(loss, ref.float(), rtol=1e-5, atol=1e-5)
        _assert_grads_close(grads, ref_grads)
    m = summarize(stats, lm_w, t_w, f_w)
    assert math.isclose(m["loss"], loss.item(), rel_tol=1e-5)
    assert all(m[f"head{i}_feature_loss"] > 0 for i in range(H))
    with pytest.raises(ValueError, match="teacher_temperature"):
        hydra_loss(model, out.head_hidden, labels, pos, out.base_hidden, lm_w, t_w, teacher_temperature=0.0)


def test_head_weights_scale_each_head(tiny_base, randomize):
    """head_weights w: the loss is sum_i w_i loss_i, and a head of weight 0 gets no gradient."""
    model = _model(tiny_base, "hydra-mlp", randomize=randomize)
    ids, labels, pos = _packed_batch(tiny_base.config.vocab_size, [[12, 9], [16]], seed=6)
    weights = [2.0, 0.0, 0.5]
    with torch.no_grad():
        out = model(ids, position_ids=pos)
        _, st = hydra_loss(model, out.head_hidden, labels, pos, out.base_hidden, 1.0, 1.0)
    per_head = summarize(st, 1.0, 1.0)
    out = model(ids, position_ids=pos)
    loss, st = hydra_loss(model, out.head_hidden, labels, pos, out.base_hidden, 1.0, 1.0, chunk_size=5,
                          head_weights=weights)
    want = sum(w * per_head[f"head{i}_loss"] for i, w in enumerate(weights))
    assert math.isclose(loss.item(), want, rel_tol=1e-5)
    assert math.isclose(summarize(st, 1.0, 1.0, head_weights=weights)["loss"], want, rel_tol=1e-5)
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.heads.mlps[1].parameters())
    assert all(p.grad is not None and p.grad.any() for p in model.heads.mlps[0].parameters())


def draft_reference(model, head_hidden, teacher_hidden, labels, position_ids, lm_w, t_w, vocab):
    """Loss over a draft vocabulary on full tensors: teacher renormalised over `vocab`, out-of-vocabulary data
    targets dropped from the data loss but kept in the per-head count."""
    total = 0.0
    t_probs = F.softmax(model.base_logits(teacher_hidden).float()[..., vocab], dim=-1)
    col = {int(t): j for j, t in enumerate(vocab)}
    for i in range(head_hidden.shape[0]):
        s = i + 2
        z = model.head_logits(i, head_hidden[i]).float()[:, :-s, vocab]
        y = labels[:, s:]
        q = t_probs[:, s - 1:-1]
        m = (y != -100) & (position_ids[:, s:] == position_ids[:, :-s] + s)
        logp = F.log_softmax(z, dim=-1)[m]
        ys = y[m].tolist()
        lm = sum(-logp[k, col[t]] for k, t in enumerate(ys) if t in col) / len(ys)
        teacher = -(q[m] * logp).sum(-1).mean()
        total = total + lm_w * lm + t_w * teacher
    return total


@pytest.mark.parametrize("share_lm_head", [True, False])
@pytest.mark.parametrize("arch", ["hydra-mlp", "prefix-mlp"])
def test_draft_vocab_loss_equals_reference(tiny_base, randomize, arch, share_lm_head):
    model = _model(tiny_base, arch, share_lm_head, randomize)
    V = tiny_base.config.vocab_size
    vocab = torch.randperm(V, generator=torch.Generator().manual_seed(5))[: V // 3]
    ids, labels, pos = _packed_batch(V, [[5, 9, 3], [11, 4]])
    assert not torch.isin(labels[labels >= 0], vocab).all()  # some targets are out of the draft vocabulary
    lm_w, t_w = 0.7, 1.3
    params = [p for p in model.heads.parameters() if p.requires_grad]
    out = model(ids, position_ids=pos)
    ref = draft_reference(model, out.head_hidden, out.base_hidden, labels, pos, lm_w, t_w, vocab)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    out = model(ids, position_ids=pos)
    loss, stats = hydra_loss(model, out.head_hidden, labels, pos, out.base_hidden, lm_w, t_w, chunk_size=7,
                             vocab=vocab, topk=True)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    torch.testing.assert_close(loss, ref.float(), rtol=1e-5, atol=1e-5)
    _assert_grads_close(grads, ref_grads)
    # Accuracy: predictions are draft-vocabulary ids; out-of-vocabulary targets are misses in the same count.
    with torch.no_grad():
        out = model(ids, position_ids=pos)
        _, full = hydra_loss(model, out.head_hidden, labels, pos, out.base_hidden, lm_w, t_w, topk=True)
    col = {name: k for k, name in enumerate(STAT_FIELDS)}
    torch.testing.assert_close(stats[:, col["count"]], full[:, col["count"]])
    for i in range(H):
        s = i + 2
        m = target_mask(labels, pos, H)[i]
        z = model.head_logits(i, out.head_hidden[i])[m][:, vocab]
        want = (vocab[z.argmax(-1)] == labels[:, s:][m[:, :-s]]).sum()
        assert stats[i, col["top1"]] == want
    assert (stats[:, col["teacher_top1"]] == -1).all()  # the full teacher argmax only with teacher_metrics


def test_loss_scaling_and_normalizer(tiny_base, randomize):
    """backward of c * loss gives c * grads; an explicit normaliser divides each head's sum by it."""
    model = _model(tiny_base, "hydra-mlp", randomize=randomize)
    ids, labels, pos = _packed_batch(tiny_base.config.vocab_size, [[8, 8], [16]], seed=3)
    counts = count_targets(labels, pos, H)
    out = model(ids, position_ids=pos)
    loss, _ = hydra_loss(model, out.head_hidden, labels, pos, out.base_hidden, 1.0, 0.0, chunk_size=4)
    out2 = model(ids, position_ids=pos)
    loss2, _ = hydra_loss(model, out2.head_hidden, labels, pos, out2.base_hidden, 1.0, 0.0, chunk_size=4,
                          normalizer=2 * counts)
    torch.testing.assert_close(loss2, loss / 2)
    p = model.heads.mlps[1].blocks[0].res_connection.weight
    (g1,) = torch.autograd.grad(3.0 * loss, [p])
    (g2,) = torch.autograd.grad(loss2, [p])
    torch.testing.assert_close(g1, 6.0 * g2, rtol=1e-5, atol=1e-7)


def test_mask_respects_packed_boundaries():
    # row: conversation A (positions 0..4) then B (0..3); every token labelled
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    labels = torch.arange(9)[None]
    mask = target_mask(labels, pos, num_heads=2)
    # head 0 (shift 2): t -> t+2 must stay inside A (t <= 2) or inside B (t in 5..6)
    assert mask[0, 0].tolist() == [True, True, True, False, False, True, True, False, False]
    # head 1 (shift 3): A: t <= 1; B: t == 5
    assert mask[1, 0].tolist() == [True, True, False, False, False, True, False, False, False]
    labels2 = labels.clone()
    labels2[0, 2] = -100  # an unlabelled (prompt) target is never scored
    assert not target_mask(labels2, pos, 2)[0, 0, 0]
    assert count_targets(labels, pos, 2).tolist() == [5, 3]


def test_packed_row_equals_separate_conversations(tiny_base, randomize):
    """A packed row (position_ids restarting) gives the same base hidden states, head states and loss
    statistics as each conversation run alone (transformers builds the block-diagonal mask from the position
    resets)."""
    model = _model(tiny_base, "prefix-mlp", randomize=randomize).eval()
    vocab = tiny_base.config.vocab_size
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randint(0, vocab, (1, 9), generator=gen), torch.randint(0, vocab, (1, 6), generator=gen)
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(9), torch.arange(6)])[None]
    with torch.no_grad():
        out = model(packed, position_ids=pos)
        oa, ob = model(a), model(b)
        torch.testing.assert_close(out.base_hidden[:, :9], oa.base_hidden, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.base_hidden[:, 9:], ob.base_hidden, rtol=1e-5, atol=1e-5)
        # heads: grounded inputs past the end of a conversation differ, but every scored position agrees
        _, st = hydra_loss(model, out.head_hidden, packed, pos, out.base_hidden, 1.0, 1.0, topk=True)
        _, sa = hydra_loss(model, oa.head_hidden, a, None, oa.base_hidden, 1.0, 1.0, topk=True)
        _, sb = hydra_loss(model, ob.head_hidden, b, None, ob.base_hidden, 1.0, 1.0, topk=True)
    torch.testing.assert_close(st, sa + sb, rtol=1e-5, atol=1e-4)


def test_summarize_and_metrics_ranges(tiny_base, randomize):
    model = _model(tiny_base, "hydra-mlp", randomize=randomize).eval()
    ids, labels, pos = _packed_batch(tiny_base.config.vocab_size, [[10, 10]], seed=2)
    with torch.no_grad():
        out = model(ids, position_ids=pos)
        loss, st = hydra_loss(model, out.head_hidden, labels, pos, out.base_hidden, 1.0, 0.5, topk=True,
                              teacher_metrics=True)
    m = summarize(st, 1.0, 0.5, prefix="eval_")
    assert math.isclose(m["eval_loss"], loss.item(), rel_tol=1e-5)
    for i in range(H):
        for k in ("top1", "top5", "teacher_top1", "teacher_top5"):
            assert 0.0 <= m[f"eval_head{i}_{k}"] <= 1.0
        assert m[f"eval_head{i}_top5"] >= m[f"eval_head{i}_top1"]
    # training mode without teacher: no teacher metrics reported
    with torch.no_grad():
        _, st2 = hydra_loss(model, out.head_hidden, labels, pos, None, 1.0, 0.0)
    assert not any("teacher" in k or "top5" in k for k in summarize(st2, 1.0, 0.0))


@pytest.mark.parametrize("loss_kind", ["lm", "teacher"])
@pytest.mark.parametrize("arch", ARCHS)
def test_few_steps_lower_the_loss(tiny_base, arch, loss_kind):
    """Fresh heads (their real init), a few AdamW steps on a fixed batch: the loss of every head goes down."""
    model = _model(tiny_base, arch)
    lm_w, t_w = (1.0, 0.0) if loss_kind == "lm" else (0.0, 1.0)
    ids, labels, pos = _packed_batch(tiny_base.config.vocab_size, [[12, 20], [32]], seed=1)
    opt = torch.optim.AdamW(model.heads.parameters(), lr=3e-3)

    def per_head():
        with torch.no_grad():
            out = model(ids, position_ids=pos)
            _, st = hydra_loss(model, out.head_hidden, labels, pos, out.base_hidden, lm_w, t_w)
        return [summarize(st, lm_w, t_w)[f"head{i}_loss"] for i in range(H)]

    before = per_head()
    for _ in range(8):
        out = model(ids, position_ids=pos)
        loss, _ = hydra_loss(model, out.head_hidden, labels, pos, out.base_hidden, lm_w, t_w, chunk_size=16)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = per_head()
    assert all(a < b for a, b in zip(after, before, strict=True)), (before, after)


def test_bf16_autocast_close_to_fp32(tiny_base, randomize):
    model = _model(tiny_base, "hydra-mlp", randomize=randomize)
    ids, labels, pos = _packed_batch(tiny_base.config.vocab_size, [[16, 16]], seed=4)
    out = model(ids, position_ids=pos)
    ref, _ = hydra_loss(model, out.head_hidden, labels, pos, out.base_hidden, 1.0, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, position_ids=pos)
        loss, _ = hydra_loss(model, out.head_hidden, labels, pos, out.base_hidden, 1.0, 1.0, chunk_size=8)
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.heads.parameters())
    assert abs(loss.item() - ref.item()) < 0.05 * ref.item()


def test_schedules():
    kw = dict(total_steps=110, warmup_steps=10)
    assert lr_multiplier(0, **kw) == 0.0 and lr_multiplier(5, **kw) == 0.5
    assert lr_multiplier(10, kind="cosine", final_lr_multiplier=0.33, **kw) == pytest.approx(1.0)
    mid = lr_multiplier(60, kind="cosine", final_lr_multiplier=0.33, **kw)
    assert mid == pytest.approx(0.33 + 0.67 * 0.5)
    assert lr_multiplier(110, kind="cosine", final_lr_multiplier=0.33, **kw) == pytest.approx(0.33)
    assert lr_multiplier(60, kind="linear", final_lr_multiplier=0.0, **kw) == pytest.approx(0.5)
    assert lr_multiplier(110, kind="linear", final_lr_multiplier=0.2, **kw) == pytest.approx(0.2)
    assert lr_multiplier(100, kind="constant", **kw) == 1.0
    assert lr_multiplier(3, kind="constant_with_warmup", **kw) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        lr_multiplier(0, 10, kind="cosine", final_lr_multiplier=1.5)
    with pytest.raises(ValueError):
        lr_multiplier(0, 10, kind="polynomial")
