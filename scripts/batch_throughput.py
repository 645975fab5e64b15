#!/usr/bin/env python3
"""Throughput of the batch path (`daop.batching.Batcher`) in-process, no HTTP: N requests of random
token ids (seeded), C kept in flight by a feeder (a request joins as one finishes), greedy, EOS
ignored (every request generates --gen-tokens). Run twice on one engine, with --max-batch 1 (one
request at a time, the rest queued) and with --max-batch C; each run after a warm-up of C requests
of the same shape (its captured steps, per (rows, cache length), are captured there).

Reports per run: generated tokens/s over the run, p50/p99 time to first token (from the request's
arrival in the queue to the end of its prefill) and p50/p99 inter-token latency (a decoded token's
time is the end of its batcher step), and the ratio of the two throughputs; whether both runs gave every
request the same tokens. A card of the setup first, JSON last.

    python3 scripts/batch_throughput.py                       # the shipped model, on the CPU here
    python3 scripts/batch_throughput.py --geometry mixtral-8x7b --layers 8 --policy daop-exact --ratio 0.5
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this checkout's daop, installed or not
from daop.batching import DEFAULT_CHUNK, Batcher, Sequence  # noqa: E402
from daop.bench.geometry import synthetic_model  # noqa: E402
from daop.bench.sweep import git_sha, synthetic_engine  # noqa: E402
from daop.engine import Engine, resolve_device  # noqa: E402
from daop.runtime.setup import RuntimeOptions  # noqa: E402
from daop.sampling import SamplingParams  # noqa: E402
from daop.weights.loader import parse_dtype  # noqa: E402


def build_engine(args) -> Engine:
    """A synthetic geometry (random weights, its own routers) or a checkpoint folder (None: the shipped model)."""
    device = resolve_device(args.device)
    if args.geometry is None:
        return Engine.from_pretrained(args.model, device=device, dtype=args.dtype, progress=False,
                                      policy=args.policy, expert_ratio=args.ratio, hardware_profile=args.hardware_profile)
    dtype = parse_dtype(args.dtype, "bf16")
    _, decoder, host = synthetic_model(args.geometry, args.layers, device, dtype)
    opts = RuntimeOptions(policy=args.policy, expert_ratio=args.ratio, hardware_profile=args.hardware_profile)
    return synthetic_engine(decoder, opts, host)


def prompts(engine: Engine, count: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, engine.config.vocab_size, (length,), generator=gen).tolist() for _ in range(count)]


class Request:
    """One request's sequence and the times it was queued and got each token."""

    def __init__(self, prompt: list[int], params: SamplingParams) -> None:
        self.done = False
        self.error: Any = None
        self.seq = Sequence(prompt, params, self.emit)
        self.queued_at = 0.0
        self.token_times: list[float] = []

    def emit(self, kind: str, payload: Any) -> None:
        if kind in ("done", "cancelled", "error"):
            self.done = True
            self.error = payload if kind != "done" else None


def serve(batcher: Batcher, requests: list[Request], concurrency: int) -> float:
    """Feed the requests, `concurrency` in flight, stepping the batcher until all are done; wall seconds."""
    pending, flying = list(requests), []
    t0 = time.perf_counter()
    with torch.inference_mode():
        while pending or flying:
            while pending and len(flying) < concurrency:
                req = pending.pop(0)
                req.queued_at = time.perf_counter()
                batcher.add(req.seq)
                flying.append(req)
            batcher.step()
            now = time.perf_counter()
            for req in flying:
                if req.seq.tokens and not req.token_times:
                    req.token_times.append(req.seq.first_token_at)  # the first comes at the end of its prefill
                req.token_times += [now] * (len(req.seq.tokens) - len(req.token_times))
                if req.error is not None:
                    raise RuntimeError(f"a request failed: {req.error}")
            flying = [r for r in flying if not r.done]
    return time.perf_counter() - t0


def percentiles(values: list[float]) -> dict[str, float | None]:
    v = sorted(values)
    if not v:
        return {"p50": None, "p99": None}

    def at(q: float) -> float:
        pos = (len(v) - 1) * q
        lo = int(pos)
        hi = min(lo + 1, len(v) - 1)
        return v[lo] + (v[hi] - v[lo]) * (pos - lo)
    return {"p50": round(at(0.5) * 1000, 3), "p99": round(at(0.99) * 1000, 3)}


