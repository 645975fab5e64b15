#!/usr/bin/env python3
"""Variants of the runners' settings against each other in one process: `daop bench` points on one
subject (a synthetic geometry is built once), each variant a set of environment variables that a
runner reads when it is built (DAOP_DECODE_SWAPS, DAOP_PLACE_ON_PROMPT, DAOP_LATE_PREDICT,
DAOP_EARLY_SUBMIT, DAOP_LAUNCH_FIRST, DAOP_TWO_AHEAD, DAOP_SPLIT_EXPERTS, DAOP_SIDE_BY_SIDE,
DAOP_DECODE_SCRATCH, DAOP_SCRATCH_SLOTS, DAOP_HANDOFF; not those
read at import, such as DAOP_ROUTING_WAIT).

The H200 hosts drift by 10-20 % within minutes, so the variants run interleaved: per round in the
given order, then reversed (a, b, c, c, b, a), every ratio and policy of the bench arguments per
variant, after a warm-up point that is not kept. Every point goes to --output with `variant` and `run` added; a summary row per (variant,
policy, ratio) gives the runs' decode ms per token, their median, and the median over the first
variant's (above 1: slower than the first). A table is printed, JSON last.

    python3 scripts/variant_bench.py --variant head= --variant z0=DAOP_DECODE_SWAPS=32/8/0 \\
        --variant off=DAOP_DECODE_SWAPS=0 --rounds 1 --output v.jsonl -- --geometry mixtral-8x7b --layers 8 \\
        --policies daop-exact --ratios 0.5,0.25 --prompts 6 --trace benchmarks/traces/daop-moe-mini-heldout.npz
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this checkout's daop, installed or not
from daop.bench.sweep import HEADER, policy_points, prepare  # noqa: E402
from daop.cli import build_parser, parse_bench_lists  # noqa: E402


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """LABEL=[NAME=VALUE[,NAME=VALUE...]] -> (label, env)."""
    label, sep, rest = spec.partition("=")
    if not sep or not label:
        raise SystemExit(f"--variant {spec!r}: expected LABEL=[NAME=VALUE,...]")
    env = {}
    for part in filter(None, rest.split(",")):
        name, eq, value = part.partition("=")
        if not eq or not name.startswith("DAOP_"):
            raise SystemExit(f"--variant {spec!r}: {part!r} is not DAOP_NAME=VALUE")
        env[name] = value
    return label, env


def order(labels: list[str], rounds: int) -> list[str]:
    """Each round the labels in order, then reversed: each variant runs early as often as late."""
    return (labels + labels[::-1]) * rounds


def summarize(points: list[dict], labels: list[str]) -> list[dict]:
    groups: dict[tuple, list[float]] = {}
    for p in points:
        groups.setdefault((p["variant"], p["policy"], p["budget_ratio"]), []).append(p["decode_ms_per_token"])
    out = []
    for (label, policy, ratio), values in groups.items():
        base = groups.get((labels[0], policy, ratio))
        med = statistics.median(values)
        out.append({"kind": "variant_summary", "variant": label, "policy": policy, "ratio": ratio, "decode_ms_per_token": values,
                    "median": round(med, 3),
                    "over_first": round(med / statistics.median(base), 3) if base else None})
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, bench_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", required=True, help="LABEL=[DAOP_NAME=VALUE,...] (repeat; the first is the base)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of the variants in order then reversed (default 1)")
    ap.add_argument("--output", required=True, help="JSONL: the card, every point, the summary rows")
    ap.add_argument("--warmup", type=int, default=1,
                    help="points of the first variant, first policy and ratio, run first and not kept (default 1): "
                         "the process's first engine runs slower")
    args = ap.parse_args(ours)
    variants = dict(parse_variant(v) for v in args.variant)
    labels = list(variants)
    if len(labels) != len(args.variant):
        ap.error("variant labels must differ")
    bench = build_parser().parse_args(["bench", *bench_args])
    if bench.output:
        ap.error("give --output before --: this script writes the rows")
    parse_bench_lists(bench)
    names = {name for env in variants.values() for name in env}
    saved = {name: os.environ.get(name) for name in names}
    out = open(args.output, "a")

    def emit(row: dict) -> None:
        out.write(json.dumps(row) + "\n")
        out.flush()

    setup = prepare(bench)
    emit({"kind": "variants", "variants": variants, "order": order(labels, args.rounds), "bench_args": bench_args})
    emit(setup.card)
    points = []
    print(HEADER)
    for _ in range(args.warmup):
        print(f"-- warm-up: {labels[0]}, not kept", flush=True)
        os.environ.update(variants[labels[0]])
        policy_points(setup, bench, bench.policies[0], bench.ratios[0], lambda row: None)
    for run, label in enumerate(order(labels, args.rounds)):
        for name in names:  # every variant starts from the environment the script was given
            if saved[name] is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = saved[name]
        os.environ.update(variants[label])
        print(f"-- {label} (run {run}): {variants[label] or 'as given'}", flush=True)
        for ratio in bench.ratios:
            for policy in bench.policies:
                for p in policy_points(setup, bench, policy, ratio, lambda row: None):
                    p.update(variant=label, run=run)
                    points.append(p)
                    emit(p)
    rows = summarize(points, labels)
    for row in rows:
        emit(row)
    out.close()
    print(f"{'variant':12} {'policy':12} {'ratio':>6} {'median ms':>10} {'x first':>8}  runs")
    for row in rows:
        print(f"{row['variant']:12} {row['policy']:12} {row['ratio']:6.3f} {row['median']:10.2f} {row['over_first'] or 0:8.3f}  "
              f"{row['decode_ms_per_token']}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
