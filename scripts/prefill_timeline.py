#!/usr/bin/env python3
"""Where a prompt's prefill spends its time: a synthetic geometry (random weights, its own routers),
one prompt of `--prompt-tokens` tokens, each policy at each expert ratio. Prints one JSON row per
point with the median prefill (TTFT) over `--repeats` prompts after one warm-up, and the last
prefill's measured timeline (`daop.runtime.timeline`: host marks per layer, CPU jobs and copies
timed on the device). With `--profile`, the `gpu` policy's prefill also runs under torch's profiler
and the row lists the ten device kernels that took longest in total.

    python3 scripts/prefill_timeline.py --policies gpu,static,daop-exact --ratios 0.5 [--hardware-profile P]
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
from daop.bench.geometry import synthetic_model  # noqa: E402
from daop.generate import DecodeSession  # noqa: E402
from daop.runtime.setup import RuntimeOptions, prepare_runtime  # noqa: E402
from daop.runtime.timeline import Timeline  # noqa: E402


def prompt_of(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 1000, (n,), generator=g).tolist()


def top_kernels(decoder, prompt: list[int]) -> tuple[list, list]:
    """Of one prefill under torch's profiler: (kernel, total device ms, calls), longest first, and
    (host operator, self host ms, calls), longest first."""
    from torch.profiler import ProfilerActivity, profile

    session = DecodeSession(decoder, prompt, 4)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        session.prefill()
    rows, host = [], []
    for ev in prof.key_averages():
        device_us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if ev.device_type == torch.autograd.DeviceType.CUDA and device_us:
            rows.append((ev.key[:90], round(device_us / 1000, 3), ev.count))
        elif ev.device_type == torch.autograd.DeviceType.CPU:
            host.append((ev.key[:60], round(ev.self_cpu_time_total / 1000, 3), ev.count))
    return sorted(rows, key=lambda r: -r[1])[:10], sorted(host, key=lambda r: -r[1])[:15]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--geometry", default="mixtral-8x7b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--policies", default="gpu,static,daop-exact")
    ap.add_argument("--ratios", default="0.5")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hardware-profile", default=None)
    ap.add_argument("--profile", action="store_true", help="the gpu policy's prefill under torch's profiler")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config, decoder, host = synthetic_model(args.geometry, args.layers, dev, torch.bfloat16)
    for policy in args.policies.split(","):
        for ratio in ([1.0] if policy == "gpu" else [float(r) for r in args.ratios.split(",")]):
            runtime = prepare_runtime(decoder, RuntimeOptions(policy=policy, expert_ratio=ratio,
                                                              hardware_profile=args.hardware_profile), host=host)
            decoder.experts = runner = runtime.start()
            ttft, tl = [], Timeline()
            for i in range(args.repeats + 1):
                last = i == args.repeats
                if last and hasattr(runner, "timeline"):
                    runner.timeline = tl
                    tl.begin_step()  # synchronizes
                elif dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()  # as the bench's TTFT: the sequence's start (a placement reset) included
                session = DecodeSession(decoder, prompt_of(args.prompt_tokens, i), 4)
                session.prefill()
                ttft.append((time.perf_counter() - t0) * 1000)
                if last and hasattr(runner, "timeline"):
                    tl.end_step()
                    runner.timeline = None
            row = {"policy": policy, "ratio": ratio, "prompt_tokens": args.prompt_tokens,
                   "ttft_ms_median": round(statistics.median(ttft[1:]), 2), "ttft_ms": [round(t, 2) for t in ttft[1:]]}
            if tl.steps:
                row["timeline"] = tl.raw(tl.steps[-1])
                row["totals"] = {k: v for k, v in runner.totals().items() if not k.startswith("cpu_busy")}
            if args.profile and policy == "gpu" and dev.type == "cuda":
                row["top_kernels"], row["top_host_ops"] = top_kernels(decoder, prompt_of(args.prompt_tokens, 99))
            print(json.dumps(row), flush=True)
            runner.close()
            decoder.experts = None


if __name__ == "__main__":
    main()
