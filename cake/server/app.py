"""The OpenAI-compatible HTTP API of `cake serve` (Starlette), over one engine.

Each request becomes one engine Request per choice (n); the engine's thread
calls back with events, which cross into the event loop through an asyncio
queue. A client that disconnects cancels its requests at once: the engine
parks their sequences before its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from cake.engine import Engine
from cake.errors import CakeError, ContextLengthError, NetworkError, TokenizerError
from cake.grammar import GrammarError
from cake.request import Event, QueueFullError, Request, TokenLogprob
from cake.server.metrics import CONTENT_TYPE, Metrics
from cake.server.schema import ApiError, Generation, bad, parse_chat, parse_completion
from cake.server.tools import ToolStream, syntax_for, template_inputs
from cake.server.web import routes as web_routes

FINISH = {"eos": "stop", "stop": "stop", "max_tokens": "length", "context": "length"}


@dataclass
class Served:
    """What the app serves: the model's tokenizer and context, its engine."""

    name: str
    tokenizer: Any
    engine: Engine
    max_context: int
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class _Choice:
    index: int
    request: Request
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: str | None = None


class _Run:
    """The engine requests of one HTTP request and the queue of their events."""

    def __init__(self, s: Served, metrics: Metrics, endpoint: str, reqs: list[Request]):
        self.engine = s.engine
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.choices = [_Choice(i, r) for i, r in enumerate(reqs)]
        for i, r in enumerate(reqs):
            r.on_event = lambda ev, i=i: loop.call_soon_threadsafe(
                self.queue.put_nowait, (i, ev)
            )
            metrics.tag(r, endpoint)
        try:
            for r in reqs:
                self.engine.submit(r)
        except QueueFullError as e:
            self.cancel()
            raise ApiError(
                429, str(e), type="rate_limit_error", code="queue_full"
            ) from None
        except ContextLengthError as e:
            self.cancel()
            raise ApiError(400, str(e), code="context_length_exceeded") from None
        except CakeError as e:
            self.cancel()
            raise ApiError(503, str(e), type="server_error") from None

    def cancel(self) -> None:
        for c in self.choices:
            if not c.request.done:
                self.engine.cancel(c.request)

    async def events(self) -> AsyncIterator[tuple[_Choice, Event]]:
        left = len(self.choices)
        while left:
            i, ev = await self.queue.get()
            c = self.choices[i]
            c.text.append(ev.text)
            c.logprobs.extend(ev.logprobs)
            if ev.finish is not None:
                c.finish = ev.finish
                left -= 1
            yield c, ev

    def usage(self, prompt_tokens: int) -> dict[str, Any]:
        done = sum(c.request.stats.decode_tokens for c in self.choices)
        cached = self.choices[0].request.stats.cached_tokens
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": done,
            "total_tokens": prompt_tokens + done,
            "prompt_tokens_details": {"cached_tokens": cached},
        }


