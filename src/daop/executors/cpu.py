"""CPU expert executor: computes host-resident experts with torch on the host weights.

Two places to run, chosen by calibration (`daop.executors.cpu_tuning`):
- "worker": one dedicated thread with its own OpenMP team; the driving thread keeps launching GPU
  work while it computes.
- "inline": on the thread that asks for the result, when it asks (`Future.result()`), after it has
  launched the layer's GPU work; no second Python thread, so no GIL handoffs at all.

Why the worker needs care: torch releases the GIL inside each operator, and every Python step
between two operators must take it back. While the driving thread holds the GIL (Python that
plans or launches kernels), each take-back waits for the interpreter's switch interval (5 ms by
default), which made a 3.7 ms expert take 7-60 ms. So the worker runs a whole job list in one
TorchScript call (one release, one take-back) and, while jobs are pending, the switch interval is
lowered so the remaining take-backs cost microseconds. Host waits on CUDA events must use
blocking events (`torch.cuda.Event(blocking=True)`), which sleep instead of spinning.
An exception in a job is re-raised in the caller by `result()`.

Kernels: with `native`, a job list the C kernel serves whole (`daop.kernels.cpu_expert`: bf16
experts for 1-8 tokens, at about the host's read bandwidth where torch's products took 1.4-1.7x
longer; with AMX up to 128 tokens, a prompt's share of an expert) is queued on the kernel's own
thread, in either mode: it starts at once and never needs the
GIL (a Python worker waited up to half a millisecond per job for the driving thread to let go of
it). Other lists run as above, each job the kernel serves through it, the rest through
`expert_forward`. Only CPU experts of a model on a GPU use the kernel: on a CPU device every
expert must equal the all-resident path bit for bit, in a batch or alone, and the kernel serves
only some token counts.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, List, Mapping, Optional, Tuple

import torch

from daop.kernels import cpu_expert
from daop.quant import expert_forward, expert_rows

MODES = ("worker", "inline")
SWITCH_INTERVAL_S = 5e-5  # while CPU experts run: a GIL take-back waits at most about this long

Job = tuple[int, torch.Tensor, tuple[torch.Tensor, ...]]  # (expert, token rows [n], the expert's tensors)


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads share execution units), else logical CPUs."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        cores = set()
        with open("/proc/cpuinfo") as f:
            phys = core = None
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    cores.add((phys, core))
        if cores:
            return max(1, min(len(cores), allowed))
    except OSError:
        pass
    return allowed


def default_cpu_threads(device: torch.device) -> int:
    """Threads for CPU experts when nothing was measured: every physical core, less one that keeps
    driving the GPU. Calibration replaces this with a measured choice (`cpu_tuning.choose`)."""
    cores = physical_cores()
    return max(1, cores - 1) if device.type == "cuda" and cores > 2 else cores


def every_row(rows: torch.Tensor, n: int) -> bool:
    """Whether token rows [k] are 0..n-1 in order (one token: [0])."""
    if rows.shape[0] != n:
        return False
    return rows.tolist() == [0] if n == 1 else torch.equal(rows, torch.arange(n, dtype=rows.dtype))


class SwitchInterval:
    """sys.setswitchinterval lowered while any CPU job is pending (counted), restored after the last."""

    def __init__(self, interval_s: float = SWITCH_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.lock = threading.Lock()
        self.depth = 0
        self.saved = 0.0

    def enter(self) -> None:
        with self.lock:
            if self.depth == 0:
                self.saved = sys.getswitchinterval()
                sys.setswitchinterval(min(self.saved, self.interval_s))
            self.depth += 1

    def exit(self) -> None:
        with self.lock:
            self.depth -= 1
            if self.depth == 0:
                sys.setswitchinterval(self.saved)


SWITCH = SwitchInterval()


def run_jobs_eager(h: torch.Tensor, rows: List[torch.Tensor], weights: List[List[torch.Tensor]],
                   glu: Optional[Tuple[float, float]] = None) -> List[torch.Tensor]:
    """Every job's expert output [n, D] for its token rows of h [T, D], in job order (glu: see `expert_forward`)."""
    out: List[torch.Tensor] = []
    for i in range(len(rows)):
        out.append(expert_forward(h.index_select(0, rows[i]), weights[i], glu))
    return out


_SCRIPTED: list = []


