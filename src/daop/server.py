"""OpenAI-compatible HTTP server: `daop serve` (needs the `daop[server]` extra: FastAPI + uvicorn).

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with
`stream: true` as server-sent events), GET /metrics (Prometheus text format).

The engine is not thread-safe, so every piece of model work (tokenizing, prefill, decode) runs on one
dedicated worker thread that takes jobs from a FIFO queue, first come first served. The event loop
only parses requests and moves text: the worker hands each text piece to the request's asyncio queue
with `loop.call_soon_threadsafe`. A client that goes away sets its job's cancel flag; the worker checks
it after every token and closes the generation, which frees its KV cache, so the next job starts at once.

Errors use OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import queue
import re
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from daop.engine import GenerationStats
from daop.errors import DaopError
from daop.sampling import SamplingParams

log = logging.getLogger("daop.server")

DEFAULT_MAX_TOKENS = 256
DEFAULT_MAX_BODY_BYTES = 1 << 20
DRAIN_BYTES = 8 << 20          # how much of an oversized body is read and dropped so the 413 reaches the client
DISCONNECT_POLL_S = 0.25       # how often a waiting non-streamed request checks that its client is still there
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")


# ----------------------------------------------------------------------------------------------- errors

class ApiError(Exception):
    """An error answered to the client in OpenAI's JSON shape."""

    TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
             413: "invalid_request_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or self.TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class ClientGone(Exception):
    """The client disconnected while its request waited or ran."""


def _param_name(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _validation_error(exc: ValidationError) -> ApiError:
    err = exc.errors(include_url=False)[0]
    param = _param_name(tuple(err.get("loc", ())))
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return ApiError(400, f"Invalid value for '{param}': {msg}" if param else msg, param=param or None)


# --------------------------------------------------------------------------------------------- requests

class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: Optional[bool] = None


# Fields other servers honour and this one does not: asking for them is an error, not a silent no-op.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "tools": (None, []), "functions": (None, []),
}


class _Common(_Strict):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    stop: Any = None
    n: Optional[int] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, v: Any) -> Any:
        if v is None:
            return None
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
            raise ValueError("expected a non-empty string or a list of non-empty strings")
        if len(v) > 16:
            raise ValueError("at most 16 stop strings")
        return v

    def max_new_tokens(self) -> int:
        return self.max_tokens if self.max_tokens is not None else DEFAULT_MAX_TOKENS

    def sampling(self) -> dict[str, Any]:
        """Keyword arguments of Engine.stream (validated by SamplingParams; absent temperature means 1.0)."""
        kw = dict(max_new_tokens=self.max_new_tokens(),
                  temperature=1.0 if self.temperature is None else float(self.temperature),
                  top_p=1.0 if self.top_p is None else float(self.top_p), top_k=self.top_k or 0,
                  seed=self.seed, stop=tuple(self.stop or ()))
        try:
            SamplingParams(**kw)
        except DaopError as exc:
            raise ApiError(400, str(exc)) from exc
        return kw


class CompletionRequest(_Common):
    prompt: Any

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
            v = v[0]  # a batch of one
        if isinstance(v, str):
            return v
        if isinstance(v, list) and v and all(type(t) is int for t in v):
            return v
        if isinstance(v, list) and v and all(isinstance(t, (str, list)) for t in v):
            raise ValueError("only one prompt per request is supported")
        raise ValueError("expected a string or a non-empty list of token ids")


class ChatMessage(_Strict):
    role: str
    content: Any = None
    name: Optional[str] = None

    @field_validator("content", mode="before")
    @classmethod
    def _check_content(cls, v: Any) -> Any:
        if isinstance(v, str):
            return v
        if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                       for p in v):
            return "\n".join(p["text"] for p in v)
        raise ValueError("expected a string or a list of {type: 'text', text} parts")


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)

    def max_new_tokens(self) -> int:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return super().max_new_tokens()

    def chat_messages(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in self.messages]


# ----------------------------------------------------------------------------------------------- worker

class _Cancelled(Exception):
    pass


