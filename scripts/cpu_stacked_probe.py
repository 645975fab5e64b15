#!/usr/bin/env python3
"""A CPU device's routed experts one product pair each (`expert_forward`) against one batched pair
over the stack (`daop.quant.stacked_swiglu`), on the shipped model (or a checkpoint): whether every
expert's rows come out bit for bit the same, what a layer's experts take each way, and what a whole
decode step takes at each batch size. JSON lines on stdout, the first a card.

    python3 scripts/cpu_stacked_probe.py                      # the shipped model, 1 thread
    python3 scripts/cpu_stacked_probe.py --batch 1,8 --steps 60

The step times alternate the two ways step by step on one engine (two batches of the same prompts),
so a drift of the machine's speed falls on both; medians are reported.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

import daop.quant as quant
from daop.bench.sweep import git_sha
from daop.engine import Engine
from daop.model.moe import group_by_expert
from daop.quant import expert_forward, stacked_swiglu

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling batch_steps module, also when loaded by path
from batch_steps import alternate, prefilled_batch, same_tokens  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median microseconds of fn over `repeats` calls after a warm-up."""
    for _ in range(20):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e6, 2)


def layer_rows(engine: Engine, tokens: int, repeats: int, seed: int) -> dict:
    """One layer's routed experts for `tokens` random rows, routed uniformly at random (top-k distinct)."""
    c = engine.config
    gen = torch.Generator().manual_seed(seed + tokens)
    h = torch.randn(tokens, c.hidden_size, generator=gen).to(engine.decoder.dtype)
    ids = torch.stack([torch.randperm(c.num_experts, generator=gen)[:c.top_k] for _ in range(tokens)])
    experts = engine.decoder.experts
    layer = c.moe_layer_ids()[0]
    stacked = experts.tensors[layer]
    rows_host = group_by_expert(ids)

    def per_expert() -> dict:
        return {e: expert_forward(h if tokens == 1 else h[rows_host[e][0]], experts.weights_of(layer, e)) for e in rows_host}

    def batched() -> dict:
        return stacked_swiglu(h, rows_host, stacked)

    a, b = per_expert(), batched()
    return {"kind": "layer", "tokens": tokens, "experts": len(rows_host),
            "bitwise_equal": all(torch.equal(a[e], b[e]) for e in a),
            "per_expert_us": timed(per_expert, repeats), "stacked_us": timed(batched, repeats)}


def steps(engine: Engine, rows: int, count: int, seed: int) -> dict:
    """Decode steps of `rows` sequences, the two ways alternating step by step (STACKED_MAX_TOKENS
    0 turns the stacked path off)."""
    on = quant.STACKED_MAX_TOKENS

    def limit(value: int) -> Callable[[], None]:
        return lambda: setattr(quant, "STACKED_MAX_TOKENS", value)

    try:
        limit(0)()
        old = prefilled_batch(engine, rows, count + 8, seed, max_len=128)
        limit(on)()
        new = prefilled_batch(engine, rows, count + 8, seed, max_len=128)
        ms = alternate({"per_expert": (old, limit(0)), "stacked": (new, limit(on))}, count)
    finally:
        quant.STACKED_MAX_TOKENS = on
    a, b = ms["per_expert"], ms["stacked"]
    return {"kind": "step", "rows": rows, "steps": count, "per_expert_ms": round(a, 3), "stacked_ms": round(b, 3),
            "speedup": round(a / b, 3), "same_tokens": same_tokens(old, new)}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the shipped model)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--tokens", default="1,2,4,8,16", help="rows of the layer-level timing")
    ap.add_argument("--batch", default="1,2,4,8", help="decode batch sizes of the step timing")
    ap.add_argument("--steps", type=int, default=40, help="steps per batch size, each way")
    ap.add_argument("--repeats", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained(args.model, device="cpu", progress=False)
    c = engine.config
    rows = [{"kind": "card", "script": "cpu_stacked_probe", "git_sha": git_sha(), "torch": torch.__version__,
             "threads": args.threads, "model": args.model or "shipped model", "dtype": str(engine.decoder.dtype),
             "hidden": c.hidden_size, "expert_intermediate": c.expert_intermediate_size,
             "experts": c.num_experts, "top_k": c.top_k, "layers": c.num_layers}]
    print(json.dumps(rows[-1]), flush=True)
    for t in (int(v) for v in args.tokens.split(",")):
        rows.append(layer_rows(engine, t, args.repeats, args.seed))
        print(json.dumps(rows[-1]), flush=True)
    for r in (int(v) for v in args.batch.split(",")):
        rows.append(steps(engine, r, args.steps, args.seed))
        print(json.dumps(rows[-1]), flush=True)
    return rows

if __name__ == "__main__":
    main()
