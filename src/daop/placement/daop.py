"""The DAOP policy (Zhang, Aggarwal, Mitra, DATE 2025) with every knob as a field, and presets.

Placement: per-layer quota from routing statistics, leftovers by global rank (section 2.1).
Prefill: per-sequence swaps of hot host experts with cold GPU experts, then a CPU/copy split of the
misses by the cost model (2.2, 2.3). Decode: layer l+1's router applied to layer l's normed state
predicts l+1's experts (2.4); what is done with the prediction depends on the switches:
  predicted_routing (A1)  use the prediction as the routing (the paper); off = the true router runs
  stale_input (A2)        pre-calculate predicted host experts on the CPU from layer l's input
  substitution (A3)       cap host experts per token, replacing the rest by resident ones (2.5)
  speculative_copies      copy predicted host experts into scratch slots ahead of need (exact)
  two_ahead_copies        also copy layer l+2's predicted misses from layer l (two layers of lead)
  cpu_experts             off: no expert ever runs on the CPU, every miss is copied (strict)
  decode_scratch          scratch slots kept for copies in decode; the others hold resident experts there
All switches off except speculative copies is `daop-exact`: the all-GPU path's routing, with
outputs equal to it up to CPU-vs-GPU rounding of CPU-computed experts (bitwise on a CPU-only
machine). `daop-strict` adds cpu_experts off: bitwise the all-GPU path's outputs on a GPU too.
The runner (runtime/daop_runner.py) carries the decisions out; this module decides only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np

from daop.errors import DaopError
from daop.placement.policies import Policy, PolicyContext
from daop.placement.table import HOST, Placement
from daop.predict.placement import quota_placement
from daop.predict.split import SplitPlan, makespan_split, sum_of_costs_split
from daop.predict.swaps import apply_swaps, plan_swaps


@dataclass(frozen=True)
class DaopConfig:
    first_predicted_layer: int = 1  # layers >= this are predicted from the layer before (decode)
    swap_fraction: float = 0.5
    swap_ratio: float = 1.05
    split: str = "makespan"  # or "sum" (the paper's per-expert rule)
    predicted_routing: bool = False
    stale_input: bool = False
    substitution: bool = False
    max_cpu_per_token: int = 1
    speculative_copies: bool = True
    balance_channels: bool = True  # a predicted miss is copied only if that lets the next layer finish sooner than the CPU would
    scratch_per_layer: int = 0  # scratch slots for copies, per layer in flight (0 = top_k)
    cpu_experts: bool = True  # off: every miss is copied to the GPU (bitwise equal to the all-GPU path)
    # a predicted miss may be split: its first rows on the CPU, the rest copied ahead. Off: on the H200
    # host the copy and the CPU share host memory bandwidth, and the split made decode slower
    # (README, "Split experts"); DAOP_SPLIT_EXPERTS=1 turns it on for every preset that can split
    split_experts: bool = False
    # layer l also copies layer l+2's predicted misses (l+2's router on l's input) where the copy lands
    # before the CPU would be through with them; needs speculative copies on the true input and CPU
    # experts. Off: on the H200 the copy queue is already busy most of the step, so two layers of lead
    # only reorder the same copies, with a less precise prediction, and decode was 5 % slower
    # (README, "Two-ahead copies"); DAOP_TWO_AHEAD=1 turns it on for every preset that can use it
    two_ahead_copies: bool = False
    # decode re-swaps: every `decode_swap_every` decode calls of a layer, the prefill's swap rule runs
    # again on the layer's counts over its last `decode_swap_window` calls, with a noise margin (a
    # pair swaps only if its counts differ by more than `decode_swap_z` standard deviations of a
    # Poisson difference: `plan_swaps`'s margin_z), and each swapped-in expert is copied into its
    # slot on the copy stream (0: off). On (32/8, z 1) except in daop-paper, which swaps at prefill
    # only; DAOP_DECODE_SWAPS=WINDOW/EVERY[/Z] sets it for every DAOP preset, =0 turns it off
    decode_swap_every: int = 8
    decode_swap_window: int = 32
    decode_swap_z: float = 1.0
    # placement on the prompt: when decode starts, the slots are placed again by the quota rule
    # (section 2.1) on the prompt's own routing counts, so the leftover slots can move between
    # layers; every expert that stays resident keeps its slot, the others are copied in at decode
    # start. On except in daop-paper: on the H200, with the trained-routing trace, decode was 0.85-1.00x
    # as long in three calls (benchmarks/results/h200-mixtral-8x7b-8layers-late-predict-place-on-prompt.jsonl),
    # the first token 0-12 % later; DAOP_PLACE_ON_PROMPT=1 turns it on for every DAOP preset, =0 off
    place_on_prompt: bool = True
    # scratch slots kept for copies in decode (None: all of them; "auto": none where the CPU serves a
    # one-token miss sooner than a copy and the GPU would, all of them elsewhere); the others hold
    # resident experts while a sequence decodes (placed with the rest at decode start) and are scratch
    # again in prefill, where copies made ahead bring the first token sooner. "auto" in daop-exact: on
    # the H100 hosts measured, with Mixtral-sized experts (a copy 6.4 ms, a CPU expert 2.9 ms) the CPU
    # experts alone read host memory about as fast as both channels together, and keeping the four
    # slots for copies made ahead made decode 1.21x / 1.11x as long with the trace at 0.5 / 0.25
    # (synthetic routing: 1.16x / 0.95x; benchmarks/results/h100-mixtral-8x7b-8layers-decode-scratch-ab.jsonl);
    # where copies are cheaper than the CPU (small experts) decode copies ahead into them as before.
    # DAOP_DECODE_SCRATCH=N sets it for every preset with CPU experts, =keep keeps them all, =auto
    decode_scratch: int | str | None = None

    @property
    def exact(self) -> bool:
        return not (self.predicted_routing or self.stale_input or self.substitution)


PRESETS: dict[str, DaopConfig] = {
    "daop-exact": DaopConfig(decode_scratch="auto"),
    "daop-paper": DaopConfig(first_predicted_layer=4, split="sum", predicted_routing=True, stale_input=True,
                             substitution=True, speculative_copies=False, decode_swap_every=0, place_on_prompt=False),
    # Our best trade-off is, so far, no approximation at all: on the H200 the stale-input variant
    # (daop-stale) was slower than daop-exact and changed the tokens, so `daop` is daop-exact.
    "daop": DaopConfig(decode_scratch="auto"),
    "daop-stale": DaopConfig(stale_input=True),
    "daop-strict": DaopConfig(cpu_experts=False),
}


class Daop(Policy):
    """Quota placement, prefill swaps and cost-model splits; prediction handling lives in the runner."""

    name = "daop"

    def __init__(self, ctx: PolicyContext, config: DaopConfig) -> None:
        self.config = config
        per_layer = config.scratch_per_layer or ctx.top_k
        ctx.scratch_slots = min(ctx.gpu_slots, 2 * per_layer) if ctx.gpu_slots > 2 * per_layer else 0
        override = scratch_setting()
        if override is not None:
            ctx.scratch_slots = min(ctx.gpu_slots, override)
        if not config.cpu_experts:  # every miss is copied: with a small budget, every slot is scratch
            if ctx.gpu_slots < 1:
                raise DaopError("a DAOP preset without CPU experts needs at least one GPU expert slot to copy misses into; "
                                "the budget holds none")
            ctx.scratch_slots = ctx.scratch_slots or ctx.gpu_slots
        self.exact = config.exact
        self.prefill_scratch = ctx.scratch_slots
        keep = decode_scratch_setting(config)
        if keep == "auto":  # slots are worth more as resident ones where a copy loses to the CPU anyway
            keep = None if ctx.cost.copy_beats_cpu(1) else 0
        self.decode_scratch = self.prefill_scratch if keep is None else min(int(keep), self.prefill_scratch)
        super().__init__(ctx)

    def reset(self) -> None:
        self.ctx.scratch_slots = self.prefill_scratch
        super().reset()

    def set_decode(self, decode: bool) -> None:
        """Switch the scratch slots between the phases: decode keeps `decode_scratch` of them for copies,
        the others join the resident slots, empty until `place_on` or `fill_free` places experts there.
        Back in prefill they are scratch again: the experts placed in them go back to the host (the
        slots' contents stay until a copy overwrites them)."""
        keep = self.decode_scratch if decode else self.prefill_scratch
        if keep == self.ctx.scratch_slots:
            return
        for slot in range(self.ctx.gpu_slots - keep, self.resident_capacity()):
            self.placement.release(slot)
        self.ctx.scratch_slots = keep

    def fill_free(self, counts) -> list[tuple[int, int, int]]:
        """Place the host experts with the most `counts` ([L, E]; the calibrated popularity breaks ties)
        into the free resident slots, by global rank as the quota rule places its leftovers; returns the
        (layer, expert, slot) assignments made (the runner copies them in)."""
        ctx, placement = self.ctx, self.placement
        free = [s for s in range(self.resident_capacity()) if placement.owner[s][0] == HOST]
        if not free:
            return []
        score = np.asarray(counts, dtype=np.float64) + tie_breaks(ctx.popularity, np.shape(counts))
        hosted = sorted((-score[l, e], l, e) for l in ctx.moe_layers for e in range(ctx.num_experts)
                        if not placement.resident(l, e))
        changed = []
        for slot, (_, l, e) in zip(free, hosted):
            placement.assign(l, e, slot)
            changed.append((l, e, slot))
        return changed

    def initial_placement(self) -> Placement:
        ctx = self.ctx
        return quota_placement(ctx.popularity, ctx.moe_layers, self.resident_capacity(), num_slots=ctx.gpu_slots)

    def scratch(self) -> list[int]:
        first = self.resident_capacity()
        return list(range(first, first + self.ctx.scratch_slots))

    def swap_hot(self, layer_idx: int, counts, margin_z: float = 0.0) -> list[tuple[int, int]]:
        """Swap hot host experts into cold experts' slots of the placement this sequence wants (counts: a
        prompt's, or recent decode calls' [E], with their noise margin); returns the (expert, slot)
        pairs it moved (the runner brings the slots there: after the layer's prefill, or by a copy in
        decode)."""
        c = self.config
        swaps = plan_swaps(counts, self.placement.resident_experts(layer_idx), c.swap_fraction, c.swap_ratio,
                           num_experts=self.ctx.num_experts, margin_z=margin_z)
        return apply_swaps(self.placement, layer_idx, swaps)

    def place_on(self, counts) -> list[tuple[int, int, int]]:
        """Place the resident slots again by the quota rule on `counts` [L, E] (a prompt's routing counts;
        the calibrated popularity breaks ties), keeping every expert that stays resident in its slot;
        returns the (layer, expert, slot) assignments that changed (the runner copies them in). The
        scratch slots are not touched."""
        ctx = self.ctx
        counts = np.asarray(counts, dtype=np.float64)
        ties = tie_breaks(ctx.popularity, counts.shape)
        capacity = self.resident_capacity()
        target = quota_placement(counts + ties, ctx.moe_layers, capacity, num_slots=ctx.gpu_slots)
        old = self.placement
        wanted = [(l, e) for l in ctx.moe_layers for e in target.resident_experts(l)]
        new = Placement(ctx.num_layers, ctx.num_experts, ctx.gpu_slots)
        for l, e in wanted:
            if old.resident(l, e):
                new.assign(l, e, old.slot(l, e))
        free = iter(s for s in range(capacity) if new.owner[s][0] == HOST)
        changed = []
        for l, e in wanted:
            if not new.resident(l, e):
                slot = next(free)
                new.assign(l, e, slot)
                changed.append((l, e, slot))
        self.placement = new
        return changed

    def split(self, counts: dict[int, int], on_gpu: set[int], max_copies: int, cpu_start: float = 0.0,
              copy_start: float = 0.0) -> SplitPlan:
        rule = makespan_split if self.config.split == "makespan" else sum_of_costs_split
        return rule(counts, on_gpu, self.ctx.cost, max_copies=max_copies, cpu_start=cpu_start, copy_start=copy_start)


def make_daop(preset: str, ctx: PolicyContext, **overrides) -> Daop:
    config = replace(PRESETS[preset], **overrides) if overrides else PRESETS[preset]
    policy = Daop(ctx, config)
    policy.name = preset
    return policy


def tie_breaks(popularity, shape) -> np.ndarray | float:
    """The calibrated popularity scaled below one count in all, to break ties between equal counts."""
    prior = np.asarray(popularity, dtype=np.float64)
    return prior / (prior.sum() + 1.0) if prior.shape == tuple(shape) else 0.0


def decode_scratch_setting(config: DaopConfig) -> int | str | None:
    """Scratch slots kept for copies in decode (`DaopConfig.decode_scratch`; None: all of them, "auto":
    as the cost model says); DAOP_DECODE_SCRATCH=N sets it for every preset with CPU experts, =keep
    keeps them all, =auto. A preset without CPU experts copies every miss: it keeps them all."""
    env = os.environ.get("DAOP_DECODE_SCRATCH", "").strip()
    value = env if env in ("", "keep", "auto") else slot_count("DAOP_DECODE_SCRATCH", env, ", keep or auto")
    if not config.cpu_experts or value == "keep":
        return None
    return config.decode_scratch if value == "" else value


def scratch_setting() -> int | None:
    """DAOP_SCRATCH_SLOTS=N: N of the GPU expert slots (at most all) are scratch slots for copies, the
    rest resident; unset, 2 x the slots per layer in flight (`DaopConfig.scratch_per_layer`)."""
    env = os.environ.get("DAOP_SCRATCH_SLOTS", "").strip()
    return slot_count("DAOP_SCRATCH_SLOTS", env) if env else None


def slot_count(name: str, env: str, others: str = "") -> int:
    """A setting's number of slots (>= 0); anything else is an error that names the setting."""
    try:
        value = int(env)
    except ValueError:
        value = -1
    if value < 0:
        raise DaopError(f"{name}={env!r}: expected a number of slots >= 0{others}")
    return value
