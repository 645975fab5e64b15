#!/usr/bin/env python3
"""Where an offloaded decode step's time goes on the driving thread: a synthetic geometry (random
weights, its own routers), one policy at one expert ratio, batch 1. Runs decode steps under
cProfile and prints the functions with the most cumulative and own time per step, plus the step
time and the CPU executor's busy time, so host overhead can be told from CPU expert compute.

    python3 scripts/offload_profile.py --policy daop-exact --ratio 0.5 --hardware-profile PROFILE.json
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this checkout's daop, installed or not
from daop.bench.geometry import synthetic_model  # noqa: E402
from daop.generate import DecodeSession  # noqa: E402
from daop.hardware import HardwareProfile  # noqa: E402
from daop.runtime.setup import RuntimeOptions, prepare_runtime  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--geometry", default="mixtral-8x7b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--policy", default="daop-exact")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--hardware-profile", required=True)
    ap.add_argument("--top", type=int, default=28)
    args = ap.parse_args()
    dev, dtype = torch.device("cuda"), torch.bfloat16
    _, decoder, host = synthetic_model(args.geometry, args.layers, dev, dtype)
    profile = HardwareProfile.load(args.hardware_profile)
    decoder.experts = prepare_runtime(decoder, RuntimeOptions(policy=args.policy, expert_ratio=args.ratio,
                                                              hardware_profile=profile), host=host).start()
    prompt = [(7 * j) % 1000 + 1 for j in range(256)]
    session = DecodeSession(decoder, prompt, args.steps + 16)
    logits = session.prefill()
    for _ in range(4):
        logits = session.step(logits.argmax(-1))
    busy0 = decoder.experts.totals().get("cpu_busy_s", 0.0)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(args.steps):
        logits = session.step(logits.argmax(-1).cpu())
    prof.disable()
    step_ms = (time.perf_counter() - t0) * 1000 / args.steps
    busy_ms = (decoder.experts.totals().get("cpu_busy_s", 0.0) - busy0) * 1000 / args.steps
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("cumulative").print_stats(args.top)
    stats.sort_stats("tottime").print_stats(args.top)
    text = out.getvalue().replace(str(args.steps) + "/", "")
    print(text)
    print(json.dumps({"kind": "offload_profile", "policy": args.policy, "ratio": args.ratio, "steps": args.steps,
                      "step_ms_under_cprofile": round(step_ms, 3), "cpu_busy_ms_per_step": round(busy_ms, 3)}))


if __name__ == "__main__":
    main()
