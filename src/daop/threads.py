"""torch's intra-op threads for the dense path (attention, resident experts, LM head) on the model's device.

Not the CPU-expert pool (`--cpu-threads`), which has threads of its own.

On a CPU device the automatic choice is the cores that other processes leave idle, by the lower of
two readings: the 1-minute load average, and the idle share of the CPUs over 0.1 s at load time
(/proc/stat; the load average lags a job that has just started). On a 2-core
machine, 2 threads decode 16-71 % faster than 1 when the machine is idle, and 1 thread decodes 1.9-2.8x
faster when one other process keeps a core busy (OpenMP's barriers wait for the thread that is not
scheduled); `scripts/measure_threads.py`, results in `benchmarks/results/threads-2core-cpu*.jsonl`.
The automatic count is measured once per process, so every engine of a process sums the same
way (CPU results depend on the thread count in the last bits). OMP_NUM_THREADS, when set, is the
user's choice and is kept. On a CUDA device torch's own default
stays: the dense path runs on the GPU.
"""
from __future__ import annotations

import os
import time

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


def idle_cores(cores: int, load: float | None, idle_share: float | None = None) -> int:
    """Cores that other processes leave idle, at least 1: by the load average (runnable processes) and by the
    share of CPU time that was idle, whichever is lower; a reading that is None is not used."""
    idle = cores
    if load is not None:
        idle = min(idle, cores - int(load + 0.5))
    if idle_share is not None:
        idle = min(idle, int(idle_share * cores + 0.5))
    return max(1, idle)


def system_load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    return values[3] + values[4], sum(values)


def idle_share(interval_s: float = 0.1) -> float | None:
    """Share of CPU time that was idle over interval_s (None where /proc/stat cannot be read)."""
    try:
        idle0, total0 = _cpu_times()
        time.sleep(interval_s)
        idle1, total1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    return (idle1 - idle0) / (total1 - total0) if total1 > total0 else None


def check_threads(threads: object, flag: str = "--threads") -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise DaopError(f"{flag} must be a positive integer, got {threads!r}")


def choose_threads(threads: int | None, device: torch.device, reserved: int = 0) -> int | None:
    """The intra-op thread count to use: the user's, or the automatic one (None: leave torch's default).

    reserved: cores that other threads of this process keep busy while the model runs, left out of the
    automatic count (at least 1 thread stays). `daop serve` reserves one for its HTTP event loop: on the
    2-core machine a server whose model ran on both cores streamed 61-66 tokens/s to 8 clients against
    118-146 on one, and 23 against 57-63 one request at a time (its event loop wakes for every streamed
    token and stalls OpenMP's barriers; `benchmarks/results/serve-threads-2core-cpu.jsonl`)."""
    check_threads(threads)
    if threads is not None:
        return threads
    if device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return None
    if not _AUTOMATIC:  # measured once per process: engines of one process sum alike (exact policies)
        _AUTOMATIC.append(idle_cores(usable_cores(), system_load(), idle_share()))
    return max(1, _AUTOMATIC[0] - max(0, reserved))


_AUTOMATIC: list[int] = []


def apply_threads(threads: int | None) -> None:
    """Set torch's intra-op threads for the calling thread (a no-op for None or an unchanged count)."""
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
