"""`python -m hydra.serve` driven by the official `openai` client on 127.0.0.1: replies equal the library's
own decoding of the same prompt (chat and completions, streamed and not, stop strings, seeded sampling), the
usage block carries tau, requests queue in order, a full queue answers 503 with Retry-After, a client that
leaves frees its place, 8 concurrent clients x 5 requests all get complete, correct replies, and malformed
requests get a 4xx with a message while the server keeps serving. A tiny random model with the default
tokenizer keeps it fast; one slow test serves the real default model."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_helpers import CONTEXT, Server, save_tiny_served_model

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from hydra.inference.loading import load_model, render_prompt  # noqa: E402
from hydra.model.generate import DecodeConfig, generate  # noqa: E402
from hydra.model.pacing import Pacer  # noqa: E402

MODEL = "heads"  # the served name: the heads folder's name


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    heads = save_tiny_served_model(folder)
    server = Server(
        "--model", str(heads), "--dtype", "float32", "--max-queue", "8", "--no-pace",
        log=folder / "server.log"
    )
    model, _ = load_model(str(heads), dtype="float32", device="cpu")
    yield server, model
    server.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", max_retries=0, timeout=120)


def expected(model, prompt_ids, speculative=True, **cfg) -> tuple[str, str, object]:
    """The library's own reply: (text, OpenAI finish reason, GenerationResult)."""
    out = generate(model, prompt_ids, DecodeConfig(**cfg), speculative=speculative)
    reason = "stop" if out.finish_reason == "eos" else "length"
    return model.tokenizer.decode(out.tokens, skip_special_tokens=True), reason, out


def chat_ids(model, text):
    return render_prompt(model.tokenizer, [{"role": "user", "content": text}])


def ask(client, text, stream=False, **kw):
    """One user message through the openai client: (reply text, [finish reasons], usage, number of pieces)."""
    kw.setdefault("temperature", 0)
    messages = [{"role": "user", "content": text}]
    if not stream:
        reply = client.chat.completions.create(model=MODEL, messages=messages, **kw)
        return reply.choices[0].message.content, [reply.choices[0].finish_reason], reply.usage, 1
    parts, finishes, usage = [], [], None
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, stream=True, **kw):
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
        usage = chunk.usage or usage
    return "".join(parts), finishes, usage, len([p for p in parts if p])


# --- replies equal direct decoding --------------------------------------------------------------------------
@pytest.mark.parametrize("speculative", [True, False])
def test_chat_matches_direct_greedy(served, client, speculative):
    _, model = served
    text, reason, out = expected(model, chat_ids(model, "Tell me a story."), max_new_tokens=24)
    got, finishes, usage, _ = ask(client, "Tell me a story.", max_tokens=24,
                                  extra_body={"speculative": speculative})
    assert got == text and text and finishes == [reason]
    assert usage.completion_tokens == len(out.tokens)
    assert usage.prompt_tokens == len(chat_ids(model, "Tell me a story."))
    tau = usage.model_extra["accepted_tokens_per_step"]
    assert tau == pytest.approx(out.tau if speculative else 1.0, abs=1e-4)


def test_chat_stream_matches_direct_greedy(served, client):
    _, model = served
    text, reason, out = expected(model, chat_ids(model, "Hello there"), max_new_tokens=30)
    got, finishes, usage, pieces = ask(client, "Hello there", stream=True, max_tokens=30,
                                       stream_options={"include_usage": True})
    assert got == text and pieces > 3  # it streamed, piece by piece
    assert finishes == [reason]
    assert usage.completion_tokens == len(out.tokens)
    assert usage.model_extra["accepted_tokens_per_step"] == pytest.approx(out.tau, abs=1e-4)


