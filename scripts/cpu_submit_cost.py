#!/usr/bin/env python3
"""The driving thread's cost of starting CPU experts: `CpuExecutor.submit` of a decode layer's jobs
(one token each) on daop's C kernel, and `cpu_expert.Queued` alone, back to back with hot caches,
on a small expert so that the jobs themselves take microseconds. Median microseconds per call.

Uses the daop package on PYTHONPATH (so two checkouts can be compared on one machine):

    PYTHONPATH=src python3 scripts/cpu_submit_cost.py [--jobs 2] [--calls 3000] [--output F]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from daop.executors.cpu import CpuExecutor
from daop.kernels import cpu_expert
from daop.model.moe import index_tensor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2, help="experts per submit (a top-2 layer's CPU experts: 2)")
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--shape", default="256x128", help="expert D x I (small: the jobs take microseconds)")
    ap.add_argument("--output", default=None, help="append the JSON row here")
    args = ap.parse_args()
    if cpu_expert.library() is None:
        sys.exit("the CPU expert kernel is not available here")
    D, I = (int(v) for v in args.shape.lower().split("x"))
    if args.jobs < 1 or args.calls < 10:
        sys.exit("--jobs >= 1 and --calls >= 10")
    gen = torch.Generator().manual_seed(0)
    weights = [((torch.randn(2 * I, D, generator=gen) * 0.05).bfloat16(), (torch.randn(D, I, generator=gen) * 0.05).bfloat16())
               for _ in range(args.jobs)]
    h = torch.randn(1, D, generator=gen).bfloat16()
    rows = index_tensor((0,))  # one token's rows, as a decode step's routing gives them
    ex = CpuExecutor(threads=1, mode="inline", native=True)
    jobs = [(e, rows, w) for e, w in enumerate(weights)]
    submit, queued = [], []
    try:
        for i in range(args.calls + 100):
            t0 = time.perf_counter()
            f = ex.submit(jobs, h, None)
            t1 = time.perf_counter()
            f.result()
            t2 = time.perf_counter()
            q = cpu_expert.Queued([h] * args.jobs, weights, 1)
            t3 = time.perf_counter()
            q.wait()
            if i >= 100:  # after a warm-up
                submit.append(t1 - t0)
                queued.append(t3 - t2)
    finally:
        ex.close()
    row = {"kind": "cpu_submit_cost", "jobs": args.jobs, "calls": args.calls, "expert": f"{D}x{I} bf16",
           "submit_us": round(statistics.median(submit) * 1e6, 2), "queued_us": round(statistics.median(queued) * 1e6, 2),
           "torch": torch.__version__, "command": " ".join(sys.argv)}
    if args.output:
        with open(args.output, "a") as f:
            f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
