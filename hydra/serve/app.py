"""The HTTP routes: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, /health, and the web chat
page at /. Every error is an OpenAI-style JSON body {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException as StarletteHTTPException

from hydra.inference.loading import context_length, render_prompt
from hydra.model.generate import DecodeConfig
from hydra.model.pacing import Pacer
from hydra.model.prompt_cache import PromptCache
from hydra.serve.engine import Engine, Job, QueueFull, Stats
from hydra.serve.protocol import ChatCompletionRequest, CompletionRequest, error

HEARTBEAT_S = 1.0  # a queued stream sends an SSE comment this often, so a client that left is noticed


class _EventStream(StreamingResponse):
    """An SSE response that gives back the request's queue place however the response ends."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class _BodyLimit:
    """413 for a body whose Content-Length is over the limit, before it is read; a body without one (chunked)
    is read up to the limit, then handed on. (A plain ASGI middleware: Starlette's BaseHTTPMiddleware would
    hide client disconnects from the routes.)"""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            size = dict(scope["headers"]).get(b"content-length", b"")
            if size.isdigit() and int(size) > self.max_bytes:
                return await self._too_large(f"{int(size)} bytes", scope, receive, send)
            if not size.isdigit():
                body, more = bytearray(), True
                while more:
                    message = await receive()
                    if message["type"] != "http.request":  # the client left mid-body: nothing to answer
                        return
                    body += message.get("body", b"")
                    if len(body) > self.max_bytes:
                        more_than = f"more than {self.max_bytes} bytes"
                        return await self._too_large(more_than, scope, receive, send)
                    more = message.get("more_body", False)
                receive = _replay(bytes(body), receive)
        await self.app(scope, receive, send)

    async def _too_large(self, size: str, scope, receive, send):
        message = f"the request body is {size}; this server takes at most {self.max_bytes} bytes"
        await error(413, message)(scope, receive, send)


