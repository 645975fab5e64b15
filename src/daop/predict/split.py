"""Split one layer's missing experts between CPU compute and copy-then-GPU (paper section 2.3).

The CPU computes its experts one after another with all its threads; the GPU computes resident
experts, then each copied expert once its weights have arrived over the copy stream (copies run
back to back, overlapped with GPU compute). Both sides run in parallel, so the layer takes
max(CPU side, GPU side): the makespan. `makespan_split` minimises it in polynomial time;
`sum_of_costs_split` is the paper's per-expert threshold rule, kept as the faithful variant.
Non-goals: executing anything, or enumerating all 2^E assignments as the reference code does.
"""
from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol


class ExpertCosts(Protocol):
    """What the split needs from a cost model (daop.placement.cost.CostModel provides it)."""

    def cpu_ms(self, n: int) -> float: ...

    def gpu_ms(self, n: int) -> float: ...

    def copy_ms(self) -> float: ...


@dataclass(frozen=True)
class SplitPlan:
    """Where each expert of one layer call runs, with the predicted times in milliseconds."""

    gpu: tuple[int, ...]  # resident, computed in place
    cpu: tuple[int, ...]
    copy: tuple[int, ...]  # copied in this order, each computed on the GPU after its copy
    cpu_side_ms: float
    gpu_side_ms: float
    makespan_ms: float  # max of the two sides: they run in parallel


class _Layer:
    """Per-expert costs of one layer call and the makespan of any copy set. cpu_start and
    copy_start: when each channel is free of work queued before this call (ms from now); the
    copies land one after another from copy_start, the CPU's experts run from cpu_start."""

    def __init__(self, counts: Mapping[int, int], resident: Collection[int], cost: ExpertCosts,
                 cpu_start: float = 0.0, copy_start: float = 0.0) -> None:
        self.cpu_start, self.copy_start = max(0.0, float(cpu_start)), max(0.0, float(copy_start))
        needed = sorted(int(e) for e, n in counts.items() if n > 0)
        on_gpu = {int(e) for e in resident}
        self.gpu = tuple(e for e in needed if e in on_gpu)
        self.misses = tuple(e for e in needed if e not in on_gpu)
        self.cpu_ms = {e: float(cost.cpu_ms(int(counts[e]))) for e in self.misses}
        self.gpu_ms = {e: float(cost.gpu_ms(int(counts[e]))) for e in needed}
        self.copy_ms = float(cost.copy_ms())
        self.resident_ms = sum((self.gpu_ms[e] for e in self.gpu), 0.0)

    def copy_order(self, copied: Iterable[int]) -> tuple[int, ...]:
        # Equal copy times: longest GPU compute first is optimal for this two-stage pipeline
        # (Johnson's rule); ties by expert index keep the plan deterministic.
        return tuple(sorted(copied, key=lambda e: (-self.gpu_ms[e], e)))

    def gpu_side(self, copied: Iterable[int]) -> float:
        t = self.resident_ms
        for i, e in enumerate(self.copy_order(copied)):
            t = max(t, self.copy_start + (i + 1) * self.copy_ms) + self.gpu_ms[e]
        return t

    def cpu_side(self, copied: Collection[int]) -> float:
        work = [self.cpu_ms[e] for e in self.misses if e not in copied]
        return self.cpu_start + sum(work, 0.0) if work else 0.0

    def makespan(self, copied: Collection[int]) -> float:
        return max(self.cpu_side(copied), self.gpu_side(copied))

    def plan(self, copied: Collection[int]) -> SplitPlan:
        cpu = tuple(e for e in self.misses if e not in copied)
        cpu_side, gpu_side = self.cpu_side(copied), self.gpu_side(copied)
        return SplitPlan(self.gpu, cpu, self.copy_order(copied), cpu_side, gpu_side, max(cpu_side, gpu_side))


def _copy_limit(layer: _Layer, max_copies: int | None) -> int:
    if max_copies is not None and max_copies < 0:
        raise ValueError(f"max_copies must be >= 0, got {max_copies}")
    return len(layer.misses) if max_copies is None else min(max_copies, len(layer.misses))


