#!/usr/bin/env python3
"""Does a small host->GPU upload (a CPU expert's output) wait behind expert copies queued on another
stream? A few Mixtral-size expert copies (pinned, on a copy stream, whole or in chunks) are queued,
then a CPU expert's output (1 or 64 tokens x 4096, bf16) goes to the GPU on the compute stream:
pinned through torch's copy (the DMA engines), pageable, or read by a GPU kernel straight from
pinned host memory (Triton, zero-copy). Prints one JSON row per case: when the small upload was done
and when the copies were, in ms from the moment the copies were queued (median over --repeats).

    python3 scripts/upload_probe.py [--copies 4] [--repeats 9]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

D, I = 4096, 14336
CHUNK = 16 << 20  # bytes per piece when the copies are chunked

try:
    import triton
    import triton.language as tl

    @triton.jit
    def _read_host(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)
except ImportError:  # no Triton: the zero-copy case is skipped
    triton = None


def zero_copy(src: torch.Tensor, dst: torch.Tensor) -> None:
    n = src.numel()
    _read_host[(triton.cdiv(n, 1024),)](src, dst, n, BLOCK=1024)


def queue_copies(srcs, dsts, stream, chunked: bool) -> None:
    with torch.cuda.stream(stream):
        for src, dst in zip(srcs, dsts):
            if not chunked:
                dst.copy_(src, non_blocking=True)
                continue
            flat_s, flat_d = src.view(-1), dst.view(-1)
            step = CHUNK // src.element_size()
            for i in range(0, flat_s.numel(), step):
                flat_d[i:i + step].copy_(flat_s[i:i + step], non_blocking=True)


def case(name: str, srcs, dsts, stream, small_host, small_dev, how: str, chunked: bool, copies: bool, repeats: int) -> dict:
    done, copies_end, host_ms = [], [], []
    compute = torch.cuda.current_stream()
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = torch.cuda.Event(enable_timing=True)
        t0.record(compute)
        stream.wait_event(t0)
        if copies:
            queue_copies(srcs, dsts, stream, chunked)
        end_copies = torch.cuda.Event(enable_timing=True)
        end_copies.record(stream)
        time.sleep(0.002)  # the copies are under way when the upload is asked for
        h0 = time.perf_counter()
        if how == "pinned":
            small_dev.copy_(small_host, non_blocking=True)
        elif how == "pageable":
            small_dev.copy_(small_host.clone(), non_blocking=False)
        else:
            zero_copy(small_host, small_dev)
        h1 = time.perf_counter()
        up = torch.cuda.Event(enable_timing=True)
        up.record(compute)
        torch.cuda.synchronize()
        done.append(t0.elapsed_time(up))
        copies_end.append(t0.elapsed_time(end_copies))
        host_ms.append((h1 - h0) * 1000)
    med = lambda v: round(statistics.median(v[1:]), 3)  # noqa: E731
    return {"case": name, "upload": how, "copies": copies, "chunked": chunked, "upload_done_ms": med(done),
            "copies_done_ms": med(copies_end), "host_call_ms": med(host_ms), "bytes": small_host.numel() * 2}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    srcs = [(torch.randn(3 * I, D // 8) * 0.02).to(torch.bfloat16).repeat(1, 8).pin_memory() for _ in range(args.copies)]
    dsts = [torch.empty_like(s, device="cuda") for s in srcs]
    stream = torch.cuda.Stream()
    rows = []
    for tokens in (1, 64):
        small_host = torch.randn(tokens, D).to(torch.bfloat16).pin_memory()
        small_dev = torch.empty(tokens, D, dtype=torch.bfloat16, device="cuda")
        hows = ["pinned", "pageable"] + (["zero-copy"] if triton is not None else [])
        for how in hows:
            if how == "zero-copy":
                try:
                    zero_copy(small_host, small_dev)
                    torch.cuda.synchronize()
                    ok = torch.equal(small_dev.cpu(), small_host)
                except Exception as exc:  # noqa: BLE001 - report why the kernel cannot read host memory
                    print(json.dumps({"case": "zero-copy", "error": f"{type(exc).__name__}: {exc}"[:300]}), flush=True)
                    continue
                if not ok:
                    print(json.dumps({"case": "zero-copy", "error": "wrong values"}), flush=True)
                    continue
            for copies, chunked in ((False, False), (True, False), (True, True)):
                row = case(f"{tokens} tokens", srcs, dsts, stream, small_host, small_dev, how, chunked, copies, args.repeats)
                row["tokens"] = tokens
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"{'tokens':>6} {'upload':>10} {'copies':>7} {'chunked':>7} {'upload done':>11} {'copies done':>11} {'host ms':>8}")
    for r in rows:
        print(f"{r['tokens']:6d} {r['upload']:>10} {str(r['copies']):>7} {str(r['chunked']):>7} {r['upload_done_ms']:11.3f} "
              f"{r['copies_done_ms']:11.3f} {r['host_call_ms']:8.3f}")


if __name__ == "__main__":
    main()