class _CancellableStats(GenerationStats):
    """Stats the engine updates once per token; raising from that update stops the generation between tokens."""

    def __init__(self, cancel: threading.Event) -> None:
        object.__setattr__(self, "_cancel", cancel)
        super().__init__()

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "generated_tokens" and value and self._cancel.is_set():
            raise _Cancelled()
        object.__setattr__(self, name, value)


@dataclass
class Job:
    """One generation request: what to run, and where to send its events."""

    prompt: Any                          # str | list[int], or None for chat
    messages: Optional[list[dict[str, str]]]
    sampling: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancel: threading.Event = field(default_factory=threading.Event)
    checked_at: float = field(default_factory=time.monotonic)   # when the server last checked the client is there

    def emit(self, kind: str, payload: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone (shutting down)
            self.cancel.set()


class Worker:
    """The one thread that runs model code, taking jobs first come first served."""

    def __init__(self, engine: Any, metrics: "Metrics") -> None:
        self.engine, self.metrics = engine, metrics
        self.jobs: queue.Queue[Optional[Job]] = queue.Queue()
        self.active: Optional[Job] = None
        self._lock = threading.Lock()
        self._waiting = 0
        self._stopping = False
        self.counters: dict[str, float] = {}   # engine.counters() as of the last finished job (read by /metrics)
        self._thread = threading.Thread(target=self._loop, name="daop-generation", daemon=True)

    @property
    def waiting(self) -> int:
        return self._waiting

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            self._waiting += 1
        self.jobs.put(job)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True  # jobs still queued are answered as cancelled
        active = self.active
        if active is not None:
            active.cancel.set()
        self.jobs.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        self.counters = engine_counters(self.engine)
        while True:
            job = self.jobs.get()
            if job is None:
                return
            with self._lock:
                self._waiting -= 1
            self.active = job
            try:
                self._run(job)
            except BaseException:  # never let the worker die: later requests would hang
                log.exception("generation worker error")
                job.emit("error", ApiError(500, "internal error in the generation worker"))
            finally:
                self.counters = engine_counters(self.engine)  # read here: the engine is only touched by this thread
                self.active = None

    def _run(self, job: Job) -> None:
        if job.cancel.is_set() or self._stopping:
            self.metrics.cancelled()
            job.emit("cancelled")
            return
        stats = _CancellableStats(job.cancel)
        gen = None
        final: tuple[str, Any]
        try:
            ids = self.engine.chat_prompt(job.messages) if job.messages is not None else job.prompt
            ids = self.engine.encode(ids)
            gen = self.engine.stream(ids, stats=stats, **job.sampling)
            job.emit("start", len(ids))
            for piece in gen:
                job.emit("text", piece)
                if job.cancel.is_set():
                    raise _Cancelled()
            final = ("done", _stats_dict(stats))
        except _Cancelled:
            self.metrics.cancelled()
            final = ("cancelled", None)
        except DaopError as exc:
            final = ("error", ApiError(400, str(exc)))
        except Exception as exc:
            log.exception("generation failed")
            final = ("error", ApiError(500, f"internal error during generation: {type(exc).__name__}"))
        finally:
            if gen is not None:
                try:
                    gen.close()  # a no-op when finished; otherwise cancels it and frees its KV cache
                except _Cancelled:
                    pass
        self.metrics.generation(stats)  # before the last event, so a client that got its answer sees the counts
        job.emit(*final)


def _stats_dict(stats: GenerationStats) -> dict[str, Any]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "finish_reason": stats.finish_reason}


# ---------------------------------------------------------------------------------------------- metrics

