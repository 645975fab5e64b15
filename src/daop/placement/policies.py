"""Placement policies: pure decisions of where each routed expert of a layer is computed.

A policy owns a Placement table and returns a LayerPlan per layer call from the routing counts
(tokens per expert). Executors carry the plan out; nothing here touches tensors or streams.
Baselines follow the paper's descriptions (DAOP, DATE 2025, section 5.1): on-demand copies every
miss with no cache; LRU keeps a per-layer cache (mixtral-offloading); static keeps whole layers on
the host (llama.cpp --n-cpu-moe); Fiddler computes misses on the CPU from a popularity placement.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from daop.errors import DaopError
from daop.placement.cost import CostModel
from daop.placement.table import Placement


@dataclass(frozen=True)
class LayerPlan:
    """How one layer's routed experts are served. Copies run in order into the named slots."""

    gpu: tuple[tuple[int, int], ...] = ()  # (expert, slot) already resident
    cpu: tuple[int, ...] = ()
    copy: tuple[tuple[int, int], ...] = ()  # (expert, slot) copied in this order, each computed after its copy
    # (expert, scratch slot, K): split experts, whose intermediate rows [0, K) the CPU computes while the
    # slot holds rows [K, I) (copied ahead of need) for the GPU; their two outputs are added
    split: tuple[tuple[int, int, int], ...] = ()


@dataclass
class PolicyContext:
    """What every policy may look at: shape, budget, popularity and costs."""

    num_layers: int
    num_experts: int
    top_k: int
    gpu_slots: int
    moe_layers: list[int]
    popularity: np.ndarray  # [L, E] activation counts (uniform when unknown)
    cost: CostModel
    scratch_slots: int = 0


def ranked(ctx: PolicyContext, layers: list[int]) -> list[tuple[int, int]]:
    """(layer, expert) pairs of the given layers, most popular first; ties by layer, then expert."""
    pairs = [(int(-ctx.popularity[l, e]), l, e) for l in layers for e in range(ctx.num_experts)]
    return [(l, e) for _, l, e in sorted(pairs)]


class Policy:
    """Base: a fixed placement, resident experts on the GPU, the rest served by `serve_miss`."""

    name = "base"
    exact = True

    def __init__(self, ctx: PolicyContext) -> None:
        self.ctx = ctx
        self.initial = self.initial_placement()
        self.placement = self.initial.copy()

    def resident_capacity(self) -> int:
        return self.ctx.gpu_slots - self.ctx.scratch_slots

    def initial_placement(self) -> Placement:
        ctx = self.ctx
        placement = Placement(ctx.num_layers, ctx.num_experts, ctx.gpu_slots)
        for slot, (l, e) in enumerate(ranked(ctx, ctx.moe_layers)[: self.resident_capacity()]):
            placement.assign(l, e, slot)
        return placement

    def reset(self) -> None:
        """Back to the calibrated placement: every sequence starts from the same state."""
        self.placement = self.initial.copy()

    def plan(self, layer_idx: int, counts: dict[int, int]) -> LayerPlan:
        gpu = tuple((e, self.placement.slot(layer_idx, e)) for e in sorted(counts) if self.placement.resident(layer_idx, e))
        misses = [e for e in sorted(counts) if not self.placement.resident(layer_idx, e)]
        return self.serve_misses(layer_idx, gpu, misses, counts)

    def serve_misses(self, layer_idx: int, gpu: tuple[tuple[int, int], ...], misses: list[int], counts: dict[int, int]) -> LayerPlan:
        return LayerPlan(gpu=gpu, cpu=tuple(misses))


class AllGpu(Policy):
    name = "gpu"

    def __init__(self, ctx: PolicyContext) -> None:
        needed = len(ctx.moe_layers) * ctx.num_experts
        if ctx.gpu_slots < needed:
            raise DaopError(f"policy 'gpu' needs all {needed} experts on the GPU but the budget holds {ctx.gpu_slots}; "
                            "choose another --policy or a larger --gpu-memory")
        super().__init__(ctx)


