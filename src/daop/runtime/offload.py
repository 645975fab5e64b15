"""The offloaded expert runner: routes each layer's experts through a policy's plan.

Per layer: read the routing on the host, ask the policy for a plan, start CPU experts first (they
are the slowest), queue copies on the copy stream, run resident and copied experts on the GPU,
then add every expert's output in ascending expert order, exactly as the all-resident runner
does, so exact policies give the same tokens. Shapes: N tokens, D hidden, K top-k.
"""
from __future__ import annotations

import time

import torch

from daop.executors.cpu import CpuExecutor
from daop.executors.transfer import Transfer
from daop.model.moe import expert_input, group_by_expert, swiglu, token_rows, weighted_sum
from daop.placement.policies import Policy
from daop.runtime.stats import Counters
from daop.weights.expert_store import ExpertStore


class OffloadedExperts:
    """ExpertRunner over an ExpertStore, a Policy, a CPU executor and the transfer owner."""

    def __init__(self, store: ExpertStore, policy: Policy, cpu: CpuExecutor, transfer: Transfer, num_layers: int) -> None:
        self.store, self.policy, self.cpu, self.transfer = store, policy, cpu, transfer
        self.counters = Counters(num_layers)
        self.slot_contents: dict[int, tuple[int, int]] = {}
        self.apply_placement(policy.placement, force=True)

    def apply_placement(self, placement, force: bool = False) -> None:
        """Copy experts into the slots the placement names (only slots holding something else unless force)."""
        for layer_idx in self.policy.ctx.moe_layers:
            for expert_idx in placement.resident_experts(layer_idx):
                slot = placement.slot(layer_idx, expert_idx)
                if force or self.slot_contents.get(slot) != (layer_idx, expert_idx):
                    self.transfer.wait(self.copy(layer_idx, expert_idx, slot))

    def copy(self, layer_idx: int, expert_idx: int, slot: int):
        """Queue a host->slot copy and remember what the slot holds; returns the completion event."""
        self.slot_contents[slot] = (layer_idx, expert_idx)
        return self.transfer.copy_expert(self.store.host_weights(layer_idx, expert_idx), self.store.slot_weights(slot), slot)

    def reset(self) -> None:
        """Start a new sequence from the policy's calibrated placement (copies back what moved)."""
        self.policy.reset()
        self.apply_placement(self.policy.placement)

    rows_of = staticmethod(group_by_expert)

    def __call__(self, layer_idx: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        rows_host = self.rows_of(ids.cpu())  # the plan needs the routing on the host
        plan = self.policy.plan(layer_idx, {e: len(r[0]) for e, r in rows_host.items()})
        return self.execute(layer_idx, h, weights, rows_host, plan)

    def execute(self, layer_idx: int, h: torch.Tensor, weights: torch.Tensor, rows_host: dict, plan,
                ready: dict[int, tuple[int, object]] | None = None, done: dict[int, torch.Tensor] | None = None,
                before_compute=None) -> torch.Tensor:
        """Carry out a plan: CPU jobs first, then copies, then GPU work; sum outputs in expert order.

        ready: experts already copied into scratch slots (expert -> (slot, copy event)); done:
        outputs computed earlier (expert -> y on the host or device); before_compute: a callback run
        once this layer's copies and CPU jobs are queued (speculation for the next layer).
        """
        c = self.counters
        future = None
        if plan.cpu:
            h_host, h_ready = self.transfer.to_host(h)
            jobs = [(e, rows_host[e][0], self.store.host_weights(layer_idx, e)) for e in plan.cpu]
            future = self.cpu.submit(jobs, h_host, h_ready)
        # A slot that this plan reads before (a resident expert, an earlier copy) is refilled only
        # after that read has been queued; the others are copied right away.
        busy = {slot for _, slot in plan.gpu} | {slot for slot, _ in (ready or {}).values()}
        first_use: dict[int, object] = {}
        for i, (e, slot) in enumerate(plan.copy):
            if slot not in busy:
                first_use[i] = (slot, self.copy(layer_idx, e, slot))
            busy.add(slot)
        if before_compute is not None:
            before_compute()
        rows = token_rows(h, rows_host)
        ys: dict[int, torch.Tensor] = {e: self.transfer.to_device(y) for e, y in (done or {}).items()}
        gpu_items = [(e, slot, None) for e, slot in plan.gpu] + [(e, s, ev) for e, (s, ev) in (ready or {}).items()]
        copy_items = [(e, slot, first_use[i][1] if i in first_use else None) for i, (e, slot) in enumerate(plan.copy)]
        for n, (e, slot, event) in enumerate(gpu_items + copy_items):
            if n >= len(gpu_items) and event is None:
                event = self.copy(layer_idx, e, slot)
            self.transfer.wait(event)
            ys[e] = swiglu(expert_input(h, rows, e), *self.store.slot_weights(slot))
            self.transfer.release_slot(slot)
        if future is not None:
            t0 = time.perf_counter()
            for e, y in future.result().items():
                ys[e] = self.transfer.to_device(y)
            c.add("cpu_wait_s", layer_idx, time.perf_counter() - t0)
        out = weighted_sum(h, ys, weights, rows_host, rows)
        c.add("resident_calls", layer_idx, len(plan.gpu) + len(ready or {}))
        c.add("cpu_calls", layer_idx, len(plan.cpu) + len(done or {}))
        c.add("copy_calls", layer_idx, len(plan.copy))
        c.add("copied_bytes", layer_idx, len(plan.copy) * self.store.expert_bytes)
        c.add("layer_calls", layer_idx, 1)
        c.add("tokens", layer_idx, h.shape[0])
        return out
