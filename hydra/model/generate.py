"""The decoding loop: prefill, then [propose a tree -> verify it in one forward -> accept -> compact]*.

`hydra_generate` and `ar_generate` share everything (loading, cache, stopping); plain autoregressive decoding
is the same loop with a one-node tree, so timings compare like with like. Batch size 1, as in the paper.

Every base-model forward decides some tokens and yields one `StepOutput`: the prefill decides the first
token; a tree verification decides the accepted draft tokens plus the token after them (the bonus token).
tau (`mean_accept_length`) is the mean over verification forwards, prefill excluded, bonus token included
(as Spec-Bench and EAGLE count it; the original Hydra's new_tokens / steps is the same quantity); AR gives 1.0.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from hydra.model.acceptance import exact_accept, greedy_accept, sample_from, typical_accept
from hydra.model.base_model import eos_token_ids
from hydra.model.families import tree_attention_mask
from hydra.model.hydra_model import HydraModel
from hydra.model.kv_cache import TreeKVCache
from hydra.model.trees import TreeBuffers, build_tree_buffers, get_tree

DEFAULT_TREE = "mc_sim_7b_63"


@dataclass
class DecodeConfig:
    tree: str | list | None = None  # tree name / JSON file / list of paths; None: the heads' config.tree or mc_sim_7b_63
    temperature: float = 0.0  # 0 = greedy
    sampling: str = "exact"  # with temperature > 0: "exact" (lossless) or "typical" (Medusa/Hydra, lossy)
    posterior_threshold: float = 0.09
    posterior_alpha: float = 0.3
    max_new_tokens: int = 512
    max_steps: int | None = None
    stop_token_ids: list[int] | None = None  # default: the tokenizer's / generation config's EOS ids
    seed: int | None = None


@dataclass
class StepOutput:
    tokens: list[int]  # tokens decided by this forward (cut at a stop token, which is excluded)
    accept_length: int  # tokens decided by this forward, bonus included (before any cut)
    finish_reason: str | None = None  # None, "eos", "max_new_tokens", "max_steps" or "length" (context full)


@dataclass
class GenerationResult:
    tokens: list[int] = field(default_factory=list)
    accept_lengths: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def steps(self) -> int:
        return len(self.accept_lengths)

    @property
    def tau(self) -> float:
        return mean_accept_length(self.accept_lengths)


def mean_accept_length(accept_lengths: list[int]) -> float:
    """tau: tokens decided per verification forward, bonus token included. The first step is the prefill (it
    decides one token and verifies nothing) and is left out; plain autoregressive decoding gives 1.0."""
    verify = accept_lengths[1:]
    return sum(verify) / len(verify) if verify else float("nan")


def hydra_generate(model: HydraModel, input_ids: torch.Tensor | list[int],
                   config: DecodeConfig | None = None) -> Iterator[StepOutput]:
    """Speculative decoding with the model's draft heads (see module docstring)."""
    config = config or DecodeConfig()
    tree = _tree_buffers(model, config.tree)
    if tree.max_depth > model.config.hydra_num_heads:
        raise ValueError(f"tree depth {tree.max_depth} exceeds the number of heads "
                         f"({model.config.hydra_num_heads}); choose a shallower tree")
    # Inputs are checked here, so bad input fails at the call rather than at the first step.
    return _decode(model, _check_inputs(model, input_ids, config), config, tree)


def ar_generate(model: HydraModel, input_ids: torch.Tensor | list[int],
                config: DecodeConfig | None = None) -> Iterator[StepOutput]:
    """Plain autoregressive decoding through the same loop (no heads are run)."""
    config = config or DecodeConfig()
    return _decode(model, _check_inputs(model, input_ids, config), config, None)


def generate(model: HydraModel, input_ids: torch.Tensor | list[int], config: DecodeConfig | None = None,
             speculative: bool = True) -> GenerationResult:
    """Run to completion and collect tokens, per-step accepted lengths and the finish reason."""
    result = GenerationResult()
    for step in (hydra_generate if speculative else ar_generate)(model, input_ids, config):
        result.tokens += step.tokens
        result.accept_lengths.append(step.accept_length)
        result.finish_reason = step.finish_reason
    return result


