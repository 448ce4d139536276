"""hydra.data.sharegpt: loading, masking, templates, packing (tokenizer only, no model)."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from helpers import write_jsonl

from hydra.data.partition_train_test import main as partition_main
from hydra.data.partition_train_test import split_records
from hydra.data.sharegpt import (
    IGNORE_INDEX,
    collate_packed,
    load_sharegpt,
    pack,
    render_and_mask,
    tokenize_records,
)
from hydra.model.base_model import load_tokenizer

CONVERSATION = {"id": "c1", "conversations": [
    {"from": "system", "value": "You are terse."},
    {"from": "human", "value": "What is 2 + 2?"},
    {"from": "gpt", "value": "2 + 2 = 4."},
    {"from": "human", "value": "And times 3?"},
    {"from": "gpt", "value": "That is 12.\nDone."},
]}
REPLIES = ["2 + 2 = 4.", "That is 12.\nDone."]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None  # like a base (non-chat) Llama: falls back to vicuna_v1.1
    return tok


def labelled_runs(example: dict) -> list[list[int]]:
    """Contiguous runs of labelled token ids."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


def test_mask_keeps_exactly_assistant_tokens_and_end_token(tokenizer):
    example = render_and_mask(CONVERSATION, tokenizer, max_length=4096)
    runs = labelled_runs(example)
    assert [tokenizer.decode(run) for run in runs] == [reply + "<|im_end|>" for reply in REPLIES]
    # The role header is context, not target.
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    first = example["labels"].index(runs[0][0])
    assert example["input_ids"][first - len(header):first] == header
    assert all(label == IGNORE_INDEX for label in example["labels"][first - len(header):first])


@pytest.mark.parametrize("use_vicuna", [False, True])
def test_user_turns_option_labels_their_text_only(tokenizer, plain_tokenizer, use_vicuna):
    """--train_on_inputs: the user turns' text is labelled too, never the system prompt or the template's
    markup; a one-letter turn is found in its own turn, not inside the system prompt."""
    tok = plain_tokenizer if use_vicuna else tokenizer
    conv = copy.deepcopy(CONVERSATION)
    conv["conversations"][3]["value"] = "e"  # also a letter of "You are terse."
    replies = [tok.decode(run) for run in labelled_runs(render_and_mask(conv, tok, max_length=4096))]
    both = [tok.decode(run) for run in labelled_runs(render_and_mask(conv, tok, 4096, user_turns=True))]
    assert [r.strip() for r in both] == ["What is 2 + 2?", replies[0].strip(), "e", replies[1].strip()]
    assert "terse" not in "".join(both)


# A Mistral-style template: no system turn, no role header, and it trims every turn's text.
TRIMMING_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'].strip() + eos_token }}{% endif %}{% endfor %}")


