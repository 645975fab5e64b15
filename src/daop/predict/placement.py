"""Initial placement from calibration counts: the per-layer quota rule of DAOP (paper section 2.1)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from daop.errors import DaopError
from daop.placement.table import Placement


def quota_placement(counts: np.ndarray, moe_layers: Sequence[int], capacity: int, num_slots: int | None = None) -> Placement:
    """Place `capacity` experts on the GPU: a per-layer quota, then leftovers by global popularity.

    Paper section 2.1: with L MoE layers every layer receives q = floor(C / L) slots, filled with
    its most-activated experts (counts [num_layers, E], e.g. decode activation counts); the
    C - qL leftover slots go to the globally most-activated experts not yet placed. Ties go to
    the lower expert index within a layer, and to the lower layer, then lower expert, among the
    leftovers. Slots are numbered from 0 in that order: layer quotas in `moe_layers` order,
    then the leftovers. A capacity above L * E is clipped (every expert resident).

    `num_slots` sizes the GPU slot pool of the returned table (default: the slots used), so a
    caller can keep scratch slots after the placed ones. Non-goal: byte budgets; `capacity` is
    already a count of expert slots.
    """
    counts = np.asarray(counts, dtype=np.float64)  # float: negating unsigned counts would wrap
    if counts.ndim != 2:
        raise ValueError(f"counts must be [num_layers, num_experts], got shape {list(counts.shape)}")
    if capacity < 0:
        raise DaopError(f"GPU expert capacity must be >= 0, got {capacity}")
    num_layers, num_experts = counts.shape
    layers = list(dict.fromkeys(int(l) for l in moe_layers))
    if any(not 0 <= l < num_layers for l in layers):
        raise ValueError(f"moe_layers {layers} out of range for {num_layers} layers")
    used = min(int(capacity), len(layers) * num_experts)
    pool = used if num_slots is None else num_slots
    if pool < used:
        raise ValueError(f"num_slots {pool} is smaller than the {used} experts placed")
    placement = Placement(num_layers, num_experts, pool)
    if not layers:
        return placement
    quota = min(used // len(layers), num_experts)
    slot = 0
    for l in layers:
        # A stable sort on -count keeps lower expert indices first among equal counts.
        for e in np.argsort(-counts[l], kind="stable")[:quota]:
            placement.assign(l, int(e), slot)
            slot += 1
    leftovers = [(-counts[l, e], l, e) for l in sorted(layers) for e in range(num_experts) if not placement.resident(l, e)]
    for _, l, e in sorted(leftovers)[: used - slot]:
        placement.assign(l, e, slot)
        slot += 1
    return placement