def job_kernel() -> Callable:
    """run_jobs_eager compiled by TorchScript (the job list in one native call, GIL released
    throughout), or the eager function where scripting is unavailable. Compiled once, on first use.
    The executor runs it with graph optimisation off (`optimized_execution(False)`), so it executes
    exactly the eager operators: no fusion, bitwise the same results."""
    if not _SCRIPTED:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TorchScript is deprecated, still the one GIL-free sequence here
                _SCRIPTED.append(torch.jit.script(run_jobs_eager))
        except Exception:  # noqa: BLE001 - any scripting failure falls back to the same code in Python
            _SCRIPTED.append(run_jobs_eager)
    return _SCRIPTED[0]


class DeferredFuture(Future):
    """A Future whose work runs on the thread that first asks for its result (inline mode)."""

    def __init__(self, work: Callable[[], dict]) -> None:
        super().__init__()
        self.work: Callable[[], dict] | None = work

    def result(self, timeout: float | None = None):
        work, self.work = self.work, None
        if work is not None:
            try:
                self.set_result(work())
            except BaseException as exc:  # noqa: BLE001 - delivered to the caller below, as a worker's would be
                self.set_exception(exc)
        return super().result(timeout)


def kernel_name(native: bool) -> str:
    """Which products CPU experts run on (for profiles and bench cards): native is asked for a model on a GPU."""
    if native and cpu_expert.available():
        upto = cpu_expert.max_tokens(32, 32)  # an aligned shape: the most any path of this CPU takes
        return (f"daop C kernel ({cpu_expert.isa()}) for bf16 at 1-{upto} tokens and int8 at 1-{cpu_expert.MAX_TOKENS}, "
                "else torch")
    return "torch"


class QueuedFuture(Future):
    """Experts queued on the C kernel's own thread (`cpu_expert.Queued`): they start at once and
    run without the GIL; `result()` waits without it too. The executor's busy time and expert-token
    count are added when the result is first taken."""

    def __init__(self, executor: "CpuExecutor", queued, experts: list[int], tokens: int, submitted: float,
                 span: Callable[[float, float, float], None] | None) -> None:
        super().__init__()
        self.executor, self.queued, self.experts, self.tokens = executor, queued, experts, tokens
        self.submitted, self.span = submitted, span

    def done(self) -> bool:
        return super().done() or self.queued.done()

    def join(self) -> None:
        """Block (without the GIL) until the jobs have run; their errors are left for `result()`."""
        self.queued.lib.daop_wait(self.queued.ticket)

    def result(self, timeout: float | None = None):
        if not super().done():
            try:
                ys = self.queued.wait()
            except BaseException as exc:  # noqa: BLE001 - delivered to the caller below
                self.set_exception(exc)
            else:
                spans = self.queued.spans()
                self.executor.busy_s += sum(b - a for a, b in spans)
                self.executor.expert_tokens += self.tokens
                if self.span is not None:
                    self.span(self.submitted, spans[0][0], spans[-1][1])
                self.set_result(dict(zip(self.experts, ys)))
        return super().result(timeout)