def test_trimming_template_spans_each_turn_where_it_renders(tokenizer):
    """Every labelled span starts where the template puts its turn, also when the template trims the text
    and a reply repeats words of the prompt before it; a user turn's trailing space is not stretched over the
    template's " [/INST]"."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TRIMMING_TEMPLATE
    conv = [{"from": "human", "value": "Say INST twice "}, {"from": "gpt", "value": "  INST INST\n"},
            {"from": "human", "value": "\nAgain?"}, {"from": "gpt", "value": "INST INST"}]

    def labelled(user_turns):
        example = render_and_mask(conv, tok, max_length=512, user_turns=user_turns)
        return [tok.decode(run).strip() for run in labelled_runs(example)]

    replies = labelled(False)
    assert replies == ["INST INST" + tok.eos_token] * 2
    both = labelled(True)
    assert both == ["Say INST twice", replies[0], "Again?", replies[1]]


# Renders only the last reply, as templates that drop earlier turns' reasoning do with whole turns.
LAST_REPLY_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'U: ' + message['content'] + '\\n' }}"
    "{% elif loop.last %}{{ 'A: ' + message['content'] + eos_token }}{% endif %}{% endfor %}")
UPPER_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'].upper() + '\\n' }}"
    "{% endfor %}")


@pytest.mark.parametrize("template, problem", [(LAST_REPLY_TEMPLATE, "hides or rewrites earlier turns"),
                                               (UPPER_TEMPLATE, "rewrites message content")])
def test_a_template_that_changes_turns_is_named_with_the_record(tokenizer, template, problem):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    with pytest.raises(ValueError, match=f"record c1: assistant turn 2 .*{problem}"):
        tokenize_records([CONVERSATION], tok, max_length=512)


def test_a_slow_tokenizer_is_named_once_not_with_a_record():
    slow = SimpleNamespace(is_fast=False)
    with pytest.raises(ValueError, match=r"^render_and_mask needs a fast tokenizer"):
        tokenize_records([CONVERSATION], slow, max_length=512)


def test_mask_accepts_chat_messages_and_truncates(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    full = render_and_mask(messages, tokenizer, max_length=4096)
    short = render_and_mask(messages, tokenizer, max_length=len(full["input_ids"]) - 3)
    assert short["input_ids"] == full["input_ids"][:-3] and short["labels"] == full["labels"][:-3]


def test_truncated_reply_gets_no_end_token_label(tokenizer):
    conv = [{"from": "human", "value": "count"}, {"from": "gpt", "value": "1 2 3", "truncated": True}]
    runs = labelled_runs(render_and_mask(conv, tokenizer, max_length=512))
    assert [tokenizer.decode(run) for run in runs] == ["1 2 3"]


@pytest.mark.parametrize("explicit", [False, True])
def test_vicuna_template(tokenizer, plain_tokenizer, explicit):
    tok, template = (tokenizer, "vicuna") if explicit else (plain_tokenizer, None)
    example = render_and_mask(CONVERSATION, tok, max_length=4096, template=template)
    text = tok.decode(example["input_ids"])
    assert text.startswith("You are terse. USER: What is 2 + 2? ASSISTANT:")
    runs = [tok.decode(run) for run in labelled_runs(example)]
    assert [r.strip() for r in runs] == [reply + tok.eos_token for reply in REPLIES]


def test_malformed_records_are_skipped_per_reason(tmp_path, capsys):
    good = CONVERSATION
    alias = {"id": "a", "conversations": [{"from": "user", "value": "q"}, {"from": "chatgpt", "value": "a"}]}
    leading_gpt = {"id": "l", "conversations": [
        {"from": "gpt", "value": "hello"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    bad = [
        {"id": "e", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}]},
        {"id": "o", "conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"},
                                      {"from": "gpt", "value": "a"}]},
        {"id": "m", "conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]},
        {"id": "n", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]},
        {"id": "g", "conversations": [{"from": "human", "value": "only a question"}]},
        {"id": "x"},
    ]
    path = tmp_path / "data.jsonl"
    bad_utf8 = b'{"id": "u", "conversations": "\xff\xfe"}'
    write_jsonl(path, [good, alias, leading_gpt] + bad, raw_lines=[bad_utf8])
    records, stats = load_sharegpt(path)
    assert [r["id"] for r in records] == ["c1", "a", "l"]
    assert records[1]["conversations"] == [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    assert [t["from"] for t in records[2]["conversations"]] == ["human", "gpt"]
    assert stats["loaded"] == 3 and stats["skipped"] == 7
    assert stats["skipped_by_reason"] == {"empty turn": 1, "bad role order": 1, "missing field": 1,
                                          "non-string turn": 1, "no gpt turn": 1, "missing conversations": 1,
                                          "invalid utf-8": 1}
    out = capsys.readouterr().out
    assert f"loaded 3 conversations from {path}, skipped 7 (" in out and "empty turn: 1" in out

    as_json = tmp_path / "data.json"
    as_json.write_text(json.dumps([good, alias] + bad))
    records, stats = load_sharegpt(as_json)
    assert len(records) == 2 and stats["skipped"] == 6


def test_not_sharegpt_raises_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_sharegpt(tmp_path / "nope.json")
    text = tmp_path / "notes.json"
    text.write_text("this is not json\nat all\n")
    with pytest.raises(ValueError, match="notes.json.*not JSON"):
        load_sharegpt(text)
    other = tmp_path / "prompts.jsonl"
    write_jsonl(other, [{"id": "1", "turns": ["hi"]}, {"id": "2", "turns": ["yo"]}])
    with pytest.raises(ValueError, match="prompts.jsonl.*'conversations'"):
        load_sharegpt(other)
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"data": []}))
    with pytest.raises(ValueError, match="obj.json"):
        load_sharegpt(obj)


def test_pack_restarts_positions_and_never_splits():
    examples = [{"input_ids": [i] * n, "labels": [i] * n} for i, n in enumerate([3, 4, 2, 9, 5], 1)]
    rows = pack(examples, max_length=8)
    # 3+4 fit; 2 starts a new row; 9 is truncated to 8 and gets its own row; 5 a new row.
    assert [row["input_ids"] for row in rows] == [[1] * 3 + [2] * 4, [3] * 2, [4] * 8, [5] * 5]
    assert rows[0]["position_ids"] == [0, 1, 2, 0, 1, 2, 3]
    assert rows[2]["position_ids"] == list(range(8))
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) <= 8
        # Every conversation's tokens sit in exactly one row, whole (up to truncation).
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        ids = [row["input_ids"][s] for s in starts]
        assert len(set(ids)) == len(ids)

    batch = collate_packed(rows[:2], pad_token_id=0)
    assert batch["input_ids"].shape == (2, 7) and "attention_mask" not in batch
    assert batch["labels"][1].tolist() == [3, 3] + [IGNORE_INDEX] * 5
    assert batch["position_ids"][1].tolist() == [0, 1, 0, 1, 2, 3, 4]


def test_packed_rows_match_separate_forward(tokenizer):
    """transformers reads position-id restarts as separate sequences: packed logits == one-by-one logits.

    Only with use_cache=False: with a cache (the config default) the packed mask is not inferred."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         intermediate_size=64)).eval()
    examples = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
                {"input_ids": [8, 9, 10, 11], "labels": [8] * 4},
                {"input_ids": [12, 13, 14, 15, 16], "labels": [0] * 5}]
    batch = collate_packed(pack(examples, max_length=8))  # rows of 3+4 and 5 (+2 pad) tokens
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits
        alone = [model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in examples]
    torch.testing.assert_close(packed[0], torch.cat(alone[:2]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[1, :5], alone[2], atol=1e-5, rtol=1e-5)


def test_tokenize_records_and_partition(tmp_path, tokenizer):
    records = [{"id": str(i), "conversations": [{"from": "human", "value": f"q{i}"},
                                                {"from": "gpt", "value": f"answer {i}"}]} for i in range(40)]
    path = tmp_path / "all.json"
    path.write_text(json.dumps(records + [{"id": "bad", "conversations": []}]))
    assert partition_main(["--input", str(path), "--output-dir", str(tmp_path / "split")]) == 0
    train = [json.loads(line) for line in (tmp_path / "split" / "train.jsonl").read_text().splitlines()]
    val = [json.loads(line) for line in (tmp_path / "split" / "val.jsonl").read_text().splitlines()]
    assert (len(train), len(val)) == (38, 2)
    assert sorted(r["id"] for r in train + val) == sorted(r["id"] for r in records)
    assert split_records(list(range(40)), 0.05, 42) == split_records(list(range(40)), 0.05, 42)

    examples = tokenize_records(train, tokenizer, max_length=64)
    assert len(examples) == 38 and all(len(e["input_ids"]) <= 64 for e in examples)


def test_extra_training_files_keep_the_validation_set(tmp_path):
    """--extra-train adds conversations to the training side only: the validation set is the one the
    --input file alone gives, so heads trained on --input before are still scored on unseen conversations."""
    def chats(prefix, n):
        return [{"id": f"{prefix}{i}", "conversations": [{"from": "human", "value": f"q {i}"},
                                                          {"from": "gpt", "value": f"a {i}"}]}
                for i in range(n)]
    first, more = (write_jsonl(tmp_path / "a.jsonl", chats("a", 40)),
                   write_jsonl(tmp_path / "b.jsonl", chats("b", 7)))
    def read(d, name):
        return [json.loads(x)["id"] for x in (tmp_path / d / name).read_text().splitlines()]
    assert partition_main(["--input", str(first), "--output-dir", str(tmp_path / "alone")]) == 0
    assert partition_main(["--input", str(first), "--extra-train", str(more),
                           "--output-dir", str(tmp_path / "more")]) == 0
    assert read("more", "val.jsonl") == read("alone", "val.jsonl")
    assert read("more", "train.jsonl") == read("alone", "train.jsonl") + [f"b{i}" for i in range(7)]
    assert partition_main(["--input", str(first), "--extra-train", str(tmp_path / "missing.jsonl"),
                           "--output-dir", str(tmp_path / "bad")]) == 1
    assert not (tmp_path / "bad" / "train.jsonl").exists()


def test_extra_replies_to_validation_prompts_are_left_out(tmp_path, capsys):
    """A second reply to a validation prompt (same id, e.g. sampled self-distillation of the same prompts)
    must not reach training: the validation conversations' prompts would no longer be unseen."""
    def chats(n, reply):
        return [{"id": f"p{i}", "conversations": [{"from": "human", "value": f"q {i}"},
                                                   {"from": "gpt", "value": f"{reply} {i}"}]}
                for i in range(n)]
    first = write_jsonl(tmp_path / "greedy.jsonl", chats(40, "greedy"))
    sampled = write_jsonl(tmp_path / "sampled.jsonl", chats(40, "sampled"))
    assert partition_main(["--input", str(first), "--extra-train", str(sampled),
                           "--output-dir", str(tmp_path / "split")]) == 0
    def read(name):
        return [json.loads(x) for x in (tmp_path / "split" / name).read_text().splitlines()]
    val_ids = {r["id"] for r in read("val.jsonl")}
    train = read("train.jsonl")
    assert len(val_ids) == 2 and len(train) == 38 + 38
    assert not val_ids & {r["id"] for r in train}
    assert "2 extra-train conversations left out" in capsys.readouterr().out


def test_train_on_inputs_labels_training_rows_only(tmp_path, tokenizer):
    """The option changes the training rows' labels (not their tokens, so the feature cache still fits) and
    never the validation rows', and it gets its own row cache."""
    from hydra.train.data import load_or_build_rows

    chats = [{"id": str(i), "conversations": [{"from": "human", "value": f"question number {i}"},
                                              {"from": "gpt", "value": f"answer {i}"}]} for i in range(40)]
    path = write_jsonl(tmp_path / "chats.jsonl", chats)
    plain = load_or_build_rows(path, tokenizer, 256, tmp_path / "cache")
    inputs = load_or_build_rows(path, tokenizer, 256, tmp_path / "cache", train_on_inputs=True)
    assert len(list((tmp_path / "cache").glob("rows-*.safetensors"))) == 2
    (train, val), (train_in, val_in) = plain, inputs
    assert val == val_in
    assert [r["input_ids"] for r in train] == [r["input_ids"] for r in train_in]
    labelled = lambda rows: sum(label != IGNORE_INDEX for r in rows for label in r["labels"])  # noqa: E731
    per_chat = len(tokenizer(" question number 1", add_special_tokens=False)["input_ids"])
    assert labelled(train_in) >= labelled(train) + 38 * (per_chat - 1)


def test_a_single_conversation_cannot_be_split(tmp_path, tokenizer, capsys):
    """hydra.train.train --data_path FILE splits the file 95/5; with one conversation the validation share
    (rounded up) would take it: say so instead of "no training conversation left"."""
    from hydra.train.data import build_rows

    one = {"id": "0", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    path = write_jsonl(tmp_path / "one.jsonl", [one])
    with pytest.raises(ValueError, match="1 conversation cannot be split into training and validation sets"):
        build_rows(path, tokenizer, max_length=64)
    assert partition_main(["--input", str(path), "--output-dir", str(tmp_path / "split")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[hydra] error: 1 conversation cannot be split")
    assert "give at least 2" in err[0]
    assert not (tmp_path / "split" / "train.jsonl").exists()
    assert len(split_records([one, one], 0.05, 42)[0]) == 1  # two are enough
