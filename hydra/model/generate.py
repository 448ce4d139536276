"""The decoding loop: prefill, then [propose a tree -> verify it in one forward -> accept -> compact]*.

`hydra_generate` and `ar_generate` share everything (loading, cache, stopping); plain autoregressive decoding
is the same loop with a one-node tree, so timings compare like with like. Batch size 1, as in the paper.

Every base-model forward decides some tokens and yields one `StepOutput`: the prefill decides the first
token; a tree verification decides the accepted draft tokens plus the token after them (the bonus token).
tau (`mean_accept_length`) is the mean over verification forwards, prefill excluded, bonus token included
(as Spec-Bench and EAGLE count it; the original Hydra's new_tokens / steps is the same quantity); AR gives
1.0.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from time import perf_counter

import torch

from hydra.model.acceptance import exact_accept, greedy_accept, greedy_walk, typical_accept
from hydra.model.attention import attention_dtype, takes_bool_mask
from hydra.model.base_model import eos_token_ids
from hydra.model.families import tree_attention_mask
from hydra.model.hydra_model import HydraModel, decoder_is_compiled, exported_decoder, reads_all_hidden_states
from hydra.model.kv_cache import TreeKVCache
from hydra.model.lookup import PromptLookup
from hydra.model.pacing import Pacer
from hydra.model.prompt_cache import Kept, PromptCache, Reused, weights_version
from hydra.model.quant import Int4Linear, base_quant
from hydra.model.trees import (  # noqa: F401
    DEFAULT_TREE,
    DynamicTree,
    StepTree,
    TreeBuffers,
    base_step_costs,
    choose_size,
    graft_chain,
    resolve_tree,
    select_step_tree,
    worth_expanding,
)

# Tree sizes up to which the output layer runs over every node at once even where it could walk
# (`_Run.walk`): on the default model's int4 output layer 1/2/3/4/6/8 rows took 2.3/2.9/3.4/4.0/6.7/7.4 ms,
# and a greedy walk reads tau rows (~1.5-1.8 on the shipped heads), one call each.
WALK_ABOVE = 4

# Prompt-lookup tokens per step when DecodeConfig.lookup is None: 8 (16 and 32 were no faster on the default
# model), but 3 on a base whose linears run torch's CPU int4 kernel, which computes rows four at a time: a
# forward of 5-8 tokens costs as much as one of 8 (2.7x a one-token forward on the exported default model,
# 4 tokens 1.7x), so a step that verifies the lookup branch alone stays within 4 tokens (README, Prompt
# lookup).
LOOKUP_TOKENS, INT4_LOOKUP_TOKENS = 8, 3


class PromptTooLongError(ValueError):
    """The prompt leaves no room in the base model's context: a property of the conversation, not of the
    decoding configuration (callers that ask many prompts record it for that prompt and go on)."""


@dataclass
class DecodeConfig:
    # tree name / JSON file / list of paths / "dynamic:N..." or a DynamicTree; None: the heads' config.tree,
    # else mc_sim_7b_63 (hydra.model.trees.resolve_tree)
    tree: str | list | DynamicTree | None = None
    temperature: float = 0.0  # 0 = greedy
    sampling: str = "exact"  # with temperature > 0: "exact" (lossless) or "typical" (Medusa/Hydra, lossy)
    posterior_threshold: float = 0.09
    posterior_alpha: float = 0.3
    max_new_tokens: int = 512
    max_steps: int | None = None
    stop_token_ids: list[int] | None = None  # default: the tokenizer's / generation config's EOS ids
    seed: int | None = None
    # Rest the heads while speculating is slower than plain steps (hydra.model.pacing): True for a fresh
    # Pacer, or a Pacer that carries its timings and averages over successive calls.
    pace: bool | Pacer = False
    # Also draft up to this many tokens per step by prompt lookup: the tokens that followed the latest earlier
    # occurrence of the context's last 2-3 tokens, grafted onto the heads' tree (hydra.model.lookup). 0: off;
    # None: the base's default (`lookup_tokens`).
    lookup: int | None = None
    # Reuse what the previous call with the same PromptCache computed for the prefix this prompt shares with
    # its tokens (hydra.model.prompt_cache): a chat's earlier turns are not prefilled again.
    prompt_cache: PromptCache | None = None


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
    # Tree and inputs are checked here, so bad input fails at the call rather than at the first step.
    tree = resolve_tree(config.tree, model.config, next(model.parameters()).device)
    _check_tree_fits_vocab(model, tree)
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


def stop_token_ids(model: HydraModel, config: DecodeConfig) -> set[int]:
    """The ids that end generation: `config.stop_token_ids`, else the generation config's and tokenizer's
    EOS."""
    ids = config.stop_token_ids
    return set(ids if ids is not None else eos_token_ids(model.base_model, model.tokenizer))


def _check_tree_fits_vocab(model: HydraModel, tree: TreeBuffers | DynamicTree) -> None:
    """A head can rank only as many tokens as it drafts from (the draft vocabulary, else the whole one): a
    tree asking for more per node is refused here rather than failing inside the first proposal."""
    k = tree.topk if isinstance(tree, DynamicTree) else max(tree.topk, default=0)
    draft_vocab = model.heads.draft_vocab
    vocab = draft_vocab.numel() if draft_vocab is not None else model.lm_head.weight.shape[0]
    if k > vocab:
        raise ValueError(f"the tree asks for the top {k} guesses of a head, but the heads draft from "
                         f"{vocab} tokens; use a narrower tree")


def _check_inputs(model: HydraModel, input_ids, config: DecodeConfig) -> torch.Tensor:
    if config.prompt_cache is not None:
        if not isinstance(config.prompt_cache, PromptCache):
            raise ValueError(
                f"prompt_cache must be a hydra.model.prompt_cache.PromptCache, not {config.prompt_cache!r}")
        # a call refused below reuses nothing (not the last call's count)
        config.prompt_cache.reused_tokens = 0
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
        raise PromptTooLongError(f"prompt is {ids.numel()} tokens; the context holds {context}")
    if not config.temperature >= 0:  # also catches nan
        raise ValueError(f"temperature must be >= 0, got {config.temperature}")
    if not isinstance(config.pace, bool | Pacer):  # a ValueError, as for every other bad DecodeConfig field
        raise ValueError(  # noqa: TRY004
            f"pace must be True, False or a hydra.model.pacing.Pacer, not {config.pace!r}")
    if config.sampling not in ("exact", "typical"):
        raise ValueError(f"sampling must be 'exact' or 'typical', got {config.sampling!r}")
    if config.lookup is not None and (not isinstance(config.lookup, int) or isinstance(config.lookup, bool)
                                      or config.lookup < 0):
        raise ValueError(f"lookup must be a number of tokens >= 0 (0: off), got {config.lookup!r}")
    return ids


# As a decorator, inference mode is entered around each resumption of the generator and left at each yield.
# A `with` block inside it would stay entered across yields: the caller would run in inference mode between
# steps, and a call closed while another was suspended (a server's request whose client left) would restore
# its own entry-time mode under the other, whose next step would then write its inference-mode cache outside
# inference mode and fail.
@torch.inference_mode()
def _decode(model: HydraModel, ids: torch.Tensor, config: DecodeConfig,
            tree: TreeBuffers | DynamicTree | None) -> Iterator[StepOutput]:
    """Prefill, then one step per base-model forward: emit what the last forward decided, propose a tree,
    verify it in one forward, accept a path, compact the cache."""
    if config.max_new_tokens <= 0:
        return
    run = _Run(model, config, tree, ids)
    pending = [_prefill(run, ids)]
    new_tokens = steps = 0
    while True:
        run.keep()
        steps += 1
        tokens, reason = _emit(pending, run.stop_ids, config.max_new_tokens - new_tokens)
        new_tokens += len(tokens)
        if reason is None and config.max_steps is not None and steps >= config.max_steps:
            reason = "max_steps"
        if reason is None and run.n + 1 > run.capacity:
            reason = "length"
        yield StepOutput(tokens, len(pending), reason)
        if reason is not None:
            return
        run.check_owner()
        start = perf_counter()  # the consumer's time between steps is not the step's
        if run.lookup is not None:
            run.lookup.extend(pending)
            if run.lookup_judge is not None:
                for tokens in run.lookup.outcomes():
                    run.lookup_judge.record_forgone(tokens)
        draft = _draft(run, root=pending[-1])
        last, hidden = _verify(run, draft)
        accepted, bonus = _accept(run, last, draft)
        pending = _compact(run, draft, accepted, hidden) + [bonus]
        if run.pacer is not None:
            run.pacer.record(perf_counter() - start, len(pending), speculated=draft.speculated,
                             verified=draft.tokens.numel())


@dataclass
class Draft:
    """The tokens one verification forward checks (root first) and the tree they form; `speculated`: what the
    pacer judges ran (see `_draft`), rather than a resting step."""
    tokens: torch.Tensor
    tree: StepTree
    speculated: bool = False


class _Run:
    """What one decoding run carries from step to step."""

    def __init__(self, model: HydraModel, config: DecodeConfig, tree: TreeBuffers | DynamicTree | None,
                 ids: torch.Tensor):
        base = model.base_model
        self.prompt = ids.tolist()
        if isinstance(tree, DynamicTree) and tree.costs is None:  # the size rule prices this base's steps
            tree = replace(tree, costs=base_step_costs(base_quant(base)))
        self.model, self.tree = model, tree
        self.device = next(model.parameters()).device
        lookup = lookup_tokens(model, config)
        self.lookup = PromptLookup(lookup) if lookup and tree is not None else None
        # tokens one step verifies at most: the root, the heads' nodes, a lookup branch
        self.step_size = tree.size + lookup if tree is not None else 1
        self.capacity = min(base.config.max_position_embeddings,
                            len(self.prompt) + config.max_new_tokens + self.step_size)
        # Whether the heads run at all: the tree "none" verifies the lookup branch alone.
        self.heads_draft = tree is not None and tree.max_depth > 0
        has_prefix = self.heads_draft and model.heads.prefix is not None
        reused, self.kept = None, None
        if config.prompt_cache is not None:
            # rows of another model, weights, dtype, device or decoder kind are not reused
            key = (model, weights_version(model), decoder_is_compiled(model), base.dtype,
                   attention_dtype(base.config), self.device)
            reused = config.prompt_cache.take(self, self.prompt, key, needs_prefix=has_prefix,
                                              prefix_reads_next=model.heads.context_reads_next_token)
        self.cache = new_kv_cache(model, self.capacity, reused, headroom=config.prompt_cache is not None)
        self.prefix_cache = model.heads.prefix.new_cache() if has_prefix else None
        self.stop_ids = stop_token_ids(model, config)
        generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
        self.accept = _acceptance_rule(config, generator)
        # Greedy decoding can compute the output layer for the nodes it accepts only, a row per call. On
        # torch's int4 kernel (the quantized bases' output layer) rows cost nearly linearly from 3 rows on, so
        # for trees of more than WALK_ABOVE tokens that pays; a float output layer costs about the same for 1
        # and 8 rows, so never there (README, Quantized base model).
        self.walk = config.temperature == 0 and isinstance(model.lm_head, Int4Linear)
        self.bool_mask = takes_bool_mask(base.config)
        self.decoder = exported_decoder(model) or model.decoder
        self.all_hidden = reads_all_hidden_states(model.config)
        self.n = 0  # tokens in the cache
        # Hidden states of accepted tokens the heads have not read yet (c_t is computed when a tree needs it),
        # and, for a prefix layer that reads x_{t+1} too, those positions' tokens.
        self.unread: list[torch.Tensor] = []
        self.unread_from = 0
        if reused is not None:  # prompt tokens whose cache rows (and the heads' state) a prompt cache gave
            self.n = self.unread_from = reused.length
            if has_prefix:
                self.prefix_cache, self.unread_from = reused.prefix_cache, reused.unread_from
                self.unread = [reused.unread] if reused.unread is not None else []
        if config.prompt_cache is not None:
            self.prompt_cache = config.prompt_cache
            self.kept = Kept(key, self.cache, list(self.prompt), prefix_cache=self.prefix_cache)
        reads_next = has_prefix and model.heads.context_reads_next_token
        self.unread_tokens: list[torch.Tensor] | None = [] if reads_next else None
        self.pacer = None
        if config.pace is not False and tree is not None:
            self.pacer = config.pace if isinstance(config.pace, Pacer) else Pacer()
            self.pacer.start_reply()
        # The pacer that judges the lookup branch, told what the branches it rested would have decided.
        self.lookup_judge = None
        if self.pacer is not None and self.lookup is not None:
            self.lookup_judge = self.pacer.lookup if self.heads_draft else self.pacer
        self.plain = StepTree(torch.ones(1, 1, dtype=torch.bool, device=self.device),
                              torch.zeros(1, dtype=torch.long, device=self.device),
                              torch.zeros(1, 1, dtype=torch.long, device=self.device),
                              torch.full((1,), -1, dtype=torch.long, device=self.device))

    def check_owner(self) -> None:
        """A later call that took the prompt cache over writes into the buffers this one decodes in."""
        if self.kept is not None and not self.prompt_cache.owned_by(self):
            raise RuntimeError("this call's prompt cache was taken over by a later call; a PromptCache "
                               "serves one call at a time")

    def keep(self) -> None:
        """Hand the state after this step to the prompt cache (between steps, where it is consistent)."""
        if self.kept is not None:
            self.kept.n, self.kept.unread_from, self.kept.unread = self.n, self.unread_from, list(self.unread)
            self.prompt_cache.keep(self.kept)


def lookup_tokens(model: HydraModel, config: DecodeConfig) -> int:
    """Prompt-lookup tokens per step: `config.lookup`, else the base's default (`INT4_LOOKUP_TOKENS` where its
    linears run torch's int4 kernel, else `LOOKUP_TOKENS`)."""
    if config.lookup is not None:
        return config.lookup
    return INT4_LOOKUP_TOKENS if base_quant(model.base_model) == "int4" else LOOKUP_TOKENS


