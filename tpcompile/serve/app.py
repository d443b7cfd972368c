"""The HTTP side: OpenAI-compatible endpoints on FastAPI, over one Scheduler.

    POST /v1/completions        prompt (text or token ids) -> text; stream: server-sent events
    POST /v1/chat/completions   messages -> the assistant's reply (chat_prompt in text.py)
    GET  /v1/models             the one model served
    GET  /health                200 with per-rank state while the workers serve, 503 otherwise
    GET  /metrics               Prometheus text (metrics.py)

Errors have the OpenAI body {"error": {"message", "type", "param", "code"}}: 400 bad input (nothing reaches
the workers), 404 an unknown model, 429 the queue is full, 503 the workers are restarting or failed, 500 the
workers failed during the request. A stream that fails sends one error event, then [DONE].
"""
import asyncio
import json
import secrets
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tpcompile.serve.protocol import BadRequest, ChatRequest, CompletionRequest, validation_message
from tpcompile.serve.scheduler import Request, Scheduler, Unavailable
from tpcompile.text import TextStream, chat_prompt

ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error"}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": status}}


@dataclass
class Served:
    """What the server serves and its limits (from the artifact and server.*)."""
    tokenizer: object
    model_name: str
    vocab: int
    max_seq: int
    max_tokens: int                    # default max_tokens
    stop_ids: tuple                    # eos ids of the checkpoint


def make_app(scheduler: Scheduler, served: Served) -> FastAPI:
    app = FastAPI(title="tpcompile")
    metrics = scheduler.metrics

    def fail(status: int, message: str, param: str | None = None, kind: str = "bad_request") -> JSONResponse:
        metrics.errors.labels(kind=kind).inc()
        return JSONResponse(error_body(status, message, param), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        return fail(400, *validation_message(exc.errors()))

    @app.get("/health")
    async def health():
        h = scheduler.health()
        return JSONResponse(h, status_code=200 if h["status"] == "ok" else 503)

    @app.get("/metrics")
    async def prometheus():
        body, kind = metrics.render()
        return Response(body, media_type=kind)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.model_name, "object": "model", "created": 0,
                                            "owned_by": "tpcompile", "max_model_len": served.max_seq}]}

    async def run(http: HTTPRequest, body, prompt_of, chat: bool):
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        try:
            req = request_of(served, body, prompt_of(body),
                             lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except BadRequest as e:
            return fail(404 if e.param == "model" else 400, str(e), e.param)
        try:
            scheduler.submit(req)
        except Unavailable as e:
            return fail(e.status, str(e), kind="queue_full" if e.status == 429 else "unavailable")
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
        shape = _Shape(rid, served.model_name, chat, body.return_token_ids)
        if body.stream:
            o = body.stream_options
            usage = (bool(o and o.include_usage), bool(o and o.continuous_usage_stats))
            return StreamingResponse(_stream(scheduler, req, events, shape, *usage), media_type="text/event-stream")
        return await _whole(http, scheduler, req, events, shape)

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest, body: CompletionRequest):
        return await run(http, body, lambda b: completion_prompt(served.tokenizer, b), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest, body: ChatRequest):
        def prompt_of(b):
            return chat_prompt(served.tokenizer, [{"role": m.role, "content": m.text()} for m in b.messages])
        return await run(http, body, prompt_of, chat=True)

    return app


def completion_prompt(tokenizer, body: CompletionRequest) -> list[int]:
    p = body.prompt
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        if len(p) != 1:
            raise BadRequest(f"prompt holds {len(p)} prompts; send one per request", "prompt")
        p = p[0]
    return tokenizer.encode(p) if isinstance(p, str) else list(p)


