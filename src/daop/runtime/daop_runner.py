"""The DAOP runner: the offloaded runner plus next-layer prediction in decode (paper 2.4, 2.5).

At decode layer l: layer l+1's router on layer l's input predicts l+1's experts. Before layer l's
GPU work starts, the predicted host experts of l+1 are either copied into scratch slots
(speculative copies, exact) or computed on the CPU from layer l's input (stale input, A2). At
layer l+1 the routing is the true router's (exact) or the prediction (A1), optionally with host
experts capped per token (A3); work that turns out not to be needed is discarded. With speculative
copies on the true input, layer l also copies layer l+2's predicted host experts (layer l+2's router
on layer l's input) where a copy started now lands before the CPU would be through with them: a copy
takes longer than a layer, so one started a layer ahead often lands late. Layer l+1 then plans
l+2's other predicted misses as before.
Prefill is exact: per-sequence swaps, then a cost-model split of the misses (2.2, 2.3). The swaps
only say which placement the sequence wants: each layer first computes the experts its slots hold
(what the previous sequence left there; a new sequence restores nothing up front), then moves into
its wanted slots on the device what it has just copied to a scratch slot; the wanted experts that
need a copy from the host are copied when decode starts (`set_phase`), behind every copy the prompt
itself waits for, so they do not delay the first token. While
a layer runs, the next layer's predicted host experts are copied ahead into the scratch slots (or
promised to the CPU), as in decode, so the copy stream never waits for a layer to start.
With decode re-swaps on (`DaopConfig.decode_swap_every`, DAOP_DECODE_SWAPS), every few decode calls
a layer runs the prefill's swap rule again on its recent routing counts (with a noise margin) and copies the experts it
swaps in into their slots.
Where the preset keeps no scratch slots in decode (`DaopConfig.decode_scratch`: daop-exact, where a
copy loses to the CPU for one token), they hold resident experts from decode start (`set_phase`) and
decode predicts nothing: the speculation above then runs in prefill only. There a one-token decode
layer is handed to the CPU kernel without a host read of its routing (`runtime/handoff.py`; on by
default, DAOP_HANDOFF=0 turns it off).
Every decision is made by the pure planners of runtime/scheduler.py; this class only carries
them out. Shapes: N tokens, K top-k, E experts, D hidden.
"""
from __future__ import annotations

import os
import time
import warnings
from collections.abc import Collection
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch

from daop.errors import DaopError
from daop.model.moe import group_by_expert
from daop.model.routing import Routing
from daop.placement.cost import CostModel
from daop.placement.daop import Daop
from daop.predict.degrade import degrade
from daop.predict.swaps import RecentCounts
from daop.runtime import handoff as handoff_mod
from daop.runtime.handoff import Handoff
from daop.runtime.offload import OffloadedExperts
from daop.runtime.scheduler import (Clock, DecodeLayerPlan, Prepared, SplitRows, plan_decode_layer, plan_early_copies,
                                    plan_prefill_layer, plan_settle, plan_speculation, promised_to_cpu)


GAP_MS = 0.5  # the gap from a layer's finish to the next layer's plan, before any is measured (ms)
GAP_WEIGHT = 0.2  # weight of each new measurement in its moving average


@dataclass
class Pending:
    """What layer l started for layer l+1: the plan's data and the handles that carry it out."""

    ids: torch.Tensor | None  # routing [N, K] predicted for l+1 (after substitution) on the device (None: prefill)
    weights: torch.Tensor | None
    raw_host: torch.Tensor  # the router's prediction before substitution [N, K], for scoring
    prepared: Prepared
    copy_events: dict[int, Any] = field(default_factory=dict)  # expert -> copy completion event
    precalc: Future | None = None  # expert -> y computed on layer l's input
    cpu_ms: float = 0.0  # the CPU work promised to l+1, by the cost model
    early: frozenset[int] = frozenset()  # prefetched experts whose copies layer l-1 started (two ahead)


@dataclass
class Early:
    """Copies layer l started for layer l+2's predicted misses (two layers ahead)."""

    slots: dict[int, int] = field(default_factory=dict)  # expert -> scratch slot being filled
    events: dict[int, Any] = field(default_factory=dict)  # expert -> copy completion event


@dataclass
class Prediction:
    layer_idx: int
    logits: torch.Tensor
    raw_ids: torch.Tensor  # the router's choice
    ids: torch.Tensor  # after substitution (= raw_ids without it)
    weights: torch.Tensor