def new_kv_cache(model: HydraModel, capacity: int, reused: Reused | None = None,
                 headroom: bool = False) -> TreeKVCache:
    """The KV cache of one decoding run, allocated for up to `capacity` tokens. A compiled decoder on a CPU
    gets buffers of the model's whole context, the same for every reply, so their sizes are constants of its
    graphs rather than values checked on every call (hydra.model.kv_cache); otherwise buffers of `capacity`
    slots, or with `headroom` (a cache a prompt cache keeps for later calls) twice that, within the context.
    `reused`: rows a prompt cache hands over, kept in their buffers where those are big enough, else
    copied."""
    if reused is not None and reused.kv.storage_len >= capacity:
        reused.kv.reopen(reused.length, capacity)
        return reused.kv
    base = model.base_model
    device = next(model.parameters()).device
    fixed = device.type == "cpu" and decoder_is_compiled(model)
    context = base.config.max_position_embeddings
    storage = context if fixed else min(context, 2 * capacity) if headroom else None
    cache = TreeKVCache(base.config.num_hidden_layers, capacity, attention_dtype(base.config), storage)
    cache.allocate_for(base.config, base.dtype, device, static=fixed)
    if reused is not None:
        cache.copy_rows(reused.kv, reused.length)
    return cache


def _acceptance_rule(config: DecodeConfig, generator: torch.Generator | None):
    """(logits, tokens, tree) -> (accepted nodes, bonus token); a one-node tree is a plain decoding step."""
    if config.temperature == 0:
        return greedy_accept
    if config.sampling == "typical":
        return partial(typical_accept, temperature=config.temperature,
                       posterior_threshold=config.posterior_threshold, posterior_alpha=config.posterior_alpha)
    return partial(exact_accept, temperature=config.temperature, generator=generator)


