"""hydra.data.self_distill: resumable generation (tiny random Llama with the real SmolLM2 tokenizer)."""

from __future__ import annotations

import json
from collections import deque

import pytest
import torch
from helpers import save_tiny_model
from transformers import GenerationConfig, TopPLogitsWarper

from hydra.data.self_distill import (
    _decode,
    _merge,
    _pick,
    _prefill,
    distill_conversations,
    generate_replies,
    length_sorted,
    main,
    read_done_ids,
    read_prompts,
    sample_top_p,
    stream_replies,
    top_p_nucleus,
)
from hydra.data.sharegpt import load_sharegpt, render_chat
from hydra.model.base_model import load_base_model

PROMPTS = [
    {"id": "p0", "source": "t", "turns": ["Say hello."]},
    {"id": "p1", "source": "t", "turns": ["Name a colour.", "And another one?"]},
    {"id": "p2", "source": "t", "turns": ["What is 1 + 1?"]},
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny_llama"), context=512) / "base")


@pytest.fixture()
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def run(prompt_file, output, model, num_prompts):
    return main(["--prompts", str(prompt_file), "--output", str(output), "--num-prompts", str(num_prompts),
                 "--batch-size", "2", "--max-new-tokens", "6", "--temperature", "0", "--no-shuffle",
                 "--base-model", model, "--dtype", "float32", "--device", "cpu"])


def output_ids(path):
    return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_resume_writes_no_duplicates(tmp_path, prompt_file, tiny_model):
    output = tmp_path / "out" / "distill.jsonl"
    assert run(prompt_file, output, tiny_model, 2) == 0  # stands for a run killed after its first batch
    assert sorted(output_ids(output)) == ["p0", "p1"]
    first_lines = output.read_text(encoding="utf-8")
    assert run(prompt_file, output, tiny_model, 3) == 0
    assert output.read_text(encoding="utf-8").startswith(first_lines)  # earlier records untouched
    assert sorted(output_ids(output)) == ["p0", "p1", "p2"]
    assert run(prompt_file, output, tiny_model, 3) == 0  # nothing left to do
    assert sorted(output_ids(output)) == ["p0", "p1", "p2"]

    records, stats = load_sharegpt(output)  # the output is valid ShareGPT training data
    assert stats["skipped"] == 0 and len(records) == 3
    multi = next(r for r in records if r["id"] == "p1")["conversations"]
    assert [t["from"] for t in multi] == ["human", "gpt", "human", "gpt"]
    assert [multi[0]["value"], multi[2]["value"]] == PROMPTS[1]["turns"]
    # 6 new tokens from a random model: replies are cut at the limit, kept and marked.
    assert all(t.get("truncated") for t in multi if t["from"] == "gpt")


def test_truncated_last_line_is_repaired(tmp_path, prompt_file, tiny_model):
    output = tmp_path / "distill.jsonl"
    assert run(prompt_file, output, tiny_model, 2) == 0
    with output.open("a", encoding="utf-8") as f:
        f.write('{"id": "p2", "conversations": [{"from": "human", "val')  # killed mid-write
    assert read_done_ids(output) == {"p0", "p1"}
    assert output.read_text(encoding="utf-8").endswith("}\n")  # the partial line was cut off
    with output.open("a", encoding="utf-8") as f:
        f.write('{"id": "p2", "conv')
    assert run(prompt_file, output, tiny_model, 3) == 0
    ids = output_ids(output)  # every line parses
    assert sorted(ids) == ["p0", "p1", "p2"]


@pytest.fixture(scope="module")
def tiny_loaded(tiny_model):
    model, tokenizer = load_base_model(tiny_model, dtype="float32")
    texts = [render_chat([{"role": "user", "content": q}], tokenizer, None, add_generation_prompt=True)
             for q in ["Say hello.", "Name a colour, any colour you like, and say why.", "What is 1 + 1?"]]
    return model, tokenizer, texts


def test_rows_leaving_the_batch_keep_generate_greedy_replies(tiny_loaded):
    """Rows that stop early leave the batch and its cache; every reply still equals HF `generate`'s."""
    model, tokenizer, texts = tiny_loaded
    batch = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
    free = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=None)[:, batch["input_ids"].shape[1]:]
    stop = int(free[1, 3])  # a token the second row picks at its 4th step: it stops there, the others may not
    config = GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=[stop],
                              pad_token_id=tokenizer.pad_token_id)
    expected = model.generate(**batch, generation_config=config)[:, batch["input_ids"].shape[1]:]
    replies = generate_replies(model, tokenizer, texts, config, [stop])
    lengths = []
    for (reply, hit_limit, n_new), row in zip(replies, expected, strict=True):
        stops = (row == stop).nonzero()
        n = int(stops[0, 0]) + 1 if len(stops) else len(row)
        assert (n_new, hit_limit) == (n, not len(stops))
        assert reply == tokenizer.decode(row[:n if hit_limit else n - 1], skip_special_tokens=True).strip()
        lengths.append(n_new)
    assert lengths[1] <= 4 and max(lengths) == 12  # the batch did shrink before it ended


