"""GET /metrics: request, generation and engine counters in Prometheus text format, and the middleware
that counts and times every HTTP request."""
from __future__ import annotations

import logging
import math
import re
import threading
import time
from typing import Any

from daop.engine import GenerationStats

log = logging.getLogger("daop.server")

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")



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

    def render(self, model: str, waiting: int, running: int, engine_counters: dict[str, float]) -> str:
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
            metric("daop_generation_active", "gauge", "1 while the worker is generating.", [("", int(running > 0))])
            metric("daop_batch_running", "gauge", "Sequences in the running batch (prefilling or decoding; each holds "
                   "one KV cache row).", [("", running)])
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
            metric(name, "counter", f"Expert counter {key} since serving began (engine.counters(), the warm-up left out).",
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