def _emit(pending: list[int], stop_ids: set[int], budget: int) -> tuple[list[int], str | None]:
    """The decided tokens to hand out: cut before a stop token, or at the token budget (>= 1)."""
    for k, token in enumerate(pending):
        if token in stop_ids:
            return pending[:k], "eos"
        if k + 1 >= budget:
            return pending[: k + 1], "max_new_tokens"
    return pending, None


def _forward(run: _Run, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None):
    """One base-model forward over new tokens: (output-layer input (T, d), what the heads read (T, ...))."""
    out = run.decoder(input_ids=tokens[None], position_ids=positions[None], past_key_values=run.cache,
                      use_cache=True, output_hidden_states=run.all_hidden, attention_mask=mask)
    return out.last_hidden_state[0], run.model.heads_input(out)[0]


def _prefill(run: _Run, ids: torch.Tensor) -> int:
    """The prompt into the cache (from run.n: the rows before it came from a prompt cache); returns the first
    token."""
    start, end = run.n, ids.numel()
    last, hidden = _forward(run, ids[start:], torch.arange(start, end, device=run.device), None)
    _, first = run.accept(run.model.lm_head(last[-1])[None], ids[-1:], run.plain)
    run.n = end
    if run.lookup is not None:
        run.lookup.extend(run.prompt)
    if run.heads_draft:
        hidden = torch.cat([*run.unread, hidden]) if run.unread else hidden  # positions [unread_from, end)
        read_from = run.unread_from
        if run.prefix_cache is not None and end - 1 > read_from:
            # The prompt through the prefix layer now, as the base model's prefill: otherwise the first step
            # that runs the heads pays for it, and pacing would read that as the heads' cost.
            next_embeds = (run.model.embed_tokens(ids[None, read_from + 1:]) if run.unread_tokens is not None
                           else None)
            positions = torch.arange(read_from, end - 1, device=run.device)[None]
            run.model.heads.context(hidden[None, :-1], positions, run.prefix_cache, next_embeds)
            run.unread_from = end - 1
        run.unread = [hidden[run.unread_from - read_from:]]
        if run.unread_tokens is not None:
            run.unread_tokens = [ids[run.unread_from:]]
    return first