def stream_text(tokenizer, steps: Iterable[StepOutput]) -> Iterator[tuple[str, StepOutput]]:
    """Incremental detokenisation: yields (new text, step). Text is held back while it ends in an
    incomplete UTF-8 sequence."""
    tokens: list[int] = []
    emitted = ""
    for step in steps:
        tokens += step.tokens
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if text.endswith("\ufffd") and step.finish_reason is None:
            yield "", step
            continue
        yield text[len(emitted):], step
        emitted = text


_TREE_CACHE: dict[tuple, TreeBuffers] = {}


def _tree_buffers(model: HydraModel, tree: str | list | None) -> TreeBuffers:
    choices = get_tree(tree or model.config.tree or DEFAULT_TREE)
    device = next(model.parameters()).device
    key = (str(choices), str(device))
    if key not in _TREE_CACHE:
        _TREE_CACHE[key] = build_tree_buffers(choices).to(device)
    return _TREE_CACHE[key]


def stop_token_ids(model: HydraModel, config: DecodeConfig) -> set[int]:
    """The ids that end generation: `config.stop_token_ids`, else the generation config's and tokenizer's EOS."""
    ids = config.stop_token_ids
    return set(ids if ids is not None else eos_token_ids(model.base_model, model.tokenizer))


def _check_inputs(model: HydraModel, input_ids, config: DecodeConfig) -> torch.Tensor:
    device = next(model.parameters()).device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"batch size {ids.shape[0]} is not supported; decode one prompt at a time")
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"the prompt must be a list of token ids or a (1, n) tensor, not {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError("the prompt is empty: nothing to condition on")
    vocab = model.base_model.get_input_embeddings().num_embeddings
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"the prompt has token ids outside the base model's vocabulary [0, {vocab})")
    context = model.base_model.config.max_position_embeddings
    if ids.numel() >= context:
        raise ValueError(f"prompt is {ids.numel()} tokens; the context holds {context}")
    if not config.temperature >= 0:  # also catches nan
        raise ValueError(f"temperature must be >= 0, got {config.temperature}")
    if config.sampling not in ("exact", "typical"):
        raise ValueError(f"sampling must be 'exact' or 'typical', got {config.sampling!r}")
    return ids


