#!/usr/bin/env python3
"""One Mixtral-sized int8 expert on the CPU: daop's C kernel (`cpu_expert.expert` with scales) against
torch's int8 weight-only products (`daop.quant.expert_forward`), interleaved per round, at 1-8 tokens.
Prints a table and writes JSON lines (--output): per token count, each side's median ms over the rounds,
GB/s of int8 weights read, and the share of the kernel's outputs equal to torch's. A small expert
(--hidden 1024 --inter 1024: 3 MB of codes) stays in the CPU's cache, so it times the arithmetic.

    python3 scripts/cpu_int8_probe.py --threads 2 --rounds 15 --output cpu-int8.jsonl
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
import torch  # noqa: E402

from daop.kernels import cpu_expert  # noqa: E402
from daop.quant import ExpertFormat, expert_forward  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--tokens", default="1,2,4,8")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--output", default=None)
    args = ap.parse_args(argv)
    if not cpu_expert.available():
        raise SystemExit("the CPU expert kernel is not available here")
    torch.set_num_threads(args.threads)
    D, I = args.hidden, args.inter
    g = torch.Generator().manual_seed(0)
    w = ExpertFormat("int8", torch.bfloat16).from_float(torch.randn(2 * I, D, generator=g) * 0.02,
                                                        torch.randn(D, I, generator=g) * 0.02)
    weight_bytes = w[0].numel() + w[2].numel()
    rows = []
    for n in [int(t) for t in args.tokens.split(",")]:
        x = torch.randn(n, D, generator=g).bfloat16()
        sides = {"kernel": lambda: cpu_expert.expert(x, w[0], w[2], args.threads, scales=(w[1], w[3])),
                 "torch": lambda: expert_forward(x, list(w))}
        times = {k: [] for k in sides}
        for f in sides.values():
            f()  # warm-up
        for r in range(args.rounds):
            for k in (sides if r % 2 == 0 else reversed(list(sides))):
                t0 = time.perf_counter()
                sides[k]()
                times[k].append((time.perf_counter() - t0) * 1e3)
        ms = {k: statistics.median(v) for k, v in times.items()}
        equal = (sides["kernel"]() == sides["torch"]()).float().mean().item()
        row = {"kind": "point", "tokens": n, "hidden": D, "inter": I, "threads": args.threads, "rounds": args.rounds,
               "kernel_ms": round(ms["kernel"], 3), "torch_ms": round(ms["torch"], 3),
               "kernel_gbps": round(weight_bytes / ms["kernel"] / 1e6, 1), "torch_gbps": round(weight_bytes / ms["torch"] / 1e6, 1),
               "torch_over_kernel": round(ms["torch"] / ms["kernel"], 3), "equal_share": round(equal, 4)}
        rows.append(row)
        print(f"{n} tokens: kernel {row['kernel_ms']:.2f} ms ({row['kernel_gbps']} GB/s), torch {row['torch_ms']:.2f} ms "
              f"({row['torch_gbps']} GB/s), torch/kernel {row['torch_over_kernel']:.2f}, equal {row['equal_share']:.3f}")
    if args.output:
        card = {"kind": "card", "cpu": platform.processor() or platform.machine(), "isa": cpu_expert.isa(),
                "torch": torch.__version__, "command": " ".join(sys.argv)}
        with open(args.output, "a") as f:
            for r in [card, *rows]:
                f.write(json.dumps(r) + "\n")
    return rows


if __name__ == "__main__":
    main()
