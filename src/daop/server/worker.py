"""The generation worker: one thread runs all model code, taking jobs from a FIFO queue, and stops a job
between tokens when its client goes away."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from daop.engine import GenerationStats
from daop.errors import DaopError
from daop.server.metrics import Metrics, engine_counters
from daop.server.schemas import ApiError

log = logging.getLogger("daop.server")


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
    max_tokens_given: bool = False       # the client set max_tokens: a prompt + max_tokens beyond the context is a 400
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

    @property
    def stopping(self) -> bool:
        return self._stopping

    def begin_stop(self) -> None:
        """Stop the generation in progress between tokens; jobs still queued are answered as cancelled."""
        self._stopping = True
        active = self.active
        if active is not None:
            active.cancel.set()

    def stop(self, timeout: float = 10.0) -> None:
        self.begin_stop()
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
            self._check_context(job, len(ids))
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


    def _check_context(self, job: Job, prompt_tokens: int) -> None:
        limit = getattr(getattr(self.engine, "config", None), "context_length", None)
        wanted = job.sampling["max_new_tokens"]
        if job.max_tokens_given and limit is not None and prompt_tokens + wanted > limit:
            raise DaopError(f"This model's maximum context length is {limit} tokens. However, you requested "
                            f"{prompt_tokens + wanted} tokens ({prompt_tokens} in the prompt, {wanted} in the completion). "
                            f"Please reduce the length of the prompt or the completion (max_tokens).")


def _stats_dict(stats: GenerationStats) -> dict[str, Any]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "finish_reason": stats.finish_reason}
