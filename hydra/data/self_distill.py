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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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


@torch.inference_mode()
def generate_replies(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                     generation_config: GenerationConfig, stop_ids: Sequence[int],
                     top_p_candidates: int = TOP_P_CANDIDATES) -> list[tuple[str, bool, int]]:
    """Continue each rendered prompt as one left-padded batch; a row leaves the batch as soon as it stops.

    Two things HF `generate` does cost a CPU dearly here: it keeps a finished row in the batch until the
    batch's longest reply ends, and its DynamicCache copies every layer's keys and values into a new tensor
    at every step. This loop drops finished rows from the batch and writes into the project's
    position-indexed cache instead (README, "Training data", has the measurements). Sampling uses
    transformers' temperature warper and top-p rule (`sample_top_p`, over `top_p_candidates` tokens; 0: the
    top-p warper on every row); greedy picks the argmax, as `generate` does.

    Returns one (reply, hit_max_new_tokens, new_tokens) per prompt."""
    batch = tokenizer(list(texts), padding=True, padding_side="left", return_tensors="pt",
                      add_special_tokens=needs_special_tokens(texts[0], tokenizer)).to(model.device)
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each row counts from its first real token
    pick = _token_picker(generation_config, top_p_candidates)
    stops = torch.tensor(list(stop_ids), device=model.device)
    cache = TreeKVCache(model.config.num_hidden_layers, mask.shape[1] + generation_config.max_new_tokens)
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions,
                   past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    live = torch.arange(len(texts))  # batch row -> prompt index
    next_position = positions[:, -1] + 1
    tokens: list[list[int]] = [[] for _ in texts]
    for step in range(generation_config.max_new_tokens):
        chosen = pick(logits.float())
        for row, token in zip(live.tolist(), chosen.tolist(), strict=True):
            tokens[row].append(token)
        going = ~torch.isin(chosen, stops)
        if step + 1 == generation_config.max_new_tokens or not going.any():
            break
        if not going.all():
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            live, mask, chosen = live[keep.cpu()], mask[keep], chosen[keep]
            next_position = next_position[keep]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        logits = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=next_position[:, None],
                       past_key_values=cache, use_cache=True).logits[:, -1]
        next_position = next_position + 1
    results = []
    for row in tokens:
        hit_limit = row[-1] not in stop_ids
        reply = tokenizer.decode(row if hit_limit else row[:-1], skip_special_tokens=True).strip()
        results.append((reply, hit_limit, len(row)))
    return results


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


def distill_batch(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
                  generation_config: GenerationConfig, stop_ids: Sequence[int], max_prompt_tokens: int,
                  template: str | None = None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Answer every user turn of a batch of prompts in order; turn k's context holds the model's replies
    1..k-1.

    Returns ShareGPT records and counters. A conversation stops before a turn whose context would exceed
    max_prompt_tokens or after an empty reply; its earlier turns are kept.
    """
    counts = {"new_tokens": 0, "truncated_replies": 0, "empty_reply": 0, "context_too_long": 0}
    histories: list[list[dict[str, Any]]] = [[] for _ in prompts]
    alive = [True] * len(prompts)
    for turn in range(max(len(p["turns"]) for p in prompts)):
        active, texts = [], []
        for i, prompt in enumerate(prompts):
            if not alive[i] or turn >= len(prompt["turns"]):
                continue
            messages = histories[i] + [{"role": "user", "content": prompt["turns"][turn]}]
            text = render_chat(messages, tokenizer, template, add_generation_prompt=True)
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) > max_prompt_tokens:
                alive[i] = False
                counts["context_too_long"] += 1
                continue
            active.append(i)
            texts.append(text)
        if not active:
            break
        for i, (reply, hit_limit, n_new) in zip(
                active, generate_replies(model, tokenizer, texts, generation_config, stop_ids), strict=True):
            counts["new_tokens"] += n_new
            if not reply:  # keep the turns before it; a record with no reply at all is not written
                alive[i] = False
                counts["empty_reply"] += 1
                continue
            counts["truncated_replies"] += hit_limit
            histories[i].append({"role": "user", "content": prompts[i]["turns"][turn]})
            histories[i].append({"role": "assistant", "content": reply, "truncated": hit_limit})
    records = [_to_sharegpt(prompt, history)
               for prompt, history in zip(prompts, histories, strict=True) if history]
    return records, counts


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


def length_sorted_batches(prompts: Sequence[Prompt], lengths: Sequence[int], batch_size: int,
                          window: int) -> list[list[Prompt]]:
    """Batches of similar prompt length (less left padding), sorting only within windows of `window` prompts
    so a partial run still covers the prompts roughly in order. Multi-turn prompts are batched together at the
    end: each extra turn is one more generate call for its whole batch, so mixing them in would cost a round
    per batch instead of a few rounds in total."""
    batches = []
    for group in ([i for i, p in enumerate(prompts) if len(p["turns"]) == 1],
                  [i for i, p in enumerate(prompts) if len(p["turns"]) > 1]):
        for start in range(0, len(group), window):
            order = sorted(group[start:start + window], key=lambda i: -lengths[i])
            batches += [[prompts[i] for i in order[b:b + batch_size]]
                        for b in range(0, len(order), batch_size)]
    return batches


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
    parser.add_argument("--batch-size", type=int, default=32)
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

    first_turns = [render_chat([{"role": "user", "content": p["turns"][0]}], tokenizer, args.template,
                               add_generation_prompt=True) for p in pending]
    lengths = [len(ids) for ids in tokenizer(first_turns, add_special_tokens=False)["input_ids"]]
    fits = [i for i, n in enumerate(lengths) if n <= args.max_prompt_tokens]
    if len(fits) < len(pending):
        print(f"[hydra.data] skipping {len(pending) - len(fits)} prompts longer than --max-prompt-tokens "
              f"{args.max_prompt_tokens}", flush=True)
    pending, lengths = [pending[i] for i in fits], [lengths[i] for i in fits]
    batches = length_sorted_batches(pending, lengths, args.batch_size, args.batch_size * args.sort_window)

    output.parent.mkdir(parents=True, exist_ok=True)
    totals = {"written": 0, "new_tokens": 0, "truncated_replies": 0, "empty_reply": 0, "context_too_long": 0}
    start = time.perf_counter()
    bar = tqdm(total=len(pending), desc="self-distill", unit="prompt")
    with output.open("a", encoding="utf-8") as f, bar:
        for batch in batches:
            records, counts = distill_batch(model, tokenizer, batch, generation_config, stop_ids,
                                            args.max_prompt_tokens, args.template)
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            f.flush()  # a kill loses at most the batch in flight
            os.fsync(f.fileno())
            for key, value in counts.items():
                totals[key] += value
            totals["written"] += len(records)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{totals['new_tokens'] / (time.perf_counter() - start):.0f}")
    elapsed = time.perf_counter() - start
    print(f"[hydra.data] wrote {totals['written']} conversations to {output}: {totals['new_tokens']} new "
          f"tokens in {elapsed:.1f} s ({totals['new_tokens'] / elapsed:.1f} tok/s); "
          f"{totals['truncated_replies']} replies hit --max-new-tokens; {totals['context_too_long']} "
          f"conversations stopped at --max-prompt-tokens, {totals['empty_reply']} empty replies", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
