"""The DAOP runner: the offloaded runner plus next-layer prediction in decode (paper 2.4, 2.5).

At decode layer l: layer l+1's router on layer l's input predicts l+1's experts. Before layer l's
GPU work starts, the predicted host experts of l+1 are either copied into scratch slots
(speculative copies, exact) or computed on the CPU from layer l's input (stale input, A2). At
layer l+1 the routing is the true router's (exact) or the prediction (A1), optionally with host
experts capped per token (A3); work that turns out not to be needed is discarded.
Prefill is exact: per-sequence swaps, then a cost-model split of the misses (2.2, 2.3).
Shapes: N tokens, K top-k, E experts, D hidden.
"""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from daop.config import ModelConfig
from daop.placement.daop import Daop
from daop.placement.policies import LayerPlan
from daop.predict.degrade import degrade
from daop.runtime.offload import OffloadedExperts


@dataclass
class Pending:
    """What layer l prepared for layer l+1."""

    ids: torch.Tensor  # predicted routing [N, K] on the device
    weights: torch.Tensor
    ids_host: torch.Tensor
    prefetched: dict[int, tuple[int, object]] = field(default_factory=dict)  # expert -> (slot, copy event)
    precalc: Future | None = None  # expert -> y computed on layer l's input
    precalc_rows: dict[int, torch.Tensor] = field(default_factory=dict)
    cpu_assigned: set[int] = field(default_factory=set)  # predicted misses the CPU will take on the true input


