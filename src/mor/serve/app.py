"""The HTTP application: OpenAI-compatible completions and chat completions (JSON or server-sent events), the
model list, health, Prometheus metrics and the playground page, on an :class:`EngineWorker`.

Every request is validated completely before it is queued, so bad input is a 4xx in the OpenAI error shape and
never reaches the engine. A request whose client goes away is cancelled, which frees its row and KV pages.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeVar, cast

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from mor.data.tokenizer import TextTokenizer
from mor.infer.sampling import SamplingParams
from mor.infer.streaming import depth_palette, text_colour
from mor.model import MoRForCausalLM
from mor.serve import protocol
from mor.serve.chat import ChatTemplate, ChatTemplateError
from mor.serve.detokenize import Detokenizer
from mor.serve.metrics import Metrics
from mor.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, SamplingRequest
from mor.serve.worker import EngineWorker, Job, QueueFull, Stream

RETRY_AFTER_SECONDS = 1  # what a client refused for a full queue is told to wait
COMPLETION_MAX_TOKENS = 16  # the OpenAI default of /v1/completions; chat defaults to the rest of the context
T = TypeVar("T")


@dataclass
class ServedModel:
    """What the server says about its model and needs to turn text into requests and tokens back into text."""

    name: str
    tokenizer: TextTokenizer
    chat_template: ChatTemplate | None
    end_token_ids: set[int]  # tokens that end a reply: the end-of-document token, and a chat turn's end
    created: int = field(default_factory=protocol.now)

    def encode(self, text: str) -> list[int]:
        # The backend reads special-token strings (a chat template's "<|im_start|>") as those tokens.
        return self.tokenizer.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@dataclass
class Piece:
    """New text of a request and the tokens (ids and depths) it came from; ``finish_reason`` on the last."""

    text: str
    token_ids: list[int]
    depths: list[int]
    finish_reason: str | None


def build_app(served: ServedModel, worker: EngineWorker, metrics: Metrics) -> Starlette:
    server = _Server(served, worker, metrics)
    routes = [
        Route("/", server.playground, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics_page, methods=["GET"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
    ]
    handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _internal_error}
    return Starlette(routes=routes, exception_handlers=handlers)


class _Server:
    def __init__(self, served: ServedModel, worker: EngineWorker, metrics: Metrics) -> None:
        self.served, self.worker, self.metrics = served, worker, metrics
        self.engine = worker.engine
        self.model = cast(MoRForCausalLM, self.engine.model)
        self.context = cast(int, self.engine.max_seq_len)

    # ------------------------------------------------------------------ pages
    async def playground(self, request: Request) -> Response:
        num_recursions = self.model.config.num_recursions
        palette = depth_palette(num_recursions)
        config = {"model": self.served.name, "numRecursions": num_recursions, "palette": palette,
                  "textColours": [text_colour(c) for c in palette], "maxTokens": self.context}
        page = resources.files("mor.serve").joinpath("playground.html").read_text(encoding="utf-8")
        return HTMLResponse(page.replace("__MOR_CONFIG__", json.dumps(config).replace("</", "<\\/")))

    async def health(self, request: Request) -> Response:
        if not self.worker.alive:
            raise APIError(503, "the engine is not running; the server is stopping", kind="server_error")
        return JSONResponse({"status": "ok"})

    async def metrics_page(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def models(self, request: Request) -> Response:
        config = self.model.config
        card = {"id": self.served.name, "object": "model", "created": self.served.created, "owned_by": "mor",
                "max_model_len": self.context, "num_recursions": config.num_recursions,
                "max_extra_recursions": self.engine.extra_recursions}
        return JSONResponse({"object": "list", "data": [card]})

    # ------------------------------------------------------------------ generation
    async def completions(self, request: Request) -> Response:
        body = protocol.parse(CompletionRequest, await request.body())
        self._check_model(body)
        prompt = body.prompt if isinstance(body.prompt, list) else self.served.encode(body.prompt)
        if not prompt:
            raise APIError(400, "'prompt' is empty: give some text (or token ids) to continue", "prompt")
        max_tokens = COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        return await self._generate(request, body, prompt, max_tokens, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        body = protocol.parse(ChatCompletionRequest, await request.body())
        self._check_model(body)
        template = self.served.chat_template
        if template is None:
            raise APIError(400, f"model {self.served.name!r} has no chat template (tokenizer_config.json's "
                                "chat_template or chat_template.jinja beside its tokenizer); use /v1/completions "
                                "or serve a tokenizer that has one", "messages")
        if not body.messages:
            raise APIError(400, "'messages' is empty: give at least one message", "messages")
        try:
            text = template.render([{"role": m.role, "content": m.text()} for m in body.messages])
        except ChatTemplateError as error:
            raise APIError(400, str(error), "messages") from None
        prompt = self.served.encode(text)
        if not prompt:
            raise APIError(400, "the chat template made an empty prompt of these messages", "messages")
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = self.context - len(prompt) if limit is None else limit
        return await self._generate(request, body, prompt, max_tokens, chat=True)

    def _check_model(self, body: SamplingRequest) -> None:
        if body.model != self.served.name:
            raise APIError(404, f"model {body.model!r} is not served here; use {self.served.name!r} "
                                "(GET /v1/models lists it)", "model", "model_not_found")

    def _job(self, body: SamplingRequest, prompt: list[int], max_tokens: int, chat: bool) -> Job:
        """The engine request for a valid body, or the 400 that says what is wrong."""
        if body.n not in (None, 1):
            raise APIError(400, "'n' must be 1: this server returns one choice per request; send several requests",
                           "n")
        context = self.context
        if len(prompt) >= context:
            raise APIError(400, f"the prompt has {len(prompt)} tokens but the context holds {context}, with room "
                                "for at least one new token; shorten it", "messages" if chat else "prompt")
        if max_tokens < 1:
            raise APIError(400, f"'max_tokens' must be at least 1, got {max_tokens}", "max_tokens")
        if len(prompt) + max_tokens > context:
            raise APIError(400, f"the prompt has {len(prompt)} tokens and 'max_tokens' is {max_tokens}, past the "
                                f"context of {context}; ask for at most {context - len(prompt)}", "max_tokens")
        temperature = 1.0 if body.temperature is None else body.temperature
        try:
            params = SamplingParams(temperature > 0, temperature, body.top_k, body.top_p)
        except ValueError as error:
            raise _bad_request(error, ("temperature", "top_k", "top_p")) from None
        # 0, not None: the engine's extra_recursions is the most a request may ask, not a default for all.
        extra = body.extra_recursions or 0
        try:  # the depth options; token ids outside the vocabulary; more KV pages than the pool holds
            self.engine.check(prompt, max_tokens, None, body.max_recursions, extra)
        except ValueError as error:
            raise _bad_request(error, ("max_recursions", "extra_recursions")) from None
        seed = random.randrange(2**32) if body.seed is None else body.seed % 2**32  # the engine keeps 32 bits
        return Job(prompt, max_tokens, params, seed, body.max_recursions, extra)

    async def _generate(self, request: Request, body: SamplingRequest, prompt: list[int], max_tokens: int,
                        chat: bool) -> Response:
        job = self._job(body, prompt, max_tokens, chat)
        stop = body.stop_strings()
        if not self.worker.alive:
            raise APIError(503, "the server is stopping; send the request to another one", kind="server_error")
        try:
            stream = self.worker.submit(job, asyncio.get_running_loop())
        except QueueFull as error:
            raise APIError(429, f"{error}; retry in a moment", code="queue_full", kind="rate_limit_error",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        reply = _Reply(chat, protocol.new_id("chatcmpl" if chat else "cmpl"), self.served.name, protocol.now(),
                       len(prompt), bool(body.return_depths))
        pieces = self._pieces(stream, Detokenizer(self.served.decode, stop, self.served.end_token_ids))
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return EventStream(reply.events(pieces, include_usage), stream)
        try:
            result = await _unless_disconnected(reply.collect(pieces), request.receive)
        finally:
            stream.cancel()
        return JSONResponse(result) if result is not None else Response(status_code=499)

    @staticmethod
    async def _pieces(stream: Stream, text: Detokenizer) -> AsyncIterator[Piece]:
        """The request's text as it grows, with the tokens it came from; held-back text waits for later tokens."""
        ids: list[int] = []
        depths: list[int] = []
        async for output in stream:
            consumed = text.feed(output.tokens)
            ids += output.tokens[:consumed]
            depths += output.depths[:consumed]
            finish = "stop" if text.stopped else output.finish_reason
            piece = text.take(final=finish is not None)
            if piece or finish is not None:
                yield Piece(piece, ids, depths, finish)
                ids, depths = [], []
            if text.stopped:
                stream.cancel("stop")  # the client is told "stop", and so are the metrics
                return


