#!/usr/bin/env python3
"""Where an all-GPU prefill goes, and whether `torch._grouped_mm` can serve a prefill's experts.

1. Experts of one layer for a prompt (Mixtral-size, bf16, top-2 of 8, rows sorted by expert): the
   per-expert path (one cuBLAS product pair per expert, as `expert_forward`) against two grouped
   products over the layer's stacked experts; CUDA-event medians, rotating among layers so weights
   come from HBM; the grouped output's error against the per-expert one, and whether an expert's
   rows come out bit for bit the same when grouped with other experts, alone, or from another
   position in a larger stack (the offloaded runner's slots), empty groups included.
2. The whole prefill (synthetic geometry, policy gpu): wall time of several runs, then one run
   profiled on the host and the device: host operations by self time, device kernel time.

    python3 scripts/prefill_probe.py [--layers 8] [--tokens 256]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def timed(fn, reps: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def per_expert(x, counts, gu, dn):
    out, start = [], 0
    for e, c in enumerate(counts):
        if c:
            g, u = F.linear(x[start:start + c], gu[e]).chunk(2, dim=-1)
            out.append(F.linear(F.silu(g) * u, dn[e]))
        start += c
    return torch.cat(out)


def grouped(x, offs, gu, dn):
    g, u = torch._grouped_mm(x, gu.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(g) * u, dn.transpose(-2, -1), offs=offs)


def experts_probe(tokens: int, out: list) -> None:
    D, I, E, K, L = 4096, 14336, 8, 2, 4
    dev, dt = torch.device("cuda"), torch.bfloat16
    gus = [torch.randn(E, 2 * I, D, device=dev, dtype=dt) * 0.02 for _ in range(L)]
    dns = [torch.randn(E, D, I, device=dev, dtype=dt) * 0.02 for _ in range(L)]
    for n in sorted({16, tokens, 1024}):
        ids = torch.rand(n, E, device=dev).topk(K, dim=-1).indices.reshape(-1)
        order = ids.argsort(stable=True)
        x = torch.randn(n, D, device=dev, dtype=dt)[order // K].contiguous()
        counts = torch.bincount(ids, minlength=E)
        offs = counts.cumsum(0).to(torch.int32)
        counts_host = counts.tolist()
        i = [0]

        def loop():
            i[0] = (i[0] + 1) % L
            per_expert(x, counts_host, gus[i[0]], dns[i[0]])

        def group():
            i[0] = (i[0] + 1) % L
            grouped(x, offs, gus[i[0]], dns[i[0]])

        ref, y = per_expert(x, counts_host, gus[0], dns[0]), grouped(x, offs, gus[0], dns[0])
        row = {"kind": "experts", "tokens": n, "rows": n * K, "counts": counts_host,
               "per_expert_ms": round(timed(loop), 4), "grouped_ms": round(timed(group), 4),
               "grouped_vs_per_expert_rel_err": rel_err(y, ref), "grouped_equals_per_expert": bool(torch.equal(y, ref))}
        # one expert's rows: alone in a 1-stack, and at slot 5 of a 12-slot stack with empty groups around it
        e = max(range(E), key=lambda k: counts_host[k])
        lo = sum(counts_host[:e])
        rows = x[lo:lo + counts_host[e]]
        alone = grouped(rows, torch.tensor([len(rows)], device=dev, dtype=torch.int32), gus[0][e:e + 1], dns[0][e:e + 1])
        slots_gu = torch.zeros(12, 2 * I, D, device=dev, dtype=dt)
        slots_dn = torch.zeros(12, D, I, device=dev, dtype=dt)
        slots_gu[5], slots_dn[5] = gus[0][e], dns[0][e]
        slot_offs = torch.tensor([0] * 5 + [len(rows)] * 7, device=dev, dtype=torch.int32)
        in_slots = grouped(rows, slot_offs, slots_gu, slots_dn)
        row.update({"alone_equals_grouped": bool(torch.equal(alone, y[lo:lo + len(rows)])),
                    "in_slots_equals_grouped": bool(torch.equal(in_slots, y[lo:lo + len(rows)]))})
        # all experts scattered over a 20-slot stack in another order, with empty slots between
        perm = [13, 2, 17, 7, 0, 11, 5, 19]
        big_gu = torch.zeros(20, 2 * I, D, device=dev, dtype=dt)
        big_dn = torch.zeros(20, D, I, device=dev, dtype=dt)
        slot_counts = [0] * 20
        for k, s in enumerate(perm):
            big_gu[s], big_dn[s] = gus[0][k], dns[0][k]
            slot_counts[s] = counts_host[k]
        by_slot = sorted(range(E), key=lambda k: perm[k])
        xs = torch.cat([x[sum(counts_host[:k]):sum(counts_host[:k + 1])] for k in by_slot])
        ys = grouped(xs, torch.tensor(slot_counts, device=dev).cumsum(0).to(torch.int32), big_gu, big_dn)
        back, start = {}, 0
        for k in by_slot:
            back[k] = ys[start:start + counts_host[k]]
            start += counts_host[k]
        row["mixed_slots_equal"] = bool(torch.equal(torch.cat([back[k] for k in range(E)]), y))
        out.append(row)
        print(row)
        del slots_gu, slots_dn, big_gu, big_dn


def prefill_probe(layers: int, tokens: int, out: list) -> None:
    from daop.bench.geometry import synthetic_model
    from daop.generate import DecodeSession
    from daop.runtime.setup import RuntimeOptions, prepare_runtime

    dev = torch.device("cuda")
    _, decoder, host = synthetic_model("mixtral-8x7b", layers, dev, torch.bfloat16)
    decoder.experts = prepare_runtime(decoder, RuntimeOptions(policy="gpu", expert_ratio=1.0), host=host).start()
    prompt = [(7 * j) % 1000 + 1 for j in range(tokens)]
    walls = []
    for _ in range(8):
        s = DecodeSession(decoder, prompt, 4)
        t0 = time.perf_counter()
        s.prefill()
        walls.append((time.perf_counter() - t0) * 1000)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    s = DecodeSession(decoder, prompt, 4)
    with torch.profiler.profile(activities=acts) as prof:
        s.prefill()
    events = prof.key_averages()
    host = sorted(events, key=lambda e: -e.self_cpu_time_total)[:25]
    kernel_ms = sum(e.device_time_total for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / 1000
    row = {"kind": "prefill", "layers": layers, "tokens": tokens, "wall_ms": [round(w, 2) for w in walls],
           "wall_ms_median": round(statistics.median(walls[1:]), 2), "kernel_ms": round(kernel_ms, 3),
           "host_self_ms": round(sum(e.self_cpu_time_total for e in events) / 1000, 3),
           "top_host_ops": [{"name": e.key[:70], "self_ms": round(e.self_cpu_time_total / 1000, 3), "count": e.count}
                            for e in host]}
    out.append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "top_host_ops"}))
    for e in row["top_host_ops"]:
        print(f"{e['self_ms']:8.3f} ms {e['count']:5d}x {e['name']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--output", default=None)
    ap.add_argument("--skip-experts", action="store_true")
    args = ap.parse_args()
    out: list = [{"kind": "device", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}]
    if not args.skip_experts:
        experts_probe(args.tokens, out)
        torch.cuda.empty_cache()
    prefill_probe(args.layers, args.tokens, out)
    if args.output:
        with open(args.output, "w") as f:
            for row in out:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
