#!/usr/bin/env python3
"""A batch decode step's cache write, one row per sequence at its own position: the two ways torch
can do it, timed per write on one device and dtype. Prints one JSON line.

- scatter: `scatter_` along the position axis with the positions as an expanded index (one kernel
  per tensor; `KVCache.write_at` uses it on CUDA);
- indexed: an arange of the rows and an indexed write `cache[rows, :, pos] = new` (`write_at` on the
  CPU, where torch's scatter walks the whole bf16/fp16 cache).

    python3 scripts/kv_write_probe.py [--device cpu] [--rows 8] [--positions 1024,4096] [--small]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def scatter(cache: torch.Tensor, pos: torch.Tensor, new: torch.Tensor) -> None:
    cache.scatter_(2, pos.view(-1, 1, 1, 1).expand_as(new), new)


def indexed(cache: torch.Tensor, pos: torch.Tensor, new: torch.Tensor) -> None:
    cache[torch.arange(new.shape[0], device=pos.device), :, pos] = new[:, :, 0]


def us_per_write(write, cache: torch.Tensor, pos: torch.Tensor, new: torch.Tensor, n: int) -> float:
    cuda = cache.is_cuda
    for _ in range(max(1, n // 10)):
        write(cache, pos, new)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        write(cache, pos, new)
    if cuda:
        torch.cuda.synchronize()
    return round((time.perf_counter() - t0) / n * 1e6, 2)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--positions", default="1024,4096")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--small", action="store_true", help="a tiny cache and few calls, to check that it runs")
    args = ap.parse_args(argv)
    if args.small:
        args.rows, args.heads, args.head_dim, args.positions, args.calls = 3, 2, 8, "16", 5
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, dtype in DTYPES.items():
        for S in (int(p) for p in args.positions.split(",")):
            cache = torch.zeros(args.rows, args.heads, S, args.head_dim, dtype=dtype, device=device)
            new = torch.randn(args.rows, args.heads, 1, args.head_dim, generator=gen).to(device, dtype)
            pos = torch.randint(0, S, (args.rows,), generator=gen).to(device)
            a, b = cache.clone(), cache.clone()
            scatter(a, pos, new)
            indexed(b, pos, new)
            rows.append({"dtype": name, "positions": S, "same_values": bool(torch.equal(a, b)),
                         "scatter_us": us_per_write(scatter, cache, pos, new, args.calls),
                         "indexed_us": us_per_write(indexed, cache, pos, new, args.calls)})
    out = {"kind": "kv_write_probe", "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "rows": args.rows, "heads": args.heads, "head_dim": args.head_dim, "results": rows}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