def test_completions_plain_and_streamed(served, client):
    _, model = served
    ids = model.tokenizer("Once upon a time")["input_ids"]
    text, reason, _ = expected(model, ids, max_new_tokens=20)
    reply = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=0)
    assert reply.choices[0].text == text and reply.choices[0].finish_reason == reason
    streamed = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text
    assert (
        client.completions.create(model=MODEL, prompt=ids, max_tokens=20, temperature=0).choices[0].text
        == text
    )


def test_stop_strings_cut_the_reply(served, client):
    """The reply ends before the stop string; usage counts the tokens up to the one that completed it (what
    plain decoding would have produced), not the ones a speculative step decided after it."""
    _, model = served
    full, _, out = expected(model, chat_ids(model, "Tell me a story."), max_new_tokens=24)
    stop = full[8:11]
    want = full[: full.find(stop)]
    needed = next(n for n in range(1, len(out.tokens) + 1)
                  if stop in model.tokenizer.decode(out.tokens[:n], skip_special_tokens=True))
    for stream in (False, True):
        extra = {"stream_options": {"include_usage": True}} if stream else {}
        got, finishes, usage, _ = ask(client, "Tell me a story.", stream, max_tokens=24,
                                      stop=[stop, "\x00never"], **extra)
        assert got == want and finishes == ["stop"], stream
        assert usage.completion_tokens == needed < len(out.tokens), stream
    # a speculative step that decides the stop's last token and more after it counts only up to the stop
    from hydra.serve.engine import _first_stop_prefix

    for start in range(needed):  # the last step decided tokens[start:]
        assert _first_stop_prefix(model.tokenizer, out.tokens, len(out.tokens) - start, [stop]) == needed


def test_seeded_sampling_is_reproducible_and_the_librarys(served, client):
    _, model = served
    text, _, _ = expected(model, chat_ids(model, "Pick a word"), max_new_tokens=16, temperature=1.0, seed=7)
    first = ask(client, "Pick a word", max_tokens=16, temperature=1.0, seed=7)[0]
    assert first == text == ask(client, "Pick a word", max_tokens=16, temperature=1.0, seed=7)[0]
    assert ask(client, "Pick a word", max_tokens=16, temperature=1.0, seed=8)[0] != first


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = served[0].health()
    assert health["status"] == "ok" and health["hydra_heads"] is True


def test_web_chat_page_is_served(served):
    page = httpx.get(served[0].url + "/")
    assert page.status_code == 200 and "Hydra chat" in page.text and "/v1/chat/completions" in page.text


# --- queueing -----------------------------------------------------------------------------------------------
def _stream_first_chunk_time(url, text, max_tokens, times, i):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if '"content": "' in line and '"content": ""' not in line and i not in times:
                times[i] = time.monotonic()
    times[f"end{i}"] = time.monotonic()


def test_requests_are_served_in_arrival_order(served):
    server, _ = served
    times: dict = {}
    threads = []
    for i in range(4):
        t = threading.Thread(target=_stream_first_chunk_time, args=(server.url, f"story {i}", 60, times, i))
        t.start()
        threads.append(t)
        time.sleep(0.3)  # arrival order 0, 1, 2, 3
    for t in threads:
        t.join()
    starts = [times[i] for i in range(4)]
    ends = [times[f"end{i}"] for i in range(4)]
    assert starts == sorted(starts) and ends == sorted(ends)
    for i in range(1, 4):  # batch size 1: each reply starts after the one before it ended
        assert starts[i] >= ends[i - 1] - 0.05


