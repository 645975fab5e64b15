"""Measure CPU experts the way the executor runs them, and choose its mode and thread count.

Every candidate (mode, threads) is timed through `CpuExecutor.submit` while the calling thread plays
the driving thread: right after submitting, it launches a burst of small kernels from Python (as
when it plans a layer and launches its GPU work) and then waits for the result. That is where the
executor's real costs show: GIL handoffs of a worker, a team of `cores` threads competing with
the driving thread, or an inline expert that starts only after the burst. Non-goal: modelling
the whole decode step; the burst is a fixed, typical amount of Python.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from daop.executors.cpu import MODES, CpuExecutor
from daop.quant import ExpertFormat

LOAD_OPS = 48  # small kernels launched per call by the simulated driving thread (~0.2-0.5 ms of Python)
DISTINCT_BYTES = 512 * 2**20  # experts cycled through so that caches do not hold the weights


@dataclass(frozen=True)
class Trial:
    """One candidate's medians per token count: wall (submit to result) and executor busy time, ms."""

    mode: str
    threads: int
    wall_ms: tuple[float, ...]
    busy_ms: tuple[tuple[float, ...], ...]  # every repeat, per token count

    @property
    def label(self) -> str:
        return f"{self.mode} x{self.threads}"

    @property
    def score(self) -> float:
        return sum(self.wall_ms)


def thread_candidates(cores: int) -> list[int]:
    """All cores, one or two left for the driving thread, and half of them; most first."""
    return sorted({c for c in (cores, cores - 1, cores - 2, cores // 2) if c >= 1}, reverse=True)


def driving_load(device: torch.device) -> Callable[[], None]:
    """A burst of small kernels launched from Python, like the driving thread between a submit and its result."""
    x = torch.zeros(256, device=device)

    def load() -> None:
        for _ in range(LOAD_OPS):
            x.add_(1.0)

    return load


def distinct_experts(hidden: int, inter: int, fmt: ExpertFormat | torch.dtype) -> list[tuple[torch.Tensor, ...]]:
    """Random experts in a format, several copies so that repeats read memory, not cache."""
    first = ExpertFormat.of(fmt).from_float(torch.randn(2 * inter, hidden) * 0.02, torch.randn(hidden, inter) * 0.02)
    nbytes = sum(t.numel() * t.element_size() for t in first)
    count = max(2, min(16, math.ceil(DISTINCT_BYTES / nbytes)))
    return [first] + [tuple(t.clone() for t in first) for _ in range(count - 1)]


def run_trial(mode: str, threads: int, experts: list, counts: tuple[int, ...], repeat: int,
              load: Callable[[], None], native: bool = False) -> Trial:
    """Median wall ms per token count for one expert per call, plus every repeat's busy ms."""
    hidden = experts[0][len(experts[0]) // 2].shape[0]  # the down weights' output rows
    dtype = experts[0][1].dtype  # float down, or the scales (in the activations' dtype)
    ex = CpuExecutor(threads, mode, native=native)
    walls, busys, k = [], [], 0
    previous = torch.get_num_threads()  # an inline trial leaves its count on this thread
    try:
        for n in counts:
            rows = torch.arange(n)
            w, b = [], []
            for i in range(repeat + 1):  # the first call warms up (thread team, code paths)
                h = torch.randn(n, hidden).to(dtype)
                busy0 = ex.busy_s
                t0 = time.perf_counter()
                future = ex.submit([(0, rows, experts[k % len(experts)])], h, None)
                load()
                future.result()
                if i:
                    w.append((time.perf_counter() - t0) * 1000)
                    b.append((ex.busy_s - busy0) * 1000)
                k += 1
            walls.append(statistics.median(w))
            busys.append(tuple(b))
    finally:
        ex.close()
        torch.set_num_threads(previous)
    return Trial(mode, threads, tuple(walls), tuple(busys))


def choose(trials: list[Trial], counts: tuple[int, ...], fixed: str | None = None) -> tuple[Trial, str]:
    """The fastest candidate (least total wall time over the token counts) and why, in words.

    fixed: why the thread count was not chosen (then only the mode was)."""
    ranked = sorted(trials, key=lambda t: t.score)
    best = ranked[0]
    per = "/".join(str(n) for n in counts)
    listing = "; ".join(f"{t.label} " + "/".join(f"{ms:.2f}" for ms in t.wall_ms) for t in ranked)
    how = f"{fixed}; mode measured" if fixed else "fastest measured candidate"
    return best, (f"{best.label} ({how}): ms per expert call at {per} tokens, submit to result while the calling "
                  f"thread launches {LOAD_OPS} small kernels: {listing}")


def tune(experts: list, load: Callable[[], None], device: torch.device, cores: int, threads: int | None,
         mode: str | None, counts: tuple[int, ...], repeat: int) -> tuple[list[Trial], Trial, str]:
    """Time every candidate (or only the given threads / mode) and choose.

    On a GPU device the executor runs as the engine runs it there (`native`: daop's CPU kernel
    where it serves). When the device is the CPU, CPU experts keep the driving thread's thread count: a different
    count can change the CPU GEMM's summation order, and exact policies must stay bitwise equal to
    the all-resident path that runs on the driving thread.
    """
    fixed = "threads set by the user" if threads else None
    if threads is None and device.type == "cpu":
        threads, fixed = torch.get_num_threads(), "the device is the CPU: the driving thread's count, for exact results"
    trials = [run_trial(m, t, experts, counts, repeat, load, native=device.type == "cuda")
              for m in ([mode] if mode else list(MODES)) for t in ([threads] if threads else thread_candidates(cores))]
    best, reason = choose(trials, counts, fixed)
    return trials, best, reason