@dataclass
class _Reply:
    """The response to one request, as one JSON body or as server-sent event chunks."""

    chat: bool
    id: str
    model: str
    created: int
    prompt_tokens: int
    return_depths: bool

    async def collect(self, pieces: AsyncIterator[Piece]) -> dict[str, Any]:
        text, ids, depths, finish = [], [], [], None
        async for piece in pieces:
            text.append(piece.text)
            ids += piece.token_ids
            depths += piece.depths
            finish = piece.finish_reason
        choice = protocol.choice(self.chat, "".join(text), finish, ids, depths if self.return_depths else None,
                                 delta=False)
        return protocol.envelope(self.chat, self.id, self.model, self.created, [choice], False,
                                 protocol.usage(self.prompt_tokens, len(ids)))

    async def events(self, pieces: AsyncIterator[Piece], include_usage: bool) -> AsyncIterator[str]:
        generated = 0
        try:
            if self.chat:  # the first chunk gives the role, as OpenAI's do
                yield self._chunk(protocol.choice(True, "", None, None, None, delta=True, first=True))
            async for piece in pieces:
                generated += len(piece.token_ids)
                yield self._chunk(protocol.choice(self.chat, piece.text, piece.finish_reason, piece.token_ids,
                                                  piece.depths if self.return_depths else None, delta=True))
        except Exception as error:  # headers are sent: the failure can only be told in the stream
            yield _event(APIError(500, f"generation failed: {error}", kind="server_error").body())
            return
        if include_usage:
            yield _event(protocol.envelope(self.chat, self.id, self.model, self.created, [], True,
                                           protocol.usage(self.prompt_tokens, generated)))
        yield "data: [DONE]\n\n"

    def _chunk(self, choice: dict[str, Any]) -> str:
        return _event(protocol.envelope(self.chat, self.id, self.model, self.created, [choice], True, None))


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events of one request. However the response ends (finished, the client gone, the server
    stopping) the request is cancelled, which frees its row and pages if it is still running."""

    def __init__(self, events: AsyncIterator[str], stream: Stream) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await _unless_disconnected(self.stream_response(send), receive)
        except OSError:  # the client went away while a chunk was being sent
            pass
        finally:
            self.stream.cancel()


async def _unless_disconnected(work: Awaitable[T], receive: Receive) -> T | None:
    """``work``'s result, or None if the client disconnects first (``work`` is then cancelled)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
        watcher.cancel()
    return task.result() if task.done() and not task.cancelled() else None


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# ---------------------------------------------------------------------------------------------- errors
def _bad_request(error: ValueError, fields: tuple[str, ...]) -> APIError:
    """The 400 for a check's ValueError; ``param`` is the one of ``fields`` that its message names first (the
    checks begin with the option they refuse: "top_p must lie in ...", "extra_recursions=2: ..."), or None."""
    message = str(error)
    named = [(message.find(name), name) for name in fields if name in message]
    return APIError(400, message, min(named)[1] if named else None)


async def _api_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, APIError)
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    message = {404: f"no endpoint {request.url.path}; see GET /v1/models, POST /v1/completions, "
                    "POST /v1/chat/completions",
               405: f"{request.url.path} does not take {request.method}"}.get(error.status_code, str(error.detail))
    return JSONResponse(APIError(error.status_code, message).body(), status_code=error.status_code,
                        headers=error.headers)


async def _internal_error(request: Request, error: Exception) -> Response:
    body = APIError(500, f"internal error ({type(error).__name__}: {error}); this is a bug in mor, please report "
                         "it", kind="server_error").body()
    return JSONResponse(body, status_code=500)