def request_of(served: Served, body, prompt: list[int], sink) -> Request:
    """The scheduler's request, or BadRequest naming the field and the limit: nothing bad reaches a worker."""
    if body.model != served.model_name:
        raise BadRequest(f"model {body.model!r} is not served here; use {served.model_name!r}", "model")
    bad = body.unsupported()
    if bad:
        raise BadRequest(f"{bad[0]} is not supported by this server; leave it at its default", bad[0])
    if not prompt:
        raise BadRequest("the prompt is empty; give at least one token", "prompt")
    out = [t for t in prompt if not 0 <= t < served.vocab]
    if out:
        raise BadRequest(f"token id {out[0]} is outside the vocabulary [0, {served.vocab})", "prompt")
    S = served.max_seq
    if len(prompt) > S:
        raise BadRequest(f"the prompt has {len(prompt)} tokens, more than max_seq={S} of the compiled cache; "
                         f"shorten it or recompile with a larger generation.max_seq", "prompt")
    room = S - len(prompt) + 1
    wanted = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if wanted is not None and wanted > room:
        raise BadRequest(f"the prompt ({len(prompt)} tokens) + max_tokens={wanted} passes max_seq={S}: at most "
                         f"{room} new tokens fit; lower max_tokens or shorten the prompt", "max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise BadRequest(f"stop has {len(stop)} strings; at most 4", "stop")
    stop_ids = () if body.ignore_eos else served.stop_ids
    return Request(prompt=prompt, max_tokens=wanted or min(served.max_tokens, room), sink=sink,
                   text=TextStream(served.tokenizer, stop, frozenset(stop_ids)), temperature=body.temperature,
                   top_k=max(body.top_k, 0), top_p=body.top_p,
                   seed=body.seed if body.seed is not None else secrets.randbits(63), stop_ids=stop_ids)


class _Shape:
    """OpenAI response objects of one request (completion or chat, whole or chunk)."""

    def __init__(self, rid: str, model: str, chat: bool, token_ids: bool):
        self.rid, self.model, self.chat, self.token_ids = rid, model, chat, token_ids
        self.created = int(time.time())

    def _head(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.rid, "object": kind, "created": self.created, "model": self.model}

    def whole(self, text: str, finish: str, tokens: list, usage: dict) -> dict:
        choice = {"index": 0, "finish_reason": finish, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        if self.token_ids:
            choice["token_ids"] = tokens
        return {**self._head(False), "choices": [choice], "usage": usage}

    def chunk(self, text: str | None, finish: str | None = None, tokens: list | None = None, first=False) -> dict:
        choice = {"index": 0, "finish_reason": finish, "logprobs": None}
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        if tokens is not None and self.token_ids:
            choice["token_ids"] = tokens
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._head(True), "choices": [], "usage": usage}


def _usage(req: Request) -> dict:
    return {"prompt_tokens": len(req.prompt), "completion_tokens": len(req.tokens),
            "total_tokens": len(req.prompt) + len(req.tokens)}


async def _whole(http: HTTPRequest, scheduler: Scheduler, req: Request, events: asyncio.Queue, shape: _Shape):
    """Wait for the end; a client that goes away cancels the request (checked every half second)."""
    parts = []
    try:
        while True:
            try:
                ev = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    scheduler.cancel(req)
                    return Response(status_code=499)
                continue
            if ev[0] == "delta":
                parts.append(ev[1])
            elif ev[0] == "end":
                return shape.whole("".join(parts), ev[1], ev[2], _usage(req))
            else:
                return JSONResponse(error_body(500, ev[1]), status_code=500)
    except asyncio.CancelledError:
        scheduler.cancel(req)
        raise


async def _stream(scheduler: Scheduler, req: Request, events: asyncio.Queue, shape: _Shape, usage: bool,
                  every: bool):
    """Server-sent events; the generator is closed when the client disconnects, which cancels the request.
    usage: a last chunk with the usage; every: the usage so far in every chunk too."""
    def sse(obj) -> str:
        if every and "usage" not in obj and "error" not in obj:
            obj["usage"] = _usage(req)
        return f"data: {json.dumps(obj)}\n\n"
    try:
        if shape.chat:
            yield sse(shape.chunk(None, first=True))
        while True:
            ev = await events.get()
            if ev[0] == "delta":
                yield sse(shape.chunk(ev[1], tokens=[] if ev[2] is None else [ev[2]]))
            elif ev[0] == "end":
                yield sse(shape.chunk(None, ev[1]))
                if usage:
                    yield sse(shape.usage_chunk(_usage(req)))
                break
            else:
                yield sse(error_body(500, ev[1]))
                break
        yield "data: [DONE]\n\n"
    finally:
        scheduler.cancel(req)  # a no-op after the end; frees the row when the client went away