def create_app(s: Served, on_shutdown=()) -> Starlette:
    """The ASGI app; the engine must be running (Engine.start). `on_shutdown`:
    callables run when the server stops (before uvicorn re-raises SIGTERM)."""
    metrics = Metrics(s.engine)
    s.engine.observer = metrics

    def auth(request: HttpRequest) -> None:
        if s.api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, key = got.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key, s.api_key):
            raise ApiError(
                401,
                "Incorrect API key provided.",
                code="invalid_api_key",
            )

    async def body_of(request: HttpRequest) -> dict:
        auth(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != s.name:
            raise ApiError(
                404,
                f"The model '{model}' does not exist; this server serves '{s.name}'.",
                param="model",
                code="model_not_found",
            )
        return body

    def engine_requests(gen: Generation, ids: list[int]) -> list[Request]:
        room = s.max_context - len(ids)
        if room < 1:
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens but the context holds "
                f"{s.max_context}",
                param="messages" if gen.messages is not None else "prompt",
                code="context_length_exceeded",
            )
        max_tokens = min(gen.max_tokens or room, room)
        if gen.grammar is not None:
            try:
                s.engine.grammars.check(gen.grammar)
            except GrammarError as e:
                raise bad(str(e), "response_format") from None
        return [
            Request(list(ids), p, max_tokens, gen.stop, gen.logprobs, gen.grammar)
            for p in gen.params
        ]

    async def chat(request: HttpRequest) -> Response:
        body = await body_of(request)
        gen = parse_chat(body)
        template = s.tokenizer.chat_template
        messages, extra = template_inputs(gen.messages, gen.tools, template)
        syntax = syntax_for(template) if gen.tools is not None else None
        if gen.tools is not None and gen.tools.choice != "auto":
            gen.grammar = syntax.grammar(gen.tools)  # the answer is calls only
        try:
            text = s.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, **extra
            )
        except TokenizerError as e:
            raise bad(str(e), "messages") from None
        ids = s.tokenizer.encode(text, add_special_tokens=False)
        run = _Run(s, metrics, "chat", engine_requests(gen, ids))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": s.name}
        if gen.stream:
            streams = [
                ToolStream(syntax, gen.tools.names) if syntax else None
                for _ in run.choices
            ]

            def delta(c: _Choice, ev: Event) -> dict:
                ts = streams[c.index]
                if ts is None:
                    return {"delta": {"content": ev.text} if ev.text else {}}
                text, calls = ts.push(ev.text), []
                if ev.finish is not None:
                    tail, calls = ts.finish()
                    text += tail
                d: dict[str, Any] = {"content": text} if text else {}
                if calls:
                    d["tool_calls"] = [t.openai(i) for i, t in enumerate(calls)]
                    return {"delta": d, "finish_reason": "tool_calls"}
                return {"delta": d}

            chunks = _chunks(
                run,
                gen,
                {**head, "object": "chat.completion.chunk"},
                len(ids),
                {"delta": {"role": "assistant", "content": ""}},
                delta,
                lambda lps: _chat_logprobs(s, lps),
            )
            return _sse(request, run, chunks)
        await _wait(request, run)
        choices = []
        for c in run.choices:
            message: dict[str, Any] = {"role": "assistant", "content": "".join(c.text)}
            finish = FINISH.get(c.finish or "")
            if syntax is not None:
                content, calls = syntax.parse(message["content"], gen.tools.names)
                if calls:
                    message["content"] = content.strip() or None
                    message["tool_calls"] = [t.openai() for t in calls]
                    finish = "tool_calls"
            choices.append(
                {
                    "index": c.index,
                    "message": message,
                    "logprobs": _chat_logprobs(s, c.logprobs)
                    if gen.logprobs is not None
                    else None,
                    "finish_reason": finish,
                }
            )
        return JSONResponse(
            {
                **head,
                "object": "chat.completion",
                "choices": choices,
                "usage": run.usage(len(ids)),
            }
        )

    async def completions(request: HttpRequest) -> Response:
        body = await body_of(request)
        gen = parse_completion(body)
        if gen.stream and len(gen.prompts) > 1:
            raise bad("stream takes one prompt", "prompt")
        reqs, prompt_ids, texts = [], [], []
        for p in gen.prompts:
            ids = p if isinstance(p, list) else s.tokenizer.encode(p)
            if not ids:
                raise bad("the prompt is empty", "prompt")
            if max(ids) >= s.tokenizer.vocab_size:
                raise bad("a token id is outside the vocabulary", "prompt")
            prompt_ids.append(ids)
            texts.append(p if isinstance(p, str) else s.tokenizer.decode(ids))
            reqs += engine_requests(gen, ids)
        run = _Run(s, metrics, "completions", reqs)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": s.name}
        n_prompt = sum(len(i) for i in prompt_ids)
        n = len(gen.params)
        if gen.stream:
            chunks = _chunks(
                run,
                gen,
                {**head, "object": "text_completion"},
                n_prompt,
                {"text": texts[0]} if gen.echo else None,
                lambda _c, ev: {"text": ev.text},
                lambda lps: _completion_logprobs(s, lps),
            )
            return _sse(request, run, chunks)
        await _wait(request, run)
        choices = [
            {
                "index": c.index,
                "text": (texts[c.index // n] if gen.echo else "") + "".join(c.text),
                "logprobs": _completion_logprobs(s, c.logprobs)
                if gen.logprobs is not None
                else None,
                "finish_reason": FINISH.get(c.finish or ""),
            }
            for c in run.choices
        ]
        usage = run.usage(n_prompt)
        return JSONResponse(
            {**head, "object": "text_completion", "choices": choices, "usage": usage}
        )

    async def models(request: HttpRequest) -> Response:
        auth(request)
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": s.name,
                        "object": "model",
                        "created": s.created,
                        "owned_by": "cake",
                        "max_model_len": s.max_context,
                    }
                ],
            }
        )

    async def health(_request: HttpRequest) -> Response:
        e = s.engine
        return JSONResponse(
            {"status": "ok", "running": e.running, "waiting": e.waiting}
        )

    async def metrics_page(request: HttpRequest) -> Response:
        auth(request)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def api_error(_request: HttpRequest, exc: Exception) -> Response:
        if isinstance(exc, ApiError):
            return JSONResponse(exc.body(), status_code=exc.status)
        if isinstance(exc, HTTPException):
            err = ApiError(exc.status_code, str(exc.detail), code=None)
            return JSONResponse(err.body(), status_code=exc.status_code)
        err = ApiError(500, f"internal error: {exc!r}", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    routes = [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_page, methods=["GET"]),
        *web_routes(),  # the chat page at /
    ]

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        for fn in on_shutdown:
            fn()

    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            ApiError: api_error,
            HTTPException: api_error,
            Exception: api_error,
        },
    )