def _forward_shapes(model):
    """Record (rows, tokens) of every forward of `model`; returns the list and the hook handle."""
    shapes = []
    handle = model.register_forward_pre_hook(
        lambda _, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    return shapes, handle


@pytest.mark.parametrize("refill_below, merges", [(2, True), (1, False)])
def test_refilled_rows_give_the_replies_of_prompts_answered_alone(tiny_loaded, refill_below, merges):
    """Continuous batching: prompts admitted while other rows are mid-reply (their caches merged at another
    padding) answer exactly as each prompt alone; with refill_below=1 batches never mix."""
    model, tokenizer, texts = tiny_loaded
    more = ["Why is the sky blue? Answer in one long sentence.", "Hi"]
    texts = texts + [render_chat([{"role": "user", "content": q}], tokenizer, None,
                                 add_generation_prompt=True) for q in more]
    first = tokenizer(texts[:1], return_tensors="pt", add_special_tokens=False)
    free = model.generate(**first, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=None)[0, first["input_ids"].shape[1]:]
    stop = int(free[2])  # ends some replies early
    config = GenerationConfig(max_new_tokens=10, do_sample=False)
    alone = [generate_replies(model, tokenizer, [t], config, [stop])[0] for t in texts]
    assert any(n < 10 for _, _, n in alone) and any(n == 10 for _, _, n in alone)

    shapes, handle = _forward_shapes(model)
    try:
        streamed = {key: tuple(rest) for key, *rest in stream_replies(
            model, tokenizer, deque(enumerate(texts)), config, [stop], batch_size=2,
            refill_below=refill_below)}
    finally:
        handle.remove()
    assert [streamed[i] for i in range(len(texts))] == alone
    assert max(rows for rows, _ in shapes) <= 2
    # a prefill followed by a decoding step over more rows than it prefilled: new rows joined live ones
    joined = any(t > 1 and shapes[i + 1][0] > rows for i, (rows, t) in enumerate(shapes[:-1]))
    assert joined == merges


def test_merged_rows_score_as_if_alone(tiny_loaded):
    """After a merge (a short prompt joining rows of two lengths three tokens into their replies, after a
    longer one has ended, then a long prompt joining them) every row's scores equal those of its prompt
    decoded alone."""
    model, tokenizer, texts = tiny_loaded
    long_text = render_chat([{"role": "user", "content": "Why is the sky blue? " * 8}], tokenizer, None,
                            add_generation_prompt=True)
    prompts = {0: texts[1], 1: texts[0], 4: texts[2], 2: "Hi", 3: long_text}
    greedy = lambda logits: logits.argmax(-1)  # noqa: E731
    no_stop = torch.tensor([], dtype=torch.long)

    def alone(key, tokens):
        rows = _prefill(model, tokenizer, [(key, prompts[key])], 8)
        for token in tokens:
            rows.next_tokens[:] = token
            _decode(model, rows)
        return rows.logits[0]

    with torch.inference_mode():
        rows = _prefill(model, tokenizer, [(key, prompts[key]) for key in (0, 1, 4)], 8)
        for _ in range(3):
            _pick(rows, greedy, no_stop, 8)
            _decode(model, rows)
        rows.live[0] = False  # the longest prompt has ended: its leading columns go in the next merge
        _pick(rows, greedy, no_stop, 8)
        for key in (2, 3):  # shorter, then longer than the live rows' context
            new = _prefill(model, tokenizer, [(key, prompts[key])], 8)
            _pick(new, greedy, no_stop, 8)
            rows = _merge(rows, new, 8)
            assert rows.mask[:, 0].any()  # no column left that no row attends to
            if key == 2:
                _decode(model, rows)
                _pick(rows, greedy, no_stop, 8)
        _decode(model, rows)
        assert rows.keys == [1, 4, 2, 3] and rows.live.all()
        for row, key in enumerate(rows.keys):
            torch.testing.assert_close(rows.logits[row], alone(key, rows.tokens[row]), atol=1e-5, rtol=1e-5)


def test_requests_added_while_streaming_are_answered(tiny_loaded):
    """A conversation's next turn is queued while the stream runs (self_distill's multi-turn prompts)."""
    model, tokenizer, texts = tiny_loaded
    config = GenerationConfig(max_new_tokens=4, do_sample=False)
    queue = deque([("a", texts[0]), ("b", texts[1])])
    seen = []
    for key, *_ in stream_replies(model, tokenizer, queue, config, [], batch_size=2):
        seen.append(key)
        if key == "a":
            queue.appendleft(("a2", texts[2]))
    assert sorted(seen) == ["a", "a2", "b"]


@pytest.mark.parametrize("flags", [["--batch-size", "0"], ["--refill-below", "0"],
                                   ["--batch-size", "4", "--refill-below", "5"]])
def test_bad_batch_flags_are_one_error(tmp_path, prompt_file, flags, capsys):
    with pytest.raises(SystemExit):
        main(["--prompts", str(prompt_file), "--output", str(tmp_path / "o.jsonl"), *flags])
    assert "--refill-below between 1 and --batch-size" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_refill_below_above_the_batch_is_the_batch(tiny_loaded):
    model, tokenizer, texts = tiny_loaded
    config = GenerationConfig(max_new_tokens=3, do_sample=False)
    replies = list(stream_replies(model, tokenizer, deque(enumerate(texts)), config, [], batch_size=2,
                                  refill_below=5))
    assert sorted(key for key, *_ in replies) == [0, 1, 2]


def test_conversations_streamed_together_equal_conversations_answered_alone(tiny_loaded):
    """Multi-turn prompts in a continuously refilled batch give the records and counts of each prompt answered
    alone, including a conversation stopped by max_prompt_tokens after its first turn."""
    model, tokenizer, _ = tiny_loaded
    prompts = [{"id": f"q{i}", "turns": [f"Question {i}: " + "why? " * (3 * i)] + ["And then?"] * (i % 3)}
               for i in range(7)]
    config = GenerationConfig(max_new_tokens=5, do_sample=False)
    stop = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)

    def answer(group, batch_size):
        counts = {}
        records = {p["id"]: r for p, r in distill_conversations(model, tokenizer, group, config, [stop], 75,
                                                                batch_size, batch_size, counts=counts)}
        return records, counts

    together = answer(prompts, 3)
    alone = [answer([p], 1) for p in prompts]
    assert together[0] == {k: v for records, _ in alone for k, v in records.items()}
    assert together[1] == {key: sum(c[key] for _, c in alone) for key in together[1]}
    assert together[1]["context_too_long"] > 0 and together[1]["truncated_replies"] > 0
    assert any(len(r["conversations"]) >= 4 for r in together[0].values())  # a later turn went through too