def test_full_queue_503_and_disconnects_free_their_place(served, client):
    """9 long streams fill the running slot and the 8-place queue; the 10th request gets 503 + Retry-After.
    Closing the streams frees every place at once (long before their replies would have ended)."""
    server, _ = served
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "a very long story"}],
        "max_tokens": 900,
        "temperature": 0,
        "stream": True,
    }
    http = httpx.Client(timeout=60)
    streams = []
    try:
        for _ in range(9):
            streams.append(http.stream("POST", server.url + "/v1/chat/completions", json=body))
            streams[-1].__enter__()  # response headers received: the request holds its place
        deadline = time.monotonic() + 30
        while server.health()["waiting"] < 8 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.health()["running"] == 1 and server.health()["waiting"] == 8
        busy = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=30)
        assert busy.status_code == 503
        assert int(busy.headers["Retry-After"]) >= 1 and "busy" in busy.json()["error"]["message"]
    finally:
        for s in streams:
            s.__exit__(None, None, None)
        http.close()
    closed = time.monotonic()
    while server.health()["running"] + server.health()["waiting"] and time.monotonic() - closed < 10:
        time.sleep(0.1)
    health = server.health()
    assert health["running"] == 0 and health["waiting"] == 0, health
    assert health["cancelled"] >= 9
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
    )
    assert reply.choices[0].finish_reason in ("length", "stop")


def test_non_streaming_client_that_leaves_frees_its_place(tmp_path):
    """A client that gives up on a running request: the server stops decoding it. The reply must outlast the
    client's 0.5 s whatever text it is, so this server's model never ends a reply by itself and drafts with
    random heads alone (no prompt lookup, which could accept 9 tokens a step on a repetitive reply): 900
    tokens take ~800 steps of a few ms each."""
    server = Server("--model", str(save_tiny_served_model(tmp_path, never_ends=True)), "--dtype", "float32",
                    "--no-pace", "--lookup", "0", log=tmp_path / "server.log")
    try:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "a very long story"}],
            "max_tokens": 900,
            "temperature": 0,
        }
        with pytest.raises(httpx.ReadTimeout):
            reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=0.5)
            pytest.fail(f"the reply came before the client left: {reply.status_code} {reply.text[:300]}")
        deadline = time.monotonic() + 10
        while server.health()["running"] and time.monotonic() < deadline:
            time.sleep(0.1)
        health = server.health()
        assert health["running"] == 0 and health["cancelled"] == 1 and health["served"] == 0, health
    finally:
        server.stop()


def test_load_8_clients_x_5_requests(served, client):
    """Every reply complete and equal to direct greedy decoding of its own prompt; nothing lost."""
    _, model = served
    prompts = {(c, i): f"client {c} asks question {i}" for c in range(8) for i in range(5)}
    want = {}
    for k, p in prompts.items():
        text, reason, _ = expected(model, chat_ids(model, p), max_new_tokens=12)
        want[k] = (text, [reason])

    def one_client(c):
        return {(c, i): ask(client, prompts[c, i], stream=bool(i % 2), max_tokens=12)[:2] for i in range(5)}

    with ThreadPoolExecutor(8) as pool:
        results = {}
        for got in pool.map(one_client, range(8)):
            results.update(got)
    assert results == want


# --- malformed requests -------------------------------------------------------------------------------------
def _post(url, content, path="/v1/chat/completions"):
    return httpx.post(url + path, content=content, headers={"Content-Type": "application/json"}, timeout=30)


GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}


@pytest.mark.parametrize(
    "body, status, message",
    [
        ('{"model": "heads", "messages": [', 400, "not valid JSON"),
        ("[1, 2]", 400, "body"),
        (json.dumps({**GOOD, "frobnicate": 1}), 400, "unknown field 'frobnicate'"),
        (
            json.dumps({**GOOD, "messages": [{"role": "user", "content": "hi", "extra": 1}]}),
            400,
            "unknown field",
        ),
        (json.dumps({k: v for k, v in GOOD.items() if k != "messages"}), 400, "missing field 'messages'"),
        (
            json.dumps({**GOOD, "messages": [{"role": "user", "content": "word " * 2 * CONTEXT}]}),
            400,
            f"context holds {CONTEXT}",
        ),
        (json.dumps({**GOOD, "temperature": 1, "top_p": 0.5}), 400, "top_p=0.5 is not supported"),
        (json.dumps({**GOOD, "n": 2}), 400, "n=2 is not supported"),
        (json.dumps({**GOOD, "max_tokens": 0}), 400, "max_tokens"),
        (json.dumps({**GOOD, "temperature": -1}), 400, "temperature"),
        (json.dumps({**GOOD, "stop": ["a", "b", "c", "d", "e"]}), 400, "at most 4"),
        (json.dumps({**GOOD, "model": "gpt-4"}), 404, "'gpt-4' is not served here"),
        ("", 400, "the request has no body"),
        (json.dumps({**GOOD, "seed": 2**64}), 400, "seed"),  # beyond torch's seeds: not a decoding failure
        (json.dumps({**GOOD, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}), 413, "at most"),
    ],
)
def test_malformed_requests_get_a_4xx_with_a_message(served, body, status, message):
    server, _ = served
    r = _post(server.url, body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]
    ok = _post(server.url, json.dumps(GOOD))  # and the server keeps serving
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]