def _replay(body: bytes, receive):
    """An ASGI receive that gives `body` (already read) first, then the client's own messages (disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


def create_app(
    engine: Engine,
    model_name: str,
    max_tokens: int = 512,
    tree: str | None = None,
    max_body_bytes: int = 1 << 20,
    pace: bool = False,
    lookup: int | None = None,
    prompt_cache_entries: int = 1,
) -> FastAPI:
    """`pace`: rest the heads while they do not pay (hydra.model.pacing), except for seeded requests, whose
    replies then repeat. `lookup`: prompt-lookup tokens per step (None: DecodeConfig's default).
    `prompt_cache_entries`: conversations whose KV cache is kept between requests
    (hydra.model.prompt_cache)."""
    app = FastAPI(title="Hydra", docs_url=None, redoc_url=None)
    # one for the server: each request starts from what earlier ones measured
    pacer = Pacer() if pace else None
    # One for the server too: a request prefills only what follows the prefix it shares with an earlier one
    # (a chat's next turn, a regenerated reply).
    prompt_cache = PromptCache(prompt_cache_entries)
    context = context_length(engine.model)
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return error(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})")
        if first.get("type") == "extra_forbidden":
            return error(400, f"unknown field {where!r}", where)
        if first.get("type") == "missing":
            if not where:  # no body at all
                return error(400, "the request has no body: send a JSON object")
            return error(400, f"missing field {where!r}", where)
        return error(400, f"{where or 'body'}: {first.get('msg')}", where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))

    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(files("hydra.serve").joinpath("chat.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {**engine.health(), "model": model_name, "hydra_heads": engine.has_heads}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": created,
                    "owned_by": "hydra",
                    "max_model_len": context,
                }
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        try:
            ids = render_prompt(engine.tokenizer, [m.as_template_message() for m in req.messages])
        except (ValueError, TemplateError) as e:
            # no chat template; a template's raise_exception (role order)
            return error(400, f"cannot render these messages with the model's chat template: {e}", "messages")
        return await _serve(req, request, ids, chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompt = (
            req.prompt[0]
            if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], str)
            else req.prompt
        )
        ids = engine.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        return await _serve(req, request, ids, chat=False)

    async def _serve(req, request: Request, ids: list[int], chat: bool):
        if req.model != model_name:
            return error(
                404, f"model {req.model!r} is not served here; GET /v1/models lists {model_name!r}", "model"
            )
        if (msg := req.unsupported()) is not None:
            return error(400, msg)
        if not ids:
            return error(400, "the prompt is empty", "prompt")
        if len(ids) + 1 > context:
            return error(
                400,
                f"the prompt is {len(ids)} tokens; the model's context holds {context}",
                "messages" if chat else "prompt",
            )
        budget = getattr(req, "max_completion_tokens", None) or req.max_tokens or max_tokens
        temperature = 1.0 if req.temperature is None else req.temperature  # OpenAI's default
        config = DecodeConfig(tree=tree, temperature=temperature, max_new_tokens=budget, seed=req.seed,
                              pace=pacer if pacer is not None and req.seed is None else False,
                              prompt_cache=prompt_cache,
                              **({} if lookup is None else {"lookup": lookup}))
        job = Job(ids, config, speculative=req.speculative and engine.has_heads, stop=req.stop_list())
        try:
            steps = engine.steps(job)
            ticket = engine.admit()
        except ValueError as e:
            return error(400, str(e))
        except QueueFull as e:
            return error(503, str(e), headers={"Retry-After": str(e.retry_after)})
        stats = Stats(len(ids))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        head = {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model_name,
        }
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = _sse(
                engine.run(ticket, job, steps, stats, HEARTBEAT_S), head, stats, chat, include_usage
            )
            return _EventStream(events, ticket.release)
        try:
            got = await _unless_disconnected(request, _collect(engine.run(ticket, job, steps, stats)))
        except Exception as e:  # a decoding failure is this request's alone; the server keeps serving
            return error(500, f"decoding failed: {type(e).__name__}: {e}")
        finally:
            ticket.release()
        if got is None:
            return error(499, "the client closed the request")
        text, reason = got
        choice = {"index": 0, "finish_reason": reason, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return JSONResponse({**head, "choices": [choice], "usage": stats.usage()})

    return app


async def _collect(events) -> tuple[str, str]:
    parts, reason = [], None
    async for text, finish in events:
        if text:
            parts.append(text)
        reason = finish or reason
    return "".join(parts), reason


async def _unless_disconnected(request: Request, coro):
    """Run `coro`; cancel it (freeing its queue place) if the client goes away first. None if it did."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return None
    finally:
        if not task.done():
            task.cancel()


async def _sse(events, head: dict, stats: Stats, chat: bool, include_usage: bool):
    def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            body = {**head, "object": "chat.completion.chunk", "choices": [choice]}
        else:
            body = {
                **head,
                "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}],
            }
        return f"data: {json.dumps(body)}\n\n"

    started = False
    try:
        async for text, finish in events:
            if text is None:  # still queued
                yield ": queued\n\n"
                continue
            if chat and not started:
                started = True
                yield chunk(None, None, first=True)
            if text:
                yield chunk(text, None)
            if finish is not None:
                yield chunk(None, finish)
    except Exception as e:  # headers are sent: report the failure as an error event, as OpenAI's API does
        body = {"error": {"message": f"decoding failed: {type(e).__name__}: {e}", "type": "server_error",
                          "param": None, "code": None}}
        yield f"data: {json.dumps(body)}\n\n"
        return
    if include_usage:  # OpenAI's last chunk: no choices, the usage block
        kind = "chat.completion.chunk" if chat else head["object"]
        yield f"data: {json.dumps({**head, 'object': kind, 'choices': [], 'usage': stats.usage()})}\n\n"
    yield "data: [DONE]\n\n"