class Metrics:
    """Counters for GET /metrics (Prometheus text exposition format), safe to update from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}
        self.durations: dict[str, list[int]] = {}     # endpoint -> [count per bucket..., +Inf count]
        self.duration_sums: dict[str, float] = {}
        self.tokens_generated = 0
        self.prompt_tokens = 0
        self.generations = 0
        self.cancellations = 0
        self.last_decode_tps = 0.0

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (endpoint, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            h = self.durations.setdefault(endpoint, [0] * (len(DURATION_BUCKETS) + 1))
            for i, le in enumerate(DURATION_BUCKETS):
                if seconds <= le:
                    h[i] += 1
            h[-1] += 1
            self.duration_sums[endpoint] = self.duration_sums.get(endpoint, 0.0) + seconds

    def generation(self, stats: GenerationStats) -> None:
        with self._lock:
            self.generations += 1
            self.tokens_generated += stats.generated_tokens
            self.prompt_tokens += stats.prompt_tokens
            if stats.generated_tokens > 1 and stats.decode_s > 0:
                self.last_decode_tps = stats.decode_tokens_per_s

    def cancelled(self) -> None:
        with self._lock:
            self.cancellations += 1

    def render(self, model: str, waiting: int, active: bool, engine_counters: dict[str, float]) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {_num(v)}" for labels, v in samples)

        with self._lock:
            metric("daop_info", "gauge", "Served model.", [(f'{{model="{_esc(model)}"}}', 1)])
            metric("daop_requests_total", "counter", "HTTP requests by endpoint and status code.",
                   [(f'{{endpoint="{_esc(e)}",status="{s}"}}', n) for (e, s), n in sorted(self.requests.items())])
            metric("daop_requests_cancelled_total", "counter", "Generations cancelled because the client went away.",
                   [("", self.cancellations)])
            metric("daop_generations_total", "counter", "Generations run by the worker.", [("", self.generations)])
            metric("daop_tokens_generated_total", "counter", "Completion tokens generated.", [("", self.tokens_generated)])
            metric("daop_prompt_tokens_total", "counter", "Prompt tokens processed.", [("", self.prompt_tokens)])
            metric("daop_decode_tokens_per_second", "gauge", "Decode speed of the last finished generation.",
                   [("", self.last_decode_tps)])
            metric("daop_queue_depth", "gauge", "Generation requests waiting for the worker.", [("", waiting)])
            metric("daop_generation_active", "gauge", "1 while the worker is generating.", [("", int(active))])
            samples: list[tuple[str, float]] = []
            for e, h in sorted(self.durations.items()):
                lab = _esc(e)
                samples += [(f'_bucket{{endpoint="{lab}",le="{le}"}}', h[i]) for i, le in enumerate(DURATION_BUCKETS)]
                samples += [(f'_bucket{{endpoint="{lab}",le="+Inf"}}', h[-1]),
                            (f'_sum{{endpoint="{lab}"}}', self.duration_sums[e]), (f'_count{{endpoint="{lab}"}}', h[-1])]
            metric("daop_request_duration_seconds", "histogram", "Request duration, to the last byte of the response.",
                   samples)
        for key, value in sorted(engine_counters.items()):
            name = "daop_expert_" + re.sub(r"[^a-zA-Z0-9_]", "_", str(key)).removesuffix("_total") + "_total"
            metric(name, "counter", f"Expert counter {key} since the model was loaded (engine.counters()).",
                   [("", value)])
        return "\n".join(out) + "\n"


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(v: float) -> str:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("+Inf" if v > 0 else "-Inf" if v < 0 else "NaN")
    return str(v)


def engine_counters(engine: Any) -> dict[str, float]:
    """engine.counters() if the engine has it: a dict of numbers (anything else is left out)."""
    fn = getattr(engine, "counters", None)
    if not callable(fn):
        return {}
    try:
        raw = dict(fn())
    except Exception:
        log.exception("engine.counters() failed")
        return {}
    return {k: v for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class MetricsMiddleware:
    """Counts every HTTP request by endpoint and status, timing it to the end of its (streamed) body."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
        status = [0]
        t0 = time.perf_counter()

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            code = scope.get("daop.status") or status[0] or 500
            self.metrics.request(endpoint, code, time.perf_counter() - t0)


# -------------------------------------------------------------------------------------------------- app