def _draft(run: _Run, root: int) -> Draft:
    """This step's tree: the heads' proposal with any prompt-lookup branch; while the heads rest, the lookup
    branch alone; just the root when there is no tree, no room, or nothing to graft."""
    root_t = torch.tensor([root], device=run.device)
    if run.tree is None or run.n + run.step_size > run.capacity:
        return Draft(root_t, run.plain)
    resting = run.pacer is not None and not run.pacer.speculate()
    if resting and not (run.heads_draft and run.pacer.look_up()):
        if run.lookup_judge is not None and (chain := run.lookup.draft()):
            run.lookup.follow(chain)  # not verified: scored against the tokens decided after it
        return Draft(root_t, run.plain)
    if resting or not run.heads_draft:  # the heads rest (the lookup branch alone), or there are none
        draft = Draft(root_t, run.plain)
    elif isinstance(run.tree, TreeBuffers):
        draft = Draft(_propose(run.model, run.tree, _context(run, root_t), root), run.tree)
    else:
        draft = Draft(*_propose_dynamic(run.model, run.tree, _context(run, root_t), root))
    chain = run.lookup.draft() if run.lookup is not None else None
    if chain:
        draft = Draft(*graft_chain(draft.tokens, draft.tree, chain))
    # What the pacer judges: the heads' steps, or for the tree "none" the steps with a lookup branch.
    draft.speculated = not resting and (run.heads_draft or bool(chain))
    return draft


