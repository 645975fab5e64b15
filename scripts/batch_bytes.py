#!/usr/bin/env python3
"""What the steps of a `daop bench` run read from GPU memory: for each point of a JSONL of a
geometry's run, the bytes per decode step (its expert calls x the card's expert size, plus the
dense weights every step reads: attention, routers, LM head), the rate that makes at the measured
step time, and the tokens/s each batch could reach over batch 1 if every step read at one speed.
Prints one JSON line.

    python3 scripts/batch_bytes.py benchmarks/results/h200-mixtral-8x7b-8layers-gpu-batch-calls.jsonl \\
        --geometry mixtral-8x7b --layers 8
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this checkout's daop, installed or not
from daop.bench.geometry import geometry_config  # noqa: E402


def dense_bytes(config, dtype: torch.dtype) -> int:
    """Weights a decode step reads besides the routed experts (norms and embedding rows left out)."""
    c = config
    attention = c.hidden_size * 2 * (c.num_heads + c.num_kv_heads) * c.head_dim  # q and o, k and v
    router = c.num_experts * c.hidden_size
    size = torch.empty((), dtype=dtype).element_size()
    return (c.num_layers * (attention + router) + c.vocab_size * c.hidden_size) * size


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", help="a bench JSONL with a card and points that have expert_calls_per_step")
    ap.add_argument("--geometry", required=True)
    ap.add_argument("--layers", type=int, default=None)
    args = ap.parse_args(argv)
    lines = [json.loads(line) for line in open(args.rows) if line.strip()]
    card = next(r for r in lines if r.get("kind") == "card")
    config, _ = geometry_config(args.geometry, args.layers)
    dense = dense_bytes(config, getattr(torch, card["dtype"]))
    points = []
    for p in sorted((r for r in lines if r.get("kind") == "point"), key=lambda r: r["batch"]):
        gb = (p["expert_calls_per_step"] * card["expert_bytes"] + dense) / 1e9
        points.append({"policy": p["policy"], "batch": p["batch"], "gb_per_step": round(gb, 2),
                       "tb_per_s": round(gb / p["decode_ms_per_token"], 2), "tokens_per_s": p["decode_tokens_per_s"]})
    first = points[0]
    for q in points:
        q["tokens_per_s_over_first"] = round(q["tokens_per_s"] / first["tokens_per_s"], 2)
        q["at_one_speed_over_first"] = round(q["batch"] / first["batch"] * first["gb_per_step"] / q["gb_per_step"], 2)
    out = {"kind": "batch_bytes", "rows": args.rows, "dense_gb": round(dense / 1e9, 3), "points": points}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
