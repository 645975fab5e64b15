"""Decode layers handed from the GPU to the CPU kernel without the driving thread (on by default;
DAOP_HANDOFF=0 turns it off).

In an offloaded decode step the driving thread reads each MoE layer's routing on the host, plans it
and queues the CPU experts; the CPU's next expert starts only after the GPU has combined the layer
before, made this layer's routing, copied it to the host, and the host has woken, planned and
queued. On the H200 hosts that chain left the CPU idle about 0.5-0.6 ms per layer between one
layer's CPU experts and the next's (`cpu_spans` in
`benchmarks/results/h200-mixtral-8x7b-8layers-step-timelines.jsonl`).

Where a decode layer's plan is fixed by the placement alone (one token; every pick the placement
keeps on the GPU computed from its slot, every other pick on the CPU; no copies, scratch slots,
predictions or split experts: daop-exact's decode on Mixtral-sized experts, where its scratch slots
hold resident experts), the host need not see the routing at all:

- the host queues the layer's K pick jobs on the C kernel's thread (`cpu_expert.Picks`) before it
  launches the layer: each waits for a flag in pinned memory, then computes the expert its pick
  routed to if the layer's table gives the CPU that expert;
- the GPU writes the token's activations and routing into the jobs' pinned buffers
  (`handoff_kernels.post`), then the flag (`device_wait.HostGate`); it computes the picks its slots
  hold through the GEMV kernel (a pick of a host expert reads nothing and comes out zero), waits for
  the jobs' ticket (`device_wait.DeviceWait`), and `handoff_kernels.finish` reads their outputs from
  pinned memory and adds each pick's output, scaled by its weight, in the order `weighted_sum` adds
  them: the same values as the planned path;
- the host returns at once and launches the next layer; at the step's last MoE layer it sleeps
  until that layer's CPU jobs are done, so that its wait for the step's token (a device-to-host copy,
  which spins) is short and takes no core from the CPU experts for long.

The routing reaches the host after the step: each layer's counts (and decode re-swaps) are taken at
the layer's next call, or when the runner flushes (a phase change, a reset, its totals). A slot whose
settle or swap copy has not landed yet is left out of the table for that call (its experts go to the
CPU), as the planned path lets the CPU take them.

On by default since it was measured on an H100 host against the planned path
(`benchmarks/results/h100-mixtral-8x7b-8layers-handoff-ab.jsonl`: 0.81-0.88x its decode time). On a
CPU device it runs only where the CPU experts use the C kernel (tests set that up: the kernel's
products are not torch's, which a CPU device's exact policies must match).
"""
from __future__ import annotations

import time

import torch

from daop.kernels import cpu_expert, device_wait, handoff_kernels
from daop.model.moe import add_picks, combine, group_by_expert
from daop.placement.policies import LayerPlan
from daop.quant import expert_forward, indexed_swiglu, routes_on_device


DEFAULT = True  # without DAOP_HANDOFF: on wherever a runner can hand off (`Handoff.able`)


def setting() -> bool | None:
    """DAOP_HANDOFF: True (=1), False (=0), or None where it is unset (then DEFAULT applies)."""
    from daop.runtime.daop_runner import switch  # (imported here: daop_runner imports this module)

    return switch("DAOP_HANDOFF")


