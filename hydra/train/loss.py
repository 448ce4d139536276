"""The Hydra training loss, computed in chunks: no (heads x batch x seq x vocab) tensor ever exists.

Conventions (digest §3.4): head i (shift s = i + 2) at position t is scored against token x_{t+s}:
  data loss     CE(z_i(t), x_{t+s})                                                     x lm_weight
  teacher loss  -sum_v q_v log softmax(z_i(t))_v, q = softmax(base logits at t+s-1 / T)   x teacher_weight
  feature loss  mean_d smooth_l1(g_i(t) - h_{t+s-1})                                      x feature_weight
over positions whose target is an assistant token (labels != -100) and lies in the same packed conversation as
t (position_ids count up by exactly s from t to t+s). Each head's loss is a mean over its scored tokens; heads
are summed uniformly, as in the paper, unless `head_weights` are given (e.g. to favour the depths a tree
uses). T (`teacher_temperature`, 1 by default) below 1 sharpens the teacher towards its argmax, the token
greedy verification accepts. The feature loss is EAGLE's regression target: g_i(t) is head i's hidden state
(what the output layer reads) and h_{t+s-1} the base's final hidden state whose projection is the teacher
distribution, so with a shared output layer a head that matches the feature matches the teacher exactly
(smooth L1 with beta 1, averaged over the hidden dimension as EAGLE does).

How: positions are flattened to (B*S) and walked in chunks. Per chunk the teacher log-probs are computed once
(only at the positions some head needs) and shared by all heads; each head's logits are computed for its
scored positions only, in fp32 from the (possibly bf16) logits. The gradient with respect to the head hidden
states (and the heads' own output layers, if any) is computed chunk by chunk inside a custom autograd
Function, so the caller does one ordinary backward (works with plain loops, DDP and DeepSpeed alike) and peak
memory is a few (chunk x vocab) tensors.

Draft vocabulary (`vocab`, the token ids the heads propose from at inference): the heads' and the teacher's
logits are computed over those rows of the output layer only (8,192 of 49,152 for the default model, so the
dominant projection costs 6x less). The teacher distribution q is the base model's softmax renormalised over
the draft vocabulary (the base logits restricted to it), so the teacher loss is a soft CE between two
distributions on the same support. A data-loss target outside the draft vocabulary cannot be drafted at
inference: it adds nothing to the loss (the per-head normaliser still counts it) and counts as a miss in
top-1/top-5, so accuracies stay comparable with a full-vocabulary run (predictions are mapped back to token
ids). teacher_top1/top5 compare with the teacher's argmax over the full vocabulary; that needs the full
teacher projection, which is done only when `teacher_metrics` is asked (evaluation), else they read -1.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

IGNORE_INDEX = -100

# Columns of the per-head statistics tensor (H, len(STAT_FIELDS)), float64 sums: all-reduce them, then divide.
STAT_FIELDS = ("count", "lm_loss", "teacher_loss", "feature_loss", "top1", "top5", "teacher_top1",
               "teacher_top5")
_COL = {name: k for k, name in enumerate(STAT_FIELDS)}


def new_stats(num_heads: int, device: torch.device | str) -> torch.Tensor:
    """An empty per-head statistics tensor (num_heads, len(STAT_FIELDS)) of float64 sums."""
    return torch.zeros(num_heads, len(STAT_FIELDS), dtype=torch.float64, device=device)


def target_mask(labels: torch.Tensor, position_ids: torch.Tensor | None, num_heads: int) -> torch.Tensor:
    """(H, B, S) bool: head i at position t is scored iff labels[t+i+2] != -100 and t+i+2 is in t's
    conversation.

    Packed rows restart position_ids at 0 for every conversation; inside one conversation they count up by
    one, so x_{t+s} belongs to t's conversation exactly when position_ids[t+s] == position_ids[t] + s (after a
    reset, position_ids[t+s] <= s-1 < position_ids[t] + s). None means one conversation per row.
    """
    B, S = labels.shape
    if position_ids is None:
        position_ids = torch.arange(S, device=labels.device).expand(B, S)
    position_ids = position_ids.expand(B, S)
    mask = torch.zeros(num_heads, B, S, dtype=torch.bool, device=labels.device)
    for i in range(num_heads):
        s = i + 2
        if s >= S:
            continue
        same = position_ids[:, s:] == position_ids[:, :-s] + s
        mask[i, :, :-s] = same & (labels[:, s:] != IGNORE_INDEX)
    return mask


def count_targets(labels: torch.Tensor, position_ids: torch.Tensor | None, num_heads: int) -> torch.Tensor:
    """(H,) number of scored tokens per head: the per-head normaliser of the loss."""
    return target_mask(labels, position_ids, num_heads).sum(dim=(1, 2))


def summarize(stats: torch.Tensor, lm_weight: float, teacher_weight: float, feature_weight: float = 0.0,
              head_weights: list[float] | None = None, prefix: str = "") -> dict[str, float]:
    """Turn summed statistics (H, len(STAT_FIELDS)) into means: loss, per-head losses and top-k accuracies."""
    out: dict[str, float] = {}
    total = 0.0
    stats = stats.double().cpu()
    for i in range(stats.shape[0]):
        n = stats[i, _COL["count"]].item()
        if n == 0:
            continue
        lm = stats[i, _COL["lm_loss"]].item() / n
        teacher = stats[i, _COL["teacher_loss"]].item() / n
        feature = stats[i, _COL["feature_loss"]].item() / n
        loss = lm_weight * lm + teacher_weight * teacher + feature_weight * feature
        total += loss * (head_weights[i] if head_weights else 1.0)
        out[f"{prefix}head{i}_loss"] = loss
        out[f"{prefix}head{i}_lm_loss"] = lm
        # -1 marks "teacher not computed" (training with the data loss only)
        if stats[i, _COL["teacher_top1"]].item() >= 0:
            out[f"{prefix}head{i}_teacher_loss"] = teacher
        if feature_weight:
            out[f"{prefix}head{i}_feature_loss"] = feature
        for field in ("top1", "top5", "teacher_top1", "teacher_top5"):
            value = stats[i, _COL[field]].item()
            if value >= 0:
                out[f"{prefix}head{i}_{field}"] = value / n
    out[f"{prefix}loss"] = total
    out[f"{prefix}scored_tokens"] = float(stats[:, _COL["count"]].max().item()) if stats.numel() else 0.0
    return out


class _Runner:
    """Walks the chunks once: loss value, statistics, and (optionally) the gradients."""

    def __init__(self, model, labels, position_ids, teacher_hidden, lm_weight, teacher_weight, normalizer,
                 chunk_size, topk, teacher_metrics, params, vocab=None, feature_weight=0.0,
                 teacher_temperature=1.0, head_weights=None):
        self.model = model
        self.labels = labels
        self.position_ids = position_ids
        self.teacher_hidden = teacher_hidden
        self.lm_weight = float(lm_weight)
        self.teacher_weight = float(teacher_weight)
        self.feature_weight = float(feature_weight)
        if teacher_temperature <= 0:
            raise ValueError(f"teacher_temperature must be > 0, got {teacher_temperature}")
        self.teacher_temperature = float(teacher_temperature)
        self.head_weights = None if head_weights is None else [float(w) for w in head_weights]
        self.normalizer = normalizer
        self.chunk_size = max(1, int(chunk_size))
        self.topk = topk
        self.use_teacher = self.teacher_weight != 0.0 or teacher_metrics
        self.params = params  # per head: list of trainable parameters of that head's own output layer
        self.vocab = vocab  # draft vocabulary (token ids) or None for the whole vocabulary
        # Teacher argmax over the full vocabulary: free without a draft vocabulary, one extra projection with.
        self.teacher_argmax = self.use_teacher and (vocab is None or teacher_metrics)

    def __call__(self, head_hidden: torch.Tensor, need_grad: bool):
        model, labels = self.model, self.labels
        H, B, S, d = head_hidden.shape
        N = B * S
        device = head_hidden.device
        hidden = head_hidden.detach().reshape(H, N, d)
        valid = target_mask(labels, self.position_ids, H).reshape(H, N)
        flat_labels = labels.reshape(N)
        if self.use_teacher or self.feature_weight:
            if self.teacher_hidden is None:
                raise ValueError("the teacher and feature losses / metrics need teacher_hidden "
                                 "(the base model's final hidden states)")
            teacher_flat = self.teacher_hidden.detach().reshape(N, -1)
        counts = valid.sum(dim=1)
        norm = (counts if self.normalizer is None else self.normalizer.to(device)).double().clamp_min(1)
        scale = [w / n for w, n in zip(self.head_weights or [1.0] * H, norm.tolist(), strict=True)]

        stats = new_stats(H, device)
        stats[:, _COL["count"]] = counts.double()
        if not self.topk:
            stats[:, _COL["top5"]] = -1
            stats[:, _COL["teacher_top5"]] = -1
        if not self.teacher_argmax:
            stats[:, _COL["teacher_top1"]] = -1
            stats[:, _COL["teacher_top5"]] = -1
        vocab = self.vocab
        if vocab is not None:
            vocab = vocab.to(device)
            to_draft = torch.full((model.config.vocab_size,), -1, dtype=torch.long, device=device)
            to_draft[vocab] = torch.arange(len(vocab), device=device)
        grad_hidden = torch.zeros_like(hidden) if need_grad else None
        grad_params = [[torch.zeros_like(p) for p in ps] for ps in self.params] if need_grad else None
        loss = torch.zeros((), dtype=torch.float64, device=device)

        starts = list(range(0, N, self.chunk_size))
        edges = torch.tensor(starts + [N], device=device)
        idx = [valid[i].nonzero().squeeze(1) for i in range(H)]
        bounds = [torch.searchsorted(idx[i], edges).tolist() for i in range(H)]
        for c, c0 in enumerate(starts):
            c1 = min(c0 + self.chunk_size, N)
            sel = [idx[i][bounds[i][c]:bounds[i][c + 1]] for i in range(H)]
            if not any(len(x) for x in sel):
                continue
            if self.use_teacher:
                # Head i at t needs the base distribution at t+i+1: positions in [c0+1, c1+H).
                w0, width = c0 + 1, c1 - c0 + H
                mark = torch.zeros(width, dtype=torch.bool, device=device)
                for i in range(H):
                    mark[sel[i] + (i + 1 - w0)] = True
                need = mark.nonzero().squeeze(1)
                lookup = torch.full((width,), -1, dtype=torch.long, device=device)
                lookup[need] = torch.arange(len(need), device=device)
                with torch.no_grad():
                    t_in = teacher_flat[need + w0]
                    if vocab is None or self.teacher_argmax:
                        t_logits = model.base_logits(t_in)
                        # (max is much faster than argmax for bf16 on CPU)
                        t_arg = t_logits.max(dim=-1).indices
                        if vocab is not None:
                            t_logits = t_logits[:, vocab]
                    else:
                        t_logits = model.base_logits(t_in, vocab)
                    if self.teacher_temperature != 1.0:
                        t_logits = t_logits.float() / self.teacher_temperature
                    t_logp = F.log_softmax(t_logits, dim=-1, dtype=torch.float32)
                    del t_logits
                    t_prob = t_logp.exp_()  # in place: the log-probs are not needed any more
                    del t_logp
            for i in range(H):
                n = sel[i]
                if len(n) == 0:
                    continue
                s = i + 2
                y = flat_labels[n + s]
                h = hidden[i, n]
                if need_grad:
                    h.requires_grad_(True)
                with torch.set_grad_enabled(need_grad):
                    z = model.head_logits(i, h, vocab)
                with torch.no_grad():
                    logp = F.log_softmax(z.detach(), dim=-1, dtype=torch.float32)
                    if vocab is None:
                        y_col, in_vocab = y, None
                    else:  # column of y in the draft vocabulary; out-of-vocabulary targets add no data loss
                        y_col = to_draft[y]
                        in_vocab = y_col >= 0
                        y_col = y_col.clamp_min(0)
                    lm_tok = -logp.gather(1, y_col[:, None]).squeeze(1)
                    if in_vocab is not None:
                        lm_tok = lm_tok * in_vocab
                    lm_sum = lm_tok.sum()
                    stats[i, _COL["lm_loss"]] += lm_sum
                    contrib = self.lm_weight * lm_sum.double()
                    if self.use_teacher:
                        rows = lookup[n + (s - 1 - w0)]
                        q = t_prob.index_select(0, rows)
                        t_sum = -torch.dot(q.view(-1), logp.view(-1))
                        stats[i, _COL["teacher_loss"]] += t_sum
                        contrib = contrib + self.teacher_weight * t_sum.double()
                    if self.feature_weight:
                        # d/dg of mean_d smooth_l1 (beta 1) is clamp(g - h, -1, 1) / d
                        diff = h.detach().float() - teacher_flat[n + (s - 1)].float()
                        absd = diff.abs()
                        f_sum = torch.where(absd < 1, 0.5 * diff * diff, absd - 0.5).sum() / d
                        stats[i, _COL["feature_loss"]] += f_sum
                        contrib = contrib + self.feature_weight * f_sum.double()
                    loss += contrib * scale[i]
                    if self.topk:
                        top = z.detach().topk(5, dim=-1).indices
                        if vocab is not None:
                            top = vocab[top]
                        pred = top[:, 0]
                        stats[i, _COL["top5"]] += (top == y[:, None]).any(-1).sum()
                    else:
                        pred = z.detach().max(dim=-1).indices
                        if vocab is not None:
                            pred = vocab[pred]
                    stats[i, _COL["top1"]] += (pred == y).sum()
                    if self.teacher_argmax:
                        t_y = t_arg[rows]
                        stats[i, _COL["teacher_top1"]] += (pred == t_y).sum()
                        if self.topk:
                            stats[i, _COL["teacher_top5"]] += (top == t_y[:, None]).any(-1).sum()
                    if need_grad:
                        # d loss / d z = ((w_lm m + w_t) softmax(z) - w_lm m onehot(y) - w_t q) / normaliser,
                        # m = 1 if y is in the scored vocabulary, else 0
                        w_t = self.teacher_weight if self.use_teacher else 0.0
                        w_lm = self.lm_weight * scale[i]
                        lm_w = (torch.full((len(n),), w_lm, device=device) if in_vocab is None
                                else in_vocab.float() * w_lm)
                        dz = logp.exp_()
                        dz.mul_((lm_w + w_t * scale[i])[:, None])
                        if w_t != 0.0:
                            dz.sub_(q, alpha=w_t * scale[i])
                        if self.lm_weight != 0.0:
                            dz[torch.arange(len(n), device=device), y_col] -= lm_w
                    del logp
                if need_grad:
                    grads = torch.autograd.grad(z, [h] + self.params[i], grad_outputs=dz.to(z.dtype))
                    g_h = grads[0]
                    if self.feature_weight:
                        g_h = g_h.float() + diff.clamp_(-1, 1) * (self.feature_weight * scale[i] / d)
                    grad_hidden[i, n] = g_h.to(grad_hidden.dtype)
                    for acc, g in zip(grad_params[i], grads[1:], strict=True):
                        acc.add_(g)
                    del dz, grads, g_h
                del z
            if self.use_teacher:
                del t_prob
        if need_grad:
            grad_hidden = grad_hidden.reshape(H, B, S, d)
        return loss.float(), stats, grad_hidden, grad_params


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, runner, head_hidden, *params):
        loss, stats, grad_hidden, grad_params = runner(head_hidden, need_grad=True)
        flat = [g for gs in grad_params for g in gs]
        ctx.save_for_backward(grad_hidden, *flat)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        grad_hidden, *grad_params = ctx.saved_tensors
        scale = grad_loss.to(grad_hidden.dtype)
        return (None, grad_hidden * scale, *(g * grad_loss.to(g.dtype) for g in grad_params))


def hydra_loss(model, head_hidden: torch.Tensor, labels: torch.Tensor,
               position_ids: torch.Tensor | None = None, teacher_hidden: torch.Tensor | None = None,
               lm_weight: float = 1.0, teacher_weight: float = 0.0,
               normalizer: torch.Tensor | None = None, chunk_size: int = 256, topk: bool = False,
               teacher_metrics: bool = False, vocab: torch.Tensor | None = None,
               feature_weight: float = 0.0, teacher_temperature: float = 1.0,
               head_weights: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked Hydra loss. Returns (loss, stats).

    Args:
        model: a HydraModel (its `head_logits` / `base_logits` project to the vocabulary).
        head_hidden: (H, B, S, d) the heads' hidden states (HydraTrainOutput.head_hidden).
        labels: (B, S) token ids on assistant tokens, -100 elsewhere.
        position_ids: (B, S) restarting at 0 per packed conversation; None = one conversation per row.
        teacher_hidden: (B, S, d) the base model's final hidden states (the teacher's logits are
            `model.base_logits(teacher_hidden)`); needed when teacher_weight != 0 or teacher_metrics.
        lm_weight, teacher_weight: weights of the data and teacher cross-entropies.
        normalizer: (H,) token count to divide head i's summed loss by (e.g. the count over a whole global
            batch spread over micro-batches and ranks); None = this batch's own counts (a per-head mean).
        chunk_size: flattened (batch x seq) positions per chunk.
        topk: also count top-5 hits (evaluation; top-1 is always counted).
        teacher_metrics: compute the teacher's distribution even if teacher_weight == 0 (for teacher_top*).
        vocab: a draft vocabulary (1-D token ids) to score over instead of the whole vocabulary (see the
            module docstring for the teacher and out-of-vocabulary targets).
        feature_weight: weight of the feature loss (needs teacher_hidden).
        teacher_temperature: the teacher distribution is softmax(base logits / teacher_temperature).
        head_weights: (H,) weight of each head's loss; None = all 1 (the paper's uniform sum).

    loss is differentiable with respect to head_hidden and the heads' own output layers (if not shared); stats
    is (H, len(STAT_FIELDS)) float64 sums (columns of metrics that were not computed hold -1 per row); see
    `summarize`.
    """
    heads = model.heads
    params = []
    for i in range(heads.num_heads):
        own = heads.lm_heads[i] if heads.lm_heads is not None else None
        params.append([p for p in own.parameters() if p.requires_grad] if own is not None else [])
    runner = _Runner(model, labels, position_ids, teacher_hidden, lm_weight, teacher_weight, normalizer,
                     chunk_size, topk, teacher_metrics, params, vocab, feature_weight, teacher_temperature,
                     head_weights)
    flat = [p for ps in params for p in ps]
    if torch.is_grad_enabled() and (head_hidden.requires_grad or any(p.requires_grad for p in flat)):
        return _ChunkedLoss.apply(runner, head_hidden, *flat)
    loss, stats, _, _ = runner(head_hidden, need_grad=False)
    return loss, stats
