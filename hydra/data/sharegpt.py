"""ShareGPT conversations -> masked token rows -> packed training rows.

Usage:
    records, stats = load_sharegpt("data/self_distill.jsonl")      # .json list or .jsonl, bad records skipped
    ex = render_and_mask(records[0], tokenizer, max_length=2048)  # {"input_ids", "labels"}: replies labelled
    examples = tokenize_records(records, tokenizer, 2048)         # the same for a whole list
    rows = pack(examples, max_length=2048)                        # + "position_ids", from 0 per conversation
    batch = collate_packed(rows[:8], pad_token_id=tokenizer.pad_token_id)  # tensors, no attention_mask
    model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)  # packed mask

Rendering uses the tokenizer's own chat template; `template="vicuna"` (or a tokenizer without a chat template)
uses FastChat's vicuna_v1.1 template, as the Hydra paper did. Labels are -100 except on the tokens of each
assistant reply plus the turn's end token (e.g. `<|im_end|>`), found from character offsets of the rendered
text.
"""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100

# FastChat's data scripts treat these speaker names as the same two roles.
ROLE_ALIASES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt", "chatgpt": "gpt",
                "bing": "gpt", "bard": "gpt", "model": "gpt", "system": "system"}
_CHAT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}

Record = dict[str, Any]


# -------------------------------------------------------------------------------------------------- loading

def load_sharegpt(path: str | os.PathLike, verbose: bool = True) -> tuple[list[Record], dict[str, Any]]:
    """Read a ShareGPT `.json` (list of records) or `.jsonl` file and keep only well-formed conversations.

    Returns (records, stats). Each record is `{"id": str, "conversations": [{"from", "value"}, ...]}` with
    roles normalised to "system"/"human"/"gpt": an optional leading system turn, then human/gpt alternating,
    at least one gpt turn. A leading gpt turn is dropped (as FastChat does) and so is a trailing human turn
    (it would carry no label). stats = {"loaded": int, "skipped": int, "skipped_by_reason": {reason: count}}.

    Raises FileNotFoundError if the file is missing, ValueError if it is not ShareGPT at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ShareGPT file not found: {path}")
    raw_records, reasons = _read_json_records(path)
    if not any(isinstance(r, dict) and "conversations" in r for r in raw_records):
        raise ValueError(f"{path}: no record has a 'conversations' field; this is not a ShareGPT file "
                         '(expected [{"id": ..., "conversations": [{"from": "human", "value": ...}, ...]}])')
    records: list[Record] = []
    for index, raw in enumerate(raw_records):
        record, reason = normalize_record(raw, default_id=f"{path.stem}-{index}")
        if record is None:
            reasons[reason] += 1
        else:
            records.append(record)
    stats = {"loaded": len(records), "skipped": sum(reasons.values()), "skipped_by_reason": dict(reasons)}
    if verbose:
        print(f"[hydra.data] loaded {len(records)} conversations from {path}, skipped {stats['skipped']}"
              + (f" ({_format_reasons(reasons)})" if reasons else ""), flush=True)
    return records, stats


def _format_reasons(reasons: Counter) -> str:
    return ", ".join(f"{reason}: {count}" for reason, count in reasons.most_common())


def _read_json_records(path: Path) -> tuple[list[Any], Counter]:
    """Parse the whole file as JSON; if that fails, as JSON Lines (whatever the extension says)."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":  # gzip-compressed (e.g. data/self_distill_smollm2.jsonl.gz)
        data = gzip.decompress(data)
    if not data.strip():
        raise ValueError(f"{path}: file is empty")
    reasons: Counter = Counter()
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        parsed = None
    else:
        if isinstance(parsed, list):
            return parsed, reasons
        if isinstance(parsed, dict) and "conversations" in parsed:  # a one-record .jsonl parses as one object
            return [parsed], reasons
        raise ValueError(f"{path}: JSON top level is a {type(parsed).__name__}; "
                         f"expected a list of ShareGPT records")
    records, first_error = [], None
    for line_no, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line.decode("utf-8")))
        except UnicodeDecodeError:
            reasons["invalid utf-8"] += 1
        except json.JSONDecodeError as e:
            reasons["invalid json"] += 1
            first_error = first_error or f"line {line_no}: {e}"
    if not records:
        raise ValueError(f"{path}: not JSON or JSON Lines ({first_error or 'no line decodes as UTF-8'})")
    return records, reasons


