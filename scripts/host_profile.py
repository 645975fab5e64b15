#!/usr/bin/env python3
"""Where the driving thread's time goes in offloaded decode steps: the runner's host functions
wrapped with wall-clock timers (inclusive, per call), and the layer marks of `daop.runtime.timeline`
recorded without the timeline's synchronizes, so the steps run as in `daop bench`. A synthetic
geometry at one expert ratio, batch 1, each policy in turn; prints one JSON row per policy:

- calls: per wrapped function, calls per step, median and mean microseconds per call, ms per step;
- gaps: per layer call, the median ms from the routing read to the CPU submit (layers with CPU
  experts) and from the routing read to the GPU launches (all layers), and from each CPU job's end
  to the next CPU job's start within a step (the CPU idle between jobs);
- step_ms: the median step.

    python3 scripts/host_profile.py --policies daop-exact,static --ratio 0.5 [--trace T.npz] [--hardware-profile P] [--cprofile F]
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import json
import pstats
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this checkout's daop, installed or not
from daop.bench.geometry import synthetic_model  # noqa: E402
from daop.bench.trace import TraceRouting, load_traces  # noqa: E402
from daop.executors import cpu as cpu_mod  # noqa: E402
from daop.executors import transfer as transfer_mod  # noqa: E402
from daop.generate import DecodeSession  # noqa: E402
from daop.kernels import cpu_expert  # noqa: E402
from daop.predict import swaps  # noqa: E402
from daop.runtime import daop_runner, offload  # noqa: E402
from daop.runtime.setup import RuntimeOptions, prepare_runtime  # noqa: E402
from daop.runtime.timeline import Step, Timeline  # noqa: E402

TIMES: dict[str, list[float]] = defaultdict(list)

# (owner, attribute): the host functions timed (module functions where the runner imported them)
WRAPPED = [
    (offload.OffloadedExperts, "read_routing"), (daop_runner, "group_by_expert"), (daop_runner, "plan_decode_layer"),
    (daop_runner.DaopRunner, "landing_copies"), (offload.OffloadedExperts, "channel_clock"), (swaps.RecentCounts, "add"),
    (offload.OffloadedExperts, "execute"), (offload, "check_served"), (offload.OffloadedExperts, "cpu_job"),
    (transfer_mod.Transfer, "host_job"), (cpu_mod.CpuExecutor, "submit"), (cpu_expert.Queued, "__init__"),
    (daop_runner.DaopRunner, "prepare"), (daop_runner.DaopRunner, "copy_early"), (daop_runner.DaopRunner, "predict"),
    (daop_runner.DaopRunner, "predict_ahead"), (daop_runner.DaopRunner, "estimate_finish"),
    (daop_runner.DaopRunner, "score_prediction"), (daop_runner.DaopRunner, "swap_in"), (offload.OffloadedExperts, "copy"),
    (offload.OffloadedExperts, "grouped"), (offload.OffloadedExperts, "read_on_device"), (offload.OffloadedExperts, "collect"),
    (offload.OffloadedExperts, "count"), (offload, "weighted_sum"), (offload, "token_rows"),
    (offload.OffloadedExperts, "__call__"), (daop_runner.DaopRunner, "decode_layer"),
]


def timed(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            TIMES[name].append(time.perf_counter() - t0)
    return wrapper


def wrap_all() -> None:
    for owner, attr in WRAPPED:
        fn = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr)
        if fn is None:
            continue
        label = f"{owner.__name__.rsplit('.', 1)[-1]}.{attr}"
        setattr(owner, attr, timed(label, fn))


def gaps(steps: list[Step]) -> dict:
    routed_submit, routed_launch, idle = defaultdict(list), defaultdict(list), []
    for s in steps:
        m: dict[tuple[int, str], float] = {}
        for layer, name, ms in s.marks:  # a layer's first mark of each name (an early submit marks cpu_submitted first)
            m.setdefault((layer, name), ms)
        for (layer, name), ms in m.items():
            if name != "routed":
                continue
            if (layer, "gpu_launched") in m:
                routed_launch[layer].append(m[(layer, "gpu_launched")] - ms)
            jobs = [c for c in s.cpu if c[0] == layer and c[1] == "cpu" and c[2] >= ms - 1e-6]
            if jobs and (layer, "cpu_submitted") in m:
                routed_submit[layer].append(m[(layer, "cpu_submitted")] - ms)
        spans = sorted((a, b) for layer, kind, sub, a, b in s.cpu if a >= 0)
        idle += [nxt[0] - prev[1] for prev, nxt in zip(spans, spans[1:])]

    def med(d):
        return {layer: round(statistics.median(v), 3) for layer, v in sorted(d.items())}
    return {"routed_to_cpu_submit_ms": med(routed_submit), "routed_to_gpu_launched_ms": med(routed_launch),
            "cpu_idle_between_jobs_ms": round(statistics.median(idle), 3) if idle else None, "cpu_jobs_per_step":
            round(sum(len([c for c in s.cpu if c[1] == "cpu"]) for s in steps) / max(len(steps), 1), 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--geometry", default="mixtral-8x7b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--policies", default="daop-exact,static")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--hardware-profile", default=None)
    ap.add_argument("--trace", default=None, help="replay this routing trace's sequences (.npz), teacher forced")
    ap.add_argument("--cprofile", default=None, metavar="FILE",
                    help="also profile the timed steps with cProfile (slower steps), stats saved to FILE, the top printed")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config, decoder, host = synthetic_model(args.geometry, args.layers, dev, torch.bfloat16)
    traces = load_traces(args.trace)[0] if args.trace else []
    wrap_all()
    for policy in args.policies.split(","):
        runtime = prepare_runtime(decoder, RuntimeOptions(policy=policy, expert_ratio=args.ratio,
                                                          hardware_profile=args.hardware_profile), host=host)
        decoder.experts = runner = runtime.start()
        tl = Timeline()
        steps: list[Step] = []
        step_ms: list[float] = []
        TIMES.clear()
        done = 0
        prof = cProfile.Profile() if args.cprofile else None
        for seq in traces or [None]:
            if done >= args.steps:
                break
            prompt = seq.tokens[: seq.prompt_len] if seq else [(7 * j) % 1000 + 1 for j in range(256)]
            n = min(len(seq.tokens) - seq.prompt_len - 1, args.warmup + args.steps - done) if seq else args.warmup + args.steps
            with decoder.routed_by(TraceRouting(seq, decoder.model_routing, dev)) if seq else contextlib.nullcontext():
                session = DecodeSession(decoder, prompt, n + 4)
                logits = session.prefill()
                runner.timeline = tl
                for i in range(n):
                    if i == args.warmup:
                        TIMES.clear()
                    if prof is not None and i >= args.warmup:
                        prof.enable()
                    tl.current = Step(time.perf_counter(), None)  # marks and CPU spans, no synchronize
                    token = [seq.tokens[len(prompt) + i]] if seq else logits.argmax(-1).cpu()
                    logits = session.step(token)
                    logits.argmax(-1).cpu()
                    if prof is not None:
                        prof.disable()
                    tl.current.end_ms = tl.now()
                    if i >= args.warmup:
                        steps.append(tl.current)
                        step_ms.append(tl.current.end_ms)
                        done += 1
                    tl.current = None
                runner.timeline = None
                runner.collect(wait=True)
        per = max(len(steps), 1)
        calls = {name: {"per_step": round(len(v) / per, 2), "median_us": round(statistics.median(v) * 1e6, 1),
                        "mean_us": round(statistics.mean(v) * 1e6, 1), "ms_per_step": round(sum(v) * 1000 / per, 3)}
                 for name, v in sorted(TIMES.items(), key=lambda kv: -sum(kv[1])) if v}
        row = {"policy": policy, "ratio": args.ratio, "routing": args.trace or "synthetic routers", "steps": len(steps),
               "step_ms": round(statistics.median(step_ms), 3) if step_ms else None, **gaps(steps), "calls": calls}
        print(json.dumps(row), flush=True)
        if prof is not None:
            prof.dump_stats(f"{args.cprofile}.{policy}")
            pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(45)
        runner.close()
        decoder.experts = None


if __name__ == "__main__":
    main()
