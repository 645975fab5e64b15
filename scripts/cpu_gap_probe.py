#!/usr/bin/env python3
"""What an idle gap costs the CPU channel: one CPU expert job (daop's C kernel, `cpu_expert.Queued`)
started back to back with the one before, or after an idle gap of G ms; the driving thread waits
for each job and through each gap by sleeping, or by spinning.

In an offloaded decode step the CPU sits idle between its jobs (0.7-1.0 ms, median, on the H200
hosts: `scripts/host_profile.py`), and the driving thread sleeps in some waits. After an idle gap a
job may start late (the kernel's serving thread and its OpenMP team wake from sleep) and the
driving thread's first operations may be slow (its core woke from an idle state, its caches went
cold). Per gap and wait, the medians of:

- setup_us: building and queueing the job (`Queued`);
- submit_to_start_us: from the submit (before that setup) to the serving thread starting the job;
- job_ms: the job's compute (start to end, the OpenMP team's wake included);
- submit_to_end_ms: the whole job as the caller sees it;
- first_op_us: one small torch operation on the driving thread right after its wait, before the
  submit (a hot one takes a few microseconds).

--spin-us probes each polling time of the kernel's serving thread (DAOP_CPU_SPIN_US) in turn. The
OpenMP runtime reads its settings (OMP_WAIT_POLICY, GOMP_SPINCOUNT) when it starts: run the probe
once per setting, as separate processes; each row records them.

    python3 scripts/cpu_gap_probe.py [--shape 4096x14336] [--threads N] [--gaps 0,0.25,0.5,1,2] [--spin-us 0,2000] [--output F]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from daop.executors.cpu import default_cpu_threads  # noqa: E402
from daop.kernels import cpu_expert  # noqa: E402


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def median_us(values: list[float], scale: float = 1e6) -> float:
    return round(statistics.median(values) * scale, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="4096x14336", help="expert D x I (default: Mixtral's 4096x14336)")
    ap.add_argument("--threads", type=int, default=None, help="the kernel's threads (default: the engine's default on a GPU host)")
    ap.add_argument("--gaps", default="0,0.25,0.5,1,2", help="comma-separated idle gaps before each job, in ms")
    ap.add_argument("--repeat", type=int, default=20, help="jobs per gap and wait")
    ap.add_argument("--experts", type=int, default=4, help="distinct experts cycled through (caches do not hold them)")
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--spin-us", default="0", help="comma-separated polling times of the kernel's serving thread "
                                                   "before it sleeps (DAOP_CPU_SPIN_US), each probed in turn")
    ap.add_argument("--output", default=None, help="append the JSON rows here")
    args = ap.parse_args()
    lib = cpu_expert.library()
    if lib is None:
        sys.exit("the CPU expert kernel is not available here (no compiler, or DAOP_NO_CPU_KERNEL=1)")
    try:
        D, I = (int(v) for v in args.shape.lower().split("x"))
        gaps = [float(g) for g in args.gaps.split(",")]
        spins = [int(v) for v in args.spin_us.split(",")]
    except ValueError:
        sys.exit(f"--shape wants DxI, --gaps numbers in ms and --spin-us whole microseconds, got {args.shape!r}, "
                 f"{args.gaps!r} and {args.spin_us!r}")
    if not all(0 <= v <= cpu_expert.MAX_SPIN_US for v in spins):
        sys.exit(f"--spin-us values must be 0-{cpu_expert.MAX_SPIN_US}")
    if min(gaps) < 0 or args.repeat < 1 or args.experts < 1 or not 1 <= args.tokens <= cpu_expert.SERVES_TOKENS:
        sys.exit("gaps must be >= 0 ms, --repeat and --experts >= 1, "
                 f"--tokens 1-{cpu_expert.SERVES_TOKENS}")
    threads = args.threads or default_cpu_threads(torch.device("cuda"))
    gen = torch.Generator().manual_seed(0)
    experts = [((torch.randn(2 * I, D, generator=gen) * 0.02).bfloat16(), (torch.randn(D, I, generator=gen) * 0.02).bfloat16())
               for _ in range(args.experts)]
    x = torch.randn(args.tokens, D, generator=gen).bfloat16()
    small = torch.randn(4096)
    env = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    card = {"kind": "cpu_gap_probe_card", "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "isa": cpu_expert.isa(), "threads": threads, "expert": f"{D}x{I} bf16", "tokens": args.tokens,
            "env": env, "torch": torch.__version__, "command": " ".join(sys.argv)}
    rows = [card]
    n = 0
    for _ in range(3):  # warm-up: the library's thread and team start, pages are touched
        cpu_expert.Queued([x], [experts[n % len(experts)]], threads).wait()
        n += 1
    print(f"{'spin us':>7} {'wait':6} {'gap ms':>7} {'first op us':>12} {'setup us':>9} {'submit->start us':>17} {'job ms':>8} "
          f"{'submit->end ms':>15}")
    for spin_us, wait, gap in ((s, w, g) for s in spins for w in ("sleep", "spin") for g in gaps):
        cpu_expert.set_spin_us(spin_us, lib)
        first, setup, to_start, job, total = [], [], [], [], []
        for _ in range(args.repeat):
            if gap:
                (time.sleep if wait == "sleep" else spin)(gap / 1000)
            t0 = time.perf_counter()
            small.add_(1.0)  # the driving thread's first operation after its wait
            t1 = time.perf_counter()
            q = cpu_expert.Queued([x], [experts[n % len(experts)]], threads)
            tq = time.perf_counter()
            if wait == "spin":  # the driving thread polls, as it polls the routing's event
                while not q.done():
                    pass
            q.wait()
            t2 = time.perf_counter()
            (start, end), = q.spans()
            n += 1
            first.append(t1 - t0)
            setup.append(tq - t1)
            to_start.append(start - t1)
            job.append(end - start)
            total.append(t2 - t1)
        row = {"kind": "cpu_gap_probe", "spin_us": spin_us, "wait": wait, "gap_ms": gap, "repeat": args.repeat,
               "first_op_us": median_us(first), "setup_us": median_us(setup), "submit_to_start_us": median_us(to_start),
               "job_ms": median_us(job, 1e3), "submit_to_end_ms": median_us(total, 1e3),
               "job_ms_range": [round(min(job) * 1e3, 3), round(max(job) * 1e3, 3)], "env": env, "threads": threads}
        rows.append(row)
        print(f"{spin_us:7d} {wait:6} {gap:7.2f} {row['first_op_us']:12.1f} {row['setup_us']:9.1f} {row['submit_to_start_us']:17.1f} "
              f"{row['job_ms']:8.3f} {row['submit_to_end_ms']:15.3f}", flush=True)
    if args.output:
        with open(args.output, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    print(json.dumps(rows[1:]))


if __name__ == "__main__":
    main()
