#!/usr/bin/env python3
"""A CPU decode step's attention over the cache's written part (`Decoder.written_part`: the positions
up to the furthest written, rounded up to a multiple of CPU_ATTEND_POSITIONS) against the whole cache
under its mask: whether the results are the same bits, at random positions, head layouts and dtypes
(also for the unrounded written length, which does not always give them), and what a whole decode
step of the shipped model takes each way with the server's cache rows (the model's context, each
sequence reading at least MIN_CACHE positions). JSON lines on stdout, the first a card.

    python3 scripts/cpu_attend_probe.py [--batch 1,8] [--steps 40]

The step times alternate the two ways step by step on one engine, so a drift of the machine's speed
falls on both; medians are reported.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path
from typing import Callable

import torch

import daop.model.decoder as decoder_module
from daop.model.decoder import written_length
from daop.bench.sweep import git_sha
from daop.engine import Engine
from daop.model.layers import attend, decode_mask

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling batch_steps module, also when loaded by path
from batch_steps import alternate, prefilled_batch, same_tokens  # noqa: E402


def same_bits(trials: int, seed: int) -> list[dict]:
    """attend over the first S positions against all 2048, positions drawn at random below 1500."""
    gen = torch.Generator().manual_seed(seed)
    block = decoder_module.CPU_ATTEND_POSITIONS or 64
    counts: dict = collections.Counter()
    for dtype in (torch.bfloat16, torch.float32):
        for rows, heads, groups in ((8, 4, 2), (1, 4, 2), (3, 8, 8)):
            keys, values = (torch.randn(rows, groups, 2048, 32, generator=gen).to(dtype) for _ in range(2))
            q = torch.randn(rows, heads, 1, 32, generator=gen).to(dtype)
            for _ in range(trials):
                pos = torch.randint(0, 1500, (rows,), generator=gen)
                whole = attend(q, keys, values, decode_mask(pos, 2048), 32 ** -0.5, heads != groups)
                for name, length in (("rounded", written_length(pos, block)), ("written", written_length(pos, 1))):
                    part = attend(q, keys[:, :, :length], values[:, :, :length], decode_mask(pos, length), 32 ** -0.5,
                                  heads != groups)
                    counts[(str(dtype), name, bool(torch.equal(part, whole)))] += 1
    return [{"kind": "bits", "dtype": d, "length": n, "equal": e, "cases": c} for (d, n, e), c in sorted(counts.items())]


def steps(engine: Engine, rows: int, count: int, seed: int) -> dict:
    """Decode steps of `rows` sequences of 10 prompt tokens in the server's cache (max_len: the
    model's context), attending over the written part and over the whole row, alternating."""
    on = decoder_module.CPU_ATTEND_POSITIONS

    def block(value: int) -> Callable[[], None]:
        return lambda: setattr(decoder_module, "CPU_ATTEND_POSITIONS", value)

    try:
        part, whole = (prefilled_batch(engine, rows, count + 8, seed) for _ in range(2))
        ms = alternate({"written_part": (part, block(on)), "whole_cache": (whole, block(0))}, count)
    finally:
        decoder_module.CPU_ATTEND_POSITIONS = on
    a, b = ms["whole_cache"], ms["written_part"]
    return {"kind": "step", "rows": rows, "steps": count, "row_positions": part.decoding[0].length,
            "whole_cache_ms": round(a, 3), "written_part_ms": round(b, 3), "speedup": round(a / b, 3),
            "same_tokens": same_tokens(part, whole)}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the shipped model)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--trials", type=int, default=40, help="random position sets per head layout and dtype")
    ap.add_argument("--batch", default="1,2,4,8", help="decode batch sizes of the step timing")
    ap.add_argument("--steps", type=int, default=40, help="steps per batch size, each way")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained(args.model, device="cpu", progress=False)
    rows = [{"kind": "card", "script": "cpu_attend_probe", "git_sha": git_sha(), "torch": torch.__version__,
             "threads": args.threads, "model": args.model or "shipped model", "dtype": str(engine.decoder.dtype),
             "block": decoder_module.CPU_ATTEND_POSITIONS, "context": engine.config.context_length}]
    rows += same_bits(args.trials, args.seed)
    for r in (int(v) for v in args.batch.split(",")):
        rows.append(steps(engine, r, args.steps, args.seed))
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows

if __name__ == "__main__":
    main()