async def read_json(request: Request, max_bytes: int) -> dict[str, Any]:
    """The request body as a JSON object; 413 past max_bytes, 400 when it is not a JSON object."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_n = int(declared)
        except ValueError:
            raise ApiError(400, "invalid Content-Length header") from None
        if declared_n > max_bytes + DRAIN_BYTES:
            raise _too_large(max_bytes)
    body = bytearray()
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes + DRAIN_BYTES:
                break
            if total <= max_bytes:
                body += chunk
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected while sending the request body") from None
    if total > max_bytes:
        raise _too_large(max_bytes)

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(bytes(body), parse_constant=no_constants)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ApiError(400, f"We could not parse the JSON body of your request: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    if _SURROGATE_ESCAPE.search(body):  # JSON may spell a lone UTF-16 surrogate, which no tokenizer accepts
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except (UnicodeEncodeError, RecursionError):
            raise ApiError(400, "The request body contains an unpaired surrogate escape (\\ud800-\\udfff); "
                                "strings must be valid Unicode.") from None
    return data


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"Request body is larger than the server's limit of {max_bytes} bytes (--max-body-bytes).",
                    code="request_too_large")


def create_app(engine: Any, model_name: str, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app serving engine under model_name. The worker thread starts with the app's lifespan."""
    metrics = Metrics()
    worker = Worker(engine, metrics)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="daop", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker, app.state.metrics, app.state.engine = worker, metrics, engine
    app.add_middleware(MetricsMiddleware, metrics=metrics)

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

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "daop"}

    def check_model(name: Optional[str]) -> None:
        if name is not None and name != model_name:
            raise ApiError(404, f"The model `{name}` does not exist; this server serves `{model_name}`.",
                           param="model", code="model_not_found")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        check_model(name)
        return model_card()

    @app.get("/metrics")
    async def get_metrics() -> PlainTextResponse:
        text = metrics.render(model_name, worker.waiting, worker.active is not None, worker.counters)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def parse(request: Request, model: type[_Common]) -> _Common:
        data = await read_json(request, max_body_bytes)
        for key, allowed in _UNSUPPORTED.items():
            if key in data and data[key] not in allowed:
                raise ApiError(400, f"'{key}' is not supported by this server", param=key)
        try:
            req = model.model_validate(data)
        except ValidationError as exc:
            raise _validation_error(exc) from None
        check_model(req.model)
        if req.n is not None and req.n != 1:
            raise ApiError(400, "Only n=1 is supported.", param="n")
        return req

    async def next_event(job: Job, request: Request) -> tuple[str, Any]:
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

    async def run(request: Request, req: _Common, prompt: Any, messages: Optional[list[dict[str, str]]],
                  kind: str) -> Response:
        sampling = req.sampling()
        job = Job(prompt, messages, sampling, asyncio.get_running_loop(), asyncio.Queue())
        worker.submit(job)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        created_at = int(time.time())
        streaming = False
        try:
            event, payload = await next_event(job, request)   # waits for this job's turn
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
                event, payload = await next_event(job, request)
                if event == "text":
                    pieces.append(payload)
                elif event == "done":
                    return JSONResponse(_full_response(kind, rid, created_at, model_name, "".join(pieces), payload))
                elif event == "error":
                    raise payload
                else:
                    raise ClientGone()
        except ClientGone:
            request.scope["daop.status"] = 499  # what the metrics count: the client closed the request
            return Response(status_code=499)
        finally:
            if not streaming:
                job.cancel.set()  # a no-op once the job is done; otherwise stops it (error, client gone)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await parse(request, CompletionRequest)
        return await run(request, req, req.prompt, None, "text")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await parse(request, ChatCompletionRequest)
        return await run(request, req, None, req.chat_messages(), "chat")

    return app


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
    engine = load_engine(args)
    name = args.model_name or Path(engine.model_dir).resolve().name or "daop"
    app = create_app(engine, name, args.max_body_bytes)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    log.info("serving %s on http://%s:%d/v1 (device %s, loaded in %.1f s)", name, args.host, args.port,
             engine.device, engine.load_s)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: the server has no authentication; anyone who can reach it can use it", args.host)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()
    return 0
