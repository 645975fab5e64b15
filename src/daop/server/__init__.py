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

from daop.server.app import DISCONNECT_POLL_S, create_app, serve
from daop.server.metrics import DURATION_BUCKETS, ENDPOINTS, Metrics, MetricsMiddleware, engine_counters
from daop.server.schemas import (DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_TOKENS, DRAIN_BYTES, ApiError,
                                 ChatCompletionRequest, ChatMessage, ClientGone, CompletionRequest, StreamOptions,
                                 read_json)
from daop.server.worker import Job, Worker

__all__ = [
    "DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_TOKENS", "DISCONNECT_POLL_S", "DRAIN_BYTES", "DURATION_BUCKETS", "ENDPOINTS",
    "ApiError", "ChatCompletionRequest", "ChatMessage", "ClientGone", "CompletionRequest", "Job", "Metrics",
    "MetricsMiddleware", "StreamOptions", "Worker", "create_app", "engine_counters", "read_json", "serve",
]
