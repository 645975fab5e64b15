#!/usr/bin/env python3
"""How fast torch's bf16 CPU products run one Mixtral-size expert (D 4096, I 14336) at the token
counts a prompt sends to a CPU expert, and which oneDNN kernel they use. Prints one line per token
count (median ms of --repeat, TFLOP/s, and the expert's bytes over the time) and one JSON line.

Why: daop's C kernel serves 1-8 tokens at about the host's read bandwidth; more tokens (a prompt's
CPU experts) go through torch's `F.linear`. Where that runs far from both the memory floor and the
matrix units' rate, a kernel of our own would let the CPU take more of a prompt's experts.

    python3 scripts/cpu_prefill_gemm_probe.py [--threads 16] [--tokens 1,4,16,64,128,256]
    ONEDNN_VERBOSE=1 python3 scripts/cpu_prefill_gemm_probe.py --tokens 64 --repeat 1   # the kernel's name
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

D, I = 4096, 14336  # Mixtral-8x7B's expert


def median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--tokens", default="1,4,16,64,128,256")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--small", action="store_true", help="a tiny expert, to check that the script runs")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    d, i = (64, 96) if args.small else (D, I)
    gate_up = (torch.randn(2 * i, d) * 0.02).to(torch.bfloat16)
    down = (torch.randn(d, i) * 0.02).to(torch.bfloat16)
    expert_bytes = (gate_up.numel() + down.numel()) * 2

    def expert(x: torch.Tensor) -> torch.Tensor:
        g, u = F.linear(x, gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(g) * u, down)

    rows = []
    for n in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(n, d).to(torch.bfloat16)
        ms = median_ms(lambda: expert(x), args.repeat)
        row = {"tokens": n, "ms": round(ms, 3), "tflops": round(3 * d * i * n * 2 / ms / 1e9, 3),
               "weights_gbps": round(expert_bytes / ms / 1e6, 1)}
        rows.append(row)
        print(f"{n:4d} tokens: {ms:7.2f} ms  {row['tflops']:5.2f} TFLOP/s  {row['weights_gbps']:6.1f} GB/s of weights", flush=True)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: None)()
    out = {"kind": "cpu_prefill_gemm_probe", "torch": torch.__version__, "threads": args.threads, "amx_tile": amx,
           "expert_bytes": expert_bytes, "rows": rows}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
