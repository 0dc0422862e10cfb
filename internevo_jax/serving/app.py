"""The HTTP side: OpenAI-compatible routes over an ``engine.Engine``, the chat page at ``/`` and ``/health``.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (InternEvo's
``/internlm/models`` and ``/internlm/chat/completions`` are aliases), each with ``stream: true`` as server-sent
events in OpenAI's chunk format ending with ``data: [DONE]``. Every refused request gets OpenAI's error JSON
(``{"error": {"message", "type", "param", "code"}}``) with a 4xx status; a request that fails inside fails alone
(500), the server keeps serving. A client that goes away (mid-stream, or before a non-streaming reply is ready)
cancels its request, which frees its slot at the engine's next step. With ``api_key`` the API routes want
``Authorization: Bearer <key>`` (the page and ``/health`` stay open; the page has a field for the key).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from internevo_jax.serving import chat
from internevo_jax.serving.engine import Engine
from internevo_jax.serving.engine import Request as Generation
from internevo_jax.serving.protocol import APIError, ChatRequest, CompletionRequest, Sampling, parse
from internevo_jax.serving.text import TextStream, Tokenizer

PAGE = Path(__file__).parent / "static" / "index.html"


def create_app(engine: Engine, tokenizer: Tokenizer, model_name: str, api_key: str | None = None) -> FastAPI:
    """The server's ASGI app: ``engine`` generates, ``tokenizer`` turns text into ids and back."""
    app = FastAPI(title="internevo_jax serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:  # unknown route, wrong method
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(APIError(e.status_code, message).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        body = {"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error", "param": None, "code": None}}
        return JSONResponse(body, status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'")

    async def body_of(request: Request, model: type[Sampling]) -> Any:
        authorize(request)
        try:
            raw = json.loads(await request.body())
        except ValueError as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from e
        parsed = parse(model, raw)
        if parsed.model is not None and parsed.model != model_name:
            raise APIError(
                404, f"the model '{parsed.model}' does not exist: this server serves '{model_name}' (GET /v1/models)",
                param="model", code="model_not_found",
            )  # fmt: skip
        return parsed

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return dict(status="ok", model=model_name, max_length=engine.max_length, **engine.load())

    @app.get("/v1/models")
    @app.get("/internlm/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        entry = dict(id=model_name, object="model", created=created, owned_by="internevo_jax")
        return dict(object="list", data=[entry])

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body: CompletionRequest = await body_of(request, CompletionRequest)
        prompt = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) else body.prompt
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return await respond(request, body, ids, [], body.stops(), "text_completion", "cmpl")

    @app.post("/v1/chat/completions")
    @app.post("/internlm/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body: ChatRequest = await body_of(request, ChatRequest)
        ids, stop_ids, stops = chat.chat_prompt(tokenizer, [(m.role, m.text()) for m in body.messages])
        if body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        if body.max_tokens is None and body.max_length is not None:
            if body.max_length <= len(ids):
                raise APIError(
                    400, f"max_length={body.max_length} (prompt + reply) leaves no room for a reply after the prompt's "
                    f"{len(ids)} tokens: raise max_length", param="max_length",
                )  # fmt: skip
            body.max_tokens = body.max_length - len(ids)
        return await respond(request, body, ids, stop_ids, stops + body.stops(), "chat.completion", "chatcmpl")

    async def respond(
        request: Request, body: Sampling, ids: list[int], stop_ids: list[int], stops: list[str], kind: str, prefix: str
    ) -> Any:
        max_tokens = body.max_tokens if body.max_tokens is not None else engine.max_length - len(ids)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int | None, str | None]] = asyncio.Queue()
        generation = Generation(
            prompt=ids,
            max_tokens=max_tokens,
            emit=lambda tok, finish: loop.call_soon_threadsafe(queue.put_nowait, (tok, finish)),
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop_ids=frozenset(stop_ids),
        )
        try:
            engine.submit(generation)
        except ValueError as e:
            raise APIError(400, str(e), param="max_tokens" if "max_tokens" in str(e) else "prompt") from e
        text = TextStream(tokenizer, stops, skip_ids=set(stop_ids) | engine.eos_ids)
        meta = dict(id=f"{prefix}-{uuid.uuid4().hex[:24]}", created=int(time.time()), model=model_name)
        counts = dict(prompt_tokens=len(ids), completion_tokens=0)

        async def pieces() -> AsyncIterator[tuple[str, str | None]]:
            """(text, None) as it comes, then ("", finish_reason)."""
            try:
                while True:
                    token, finish = await queue.get()
                    if token is not None:
                        counts["completion_tokens"] += 1
                        piece, stopped = text.push(token)
                        if piece:
                            yield piece, None
                        if stopped:
                            yield "", "stop"
                            return
                    elif finish is not None and finish.startswith("error"):
                        raise RuntimeError(f"generation failed: {finish[len('error: ') :]}")
                    else:
                        rest = text.flush()
                        if rest:
                            yield rest, None
                        yield "", finish
                        return
            finally:
                generation.cancel()  # done, or the client went away: the slot is freed at the next step

        def usage() -> dict[str, int]:
            return counts | dict(total_tokens=counts["prompt_tokens"] + counts["completion_tokens"])

        if not body.stream:
            reply: list[str] = []

            async def collect() -> str | None:
                finish = None
                async for piece, end in pieces():
                    reply.append(piece)
                    finish = end or finish
                return finish

            # Nothing is sent before the end, so a client that leaves is noticed by watching for its disconnect.
            task = asyncio.ensure_future(collect())
            while not task.done():
                await asyncio.wait([task], timeout=0.25)
                if not task.done() and await request.is_disconnected():
                    task.cancel()  # pieces() cancels the generation: its slot is freed
                    return Response(status_code=499)  # nobody reads it
            finish = task.result()
            content = "".join(reply)
            if kind == "chat.completion":
                choice = dict(index=0, message=dict(role="assistant", content=content), finish_reason=finish)
            else:
                choice = dict(index=0, text=content, finish_reason=finish, logprobs=None)
            return dict(meta, object=kind, choices=[choice], usage=usage())

        def chunk(piece: str | None, finish: str | None) -> str:
            if kind == "chat.completion":
                delta = {} if piece is None else dict(content=piece)
                if piece == "" and finish is None:
                    delta["role"] = "assistant"
                choice = dict(index=0, delta=delta, finish_reason=finish, logprobs=None)
                payload = dict(meta, object="chat.completion.chunk", choices=[choice])
            else:
                choice = dict(index=0, text=piece or "", finish_reason=finish, logprobs=None)
                payload = dict(meta, object="text_completion", choices=[choice])
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        async def events() -> AsyncIterator[str]:
            if kind == "chat.completion":
                yield chunk("", None)
            try:
                async for piece, finish in pieces():
                    yield chunk(None if finish else piece, finish)
            except RuntimeError as e:  # the headers are sent: the error travels as an event
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
            if body.stream_options is not None and body.stream_options.include_usage:
                yield f"data: {json.dumps(dict(meta, object=f'{kind}.chunk', choices=[], usage=usage()))}\n\n"
            yield "data: [DONE]\n\n"

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    return app