class DaopRunner(OffloadedExperts):
    def __init__(self, *args, routers: dict[int, torch.Tensor], model_config: ModelConfig, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.policy: Daop
        self.routers = routers
        self.model_config = model_config
        layers = sorted(routers)
        self.next_moe = {a: b for a, b in zip(layers, layers[1:])}
        self.phase = "prefill"
        self.pending: dict[int, Pending] = {}
        self.prediction_source = None  # a TraceRouting when a benchmark replays recorded predictions
        self.first_moe = min(routers) if routers else 0
        self.load_ms = {"cpu": 0.0, "copy": 0.0}  # work given to each host channel in this decode step

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.pending.clear()

    def reset(self) -> None:
        super().reset()
        self.pending.clear()

    def __call__(self, layer_idx: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.phase != "decode":
            return self.prefill_layer(layer_idx, h, ids, weights)
        return self.decode_layer(layer_idx, h, ids, weights)

    def prefill_layer(self, layer_idx, h, ids, weights) -> torch.Tensor:
        rows_host = self.rows_of(ids.cpu())
        counts = {e: len(r[0]) for e, r in rows_host.items()}
        swap_copies = self.policy.prefill_swaps(layer_idx, counts)
        swapped = {e for e, _ in swap_copies}
        resident = set(self.policy.placement.resident_experts(layer_idx)) - swapped
        rest = {e: n for e, n in counts.items() if e not in swapped}
        split = self.policy.split(rest, resident, len(self.policy.scratch()))
        plan = LayerPlan(gpu=tuple((e, self.policy.placement.slot(layer_idx, e)) for e in split.gpu), cpu=split.cpu,
                         copy=tuple((e, s) for e, s in swap_copies if e in counts) + tuple(zip(split.copy, self.policy.scratch())))
        return self.execute(layer_idx, h, weights, rows_host, plan)

    def predict(self, layer_idx: int, h: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        """Predicted (next layer, ids, weights) from this layer's input, or None outside prediction."""
        nxt = self.next_moe.get(layer_idx)
        cfg = self.policy.config
        if nxt is None or nxt < cfg.first_predicted_layer:
            return None
        from daop.model.moe import select_experts

        logits = F.linear(h, self.routers[nxt])
        if self.prediction_source is not None:
            ids, weights = self.prediction_source.predicted(nxt, h.device)
        else:
            ids, weights = select_experts(self.model_config, logits)
        if cfg.substitution:
            mask = torch.zeros(self.model_config.num_experts, dtype=torch.bool)
            mask[self.policy.placement.resident_experts(nxt)] = True
            ids, weights, degraded = degrade(ids, weights, logits, mask.to(h.device), cfg.max_cpu_per_token)
            self.counters.add("degraded_tokens", nxt, float(degraded.sum()))
        return nxt, ids, weights

    def decode_layer(self, layer_idx, h, ids, weights) -> torch.Tensor:
        cfg = self.policy.config
        if layer_idx == self.first_moe:
            self.load_ms = {"cpu": 0.0, "copy": 0.0}
        pend = self.pending.pop(layer_idx, None)
        if pend is not None and cfg.predicted_routing:
            ids, weights = pend.ids, pend.weights.to(weights.dtype)
        pred = self.predict(layer_idx, h)
        both = torch.cat([ids, pred[1]], dim=1) if pred else ids
        host = both.cpu()  # one sync for this layer's routing and the next layer's prediction
        ids_host, pred_host = host[:, : ids.shape[1]], (host[:, ids.shape[1]:] if pred else None)
        if pend is not None:
            self.score_prediction(layer_idx, pend.ids_host, ids_host)
        rows_host = self.rows_of(ids_host)
        counts = {e: len(r[0]) for e, r in rows_host.items()}
        ready = {e: v for e, v in (pend.prefetched if pend else {}).items() if e in counts}
        done = self.usable_precalc(pend, rows_host) if pend else {}
        resident = set(self.policy.placement.resident_experts(layer_idx))
        forced_cpu = tuple(e for e in sorted(pend.cpu_assigned) if e in counts and e not in resident) if pend else ()
        todo = {e: n for e, n in counts.items() if e not in ready and e not in done and e not in forced_cpu}
        in_use = {slot for slot, _ in ready.values()}
        free = [s for s in self.policy.scratch() if s not in in_use]
        split = self.policy.split(todo, resident, len(free))
        plan = LayerPlan(gpu=tuple((e, self.policy.placement.slot(layer_idx, e)) for e in split.gpu),
                         cpu=forced_cpu + split.cpu, copy=tuple(zip(split.copy, free)))
        taken = in_use | {s for _, s in plan.copy}

        def speculate() -> None:
            if pred is not None:
                self.pending[pred[0]] = self.prepare(pred[0], h, pred[1], pred[2], pred_host, taken)

        return self.execute(layer_idx, h, weights, rows_host, plan, ready=ready, done=done, before_compute=speculate)

    def prepare(self, nxt: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, ids_host: torch.Tensor,
                taken: set[int]) -> Pending:
        """Start the next layer's predicted host experts early: CPU on this input, or copies."""
        cfg = self.policy.config
        pend = Pending(ids, weights, ids_host)
        predicted = self.rows_of(ids_host)
        host_experts = [e for e in predicted if not self.policy.placement.resident(nxt, e)]
        if not host_experts:
            return pend
        if cfg.stale_input:
            pend.precalc_rows = {e: predicted[e][0] for e in host_experts}
            h_host, h_ready = self.transfer.to_host(h)
            jobs = [(e, predicted[e][0], self.store.host_weights(nxt, e)) for e in host_experts]
            pend.precalc = self.cpu.submit(jobs, h_host, h_ready)
        elif cfg.speculative_copies:
            free = [s for s in self.policy.scratch() if s not in taken]
            cost = self.policy.ctx.cost
            for e in sorted(host_experts, key=lambda e: -len(predicted[e][0])):
                cpu_ms = cost.cpu_ms(len(predicted[e][0]))
                if not free or (cfg.balance_channels and self.load_ms["cpu"] + cpu_ms < self.load_ms["copy"] + cost.copy_ms()):
                    self.load_ms["cpu"] += cpu_ms  # the CPU takes it at the next layer, on the true input
                    pend.cpu_assigned.add(e)
                    continue
                self.load_ms["copy"] += cost.copy_ms()
                slot = free.pop(0)
                pend.prefetched[e] = (slot, self.copy(nxt, e, slot))
                self.counters.add("speculative_copies", nxt, 1)
                self.counters.add("copied_bytes", nxt, self.store.expert_bytes)
        return pend

    def usable_precalc(self, pend: Pending, rows_host: dict) -> dict[int, torch.Tensor]:
        """Pre-calculated outputs whose expert and token rows the routing really asks for."""
        if pend.precalc is None:
            return {}
        results = pend.precalc.result()
        usable = {e: y for e, y in results.items()
                  if e in rows_host and torch.equal(rows_host[e][0], pend.precalc_rows[e])}
        self.counters.add("precalc_used", 0, len(usable))
        self.counters.add("precalc_wasted", 0, len(results) - len(usable))
        return usable

    def score_prediction(self, layer_idx: int, predicted: torch.Tensor, true: torch.Tensor) -> None:
        shared = (predicted[:, :, None] == true[:, None, :]).any(dim=2).sum().item()
        self.counters.add("predicted_hits", layer_idx, shared)
        self.counters.add("predicted_total", layer_idx, true.numel())
