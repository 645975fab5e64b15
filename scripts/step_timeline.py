#!/usr/bin/env python3
"""A measured timeline of offloaded decode steps: a synthetic geometry (random weights, its own
routers), batch 1, each policy at each expert ratio. Prints one JSON row per point: the step's
median length and, per layer, the median time (ms from the step's start) of each mark on the driving
thread (enter, routed, cpu_submitted, copies_queued, speculated, gpu_launched, cpu_collected, exit),
each CPU job's (submitted, started, ended) and each copy's (queued, started, ended); plus the
driving thread's time per step split by what it waited on:

- routing: enter -> routed (the host reads the routing: waits for attention, router and any copy
  the previous layer's experts waited on)
- plan: routed -> gpu_launched (planning, CPU submit, copies queued, speculation, GPU launches)
- cpu_wait: gpu_launched -> cpu_collected (CPU results awaited and uploaded)
- tail: cpu_collected -> exit (the weighted sum launched), and the dense layers between MoE layers.

    python3 scripts/step_timeline.py --policies static,daop-exact --ratios 0.5 [--hardware-profile P]
    python3 scripts/step_timeline.py --trace benchmarks/traces/daop-moe-mini-heldout.npz   # recorded routing

With --trace, each point replays the trace's first sequence (teacher forced, its recorded routing),
as `daop bench --trace` does, instead of the synthetic routers on a fixed prompt.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this checkout's daop, installed or not
from daop.bench.geometry import synthetic_model  # noqa: E402
from daop.bench.trace import TraceRouting, load_traces  # noqa: E402
from daop.generate import DecodeSession  # noqa: E402
from daop.runtime.setup import RuntimeOptions, prepare_runtime  # noqa: E402
from daop.runtime.timeline import Timeline  # noqa: E402


def breakdown(tl: Timeline, layers: list[int], skip: int) -> dict[str, float]:
    """Per step, the driving thread's time by piece (median over steps)."""
    parts: dict[str, list[float]] = {k: [] for k in ("routing", "plan", "cpu_wait", "tail", "outside")}
    for s in tl.steps[skip:]:
        m = {(layer, name): ms for layer, name, ms in s.marks}
        sums = dict.fromkeys(parts, 0.0)
        prev_exit = 0.0
        for layer in layers:
            if (layer, "enter") not in m:
                continue
            sums["outside"] += m[(layer, "enter")] - prev_exit
            sums["routing"] += m[(layer, "routed")] - m[(layer, "enter")]
            sums["plan"] += m[(layer, "gpu_launched")] - m[(layer, "routed")]
            sums["cpu_wait"] += m[(layer, "cpu_collected")] - m[(layer, "gpu_launched")]
            sums["tail"] += m[(layer, "exit")] - m[(layer, "cpu_collected")]
            prev_exit = m[(layer, "exit")]
        sums["outside"] += s.end_ms - prev_exit
        for k, v in sums.items():
            parts[k].append(v)
    return {k: round(statistics.median(v), 2) for k, v in parts.items() if v}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--geometry", default="mixtral-8x7b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--policies", default="static,daop-exact")
    ap.add_argument("--ratios", default="0.5")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--hardware-profile", default=None)
    ap.add_argument("--raw", type=int, default=3, help="steps given whole at the end of each row")
    ap.add_argument("--trace", default=None, help="replay this routing trace's first sequence (.npz)")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    config, decoder, host = synthetic_model(args.geometry, args.layers, dev, dtype)
    trace = load_traces(args.trace)[0][0] if args.trace else None
    prompt = trace.tokens[: trace.prompt_len] if trace else [(7 * j) % 1000 + 1 for j in range(256)]
    if trace and len(trace.tokens) - trace.prompt_len < args.warmup + args.steps + 1:
        raise SystemExit(f"--trace: {len(trace.tokens) - trace.prompt_len} decode tokens, fewer than --warmup + --steps + 1")
    layers = list(range(config.num_layers))
    for policy in args.policies.split(","):
        for ratio in (float(r) for r in args.ratios.split(",")):
            runtime = prepare_runtime(decoder, RuntimeOptions(policy=policy, expert_ratio=ratio,
                                                              hardware_profile=args.hardware_profile), host=host)
            decoder.experts = runner = runtime.start()
            tl = Timeline()
            with decoder.routed_by(TraceRouting(trace, decoder.model_routing, dev)) if trace else contextlib.nullcontext():
                session = DecodeSession(decoder, prompt, args.steps + args.warmup + 4)
                logits = session.prefill()
                runner.timeline = tl
                for i in range(args.warmup + args.steps):
                    tl.begin_step()
                    token = [trace.tokens[len(prompt) + i]] if trace else logits.argmax(-1).cpu()
                    logits = session.step(token)
                    logits.argmax(-1).cpu()
                    if getattr(runner, "handoff", None) is not None:
                        runner.handoff.flush()  # the step's handed-off layers: their CPU spans, in this step
                    tl.end_step()
            row = {"policy": policy, "ratio": ratio, "routing": args.trace or "synthetic routers", **tl.summary(skip=args.warmup),
                   "driving_thread_ms": breakdown(tl, layers, args.warmup),
                   "last_steps": [tl.raw(s) for s in tl.steps[-args.raw:]]}
            print(json.dumps(row), flush=True)
            runner.close()
            decoder.experts = None


if __name__ == "__main__":
    main()
