#!/usr/bin/env python3
"""Which low-bit expert kernels exist on this machine, and how fast is one Mixtral-size expert?

For one expert (gate_up [2I, D], down [D, I]) and 1 or 4 tokens: bf16 F.linear, int8 weight-only
(`_weight_int8pack_mm`) and, where torch has it, int4 group-wise, on the CPU at each thread
count and on CUDA; plus the dequantize-then-linear fallback on CUDA. Each quantized variant's
output is compared with the same function computed on its dequantized weights in float32
(relative error ||y - ref|| / ||ref||). Eight distinct experts are cycled so caches do not hold
the weights. Prints a table, then one JSON line.

    python3 scripts/lowbit_kernel_probe.py [--threads 16,15] [--small]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cpu_gemv_probe import bandwidth_gbps  # the same host read bandwidth as the bf16 probe (this folder)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this checkout's daop, installed or not
from daop.quant import ExpertFormat, dequantize, expert_forward, to_slot_format  # noqa: E402


def has_kernel(op: str, key: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", key))
    except RuntimeError:
        return False


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def timed(fn, args_list, repeat: int, sync=lambda: None) -> float:
    times = []
    for i in range(repeat + 2):
        sync()
        t0 = time.perf_counter()
        fn(*args_list[i % len(args_list)])
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="16,15")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--repeat", type=int, default=12)
    ap.add_argument("--formats", default="int8,int4")
    args = ap.parse_args()
    D, I = (256, 896) if args.small else (4096, 14336)
    torch.manual_seed(0)
    experts = [((torch.randn(2 * I, D) * 0.02).bfloat16(), (torch.randn(D, I) * 0.02).bfloat16()) for _ in range(8)]
    formats = [f for f in args.formats.split(",") if f]
    kernels = {f"{op}:{key}": has_kernel(op, key) for op in ("_weight_int8pack_mm", "_weight_int4pack_mm",
               "_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack") for key in ("CPU", "CUDA")}
    bw = bandwidth_gbps()
    rows = []

    def bf16(x, gu, dn):
        g, u = F.linear(x, gu).chunk(2, dim=-1)
        return F.linear(F.silu(g) * u, dn)

    with torch.inference_mode():
        quant = {}
        for fmt in formats:
            try:
                quant[fmt] = [ExpertFormat(fmt, torch.bfloat16, 128).from_float(gu, dn) for gu, dn in experts]
            except Exception as exc:  # noqa: BLE001 - a probe reports what fails
                rows.append({"device": "cpu", "variant": fmt, "error": f"{type(exc).__name__}: {exc}"[:300]})
        for tokens in (1, 4):
            x = torch.randn(tokens, D).bfloat16()
            for threads in [int(t) for t in args.threads.split(",")]:
                torch.set_num_threads(threads)
                cases = [("bf16", bf16, experts, 3 * I * D * 2)]
                cases += [(fmt, lambda x, *w: expert_forward(x, w), q, sum(t.numel() * t.element_size() for t in q[0]))
                          for fmt, q in quant.items()]
                for name, fn, ws, nbytes in cases:
                    row = {"device": "cpu", "variant": name, "tokens": tokens, "threads": threads, "bytes": nbytes}
                    try:
                        y = fn(x, *ws[0])
                        if name != "bf16":
                            gu, dn = (dequantize(t) for t in (ws[0][:len(ws[0]) // 2], ws[0][len(ws[0]) // 2:]))
                            row["rel_err_vs_dequant_fp32"] = rel_err(y, bf16(x.float(), gu.float(), dn.float()))
                        ms = timed(fn, [(x, *w) for w in ws], args.repeat)
                        row.update(ms=round(ms, 3), gbps=round(nbytes / ms / 1e6, 1), floor_ms=round(nbytes / bw / 1e6, 3))
                    except Exception as exc:  # noqa: BLE001
                        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    rows.append(row)
        if torch.cuda.is_available():
            dev = torch.device("cuda")
            sync = torch.cuda.synchronize
            g_experts = [(gu.to(dev), dn.to(dev)) for gu, dn in experts]
            for tokens in (1, 4):
                x = torch.randn(tokens, D, device=dev).bfloat16()
                cases = [("bf16", bf16, g_experts, 3 * I * D * 2, g_experts)]
                for fmt, q in quant.items():
                    raw = [tuple(t.to(dev) for t in w) for w in q]
                    nbytes = sum(t.numel() * t.element_size() for t in q[0])
                    try:
                        slot = [tuple(to_slot_format(t) for t in w) for w in raw]
                        sync()
                        t0 = time.perf_counter()
                        for _ in range(4):
                            [to_slot_format(t) for t in raw[0]]
                        sync()
                        rows.append({"device": "cuda", "variant": f"{fmt} slot conversion", "ms": round((time.perf_counter() - t0) * 250, 4)})
                        cases.append((fmt, lambda x, *w: expert_forward(x, w), slot, nbytes, raw))
                    except Exception as exc:  # noqa: BLE001
                        rows.append({"device": "cuda", "variant": fmt, "error": f"{type(exc).__name__}: {exc}"[:300]})

                    def deq(x, *w):
                        half = len(w) // 2
                        return bf16(x, dequantize(w[:half]).to(x.dtype), dequantize(w[half:]).to(x.dtype))
                    cases.append((f"{fmt} dequantize+bf16", deq, raw, nbytes, raw))
                for name, fn, ws, nbytes, ref_ws in cases:
                    row = {"device": "cuda", "variant": name, "tokens": tokens, "bytes": nbytes}
                    try:
                        y = fn(x, *ws[0])
                        if name != "bf16":
                            w = ref_ws[0]
                            half = len(w) // 2
                            row["rel_err_vs_dequant_fp32"] = rel_err(y, bf16(x.float(), dequantize(w[:half]).float(), dequantize(w[half:]).float()))
                        ms = timed(fn, [(x, *w) for w in ws], args.repeat * 4, sync)
                        row.update(ms=round(ms, 4), gbps=round(nbytes / ms / 1e6, 1))
                    except Exception as exc:  # noqa: BLE001
                        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    rows.append(row)
    print(f"host read {bw:.1f} GB/s; kernels: {kernels}; c++ compiler: {shutil.which('g++') or shutil.which('c++')}")
    for r in rows:
        print(r)
    print(json.dumps({"kind": "lowbit_kernel_probe", "torch": torch.__version__, "host_read_gbps": round(bw, 1),
                      "D": D, "I": I, "kernels": kernels, "cxx": shutil.which("g++") or shutil.which("c++"), "rows": rows}))


if __name__ == "__main__":
    main()
