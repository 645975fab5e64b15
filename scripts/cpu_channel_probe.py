"""CPU expert channel probe: how fast one routed expert runs on the CPU, and where the time goes.

One bf16 Mixtral-size expert (D 4096, I 14336; `--small` for a tiny one), 1 and 4 tokens, on
several thread counts, arranged as:
  (a) idle main thread: F.linear x3 (gate, up, down), fused gate_up + down, and oneDNN pre-packed
      fused weights (with the largest difference from F.linear, to see whether it is exact);
  (b) daop's CPU executor (src/daop/executors/cpu.py): worker mode while the main thread launches
      a burst of small kernels and then waits; worker mode while the main thread keeps launching
      kernels from Python until the result is there; inline mode (burst, then computed on the main
      thread);
  (c) the previous executor (worker thread, three F.linear, default switch interval) while the
      main thread spins in Python (`event.query()` on a CUDA device) and while it waits.
Plus host read bandwidth (sum over 1 GiB with all threads) and the expert's bytes / bandwidth.
Eight distinct experts are cycled so that caches do not hold the weights.
Needs only torch (and this repository's src/ for the executor). Prints a table, then one JSON line.

  python scripts/cpu_channel_probe.py              # full size; on a GPU host about 1-2 minutes
  python scripts/cpu_channel_probe.py --small      # tiny sizes, CPU only, a few seconds
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny expert (D 256, I 896): checks that the probe runs")
    p.add_argument("--shape", default=None, help="expert D x I, e.g. 2048x768 (default: 4096x14336, Mixtral)")
    p.add_argument("--threads", default=None, help="comma-separated thread counts (default: cores, cores-1, cores-2, cores/2)")
    p.add_argument("--tokens", default="1,4")
    p.add_argument("--repeat", type=int, default=10, help="timed calls per cell (median reported)")
    p.add_argument("--experts", type=int, default=8, help="distinct experts cycled through")
    p.add_argument("--burst", type=int, default=48, help="small kernels the driving thread launches per call")
    p.add_argument("--switch-interval", type=float, default=None, help="override the executor's switch interval (s)")
    p.add_argument("--omp-wait-policy", default=None, choices=["active", "passive"], help="OMP_WAIT_POLICY for this run")
    return p.parse_args()


ARGS = parse_args()
if ARGS.omp_wait_policy:
    os.environ["OMP_WAIT_POLICY"] = ARGS.omp_wait_policy.upper()  # read when OpenMP starts, so before torch

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from daop.executors import cpu as cpu_executor  # noqa: E402
from daop.executors.cpu import CpuExecutor, physical_cores  # noqa: E402
from daop.hardware import cpu_model  # noqa: E402
from daop.model.moe import swiglu  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def make_experts(D: int, I: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    first = ((torch.randn(2 * I, D, generator=gen) * 0.02).to(torch.bfloat16),
             (torch.randn(D, I, generator=gen) * 0.02).to(torch.bfloat16))
    return [first] + [(first[0].clone(), first[1].clone()) for _ in range(count - 1)]


def swiglu_x3(x, gate, up, down):
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def median_ms(call, repeat: int) -> float:
    """call(i) runs the i-th repetition; the first one warms up and is not counted."""
    times = []
    for i in range(repeat + 1):
        t0 = time.perf_counter()
        call(i)
        if i:
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def host_read_gbps(threads: int) -> float:
    torch.set_num_threads(threads)
    x = torch.ones(2**30 // 4, dtype=torch.float32)
    x.sum()
    best = min(timed(lambda: x.sum()) for _ in range(5))
    return x.numel() * 4 / best / 1e9


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Driver:
    """What the main thread does between submitting an expert and having its result."""

    def __init__(self, burst: int) -> None:
        self.x = torch.zeros(256, device=DEVICE)
        self.burst = burst

    def launch_burst(self) -> None:
        for _ in range(self.burst):
            self.x.add_(1.0)

    def stream_until(self, future) -> None:
        """Keep launching small kernels from Python until the result is there."""
        while not future.done():
            self.x.add_(1.0)

    def spin_until(self, future) -> None:
        """The old driving loop: a Python spin on a (default, spinning) event's query()."""
        event = torch.cuda.Event() if CUDA else None
        if event is not None:
            event.record()
        while not future.done():
            if event is not None:
                event.query()

    def settle(self) -> None:
        if CUDA:
            torch.cuda.synchronize()