def _threshold_set(layer: _Layer, limit: int) -> frozenset[int]:
    """The per-expert rule: copy when copy + GPU beats CPU, biggest saving first up to the limit."""
    saving = {e: layer.cpu_ms[e] - (layer.copy_ms + layer.gpu_ms[e]) for e in layer.misses}
    worth = sorted((e for e in layer.misses if saving[e] > 0), key=lambda e: (-saving[e], e))
    return frozenset(worth[:limit])


def _greedy_set(layer: _Layer, limit: int) -> frozenset[int]:
    """LPT: largest CPU job first, each to the side whose finish time stays lower (CPU on ties)."""
    copied: set[int] = set()
    cpu_side, gpu_side = 0.0, layer.resident_ms
    for e in sorted(layer.misses, key=lambda e: (-layer.cpu_ms[e], e)):
        gpu_if = layer.gpu_side(copied | {e}) if len(copied) < limit else float("inf")
        cpu_if = (cpu_side or layer.cpu_start) + layer.cpu_ms[e]
        if max(cpu_side, gpu_if) < max(cpu_if, gpu_side):
            copied.add(e)
            gpu_side = gpu_if
        else:
            cpu_side = cpu_if
    return frozenset(copied)


def _prefix_sets(layer: _Layer, limit: int) -> list[frozenset[int]]:
    """For every copy count m, the m experts the CPU would spend longest on (ties: cheaper GPU first)."""
    ranked = sorted(layer.misses, key=lambda e: (-layer.cpu_ms[e], layer.gpu_ms[e], e))
    return [frozenset(ranked[:m]) for m in range(limit + 1)]


def _improve(layer: _Layer, copied: frozenset[int], limit: int) -> frozenset[int]:
    """Single-expert moves while one strictly lowers the makespan (at most one pass per miss)."""
    best = layer.makespan(copied)
    for _ in range(len(layer.misses)):
        moves = [copied - {e} if e in copied else copied | {e} for e in layer.misses]
        scored = [(layer.makespan(m), len(m), i) for i, m in enumerate(moves) if len(m) <= limit]
        if not scored or min(scored)[0] >= best:
            break
        best, _, i = min(scored)
        copied = moves[i]
    return copied


def makespan_split(counts: Mapping[int, int], resident: Collection[int], cost: ExpertCosts,
                   max_copies: int | None = None, cpu_start: float = 0.0, copy_start: float = 0.0) -> SplitPlan:
    """Serve a layer's missing experts so that max(CPU side, GPU side with copies) is smallest.

    Paper section 2.3 asks for the makespan-minimising assignment; this is a polynomial heuristic
    (O(M^3 log M) for M missing experts at worst): the best of the LPT greedy, the paper's threshold
    rule and, for every copy count m, the m experts slowest on the CPU (m = 0 is all-CPU), then
    single-expert improvement moves. Hence it is never worse than `sum_of_costs_split` or all-CPU
    under this model. `counts` maps each expert this call
    needs to its token count; `resident` lists the layer's GPU-resident experts; `max_copies`
    caps the copies (free scratch slots); cpu_start and copy_start are the channels' backlog from
    work queued before this call (decode: copies ahead of need, CPU work for a later layer). Ties
    prefer fewer copies: a copy costs PCIe bandwidth.
    """
    layer = _Layer(counts, resident, cost, cpu_start, copy_start)
    limit = _copy_limit(layer, max_copies)
    if not layer.misses:
        return layer.plan(frozenset())
    candidates = [_greedy_set(layer, limit), _threshold_set(layer, limit), *_prefix_sets(layer, limit)]
    start = min(candidates, key=lambda s: (layer.makespan(s), len(s)))
    return layer.plan(_improve(layer, start, limit))


def sum_of_costs_split(counts: Mapping[int, int], resident: Collection[int], cost: ExpertCosts,
                       max_copies: int | None = None, cpu_start: float = 0.0, copy_start: float = 0.0) -> SplitPlan:
    """The paper-faithful rule: copy an expert when copy + GPU time < CPU time, each on its own.

    It minimises the sum of per-expert costs and ignores that the two sides run in parallel and
    that copies queue behind each other. The returned times are still this module's makespan
    model, so both variants can be compared (the backlog, as makespan_split takes it, only in the
    reported times: the rule itself ignores it, as the paper's does).
    """
    layer = _Layer(counts, resident, cost, cpu_start, copy_start)
    return layer.plan(_threshold_set(layer, _copy_limit(layer, max_copies)))
