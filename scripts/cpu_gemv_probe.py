#!/usr/bin/env python3
"""Which CPU kernel reads a bf16 expert at memory speed? One token through a Mixtral-size expert
(gate_up [2I, D] then down [D, I]) with several torch entry points, against bytes / host bandwidth.

Each variant computes the same function; its largest difference from F.linear is printed, so
exactness can be judged. Eight distinct experts are cycled so caches do not hold the weights.

    python3 scripts/cpu_gemv_probe.py [--threads 16,15] [--small]
"""
from __future__ import annotations

import argparse
import json
import sys
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from daop.bench.sweep import host_read_gbps  # noqa: E402


def bandwidth_gbps() -> float:
    """Host read bandwidth, measured as `daop bench` does (the floor its rows compare CPU experts with)."""
    return host_read_gbps()


def variants(experts):
    def linear(x, gu, dn):
        h = F.linear(x, gu)
        g, u = h.chunk(2, dim=-1)
        return F.linear(F.silu(g) * u, dn)

    def mv(x, gu, dn):
        h = torch.mv(gu, x[0])
        g, u = h.chunk(2)
        return torch.mv(dn, F.silu(g) * u)[None]

    def matmul_left(x, gu, dn):
        h = (gu @ x.T).T
        g, u = h.chunk(2, dim=-1)
        return (dn @ (F.silu(g) * u).T).T

    out = {"F.linear": (linear, experts), "torch.mv": (mv, experts), "W @ x.T": (matmul_left, experts)}
    try:
        packed = [(torch.ops.mkldnn._reorder_linear_weight(gu, None), torch.ops.mkldnn._reorder_linear_weight(dn, None))
                  for gu, dn in experts]

        def onednn(x, gu, dn):
            h = torch.ops.mkldnn._linear_pointwise(x, gu, None, "none", [], "")
            g, u = h.chunk(2, dim=-1)
            return torch.ops.mkldnn._linear_pointwise(F.silu(g) * u, dn, None, "none", [], "")

        out["oneDNN pre-packed"] = (onednn, packed)
    except (RuntimeError, AttributeError) as exc:
        print(f"oneDNN pre-packed unavailable: {exc}")
    try:
        q = []
        for gu, dn in experts:
            pair = []
            for w in (gu, dn):
                scale = w.float().abs().amax(dim=1).clamp_min(1e-8) / 127
                pair += [torch.round(w.float() / scale[:, None]).to(torch.int8), scale.to(torch.bfloat16)]
            q.append(tuple(pair))

        def int8(x, gq, gs, dq, ds):
            h = torch._weight_int8pack_mm(x, gq, gs)
            g, u = h.chunk(2, dim=-1)
            return torch._weight_int8pack_mm((F.silu(g) * u).contiguous(), dq, ds)

        out["int8 weight-only (approximate)"] = (int8, q)
    except (RuntimeError, AttributeError) as exc:
        print(f"int8 unavailable: {exc}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="16,15")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--repeat", type=int, default=16)
    args = ap.parse_args()
    D, I = (256, 896) if args.small else (4096, 14336)
    torch.manual_seed(0)
    experts = [((torch.randn(2 * I, D) * 0.02).bfloat16(), (torch.randn(D, I) * 0.02).bfloat16()) for _ in range(8)]
    expert_bytes = 3 * I * D * 2
    bw = bandwidth_gbps()
    floor_ms = expert_bytes / bw / 1e6
    x = torch.randn(1, D).bfloat16()
    rows = []
    with torch.inference_mode():
        table = variants(experts)
        ref = table["F.linear"][0](x, *experts[0])
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            for name, (fn, weights) in table.items():
                diff = (fn(x, *weights[0]).float() - ref.float()).abs().max().item()
                times = []
                for i in range(args.repeat + 2):
                    t0 = time.perf_counter()
                    fn(x, *weights[i % len(weights)])
                    times.append((time.perf_counter() - t0) * 1000)
                ms = statistics.median(times[2:])
                rows.append({"variant": name, "threads": threads, "ms": round(ms, 3), "over_floor": round(ms / floor_ms, 2),
                             "max_abs_diff_vs_linear": diff})
    print(f"expert {expert_bytes / 2**20:.0f} MiB bf16; host read {bw:.1f} GB/s -> floor {floor_ms:.2f} ms")
    print(f"{'variant':32} {'threads':>7} {'ms':>8} {'x floor':>8} {'max|diff|':>10}")
    for r in rows:
        print(f"{r['variant']:32} {r['threads']:7d} {r['ms']:8.3f} {r['over_floor']:8.2f} {r['max_abs_diff_vs_linear']:10.3g}")
    print(json.dumps({"kind": "cpu_gemv_probe", "torch": torch.__version__, "host_read_gbps": round(bw, 1),
                      "expert_bytes": expert_bytes, "floor_ms": round(floor_ms, 3), "rows": rows}))


if __name__ == "__main__":
    main()