class OldExecutor:
    """The executor before this change: one worker, three F.linear per expert, default switch interval."""

    def __init__(self, threads: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, initializer=torch.set_num_threads, initargs=(threads,))

    def submit(self, jobs, h_host):
        def run():
            with torch.inference_mode():
                return {e: swiglu_x3(h_host[rows], *w) for e, rows, w in jobs}
        return self.pool.submit(run)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def idle_rows(experts, packed, I: int, threads: int, n: int, repeat: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    D = experts[0][1].shape[0]
    h = torch.randn(n, D).to(torch.bfloat16)
    split = [(gu[:I], gu[I:], d) for gu, d in experts]
    out = {
        "a idle, F.linear x3": median_ms(lambda i: swiglu_x3(h, *split[i % len(split)]), repeat),
        "a idle, fused gate_up": median_ms(lambda i: swiglu(h, *experts[i % len(experts)]), repeat),
    }
    if packed is not None:
        out["a idle, oneDNN pre-packed"] = median_ms(lambda i: packed_swiglu(h, *packed[i % len(packed)]), repeat)
    return out


def prepack(experts):
    try:
        return [(torch.ops.mkldnn._reorder_linear_weight(gu, None), gu.shape[0],
                 torch.ops.mkldnn._reorder_linear_weight(d, None), d.shape[0]) for gu, d in experts]
    except (AttributeError, RuntimeError):
        return None


def packed_swiglu(x, gu_packed, two_i, down_packed, d):
    gu = torch.ops.mkldnn._linear_pointwise(x, gu_packed, None, "none", [], "")
    gate, up = gu.chunk(2, dim=-1)
    return torch.ops.mkldnn._linear_pointwise(F.silu(gate) * up, down_packed, None, "none", [], "")


def packed_difference(experts, packed, n: int) -> float | None:
    if packed is None:
        return None
    h = torch.randn(n, experts[0][1].shape[0]).to(torch.bfloat16)
    return float((packed_swiglu(h, *packed[0]).float() - swiglu(h, *experts[0]).float()).abs().max())


def executor_rows(experts, threads: int, n: int, repeat: int, driver: Driver) -> dict[str, float]:
    D = experts[0][1].shape[0]
    h = torch.randn(n, D).to(torch.bfloat16)
    rows = torch.arange(n)
    split = [(gu.chunk(2)[0], gu.chunk(2)[1], d) for gu, d in experts]  # the old executor's three matrices
    out = {}

    def run(label, ex, wait):
        def call(i):
            if isinstance(ex, CpuExecutor):
                future = ex.submit([(0, rows, experts[i % len(experts)])], h, None)
            else:
                future = ex.submit([(0, rows, split[i % len(split)])], h)
            wait(future)
            future.result()
        out[label] = median_ms(call, repeat)
        driver.settle()

    inline = CpuExecutor(threads, "inline")
    run("b new inline, burst then compute", inline, lambda f: driver.launch_burst())
    worker = CpuExecutor(threads, "worker")
    run("b new worker, burst then wait", worker, lambda f: driver.launch_burst())
    run("b new worker, launching until done", worker, driver.stream_until)
    run("b new worker, Python spin", worker, driver.spin_until)
    worker.close()
    old = OldExecutor(threads)
    run("c old worker, burst then wait", old, lambda f: driver.launch_burst())
    run("c old worker, Python spin", old, driver.spin_until)
    old.close()
    return out


def main() -> int:
    D, I = (256, 896) if ARGS.small else (4096, 14336)
    if ARGS.shape:
        D, I = (int(v) for v in ARGS.shape.lower().split("x"))
    cores = physical_cores()
    threads = [int(t) for t in ARGS.threads.split(",")] if ARGS.threads else \
        sorted({c for c in (cores, cores - 1, cores - 2, cores // 2) if c >= 1}, reverse=True)
    tokens = [int(t) for t in ARGS.tokens.split(",")]
    if ARGS.switch_interval:
        cpu_executor.SWITCH.interval_s = ARGS.switch_interval
    expert_bytes = 3 * D * I * 2
    kernel = cpu_executor.job_kernel()
    card = {"kind": "card", "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if CUDA else None, "cpu": cpu_model(), "cores": cores,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "expert": f"{D}x{I} bf16",
            "expert_bytes": expert_bytes, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "switch_interval_s": cpu_executor.SWITCH.interval_s, "scripted_kernel": kernel is not cpu_executor.run_jobs_eager,
            "burst_kernels": ARGS.burst}
    print(json.dumps(card), file=sys.stderr)
    t0 = time.perf_counter()
    bandwidth = host_read_gbps(cores)
    experts = make_experts(D, I, ARGS.experts)
    packed = prepack(experts)
    driver = Driver(ARGS.burst)
    results: dict[str, dict[str, float]] = {}
    for t in threads:
        for n in tokens:
            cell = f"{t}thr/{n}tok"
            for label, ms in {**idle_rows(experts, packed, I, t, n, ARGS.repeat), **executor_rows(experts, t, n, ARGS.repeat, driver)}.items():
                results.setdefault(label, {})[cell] = round(ms, 3)
            print(f"[probe] {cell} done at {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    torch.set_num_threads(cores)
    diff = packed_difference(experts, packed, 4)
    cells = [f"{t}thr/{n}tok" for t in threads for n in tokens]
    floor_ms = expert_bytes / (bandwidth * 1e9) * 1000
    print(f"expert {expert_bytes / 2**20:.0f} MiB; host read {bandwidth:.1f} GB/s ({cores} threads) -> bytes/bandwidth "
          f"{floor_ms:.2f} ms; oneDNN pre-packed max |diff| vs F.linear: {diff}; ms per expert call (median of {ARGS.repeat}):")
    print(f"{'arrangement':40}" + "".join(f"{c:>12}" for c in cells))
    for label, row in results.items():
        print(f"{label:40}" + "".join(f"{row.get(c, float('nan')):12.3f}" for c in cells))
    print(json.dumps({"kind": "cpu_channel_probe", **card, "host_read_gbps": round(bandwidth, 2),
                      "bytes_over_bandwidth_ms": round(floor_ms, 3), "prepacked_max_abs_diff": diff,
                      "threads": threads, "tokens": tokens, "ms": results, "wall_s": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