def normalize_record(raw: Any, default_id: str = "") -> tuple[Record | None, str]:
    """Validate one raw ShareGPT record. Returns (record, "") or (None, reason it was skipped)."""
    if not isinstance(raw, dict):
        return None, "not an object"
    turns = raw.get("conversations")
    if not isinstance(turns, list):
        return None, "missing conversations"
    clean: list[dict[str, Any]] = []
    for turn in turns:
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            return None, "missing field"
        role = ROLE_ALIASES.get(str(turn["from"]).lower())
        if role is None:
            return None, "unknown role"
        if not isinstance(turn["value"], str):
            return None, "non-string turn"
        if not turn["value"].strip():
            return None, "empty turn"
        clean.append({"from": role, "value": turn["value"]})
        if turn.get("truncated"):  # a self-distilled reply cut at max-new-tokens: no end token to learn
            clean[-1]["truncated"] = True
    system = clean[:1] if clean and clean[0]["from"] == "system" else []
    body = clean[len(system):]
    if body and body[0]["from"] == "gpt":  # FastChat drops a leading reply whose question is missing
        body = body[1:]
    if body and body[-1]["from"] == "human":  # nothing to learn from a final question
        body = body[:-1]
    if any(turn["from"] != ("human", "gpt")[i % 2] for i, turn in enumerate(body)):
        return None, "bad role order"
    if not body:
        return None, "no gpt turn"
    record_id = raw.get("id")
    return {"id": str(record_id) if record_id is not None else default_id, "conversations": system + body}, ""


# ------------------------------------------------------------------------------------------------ rendering

def to_messages(conversation: Record | Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A ShareGPT record / turn list (or chat messages already) -> [{"role", "content"[, "truncated"]}]."""
    turns = conversation["conversations"] if isinstance(conversation, dict) else conversation
    messages = []
    for turn in turns:
        if "role" in turn:
            message = {"role": turn["role"], "content": turn["content"]}
        else:
            message = {"role": _CHAT_ROLES[ROLE_ALIASES[str(turn["from"]).lower()]], "content": turn["value"]}
        if turn.get("truncated"):
            message["truncated"] = True
        messages.append(message)
    return messages


def uses_vicuna(tokenizer: PreTrainedTokenizerBase, template: str | None) -> bool:
    if template not in (None, "vicuna", "chat_template"):
        raise ValueError(f"unknown template {template!r}; use None (tokenizer's own) or 'vicuna'")
    return template == "vicuna" or not getattr(tokenizer, "chat_template", None)


def render_chat(messages: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerBase,
                template: str | None = None, add_generation_prompt: bool = False) -> str:
    """Render chat messages to text with the tokenizer's chat template, or FastChat vicuna_v1.1."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    if uses_vicuna(tokenizer, template):
        return _render_vicuna(plain, tokenizer.eos_token, add_generation_prompt)
    return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=add_generation_prompt)


