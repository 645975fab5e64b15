"""torch's intra-op threads for the dense path (attention, resident experts, LM head) on the model's device.

Not the CPU-expert pool (`--cpu-threads`), which has threads of its own.

On a CPU device the automatic choice is the cores that other processes leave idle: on a 2-core
machine, 2 threads decode 16-72 % faster than 1 when the machine is idle, and 1 thread decodes 2.5-3x
faster when one other process keeps a core busy (OpenMP's barriers wait for the thread that is not
scheduled); `scripts/measure_threads.py`, results in `benchmarks/results/threads-2core-cpu*.jsonl`.
OMP_NUM_THREADS, when set, is the user's choice and is kept. On a CUDA device torch's own default
stays: the dense path runs on the GPU.
"""
from __future__ import annotations

import os

import torch

from daop.errors import DaopError


def usable_cores() -> int:
    """Physical cores this process may run on (hyper-threads share execution units)."""
    from daop.executors.cpu import physical_cores

    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = os.cpu_count() or 1
    return max(1, min(physical_cores(), allowed))


def idle_cores(cores: int, load: float | None) -> int:
    """Cores left by the other runnable processes (the 1-minute load average), at least 1."""
    if load is None:
        return cores
    return max(1, min(cores, cores - int(load + 0.5)))


def system_load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def check_threads(threads: object, flag: str = "--threads") -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise DaopError(f"{flag} must be a positive integer, got {threads!r}")


def choose_threads(threads: int | None, device: torch.device) -> int | None:
    """The intra-op thread count to use: the user's, or the automatic one (None: leave torch's default)."""
    check_threads(threads)
    if threads is not None:
        return threads
    if device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return None
    return idle_cores(usable_cores(), system_load())


def apply_threads(threads: int | None) -> None:
    """Set torch's intra-op threads for the calling thread (a no-op for None or an unchanged count)."""
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