def test_first_turns_rendered_by_the_caller_are_not_rendered_again(tiny_loaded, monkeypatch):
    """distill() renders the first turns to sort the prompts and passes them on: the records are the same,
    only later turns are rendered here, and a given length over max_prompt_tokens stops the conversation."""
    import hydra.data.self_distill as self_distill

    model, tokenizer, _ = tiny_loaded
    prompts = [{"id": f"q{i}", "turns": [f"Question {i}?"] + ["And then?"] * (i % 2)} for i in range(4)]
    config = GenerationConfig(max_new_tokens=4, do_sample=False)
    stop = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    rendered = [render_chat([{"role": "user", "content": p["turns"][0]}], tokenizer, None,
                            add_generation_prompt=True) for p in prompts]
    first_turns = [(text, len(tokenizer(text, add_special_tokens=False)["input_ids"])) for text in rendered]
    calls = []
    monkeypatch.setattr(self_distill, "render_chat", lambda *a, **k: calls.append(a) or render_chat(*a, **k))

    def records(given, counts=None):
        calls.clear()
        answered = distill_conversations(model, tokenizer, prompts, config, [stop], 200, 2, counts=counts,
                                         first_turns=given)
        return {p["id"]: r for p, r in answered}

    assert records(first_turns) == records(None)
    rendered_here = len(calls)  # every turn
    records(first_turns)
    assert rendered_here - len(calls) == len(prompts) and len(calls) > 0  # the later turns only
    counts = {}
    too_long = [(text, 201 if i == 0 else n) for i, (text, n) in enumerate(first_turns)]
    assert records(too_long, counts)["q0"] is None and counts["context_too_long"] == 1


