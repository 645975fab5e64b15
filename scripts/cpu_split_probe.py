#!/usr/bin/env python3
"""Where does a bf16 CPU expert lose against memory speed? Splits of one Mixtral-size expert's work
(gate_up [2I, D], then down [D, I], one token), per thread count:

- `linear`: F.linear with torch's own intra-op team of T threads (what the executor does today);
- `packed`: oneDNN pre-packed weights (`mkldnn._linear_pointwise`), team of T;
- `bmm`: the weight's rows cut into T equal blocks, one `torch.bmm` (torch parallelises the batch);
- `pool`: T Python threads with one intra-op thread each, each a row block through F.linear;
- `pool-packed`: the same, each block pre-packed by oneDNN;
- `daop C kernel`: `daop.kernels.cpu_expert`, T threads (not bitwise equal to F.linear).
Each variant's largest difference from `linear` is printed (row blocks change no summation, so
`bmm` and `pool` should be exact), and the host's read bandwidth with the same T (sum over 1 GiB),
so a thread count that is slow for every kernel shows as slow bandwidth too.
Eight distinct experts are cycled so that caches do not hold the weights. Prints a table and one
JSON line.

    python3 scripts/cpu_split_probe.py [--threads 16,15,14,12,8] [--small]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import shutil
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from daop.bench.sweep import host_read_gbps  # noqa: E402
from daop.kernels import cpu_expert  # noqa: E402


def read_gbps(threads: int) -> float:
    torch.set_num_threads(threads)
    return host_read_gbps()


def swiglu(h: torch.Tensor) -> torch.Tensor:
    g, u = h.chunk(2, dim=-1)
    return F.silu(g) * u


def blocks(w: torch.Tensor, parts: int) -> list[torch.Tensor]:
    return list(w.tensor_split(parts, dim=0))


class Pool:
    def __init__(self, threads: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=threads, initializer=torch.set_num_threads, initargs=(1,))

    def linear(self, x: torch.Tensor, parts: list, fn) -> torch.Tensor:
        futures = [self.pool.submit(fn, x, w) for w in parts[1:]]
        first = fn(x, parts[0])  # the calling thread does one block itself
        return torch.cat([first] + [f.result() for f in futures], dim=-1)

    def close(self) -> None:
        self.pool.shutdown()


def packed_linear(x, w):
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="16,15,14,12,8")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    D, I = (256, 896) if args.small else (4096, 14336)
    torch.manual_seed(0)
    experts = [((torch.randn(2 * I, D) * 0.02).bfloat16(), (torch.randn(D, I) * 0.02).bfloat16()) for _ in range(8)]
    expert_bytes = 3 * I * D * 2
    x = torch.randn(1, D).bfloat16()
    info = {"cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "gxx": shutil.which("g++"),
            "cc": shutil.which("cc"), "ninja": shutil.which("ninja"), "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability()}
    print(info)
    print(torch.__config__.parallel_info())
    rows = []
    with torch.inference_mode():
        ref = F.linear(swiglu(F.linear(x, experts[0][0])), experts[0][1])
        for T in [int(t) for t in args.threads.split(",")]:
            gbps = read_gbps(T)
            floor = expert_bytes / gbps / 1e6
            torch.set_num_threads(T)
            pool = Pool(T - 1) if T > 1 else None
            packed = [(torch.ops.mkldnn._reorder_linear_weight(g, None), torch.ops.mkldnn._reorder_linear_weight(d, None))
                      for g, d in experts]
            cut = [(blocks(g, T), blocks(d, T)) for g, d in experts]
            cut_packed = [([torch.ops.mkldnn._reorder_linear_weight(b, None) for b in gs],
                           [torch.ops.mkldnn._reorder_linear_weight(b, None) for b in ds]) for gs, ds in cut]
            stacked = [(g.view(T, -1, D), d.view(T, -1, I)) if (2 * I) % T == 0 and D % T == 0 else None for g, d in experts]

            def linear(i):
                g, d = experts[i % 8]
                return F.linear(swiglu(F.linear(x, g)), d)

            def gate_only(i):
                return F.linear(x, experts[i % 8][0])

            def down_only(i):
                return F.linear(x.new_ones(1, I), experts[i % 8][1])

            def onednn(i):
                g, d = packed[i % 8]
                return packed_linear(swiglu(packed_linear(x, g)), d)

            def bmm(i):
                g, d = stacked[i % 8]
                h = torch.bmm(g, x.view(1, D, 1).expand(T, D, 1)).reshape(1, -1)
                a = swiglu(h)
                return torch.bmm(d, a.view(1, I, 1).expand(T, I, 1)).reshape(1, -1)

            def pooled(i):
                gs, ds = cut[i % 8]
                return pool.linear(swiglu(pool.linear(x, gs, F.linear)), ds, F.linear)

            def pooled_packed(i):
                gs, ds = cut_packed[i % 8]
                return pool.linear(swiglu(pool.linear(x, gs, packed_linear)), ds, packed_linear)

            def native(i):
                g, d = experts[i % 8]
                return cpu_expert.expert(x, g, d, T)

            table = {"linear": linear, "linear gate_up only": gate_only, "linear down only": down_only, "packed": onednn}
            if cpu_expert.available():
                table["daop C kernel"] = native
            if stacked[0] is not None:
                table["bmm"] = bmm
            if pool is not None:
                table["pool"] = pooled
                table["pool-packed"] = pooled_packed
            for name, fn in table.items():
                diff = None if "only" in name else (fn(0).float() - ref.float()).abs().max().item()
                times = []
                for i in range(args.repeat + 2):
                    t0 = time.perf_counter()
                    fn(i)
                    times.append((time.perf_counter() - t0) * 1000)
                ms = statistics.median(times[2:])
                rows.append({"variant": name, "threads": T, "ms": round(ms, 3), "read_gbps": round(gbps, 1),
                             "over_floor": round(ms / floor, 2), "max_abs_diff_vs_linear": diff})
            if pool is not None:
                pool.close()
    print(f"expert {expert_bytes / 2**20:.0f} MiB bf16")
    print(f"{'variant':22} {'thr':>4} {'GB/s':>6} {'ms':>8} {'x floor':>8} {'max|diff|':>10}")
    for r in rows:
        d = r["max_abs_diff_vs_linear"]
        print(f"{r['variant']:22} {r['threads']:4d} {r['read_gbps']:6.1f} {r['ms']:8.3f} {r['over_floor']:8.2f} "
              f"{'' if d is None else f'{d:.3g}':>10}")
    print(json.dumps({"kind": "cpu_split_probe", **info, "expert_bytes": expert_bytes, "rows": rows}))


if __name__ == "__main__":
    main()
