"""The OpenAI API as ``mor serve`` speaks it: request bodies, the checks that turn bad input into a 4xx, the error
shape, and the response and stream-chunk bodies of completions and chat completions.

Unknown fields are ignored (clients send fields this server does not use); a known field of the wrong type is a
400, and so is asking for what the server cannot give (log-probabilities, echo, tools). The MoR extensions are
ordinary fields, which standard clients send through ``extra_body``: ``top_k``, ``max_recursions``,
``extra_recursions`` (test-time depth) and ``return_depths`` (each choice then carries the ``token_ids`` it
generated and the recursion ``depths`` that produced them).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOP_STRINGS = 4  # as the OpenAI API
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "tools")  # refused rather than silently ignored


class APIError(Exception):
    """A request the server refuses, answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingRequest(_Request):
    """The fields both endpoints share. ``None`` means the default, as when the field is left out."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: str | list[str] | None = Field(None, description="a string or a list of strings")
    seed: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_recursions: int | None = None
    extra_recursions: int | None = None
    return_depths: bool | None = None

    def stop_strings(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stop) > MAX_STOP_STRINGS or not all(stop):
            raise APIError(400, f"'stop' takes at most {MAX_STOP_STRINGS} non-empty strings", "stop")
        return stop


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] = Field(description="one prompt: a string or a list of token ids")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: str
    content: str | list[TextPart] | None = Field(None, description="a string or a list of text parts")

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # what newer clients send instead of max_tokens


def parse(model: type[_Request], raw: bytes) -> Any:
    """The request body as ``model``, or a 400 naming the field that is wrong."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON ({error}); send a JSON object") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    for name in UNSUPPORTED:
        if data.get(name):
            raise APIError(400, f"'{name}' is not supported by this server; leave it out", name)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        # The location names fields and list indices, and for a union the member tried ("str"): drop those.
        path = [part for part in first["loc"] if isinstance(part, int) or part in _FIELDS]
        param = ".".join(map(str, path))
        field = _FIELDS.get(str(path[-1])) if path else None
        if first["type"] == "missing":
            message = f"'{param}' is required"
        elif field is not None and field.description:
            message = f"'{param}' must be {field.description}"
        else:
            message = f"'{param}': {first['msg'][0].lower()}{first['msg'][1:]}"
        raise APIError(400, message, param or None) from None


_FIELDS = {name: info for request in (CompletionRequest, ChatCompletionRequest, ChatMessage, TextPart, StreamOptions)
           for name, info in request.model_fields.items()}


# ---------------------------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice(chat: bool, text: str, finish_reason: str | None, token_ids: list[int] | None,
           depths: list[int] | None, delta: bool, first: bool = False) -> dict[str, Any]:
    """One choice of a response (``delta=False``) or of a stream chunk. ``token_ids``/``depths``: the MoR
    extension, left out unless the request asked for it."""
    if not chat:
        body: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    elif delta:
        message = {"role": "assistant", "content": text} if first else {"content": text} if text else {}
        body = {"index": 0, "delta": message, "logprobs": None, "finish_reason": finish_reason}
    else:
        body = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}
    if depths is not None:
        body["token_ids"], body["depths"] = token_ids, depths
    return body


def envelope(chat: bool, request_id: str, model: str, created: int, choices: list[dict[str, Any]], delta: bool,
             usage_: dict[str, int] | None) -> dict[str, Any]:
    kind = ("chat.completion.chunk" if delta else "chat.completion") if chat else "text_completion"
    body: dict[str, Any] = {"id": request_id, "object": kind, "created": created, "model": model, "choices": choices}
    if usage_ is not None or not delta:
        body["usage"] = usage_
    return body


def now() -> int:
    return int(time.time())