def test_a_chunked_body_over_the_limit_is_a_413(served):
    """A body sent without Content-Length (chunked) is held to the same 1 MiB as one that declares it."""
    server, _ = served
    big = json.dumps({**GOOD, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}).encode()
    chunks = (big[i : i + 65536] for i in range(0, len(big), 65536))
    r = httpx.post(server.url + "/v1/chat/completions", content=chunks, timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "at most" in r.json()["error"]["message"], r.text
    ok = _post(server.url, json.dumps(GOOD))
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
    small = json.dumps(GOOD).encode()  # and a small chunked body is served as usual
    r = httpx.post(server.url + "/v1/chat/completions", content=iter([small[:10], small[10:]]), timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_null_optional_fields_are_their_defaults(served):
    """OpenAI's spec lets a client send null for an optional field such as stream (some clients do)."""
    server, _ = served
    body = {**GOOD, "stream": None, "stop": None, "seed": None, "n": None, "stream_options": None}
    r = _post(server.url, json.dumps(body))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text


def test_top_p_is_honoured_when_greedy(served, client):
    """With temperature 0 every top_p keeps the most likely token: the greedy reply, not a 400."""
    _, model = served
    text, reason, _ = expected(model, chat_ids(model, "Hello there"), max_new_tokens=8)
    for top_p in (0, 0.5):
        assert ask(client, "Hello there", max_tokens=8, top_p=top_p)[:2] == (text, [reason])


def test_malformed_completions_and_unknown_routes(served):
    server, _ = served
    r = _post(server.url, json.dumps({"model": MODEL, "prompt": ["a", "b"]}), "/v1/completions")
    assert r.status_code == 400 and "one prompt" in r.json()["error"]["message"]
    r = _post(server.url, json.dumps({"model": MODEL, "prompt": [10**9]}), "/v1/completions")
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]


def engine_keeping_configs(model):
    """An Engine over `model` that keeps the DecodeConfig of every job it runs."""
    from hydra.serve.engine import Engine

    engine = Engine(model, has_heads=True)
    working, configs = engine.steps, []

    def capture(job):
        configs.append(job.config)
        return working(job)

    engine.steps = capture
    return engine, configs


def test_lookup_reaches_every_request(served):
    """`--lookup N` becomes each request's DecodeConfig.lookup (without it, DecodeConfig's default); greedy
    replies stay the model's own greedy continuation."""
    from fastapi.testclient import TestClient

    from hydra.model.generate import DecodeConfig
    from hydra.serve.app import create_app

    _, model = served
    engine, configs = engine_keeping_configs(model)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say it twice: one two three."}],
            "max_tokens": 24, "temperature": 0}
    prompt = chat_ids(model, "Say it twice: one two three.")
    want = expected(model, prompt, speculative=False, max_new_tokens=24)[0]
    for lookup in (7, None):
        with TestClient(create_app(engine, MODEL, lookup=lookup)) as http:
            reply = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
            assert reply == want
    assert [c.lookup for c in configs] == [7, DecodeConfig().lookup]


