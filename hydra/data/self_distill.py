r"""Self-distillation: let the base model answer the training prompts, saved as ShareGPT JSON Lines.

Usage:
    python -m hydra.data.self_distill --prompts data/train_prompts.jsonl.gz \
        --output data/self_distill.jsonl --num-prompts 2000 --max-new-tokens 400 --temperature 0 \
        --batch-size 32 --dtype bfloat16 --device cpu          # on a GPU: --device cuda --batch-size 256
Prompts ({"id", "turns": [user turns]}, or ShareGPT records whose human turns are used) are taken in a
seeded shuffled order (--seed; the file is grouped by source) and answered turn by turn, later turns seeing
the model's own earlier replies. Re-running the same command resumes: ids already in --output are skipped,
a line cut off by a kill is dropped and regenerated. Replies cut at --max-new-tokens are kept and marked
"truncated": true (hydra.data.sharegpt then labels no end token after them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm import tqdm
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from hydra.data.jsonl import iter_jsonl, read_resumable
from hydra.data.sharegpt import needs_special_tokens, render_chat
from hydra.model.base_model import eos_token_ids, load_base_model
from hydra.model.kv_cache import TreeKVCache

Prompt = dict[str, Any]
T = TypeVar("T")

# The most likely tokens in which top-p sampling looks for the nucleus before it sorts the whole vocabulary.
TOP_P_CANDIDATES = 64


def read_prompts(path: str | os.PathLike, num_prompts: int | None = None,
                 seed: int | None = 42) -> list[Prompt]:
    """Read prompt records -> [{"id", "turns", "source"?}], shuffled with `seed` (None: file order), first N.

    The same seed gives the same order, so a larger --num-prompts extends a smaller run instead of replacing
    it.
    """
    prompts, seen = [], set()
    for line_no, record in iter_jsonl(path):
        prompt = _to_prompt(record)
        if prompt is None:
            raise ValueError(f"{Path(path).expanduser()}:{line_no}: expected {{'id', 'turns': [str, ...]}} "
                             "or a ShareGPT record whose 'conversations' is a list of {'from', 'value'} "
                             "turns")
        if prompt["id"] not in seen:  # an id is the resume key: keep its first occurrence only
            seen.add(prompt["id"])
            prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{Path(path).expanduser()}: no prompts in the file")
    if seed is not None:
        random.Random(seed).shuffle(prompts)
    return prompts[:num_prompts] if num_prompts is not None else prompts


def _to_prompt(record: Any) -> Prompt | None:
    if not isinstance(record, dict) or record.get("id") is None:
        return None
    if "turns" in record:
        turns = record["turns"]
    elif "conversations" in record:
        conversation = record["conversations"]
        if not isinstance(conversation, list) or not all(isinstance(t, dict) for t in conversation):
            return None
        turns = [t.get("value") for t in conversation if t.get("from") in ("human", "user")]
    else:
        return None
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        return None
    prompt = {"id": str(record["id"]), "turns": turns}
    if "source" in record:
        prompt["source"] = record["source"]
    return prompt


def read_done_ids(path: str | os.PathLike) -> set[str]:
    """Ids already in the output file (see hydra.data.jsonl.read_resumable: a line cut off by a kill is
    dropped and regenerated)."""
    return {str(r["id"]) for r in read_resumable(path) if "id" in r}


@dataclass
class _Rows:
    """The replies being decoded together, one batch row each, sharing `cache` (left-padded to one length).
    A row that has ended may stay in the batch until the next admission drops it (`live` False): its output
    is ignored."""

    keys: list[Hashable]  # the request each row answers
    tokens: list[list[int]]  # what each row has picked so far
    cache: TreeKVCache
    mask: torch.Tensor  # [rows, cache length]: 0 over a row's padding
    positions: torch.Tensor  # [rows]: the position of each row's next token
    logits: torch.Tensor  # [rows, vocab]: the scores each row picks its next token from
    live: torch.Tensor  # [rows] bool: still answering
    next_tokens: torch.Tensor  # [rows]: what each row feeds the next forward


def _prefill(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
             requests: Sequence[tuple[Hashable, str]], spare: int) -> _Rows:
    """One left-padded forward over the requests' texts into a cache with `spare` free slots."""
    texts = [text for _, text in requests]
    batch = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt",
                      add_special_tokens=needs_special_tokens(texts[0], tokenizer)).to(model.device)
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each row counts from its first real token
    cache = TreeKVCache(model.config.num_hidden_layers, mask.shape[1] + spare)
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions,
                   past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    rows = len(texts)
    return _Rows([key for key, _ in requests], [[] for _ in texts], cache, mask, positions[:, -1] + 1, logits,
                 torch.ones(rows, dtype=torch.bool, device=mask.device),
                 torch.zeros(rows, dtype=torch.long, device=mask.device))


