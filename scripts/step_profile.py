#!/usr/bin/env python3
"""Where an all-GPU decode step goes: a synthetic geometry (random weights, its own routers) at
batch 1, policy gpu. Times the captured step's replay (CUDA events, median) and the eager step,
then lists the eager step's CUDA kernels by total device time (torch.profiler), with their count
per step, so the sum of kernel time can be set against the replay time (the rest is gaps).

    python3 scripts/step_profile.py [--geometry mixtral-8x7b] [--layers 8] [--batch 1]
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

import torch

from daop.bench.geometry import synthetic_model
from daop.generate import DecodeSession
from daop.runtime.setup import RuntimeOptions, prepare_runtime


def timed_steps(session: DecodeSession, n: int) -> list[float]:
    times = []
    token = [1] * session.batch
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        session.step(token)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--geometry", default="mixtral-8x7b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    dev, dtype = torch.device("cuda"), torch.bfloat16
    _, decoder, host = synthetic_model(args.geometry, args.layers, dev, dtype)
    out = {"kind": "step_profile", "geometry": args.geometry, "layers": args.layers, "batch": args.batch}
    prompts = [[(7 * i + j) % 1000 + 1 for j in range(256)] for i in range(args.batch)]
    for graphs in (True, False):
        decoder.experts = prepare_runtime(decoder, RuntimeOptions(policy="gpu", expert_ratio=1.0, cuda_graphs=graphs),
                                          host=host).start()
        prefill = []
        for _ in range(6):  # prefill times of whole sessions, each after the last one's decode steps
            session = DecodeSession(decoder, prompts, args.steps * 3 + 8)
            session.prefill()
            prefill.append(session.prefill_s * 1000)
            timed_steps(session, 5)
            del session
        out["prefill_ms_" + ("captured" if graphs else "eager")] = round(statistics.median(prefill[1:]), 3)
        session = DecodeSession(decoder, prompts, args.steps * 3 + 8)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            session.prefill()
        out["prefill_kernel_ms_" + ("captured" if graphs else "eager")] = round(
            sum(e.device_time_total for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / 1000, 3)
        timed_steps(session, 5)
        t = timed_steps(session, args.steps)
        out["captured_ms" if graphs else "eager_ms"] = round(statistics.median(t), 4)
        if not graphs:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                steps = 10
                timed_steps(session, steps)
            kernels: dict = defaultdict(lambda: [0.0, 0])
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    k = kernels[e.name[:90]]
                    k[0] += e.device_time_total / 1000 / steps
                    k[1] += 1 / steps
            rows = sorted(kernels.items(), key=lambda kv: -kv[1][0])
            out["kernel_ms_per_step"] = round(sum(v[0] for v in kernels.values()), 4)
            out["kernels_per_step"] = round(sum(v[1] for v in kernels.values()), 1)
            out["top_kernels"] = [{"name": n, "ms": round(v[0], 4), "count": round(v[1], 1)} for n, v in rows[:25]]
        decoder.experts = None
        del session
        torch.cuda.empty_cache()
    print(f"captured step {out['captured_ms']} ms, eager step {out['eager_ms']} ms, kernels {out['kernel_ms_per_step']} ms "
          f"in {out['kernels_per_step']} launches per step")
    print({k: v for k, v in out.items() if k.startswith("prefill")})
    for k in out["top_kernels"]:
        print(f"{k['ms']:8.4f} ms {k['count']:6.1f}x  {k['name']}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