def test_requests_are_paced_unless_seeded(served):
    """With pacing on (the server's default), requests are decoded paced by one Pacer that carries over from
    request to request, with the same greedy reply; a seeded request is not paced, so that its samples
    repeat."""
    from fastapi.testclient import TestClient

    from hydra.serve.app import create_app

    _, model = served
    engine, configs = engine_keeping_configs(model)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 24,
            "temperature": 0}
    with TestClient(create_app(engine, MODEL, pace=True)) as http:
        greedy = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        assert http.post("/v1/chat/completions",
                         json={**body, "temperature": 1, "seed": 3}).status_code == 200
        assert (http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
                == greedy)
    paced = [c.pace for c in configs]
    assert isinstance(paced[0], Pacer) and paced[1] is False and paced[2] is paced[0]
    assert paced[0].probes > 0  # the heads were timed (and the second unseeded request started from that)
    assert greedy == expected(model, chat_ids(model, "Tell me a story."), max_new_tokens=24)[0]


def test_a_next_turn_prefills_only_what_follows_the_previous_request(served):
    """The server keeps a prompt cache: a chat's second turn reuses what the first computed (reported as
    OpenAI's usage.prompt_tokens_details.cached_tokens) and replies as a fresh decoding does, here with
    another conversation's request in between (two entries)."""
    from fastapi.testclient import TestClient

    from hydra.serve.app import create_app
    from hydra.serve.engine import Engine

    _, model = served
    turns = [{"role": "user", "content": "Tell me a story."}]
    body = {"model": MODEL, "max_tokens": 16, "temperature": 0}
    with TestClient(create_app(Engine(model, has_heads=True), MODEL, prompt_cache_entries=2)) as http:
        first = http.post("/v1/chat/completions", json={**body, "messages": turns}).json()
        other = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi."}]
        assert http.post("/v1/chat/completions", json={**body, "messages": other}).status_code == 200
        turns += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                  {"role": "user", "content": "And then?"}]
        second = http.post("/v1/chat/completions", json={**body, "messages": turns, "stream": True,
                                                          "stream_options": {"include_usage": True}})
    events = [json.loads(line[6:]) for line in second.text.splitlines() if line.startswith("data: {")]
    text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    usage = events[-1]["usage"]
    ids = render_prompt(model.tokenizer, turns)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert (len(chat_ids(model, "Tell me a story."))
            <= usage["prompt_tokens_details"]["cached_tokens"] < len(ids))
    assert text == expected(model, ids, max_new_tokens=16)[0]


def test_a_decoding_failure_is_reported_and_the_server_keeps_serving(served):
    """In-process (FastAPI's TestClient): a step that raises gives a 500 / an SSE error event, frees the
    queue place, and the next request is served."""
    from fastapi.testclient import TestClient

    from hydra.serve.app import create_app
    from hydra.serve.engine import Engine

    _, model = served
    engine = Engine(model, has_heads=True)
    working = engine.steps

    def failing(job):
        yield from ()
        raise RuntimeError("boom")

    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "temperature": 0}
    with TestClient(create_app(engine, MODEL)) as http:
        engine.steps = failing
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 500 and "decoding failed: RuntimeError: boom" in r.json()["error"]["message"]
        r = http.post("/v1/chat/completions", json={**body, "stream": True})
        assert '"error"' in r.text and "boom" in r.text
        engine.steps = working
        assert engine.health()["running"] == 0 and engine.health()["waiting"] == 0
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_a_stream_closed_while_queued_does_not_keep_the_model():
    """A streamed response can end (its client gone; `_EventStream` releases the ticket) while its generator
    is left suspended at a queued heartbeat, its lock acquisition still pending. When the running request
    ends, that orphaned acquisition must pass the lock on, not hold it for ever (every later request would
    wait behind it)."""
    import asyncio
    from types import SimpleNamespace

    from hydra.model.generate import StepOutput
    from hydra.serve.engine import Engine, Job, Stats

    async def scenario():
        engine = Engine(SimpleNamespace(tokenizer=None), has_heads=False)
        job = Job([1], DecodeConfig(), speculative=False)
        gate = threading.Event()

        def slow_reply():  # holds the model until the gate opens
            gate.wait(10)
            yield "a", StepOutput([1], 1, "eos")

        running = engine.run(engine.admit(), job, slow_reply(), Stats(1))
        first = asyncio.ensure_future(running.__anext__())
        await asyncio.sleep(0.05)
        ticket = engine.admit()
        queued = engine.run(ticket, job, iter([]), Stats(1), waiting_heartbeat=0.01)
        assert await queued.__anext__() == (None, None)  # waiting; the response ends here, unclosed
        ticket.release()
        gate.set()
        assert await first == ("a", None) and [x async for x in running] == [("", "stop")]
        await asyncio.sleep(0.1)
        health = engine.health()
        await queued.aclose()
        return health

    health = asyncio.run(scenario())
    assert health["running"] == 0 and health["waiting"] == 0, health