def _merge(rows: _Rows, new: _Rows, max_new_tokens: int) -> _Rows:
    """The live rows of `rows` followed by all of `new`, in one cache with room for `max_new_tokens` more.

    Both caches are right-aligned: the live rows keep their slots relative to their last token and lose the
    leading columns none of them attends to any more (left behind by rows that have ended); the shorter side
    is padded on the left with zeros, masked out. Zeros, not empty memory: a masked slot gets zero weight,
    but a NaN in it would still poison the weighted sum. Slots past the length are written before they are
    read, so they stay uninitialised."""
    going = rows.live.nonzero().squeeze(1)
    old, new_rows = len(going), len(new.keys)
    first = int(rows.mask[going].any(0).nonzero()[0, 0])  # columns before it are padding for every live row
    kept, fresh = rows.mask.shape[1] - first, new.mask.shape[1]
    length = max(kept, fresh)
    merged = TreeKVCache(new.cache.num_layers, length + max_new_tokens)
    merged.k, merged.v = ([buf.new_empty(old + new_rows, buf.shape[1], merged.max_len, buf.shape[3])
                           for buf in bufs] for bufs in (new.cache.k, new.cache.v))
    for dst, a, b in zip(merged.k + merged.v, rows.cache.k + rows.cache.v, new.cache.k + new.cache.v,
                         strict=True):
        dst[:old, :, :length - kept] = 0
        dst[:old, :, length - kept:length] = a[going, :, first:rows.cache.length]
        dst[old:, :, :length - fresh] = 0
        dst[old:, :, length - fresh:length] = b[:, :, :new.cache.length]
    merged.length = length
    mask = new.mask.new_zeros(old + new_rows, length)
    mask[:old, length - kept:] = rows.mask[going, first:]
    mask[old:, length - fresh:] = new.mask
    keep = going.tolist()
    cat = torch.cat
    return _Rows([rows.keys[i] for i in keep] + new.keys, [rows.tokens[i] for i in keep] + new.tokens, merged,
                 mask, cat([rows.positions[going], new.positions]), cat([rows.logits[going], new.logits]),
                 cat([rows.live[going], new.live]), cat([rows.next_tokens[going], new.next_tokens]))


def _select(rows: _Rows, going: torch.Tensor) -> None:
    """Keep only the rows `going` (indices, in order)."""
    rows.cache.batch_select_indices(going)
    keep = going.tolist()
    rows.keys, rows.tokens = [rows.keys[i] for i in keep], [rows.tokens[i] for i in keep]
    for name in ("mask", "positions", "logits", "live", "next_tokens"):
        setattr(rows, name, getattr(rows, name)[going])


def _decode(model: PreTrainedModel, rows: _Rows) -> None:
    """One forward over each row's next token: the scores for the token after it."""
    rows.mask = torch.cat([rows.mask, rows.mask.new_ones(len(rows.keys), 1)], dim=1)
    rows.logits = model(input_ids=rows.next_tokens[:, None], attention_mask=rows.mask,
                        position_ids=rows.positions[:, None], past_key_values=rows.cache,
                        use_cache=True).logits[:, -1]
    rows.positions = rows.positions + 1


def _pick(rows: _Rows, pick: Callable[[torch.Tensor], torch.Tensor], stops: torch.Tensor,
          max_new_tokens: int) -> list[int]:
    """Each live row picks its next token from its scores; returns the rows that have thereby ended (stop
    token or max_new_tokens), now no longer live."""
    live = rows.live.nonzero().squeeze(1)
    chosen = pick(rows.logits[live].float())
    rows.next_tokens[live] = chosen
    for row, token in zip(live.tolist(), chosen.tolist(), strict=True):
        rows.tokens[row].append(token)
    full = torch.tensor([len(rows.tokens[row]) >= max_new_tokens for row in live.tolist()],
                        dtype=torch.bool, device=live.device)
    ended = live[torch.isin(chosen, stops) | full]
    rows.live[ended] = False
    return ended.tolist()


