#!/usr/bin/env python3
"""Do the two host channels add up? One bf16 Mixtral-size expert on the CPU (daop's C kernel, one
token) and one expert's bytes copied host->GPU (pinned, its own stream), alone and at the same time,
then one expert split between them: the CPU computes a fraction f of its intermediate rows while the
other 1 - f of its bytes are copied (what the universal bound assumes the channels can do).

Prints one JSON row per measurement (median ms over --repeats) and a last summary row:
cpu_alone, copy_alone, together (each channel's time while both run), and per f the split's time
max(cpu(f), copy(1 - f)) against the whole expert on the CPU alone.

    python3 scripts/channel_overlap_probe.py [--threads 16] [--repeats 15]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this checkout's daop, installed or not
from daop.kernels import cpu_expert  # noqa: E402

D, I = 4096, 14336  # Mixtral-8x7B's expert


def expert_weights(inter: int, pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gate_up = (torch.randn(2 * inter, D) * 0.02).to(torch.bfloat16)
    down = (torch.randn(D, inter) * 0.02).to(torch.bfloat16)
    return (gate_up.pin_memory(), down.pin_memory()) if pin else (gate_up, down)


def timed_copy(src: tuple[torch.Tensor, ...], dst: tuple[torch.Tensor, ...], stream: torch.cuda.Stream):
    """Queue the copy of src into dst on `stream`; returns its (start, end) events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        start.record(stream)
        for d, s in zip(dst, src):
            d.copy_(s, non_blocking=True)
        end.record(stream)
    return start, end


def run(cpu_w, copy_src, copy_dst, x, threads: int, stream, repeats: int, do_cpu: bool, do_copy: bool) -> dict:
    cpu_ms, copy_ms = [], []
    for _ in range(repeats + 2):
        torch.cuda.synchronize()
        events = timed_copy(copy_src, copy_dst, stream) if do_copy else None
        t0 = time.perf_counter()
        if do_cpu:
            cpu_expert.expert(x, cpu_w[0], cpu_w[1], threads)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        cpu_ms.append((t1 - t0) * 1000)
        if events:
            copy_ms.append(events[0].elapsed_time(events[1]))
    out = {}
    if do_cpu:
        out["cpu_ms"] = round(statistics.median(cpu_ms[2:]), 3)
    if do_copy:
        out["copy_ms"] = round(statistics.median(copy_ms[2:]), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--fractions", default="0.5,0.6,0.67,0.75")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not cpu_expert.available():
        raise SystemExit("needs CUDA and the CPU expert kernel")
    dev, stream = torch.device("cuda"), torch.cuda.Stream()
    x = torch.randn(1, D).to(torch.bfloat16)
    cpu_w = expert_weights(I, pin=True)
    copy_src = expert_weights(I, pin=True)
    copy_dst = tuple(torch.empty_like(t, device=dev) for t in copy_src)
    rows = []
    alone_cpu = run(cpu_w, copy_src, copy_dst, x, args.threads, stream, args.repeats, True, False)["cpu_ms"]
    alone_copy = run(cpu_w, copy_src, copy_dst, x, args.threads, stream, args.repeats, False, True)["copy_ms"]
    both = run(cpu_w, copy_src, copy_dst, x, args.threads, stream, args.repeats, True, True)
    rows.append({"kind": "whole", "cpu_alone_ms": alone_cpu, "copy_alone_ms": alone_copy,
                 "together_cpu_ms": both["cpu_ms"], "together_copy_ms": both["copy_ms"]})
    print(json.dumps(rows[-1]), flush=True)
    for f in (float(v) for v in args.fractions.split(",")):
        inter = int(I * f) // 16 * 16
        part_w = expert_weights(inter, pin=True)
        rest = expert_weights(I - inter, pin=True)
        rest_dst = tuple(torch.empty_like(t, device=dev) for t in rest)
        r = run(part_w, rest, rest_dst, x, args.threads, stream, args.repeats, True, True)
        rows.append({"kind": "split", "cpu_fraction": round(inter / I, 3), **r,
                     "split_ms": max(r["cpu_ms"], r["copy_ms"]), "whole_cpu_ms": alone_cpu,
                     "gain": round(alone_cpu / max(r["cpu_ms"], r["copy_ms"]), 3)})
        print(json.dumps(rows[-1]), flush=True)
        del part_w, rest, rest_dst
    print(json.dumps({"kind": "summary", "threads": args.threads, "expert_bytes": 3 * D * I * 2, "rows": rows}))


if __name__ == "__main__":
    main()
