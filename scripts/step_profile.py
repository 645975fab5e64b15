#!/usr/bin/env python3
"""Where an all-GPU decode step goes: a synthetic geometry (random weights, its own routers),
policy gpu, one sequence or (--batch N) N rows on the batch path, whose timed step also reads the
rows' tokens back. Times the captured step's replay (CUDA events, median) and the eager step,
then lists the eager step's CUDA kernels by total device time (torch.profiler), with their count
per step, so the sum of kernel time can be set against the replay time (the rest is gaps).

    python3 scripts/step_profile.py [--geometry mixtral-8x7b] [--layers 8] [--batch 1] [--expert-dtype int4]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this checkout's daop, installed or not
from daop.batching import Batcher, Sequence, drive  # noqa: E402
from daop.bench.geometry import geometry_config, synthetic_decoder, synthetic_host_experts  # noqa: E402
from daop.engine import Engine  # noqa: E402
from daop.generate import DecodeSession  # noqa: E402
from daop.runtime.decode_step import capture_kind  # noqa: E402
from daop.runtime.setup import RuntimeOptions, prepare_runtime, resolve_expert_format  # noqa: E402
from daop.sampling import SamplingParams  # noqa: E402


class Run:
    """Prompts through the decoder: one sequence (a DecodeSession), or a batch on the batch path
    (`daop.batching`: every prompt prefilled, then each `step` decodes all rows and reads their tokens)."""

    def __init__(self, decoder, prompts: list[list[int]], max_new_tokens: int) -> None:
        self.session = self.batcher = None
        if len(prompts) == 1:
            self.session = DecodeSession(decoder, prompts[0], max_new_tokens)
            return
        engine = Engine(None, decoder.config, decoder.spec, decoder, None, 0.0)
        engine.eos_ids = frozenset()
        self.batcher = Batcher(engine, len(prompts), len(prompts[0]) + max_new_tokens, prefill_first=True,
                               chunk=len(prompts[0]))
        self.errors: list = []
        params = SamplingParams(max_new_tokens=max_new_tokens)
        for p in prompts:
            self.batcher.add(Sequence(p, params, lambda kind, payload: self.errors.append(payload) if kind == "error" else None))

    def prefill(self) -> float:
        """Seconds to prefill every prompt."""
        if self.session is not None:
            self.session.prefill()
            return self.session.prefill_s
        t0 = time.perf_counter()
        drive(self.batcher, self.batcher.prefilling_phase, self.errors)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def step(self) -> None:
        if self.session is not None:
            self.session.step([1])
        else:
            self.batcher.step()


def timed_steps(run: Run, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run.step()
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
    ap.add_argument("--expert-dtype", default=None, help="auto (bf16), int8 or int4")
    ap.add_argument("--group-size", type=int, default=None)
    args = ap.parse_args()
    dev, dtype = torch.device("cuda"), torch.bfloat16
    config, spec = geometry_config(args.geometry, args.layers)
    decoder = synthetic_decoder(config, spec, dev, dtype)
    fmt = resolve_expert_format(config, dtype, dev, args.expert_dtype, args.group_size)
    host = synthetic_host_experts(config, fmt, pin=True)  # stored in the asked format, as `daop bench` stores them
    out = {"kind": "step_profile", "geometry": args.geometry, "layers": args.layers, "batch": args.batch,
           "expert_dtype": args.expert_dtype or "auto"}
    prompts = [[(7 * i + j) % 1000 + 1 for j in range(256)] for i in range(args.batch)]
    for graphs in (True, False):
        decoder.experts = prepare_runtime(decoder, RuntimeOptions(policy="gpu", expert_ratio=1.0, cuda_graphs=graphs,
                                                                         expert_dtype=args.expert_dtype, group_size=args.group_size),
                                          host=host).start()
        if graphs:
            out["capture_kind"] = capture_kind(decoder, args.batch)
        prefill = []
        for _ in range(6):  # prefill times of whole runs, each after the last one's decode steps
            run = Run(decoder, prompts, args.steps * 3 + 8)
            prefill.append(run.prefill() * 1000)
            timed_steps(run, 5)
            del run
        out["prefill_ms_" + ("captured" if graphs else "eager")] = round(statistics.median(prefill[1:]), 3)
        run = Run(decoder, prompts, args.steps * 3 + 8)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            run.prefill()
        out["prefill_kernel_ms_" + ("captured" if graphs else "eager")] = round(
            sum(e.device_time_total for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / 1000, 3)
        timed_steps(run, 5)
        t = timed_steps(run, args.steps)
        out["captured_ms" if graphs else "eager_ms"] = round(statistics.median(t), 4)
        if not graphs:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                steps = 10
                timed_steps(run, steps)
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
        del run
        torch.cuda.empty_cache()
    print(f"captured step {out['captured_ms']} ms, eager step {out['eager_ms']} ms, kernels {out['kernel_ms_per_step']} ms "
          f"in {out['kernels_per_step']} launches per step")
    print({k: v for k, v in out.items() if k.startswith("prefill")})
    for k in out["top_kernels"]:
        print(f"{k['ms']:8.4f} ms {k['count']:6.1f}x  {k['name']}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
