#!/usr/bin/env python3
"""Small-kernel costs of a CPU device in the model's dtype against float32: torch's attention (SDPA)
for a decode step (one query per row) and a prompt, and one small product (F.linear) of the shipped
model's expert sizes. `daop.model.layers.attend` runs CPU decode attention in float32 because of the
first; the second is the fixed cost per expert product that keeps an 8-row step of the shipped
model from coming free.

Each timing is the median of --repeats rounds of --calls calls on random inputs (not zeros); each
row also gives the relative error of the bf16 and of the float32-on-upcast result against float64.
The shipped model's attention shapes (4 query heads, 2 key/value heads of 32) unless told.

    python3 scripts/cpu_attention_probe.py [--threads 1] [--dtype bf16]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def median_us(fn, calls: int, repeats: int) -> float:
    for _ in range(max(3, calls // 10)):
        fn()
    rounds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
    return round(statistics.median(rounds), 2)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm())


def attention_row(dtype, rows: int, queries: int, positions: int, heads: int, kv_heads: int, head_dim: int,
                  calls: int, repeats: int, gen: torch.Generator) -> dict:
    q = torch.randn(rows, heads, queries, head_dim, generator=gen).to(dtype)
    k, v = (torch.randn(rows, kv_heads, positions, head_dim, generator=gen).to(dtype) for _ in range(2))
    mask = torch.ones(queries, positions, dtype=torch.bool).tril(positions - queries)[None, None]
    scale = head_dim ** -0.5

    def native():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)

    def upcast():
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale,
                                              enable_gqa=True).to(dtype)

    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=scale, enable_gqa=True)
    a, b = median_us(native, calls, repeats), median_us(upcast, calls, repeats)
    return {"kind": "attention", "rows": rows, "queries": queries, "positions": positions,
            "native_us": a, "float32_us": b, "native_over_float32": round(a / b, 2),
            "native_rel_err": rel_err(native(), ref), "float32_rel_err": rel_err(upcast(), ref)}


def linear_row(dtype, rows: int, out_features: int, in_features: int, calls: int, repeats: int,
               gen: torch.Generator) -> dict:
    x = torch.randn(rows, in_features, generator=gen)
    w = torch.randn(out_features, in_features, generator=gen)
    xd, wd = x.to(dtype), w.to(dtype)
    a = median_us(lambda: F.linear(xd, wd), calls, repeats)
    b = median_us(lambda: F.linear(x, w), calls, repeats)
    return {"kind": "linear", "rows": rows, "shape": [out_features, in_features], "native_us": a, "float32_us": b,
            "native_over_float32": round(a / b, 2)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype, gen = DTYPES[args.dtype], torch.Generator().manual_seed(0)
    rows = [attention_row(dtype, r, t, s, args.heads, args.kv_heads, args.head_dim, args.calls, args.repeats, gen)
            for r, t, s in ((1, 1, 64), (8, 1, 64), (1, 1, 512), (8, 1, 512), (1, 64, 64), (1, 256, 256))]
    rows += [linear_row(dtype, r, o, i, args.calls, args.repeats, gen) for r in (1, 8) for o, i in ((352, 128), (128, 176))]
    card = {"kind": "card", "script": "cpu_attention_probe", "torch": torch.__version__, "threads": args.threads,
            "dtype": args.dtype, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    print(json.dumps(card))
    for row in rows:
        print(json.dumps(row))
    return {"card": card, "rows": rows}


if __name__ == "__main__":
    main()