def _context(run: _Run, root: torch.Tensor) -> torch.Tensor:
    """c_t at the last cached position: the heads' context over the hidden states not read yet (the Hydra++
    prefix layer appends them to its own cache). `root`, the token after the last cached one, completes
    the next tokens of a prefix layer that reads them."""
    hidden = torch.cat(run.unread)
    positions = torch.arange(run.unread_from, run.unread_from + hidden.shape[0], device=run.device)
    run.unread, run.unread_from = [], run.unread_from + hidden.shape[0]
    next_embeds = None
    if run.unread_tokens is not None:  # x_{t+1} for each unread t: the tokens after the first, then the root
        next_embeds = run.model.embed_tokens(torch.cat([*run.unread_tokens, root])[1:])[None]
        run.unread_tokens = []
    return run.model.heads.context(hidden[None], positions[None], run.prefix_cache, next_embeds)[0, -1]


def _verify(run: _Run, draft: Draft) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over the tree: the output layer's input (T, d) and the heads' hidden states (T, d) at
    every node."""
    tree = draft.tree
    base = run.model.base_model
    mask = (tree_attention_mask(tree.attn_mask, run.n, base.dtype, run.bool_mask, base.config, tree.depth)
            if tree.size > 1 else None)
    return _forward(run, draft.tokens, run.n + tree.depth, mask)


def _accept(run: _Run, last: torch.Tensor, draft: Draft) -> tuple[torch.Tensor, int]:
    """The accepted nodes (root first) and the bonus token, from the output layer over the tree's nodes: all
    of them, or for `run.walk` on a tree of more than WALK_ABOVE tokens only those the greedy walk reads."""
    lm_head = run.model.lm_head
    if run.walk and draft.tokens.numel() > WALK_ABOVE:
        return greedy_walk(lambda i: lm_head(last[i]), draft.tokens, draft.tree)
    return run.accept(lm_head(last), draft.tokens, draft.tree)


def _compact(run: _Run, draft: Draft, accepted: torch.Tensor, hidden: torch.Tensor) -> list[int]:
    """Move the accepted nodes' cache rows to the next slots; returns the accepted tokens after the root."""
    run.cache.keep(run.n, run.n + accepted)
    run.n += accepted.numel()
    if run.heads_draft:
        run.unread.append(hidden[accepted])
    if run.unread_tokens is not None:
        run.unread_tokens.append(draft.tokens[accepted])
    tokens = draft.tokens[accepted].tolist()
    if run.kept is not None:
        run.kept.tokens += tokens
    return tokens[1:]


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