class DaopRunner(OffloadedExperts):
    def __init__(self, *args: Any, routing: Callable[[], Routing], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.policy: Daop
        self.routing = routing  # the decoder's current routing: predictions come from the same source
        layers = list(self.policy.ctx.moe_layers)
        self.next_moe = dict(zip(layers, layers[1:]))
        self.first_moe = layers[0] if layers else 0
        self.phase = "prefill"
        self.pending: dict[int, Pending] = {}
        self.early: dict[int, Early] = {}  # layer -> copies started two layers before it
        # The decode timeline: when the current layer should finish (perf_counter s, estimated when it
        # is planned), the measured gap from one layer's estimated finish to the next layer's plan
        # (ms, a moving average), and when each prefetched copy should land.
        self.finish_at: float | None = None
        self.gap_ms = GAP_MS
        self.lands: dict[tuple[int, int], float] = {}
        self.slot_lands: dict[int, float] = {}  # resident slot -> when its settle or swap copy should land
        self.split_rows = split_rows(self.policy.config, self.store, self.transfer.cuda)
        window, every, self.swap_z = decode_swaps(self.policy.config)
        self.recent = RecentCounts(self.counters.num_layers, self.policy.ctx.num_experts, window, every) if every else None
        # the prompt's routing counts [L, E] since the last reset, for placement on the prompt
        self.prompt_counts = (np.zeros((self.counters.num_layers, self.policy.ctx.num_experts))
                              if place_on_prompt(self.policy.config) else None)
        self.placed_on_prompt = False
        self.late_predict = late_predictions()
        self.early_submit = early_submits()
        self.launch_first = launch_first()
        self.two_ahead = two_ahead(self.policy.config)
        # decode predicts the next layers' routing only where it acts on the prediction: it is the
        # routing (A1), the CPU pre-calculates on it (A2), or copies are made ahead into scratch slots
        cfg = self.policy.config
        self.decode_predicts = cfg.predicted_routing or cfg.stale_input or self.policy.decode_scratch > 0
        self.handoff: Handoff | None = None  # decode layers handed to the CPU kernel (DAOP_HANDOFF; set_phase)
        self.handoff_refused: str | None = None

    def plan_costs(self) -> CostModel:
        return timing_costs(self.policy.ctx.cost)

    def set_phase(self, phase: str) -> None:
        if self.handoff is not None:
            self.handoff.flush()
        if self.phase != "decode" and phase == "decode":
            self.start_handoff()
            self.policy.set_decode(True)  # the scratch slots decode does not keep join the resident ones
            if self.prompt_counts is not None and not self.placed_on_prompt and self.prompt_counts.any():
                for layer_idx, _, _ in self.policy.place_on(self.prompt_counts):
                    self.counters.add("prompt_placements", layer_idx, 1)
                self.placed_on_prompt = True  # once per sequence (the batch's first, when sequences join)
            counts = self.prompt_counts if self.prompt_counts is not None else np.zeros_like(self.policy.ctx.popularity)
            self.policy.fill_free(counts)  # resident slots still empty (no placement on the prompt, or a batch's later turn)
            self.settle_all()  # the wanted experts a prefill did not bring to the GPU, copied from the host
        elif self.phase == "decode" and phase != "decode":
            self.policy.set_decode(False)
        self.phase = phase
        self.forget_pending()

    def start_handoff(self) -> None:
        """Hand off decode layers where this runner can (`runtime/handoff.py`; DAOP_HANDOFF, else
        `handoff.DEFAULT`); where it cannot, plan every layer on the host, saying why once if
        DAOP_HANDOFF=1 asked for it."""
        if self.handoff is not None or self.handoff_refused is not None:
            return
        asked = handoff_mod.setting()
        if not (asked if asked is not None else handoff_mod.DEFAULT):
            return
        reason = Handoff.able(self)
        if reason is None:
            self.handoff = Handoff(self)
            return
        self.handoff_refused = reason
        if asked:  # asked for by name: say why not (by default it just stays off)
            warnings.warn(f"daop: DAOP_HANDOFF=1, but decode layers are planned on the host: {reason}",
                          RuntimeWarning, stacklevel=3)

    def totals(self) -> dict[str, float]:
        if self.handoff is not None:
            self.handoff.flush()
        return super().totals()

    def close(self) -> None:
        if self.handoff is not None:
            self.handoff.close()
        super().close()

    def reset(self) -> None:
        """A new sequence wants the calibrated placement; its prefill settles the slots layer by layer."""
        if self.handoff is not None:
            self.handoff.flush()
        self.collect(wait=True)
        self.policy.reset()
        self.forget_pending()
        if self.recent is not None:
            self.recent.clear()
        if self.prompt_counts is not None:
            self.prompt_counts[:] = 0
        self.placed_on_prompt = False

    def forget_pending(self) -> None:
        """Drop what was started for later layers and the timeline estimates that go with it."""
        self.pending.clear()
        self.early.clear()
        self.lands.clear()
        self.finish_at = None

    def __call__(self, layer_idx: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 predicted: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """predicted: what a captured decode piece predicted from h for the layers `piece_predictions`
        names (l+1's logits, ids and weights, then l+2's ids where it has them)."""
        if self.phase != "decode":
            return self.prefill_layer(layer_idx, h, ids, weights)
        return self.decode_layer(layer_idx, h, ids, weights, predicted)

    def piece_predictions(self, layer_idx: int) -> tuple[int, int | None] | None:
        """(l+1, l+2 or None): the layers whose routing a captured decode piece should predict from
        MoE layer l's input for this runner, as `predict` and `predict_ahead` would from the host;
        None where decode predicts nothing after l."""
        nxt = self.next_moe.get(layer_idx)
        if nxt is None or nxt < self.policy.config.first_predicted_layer or not self.decode_predicts:
            return None
        return nxt, (self.next_moe.get(nxt) if self.two_ahead else None)

    def prefill_layer(self, layer_idx: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        cfg = self.policy.config
        self.mark(layer_idx, "enter")
        pend = self.pending.pop(layer_idx, None)
        nxt = self.next_moe.get(layer_idx)
        ahead = nxt is not None and cfg.speculative_copies and bool(self.policy.scratch())
        parts = [ids] + ([self.routing().predict(nxt, h)[1]] if ahead else [])
        host = self.transfer.read_on_host(torch.cat([p.long() for p in parts], dim=1)).split(ids.shape[1], dim=1)
        self.mark(layer_idx, "routed")
        rows_host = group_by_expert(host[0])
        counts = {e: len(r[0]) for e, r in rows_host.items()}
        if self.prompt_counts is not None:
            for e, n in counts.items():
                self.prompt_counts[layer_idx, e] += n
        self.policy.swap_hot(layer_idx, counts)  # the placement this sequence wants
        clock = Clock(*self.channel_clock(time.perf_counter()))
        plan = plan_prefill_layer(counts, self.held_slots(layer_idx), self.policy.scratch(), pend.prepared if pend else None,
                                  self.policy.split, cfg.cpu_experts, clock, self.wanted_slots(layer_idx))
        ready = {e: (slot, pend.copy_events[e]) for e, slot in plan.ready} if pend else {}
        last_in: dict[int, int] = {}  # scratch slot -> the expert this call read from it last
        for e, slot in (*plan.ready, *plan.layer.copy):
            last_in[slot] = e

        def after_launch() -> None:
            settle = plan_settle(self.wanted_slots(layer_idx), self.holds(layer_idx), {e: s for s, e in last_in.items()})
            for e, src, dst in settle.moves:
                self.move(layer_idx, e, src, dst)
                self.counters.add("settle_moves", layer_idx, 1)
            # settle.copies wait for the switch to decode (settle_all): no layer of the prompt reads
            # them, and queued here they would hold up the later layers' copies and the first token
            if ahead:
                self.pending[nxt] = self.prefetch(nxt, host[1], set(last_in))

        return self.execute(layer_idx, h, weights, rows_host, plan.layer, ready, after_launch=after_launch)

    def prefetch(self, nxt: int, predicted_ids: torch.Tensor, read: Collection[int] = ()) -> Pending:
        """Prefill: copy layer nxt's predicted host experts into the scratch slots now, or promise
        them to the CPU, whichever lets nxt finish sooner (plan_speculation, with this layer's queued
        work as the lead). Slots this layer reads (`read`) are taken last: a copy into one waits on
        the copy stream until the read is done, and every copy queued after it waits too."""
        cfg = self.policy.config
        predicted = group_by_expert(predicted_ids)
        cpu_free, copy_free = self.channel_clock(time.perf_counter())
        spec = plan_speculation({e: len(r[0]) for e, r in predicted.items()}, set(self.held_slots(nxt)),
                                sorted(self.policy.scratch(), key=lambda slot: slot in read),
                                Clock(cpu_free, copy_free, max(cpu_free, copy_free)),
                                self.timing, stale_input=False, speculative_copies=True,
                                balance_channels=cfg.balance_channels, cpu_experts=cfg.cpu_experts)
        pend = Pending(None, None, predicted_ids, Prepared(prefetched=dict(spec.copies), cpu_assigned=frozenset(spec.cpu_assigned)))
        for e, slot in spec.copies:
            pend.copy_events[e] = self.copy(nxt, e, slot, "ahead")
            self.counters.add("speculative_copies", nxt, 1)
            self.counters.add("copied_bytes", nxt, self.store.expert_bytes)
        return pend

    def held_slots(self, layer_idx: int) -> dict[int, int]:
        """Expert -> slot for the layer's experts the resident slots hold now."""
        return {e: s for s, e in self.holds(layer_idx).items()}

    def holds(self, layer_idx: int) -> dict[int, int]:
        """Resident slot -> the layer's expert it holds now (slots holding another layer's are left out)."""
        capacity = self.policy.resident_capacity()
        return {s: e for s, e in self.layer_slots.get(layer_idx, {}).items() if s < capacity}

    def wanted_slots(self, layer_idx: int) -> dict[int, int]:
        placement = self.policy.placement
        return {e: placement.slot(layer_idx, e) for e in placement.resident_experts(layer_idx)}

    def settle_all(self) -> None:
        """Copy from the host every wanted expert a slot does not hold yet: after a prefill, those it did not
        copy to a scratch slot and move into place itself, in layer order."""
        for layer_idx in self.policy.ctx.moe_layers:
            for e, slot in plan_settle(self.wanted_slots(layer_idx), self.holds(layer_idx), {}).copies:
                self.settle_copy(layer_idx, e, slot)

    def settle_copy(self, layer_idx: int, expert_idx: int, slot: int, kind: str = "settle",
                    counter: str = "settle_copies") -> None:
        """Copy a wanted expert from the host into its resident slot; the slot's next reader waits for
        it, and the timeline knows when it should land (`landing_copies`)."""
        self.landing[slot] = self.copy(layer_idx, expert_idx, slot, kind)
        self.slot_lands[slot] = self.copy_free_at
        self.counters.add(counter, layer_idx, 1)
        self.counters.add("copied_bytes", layer_idx, self.store.expert_bytes)

    def predict(self, layer_idx: int, h: torch.Tensor, given: tuple[torch.Tensor, ...] | None = None) -> Prediction | None:
        """Layer l+1's routing predicted from layer l's input, or None outside prediction; given:
        (logits, ids, weights) the captured piece predicted already."""
        nxt = self.next_moe.get(layer_idx)
        cfg = self.policy.config
        if nxt is None or nxt < cfg.first_predicted_layer or not self.decode_predicts:
            return None
        logits, ids, weights = given[:3] if given is not None else self.routing().predict(nxt, h)
        pred = Prediction(nxt, logits, ids, ids, weights)
        if cfg.substitution:
            mask = torch.zeros(logits.shape[-1], dtype=torch.bool)
            mask[self.policy.placement.resident_experts(nxt)] = True
            pred.ids, pred.weights, degraded = degrade(ids, weights, logits, mask.to(h.device), cfg.max_cpu_per_token)
            self.counters.add("degraded_tokens", nxt, float(degraded.sum()))
        return pred

    def decode_layer(self, layer_idx: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                     predicted: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        if self.handoff is not None:
            if self.handoff.serves(layer_idx, h, ids):
                return self.handoff.layer(layer_idx, h, ids, weights)
            self.handoff.flush()
        cfg = self.policy.config
        self.mark(layer_idx, "enter")
        pend = self.pending.pop(layer_idx, None)
        self.early.pop(layer_idx, None)  # copies for this layer that the layer before did not take over
        true_ids = ids
        if pend is not None and cfg.predicted_routing:
            ids, weights = pend.ids, pend.weights.to(weights.dtype)
        # Where this layer is expected to have CPU experts (the layer before promised it some), the
        # next layers' predictions are made once they are submitted: launching them first (a few
        # hundred microseconds of the driving thread) would hold up the CPU's start. Elsewhere they
        # are launched before the routing read, while the device still computes the layer's input.
        # Predictions a captured piece made (`predicted`) cost the host nothing: they are always early.
        late = (predicted is None and self.late_predict and pend is not None
                and bool(pend.prepared.cpu_assigned or pend.prepared.split))
        pred = None if late else self.predict(layer_idx, h, predicted)
        ahead = None if late else self.predict_ahead(pred, h, predicted)
        # one device->host copy for this layer's routing, the true routing and the predictions
        parts = [ids] + ([true_ids] if ids is not true_ids else []) + prediction_parts(pred, ahead)
        host = self.read_routing(torch.cat([p.long() for p in parts], dim=1), h).split(ids.shape[1], dim=1)
        ids_host, true_host = host[0], host[1] if ids is not true_ids else host[0]
        pred_host = host[len(host) - 2 - bool(ahead):len(host) - bool(ahead)] if pred else ()
        ahead_host = host[-1] if ahead else None
        self.mark(layer_idx, "routed")
        rows_host = group_by_expert(ids_host)
        counts = {e: len(r[0]) for e, r in rows_host.items()}
        prepared = pend.prepared if pend else None
        now = time.perf_counter()
        if self.finish_at is not None and layer_idx != self.first_moe:
            self.gap_ms += GAP_WEIGHT * (max(0.0, (now - self.finish_at) * 1000) - self.gap_ms)
        cpu_free, copy_free = self.channel_clock(now)  # read before an early submit: the plan weighs every CPU expert
        clock_now = Clock(cpu_free, copy_free)
        promised = self.submit_promised(layer_idx, h, rows_host, counts, prepared) if self.early_submit else None
        rows = {e: tuple(rows_host[e][0].tolist()) for e in (prepared.precalc_rows if prepared else ()) if e in rows_host}
        reserved = {s for early in self.early.values() for s in early.slots.values()}
        landing = self.landing_copies(layer_idx, pend, counts, now)
        plan = plan_decode_layer(counts, rows, self.wanted_slots(layer_idx), self.policy.scratch(), prepared,
                                 self.policy.split, cfg.cpu_experts, clock_now, reserved, landing,
                                 self.timing, self.store.inter)
        for e in plan.late:
            self.lands.pop((layer_idx, e), None)
        ready = {e: (slot, pend.copy_events[e]) for e, slot in plan.ready} if pend else {}
        halves = {e: pend.copy_events[e] for e, _, _ in plan.layer.split} if pend else {}
        started = [(pend.precalc, plan.precalc_used)] if pend and pend.precalc else []
        layer_plan = plan.layer
        if promised is not None:  # the promised experts are the plan's too: they are computed by the job already started
            if not set(promised[1]) <= set(layer_plan.cpu):
                raise RuntimeError(f"layer {layer_idx}: experts {promised[1]} were started on the CPU, the plan gives "
                                   f"the CPU {layer_plan.cpu}")
            layer_plan = replace(layer_plan, cpu=tuple(e for e in layer_plan.cpu if e not in promised[1]))
            started.append(promised)
        taken = {s for _, s in plan.ready} | {s for _, s in plan.layer.copy} | {s for _, s, _ in plan.layer.split}

        def speculate() -> None:  # once this layer's CPU work and copies are queued
            nonlocal pred, ahead, pred_host, ahead_host
            if late:  # the predictions, read in a second copy (the device is not busy with this layer yet)
                self.counters.add("late_predictions", layer_idx, 1)
                pred = self.predict(layer_idx, h)
                ahead = self.predict_ahead(pred, h)
                if pred is not None:
                    parts = prediction_parts(pred, ahead)
                    got = self.transfer.read_on_host(torch.cat([p.long() for p in parts], dim=1), spin=True)
                    got = got.split(ids.shape[1], dim=1)
                    pred_host, ahead_host = got[:2], got[2] if ahead else None
            # (estimated here, once the CPU has its work: it does not change what this layer does)
            self.finish_at = self.estimate_finish(layer_idx, now, clock_now, counts, plan)
            self.counters.add("precalc_used", layer_idx, len(plan.precalc_used))
            self.counters.add("late_copies_to_cpu", layer_idx, len(plan.late))
            if pend is not None and pend.early:
                self.counters.add("two_ahead_used", layer_idx, sum(e in pend.early for e, _ in plan.ready))
            self.counters.add("precalc_wasted", layer_idx, plan.precalc_wasted)
            if pend is not None:
                self.score_prediction(layer_idx, pend.raw_host, true_host)
            if pred is not None:
                at = time.perf_counter()
                cpu_free, copy_free = self.channel_clock(at)
                clock = Clock(cpu_free, copy_free, max(0.0, (self.finish_at - at) * 1000) + self.gap_ms)
                nxt = self.pending[pred.layer_idx] = self.prepare(pred, h, *pred_host, taken, clock, at)
                if ahead is not None:
                    self.copy_early(ahead[0], ahead_host, taken | set(nxt.prepared.prefetched.values())
                                    | {s for s, _ in nxt.prepared.split.values()}, clock, pred.layer_idx, nxt, at)
            self.mark(layer_idx, "speculated")

        # A layer whose experts the GPU alone serves (no CPU work, copy or split) waits on the host's
        # launch of them: the speculation for the next layer then runs once they are launched.
        gpu_only = self.launch_first and not (late or layer_plan.cpu or layer_plan.copy or layer_plan.split or started)
        out = self.execute(layer_idx, h, weights, rows_host, layer_plan, ready, started,
                           None if gpu_only else speculate, after_launch=speculate if gpu_only else None, halves=halves)
        if self.recent is not None:  # (after the CPU submit: the plan does not read it)
            self.recent.add(layer_idx, counts)
            if self.recent.due(layer_idx):
                self.swap_in(layer_idx)
        return out

    def submit_promised(self, layer_idx: int, h: torch.Tensor, rows_host: dict, counts: dict[int, int],
                        prepared: Prepared | None) -> tuple[Future, tuple[int, ...]] | None:
        """Early submit (DAOP_EARLY_SUBMIT=1): the routed experts the layer before promised to the CPU
        (`promised_to_cpu`, as `plan_decode_layer` finds them: not resident, not prefetched, split or
        pre-calculated) start on the CPU as soon as the routing is read, before the rest is planned.
        (job, experts), or None where there are none."""
        if prepared is None or not prepared.cpu_assigned:
            return None
        served = {e for e in counts if e in prepared.prefetched or e in prepared.split or e in prepared.precalc_rows}
        experts = promised_to_cpu(prepared, counts, self.wanted_slots(layer_idx), served)
        if not experts:
            return None
        job = self.cpu_job(layer_idx, h, rows_host, experts)
        self.mark(layer_idx, "cpu_submitted")
        self.counters.add("early_submits", layer_idx, len(experts))
        return job, experts

    def swap_in(self, layer_idx: int) -> None:
        """Decode re-swaps: the swap rule on the layer's recent decode counts; each hot host expert is
        copied into its cold partner's slot behind the copies queued so far (after this call's reads
        of the slot), and the slot's next reader waits for it. The cold expert is a host expert from
        the next call on."""
        for e, slot in self.policy.swap_hot(layer_idx, self.recent.sums(layer_idx), self.swap_z):
            self.settle_copy(layer_idx, e, slot, "swap", "decode_swaps")

    def landing_copies(self, layer_idx: int, pend: Pending | None, counts: dict[int, int], now: float) -> dict[int, float]:
        """The routed experts whose copies have not landed yet, with when each should land (ms from
        `now`, the timeline's estimates): those prefetched for this layer, and resident ones whose slot
        a settle or swap copy is still filling. The plan may give them to the CPU."""
        out = {}
        for e in pend.prepared.prefetched if pend is not None else ():
            at, event = self.lands.get((layer_idx, e)), pend.copy_events.get(e)
            if e in counts and at is not None and event is not None and not event.query():
                out[e] = max(0.0, (at - now) * 1000)
        for slot, event in self.landing.items():
            owner = self.slot_contents.get(slot)
            at = self.slot_lands.get(slot)
            if (event is not None and owner is not None and owner[0] == layer_idx and owner[1] in counts and at is not None
                    and not event.query()):
                out[owner[1]] = max(0.0, (at - now) * 1000)
        return out

    def estimate_finish(self, layer_idx: int, now: float, clock: Clock, counts: dict[int, int], plan: DecodeLayerPlan) -> float:
        """When this layer call should be through (perf_counter s): its CPU experts (and the CPU's rows
        of split ones) run after the CPU's backlog, its copies land behind the copy stream's, its
        prefetched copies where they were due."""
        cost, layer, inter = self.timing, plan.layer, self.store.inter
        work = [cost.cpu_ms(counts[e]) for e in layer.cpu] + [cost.cpu_ms(counts[e]) * k / inter for e, _, k in layer.split]
        end = now + (clock.cpu_free + sum(work)) / 1000 if work else now
        if layer.copy:
            end = max(end, now + (clock.copy_free + len(layer.copy) * cost.copy_ms()) / 1000)
        for e in (*(e for e, _ in plan.ready), *(e for e, _, _ in layer.split)):
            end = max(end, self.lands.pop((layer_idx, e), now))
        return end

    def prepare(self, pred: Prediction, h: torch.Tensor, raw_host: torch.Tensor, ids_host: torch.Tensor,
                taken: set[int], clock: Clock, at: float) -> Pending:
        """Start the next layer's predicted host experts early, as plan_speculation says (on the
        clock read at perf_counter time `at`); the copies the layer before started for it count as
        prefetched, their slots as taken."""
        cfg, nxt = self.policy.config, pred.layer_idx
        predicted = group_by_expert(ids_host)
        early = self.early.pop(nxt, None) or Early()
        free = [s for s in self.policy.scratch() if s not in taken and s not in early.slots.values()]
        cost = self.timing
        spec = plan_speculation({e: len(r[0]) for e, r in predicted.items()},
                                set(self.policy.placement.resident_experts(nxt)) | set(early.slots),
                                free, clock, cost, stale_input=cfg.stale_input,
                                speculative_copies=cfg.speculative_copies, balance_channels=cfg.balance_channels,
                                cpu_experts=cfg.cpu_experts, rows=self.split_rows)
        prepared = Prepared(prefetched={**early.slots, **dict(spec.copies)}, cpu_assigned=frozenset(spec.cpu_assigned),
                            precalc_rows={e: tuple(predicted[e][0].tolist()) for e in spec.precalc},
                            split={e: (slot, k) for e, slot, k in spec.split})
        pend = Pending(pred.ids, pred.weights, raw_host, prepared, dict(early.events),
                       cpu_ms=sum(cost.cpu_ms(len(predicted[e][0])) for e in spec.cpu_assigned), early=frozenset(early.slots))
        if spec.precalc:
            pend.precalc = self.cpu_job(nxt, h, predicted, spec.precalc, ahead=True)
        for (e, slot), land in zip(spec.copies, spec.lands):
            pend.copy_events[e] = self.copy(nxt, e, slot, "ahead")
            self.lands[(nxt, e)] = at + land / 1000
            self.counters.add("speculative_copies", nxt, 1)
            self.counters.add("copied_bytes", nxt, self.store.expert_bytes)
        for (e, slot, k), land in zip(spec.split, spec.split_lands):
            pend.copy_events[e] = self.copy_rows(nxt, e, slot, k)
            self.lands[(nxt, e)] = at + land / 1000
            self.counters.add("speculative_splits", nxt, 1)
            self.counters.add("copied_bytes", nxt, self.store.expert_bytes * (self.store.inter - k) / self.store.inter)
        return pend

    def predict_ahead(self, pred: Prediction | None, h: torch.Tensor,
                      given: tuple[torch.Tensor, ...] | None = None) -> tuple[int, torch.Tensor] | None:
        """(layer l+2, its experts [N, K] predicted from layer l's input) where this layer copies two
        ahead: speculative copies on the true input with CPU experts (`two_ahead_copies`), a layer
        after the predicted one, and a routing source that predicts that far (given: what a captured
        piece predicted, l+2's ids fourth where the source has them)."""
        if pred is None or not self.two_ahead or not self.policy.scratch():
            return None
        nxt2 = self.next_moe.get(pred.layer_idx)
        if given is not None:
            ids = given[3] if len(given) > 3 and nxt2 is not None else None
        else:
            source = getattr(self.routing(), "predict_ahead", None)
            ids = source(nxt2, h) if nxt2 is not None and source is not None else None
        return (nxt2, ids) if ids is not None else None

    def copy_early(self, nxt2: int, ids_host: torch.Tensor, busy: set[int], clock: Clock, nxt_layer: int, nxt: Pending,
                   at: float) -> None:
        """Copy layer nxt2's (l+2's) predicted host experts into scratch slots no earlier layer needs
        (`busy`: this layer's and l+1's), where they land before the CPU would be through with them
        at l+2 (`plan_early_copies`, l+2 starting after l+1's promised CPU work and copies)."""
        free = [s for s in self.policy.scratch() if s not in busy]
        if not free:
            return
        predicted = group_by_expert(ids_host)
        lands = [(self.lands[(nxt_layer, e)] - at) * 1000 for e in nxt.prepared.prefetched if (nxt_layer, e) in self.lands]
        lead = max(clock.lead + nxt.cpu_ms, *lands, 0.0) + self.gap_ms
        cpu_free, copy_free = self.channel_clock(time.perf_counter())
        spec = plan_early_copies({e: len(r[0]) for e, r in predicted.items()}, set(self.policy.placement.resident_experts(nxt2)),
                                 free, Clock(cpu_free, copy_free, lead), self.timing)
        early = Early()
        for (e, slot), land in zip(spec.copies, spec.lands):
            early.slots[e], early.events[e] = slot, self.copy(nxt2, e, slot, "ahead2")
            self.lands[(nxt2, e)] = at + land / 1000
            self.counters.add("speculative_copies", nxt2, 1)
            self.counters.add("two_ahead_copies", nxt2, 1)
            self.counters.add("copied_bytes", nxt2, self.store.expert_bytes)
        if early.slots:
            self.early[nxt2] = early

    def score_prediction(self, layer_idx: int, predicted: torch.Tensor, true: torch.Tensor) -> None:
        """Predicted experts that the true router also chose, over the true choices."""
        shared = sum(len(set(p) & set(t)) for p, t in zip(predicted.tolist(), true.tolist()))
        self.counters.add("predicted_hits", layer_idx, shared)
        self.counters.add("predicted_total", layer_idx, true.numel())


def prediction_parts(pred: Prediction | None, ahead: tuple[int, torch.Tensor] | None) -> list[torch.Tensor]:
    """What a decode layer reads of its predictions, in this order: l+1's raw and used ids, then l+2's."""
    if pred is None:
        return []
    return [pred.raw_ids, pred.ids] + ([ahead[1]] if ahead else [])


def split_rows(config, store, cuda: bool) -> SplitRows | None:
    """Where predicted misses may be split between the channels (`plan_speculation`): asked for (the
    preset's `split_experts`, or DAOP_SPLIT_EXPERTS=1, which also allows it on a CPU device, for
    tests), a preset with CPU experts and speculative copies on the true input, float SwiGLU experts
    (what `daop.quant.expert_rows` computes), and a GPU: on a CPU device both parts would run on the
    same processor. DAOP_SPLIT_EXPERTS=0 turns it off."""
    on = switch("DAOP_SPLIT_EXPERTS")
    able = (config.cpu_experts and config.speculative_copies and not config.stale_input
            and not store.fmt.quantized and store.fmt.plain)
    if not able or on is False or not (config.split_experts or on) or not (cuda or on):
        return None
    return SplitRows.for_inter(store.inter)


def timing_costs(cost: CostModel) -> CostModel:
    """The costs the runner's timeline plans with: in decode both channels read host memory most of
    the time, so a CPU expert and a copy take the profile's side-by-side times (`CostModel.side_by_side`;
    1.17x and 1.22x their times alone in the H200 profile). DAOP_SIDE_BY_SIDE=0 plans with the times alone."""
    return cost if switch("DAOP_SIDE_BY_SIDE") is False else cost.side_by_side()


def decode_swaps(config) -> tuple[int, int, float]:
    """(window, every, z) of decode re-swaps (`DaopConfig.decode_swap_every`, `decode_swap_window`,
    `decode_swap_z`), or (0, 0, 0.0) where they are off; DAOP_DECODE_SWAPS=WINDOW/EVERY[/Z] sets them
    (e.g. 32/8, or 32/8/0 for the paper's bare 1.05 rule), =0 turns them off."""
    env = os.environ.get("DAOP_DECODE_SWAPS", "").strip()
    if env == "0":
        return 0, 0, 0.0
    if env:
        parts = env.split("/")
        try:
            if len(parts) not in (2, 3):
                raise ValueError
            window, every = int(parts[0]), int(parts[1])
            z = float(parts[2]) if len(parts) == 3 else config.decode_swap_z
        except ValueError:
            raise DaopError(f"DAOP_DECODE_SWAPS={env!r}: expected WINDOW/EVERY in decode calls, optionally /Z "
                            "(e.g. 32/8 or 32/8/1), or 0") from None
        if window < 1 or every < 1:
            raise DaopError(f"DAOP_DECODE_SWAPS={env!r}: the window and the period must be at least 1 call")
        if not 0.0 <= z < float("inf"):
            raise DaopError(f"DAOP_DECODE_SWAPS={env!r}: the noise margin Z must be a number >= 0")
        return window, every, z
    if config.decode_swap_every > 0:
        return config.decode_swap_window, config.decode_swap_every, config.decode_swap_z
    return 0, 0, 0.0


def switch(name: str) -> bool | None:
    """An on/off environment setting: True for 1, False for 0, None where it is unset; anything else
    is an error that names it."""
    env = os.environ.get(name, "").strip()
    if env not in ("", "0", "1"):
        raise DaopError(f"{name}={env!r}: expected 1 (on) or 0 (off)")
    return None if env == "" else env == "1"


def place_on_prompt(config) -> bool:
    """Whether decode starts from a placement on the prompt's counts (`DaopConfig.place_on_prompt`);
    DAOP_PLACE_ON_PROMPT=1 turns it on for every DAOP preset, =0 off."""
    on = switch("DAOP_PLACE_ON_PROMPT")
    return config.place_on_prompt if on is None else on


def late_predictions() -> bool:
    """Whether a decode layer expected to have CPU experts predicts the next layers only once they
    are submitted (the default); DAOP_LATE_PREDICT=0 predicts before every routing read. (In a
    captured step the pieces make the predictions, at no cost to the host: never late there.)"""
    return switch("DAOP_LATE_PREDICT") is not False


def launch_first() -> bool:
    """Whether a decode layer whose experts the GPU alone serves launches them before it speculates
    for the next layer (the default); DAOP_LAUNCH_FIRST=0 speculates first, as every layer does."""
    return switch("DAOP_LAUNCH_FIRST") is not False


def early_submits() -> bool:
    """Whether a decode layer starts the CPU experts the layer before promised it before planning the
    rest (`DaopRunner.submit_promised`): DAOP_EARLY_SUBMIT=1; off by default."""
    return switch("DAOP_EARLY_SUBMIT") is True


def two_ahead(config) -> bool:
    """Whether layer l copies l+2's predicted misses: the preset's `two_ahead_copies` with speculative
    copies on the true input and CPU experts; DAOP_TWO_AHEAD=0 turns it off, =1 on for such presets."""
    on = switch("DAOP_TWO_AHEAD")
    able = config.speculative_copies and config.cpu_experts and not config.stale_input and not config.predicted_routing
    return able and on is not False and (config.two_ahead_copies or on is True)