def _render_vicuna(messages: list[dict[str, str]], eos_token: str | None, add_generation_prompt: bool) -> str:
    # get_conversation_template("vicuna") returns this template; importing it directly avoids loading all of
    # FastChat's model adapters, which is slow.
    from fastchat.conversation import get_conv_template

    conv = get_conv_template("vicuna_v1.1")
    if eos_token:  # end replies with the model's real stop token ("</s>" for Llama, what vicuna uses anyway)
        conv.sep2 = eos_token
    if messages and messages[0]["role"] == "system":
        conv.set_system_message(messages[0]["content"])
        messages = messages[1:]
    for message in messages:
        conv.append_message(conv.roles[0] if message["role"] == "user" else conv.roles[1], message["content"])
    if add_generation_prompt:
        conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def render_with_spans(messages: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerBase,
                      template: str | None = None, user_turns: bool = False,
                      ) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return the text and the [start, end) character span of every assistant reply
    (and, with user_turns, of every user turn's text), in order.

    Each span starts where the template puts that turn's text (`_turn_start`). A reply span covers the reply
    text plus the end-of-turn token right after it (the eos or another special token, possibly after
    whitespace), never the role header; a user span is the turn's text alone. No span ends in whitespace: what
    follows a turn's text may be the template's own (" [/INST]").
    """
    text = render_chat(messages, tokenizer, template)
    markers = _end_markers(tokenizer, template)
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role != "assistant" and not (user_turns and role == "user" and content.strip()):
            continue
        start = _turn_start(messages, i, text, tokenizer, template)
        if not text.startswith(content, start):
            content = content.strip()  # some templates trim message content
        if start < cursor or not text.startswith(content, start):
            raise _rewritten(role, i)
        end = start + len(content.rstrip())
        if role == "assistant" and not message.get("truncated"):
            end = _include_end_marker(text, end, markers)
        spans.append((start, end))
        cursor = end
    return text, spans


_PLACEHOLDER = "\ue000turn\ue000"  # private-use characters: in no real turn, and no template trims them


def _turn_start(messages: Sequence[dict[str, Any]], i: int, text: str, tokenizer: PreTrainedTokenizerBase,
                template: str | None) -> int:
    """Where turn i's text starts in `text`: render the conversation up to turn i with a placeholder for its
    text. Searching for the text itself could match the system prompt, an earlier turn or the template's own
    markup. Raises ValueError if the template rewrites the placeholder or renders what precedes turn i
    differently once later turns follow (some templates drop earlier turns)."""
    probe = render_chat([*messages[:i], {**messages[i], "content": _PLACEHOLDER}], tokenizer, template)
    start = probe.find(_PLACEHOLDER)
    role = messages[i]["role"]
    if start < 0:
        raise _rewritten(role, i)
    if not text.startswith(probe[:start]):
        raise ValueError(f"{role} turn {i} is not where the chat template renders it once later turns "
                         f"follow; the template hides or rewrites earlier turns")
    return start


def _rewritten(role: str, i: int) -> ValueError:
    return ValueError(f"{role} turn {i} not found verbatim in the rendered conversation; "
                      f"the chat template rewrites message content")


def _end_markers(tokenizer: PreTrainedTokenizerBase, template: str | None) -> list[str]:
    markers = [tokenizer.eos_token] if tokenizer.eos_token else []
    markers += [t for t in tokenizer.all_special_tokens if t and t not in markers]
    return sorted(markers, key=len, reverse=True)  # longest first so "<|im_end|>" beats a shorter prefix


def _include_end_marker(text: str, end: int, markers: list[str]) -> int:
    """Extend a reply span over the end-of-turn token that follows it, if one follows (after whitespace)."""
    pos = end
    while pos < len(text) and text[pos].isspace():
        pos += 1
    for marker in markers:
        if text.startswith(marker, pos):
            return pos + len(marker)
    return end


def _require_fast(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("render_and_mask needs a fast tokenizer (return_offsets_mapping)")


def render_and_mask(conversation: Record | Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerBase,
                    max_length: int, template: str | None = None, user_turns: bool = False,
                    ) -> dict[str, list[int]]:
    """Tokenize one conversation; labels are the token ids on assistant replies (+ end token), else -100.

    Args:
        conversation: a ShareGPT record, its "conversations" list, or chat messages ({"role", "content"}).
        tokenizer: a fast tokenizer (character offsets are needed).
        max_length: truncate to this many tokens.
        template: None = the tokenizer's chat template (vicuna_v1.1 if it has none); "vicuna" = vicuna_v1.1.
        user_turns: also label the text of the user turns (never the system prompt or the template's markup).
    """
    _require_fast(tokenizer)
    text, spans = render_with_spans(to_messages(conversation), tokenizer, template, user_turns)
    encoding = tokenizer(text, return_offsets_mapping=True, truncation=False,
                         add_special_tokens=needs_special_tokens(text, tokenizer))
    input_ids = list(encoding["input_ids"])[:max_length]
    labels = [IGNORE_INDEX] * len(input_ids)
    span_index = 0
    for t, (tok_start, tok_end) in enumerate(encoding["offset_mapping"][:len(input_ids)]):
        if tok_end <= tok_start:  # zero-width tokens (an added bos) belong to no reply
            continue
        while span_index < len(spans) and spans[span_index][1] <= tok_start:
            span_index += 1
        if span_index == len(spans):
            break
        # Overlap, not containment: with vicuna the first reply token is " word", straddling ": word".
        if tok_end > spans[span_index][0]:
            labels[t] = input_ids[t]
    return {"input_ids": input_ids, "labels": labels}


def needs_special_tokens(text: str, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Let the tokenizer add its bos unless the rendered text already starts with it (Llama-3 templates)."""
    bos = tokenizer.bos_token
    return not (bos and text.startswith(bos))


def tokenize_records(records: Iterable[Record], tokenizer: PreTrainedTokenizerBase, max_length: int,
                     template: str | None = None, user_turns: bool = False) -> list[dict[str, list[int]]]:
    """render_and_mask over many records, dropping those with no labelled token left after truncation."""
    _require_fast(tokenizer)  # before the loop: an error about the tokenizer names no record
    examples, dropped = [], 0
    for index, record in enumerate(records):
        try:
            example = render_and_mask(record, tokenizer, max_length, template, user_turns)
        except ValueError as e:  # say which record: a template that changes turns fails first on a chat
            # long enough to show it, which may be far into the file
            name = record.get("id", f"#{index}") if isinstance(record, dict) else f"#{index}"
            raise ValueError(f"record {name}: {e}") from e
        if any(label != IGNORE_INDEX for label in example["labels"]):
            examples.append(example)
        else:
            dropped += 1
    if dropped:
        print(f"[hydra.data] dropped {dropped} conversations with no reply token within {max_length} tokens",
              flush=True)
    return examples


# -------------------------------------------------------------------------------------------------- packing

def pack(examples: Iterable[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Greedily concatenate tokenized conversations into rows of at most max_length tokens.

    Each row gets position_ids restarting at 0 for every conversation, which is how transformers (5.x) detects
    packed sequences and builds a block-diagonal causal mask, but only when the model is called with no
    attention_mask and use_cache=False (with a KV cache, even an empty one, it assumes one plain sequence).
    A conversation longer than max_length is truncated, never split across rows. Order is kept.
    """
    rows: list[dict[str, list[int]]] = []
    row = _empty_row()
    for example in examples:
        ids, labels = example["input_ids"][:max_length], example["labels"][:max_length]
        if not ids:
            continue
        if len(row["input_ids"]) + len(ids) > max_length:
            rows.append(row)
            row = _empty_row()
        row["input_ids"] += ids
        row["labels"] += labels
        row["position_ids"] += range(len(ids))
    if row["input_ids"]:
        rows.append(row)
    return rows


def _empty_row() -> dict[str, list[int]]:
    return {"input_ids": [], "labels": [], "position_ids": []}


def collate_packed(rows: Sequence[dict[str, list[int]]],
                   pad_token_id: int | None = 0) -> dict[str, torch.Tensor]:
    """Right-pad packed rows into a batch: input_ids, labels (-100 on pad), position_ids.

    Pad positions count 0, 1, ... so they form a sequence of their own that no real token attends to. No
    attention_mask is returned on purpose: transformers only infers the packed block-diagonal mask when it is
    None (and use_cache=False).
    """
    width = max(len(row["input_ids"]) for row in rows)
    pad_id = 0 if pad_token_id is None else pad_token_id
    input_ids, labels, position_ids = [], [], []
    for row in rows:
        n_pad = width - len(row["input_ids"])
        input_ids.append(list(row["input_ids"]) + [pad_id] * n_pad)
        labels.append(list(row["labels"]) + [IGNORE_INDEX] * n_pad)
        position_ids.append(list(row["position_ids"]) + list(range(n_pad)))
    return {"input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(position_ids, dtype=torch.long)}
