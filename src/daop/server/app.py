"""The FastAPI app: routes, exception handlers, plain and streamed (server-sent events) responses, and the
`daop serve` entry point."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from daop.errors import DaopError
from daop.server.metrics import Metrics, MetricsMiddleware
from daop.server.auth import ApiKeyMiddleware
from daop.server.schemas import (DEFAULT_MAX_BODY_BYTES, ApiError, ChatCompletionRequest, ClientGone, CompletionRequest,
                                 _Common, _validation_error, check_fields, read_json)
from daop.server.worker import DEFAULT_MAX_BATCH, Job, Worker

log = logging.getLogger("daop.server")

DISCONNECT_POLL_S = 0.25       # how often a waiting non-streamed request checks that its client is still there


# -------------------------------------------------------------------------------------------------- app

def create_app(engine: Any, model_name: str, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               api_key: Optional[str] = None, max_batch: Optional[int] = None, warmup: bool = False) -> FastAPI:
    """The FastAPI app serving engine under model_name. The worker thread starts with the app's lifespan;
    with warmup, the lifespan's start waits for its warm-up (`Worker.warm_up`), so the server listens
    only once it is done.

    With api_key, every endpoint but /health needs `Authorization: Bearer <api_key>`.
    """
    metrics = Metrics()
    worker = Worker(engine, metrics, max_batch or getattr(engine, "max_batch", None) or DEFAULT_MAX_BATCH, warmup)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        await asyncio.get_running_loop().run_in_executor(None, worker.warmed.wait)
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="daop", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker, app.state.metrics, app.state.engine = worker, metrics, engine
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key, open_paths=("/health",))
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    _add_exception_handlers(app)

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "daop"}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        _check_model(name, model_name)
        return model_card()

    @app.get("/metrics")
    async def get_metrics() -> PlainTextResponse:
        text = metrics.render(model_name, worker.waiting, worker.running, worker.counters)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await _parse(request, CompletionRequest, model_name, max_body_bytes)
        return await _run(request, req, req.prompt, None, "text", worker, model_name)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await _parse(request, ChatCompletionRequest, model_name, max_body_bytes)
        return await _run(request, req, None, req.chat_messages(), "chat", worker, model_name)

    return app


def _add_exception_handlers(app: FastAPI) -> None:
    """Every error, expected or not, answered in OpenAI's JSON shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return ApiError(exc.status_code, message).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return ApiError(500, f"internal server error: {type(exc).__name__}").response()


def _check_model(name: Optional[str], model_name: str) -> None:
    if name is not None and name != model_name:
        raise ApiError(404, f"The model `{name}` does not exist; this server serves `{model_name}`.",
                       param="model", code="model_not_found")


async def _parse(request: Request, model: type[_Common], model_name: str, max_body_bytes: int) -> _Common:
    data = await read_json(request, max_body_bytes)
    check_fields(data, model)
    try:
        req = model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    _check_model(req.model, model_name)
    if req.n is not None and req.n != 1:
        raise ApiError(400, "Only n=1 is supported.", param="n")
    return req


async def _next_event(job: Job, request: Request) -> tuple[str, Any]:
    """The job's next event; meanwhile, at least every DISCONNECT_POLL_S, checks that the client is still there."""
    while True:
        now = time.monotonic()
        if now - job.checked_at >= DISCONNECT_POLL_S:
            job.checked_at = now
            if await request.is_disconnected():
                job.cancel.set()
                raise ClientGone()
        try:
            return await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            continue


