#!/usr/bin/env python3
"""Host-side costs on the thread that drives an offloaded decode: what one step of the runner's
host work costs on this machine. Prints one JSON line.

- CUDA (skipped without it): waking from a blocking event against polling it, around a GPU sleep
  of about 200 us; host time per launch of daop's GEMV kernel, one expert alone and two experts
  through one launch per product over a slot stack (`indexed_swiglu`, checked bit for bit against
  the experts alone); an event's creation and record, an 8 KB device->host copy, a small pinned
  host->device copy.
- The C kernel (where it builds): a one-token expert queued on the kernel's thread, submit time and
  start delay, and the queued job's setup piece by piece (shape check, output, scratch, ctypes
  structs, submit), with and without a pinned output, after gaps of 0.5, 3 and 20 ms.

    python3 scripts/host_costs_probe.py [--small]   (--small: a tiny expert, to check that it runs)
"""
from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this checkout's daop, installed or not
from daop.kernels import cpu_expert, expert_gemv  # noqa: E402
from daop.quant import expert_forward, indexed_swiglu  # noqa: E402


def med(xs: list[float]) -> float:
    return round(statistics.median(xs), 2)


def per_call_us(fn, n: int = 200) -> float:
    """Host microseconds per call of fn, launched n times without a sync."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return round(t, 1)


def cuda_costs(D: int, I: int) -> dict:
    out: dict = {}
    torch.cuda._sleep(1000)
    torch.cuda.synchronize()
    for mode in ("block", "spin", "block", "spin"):
        ts = []
        for _ in range(40):
            e = torch.cuda.Event(blocking=(mode == "block"))
            t0 = time.perf_counter()
            torch.cuda._sleep(400000)
            e.record()
            if mode == "block":
                e.synchronize()
            else:
                while not e.query():
                    pass
            ts.append((time.perf_counter() - t0) * 1e6)
        out[f"sleep_wait_{mode}_us"] = med(ts)
    dev = torch.device("cuda")
    x = torch.randn(1, D, device=dev, dtype=torch.bfloat16)
    stack = [torch.randn(4, 2 * I, D, device=dev, dtype=torch.bfloat16) * 0.02,
             torch.randn(4, D, I, device=dev, dtype=torch.bfloat16) * 0.02]
    idx = torch.tensor([0, 2], device=dev)
    if expert_gemv.AVAILABLE:
        out["gemv_launch_us"] = per_call_us(lambda: expert_gemv.gemv(x, stack[0][0]))
        out["one_expert_us"] = per_call_us(lambda: expert_forward(x, [t[0] for t in stack]))
        out["two_experts_one_launch_per_product_us"] = per_call_us(lambda: indexed_swiglu(x, idx, 2, stack))
        both = indexed_swiglu(x, idx, 2, stack)
        out["one_launch_equal_bitwise"] = all(torch.equal(both[i], expert_forward(x, [t[s] for t in stack])[0])
                                              for i, s in enumerate((0, 2)))
    out["event_create_record_us"] = per_call_us(lambda: torch.cuda.Event(blocking=True).record())
    pinned = torch.empty(1, D, dtype=torch.bfloat16, pin_memory=True)
    out["d2h_8kb_async_us"] = per_call_us(lambda: pinned.copy_(x, non_blocking=True))
    out["small_pinned_h2d_us"] = per_call_us(lambda: torch.tensor([1, 2, 3], pin_memory=True).to(dev, non_blocking=True))
    return out


def kernel_costs(D: int, I: int, pinned_ok: bool) -> dict:
    lib = cpu_expert.library()
    gate_up = torch.randn(2 * I, D, dtype=torch.bfloat16) * 0.02
    down = torch.randn(D, I, dtype=torch.bfloat16) * 0.02
    x = torch.randn(1, D, dtype=torch.bfloat16)
    out: dict = {}
    for pin in (True, False) if pinned_ok else (False,):
        for gap_s in (0.0005, 0.003, 0.02):
            rec: dict[str, list[float]] = {k: [] for k in ("shapes", "output", "scratch", "structs", "submit", "start_after", "total")}
            for _ in range(25):
                t0 = time.perf_counter()
                K = cpu_expert.check_shapes(x, gate_up, down, None, lib, lib.isa)
                t1 = time.perf_counter()
                y = torch.empty(1, D, dtype=torch.bfloat16, pin_memory=pin)
                t2 = time.perf_counter()
                scratch = torch.empty(lib.daop_scratch_floats(lib.isa, 1, D, K), dtype=torch.float32)
                t3 = time.perf_counter()
                job = cpu_expert.JobStruct(x.data_ptr(), 1, gate_up.data_ptr(), down.data_ptr(), y.data_ptr(), D, I, K,
                                           torch.get_num_threads(), lib.isa, scratch.data_ptr(), 0, 0.0, 0.0)
                ptrs = (ctypes.POINTER(cpu_expert.JobStruct) * 1)(ctypes.pointer(job))
                t4 = time.perf_counter()
                ticket = lib.daop_submit(ptrs, 1)
                t5 = time.perf_counter()
                lib.daop_wait(ticket)
                for k, a, b in (("shapes", t0, t1), ("output", t1, t2), ("scratch", t2, t3), ("structs", t3, t4),
                                ("submit", t4, t5), ("total", t0, t5)):
                    rec[k].append((b - a) * 1e6)
                rec["start_after"].append((job.start - t4) * 1e6)
                time.sleep(gap_s)
            out[f"queued_setup_us pin={pin} gap={gap_s * 1000:g}ms"] = {k: med(v) for k, v in rec.items()}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="a tiny expert, to check that the script runs")
    args = ap.parse_args(argv)
    D, I = (64, 96) if args.small else (4096, 14336)
    row: dict = {"kind": "host_costs", "hidden": D, "intermediate": I, "torch": torch.__version__}
    if torch.cuda.is_available():
        row.update(cuda_costs(D, I))
    if cpu_expert.available():
        row.update(kernel_costs(D, I, torch.cuda.is_available()))
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