class Handoff:
    """The hand-off of one runner's decode layers (see the module docstring)."""

    def __init__(self, runner) -> None:
        self.runner = runner
        store = runner.store
        self.device = runner.transfer.device
        self.cuda = self.device.type == "cuda"
        self.E = runner.policy.ctx.num_experts
        self.D, self.I = store.hidden, store.inter
        self.gate = device_wait.HostGate(self.device)  # its own flag (`able` has probed that such writes work)
        self.scratch = cpu_expert.scratch_for(self.D, self.I)
        self.picks: dict[int, cpu_expert.Picks] = {}
        self.tables: dict[int, tuple[tuple, torch.Tensor]] = {}  # layer -> (resident items, device slot table)
        self.pending: dict[int, tuple[cpu_expert.Picks, dict[int, int], float]] = {}  # layer -> last call's
        self.calls = 0
        self.iota: dict[int, torch.Tensor] = {}

    @staticmethod
    def able(runner) -> str | None:
        """Why this runner cannot hand off its decode layers, or None where it can."""
        store, cfg = runner.store, runner.policy.config
        if not store.fmt.plain or store.fmt.quantized or store.fmt.dtype != torch.bfloat16:
            return "the CPU kernel serves plain bf16 experts only"
        if not (runner.cpu.native and cpu_expert.available()):
            return "CPU experts do not run on daop's C kernel here"
        if not cfg.cpu_experts:
            return "the preset gives no experts to the CPU"
        if runner.transfer.cuda:
            if runner.transfer.device_wait is None or runner.transfer.host_reader is None:
                return "the GPU cannot wait for the CPU kernel or read its results here"
            if not routes_on_device(store.fmt, runner.transfer.device, 1) or not handoff_kernels.available():
                return "the GEMV kernel is not available"
            if device_wait.checked_gate(runner.transfer.device) is None:
                return "GPU stream writes to host memory do not work here"
        return None

    def serves(self, layer_idx: int, h: torch.Tensor, ids: torch.Tensor) -> bool:
        """Whether this decode call is handed off: one token, and a plan the placement alone fixes."""
        r = self.runner
        return (h.shape[0] == 1 and ids.shape[0] == 1 and not r.decode_predicts and not r.pending and not r.early
                and not (self.cuda and torch.cuda.is_current_stream_capturing()))

    def resident(self, layer_idx: int) -> dict[int, int]:
        """Expert -> slot for the layer's experts the GPU computes in this call: wanted, held, and
        not being filled by a copy still in flight (a landed copy's event is waited on, for free)."""
        r = self.runner
        holds = r.holds(layer_idx)
        out = {}
        for e, slot in r.wanted_slots(layer_idx).items():
            if holds.get(slot) != e:
                continue
            event = r.landing.get(slot)
            if event is not None:
                if not event.query():
                    continue
                r.transfer.wait(r.landing.pop(slot))
            out[e] = slot
        return out

    def tables_for(self, layer_idx: int, resident: dict[int, int], picks: cpu_expert.Picks) -> torch.Tensor:
        """The layer's device slot table for this placement (-1: the CPU's), with the picks' host
        tables set to the same split (rebuilt only when the placement changes)."""
        key = tuple(sorted(resident.items()))
        cached = self.tables.get(layer_idx)
        if cached is not None and cached[0] == key:
            return cached[1]
        table = torch.full((self.E,), -1, dtype=torch.int32)
        for e, slot in resident.items():
            table[e] = slot
        store = self.runner.store
        picks.set_tables({e: tuple(store.host_weights(layer_idx, e)) for e in range(self.E) if e not in resident})
        table = table.to(self.device)
        self.tables[layer_idx] = (key, table)
        return table

    def layer(self, layer_idx: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One decode layer's output [1, D], launched without reading the routing on the host."""
        r = self.runner
        r.mark(layer_idx, "enter")
        self.account(layer_idx)  # the layer's last call: its jobs are done (the step's token was read)
        K = ids.shape[1]
        picks = self.picks.get(layer_idx)
        if picks is None or picks.K != K:
            picks = self.picks[layer_idx] = cpu_expert.Picks(K, self.D, self.I, self.E, r.cpu.threads, self.scratch,
                                                              pin=self.cuda)
            self.tables.pop(layer_idx, None)
        resident = self.resident(layer_idx)
        table = self.tables_for(layer_idx, resident, picks)
        try:
            ticket = picks.submit(self.gate.flag, self.gate.next())
            submitted = time.perf_counter()
            r.mark(layer_idx, "routed")
            r.mark(layer_idx, "cpu_submitted")
            flat = ids.reshape(-1)
            if self.cuda:
                handoff_kernels.post(flat, h, picks.ids, picks.x)
            else:
                picks.ids.copy_(flat.to(torch.int32))
                picks.x.copy_(h.reshape(1, -1))
            self.gate.open()
            out = self.combine(h, flat, weights.reshape(-1), table, resident, picks, ticket)
        except BaseException:
            self.gate.force()  # the queued jobs must not wait for a write that will not come
            raise
        r.mark(layer_idx, "copies_queued")
        r.mark(layer_idx, "gpu_launched")
        r.mark(layer_idx, "cpu_collected")
        r.mark(layer_idx, "exit")
        self.pending[layer_idx] = (picks, resident, submitted)
        self.calls += 1
        if r.next_moe.get(layer_idx) is None:
            # The step's last MoE layer: the host sleeps (a condition wait, no GIL) until its CPU
            # work is done. Otherwise it would wait for the step's token in a device-to-host copy,
            # which spins on a core for most of the step, a core the CPU experts use.
            picks.lib.daop_wait(ticket)
        return out

    def combine(self, h: torch.Tensor, flat: torch.Tensor, w: torch.Tensor, table: torch.Tensor,
                resident: dict[int, int], picks: cpu_expert.Picks, ticket: int) -> torch.Tensor:
        """Each pick's output scaled by its weight (`combine`), from the GPU's slots or the CPU's
        jobs, added per token in ascending expert order (any order for two picks), as `weighted_sum`
        adds them."""
        r, K = self.runner, flat.numel()
        order = flat.argsort(stable=True) if K > 2 else None
        if order is not None:
            flat, w = flat[order], w[order]
        if self.cuda:
            slots = table[flat]
            on_gpu = indexed_swiglu(h.contiguous(), slots, K, r.store.slots, w.float())  # zeros where slots < 0
            for slot in resident.values():
                r.transfer.release_slot(slot)
            r.transfer.device_wait.wait(ticket)
            cols = order if order is not None else self.columns(K)
            return handoff_kernels.finish(on_gpu, picks.y, slots, cols, w)
        # a CPU device: the GPU's part computed here, expert by expert, once the jobs are done
        picks.lib.daop_wait(ticket)
        y = picks.y if order is None else picks.y[order]
        parts = []
        for k, e in enumerate(flat.tolist()):
            if e in resident:
                out = expert_forward(h, r.store.slot_weights(resident[e]), r.store.fmt.glu)
                parts.append(combine(out, w[k:k + 1]))
            else:
                parts.append(combine(y[k:k + 1], w[k:k + 1]))
        return add_picks(torch.cat(parts).view(1, K, -1))

    def columns(self, K: int) -> torch.Tensor:
        """0..K-1 on the device (the picks' order where it is the routing's), made once per K."""
        cols = self.iota.get(K)
        if cols is None:
            cols = self.iota[K] = torch.arange(K, device=self.device)
        return cols

    def account(self, layer_idx: int) -> None:
        """Count the layer's last handed-off call (its routing, now on the host), as the planned path
        counts a call, then the decode re-swaps that count may call for."""
        got = self.pending.pop(layer_idx, None)
        if got is None:
            return
        picks, resident, submitted = got
        r = self.runner
        served = picks.wait()
        ids = picks.ids.view(1, -1).long()
        picked = picks.ids.tolist()
        cpu = [e for e in picked if e not in resident]
        if [e not in resident for e in picked] != served:
            raise RuntimeError(f"layer {layer_idx}: the CPU computed picks {served} of experts {picked}, its table "
                               f"gives it {cpu}")
        plan = LayerPlan(gpu=tuple((e, resident[e]) for e in picked if e in resident), cpu=tuple(cpu))
        r.count(layer_idx, 1, plan, 0, 0, 0.0)
        r.counters.add("handoff_calls", layer_idx, 1)
        spans = picks.spans()
        r.cpu.busy_s += sum(b - a for a, b in spans)
        r.cpu.expert_tokens += len(spans)
        if r.timeline is not None and spans:
            r.timeline.cpu_span(layer_idx, "cpu", submitted, spans[0][0], spans[-1][1])
        if r.recent is not None:
            r.recent.add(layer_idx, {e: len(rows[0]) for e, rows in group_by_expert(ids).items()})
            if r.recent.due(layer_idx):
                r.swap_in(layer_idx)

    def flush(self) -> None:
        """Count every handed-off call not counted yet (waiting for its jobs)."""
        for layer_idx in sorted(self.pending):
            self.account(layer_idx)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.pending.clear()