async def _run(request: Request, req: _Common, prompt: Any, messages: Optional[list[dict[str, str]]],
               kind: str, worker: Worker, model_name: str) -> Response:
    sampling = req.sampling(getattr(worker.engine, "generation_defaults", None))
    job = Job(prompt, messages, sampling, asyncio.get_running_loop(), asyncio.Queue(),
              max_tokens_given=req.requested_max_tokens() is not None)
    worker.submit(job)
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
    created_at = int(time.time())
    streaming = False
    try:
        event, payload = await _next_event(job, request)   # waits for this job's turn
        if event == "error":
            raise payload
        if event == "cancelled":
            raise ClientGone()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            body = _sse(job, kind, rid, created_at, model_name, include_usage)
            streaming = True
            return _JobStream(body, job, media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        pieces: list[str] = []
        while True:
            event, payload = await _next_event(job, request)
            if event == "text":
                pieces.append(payload)
            elif event == "done":
                return JSONResponse(_full_response(kind, rid, created_at, model_name, "".join(pieces), payload))
            elif event == "error":
                raise payload
            elif worker.stopping:
                raise ApiError(503, "the server is shutting down")
            else:
                raise ClientGone()
    except ClientGone:
        request.scope["daop.status"] = 499  # what the metrics count: the client closed the request
        return Response(status_code=499)
    finally:
        if not streaming:
            job.cancel.set()  # a no-op once the job is done; otherwise stops it (error, client gone)


# ------------------------------------------------------------------------------------------- responses

class _JobStream(StreamingResponse):
    """A streamed response that cancels its job however it ends (finished, client gone, or error)."""

    def __init__(self, content: AsyncIterator[str], job: Job, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel.set()


def _usage(stats: dict[str, Any]) -> dict[str, int]:
    p, c = stats["prompt_tokens"], stats["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _full_response(kind: str, rid: str, created: int, model: str, text: str, stats: dict[str, Any]) -> dict[str, Any]:
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                  "logprobs": None, "finish_reason": stats["finish_reason"]}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": stats["finish_reason"]}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": None,
            "choices": [choice], "usage": _usage(stats)}


async def _sse(job: Job, kind: str, rid: str, created: int, model: str, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(delta: Optional[dict[str, Any]], text: Optional[str], finish: Optional[str]) -> str:
        if kind == "chat":
            choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        out: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model,
                               "system_fingerprint": None, "choices": [choice]}
        if include_usage:
            out["usage"] = None
        return _data(out)

    if kind == "chat":
        yield chunk({"role": "assistant", "content": ""}, None, None)
    while True:
        event, payload = await job.events.get()
        if event == "text":
            yield chunk({"content": payload}, payload, None)
        elif event == "done":
            yield chunk({}, "", payload["finish_reason"])
            if include_usage:
                yield _data({"id": rid, "object": obj, "created": created, "model": model,
                             "system_fingerprint": None, "choices": [], "usage": _usage(payload)})
            break
        elif event == "error":
            yield _data(payload.body())
            break
        else:  # cancelled: the server is shutting down
            yield _data(ApiError(503, "the server is shutting down").body())
            break
    yield "data: [DONE]\n\n"


def _data(obj: dict[str, Any]) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


# --------------------------------------------------------------------------------------------- serving

def serve(args: Any) -> int:
    """`daop serve`: load the model, then answer HTTP requests until interrupted."""
    import uvicorn

    from daop.cli import load_engine

    if not 0 <= args.port <= 65535:
        raise DaopError(f"--port must be in 0..65535, got {args.port}")
    if args.max_body_bytes < 1:
        raise DaopError(f"--max-body-bytes must be >= 1, got {args.max_body_bytes}")
    if args.api_key is not None and not args.api_key.strip():
        raise DaopError("--api-key must not be empty")
    engine = load_engine(args, reserved_cores=1)  # the HTTP event loop wakes for every streamed token
    name = args.model_name or Path(engine.model_dir).resolve().name or "daop"
    app = create_app(engine, name, args.max_body_bytes, args.api_key, args.max_batch, warmup=not args.no_warmup)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    threads = f", {engine.threads} dense-path thread{'s' if engine.threads != 1 else ''}" if engine.threads else ""
    log.info("serving %s on http://%s:%d/v1 (device %s%s, loaded in %.1f s, up to %d requests at once)", name, args.host,
             args.port, engine.device, threads, engine.load_s, app.state.worker.max_batch)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach it can use it", args.host)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=5)
    _server(config, app.state.worker).run()
    return 0


def _server(config: Any, worker: Worker) -> Any:
    """uvicorn's server, telling the worker first when asked to stop: the generation in progress and the
    queued ones end at once (a stream with an error event and `[DONE]`), so the graceful shutdown has
    no open stream to wait for or cut."""
    import uvicorn

    class StoppingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            worker.begin_stop()
            super().handle_exit(sig, frame)

    return StoppingServer(config)
