"""The generation worker: one thread runs all model code. Requests join a running batch between decode
steps (`daop.batching.Batcher`: iteration-level scheduling, at most --max-batch sequences at once,
the rest waiting first come first served) and leave it when finished, stopped or cancelled; a
cancelled request (its client went away) leaves at the next step.

Before the first request, the worker warms up (`Worker.warm_up`, on unless `daop serve --no-warmup`):
a few short synthetic sequences go through the batcher so that the batch grows to --max-batch rows
and shrinks again. Kernel compilation (Triton, the CPU expert kernel) and the captured decode steps
of every row count then happen at start, not in the first users' requests: on an H200 host the
first server run on a fresh machine served 49-51 tokens/s under load against 68-79 for later runs
(benchmarks/results/h200-mixtral-8x7b-8layers-serve-load-mixed-2026-12-03.jsonl). The server
answers nothing until it is done, and its counters leave the warm-up out."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from daop.batching import Batcher, Sequence
from daop.engine import GenerationStats
from daop.errors import DaopError
from daop.server.metrics import Metrics, engine_counters
from daop.server.schemas import ApiError

log = logging.getLogger("daop.server")

DEFAULT_MAX_BATCH = 8
WARMUP_PROMPT_TOKENS = 4


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
    """The one thread that runs model code: a Batcher fed from a FIFO queue of jobs."""

    def __init__(self, engine: Any, metrics: "Metrics", max_batch: int = DEFAULT_MAX_BATCH, warmup: bool = False) -> None:
        self.engine, self.metrics = engine, metrics
        self.max_batch = max_batch
        self.warmup = warmup
        self.warmed = threading.Event()  # set once the warm-up is over (at once without one)
        self.warmup_rows: list[int] = []  # the decode rows of each warm-up step
        self._counter_base: dict[str, float] = {}  # engine counters after the warm-up (left out of /metrics)
        self.jobs: queue.Queue[Optional[Job]] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0  # submitted, not yet running
        self._running = 0  # in the batch (prefilling or decoding)
        self._stopping = False
        self.counters: dict[str, float] = {}   # engine.counters() as of the last step (read by /metrics)
        # allocated here, before serving: a KV cache that cannot be allocated stops `daop serve` at start
        self.batcher = Batcher(engine, max_batch=max_batch, max_len=getattr(engine, "max_context", None))
        self._thread = threading.Thread(target=self._loop, name="daop-generation", daemon=True)

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return self._running

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
        """Stop the generations in progress between tokens; jobs still queued are answered as cancelled."""
        self._stopping = True  # the loop cancels the batch at its next iteration

    def stop(self, timeout: float = 10.0) -> None:
        self.begin_stop()
        self.jobs.put(None)
        self._thread.join(timeout)

    def warm_up(self) -> float:
        """Run max_batch short greedy sequences through the batcher (EOS ignored), admitted one per step
        with budgets max_batch + 2, max_batch + 3, ... (the first still decodes when the last joins), so
        the decode rows go 1, 2, ..., max_batch and back down as they finish in turn; returns
        the seconds it took. Every KV row is free again afterwards and the next request starts from
        the calibrated placement (the batch was empty). Run on the worker's thread, before serving."""
        t0 = time.perf_counter()
        self.warmup_rows = []
        vocab = self.engine.config.vocab_size
        prompt = [(3 + t) % vocab for t in range(WARMUP_PROMPT_TOKENS)]
        failed: list[Any] = []

        def emit(kind: str, payload: Any) -> None:
            if kind == "error":
                failed.append(payload)

        batcher = self.batcher
        for i in range(self.max_batch):
            params = self.engine.sampling_params(max_new_tokens=self.max_batch + 2 + i, temperature=0.0)
            batcher.add(Sequence(list(prompt), params, emit, ignore_eos=True))
        with torch.inference_mode():
            while not batcher.idle():
                if self._stopping:  # asked to stop while warming up
                    batcher.cancel_all()
                    break
                batcher.step()
                self.warmup_rows.append(len(batcher.decoding))
        if failed:
            raise DaopError(f"the warm-up failed: {failed[0]}")
        return time.perf_counter() - t0

    def _loop(self) -> None:
        if self.warmup:
            try:
                log.info("warming up: %d short sequences, the batch growing to that many rows", self.max_batch)
                log.info("warmed up in %.1f s", self.warm_up())
            except BaseException as exc:  # serve anyway: a request meets the same problem and gets its own error
                log.warning("warm-up failed (%s); serving without it", exc)
                self.batcher.cancel_all()
        self._counter_base = engine_counters(self.engine)
        self.counters = self._read_counters()
        self.warmed.set()
        batcher = self.batcher
        while True:
            finished = False
            try:  # wait for work when idle; otherwise take what has arrived and go on
                job = self.jobs.get(block=batcher.idle())
                while True:
                    if job is None:
                        finished = True
                    else:
                        self._start(job, batcher)
                    job = self.jobs.get_nowait()
            except queue.Empty:
                pass
            if self._stopping or finished:
                batcher.cancel_all()
                self._sync_counts(batcher)
                if finished:
                    return
                continue
            try:
                with torch.inference_mode():
                    batcher.step()
            except BaseException:  # never let the worker die: later requests would hang
                log.exception("generation worker error")
                batcher.fail_all(ApiError(500, "internal error in the generation worker"))
            self._sync_counts(batcher)
            self.counters = self._read_counters()  # read here: the engine is only touched by this thread

    def _read_counters(self) -> dict[str, float]:
        """The engine's counters since serving began (the warm-up's left out)."""
        base = self._counter_base
        return {k: v - base.get(k, 0.0) for k, v in engine_counters(self.engine).items()}

    def _sync_counts(self, batcher: Batcher) -> None:
        with self._lock:
            self._running = batcher.running
            self._waiting = self.jobs.qsize() + len(batcher.waiting)

    def _start(self, job: Job, batcher: Batcher) -> None:
        """Check a job and hand it to the batcher (or answer it at once)."""
        if job.cancel.is_set() or self._stopping:
            self.metrics.cancelled()
            job.emit("cancelled")
            return
        try:
            ids = self.engine.chat_prompt(job.messages) if job.messages is not None else job.prompt
            ids = self.engine.encode(ids)
            self._check_context(job, len(ids))
            params = self.engine.sampling_params(**job.sampling)
        except DaopError as exc:
            job.emit("error", ApiError(400, str(exc)))
            return
        job.emit("start", len(ids))
        batcher.add(Sequence(ids, params, self._events_for(job), cancelled=job.cancel.is_set))

    def _events_for(self, job: Job) -> Callable[[str, Any], None]:
        def emit(kind: str, payload: Any) -> None:
            if kind == "text":
                job.emit("text", payload)
            elif kind == "done":
                self.metrics.generation(payload)  # before the last event: a client with its answer sees the counts
                job.emit("done", _stats_dict(payload))
            elif kind == "cancelled":
                self.metrics.cancelled()
                job.emit("cancelled")
            else:
                job.emit("error", payload if isinstance(payload, ApiError) else ApiError(400, str(payload)))
        return emit

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