def test_messages_the_chat_template_rejects_are_a_400(served, monkeypatch):
    """A template's raise_exception (e.g. Mistral's on a role order it does not take) throws jinja2's
    TemplateError, not a ValueError: it must still be a 400 naming the messages, and the server keeps
    serving."""
    from fastapi.testclient import TestClient
    from jinja2 import TemplateError

    import hydra.serve.app as app_module
    from hydra.serve.engine import Engine

    _, model = served
    engine = Engine(model, has_heads=True)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "temperature": 0}
    render = app_module.render_prompt
    with TestClient(app_module.create_app(engine, MODEL)) as http:
        def rejecting(tokenizer, messages):
            raise TemplateError("Conversation roles must alternate user/assistant/user/assistant/...")

        monkeypatch.setattr(app_module, "render_prompt", rejecting)
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and "roles must alternate" in r.json()["error"]["message"]
        monkeypatch.setattr(app_module, "render_prompt", render)
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_a_prompt_cache_of_no_entries_is_refused(capsys):
    from hydra.serve.__main__ import main

    assert main(["--prompt-cache-entries", "0"]) == 2
    assert "--prompt-cache-entries >= 1" in capsys.readouterr().err


def test_bad_command_line_is_one_error_line(tmp_path):
    import subprocess
    import sys

    from serve_helpers import REPO

    r = subprocess.run(
        [sys.executable, "-m", "hydra.serve", "--model", str(tmp_path / "missing")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": ""},
        timeout=120,
    )
    assert r.returncode == 1 and r.stderr.strip().startswith("[hydra] error:") and "missing" in r.stderr


# --- the real default model ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_served(tmp_path):
    """`python -m hydra.serve` with its defaults (the shipped heads on the default model), fp32 here so the
    reply can be compared token for token with the library's greedy decoding."""
    server = Server("--dtype", "float32", log=tmp_path / "server.log")
    try:
        model, has_heads = load_model(None, dtype="float32", device="cpu")
        assert has_heads
        question = "What is the capital of France?"
        text, reason, out = expected(model, chat_ids(model, question), max_new_tokens=32)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        assert [m.id for m in client.models.list().data] == ["hydra"]
        for speculative in (True, False):
            reply = client.chat.completions.create(
                model="hydra",
                messages=[{"role": "user", "content": question}],
                max_tokens=32,
                temperature=0,
                extra_body={"speculative": speculative},
            )
            assert reply.choices[0].message.content == text and "Paris" in text
            assert reply.choices[0].finish_reason == reason
        assert reply.usage.model_extra["accepted_tokens_per_step"] == 1.0  # the plain-decoding reply
        assert out.tau > 1.2  # the trained heads accept more than one token per step
    finally:
        server.stop()