def _decode(model: HydraModel, ids: torch.Tensor, config: DecodeConfig,
            tree: TreeBuffers | None) -> Iterator[StepOutput]:
    if config.max_new_tokens <= 0:
        return
    base, heads = model.base_model, model.heads
    decoder, lm_head, embed = model.decoder, model.lm_head, model.embed_tokens
    device = ids.device
    context = base.config.max_position_embeddings
    tree_size = tree.size if tree is not None else 1
    capacity = min(context, ids.numel() + config.max_new_tokens + tree_size)
    cache = TreeKVCache(base.config.num_hidden_layers, capacity)
    prefix_cache = heads.prefix.new_cache() if (tree is not None and heads.prefix is not None) else None
    stop_ids = stop_token_ids(model, config)
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    greedy = config.temperature == 0
    use_bool_mask = base.config._attn_implementation == "sdpa"
    want_all = model.config.hidden_state_offset > 0

    def choose(logits: torch.Tensor) -> int:  # the base model's own next token
        if greedy or config.sampling == "typical":
            return int(logits.argmax())
        return sample_from(torch.softmax(logits.float() / config.temperature, -1).cpu(), generator)

    with torch.inference_mode():
        # Prefill.
        positions = torch.arange(ids.numel(), device=device)[None]
        out = decoder(input_ids=ids[None], position_ids=positions, past_key_values=cache, use_cache=True,
                      output_hidden_states=want_all)
        hidden = _hidden(model, out)  # what the heads read; the base model's logits read the final state
        root = choose(lm_head(out.last_hidden_state[0, -1]))
        ctx = None
        if tree is not None:
            ctx = heads.context(hidden, positions, prefix_cache)[0, -1]
        n, new_tokens, steps = ids.numel(), 0, 0
        pending = [root]
        while True:
            steps += 1
            # Emit what the last forward decided, cut at a stop token / the token budget.
            out, reason = [], None
            for tok in pending:
                if tok in stop_ids:
                    reason = "eos"
                    break
                out.append(tok)
                if new_tokens + len(out) >= config.max_new_tokens:
                    reason = "max_new_tokens"
                    break
            new_tokens += len(out)
            if reason is None and config.max_steps is not None and steps >= config.max_steps:
                reason = "max_steps"
            if reason is None and n + 1 > capacity:
                reason = "length"
            yield StepOutput(out, len(pending), reason)
            if reason is not None:
                return
            root = pending[-1]
            # Propose (a one-node tree when out of heads or out of room) and verify in one forward.
            use_tree = tree is not None and n + tree.size <= capacity
            if use_tree:
                tokens = _propose(model, tree, ctx, root)
                mask = tree.attn_mask
                pos = n + tree.depth
            else:
                tokens = torch.tensor([root], device=device)
                mask = None
                pos = torch.tensor([n], device=device)
            out = decoder(
                input_ids=tokens[None], position_ids=pos[None], past_key_values=cache, use_cache=True,
                output_hidden_states=want_all,
                attention_mask=(_verify_mask(mask, n, base.dtype, use_bool_mask, base.config, tree.depth)
                                if mask is not None else None))
            out_hidden = _hidden(model, out)[0]
            logits = lm_head(out.last_hidden_state[0])
            if not use_tree:
                accepted = torch.zeros(1, dtype=torch.long, device=device)
                nxt = choose(logits[0])
            elif greedy:
                accepted, nxt = greedy_accept(logits, tokens, tree)
            elif config.sampling == "typical":
                accepted, nxt = typical_accept(logits, tokens, tree, config.temperature,
                                               config.posterior_threshold, config.posterior_alpha)
            else:
                accepted, nxt = exact_accept(logits, tokens, tree, config.temperature, generator)
            cache.keep(n, n + accepted)
            accepted_tokens = tokens[accepted].tolist()
            if tree is not None:
                acc_pos = torch.arange(n, n + len(accepted_tokens), device=device)[None]
                ctx = heads.context(out_hidden[accepted][None], acc_pos, prefix_cache)[0, -1]
            n += len(accepted_tokens)
            pending = accepted_tokens[1:] + [nxt]  # the root was emitted by the previous step


def _hidden(model: HydraModel, out) -> torch.Tensor:
    k = model.config.hidden_state_offset
    return out.last_hidden_state if k == 0 else out.hidden_states[-(k + 1)]


def _verify_mask(tree_mask: torch.Tensor, past: int, dtype: torch.dtype, as_bool: bool, config=None,
                 depth: torch.Tensor | None = None):
    """(1, 1, T, past + T): every tree node sees the whole prefix, itself and its ancestors (within the
    sliding window of the base model's config, if any; see hydra.model.families)."""
    return tree_attention_mask(tree_mask, past, dtype, as_bool, config, depth)


def _propose(model: HydraModel, tree: TreeBuffers, ctx: torch.Tensor, root: int) -> torch.Tensor:
    """Fill the tree with the heads' guesses, depth by depth (one head call per depth, all rows at once)."""
    heads, embed, lm_head = model.heads, model.embed_tokens, model.lm_head
    root_t = torch.tensor([root], device=ctx.device)
    levels = [root_t]
    if heads.grounded:
        # rows: one per expanded node at the current depth = [c_t, e(root), e(path tokens)...]
        rows = torch.cat([ctx, embed(root_t)[0]])[None]
        d_model = ctx.shape[-1]
        for d in range(tree.max_depth):
            hid = heads.head_hidden(d, rows[:, :d_model], rows[:, d_model:])
            top = heads.draft_topk(d, hid, lm_head, tree.topk[d])
            level = top[tree.parent_row[d], tree.rank[d]]
            levels.append(level)
            if d + 1 < tree.max_depth:
                grow = tree.expand[d]
                rows = torch.cat([rows[tree.parent_row[d][grow]], embed(level[grow])], dim=-1)
    else:
        for d in range(tree.max_depth):  # Medusa: head d's top-k does not depend on the path
            top = heads.draft_topk(d, heads.head_hidden(d, ctx[None]), lm_head, tree.topk[d])
            levels.append(top[0, tree.rank[d]])
    return torch.cat(levels)
