#!/usr/bin/env python3
"""Old against new in one call: `daop bench` run alternately on two versions of the source, ABBA order.

The H200 hosts drift by 10-20 % within minutes, so a comparison is only worth quoting when both
versions ran in one call, interleaved: old, new, new, old (and again, with --rounds 2). Each run is
`python3 -m daop bench <bench args>` with PYTHONPATH at that version's `src` (extract the old one
with `git archive OLD src | tar -x -C .bench-old`) and DAOP_GIT_SHA naming it, so its card says
which commit ran. --old-env / --new-env add environment settings to one side's processes, so one
tree can also be run against itself under two settings read at process start (e.g. the CPU
kernel's OpenMP spin: --old src --new-env GOMP_SPINCOUNT=10000000). Every card and point goes to
--output with `side` and `run` added; a summary row gives, per point (policy, ratio, batch, lengths, expert format), each side's runs and median decode
ms/token and TTFT, and old/new ratios (above 1: new is faster). A table is printed, JSON last.

    python3 scripts/ab_bench.py --old .bench-old/src --old-sha 0a35f71 --new-sha 5747051 --rounds 2 \\
        --output ab.jsonl -- --geometry mixtral-8x7b --layers 8 --policies static,daop-exact --ratios 0.5 --prompts 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEY = ("policy", "expert_ratio", "batch", "prompt_tokens", "gen_tokens", "expert_format")


def order(rounds: int) -> list[str]:
    """old, new, new, old per round: each side runs first as often as last."""
    return ["old", "new", "new", "old"] * rounds


def summarize(points: list[dict]) -> list[dict]:
    """Per point key: each side's decode ms/token and TTFT (in run order), medians, old/new ratios."""
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for p in points:
        groups.setdefault(tuple(p.get(k) for k in KEY), {"old": [], "new": []})[p["side"]].append(p)
    out = []
    for key, sides in groups.items():
        row = dict(zip(KEY, key))
        for metric in ("decode_ms_per_token", "ttft_ms"):
            for side in ("old", "new"):
                values = [p[metric] for p in sides[side] if p.get(metric) is not None]
                row[f"{metric}_{side}"] = values
                row[f"{metric}_{side}_median"] = round(statistics.median(values), 3) if values else None
            old, new = row[f"{metric}_old_median"], row[f"{metric}_new_median"]
            row[f"{metric}_old_over_new"] = round(old / new, 3) if old and new else None
        out.append(row)
    return out


def parse_env(items: list[str], flag: str) -> dict[str, str]:
    """NAME=VALUE settings (repeatable flag) for one side's processes."""
    out = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not name or "=" in name:
            raise SystemExit(f"{flag} {item!r}: expected NAME=VALUE")
        out[name] = value
    return out


def run_side(side: str, src: Path, sha: str | None, extra_env: dict[str, str], bench_args: list[str], run: int) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(src), **extra_env)
    if sha:
        env["DAOP_GIT_SHA"] = sha
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.jsonl"
        proc = subprocess.run([sys.executable, "-m", "daop", "bench", *bench_args, "--output", str(out)], env=env,
                              cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{side} run {run} failed ({src}): {(proc.stderr or proc.stdout).strip()[-800:]}")
        rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return [{**r, "side": side, "run": run} for r in rows if r.get("kind") in ("card", "point")]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, bench_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, type=Path, help="the old version's src folder")
    ap.add_argument("--new", type=Path, default=ROOT / "src", help="the new version's src folder (default: this checkout's)")
    ap.add_argument("--old-sha", default=None)
    ap.add_argument("--new-sha", default=None)
    ap.add_argument("--old-env", action="append", default=[], metavar="NAME=VALUE",
                    help="an environment setting for the old side's processes (repeatable); with --old src, one "
                         "source tree can be run against itself under two settings a process reads at start")
    ap.add_argument("--new-env", action="append", default=[], metavar="NAME=VALUE", help="the same for the new side")
    ap.add_argument("--rounds", type=int, default=1, help="old/new/new/old rounds (default 1: four runs)")
    ap.add_argument("--output", type=Path, required=True, help="JSONL: a run row, every card and point, the summary")
    args = ap.parse_args(ours)
    if "--output" in bench_args:
        ap.error("give --output before --, for this script; the bench's rows are collected from each run")
    for side in ("old", "new"):
        if not (getattr(args, side) / "daop" / "__init__.py").exists():
            ap.error(f"--{side} {getattr(args, side)} holds no daop package")
    envs = {"old": parse_env(args.old_env, "--old-env"), "new": parse_env(args.new_env, "--new-env")}
    srcs = {side: (getattr(args, side).resolve(), getattr(args, f"{side}_sha"), envs[side]) for side in ("old", "new")}
    rows: list[dict] = [{"kind": "run", "command": "python3 scripts/ab_bench.py " + " ".join(argv),
                         "old_sha": args.old_sha, "new_sha": args.new_sha, "old_env": envs["old"], "new_env": envs["new"],
                         "order": order(args.rounds)}]
    for run, side in enumerate(order(args.rounds)):
        got = run_side(side, *srcs[side], bench_args, run)
        rows += got
        for p in (r for r in got if r["kind"] == "point"):
            print(f"run {run} {side:3} {p['policy']:10} {p['expert_ratio']:5} b{p['batch']} "
                  f"decode {p['decode_ms_per_token']} ms  ttft {p['ttft_ms']} ms", flush=True)
    summary = summarize([r for r in rows if r["kind"] == "point"])
    rows.append({"kind": "ab_summary", "points": summary})
    args.output.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print("| policy | ratio | batch | decode ms old | decode ms new | old/new | TTFT ms old | TTFT ms new |")
    print("|---|---|---|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['policy']} | {s['expert_ratio']} | {s['batch']} | {s['decode_ms_per_token_old']} | "
              f"{s['decode_ms_per_token_new']} | {s['decode_ms_per_token_old_over_new']} | {s['ttft_ms_old']} | {s['ttft_ms_new']} |")
    print(json.dumps({"kind": "ab_summary", "points": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