def measure(engine: Engine, args, max_batch: int, timed: list[list[int]], warm: list[list[int]]) -> tuple[dict, list[list[int]]]:
    """One run at `max_batch` rows (a fresh Batcher: rows of prompt + gen positions): warm-up, then
    the timed requests. Returns its row and each timed request's tokens."""
    params = SamplingParams(max_new_tokens=args.gen_tokens)
    batcher = Batcher(engine, max_batch=max_batch, max_len=args.prompt_tokens + args.gen_tokens, chunk=args.chunk)
    serve(batcher, [Request(p, params) for p in warm], args.concurrency)
    requests = [Request(p, params) for p in timed]
    wall = serve(batcher, requests, args.concurrency)
    tokens = sum(len(r.seq.tokens) for r in requests)
    gaps = [b - a for r in requests for a, b in zip(r.token_times, r.token_times[1:])]
    row = {"max_batch": max_batch, "requests": len(requests), "generated_tokens": tokens, "wall_s": round(wall, 3),
           "tokens_per_s": round(tokens / wall, 3),
           "ttft_ms": percentiles([r.token_times[0] - r.queued_at for r in requests if r.token_times]),
           "itl_ms": percentiles(gaps), "captured_steps": len(batcher.graphs)}
    return row, [list(r.seq.tokens) for r in requests]


def card(engine: Engine, args) -> dict:
    dev = engine.device
    return {"kind": "card", "script": "batch_throughput", "device": str(dev),
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "none (CPU as device)",
            "torch": torch.__version__, "git_sha": git_sha(),
            "subject": args.geometry or (args.model or "shipped model"), "layers": engine.config.num_layers,
            "experts": engine.config.num_experts, "top_k": engine.config.top_k,
            "dtype": str(engine.decoder.dtype).replace("torch.", ""), "policy": getattr(engine, "policy", args.policy),
            "expert_ratio": args.ratio, "requests": args.requests, "concurrency": args.concurrency,
            "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "chunk": args.chunk, "seed": args.seed,
            "torch_threads": torch.get_num_threads(), "eos": "ignored", "sampling": "greedy"}


def run(args) -> tuple[dict, dict[int, list[list[int]]]]:
    """The card, one row per max batch, the ratio; returns the summary and the tokens per max batch."""
    engine = build_engine(args)  # built once: both runs share its weights and expert runner
    engine.eos_ids = frozenset()
    the_card = card(engine, args)
    print(json.dumps(the_card), flush=True)
    timed = prompts(engine, args.requests, args.prompt_tokens, args.seed)
    warm = prompts(engine, args.concurrency, args.prompt_tokens, args.seed + 1)
    rows, outputs = [], {}
    for max_batch in dict.fromkeys((1, args.concurrency)):
        row, outputs[max_batch] = measure(engine, args, max_batch, timed, warm)
        rows.append(row)
        print(f"max batch {max_batch:3d}: {row['tokens_per_s']:9.2f} tok/s  TTFT p50 {row['ttft_ms']['p50']} ms "
              f"p99 {row['ttft_ms']['p99']} ms  ITL p50 {row['itl_ms']['p50']} ms p99 {row['itl_ms']['p99']} ms", flush=True)
    engine.close()
    summary = {"kind": "summary", "card": the_card, "runs": rows,
               "throughput_ratio": round(rows[-1]["tokens_per_s"] / rows[0]["tokens_per_s"], 3),
               "same_tokens": all(o == outputs[1] for o in outputs.values())}
    return summary, outputs


def parse(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--geometry", default=None, help="a synthetic geometry (e.g. mixtral-8x7b); default: a checkpoint")
    ap.add_argument("--layers", type=int, default=None, help="cut the geometry to this many layers")
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the shipped model)")
    ap.add_argument("--policy", default=None, help="placement policy (default: automatic)")
    ap.add_argument("--ratio", type=float, default=None, help="share of experts on the GPU (--expert-ratio)")
    ap.add_argument("--hardware-profile", default=None, help="a profile JSON (default: calibrate)")
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, help="default: bf16 for a geometry, the checkpoint's otherwise")
    ap.add_argument("-n", "--requests", type=int, default=16)
    ap.add_argument("-c", "--concurrency", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="prompt tokens per prefill chunk")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.prompt_tokens < 1 or args.gen_tokens < 1:
        ap.error("--requests, --concurrency, --prompt-tokens and --gen-tokens must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    summary, _ = run(parse(argv))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
