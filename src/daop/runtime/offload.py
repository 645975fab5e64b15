"""The offloaded expert runner: routes each layer's experts through a policy's plan.

Per layer: read the routing on the host, ask the policy for a plan, start CPU experts first (they
are the slowest), queue copies on the copy stream, run resident and copied experts on the GPU,
then add every expert's output in ascending expert order, exactly as the all-resident runner
does, so exact policies give the same tokens. Shapes: N tokens, D hidden, K top-k.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import torch

from daop.executors.cpu import CpuExecutor, QueuedFuture
from daop.executors.transfer import Transfer
from daop.model.moe import expert_inputs, group_by_expert, token_rows, weighted_sum
from daop.placement.policies import LayerPlan, Policy
from daop.quant import (expert_forward, expert_rows, grouped_on_device, grouped_swiglu, indexed_swiglu, routed_experts,
                        routes_on_device)
from daop.runtime.stats import Counters
from daop.runtime.timeline import Timeline
from daop.weights.expert_store import ExpertStore


PAIR_TABLE_SLOTS = 256
STAGE_ROWS = 64  # a layer call of at most this many tokens copies its activations to the host with its routing
# Decode's routing reads (`read_routing`): "hybrid" sleeps until the CPU experts the GPU waits on are
# done, then polls; DAOP_ROUTING_WAIT=block sleeps on the event throughout. (Polling throughout took a
# core from the CPU experts: static's step 48 ms against 29-31 on an H200 host,
# benchmarks/results/h200-mixtral-8x7b-8layers-decode-host-path-ab.jsonl.)
ROUTING_WAIT = "block" if os.environ.get("DAOP_ROUTING_WAIT", "") == "block" else "hybrid"


class OffloadedExperts:
    """ExpertRunner over an ExpertStore, a Policy, a CPU executor and the transfer owner."""

    def __init__(self, store: ExpertStore, policy: Policy, cpu: CpuExecutor, transfer: Transfer, num_layers: int) -> None:
        self.store, self.policy, self.cpu, self.transfer = store, policy, cpu, transfer
        self.counters = Counters(num_layers)
        self.slot_contents: dict[int, tuple[int, int]] = {}  # slot -> (layer, expert) it holds
        self.layer_slots: dict[int, dict[int, int]] = {}  # layer -> {slot: expert} (the same, by layer)
        self.landing: dict[int, Any] = {}  # resident slot -> the event of a copy into it that no read has waited for
        self.timeline: Timeline | None = None  # set to record a measured timeline of decode steps
        # Host estimates (perf_counter seconds, from the cost model) of when each channel is through
        # the work queued on it so far, corrected when the work is seen finished (channel_clock).
        self.copy_free_at = self.cpu_free_at = 0.0
        self.cpu_last: Future | None = None
        self.deferred: list[QueuedFuture] = []  # CPU jobs the GPU consumed without the host waiting
        self.slot_pairs: torch.Tensor | None = None  # [S, S, 2] on the device: (a, b) at [a, b] (`slot_index`)
        self.timing = self.plan_costs()  # the costs behind the channels' backlog estimates (`channel_clock`)
        self.copy_s = self.timing.copy_ms() / 1000 if math.isfinite(self.timing.copy_ms()) else 0.0
        self.apply_placement(policy.placement, force=True)

    def plan_costs(self):
        """The cost model the runner's estimates use: the policy's."""
        return self.policy.ctx.cost

    def apply_placement(self, placement, force: bool = False) -> None:
        """Copy experts into the slots the placement names (only slots holding something else unless force)."""
        for layer_idx in self.policy.ctx.moe_layers:
            for expert_idx in placement.resident_experts(layer_idx):
                slot = placement.slot(layer_idx, expert_idx)
                if force or self.slot_contents.get(slot) != (layer_idx, expert_idx):
                    self.transfer.wait(self.copy(layer_idx, expert_idx, slot))

    def copy(self, layer_idx: int, expert_idx: int, slot: int, kind: str = "copy"):
        """Queue a host->slot copy and remember what the slot holds; returns the completion event."""
        self.hold(slot, layer_idx, expert_idx)
        self.copy_free_at = max(time.perf_counter(), self.copy_free_at) + self.copy_s
        timing = self.timeline.copy_events() if self.timeline else None
        done = self.transfer.copy_expert(self.store.host_weights(layer_idx, expert_idx), self.store.slot_weights(slot), slot,
                                         timing)
        if timing is not None:
            self.timeline.copy_span(layer_idx, expert_idx, kind, timing)
        return done

    def copy_rows(self, layer_idx: int, expert_idx: int, slot: int, k: int, kind: str = "split"):
        """Queue a copy of an expert's intermediate rows [k, I) into a scratch slot (the GPU's part of a
        split expert, `daop.quant.expert_rows`); returns the completion event. The slot then holds no
        whole expert."""
        self.forget(slot)
        inter = self.store.inter
        self.copy_free_at = max(time.perf_counter(), self.copy_free_at) + self.copy_s * (inter - k) / inter
        timing = self.timeline.copy_events() if self.timeline else None
        done = self.transfer.copy_expert_rows(self.store.host_weights(layer_idx, expert_idx), self.store.slot_weights(slot),
                                              slot, k, inter, timing)
        if timing is not None:
            self.timeline.copy_span(layer_idx, expert_idx, kind, timing)
        return done

    def forget(self, slot: int) -> None:
        old = self.slot_contents.pop(slot, None)
        if old is not None:
            self.layer_slots[old[0]].pop(slot, None)

    def hold(self, slot: int, layer_idx: int, expert_idx: int) -> None:
        self.forget(slot)
        self.slot_contents[slot] = (layer_idx, expert_idx)
        self.layer_slots.setdefault(layer_idx, {})[slot] = expert_idx

    def move(self, layer_idx: int, expert_idx: int, src: int, dst: int) -> None:
        """Copy an expert from slot src to slot dst on the device, in compute order (after every read
        of dst queued so far, and after a host copy into dst still landing); src may be overwritten
        once it is done."""
        self.transfer.wait(self.landing.pop(dst, None))
        for d, s in zip(self.store.slot_weights(dst), self.store.slot_weights(src)):
            d.copy_(s)
        self.hold(dst, layer_idx, expert_idx)
        self.transfer.release_slot(src)
        self.transfer.release_slot(dst)

    def mark(self, layer_idx: int, name: str) -> None:
        if self.timeline is not None:
            self.timeline.mark(layer_idx, name)

    def reset(self) -> None:
        """Start a new sequence from the policy's calibrated placement (copies back what moved)."""
        self.collect(wait=True)
        self.policy.reset()
        self.apply_placement(self.policy.placement)

    def set_phase(self, phase: str) -> None:
        """Baseline policies plan prefill and decode alike."""

    def totals(self) -> dict[str, float]:
        self.collect(wait=True)  # the busy time of CPU jobs the GPU consumed
        return {**self.counters.totals(), "cpu_busy_s": self.cpu.busy_s, "cpu_expert_tokens": float(self.cpu.expert_tokens)}

    def close(self) -> None:
        self.collect(wait=True)
        self.cpu.close()

    def __call__(self, layer_idx: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self.mark(layer_idx, "enter")
        rows_host = group_by_expert(self.read_routing(ids, h))  # the plan needs the routing on the host
        self.mark(layer_idx, "routed")
        plan = self.policy.plan(layer_idx, {e: len(r[0]) for e, r in rows_host.items()})
        return self.execute(layer_idx, h, weights, rows_host, plan)

    def read_routing(self, ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """A layer's routing (ids, or several routings concatenated) on the host. In decode (at most
        STAGE_ROWS tokens) the layer's activations h come with it (`Transfer.stage`), so a CPU job
        planned from the routing starts at once, without a copy and an event wait of its own; and the
        host sleeps only until the CPU experts the GPU waits on are done, then polls the routing's
        event (ROUTING_WAIT "hybrid"), so it reads the routing as soon as the GPU has made it."""
        if h.shape[0] > STAGE_ROWS or not self.transfer.cuda:
            return self.transfer.read_on_host(ids)
        self.transfer.stage(h)
        if ROUTING_WAIT == "hybrid":
            for job in self.deferred:
                if not job.done():
                    job.join()
        return self.transfer.read_on_host(ids, spin=ROUTING_WAIT == "hybrid")

    def cpu_job(self, layer_idx: int, h: torch.Tensor, rows_host: dict, experts: Sequence[int], ahead: bool = False,
                parts: dict[int, int] | None = None) -> Future:
        """Start computing `experts` of layer_idx for their rows of h on the CPU (ahead: for a later
        layer; parts: expert -> K, only the intermediate rows [0, K) of a split expert)."""
        jobs = [(e, rows_host[e][0], self.store.host_weights(layer_idx, e)) for e in experts]
        tl = self.timeline
        span = (lambda *t: tl.cpu_span(layer_idx, "ahead" if ahead else "cpu", *t)) if tl else None
        parts = parts or {}
        submitted = time.perf_counter()
        self.cpu_last = self.transfer.host_job(
            h, lambda h_host, ready: self.cpu.submit(jobs, h_host, ready, ahead=ahead, span=span, parts=parts))
        # the channel's estimate, once the job is on its way (the estimate does not hold it up)
        cost, inter = self.timing, self.store.inter
        work = sum(cost.cpu_ms(len(r)) * parts.get(e, inter) / inter for e, r, _ in jobs)
        self.cpu_free_at = max(submitted, self.cpu_free_at) + work / 1000
        return self.cpu_last

    def channel_clock(self, now: float) -> tuple[float, float]:
        """(CPU free, copy stream free) in ms from `now`: the estimates, or 0 where the work is done."""
        if self.cpu_last is None or self.cpu_last.done():
            self.cpu_free_at = min(self.cpu_free_at, now)
        if self.transfer.copies_done():
            self.copy_free_at = min(self.copy_free_at, now)
        return max(0.0, self.cpu_free_at - now) * 1000, max(0.0, self.copy_free_at - now) * 1000

    def execute(self, layer_idx: int, h: torch.Tensor, weights: torch.Tensor, rows_host: dict, plan: LayerPlan,
                ready: dict[int, tuple[int, Any]] | None = None,
                precalc: Sequence[tuple[Future, tuple[int, ...]]] | None = None,
                before_compute: Callable[[], None] | None = None,
                after_launch: Callable[[], None] | None = None, halves: dict[int, Any] | None = None) -> torch.Tensor:
        """Carry out a plan: CPU jobs first, then copies, then GPU work; sum outputs in expert order.

        ready: experts already copied into scratch slots (expert -> (slot, copy event)); precalc: CPU
        jobs started earlier (a pre-calculation, an early submit) and the experts of their results
        to use (collected after this layer's own CPU results); before_compute: a callback run once this layer's copies and CPU
        jobs are queued (speculation for the next layer); after_launch: one run once the GPU work is
        launched, before the CPU results are awaited (prefill settles slots and prefetches here; decode
        speculates here in a layer whose experts the GPU alone serves);
        halves: the copy events of the split experts' GPU parts (plan.split), by expert: the CPU
        computes each one's first rows with this layer's CPU experts, the GPU the rest from its slot,
        and the two outputs are added in float32.
        """
        ready, halves, precalc = ready or {}, halves or {}, list(precalc or ())
        used = tuple(e for _, experts in precalc for e in experts)
        check_served(layer_idx, rows_host, plan, ready, used)
        cpu_experts = (*plan.cpu, *(e for e, _, _ in plan.split))
        future = (self.cpu_job(layer_idx, h, rows_host, cpu_experts, parts={e: k for e, _, k in plan.split})
                  if cpu_experts else None)
        self.mark(layer_idx, "cpu_submitted")
        self.collect()  # after the submit: the CPU starts first
        # A slot that this plan reads before (a resident expert, an earlier copy) is refilled only
        # after that read has been queued; the others are copied right away.
        busy = {slot for _, slot in plan.gpu} | {slot for slot, _ in ready.values()}
        first_use: dict[int, Any] = {}
        for i, (e, slot) in enumerate(plan.copy):
            if slot not in busy:
                first_use[i] = self.copy(layer_idx, e, slot)
            busy.add(slot)
        self.mark(layer_idx, "copies_queued")
        if before_compute is not None:
            before_compute()
        rows = token_rows(h, rows_host)
        ys: dict[int, torch.Tensor] = {}
        gpu_items = ([(e, slot, self.landing.pop(slot, None)) for e, slot in plan.gpu]
                     + [(e, s, ev) for e, (s, ev) in ready.items()])
        copy_items = [(e, slot, first_use.get(i)) for i, (e, slot) in enumerate(plan.copy)]
        products = (self.grouped_products if grouped_on_device(self.store.fmt, h.device, h.shape[0], self.store.hidden,
                                                              self.store.inter)
                    else self.indexed_products if routes_on_device(self.store.fmt, h.device, h.shape[0]) else None)
        out = None
        if (products == self.indexed_products and h.shape[0] == 1 and weights.shape[1] <= 2 and not copy_items
                and not cpu_experts and not precalc):
            out = self.picks_in_slots(h, weights, rows_host, gpu_items)  # the whole sum, the GPU's alone
        elif products is not None:  # the slots' experts in one launch per product
            ys.update(self.grouped(layer_idx, h, rows, gpu_items + copy_items, len(gpu_items), products))
            xs = expert_inputs(h, rows, [e for e, _, _ in plan.split])
        else:
            xs = expert_inputs(h, rows, [e for e, _, _ in gpu_items + copy_items] + [e for e, _, _ in plan.split])
            for n, (e, slot, event) in enumerate(gpu_items + copy_items):
                if n >= len(gpu_items) and event is None:
                    event = self.copy(layer_idx, e, slot)
                self.transfer.wait(event)
                ys[e] = expert_forward(xs[e], self.store.slot_weights(slot), self.store.fmt.glu)
                self.transfer.release_slot(slot)
        tails: dict[int, torch.Tensor] = {}
        for e, slot, k in plan.split:
            self.transfer.wait(halves.get(e))
            tails[e] = expert_rows(xs[e], self.store.slot_weights(slot), k, self.store.inter)
            self.transfer.release_slot(slot)
        self.mark(layer_idx, "gpu_launched")
        if after_launch is not None:
            after_launch()
        t0 = time.perf_counter()
        for job, experts in ((future, cpu_experts), *precalc):
            if job is not None and self.waits_on_device(job):
                ys.update(self.read_on_device(job, experts))
            elif job is not None:
                results = job.result()
                for e in experts:
                    ys[e] = self.transfer.to_device(results[e])
        for e, tail in tails.items():
            ys[e] = (ys[e].float() + tail.float()).to(tail.dtype)
        self.mark(layer_idx, "cpu_collected")
        self.count(layer_idx, h.shape[0], plan, len(ready), len(used), time.perf_counter() - t0)
        if out is None:
            out = weighted_sum(h, ys, weights, rows_host, rows)
        self.mark(layer_idx, "exit")
        return out

    def grouped(self, layer_idx: int, h: torch.Tensor, rows: dict | None, items: list, copied_from: int,
                products: Callable[[torch.Tensor, dict | None, list[tuple[int, int]]], dict[int, torch.Tensor]]
                ) -> dict[int, torch.Tensor]:
        """Outputs of the experts in slots (items: (expert, slot, copy event or None); those from
        `copied_from` on are copies, None where the slot is read earlier in the plan) through one
        launch per product over the slot stack (`products`: `grouped_products` for many rows,
        `indexed_products` for a few), as the all-resident runner runs a layer's experts: in waves,
        a wave ending where a copy must wait for a read of its slot queued in it."""
        ys: dict[int, torch.Tensor] = {}
        wave: list[tuple[int, int]] = []

        def launch() -> None:
            if not wave:
                return
            ys.update(products(h, rows, wave))
            for _, slot in wave:
                self.transfer.release_slot(slot)
            wave.clear()

        for n, (e, slot, event) in enumerate(items):
            if n >= copied_from and event is None:
                if any(s == slot for _, s in wave):
                    launch()  # the read of this slot goes first; the copy waits for it (release_slot)
                event = self.copy(layer_idx, e, slot)
            self.transfer.wait(event)
            wave.append((e, slot))
        launch()
        return ys

    def picks_in_slots(self, h: torch.Tensor, weights: torch.Tensor, rows_host: dict, items: list) -> torch.Tensor:
        """One token's weighted sum [1, D] where its K <= 2 picks all sit in slots on the GPU (items:
        (expert, slot, copy event or None)): the picks in column order through the GEMV kernel, each
        stored scaled by its weight, then added (`routed_experts` over the slot stack), which is bit
        for bit what `weighted_sum` gives of the experts computed one by one (two picks: a + b ==
        b + a), in 4 launches and little host work where the products and the sum took some ten."""
        slot_of: dict[int, int] = {}
        for e, slot, event in items:
            self.transfer.wait(event)
            slot_of[e] = slot
        by_col = [0] * weights.shape[1]
        for e, (_, cols) in rows_host.items():
            for c in cols.tolist():
                by_col[c] = slot_of[e]
        out = routed_experts(h.contiguous(), self.slot_index(by_col, h.device).view(1, -1), weights, self.store.slots)
        for slot in slot_of.values():
            self.transfer.release_slot(slot)
        return out

    def grouped_products(self, h: torch.Tensor, rows: dict, wave: list[tuple[int, int]]) -> dict[int, torch.Tensor]:
        """A wave's experts (expert, slot) on their token rows through grouped products (`grouped_swiglu`)."""
        wave = sorted(wave, key=lambda item: item[1])
        counts = [0] * self.store.num_slots
        for e, slot in wave:
            counts[slot] = len(rows[e][0])
        ends = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(h.device, non_blocking=True)
        x = h[torch.cat([rows[e][0] for e, _ in wave])]
        y = grouped_swiglu(x, ends, self.store.slots[0], self.store.slots[1])
        return dict(zip([e for e, _ in wave], y.split([counts[slot] for _, slot in wave])))

    def indexed_products(self, h: torch.Tensor, rows: dict | None, wave: list[tuple[int, int]]) -> dict[int, torch.Tensor]:
        """A wave's experts (expert, slot) on their few token rows through the GEMV kernel, each row
        reading its expert's slot (`indexed_swiglu`): the values `expert_forward` gives per expert."""
        counts = [h.shape[0] if rows is None else len(rows[e][0]) for e, _ in wave]
        idx = self.slot_index([slot for (_, slot), n in zip(wave, counts) for _ in range(n)], h.device)
        if rows is None:  # one token: every row reads it
            x, x_div = h, sum(counts)
        else:
            x, x_div = h[torch.cat([rows[e][0] for e, _ in wave])], 1
        y = indexed_swiglu(x.contiguous(), idx, x_div, self.store.slots)
        return dict(zip([e for e, _ in wave], y.split(counts)))

    def slot_index(self, slots: list[int], device: torch.device) -> torch.Tensor:
        """Slot numbers as a device tensor: one or two (a token's experts in decode) as a view of a
        table on the device (up to PAIR_TABLE_SLOTS slots: 1 MB), with no copy; more through pinned
        memory, a copy that never waits for the stream (a pageable one may)."""
        if len(slots) <= 2 and self.store.num_slots <= PAIR_TABLE_SLOTS:
            if self.slot_pairs is None:
                S = self.store.num_slots
                grid = torch.arange(S).repeat_interleave(S), torch.arange(S).repeat(S)
                self.slot_pairs = torch.stack(grid, dim=1).view(S, S, 2).to(device)
            return self.slot_pairs[slots[0], slots[-1], 2 - len(slots):]
        return torch.tensor(slots, pin_memory=True).to(device, non_blocking=True)

    def waits_on_device(self, job: Future) -> bool:
        """Whether the GPU can wait for this CPU job itself: queued on the C kernel's thread, with
        pinned outputs, stream waits that work here, and no graph being captured."""
        return (isinstance(job, QueuedFuture) and self.transfer.device_wait is not None
                and job.queued.pinned and not torch.cuda.is_current_stream_capturing())

    def read_on_device(self, job: QueuedFuture, experts: Sequence[int]) -> dict[int, torch.Tensor]:
        """The compute stream waits for the job's ticket, then reads its outputs from pinned memory;
        the host goes on (the job is collected later, `collect`, for its counters and any error)."""
        self.transfer.device_wait.wait(job.queued.ticket)
        outs = dict(zip(job.experts, job.queued.ys))
        self.deferred.append(job)
        return {e: self.transfer.host_reader.upload(outs[e]) for e in experts}

    def collect(self, wait: bool = False) -> None:
        """Take the results of CPU jobs the GPU consumed (their busy time, spans and errors): the
        finished ones, or all of them with `wait`."""
        done = [job for job in self.deferred if wait or job.done()]
        self.deferred = [job for job in self.deferred if job not in done]
        for job in done:  # an error is raised once, and leaves nothing behind for the next call
            job.result()

    def count(self, layer_idx: int, num_tokens: int, plan: LayerPlan, ready: int, precalc: int, cpu_wait_s: float) -> None:
        c = self.counters
        c.add("cpu_wait_s", layer_idx, cpu_wait_s)
        c.add("resident_calls", layer_idx, len(plan.gpu) + ready)
        c.add("cpu_calls", layer_idx, len(plan.cpu) + precalc)
        c.add("copy_calls", layer_idx, len(plan.copy))
        c.add("split_calls", layer_idx, len(plan.split))
        c.add("split_cpu_share", layer_idx, sum(k for _, _, k in plan.split) / self.store.inter)
        c.add("copied_bytes", layer_idx, len(plan.copy) * self.store.expert_bytes)
        c.add("layer_calls", layer_idx, 1)
        c.add("tokens", layer_idx, num_tokens)


def check_served(layer_idx: int, rows_host: dict, plan: LayerPlan, ready: dict, precalc: tuple[int, ...]) -> None:
    """Every routed expert of the layer is served exactly once, and nothing else is."""
    served = sorted([e for e, _ in plan.gpu] + list(plan.cpu) + [e for e, _ in plan.copy] + [e for e, _, _ in plan.split]
                    + list(ready) + list(precalc))
    if served != sorted(rows_host):
        raise RuntimeError(f"layer {layer_idx}: the plan serves experts {served}, the routing needs {sorted(rows_host)}")