@torch.inference_mode()
def stream_replies(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   requests: deque[tuple[Hashable, str]], generation_config: GenerationConfig,
                   stop_ids: Sequence[int], batch_size: int, refill_below: int = 1,
                   top_p_candidates: int = TOP_P_CANDIDATES) -> Iterator[tuple[Hashable, str, bool, int]]:
    """Continue rendered prompts (`requests`: (key, text), taken from the left) in batches of up to
    `batch_size` rows; yield (key, reply, hit_max_new_tokens, new_tokens) as each reply ends.

    With refill_below=1 (the default), or once no request waits, a row leaves the batch as soon as it ends,
    and new requests start only when the batch is empty. Continuous batching (refill_below > 1): when fewer
    than `refill_below` rows are still answering, the next requests are prefilled and join them, and the
    ended rows leave the batch in the same copy of the cache; until then they stay in it, their output
    ignored (a row's share of a step costs less than copying the cache). On a 2-core CPU that was faster on
    one set of prompts and slower on another (README, "Training data"), so it is not the default. The
    caller may add requests while iterating, e.g. a conversation's next turn at the left.

    HF `generate` keeps finished rows to the end of the batch and copies its DynamicCache at every step;
    this loop writes into the project's position-indexed cache (README, "Training data", has the
    measurements). Sampling uses transformers' temperature warper and top-p rule (`sample_top_p`, over
    `top_p_candidates` tokens; 0: the top-p warper on every row); greedy picks the argmax, as `generate`
    does."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    refill_below = min(max(refill_below, 1), batch_size)  # more than batch_size would admit into a full batch
    max_new = generation_config.max_new_tokens
    pick = _token_picker(generation_config, top_p_candidates)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=model.device)

    def replies(rows: _Rows, ended: list[int]) -> Iterator[tuple[Hashable, str, bool, int]]:
        for row in ended:
            picked = rows.tokens[row]
            hit_limit = picked[-1] not in stop_ids
            reply = tokenizer.decode(picked if hit_limit else picked[:-1], skip_special_tokens=True)
            yield rows.keys[row], reply.strip(), hit_limit, len(picked)

    rows: _Rows | None = None
    while True:
        live = 0 if rows is None else int(rows.live.sum())
        if requests and live < refill_below:
            new = _prefill(model, tokenizer, [requests.popleft()
                                              for _ in range(min(batch_size - live, len(requests)))], max_new)
            yield from replies(new, _pick(new, pick, stops, max_new))
            rows = new if not live else _merge(rows, new, max_new)
        if rows is None or not rows.live.any():
            if not requests:
                return
            rows = None
            continue
        if not rows.live.all() and (refill_below == 1 or not requests):
            _select(rows, rows.live.nonzero().squeeze(1))
        _decode(model, rows)
        yield from replies(rows, _pick(rows, pick, stops, max_new))


def generate_replies(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                     generation_config: GenerationConfig, stop_ids: Sequence[int],
                     top_p_candidates: int = TOP_P_CANDIDATES) -> list[tuple[str, bool, int]]:
    """Continue each rendered prompt as one batch (`stream_replies`); one (reply, hit_max_new_tokens,
    new_tokens) per prompt, in order."""
    results = {key: rest for key, *rest in stream_replies(
        model, tokenizer, deque(enumerate(texts)), generation_config, stop_ids, max(len(texts), 1),
        top_p_candidates=top_p_candidates)}
    return [tuple(results[i]) for i in range(len(texts))]


def reply_config(max_new_tokens: int, temperature: float, top_p: float, stop_ids: Sequence[int],
                 pad_token_id: int | None) -> GenerationConfig:
    """The replies' settings: greedy for temperature 0, else temperature and top-p sampling."""
    sampling = temperature > 0
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sampling,
                            temperature=temperature if sampling else None, top_p=top_p if sampling else None,
                            top_k=None, eos_token_id=list(stop_ids), pad_token_id=pad_token_id)