def test_stream_rejects_an_empty_batch(tiny_loaded):
    model, tokenizer, texts = tiny_loaded
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        next(stream_replies(model, tokenizer, deque([(0, texts[0])]), GenerationConfig(max_new_tokens=2), [],
                            batch_size=0))


def test_sampling_applies_temperature_and_top_p(tiny_loaded):
    model, tokenizer, texts = tiny_loaded
    greedy = GenerationConfig(max_new_tokens=10, do_sample=False)
    nucleus_of_one = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1.0, top_p=1e-6)
    torch.manual_seed(0)
    assert generate_replies(model, tokenizer, texts, nucleus_of_one, []) == \
        generate_replies(model, tokenizer, texts, greedy, [])
    sampled = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1.0, top_p=1.0)
    torch.manual_seed(0)
    first = generate_replies(model, tokenizer, texts, sampled, [])
    torch.manual_seed(0)
    assert generate_replies(model, tokenizer, texts, sampled, []) == first  # seeded: reproducible
    assert first != generate_replies(model, tokenizer, texts, greedy, [])


def _scores(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Rows from flat to peaked, so some nuclei fit in a few candidates and some do not."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen) * torch.linspace(0.5, 12.0, rows)[:, None]


@pytest.mark.parametrize("min_keep", [1, 3])
def test_top_p_nucleus_is_the_warpers_distribution(min_keep):
    """On rows whose nucleus fits in the candidates, the candidates' kept probabilities are transformers'
    TopPLogitsWarper distribution; the other rows are flagged for the warper itself."""
    scores, warper = _scores(64, 500, seed=0), TopPLogitsWarper(0.9, min_tokens_to_keep=min_keep)
    probs, indices, whole = top_p_nucleus(scores, warper, candidates=24)
    expected = warper(None, scores).softmax(-1)
    fast = torch.ones(64, dtype=torch.bool)
    fast[whole] = False
    assert 8 < int(fast.sum()) < 56  # both kinds of row are exercised
    got = torch.zeros_like(expected).scatter(1, indices, probs)
    got = got / got.sum(-1, keepdim=True)
    torch.testing.assert_close(got[fast], expected[fast], atol=1e-6, rtol=0)
    assert (expected[~fast] > 0).sum(-1).min() > 24 - 4  # flagged rows keep about as many tokens or more


def test_top_p_nucleus_in_bf16_and_with_more_kept_than_candidates():
    """bf16 scores give the float32 result (in bf16 the mass outside the candidates is too coarse to trust),
    and a min_tokens_to_keep above the candidates widens them instead of dropping kept tokens."""
    scores = _scores(64, 500, seed=2).bfloat16()
    warper = TopPLogitsWarper(0.9)
    for got, want in zip(top_p_nucleus(scores, warper, 24), top_p_nucleus(scores.float(), warper, 24),
                         strict=True):
        assert torch.equal(got, want)
    scores = _scores(64, 500, seed=3)  # float32: bf16 ties at the 40th token would be broken either way
    many = TopPLogitsWarper(0.5, min_tokens_to_keep=40)
    probs, indices, whole = top_p_nucleus(scores, many, candidates=8)
    assert probs.shape[1] == 40 and (probs > 0).sum(-1).min() >= 40
    expected = many(None, scores).softmax(-1)
    fast = torch.ones(64, dtype=torch.bool)
    fast[whole] = False
    got = torch.zeros_like(expected).scatter(1, indices, probs)
    torch.testing.assert_close((got / got.sum(-1, keepdim=True))[fast], expected[fast], atol=1e-6, rtol=0)


def test_sample_top_p_draws_from_the_nucleus():
    """Sampled frequencies match the warper's distribution, on a row sampled from its candidates and on one
    that goes through the warper."""
    base = _scores(64, 40, seed=1)
    warper = TopPLogitsWarper(0.8)
    _, _, whole = top_p_nucleus(base, warper, candidates=6)
    rows = [int(whole[0]), next(i for i in range(64) if i not in set(whole.tolist()))]
    n = 40_000
    torch.manual_seed(0)
    for row in rows:
        tokens = sample_top_p(base[row].expand(n, -1), warper, candidates=6)
        freq = torch.bincount(tokens, minlength=40).double() / n
        expected = warper(None, base[row:row + 1]).softmax(-1)[0].double()
        assert (freq - expected).abs().max() < 0.01, row
        assert (freq[expected == 0] == 0).all()


def test_read_prompts_order_is_stable(prompt_file):
    shuffled = [p["id"] for p in read_prompts(prompt_file, seed=1)]
    assert sorted(shuffled) == ["p0", "p1", "p2"]
    # A larger N extends a smaller N.
    assert [p["id"] for p in read_prompts(prompt_file, 2, seed=1)] == shuffled[:2]
    assert [p["id"] for p in read_prompts(prompt_file, seed=None)] == ["p0", "p1", "p2"]


def test_prompts_sorted_by_length_within_windows():
    prompts = [{"id": str(i), "turns": ["q"]} for i in range(7)]
    lengths = [5, 9, 1, 7, 3, 8, 2]
    assert [p["id"] for p in length_sorted(prompts, lengths, window=4)] == ["1", "3", "0", "2", "5", "4", "6"]


@pytest.mark.slow
def test_real_model_answers(tmp_path, prompt_file):
    output = tmp_path / "real.jsonl"
    assert main(["--prompts", str(prompt_file), "--output", str(output), "--num-prompts", "1", "--no-shuffle",
                 "--max-new-tokens", "24", "--device", "cpu"]) == 0
    records, _ = load_sharegpt(output)
    assert records[0]["id"] == "p0" and records[0]["conversations"][1]["value"].strip()


@pytest.mark.parametrize("row", [
    {"id": "x", "conversations": "human: hi"},                    # not a list of turns
    {"id": "x", "conversations": ["hi", "there"]},                # turns that are not {from, value}
    {"id": "x", "conversations": [{"from": "gpt", "value": "only a reply"}]},  # no user turn
    {"id": "x", "turns": "hi"},
    ["not", "a", "record"],
])
def test_bad_prompt_rows_name_file_and_line(tmp_path, row, capsys):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps(PROMPTS[0]) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=rf"^{path}:2: expected"):
        read_prompts(path)
    output = tmp_path / "out.jsonl"
    assert main(["--prompts", str(path), "--output", str(output), "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"[hydra] error: {path}:2: ")
    assert not output.exists()


def test_empty_prompt_file_is_an_error(tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    assert main(["--prompts", str(path), "--output", str(tmp_path / "o.jsonl"), "--device", "cpu"]) == 1
    assert capsys.readouterr().err.strip() == f"[hydra] error: {path}: no prompts in the file"


def test_tilde_in_paths(tmp_path, prompt_file, tiny_model, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert run("~/" + prompt_file.name, "~/out/d.jsonl", tiny_model, 1) == 0
    assert len(output_ids(tmp_path / "out" / "d.jsonl")) == 1
