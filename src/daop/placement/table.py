"""The placement table: [layer, expert] -> GPU slot or host (-1). Placement is data, never inferred."""
from __future__ import annotations

import numpy as np

HOST = -1


class Placement:
    """Explicit map from (layer, expert) to a slot of the GPU pool; each slot holds at most one expert."""

    def __init__(self, num_layers: int, num_experts: int, num_slots: int) -> None:
        self.table = np.full((num_layers, num_experts), HOST, dtype=np.int64)
        self.owner = np.full((num_slots, 2), HOST, dtype=np.int64)  # slot -> (layer, expert)
        self.num_slots = num_slots
        self._resident: dict[int, list[int]] = {}  # layer -> resident experts, dropped on every assign

    def slot(self, layer_idx: int, expert_idx: int) -> int:
        return int(self.table[layer_idx, expert_idx])

    def resident(self, layer_idx: int, expert_idx: int) -> bool:
        return self.table[layer_idx, expert_idx] != HOST

    def assign(self, layer_idx: int, expert_idx: int, slot: int) -> tuple[int, int] | None:
        """Put an expert into a slot; returns the (layer, expert) evicted from it, if any."""
        evicted = None
        self._resident.clear()
        prev_layer, prev_expert = (int(x) for x in self.owner[slot])
        if prev_layer != HOST:
            self.table[prev_layer, prev_expert] = HOST
            evicted = (prev_layer, prev_expert)
        old = self.table[layer_idx, expert_idx]
        if old != HOST:
            self.owner[old] = HOST
        self.table[layer_idx, expert_idx] = slot
        self.owner[slot] = (layer_idx, expert_idx)
        return evicted

    def release(self, slot: int) -> tuple[int, int] | None:
        """Empty a slot: its expert goes back to the host; returns that (layer, expert), if any."""
        layer_idx, expert_idx = (int(x) for x in self.owner[slot])
        if layer_idx == HOST:
            return None
        self._resident.clear()
        self.table[layer_idx, expert_idx] = HOST
        self.owner[slot] = HOST
        return layer_idx, expert_idx

    def resident_experts(self, layer_idx: int) -> list[int]:
        """The layer's GPU-resident experts, ascending (a new list: callers may keep or change it)."""
        found = self._resident.get(layer_idx)
        if found is None:
            found = self._resident[layer_idx] = [int(e) for e in np.flatnonzero(self.table[layer_idx] != HOST)]
        return list(found)

    def copy(self) -> "Placement":
        other = Placement(*self.table.shape, self.num_slots)
        other.table[:] = self.table
        other.owner[:] = self.owner
        return other

    def check(self) -> None:
        """Invariant: table and owner agree, and no slot is used twice."""
        used = self.table[self.table != HOST]
        assert len(used) == len(set(used.tolist())), "a slot holds two experts"
        for layer_idx, expert_idx in zip(*np.nonzero(self.table != HOST)):
            assert tuple(self.owner[self.table[layer_idx, expert_idx]]) == (layer_idx, expert_idx)
