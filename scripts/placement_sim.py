#!/usr/bin/env python3
"""How many decode picks a placement keeps on the GPU, replayed offline on a routing trace.

For each recorded prompt of a trace (`daop.bench.trace`: the true experts of every layer and
position), a GPU budget of `ratio` x (layers x experts) slots less the scratch slots is placed, then
the prompt's decode steps are replayed and every (token, pick) counted as a hit when its expert is
resident. No weights, no GPU: this isolates the placement from the scheduler. Variants:

- `calibrated+swaps`: what `daop-exact` does (quota placement on uniform counts, then the prompt's
  prefill swaps, paper 2.1-2.2);
- `quota-on-prompt`: the quota placement computed from the prompt's own counts (slots move
  between layers too), as DAOP_PLACE_ON_PROMPT=1 places at decode start (`copies at decode start`:
  the experts it has resident that the prefill's swaps did not); `quota-on-prompt decode window
  N/M z=Z`: that, then decode re-swaps;
- `window N/M`: the swaps, then every M decode steps swaps again on the last N steps' counts (a
  swap is a whole expert's copy: `swaps/token` says how many);
- `decode window N/M`: the same on decode steps only, as the DAOP runner's decode re-swaps
  (DAOP_DECODE_SWAPS=N/M) count them; `z=Z` adds the swap rule's noise margin (`plan_swaps`'s
  margin_z), as `DaopConfig.decode_swap_z` does;
- `oracle`: the quota placement on the sequence's own decode counts (known only afterwards: the
  most a fixed per-sequence placement could keep).

    python3 scripts/placement_sim.py --trace benchmarks/traces/daop-moe-mini-heldout.npz --layers 8
    python3 scripts/placement_sim.py --iid 1.0   # routing without locality (see --iid)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this checkout's daop, installed or not
from daop.predict.placement import quota_placement  # noqa: E402
from daop.predict.swaps import apply_swaps, plan_swaps  # noqa: E402


def prompts(path: str) -> list[tuple[np.ndarray, int]]:
    data = np.load(path)
    keys = sorted({k.split("_")[0] for k in data.files if k.endswith("_ids")}, key=int)
    return [(data[f"{k}_ids"], int(data[f"{k}_prompt_len"])) for k in keys]


def counts_of(ids: np.ndarray, layers: list[int], lo: int, hi: int, num_experts: int) -> np.ndarray:
    out = np.zeros((ids.shape[0], num_experts))
    for l in layers:
        out[l] = np.bincount(ids[l, lo:hi].reshape(-1), minlength=num_experts)
    return out


def iid_prompts(alpha: float, n: int = 10, layers: int = 8, experts: int = 8, top_k: int = 2, prompt_len: int = 256,
                gen: int = 64, seed: int = 0) -> list[tuple[np.ndarray, int]]:
    """Routing without locality: each layer has a fixed popularity (Dirichlet(alpha) over its experts,
    one draw per prompt) and every token picks top_k distinct experts from it independently of the
    tokens before, as a random router on unrelated states roughly does."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = np.zeros((layers, prompt_len + gen, top_k), dtype=np.int64)
        for layer in range(layers):
            p = rng.dirichlet([alpha] * experts)
            for t in range(prompt_len + gen):
                ids[layer, t] = rng.choice(experts, size=top_k, replace=False, p=p)
        out.append((ids, prompt_len))
    return out


def replay(ids: np.ndarray, prompt_len: int, layers: list[int], capacity: int, variant: str,
           window: int = 0, every: int = 0, z: float = 0.0) -> tuple[int, int, int]:
    """(hits, picks, swaps, copies at decode start) over the decode steps of one recorded prompt."""
    num_experts = int(ids.max()) + 1
    prompt = counts_of(ids, layers, 0, prompt_len, num_experts)
    swapped = quota_placement(np.ones_like(prompt), layers, capacity, num_slots=capacity)
    for l in layers:
        apply_swaps(swapped, l, plan_swaps(prompt[l], swapped.resident_experts(l)))
    if variant == "oracle":
        placement = quota_placement(counts_of(ids, layers, prompt_len, ids.shape[1], num_experts), layers, capacity,
                                    num_slots=capacity)
    elif variant.startswith("quota-on-prompt"):
        placement = quota_placement(prompt, layers, capacity, num_slots=capacity)
    else:
        placement = swapped
    # experts the placement has resident that the prefill's swaps did not: copied at decode start
    placed = sum(not swapped.resident(l, e) for l in layers for e in placement.resident_experts(l))
    hits = picks = swaps = 0
    for t in range(prompt_len, ids.shape[1]):
        if variant.endswith("window") and t > prompt_len and (t - prompt_len) % every == 0:
            first = prompt_len if variant.endswith("decode window") else 0
            recent = counts_of(ids, layers, max(first, t - window), t, num_experts)
            for l in layers:
                moved = plan_swaps(recent[l], placement.resident_experts(l), margin_z=z)
                swaps += len(apply_swaps(placement, l, moved))
        for l in layers:
            for e in ids[l, t]:
                picks += 1
                hits += placement.resident(l, int(e))
    return hits, picks, swaps, placed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace")
    source.add_argument("--iid", type=float, metavar="ALPHA",
                        help="replay routing without locality instead (iid_prompts, Dirichlet(ALPHA) popularity per layer)")
    ap.add_argument("--layers", type=int, default=8, help="the first N layers of the trace (the bench's depth cut)")
    ap.add_argument("--ratios", default="0.5,0.25")
    ap.add_argument("--scratch", type=int, default=4, help="slots kept for copies (daop-exact: 2 x top-k)")
    args = ap.parse_args()
    recorded = prompts(args.trace) if args.trace else iid_prompts(args.iid, layers=args.layers)
    layers = list(range(args.layers))
    num_experts = int(max(ids.max() for ids, _ in recorded)) + 1
    variants = [("calibrated+swaps", 0, 0, 0.0), ("quota-on-prompt", 0, 0, 0.0), ("window", 16, 8, 0.0),
                ("window", 32, 8, 0.0), ("decode window", 32, 8, 0.0), ("decode window", 16, 8, 0.0),
                ("decode window", 32, 4, 0.0), ("decode window", 32, 8, 1.0), ("decode window", 32, 8, 1.5),
                ("decode window", 32, 8, 2.0), ("decode window", 32, 8, 3.0),
                ("quota-on-prompt decode window", 32, 8, 1.0), ("oracle", 0, 0, 0.0)]
    for ratio in (float(r) for r in args.ratios.split(",")):
        capacity = int(round(ratio * args.layers * num_experts)) - args.scratch
        for variant, window, every, z in variants:
            hits = picks = swaps = steps = placed = 0
            for ids, prompt_len in recorded:
                h, p, s, c = replay(ids, prompt_len, layers, capacity, variant, window, every, z)
                hits, picks, swaps, placed = hits + h, picks + p, swaps + s, placed + c
                steps += ids.shape[1] - prompt_len
            name = (f"{variant} {window}/{every}" + (f" z={z:g}" if z else "")) if "window" in variant else variant
            print(json.dumps({"trace": args.trace or f"iid alpha={args.iid:g}", "layers": args.layers, "ratio": ratio, "resident_slots": capacity,
                              "variant": name, "hit_rate": round(hits / picks, 4),
                              "host_picks_per_token": round((picks - hits) / steps, 3),
                              "swaps_per_token": round(swaps / steps, 3),
                              "copies_at_decode_start_per_prompt": round(placed / len(recorded), 2)}))


if __name__ == "__main__":
    main()