async def _wait(request: HttpRequest, run: _Run) -> None:
    """Collect every event; cancel the requests if the client goes away."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        run.cancel()

    watcher = asyncio.create_task(watch())
    try:
        async for _c, ev in run.events():
            if ev.error is not None:
                run.cancel()
                status = 503 if isinstance(ev.error, NetworkError) else 500
                raise ApiError(status, str(ev.error), type="server_error")
    finally:
        watcher.cancel()
        run.cancel()


def _sse(request: HttpRequest, run: _Run, chunks: AsyncIterator[dict]) -> Response:
    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client left, or the stream ended: free the sequences
            run.cancel()

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _error_chunk(err: BaseException) -> dict:
    kind = 503 if isinstance(err, NetworkError) else 500
    return ApiError(kind, str(err), type="server_error").body()


async def _chunks(
    run: _Run,
    gen: Generation,
    base: dict,
    n_prompt: int,
    first: dict | None,
    body: Callable[[_Choice, Event], dict],
    logprobs: Callable[[tuple], dict],
) -> AsyncIterator[dict]:
    """The stream of one request: `first` (if any) opens every choice, then one
    chunk per event with text, log-probabilities or a finish (`body` gives the
    endpoint's text fields, and may set the finish_reason), then the usage if
    asked."""
    if first is not None:
        for c in run.choices:
            opening = {
                "index": c.index,
                **first,
                "logprobs": None,
                "finish_reason": None,
            }
            yield {**base, "choices": [opening]}
    async for c, ev in run.events():
        if ev.error is not None:
            yield _error_chunk(ev.error)
            run.cancel()
            return
        finish = FINISH.get(ev.finish or "")
        if not (ev.text or ev.logprobs or finish):
            continue
        choice = {
            "index": c.index,
            "logprobs": logprobs(ev.logprobs)
            if gen.logprobs is not None and ev.logprobs
            else None,
            "finish_reason": finish,
            **body(c, ev),
        }
        if not (choice.get("delta", True) or choice["logprobs"] or finish):
            continue  # text a tool stream holds back
        yield {**base, "choices": [choice]}
    if gen.include_usage:
        yield {**base, "choices": [], "usage": run.usage(n_prompt)}


def _piece(s: Served, token: int) -> str:
    return s.tokenizer.decode([token])


def _chat_logprobs(s: Served, lps: list[TokenLogprob] | tuple) -> dict:
    def entry(token: int, value: float) -> dict:
        text = _piece(s, token)
        return {"token": text, "logprob": value, "bytes": list(text.encode())}

    return {
        "content": [
            {
                **entry(lp.token, lp.logprob),
                "top_logprobs": [entry(t, v) for t, v in lp.top],
            }
            for lp in lps
        ],
        "refusal": None,
    }


def _completion_logprobs(s: Served, lps: list[TokenLogprob] | tuple) -> dict:
    tokens = [_piece(s, lp.token) for lp in lps]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{_piece(s, t): v for t, v in lp.top} for lp in lps],
        "text_offset": offsets,
    }
