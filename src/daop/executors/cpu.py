"""CPU expert executor: one worker thread running torch on the host weights.

torch releases the GIL inside its kernels, so the main thread keeps launching GPU work while the
worker computes. An exception in the worker is re-raised in the caller by `result()`.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

from daop.model.moe import swiglu


def physical_cores() -> int:
    """Physical cores if discoverable (hyper-threads share execution units), else logical CPUs."""
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
            return len(cores)
    except OSError:
        pass
    return os.cpu_count() or 1


def default_cpu_threads(device: torch.device) -> int:
    """Threads for CPU experts: every physical core, less one that keeps driving the GPU.

    On a CUDA device the main thread launches kernels and waits on events while the workers
    compute; giving it a core of its own keeps the workers from being descheduled mid-expert.
    """
    cores = physical_cores()
    return max(1, cores - 1) if device.type == "cuda" and cores > 2 else cores


class CpuExecutor:
    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or physical_cores()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="daop-cpu", initializer=torch.set_num_threads, initargs=(self.threads,))
        self.busy_s = 0.0

    def submit(self, jobs: list[tuple[int, torch.Tensor, tuple[torch.Tensor, ...]]], h_host: torch.Tensor,
               ready: "torch.cuda.Event | None", compute: Callable = swiglu) -> Future:
        """Compute experts on the CPU: jobs are (expert, token rows [n], host weights); returns {expert: y}."""
        def run() -> dict[int, torch.Tensor]:
            t0 = time.perf_counter()
            if ready is not None:
                ready.synchronize()  # the activations' device->host copy has landed
            with torch.inference_mode():
                out = {e: compute(h_host[rows], *w) for e, rows, w in jobs}
            self.busy_s += time.perf_counter() - t0
            return out

        return self.pool.submit(run)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