def _token_picker(generation_config: GenerationConfig,
                  top_p_candidates: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """logits [rows, vocab] -> one token per row: the argmax, or a sample after temperature and top-p."""
    if not generation_config.do_sample:
        return lambda logits: logits.argmax(-1)
    temperature = TemperatureLogitsWarper(generation_config.temperature)
    if generation_config.top_p is None or generation_config.top_p >= 1.0:
        return lambda logits: _sample(temperature(None, logits))
    top_p = TopPLogitsWarper(generation_config.top_p)
    return lambda logits: sample_top_p(temperature(None, logits), top_p, top_p_candidates)


def sample_top_p(scores: torch.Tensor, warper: TopPLogitsWarper,
                 candidates: int = TOP_P_CANDIDATES) -> torch.Tensor:
    """One token per row of `scores` [rows, vocab], sampled from softmax(scores) cut by `warper`'s rule
    (transformers' TopPLogitsWarper: the least likely tokens are dropped while their summed probability stays
    <= 1 - top_p; the most likely min_tokens_to_keep are always kept).

    The warper sorts the whole vocabulary, which on a CPU costs more than the model's decoding step (README,
    "Training data"). `top_p_nucleus` applies the rule to the most likely tokens alone where they hold the
    nucleus; the other rows (all of them with candidates=0) go through the warper itself."""
    scores = scores.float()
    if candidates == 0:
        return _sample(warper(None, scores))
    probs, indices, whole = top_p_nucleus(scores, warper, candidates)
    tokens = indices.gather(1, torch.multinomial(probs, 1)).squeeze(1)
    if len(whole):
        tokens[whole] = _sample(warper(None, scores[whole]))
    return tokens


def _sample(scores: torch.Tensor) -> torch.Tensor:
    """One token per row of `scores` [rows, vocab], drawn from softmax(scores)."""
    return torch.multinomial(scores.softmax(-1), 1).squeeze(1)


def top_p_nucleus(scores: torch.Tensor, warper: TopPLogitsWarper, candidates: int = TOP_P_CANDIDATES,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `candidates` most likely tokens of each row: (their probabilities, 0 where the warper's rule drops
    them, [rows, candidates]; their token ids; the rows whose nucleus may reach beyond them).

    When the candidates hold all but at most 1 - top_p of the mass, the rule drops every other token, so it
    can be applied to them alone, with the warper's cumulative sums: the mass outside them plus theirs,
    least likely first. The sums are added in another order than the warper's, so a token within float
    rounding of the threshold may go the other way. Computed in float32 whatever the scores' dtype: in bf16
    the mass outside the candidates would be off by more than the slack allowed for it."""
    top_p, scores = warper.top_p, scores.float()
    k = min(max(candidates, warper.min_tokens_to_keep), scores.shape[-1])  # the kept minimum is candidates
    values, indices = scores.topk(k, dim=-1)  # most likely first
    probs = (values - scores.logsumexp(-1, keepdim=True)).exp()
    outside = (1 - probs.sum(-1, keepdim=True)).clamp(min=0)
    dropped = (outside + probs.flip(-1).cumsum(-1) <= 1 - top_p).flip(-1)
    dropped[:, :warper.min_tokens_to_keep] = False
    # 1e-4 of slack for the rounding of `outside`; rows nearer the threshold go through the warper
    whole = (outside.squeeze(1) > 1 - top_p - 1e-4).nonzero().squeeze(1)
    return probs.masked_fill(dropped, 0), indices, whole


def rendered_contexts(chats: Sequence[list[dict[str, Any]]], tokenizer: PreTrainedTokenizerBase,
                      template: str | None) -> list[tuple[str, int]]:
    """Each chat (ending with a user turn) rendered with the assistant's generation prompt, and its length in
    tokens: the length --max-prompt-tokens is checked against. One tokenizer call for all of them."""
    texts = [render_chat(chat, tokenizer, template, add_generation_prompt=True) for chat in chats]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    return list(zip(texts, lengths, strict=True))


def distill_conversations(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                          prompts: Sequence[Prompt], generation_config: GenerationConfig,
                          stop_ids: Sequence[int], max_prompt_tokens: int, batch_size: int,
                          refill_below: int = 1, template: str | None = None,
                          counts: dict[str, int] | None = None,
                          first_turns: Sequence[tuple[str, int]] | None = None,
                          ) -> Iterator[tuple[Prompt, dict[str, Any] | None]]:
    """Answer every user turn of each prompt in order, turn k's context holding the model's replies 1..k-1;
    yield (prompt, ShareGPT record or None) as each conversation ends, in the order they end.

    First turns are taken in the order of `prompts`; a later turn goes to the front of the queue, so a
    conversation is written soon after it starts. A conversation stops before a turn whose context would
    exceed max_prompt_tokens or after an empty reply; its earlier turns are kept (None: no reply at all).
    `counts` (if given) adds up new_tokens, truncated_replies, empty_reply and context_too_long.
    `first_turns` (if given): each prompt's first turn already rendered, with its length in tokens, so a
    caller that rendered them to sort the prompts does not pay for it twice."""
    counts = {} if counts is None else counts
    for key in ("new_tokens", "truncated_replies", "empty_reply", "context_too_long"):
        counts.setdefault(key, 0)
    histories: list[list[dict[str, Any]]] = [[] for _ in prompts]

    def request(i: int) -> tuple[int, str] | None:
        """Prompt i's next turn rendered after its history, or None if that context is too long."""
        if first_turns is not None and not histories[i]:
            text, length = first_turns[i]
        else:
            turn = prompts[i]["turns"][len(histories[i]) // 2]
            [(text, length)] = rendered_contexts([histories[i] + [{"role": "user", "content": turn}]],
                                                 tokenizer, template)
        if length > max_prompt_tokens:
            counts["context_too_long"] += 1
            return None
        return i, text

    def ended(i: int) -> tuple[Prompt, dict[str, Any] | None]:
        return prompts[i], _to_sharegpt(prompts[i], histories[i]) if histories[i] else None

    queue: deque[tuple[Hashable, str]] = deque()
    for i in range(len(prompts)):
        first = request(i)
        if first is None:
            yield ended(i)
        else:
            queue.append(first)
    for i, reply, hit_limit, n_new in stream_replies(model, tokenizer, queue, generation_config, stop_ids,
                                                     batch_size, refill_below):
        counts["new_tokens"] += n_new
        if not reply:  # keep the turns before it; a record with no reply at all is not written
            counts["empty_reply"] += 1
            yield ended(i)
            continue
        counts["truncated_replies"] += hit_limit
        turn = prompts[i]["turns"][len(histories[i]) // 2]
        histories[i] += [{"role": "user", "content": turn},
                         {"role": "assistant", "content": reply, "truncated": hit_limit}]
        follow_up = request(i) if len(histories[i]) // 2 < len(prompts[i]["turns"]) else None
        if follow_up is None:
            yield ended(i)
        else:
            queue.appendleft(follow_up)


def _to_sharegpt(prompt: Prompt, history: list[dict[str, Any]]) -> dict[str, Any]:
    turns = []
    for message in history:
        turn = {"from": "human" if message["role"] == "user" else "gpt", "value": message["content"]}
        if message.get("truncated"):
            turn["truncated"] = True  # hydra.data.sharegpt then labels the text but no end token
        turns.append(turn)
    record = {"id": prompt["id"], "conversations": turns}
    if "source" in prompt:
        record["source"] = prompt["source"]
    return record


def length_sorted(prompts: Sequence[T], lengths: Sequence[int], window: int) -> list[T]:
    """The prompts sorted by length, longest first, within windows of `window` prompts: requests admitted
    together are padded to the longest of them, and a partial run still covers the prompts roughly in
    order."""
    order = []
    for start in range(0, len(prompts), window):
        order += sorted(range(start, min(start + window, len(prompts))), key=lambda i: -lengths[i])
    return [prompts[i] for i in order]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=os.path.expanduser, required=True,
                        help="JSON Lines of {id, turns: [user turns]} (or ShareGPT)")
    parser.add_argument("--output", type=os.path.expanduser,
                        required=True, help="ShareGPT JSON Lines to write (appended on resume)")
    parser.add_argument("--num-prompts", type=int, default=None, help="use the first N prompts (default all)")
    parser.add_argument("--max-new-tokens", type=int, default=400)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling when temperature > 0")
    # On a GPU a decode step of this small model is kernel-launch bound, so larger batches are almost free
    # there (README, Training data).
    parser.add_argument("--batch-size", type=int, default=32, help="rows decoded together at most")
    parser.add_argument("--refill-below", type=int, default=1,
                        help="continuous batching: admit new prompts when fewer rows than this are decoding "
                             "(default 1: whole batches, one after another)")
    parser.add_argument("--max-prompt-tokens", type=int, default=2048,
                        help="skip a prompt (or stop a conversation) whose rendered context is longer")
    parser.add_argument("--sort-window", type=int, default=16, help="sort by length within this many batches")
    parser.add_argument("--template", choices=["vicuna"], default=None,
                        help="vicuna_v1.1 instead of the tokenizer's chat template")
    parser.add_argument("--seed", type=int, default=42, help="prompt order and sampling seed")
    parser.add_argument("--no-shuffle", action="store_true", help="take prompts in file order")
    parser.add_argument("--base-model", type=os.path.expanduser,
                        default=None, help="HF id or folder (default SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                        help="auto: bfloat16 on a GPU or a CPU with native bf16, else float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or not 1 <= args.refill_below <= args.batch_size:
        parser.error("--batch-size must be at least 1 and --refill-below between 1 and --batch-size")
    try:
        return distill(args)
    except (OSError, ValueError) as e:  # bad input: one line; the output holds only whole records
        print(f"[hydra] error: {e}", file=sys.stderr, flush=True)
        return 1


def distill(args: argparse.Namespace) -> int:
    prompts = read_prompts(args.prompts, args.num_prompts, None if args.no_shuffle else args.seed)
    output = Path(args.output)
    done = read_done_ids(output)
    pending = [p for p in prompts if p["id"] not in done]
    print(f"[hydra.data] {len(prompts)} prompts, {len(prompts) - len(pending)} already in {output}, "
          f"{len(pending)} to generate", flush=True)
    if not pending:
        return 0

    model, tokenizer = load_base_model(args.base_model, dtype=args.dtype, device=args.device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    stop_ids = eos_token_ids(model, tokenizer)
    if not stop_ids:
        raise ValueError("the tokenizer and model define no eos token; cannot tell where a reply ends")
    generation_config = reply_config(args.max_new_tokens, args.temperature, args.top_p, stop_ids,
                                     tokenizer.pad_token_id)
    torch.manual_seed(args.seed)

    first_turns = rendered_contexts([[{"role": "user", "content": p["turns"][0]}] for p in pending],
                                    tokenizer, args.template)
    lengths = [length for _, length in first_turns]
    fits = [i for i, n in enumerate(lengths) if n <= args.max_prompt_tokens]
    if len(fits) < len(pending):
        print(f"[hydra.data] skipping {len(pending) - len(fits)} prompts longer than --max-prompt-tokens "
              f"{args.max_prompt_tokens}", flush=True)
    order = length_sorted(fits, [lengths[i] for i in fits], args.batch_size * args.sort_window)
    pending, first_turns = [pending[i] for i in order], [first_turns[i] for i in order]

    output.parent.mkdir(parents=True, exist_ok=True)
    totals = {"written": 0}
    start = time.perf_counter()
    bar = tqdm(total=len(pending), desc="self-distill", unit="prompt", mininterval=5)
    with output.open("a", encoding="utf-8") as f, bar:
        for _, record in distill_conversations(model, tokenizer, pending, generation_config, stop_ids,
                                               args.max_prompt_tokens, args.batch_size, args.refill_below,
                                               args.template, totals, first_turns):
            if record is not None:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()  # a kill loses only the conversations in flight
                os.fsync(f.fileno())
                totals["written"] += 1
            bar.update(1)
            rate = totals["new_tokens"] / (time.perf_counter() - start)
            bar.set_postfix(tok_s=f"{rate:.0f}", refresh=False)
    elapsed = time.perf_counter() - start
    print(f"[hydra.data] wrote {totals['written']} conversations to {output}: {totals['new_tokens']} new "
          f"tokens in {elapsed:.1f} s ({totals['new_tokens'] / elapsed:.1f} tok/s); "
          f"{totals['truncated_replies']} replies hit --max-new-tokens; {totals['context_too_long']} "
          f"conversations stopped at --max-prompt-tokens, {totals['empty_reply']} empty replies", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