class OnDemand(Policy):
    """Copy every non-resident expert on each use into a scratch slot; no caching."""

    name = "ondemand"

    def __init__(self, ctx: PolicyContext) -> None:
        if ctx.gpu_slots < 1:
            raise DaopError("policy 'ondemand' needs at least one GPU expert slot; the budget holds none")
        ctx.scratch_slots = min(ctx.gpu_slots, 2 * ctx.top_k)
        super().__init__(ctx)
        self.next_scratch = 0

    def serve_misses(self, layer_idx, gpu, misses, counts):
        copies = []
        first = self.resident_capacity()
        for e in misses:
            copies.append((e, first + self.next_scratch))
            self.next_scratch = (self.next_scratch + 1) % self.ctx.scratch_slots
        return LayerPlan(gpu=gpu, copy=tuple(copies))


class Lru(Policy):
    """Per-layer LRU expert cache over the slot pool (mixtral-offloading style)."""

    name = "lru"

    def __init__(self, ctx: PolicyContext) -> None:
        if ctx.gpu_slots < len(ctx.moe_layers):
            raise DaopError(f"policy 'lru' needs at least one GPU slot per MoE layer ({len(ctx.moe_layers)}); "
                            f"the budget holds {ctx.gpu_slots}")
        super().__init__(ctx)
        self.reset()

    def initial_placement(self) -> Placement:
        ctx = self.ctx
        placement = Placement(ctx.num_layers, ctx.num_experts, ctx.gpu_slots)
        per, extra = divmod(ctx.gpu_slots, len(ctx.moe_layers))
        slot = 0
        for i, l in enumerate(ctx.moe_layers):
            for _, e in ranked(ctx, [l])[: min(ctx.num_experts, per + (i < extra))]:
                placement.assign(l, e, slot)
                slot += 1
        return placement

    def reset(self) -> None:
        super().reset()
        self.order = {l: OrderedDict((e, None) for e in self.placement.resident_experts(l)) for l in self.ctx.moe_layers}

    def plan(self, layer_idx, counts):
        order = self.order[layer_idx]
        needed = set(counts)
        gpu = tuple((e, self.placement.slot(layer_idx, e)) for e in sorted(counts) if self.placement.resident(layer_idx, e))
        for e, _ in gpu:
            order.move_to_end(e)
        copies = []
        served = {e for e, _ in gpu}
        for e in sorted(counts):
            if e in served:  # resident at the start of this step (even if evicted for an earlier miss)
                continue
            # Least recently used first, sparing experts this step still needs when possible; an
            # evicted expert of this step was computed before the copy that overwrites it.
            victim = next((v for v in order if v not in needed), next(iter(order)))
            slot = self.placement.slot(layer_idx, victim)
            self.placement.assign(layer_idx, e, slot)
            del order[victim]
            order[e] = None
            copies.append((e, slot))
        return LayerPlan(gpu=gpu, copy=tuple(copies))


class Static(Policy):
    """Whole layers' experts on the host, computed on the CPU (llama.cpp --n-cpu-moe N style)."""

    name = "static"

    def initial_placement(self) -> Placement:
        ctx = self.ctx
        placement = Placement(ctx.num_layers, ctx.num_experts, ctx.gpu_slots)
        gpu_layers = min(len(ctx.moe_layers), ctx.gpu_slots // ctx.num_experts)
        slot = 0
        for l in ctx.moe_layers[len(ctx.moe_layers) - gpu_layers:]:
            for e in range(ctx.num_experts):
                placement.assign(l, e, slot)
                slot += 1
        return placement


class Fiddler(Policy):
    """Popularity placement; misses computed on the CPU unless copying is cheaper (many tokens)."""

    name = "fiddler"

    def __init__(self, ctx: PolicyContext) -> None:
        ctx.scratch_slots = min(ctx.gpu_slots, ctx.top_k) if ctx.gpu_slots > ctx.top_k else 0
        super().__init__(ctx)
        self.next_scratch = 0

    def serve_misses(self, layer_idx, gpu, misses, counts):
        cpu, copies = [], []
        first = self.resident_capacity()
        for e in misses:
            if self.ctx.scratch_slots and self.ctx.cost.copy_beats_cpu(counts[e]):
                copies.append((e, first + self.next_scratch))
                self.next_scratch = (self.next_scratch + 1) % self.ctx.scratch_slots
            else:
                cpu.append(e)
        return LayerPlan(gpu=gpu, cpu=tuple(cpu), copy=tuple(copies))


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (AllGpu, OnDemand, Lru, Static, Fiddler)}


def make_policy(name: str, ctx: PolicyContext) -> Policy:
    if name not in POLICIES:
        raise DaopError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name](ctx)