class CpuExecutor:
    """Runs lists of CPU expert jobs; `busy_s` is compute time, `expert_tokens` the (expert, token) pairs done."""

    def __init__(self, threads: int | None = None, mode: str = "worker", scripted: bool = True,
                 native: bool = False, glu: tuple[float, float] | None = None) -> None:
        """glu: the experts' activation (`daop.model.moe.gated`); the C kernel computes only silu(gate) * up."""
        if mode not in MODES:
            raise ValueError(f"CPU executor mode must be one of {MODES}, got {mode!r}")
        self.threads = threads or physical_cores()
        self.mode = mode
        self.kernel = job_kernel() if scripted else run_jobs_eager
        self.native = native and glu is None and cpu_expert.available()
        if self.native:  # the kernel's serving thread: sleep at once after a job, or poll a while (DAOP_CPU_SPIN_US)
            cpu_expert.set_spin_us(cpu_expert.spin_us())
        self.glu = glu
        self.busy_s = 0.0
        self.expert_tokens = 0
        self.pool = None
        if mode == "worker":
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="daop-cpu", initializer=torch.set_num_threads,
                                           initargs=(self.threads,))

    def _native(self, x: torch.Tensor, w: list, rows: int | None) -> torch.Tensor:
        """One expert through the C kernel (bf16, or int8 with its scales), on this thread."""
        gate_up, down, scales = cpu_expert.parts(w)
        return cpu_expert.expert(x, gate_up, down, self.threads, rows=rows, scales=scales)

    def submit(self, jobs: list[Job], h_host: torch.Tensor, ready: "torch.cuda.Event | None",
               compute: Callable | None = None, ahead: bool = False,
               span: Callable[[float, float, float], None] | None = None,
               parts: Mapping[int, int] | None = None) -> Future:
        """Compute experts on the CPU: jobs are (expert, token rows [n], host weights); returns {expert: y}.

        ready: the event of the activations' device->host copy, waited on before reading h_host.
        compute: a per-expert function instead of `expert_forward` (run in Python, for tests and probes).
        ahead: the result is wanted only after the caller has done other work (a pre-calculation
        for a later layer), so the job runs on a worker thread even in inline mode.
        span: called with the perf_counter times the job was submitted, began computing (its input
        ready) and ended (for a measured timeline).
        parts: expert -> K for experts split with the GPU: the CPU computes only their intermediate
        rows [0, K) (float SwiGLU experts, `daop.quant.expert_rows`), the GPU adds the rest.
        """
        # Lists built here, on the driving thread: the worker runs as little Python as possible.
        experts = [e for e, _, _ in jobs]
        rows = [r for _, r, _ in jobs]
        weights = [list(w) for _, _, w in jobs]
        heads = [(parts or {}).get(e) for e in experts]
        # expert-tokens done: a split expert's part counts its share of the rows
        tokens = sum(r.shape[0] * (1.0 if k is None else k / w[-1].shape[-1]) for r, w, k in zip(rows, weights, heads))
        if compute is not None and any(k is not None for k in heads):
            raise ValueError("a compute function serves whole experts only, not the CPU's part of a split one")
        submitted = time.perf_counter()
        if (compute is None and self.native and rows
                and all(cpu_expert.serves(h_host.dtype, r.shape[0], w, k) for r, w, k in zip(rows, weights, heads))):
            if ready is not None:
                ready.synchronize()  # the activations' copy (the caller has just read the routing: it is quick)
            # a job of every row in order reads h_host itself (the caller's buffer stays the job's until it is done)
            queued = cpu_expert.Queued([h_host if every_row(r, h_host.shape[0]) else h_host.index_select(0, r) for r in rows],
                                       weights, self.threads, pin=h_host.is_pinned(), rows=heads)
            return QueuedFuture(self, queued, experts, tokens, submitted, span)

        def run() -> dict[int, torch.Tensor]:
            if ready is not None:
                ready.synchronize()
            t0 = time.perf_counter()
            with torch.inference_mode(), torch.jit.optimized_execution(False):  # thread-local: no fusion passes
                if compute is not None:
                    ys = [compute(h_host.index_select(0, r), *w) for r, w in zip(rows, weights)]
                else:  # per job: the C kernel where it serves, the rest in one scripted call
                    served = [self.native and cpu_expert.serves(h_host.dtype, len(r), w, k)
                              for r, w, k in zip(rows, weights, heads)]
                    rest = [i for i, s in enumerate(served) if not s and heads[i] is None]
                    by_torch = iter(self.kernel(h_host, [rows[i] for i in rest], [weights[i] for i in rest], self.glu) if rest else [])
                    ys = [self._native(h_host.index_select(0, r), w, k) if s
                          else next(by_torch) if k is None else expert_rows(h_host.index_select(0, r), w, 0, k)
                          for r, w, s, k in zip(rows, weights, served, heads)]
            t1 = time.perf_counter()
            self.busy_s += t1 - t0
            self.expert_tokens += tokens
            if span is not None:
                span(submitted, t0, t1)
            return dict(zip(experts, ys))

        if self.mode == "inline" and not ahead:
            return DeferredFuture(lambda: self._inline(run))
        if self.pool is None:
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="daop-cpu", initializer=torch.set_num_threads,
                                           initargs=(self.threads,))
        SWITCH.enter()

        def worker() -> dict[int, torch.Tensor]:
            try:
                return run()
            finally:
                SWITCH.exit()

        try:
            return self.pool.submit(worker)
        except BaseException:
            SWITCH.exit()
            raise

    def _inline(self, run: Callable[[], dict]) -> dict:
        # The calling thread keeps this count afterwards: switching the OpenMP team's size around
        # every job makes the runtime re-form the team twice per job. Its own torch work is small
        # GPU launches on CUDA, and on a CPU device the executor runs with the dense path's count.
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return run()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
