"""The OpenAI request bodies this server takes (unknown fields are refused), and its error bodies.

Fields the engine cannot honour are accepted only at their neutral values (n=1, top_p=1, no penalties, no
logprobs); anything else is a 400 that names the field, rather than a reply that silently ignores it. With
temperature 0 any top_p is honoured: greedy decoding keeps the most likely token, which every top_p keeps.
`speculative` is this server's own field: false decodes without the draft heads (same output when greedy).
"""

from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_message(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)  # torch's seed range; else decoding fails
    stream: bool | None = False  # OpenAI's spec allows null: not streamed
    stream_options: StreamOptions | None = None
    n: int | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    speculative: bool = True

    def unsupported(self) -> str | None:
        """The first field set to a value the engine cannot honour, as an error message."""
        if self.top_p not in (None, 1.0) and self.temperature != 0:  # greedy: every top_p keeps the argmax
            return (
                f"top_p={self.top_p} is not supported: decoding samples from the model's full distribution "
                "(exact speculative sampling); omit top_p, set it to 1, or use temperature 0 (greedy)"
            )
        if self.n not in (None, 1):
            return f"n={self.n} is not supported: one choice per request (batch size 1)"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0.0):
                return f"{name} is not supported; omit it or set it to 0"
        stops = self.stop_list()
        if len(stops) > 4:
            return f"stop takes at most 4 sequences, got {len(stops)}"
        return None

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None

    def unsupported(self) -> str | None:
        if self.logprobs:
            return "logprobs is not supported"
        return super().unsupported()


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(default=16, ge=1)  # the OpenAI default for completions
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo is not supported"
        if self.logprobs is not None:
            return "logprobs is not supported"
        if self.suffix:
            return "suffix is not supported"
        if self.best_of not in (None, 1):
            return "best_of is not supported"
        if (
            isinstance(self.prompt, list)
            and self.prompt
            and isinstance(self.prompt[0], str)
            and len(self.prompt) > 1
        ):
            return "one prompt per request (batch size 1)"
        return super().unsupported()


def error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = {
        400: "invalid_request_error",
        404: "not_found_error",
        413: "invalid_request_error",
        503: "server_busy",
    }.get(status, "server_error")
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": None}},
        status_code=status,
        headers=headers,
    )
