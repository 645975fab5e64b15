#!/usr/bin/env python3
"""Tune daop's CPU expert kernel (`src/daop/kernels/cpu_expert.c`) on this host: build it with each
(PREFETCH, GROUP_ROWS, AMX_MIN_TOKENS) setting and time one bf16 Mixtral-size expert (D 4096, I 14336)
at several thread and token counts, next to torch's F.linear and the host's read bandwidth at the
same thread count. Eight distinct experts are cycled so that caches do not hold the weights. Each
cell also has the kernel's largest difference from torch's bf16 expert, over the output's largest
magnitude (`err`). Prints a table and one JSON line.

    python3 scripts/cpu_kernel_sweep.py [--prefetch 0,512,1024,2048] [--rows 2,4,8] [--threads 15,16]
        [--tokens 1,4,16,64] [--amx-min 4]   (AMX_MIN_TOKENS: on a CPU with AMX, the fewest tokens
        that take the tile path)  [--variants "AMX_MAX_TOKENS=256,AMX_PREFETCH=256;AMX_PREFETCH=1024"]
        (more builds: ';' between variants, ',' between one variant's NAME=VALUE settings)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from daop.bench.sweep import host_read_gbps  # noqa: E402
from daop.kernels import cpu_expert  # noqa: E402


def median_ms(fn, repeat: int) -> float:
    times = []
    for i in range(repeat + 2):
        t0 = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefetch", default="0,512,1024,2048")
    ap.add_argument("--rows", default="2,4,8")
    ap.add_argument("--threads", default="15,16")
    ap.add_argument("--tokens", default="1,4")
    ap.add_argument("--amx-min", default="4", help="AMX_MIN_TOKENS values to build (the tile path from this many tokens)")
    ap.add_argument("--variants", default="", help="builds with other settings: ';' between variants, ',' between settings")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--small", action="store_true", help="a tiny expert, to check that the script runs")
    args = ap.parse_args()
    D, I = (256, 896) if args.small else (4096, 14336)
    torch.manual_seed(0)
    experts = [((torch.randn(2 * I, D) * 0.02).bfloat16(), (torch.randn(D, I) * 0.02).bfloat16()) for _ in range(8)]
    nbytes = 3 * D * I * 2
    cc = cpu_expert.compiler()
    variants = [tuple(v.split(",")) for v in args.variants.split(";") if v] or [()]
    libs = {(p, r, a, v): cpu_expert.load(cpu_expert.build(cc, (f"PREFETCH={p}", f"GROUP_ROWS={r}", f"AMX_MIN_TOKENS={a}", *v)))
            for p in map(int, args.prefetch.split(",")) for r in map(int, args.rows.split(","))
            for a in map(int, args.amx_min.split(",")) for v in variants}
    rows = []
    with torch.inference_mode():
        for T in map(int, args.threads.split(",")):
            torch.set_num_threads(T)
            gbps = host_read_gbps()
            floor = nbytes / gbps / 1e6
            for n in map(int, args.tokens.split(",")):
                x = torch.randn(n, D).bfloat16()

                def torch_expert(i):
                    g, d = experts[i % 8]
                    h = F.linear(x, g)
                    return F.linear(F.silu(h[:, :I]) * h[:, I:], d)

                want = torch_expert(0).float()
                cells = {"torch F.linear": (median_ms(torch_expert, args.repeat), 0.0)}
                for (p, r, a, v), lib in libs.items():
                    if n > cpu_expert.max_tokens(D, I, lib=lib):
                        continue
                    err = (cpu_expert.expert(x, *experts[0], T, lib=lib).float() - want).abs().max().item() / want.abs().max().item()
                    cells[" ".join([f"kernel prefetch {p} rows {r} amx>={a}", *v])] = (median_ms(
                        lambda i, lib=lib: cpu_expert.expert(x, *experts[i % 8], T, lib=lib), args.repeat), err)
                for name, (ms, err) in cells.items():
                    rows.append({"variant": name, "threads": T, "tokens": n, "ms": round(ms, 3), "read_gbps": round(gbps, 1),
                                 "over_floor": round(ms / floor, 2), "err": round(err, 5)})
    print(f"{'variant':60} {'thr':>4} {'tok':>4} {'GB/s':>6} {'ms':>8} {'x floor':>8} {'err':>8}")
    for r in rows:
        print(f"{r['variant']:60} {r['threads']:4d} {r['tokens']:4d} {r['read_gbps']:6.1f} {r['ms']:8.3f} {r['over_floor']:8.2f} "
              f"{r['err']:8.5f}")
    print(json.dumps({"kind": "cpu_kernel_sweep", "torch": torch.__version__, "expert_bytes": nbytes, "isa": cpu_expert.isa(),
                      "rows": rows}))


if __name__ == "__main__":
    main()