def _propose_dynamic(model: HydraModel, tree: DynamicTree, ctx: torch.Tensor,
                     root: int) -> tuple[torch.Tensor, StepTree]:
    """Grow this step's tree from the heads' confidence (see `DynamicTree`); one head call per depth over the
    kept nodes. Candidates are numbered in proposal order (0 = root). Returns the selected tokens and their
    tree."""
    heads, embed, lm_head = model.heads, model.embed_tokens, model.lm_head
    device, k = ctx.device, tree.topk
    root_t = torch.tensor([root], device=device)
    tokens, scores = [root_t], [torch.zeros(1, device=device)]
    parents, depths = [torch.full((1,), -1, device=device)], [torch.zeros(1, dtype=torch.long, device=device)]
    frontier, frontier_logp = torch.zeros(1, dtype=torch.long, device=device), scores[0]
    # grounded heads: [c_t, e(root), e(path)...] per kept node
    rows = torch.cat([ctx, embed(root_t)[0]])[None]
    d_model, count, calls = ctx.shape[-1], 1, 0
    for d in range(tree.depth):
        if heads.grounded:
            hid = heads.head_hidden(d, rows[:, :d_model], rows[:, d_model:])
        else:  # Medusa: head d's guesses do not depend on the path, so one row serves every kept node
            hid = heads.head_hidden(d, ctx[None])
        logp, ids = heads.draft_topk_logprobs(d, hid, lm_head, k)
        calls += 1
        logp, ids = logp.expand(frontier.numel(), k).flatten(), ids.expand(frontier.numel(), k).flatten()
        cum = frontier_logp.repeat_interleave(k) + logp
        tokens.append(ids)
        scores.append(cum)
        parents.append(frontier.repeat_interleave(k))
        depths.append(torch.full((cum.numel(),), d + 1, device=device))
        if d + 1 == tree.depth:
            break
        best = torch.sort(cum, descending=True, stable=True).indices[:k]
        frontier, frontier_logp = count + best, cum[best]
        count += cum.numel()
        if not worth_expanding(frontier_logp, tree):
            break
        if heads.grounded:
            rows = torch.cat([rows[best // k], embed(ids[best])], dim=-1)
    scores_t = torch.cat(scores)
    overhead = tree.costs.context + calls * tree.costs.head_call
    n, _ = choose_size(scores_t, overhead, tree)
    keep, step_tree = select_step_tree(scores_t, torch.cat(parents), torch.cat(depths), n)
    return torch.cat(tokens)[keep], step_tree
