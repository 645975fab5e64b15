"""Prefill re-allocation: swap hot host experts with cold GPU experts (paper section 2.2).

Lossless: a swap only changes where an expert lives for the rest of the sequence, never the
routing. The decision is a pure function of the prompt's assignment counts of one layer.
"""
from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from fractions import Fraction

import numpy as np

from daop.placement.table import Placement


def _counts(n: Mapping[int, int] | Sequence[int] | np.ndarray, num_experts: int | None) -> list[float]:
    if isinstance(n, Mapping):
        if num_experts is None:
            raise ValueError("num_experts is required when the counts are a dict")
        dense = [0.0] * num_experts
        for e, c in n.items():
            if not 0 <= int(e) < num_experts:
                raise ValueError(f"expert {e} out of range for {num_experts} experts")
            dense[int(e)] = float(c)
        return dense
    dense = [float(c) for c in np.asarray(n).reshape(-1)]
    if num_experts is not None and len(dense) != num_experts:
        raise ValueError(f"counts have {len(dense)} entries, expected {num_experts}")
    return dense


def plan_swaps(
    n: Mapping[int, int] | Sequence[int] | np.ndarray,
    resident: Collection[int],
    swap_fraction: float = 0.5,
    swap_ratio: float = 1.05,
    num_experts: int | None = None,
    margin_z: float = 0.0,
) -> list[tuple[int, int]]:
    """(hot host expert, cold GPU expert) pairs to swap for one layer of one prompt.

    Paper section 2.2: n[e] is the number of (token, top-k slot) assignments of expert e in the
    prompt (a dict, where absent experts count 0, or an array [E]). Host-resident experts are
    ranked hottest first, GPU-resident ones coldest first, and the i-th of each are paired, for at
    most floor(swap_fraction * E) pairs. A pair swaps when n[hot] > swap_ratio * n[cold], strictly:
    at exactly the ratio nothing moves. Because one list falls and the other rises, the first pair
    that fails ends the search. Ties: among equally hot host experts, and among equally cold GPU
    experts, the lower expert index comes first. The ratio is compared as the decimal it prints
    as (1.05 is 21/20), so the boundary does not depend on binary rounding.

    margin_z > 0 also asks the counts to differ by more than noise: n[hot] - n[cold] > margin_z x
    sqrt(n[hot] + n[cold]) (the difference of two Poisson counts is that many standard deviations
    from zero). Decode re-swaps use it: their windows are a few dozen calls, where the counts of
    routing without locality differ by chance and the paper's 1.05 would swap on that noise.
    """
    if not 0.0 <= swap_fraction <= 1.0:
        raise ValueError(f"swap_fraction must be in [0, 1], got {swap_fraction}")
    if not margin_z >= 0.0:
        raise ValueError(f"margin_z must be >= 0, got {margin_z}")
    if swap_ratio < 1.0:
        raise ValueError(f"swap_ratio must be >= 1 (a swap must not bring in a colder expert), got {swap_ratio}")
    counts = _counts(n, num_experts)
    num_experts = len(counts)
    on_gpu = {int(e) for e in resident}
    hot = sorted((e for e in range(num_experts) if e not in on_gpu), key=lambda e: (-counts[e], e))
    cold = sorted((e for e in on_gpu if 0 <= e < num_experts), key=lambda e: (counts[e], e))
    ratio = Fraction(repr(float(swap_ratio)))
    limit = math.floor(swap_fraction * num_experts)
    swaps: list[tuple[int, int]] = []
    for h, c in zip(hot, cold):
        if len(swaps) >= limit or not Fraction(counts[h]) > ratio * Fraction(counts[c]):
            break
        if margin_z and not counts[h] - counts[c] > margin_z * math.sqrt(counts[h] + counts[c]):
            break
        swaps.append((h, c))
    return swaps


def apply_swaps(placement: Placement, layer_idx: int, swaps: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Move each hot expert into its cold partner's slot (in place); returns the (expert, slot) copies.

    The cold expert goes back to the host (its weights stay in the host store, so nothing is
    copied out). The returned copies, in swap order, are what an executor must bring in.
    """
    copies: list[tuple[int, int]] = []
    for hot, cold in swaps:
        if placement.resident(layer_idx, hot):
            raise ValueError(f"layer {layer_idx}: expert {hot} is already on the GPU")
        if not placement.resident(layer_idx, cold):
            raise ValueError(f"layer {layer_idx}: expert {cold} is not on the GPU")
        slot = placement.slot(layer_idx, cold)
        placement.assign(layer_idx, hot, slot)
        copies.append((hot, slot))
    return copies


class RecentCounts:
    """Each layer's routing counts over its last `window` decode calls (a ring of [window, E]), and
    whether a layer is due to swap again: every `every` calls (decode re-swaps)."""

    def __init__(self, num_layers: int, num_experts: int, window: int, every: int) -> None:
        if window < 1 or every < 1:
            raise ValueError(f"decode swaps need a window and a period of at least one call, got {window}/{every}")
        self.window, self.every = window, every
        self.ring = np.zeros((num_layers, window, num_experts), dtype=np.int64)
        self.calls = np.zeros(num_layers, dtype=np.int64)

    def add(self, layer_idx: int, counts: Mapping[int, int]) -> None:
        row = self.ring[layer_idx, self.calls[layer_idx] % self.window]
        row[:] = 0
        for e, n in counts.items():
            row[int(e)] = n
        self.calls[layer_idx] += 1

    def due(self, layer_idx: int) -> bool:
        n = int(self.calls[layer_idx])
        return n > 0 and n % self.every == 0

    def sums(self, layer_idx: int) -> np.ndarray:
        """[E] assignments per expert over the layer's last min(calls, window) calls."""
        return self.ring[layer_idx].sum(axis=0)

    def clear(self) -> None:
        self.ring[:] = 0
        self.calls[:] = 0
