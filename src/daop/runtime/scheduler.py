"""Pure plans for one layer call of the DAOP runner: decide here, execute in the runner.

Every decision the runner used to make inline is a function of routing counts, the layer's
resident experts and their slots, the free scratch slots, what the previous layer prepared, the
cost model and the DaopConfig switches; the results are frozen dataclasses. Nothing here touches
tensors, streams, threads or copies, so every branch is table-tested on hand-built cases.
Vocabulary: a "miss" is a routed expert that is not resident on the GPU; "scratch" slots hold
copies made for one layer call; "prepared" is what layer l did ahead of time for layer l+1.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from daop.placement.policies import LayerPlan
from daop.predict.split import ExpertCosts, SplitPlan

SplitRule = Callable[[Mapping[int, int], Collection[int], int], SplitPlan]


@dataclass(frozen=True)
class Prepared:
    """What layer l did for layer l+1: copies into scratch slots, CPU work promised or done early."""

    prefetched: Mapping[int, int] = field(default_factory=dict)  # expert -> scratch slot being filled
    precalc_rows: Mapping[int, tuple[int, ...]] = field(default_factory=dict)  # pre-calculated expert -> its token rows
    cpu_assigned: frozenset[int] = frozenset()  # predicted misses the CPU takes at l+1, on the true input
    # predicted misses split between the channels: expert -> (scratch slot filled with its rows [K, I), K);
    # the CPU computes rows [0, K) at l+1, on the true input
    split: Mapping[int, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class DecodeLayerPlan:
    """One decode layer call: the layer plan, plus which prepared work it uses."""

    layer: LayerPlan
    ready: tuple[tuple[int, int], ...] = ()  # (expert, scratch slot) copied ahead of need and used now
    precalc_used: tuple[int, ...] = ()  # experts whose pre-calculated output is used
    precalc_wasted: int = 0  # pre-calculated experts the routing did not ask for (or for other tokens)
    late: tuple[int, ...] = ()  # prefetched or resident experts the CPU computes instead: their copies land too late


@dataclass(frozen=True)
class Clock:
    """The timeline as a layer call is planned, in ms from now (the runner's estimates from the
    cost model, corrected by the copies and CPU jobs it sees finish):
    cpu_free: the CPU is through the jobs queued so far; copy_free: the copy stream is through its
    queued copies; lead: until the next MoE layer will need its experts (this layer's estimated
    finish plus the measured time from one layer's finish to the next one's plan)."""

    cpu_free: float = 0.0
    copy_free: float = 0.0
    lead: float = 0.0


@dataclass(frozen=True)
class SpeculationPlan:
    """What layer l starts for layer l+1's predicted misses."""

    copies: tuple[tuple[int, int], ...] = ()  # (expert, scratch slot) copied now
    cpu_assigned: tuple[int, ...] = ()  # left to the CPU at layer l+1, on the true input
    precalc: tuple[int, ...] = ()  # computed on the CPU now from layer l's input (approximate)
    lands: tuple[float, ...] = ()  # when each copy should land, ms from now (the clock's copy queue)
    split: tuple[tuple[int, int, int], ...] = ()  # (expert, scratch slot, K): rows [K, I) copied now, [0, K) to the CPU at l+1
    split_lands: tuple[float, ...] = ()  # when each split copy should land


@dataclass(frozen=True)
class SplitRows:
    """How experts may be split between the channels: `inter` intermediate rows, the CPU's share
    [0, K) for K in `grid` (ascending, each 0 < K < inter)."""

    inter: int
    grid: tuple[int, ...]

    @staticmethod
    def for_inter(inter: int, steps: int = 16, align: int = 16) -> "SplitRows":
        """At most steps - 1 split points, multiples of `align` rows (the CPU kernel's row chunk)."""
        step = align * max(1, -(-inter // (steps * align)))
        return SplitRows(inter, tuple(range(step, inter, step)))


def plan_layer(counts: Mapping[int, int], resident_slots: Mapping[int, int], free_scratch: Sequence[int],
               split: SplitRule, cpu_experts: bool = True, clock: Clock | None = None) -> LayerPlan:
    """Resident experts in place; misses split between the CPU and copies into free scratch slots
    (with a clock, the split knows each channel's backlog: a copy lands behind those queued before).

    Without CPU experts (the strict preset) every miss is copied, the free scratch slots used in
    turn: a copy into a slot this call already read waits until that read has been queued.
    """
    if cpu_experts:
        if clock is None:
            plan = split(counts, set(resident_slots), len(free_scratch))
        else:
            plan = split(counts, set(resident_slots), len(free_scratch), clock.cpu_free, clock.copy_free)
        if len(plan.copy) > len(free_scratch):
            raise RuntimeError(f"split rule copies {len(plan.copy)} experts into {len(free_scratch)} free slots")
        return LayerPlan(gpu=tuple((e, resident_slots[e]) for e in plan.gpu), cpu=plan.cpu,
                         copy=tuple(zip(plan.copy, free_scratch[: len(plan.copy)], strict=True)))
    gpu = tuple((e, resident_slots[e]) for e in sorted(counts) if e in resident_slots)
    misses = [e for e in sorted(counts) if e not in resident_slots]
    if misses and not free_scratch:
        raise RuntimeError(f"no free scratch slot to copy experts {misses} into")
    return LayerPlan(gpu=gpu, copy=tuple((e, free_scratch[i % len(free_scratch)]) for i, e in enumerate(misses)))


def promised_to_cpu(prepared: Prepared, counts: Mapping[int, int], resident: Collection[int],
                    served: Collection[int]) -> tuple[int, ...]:
    """The routed misses the previous layer promised to the CPU that nothing else serves yet."""
    return tuple(e for e in sorted(prepared.cpu_assigned) if e in counts and e not in resident and e not in served)


def plan_prefill_layer(counts: Mapping[int, int], held_slots: Mapping[int, int], scratch: Sequence[int],
                       prepared: Prepared | None, split: SplitRule, cpu_experts: bool = True,
                       clock: Clock | None = None, wanted: Collection[int] = ()) -> DecodeLayerPlan:
    """Prefill: every expert the layer's slots hold now (held_slots: expert -> slot; the previous
    sequence's placement until this one's is settled, `plan_settle`) is computed in place, every
    expert the previous layer prefetched from its scratch slot. A routed expert the sequence wants
    resident (`wanted`) that is neither is copied into a free scratch slot first: settling the slots
    brings it to the GPU anyway, and from there it moves on the device. Then a miss the previous
    layer promised to the CPU goes to the CPU, and the rest is split between the CPU and the free
    scratch slots, as in decode, the slots read before included (a copy into one waits for its read:
    a prompt's experts are read as soon as they land). A prompt's tokens have no pre-calculated outputs."""
    prepared, wanted = prepared or Prepared(), set(wanted)
    ready = {e: s for e, s in prepared.prefetched.items() if e in counts}
    free = [s for s in scratch if s not in ready.values()]
    first = [e for e in sorted(counts) if e in wanted and e not in held_slots and e not in ready][:len(free)]
    taken = free[:len(first)]
    forced = promised_to_cpu(prepared, counts, held_slots, {*ready, *first})
    todo = {e: n for e, n in counts.items() if e not in ready and e not in forced and e not in first}
    # Reused slots: a prompt's experts are read as soon as they land, so a slot read before may take a
    # copy after that read; not one whose expert moves to its wanted slot after the call (but without
    # CPU experts every miss needs a slot: those last, the expert is then copied to its slot instead).
    moving = [s for e, s in sorted(ready.items()) if e in wanted] + taken
    slots = [s for s in free if s not in taken] + [s for e, s in sorted(ready.items()) if e not in wanted]
    plan = plan_layer(todo, held_slots, slots + (moving if not cpu_experts else []), split, cpu_experts, clock)
    layer = LayerPlan(gpu=plan.gpu, cpu=forced + plan.cpu, copy=tuple(zip(first, taken)) + plan.copy)
    return DecodeLayerPlan(layer, tuple(sorted(ready.items())))


@dataclass(frozen=True)
class SettlePlan:
    """How a layer's slots come to hold the placement a sequence wants, once its prefill has read them."""

    moves: tuple[tuple[int, int, int], ...] = ()  # (expert, scratch slot, slot): device-to-device copies
    copies: tuple[tuple[int, int], ...] = ()  # (expert, slot): copies from the host


def plan_settle(wanted: Mapping[int, int], holds: Mapping[int, int], on_device: Mapping[int, int]) -> SettlePlan:
    """wanted: expert -> slot of the placement the sequence wants for one layer; holds: slot -> the
    layer's expert the slot holds now (absent: anything else); on_device: expert -> the scratch slot
    this layer call read it from. An expert already in its slot stays; one this call copied to a
    scratch slot moves there on the device (no second read of host memory); any other is copied from
    the host. Ascending slot order."""
    moves, copies = [], []
    for e, slot in sorted(wanted.items(), key=lambda item: item[1]):
        if holds.get(slot) == e:
            continue
        if e in on_device:
            moves.append((e, on_device[e], slot))
        else:
            copies.append((e, slot))
    return SettlePlan(tuple(moves), tuple(copies))


def plan_decode_layer(counts: Mapping[int, int], rows: Mapping[int, tuple[int, ...]], resident_slots: Mapping[int, int],
                      scratch: Sequence[int], prepared: Prepared | None, split: SplitRule,
                      cpu_experts: bool = True, clock: Clock | None = None, reserved: Collection[int] = (),
                      landing: Mapping[int, float] | None = None, cost: ExpertCosts | None = None,
                      inter: int = 0) -> DecodeLayerPlan:
    """Decode: use what the previous layer prepared where the routing asks for it, plan the rest.

    A prefetched expert is read from its scratch slot; a split expert is computed by the CPU (its
    first rows, on the true input) and from its scratch slot (the rest); a pre-calculated output is
    used only when the routing sends exactly the rows it was computed for; a miss promised to the
    CPU goes to the CPU; every other expert is planned by plan_layer over the scratch slots not
    holding prefetches (without CPU experts, over those too after them: a copy into a slot waits
    for the slot's read). `reserved` scratch slots (copies started for a later layer) are never used.
    `landing` (with CPU experts and a cost model): prefetched experts, and resident ones whose slot
    is being filled (a settle or swap copy), whose copies are still on the way, with when each should
    land (ms from now); one that would land after the CPU could be through with it goes to the CPU
    instead (`late_to_cpu`), and its copy lands unread for now. A split expert's CPU rows [0, K) cost
    K / `inter` of the whole (the whole without `inter`).
    """
    prepared = prepared or Prepared()
    ready = {e: s for e, s in prepared.prefetched.items() if e in counts}
    halves = tuple((e, s, k) for e, (s, k) in sorted(prepared.split.items()) if e in counts)
    used = tuple(e for e in sorted(prepared.precalc_rows) if rows.get(e) == prepared.precalc_rows[e])
    forced = promised_to_cpu(prepared, counts, resident_slots, {*ready, *used, *(e for e, _, _ in halves)})
    taken = set(ready) | set(used) | set(forced) | {e for e, _, _ in halves}
    todo = {e: n for e, n in counts.items() if e not in taken}
    held = set(ready.values()) | {s for _, s, _ in halves}
    free = [s for s in scratch if s not in held and s not in reserved]
    if not cpu_experts:  # every miss is copied: into a prefetched slot too, once its expert has been read
        free += [s for s in scratch if s in held and s not in reserved]
    plan = plan_layer(todo, resident_slots, free, split, cpu_experts, clock)
    late: tuple[int, ...] = ()
    gpu = plan.gpu
    if cpu_experts and landing and cost is not None:
        clock = clock or Clock()
        work = (sum(cost.cpu_ms(counts[e]) for e in (*forced, *plan.cpu))
                + sum(cost.cpu_ms(counts[e]) * (k / inter if inter else 1.0) for e, _, k in halves))
        copies = clock.copy_free + len(plan.copy) * cost.copy_ms() if plan.copy else 0.0
        candidates = [*ready, *(e for e, _ in gpu)]
        late = late_to_cpu({e: landing[e] for e in candidates if e in landing}, {e: counts[e] for e in candidates},
                           clock.cpu_free, work, copies, cost)
        for e in late:
            ready.pop(e, None)
        gpu = tuple((e, s) for e, s in gpu if e not in late)
    layer = LayerPlan(gpu=gpu, cpu=forced + plan.cpu + late, copy=plan.copy, split=halves)
    return DecodeLayerPlan(layer, tuple(sorted(ready.items())), used, len(prepared.precalc_rows) - len(used), late)


def late_to_cpu(landing: Mapping[int, float], counts: Mapping[int, int], cpu_free: float, cpu_work: float,
                other: float, cost: ExpertCosts) -> tuple[int, ...]:
    """Experts whose copies are still on the way (landing: expert -> ms from now when the copy
    should land) that the CPU computes instead, so the layer call finishes sooner. The call ends when
    the last of its parts does: the CPU's work (cpu_work ms of it, starting when the CPU is free, or
    nothing), these copies and the rest (`other`, e.g. copies planned for this call). Only moving the
    copies that land last can bring the end forward, so the choice is how many of them, latest
    first: the count with the soonest end (the fewest among equals)."""
    order = sorted(landing, key=lambda e: (-landing[e], e))
    start = max(0.0, cpu_free)
    best_end = max(start + cpu_work if cpu_work > 0 else 0.0, landing[order[0]] if order else 0.0, other)
    best, work = 0, cpu_work
    for k, e in enumerate(order, 1):
        work += cost.cpu_ms(counts[e])
        end = max(start + work, landing[order[k]] if k < len(order) else 0.0, other)
        if end < best_end:
            best, best_end = k, end
    return tuple(sorted(order[:best]))


def plan_early_copies(predicted_counts: Mapping[int, int], resident: Collection[int], free_scratch: Sequence[int],
                      clock: Clock, cost: ExpertCosts) -> SpeculationPlan:
    """Copies layer l starts for layer l+2's predicted misses (predicted from layer l's input, two
    layers of lead): the misses that `plan_speculation` would copy rather than leave to the CPU, on a
    clock whose lead reaches l+2's start. Nothing is promised to the CPU: layer l+1 plans l+2's other
    misses again from its own, closer, prediction. Copies only, with when each should land."""
    spec = plan_speculation(predicted_counts, resident, free_scratch, clock, cost, stale_input=False,
                            speculative_copies=True, balance_channels=True)
    return SpeculationPlan(copies=spec.copies, lands=spec.lands)


def plan_speculation(predicted_counts: Mapping[int, int], resident: Collection[int], free_scratch: Sequence[int],
                     clock: Clock, cost: ExpertCosts, *, stale_input: bool, speculative_copies: bool,
                     balance_channels: bool, cpu_experts: bool = True, rows: SplitRows | None = None) -> SpeculationPlan:
    """Start layer l+1's predicted misses during layer l (paper 2.4), on the clock's timeline.

    stale_input: the CPU pre-calculates every predicted miss now, on layer l's input. Otherwise,
    with speculative copies, the misses are taken busiest first, each copied into a free scratch
    slot or left to the CPU at layer l+1 (on the true input), whichever lets layer l+1 finish
    sooner (balance_channels): a copy lands behind the copies queued before it, and layer l+1
    waits for what lands after `clock.lead`; the CPU's share runs one expert after another from
    l+1's start (or from when the CPU is free, if later). With `rows`, an expert may also be split:
    its rows [K, I) copied now into a free slot, rows [0, K) left to the CPU at l+1, for the K of
    the grid that lets l+1 finish soonest (a part costs its share of the rows on either channel), so
    one expert keeps both channels busy. Ties go to the whole copy, then to the split. Without
    balance, copies while slots last; without a free slot, the CPU. Without CPU experts (strict)
    misses only ever go to free slots; the rest is copied when layer l+1 runs.
    """
    host = [e for e in sorted(predicted_counts) if e not in resident]
    if not host:
        return SpeculationPlan()
    if stale_input:
        return SpeculationPlan(precalc=tuple(host))
    if not speculative_copies:
        return SpeculationPlan()
    free, copies, cpu, lands, split, split_lands = list(free_scratch), [], [], [], [], []
    copy_free = max(0.0, clock.copy_free)
    cpu_side = max(0.0, clock.cpu_free - clock.lead)  # CPU work of l+1, counted from l+1's start
    wait = 0.0  # how long l+1 waits past its start for the copies given to it
    inter = rows.inter if rows is not None else 1
    grid = rows.grid if rows is not None and cpu_experts and balance_channels else ()
    for e in sorted(host, key=lambda e: (-predicted_counts[e], e)):
        c = cost.cpu_ms(predicted_counts[e])
        # (finish of l+1, rank, K): the CPU takes rows [0, K) and the rest is copied; K = 0 the whole
        # copy (rank 1), K = inter the whole expert on the CPU (rank 3), a split between (rank 2)
        # without balance a free slot always takes the copy; without CPU experts the CPU takes nothing
        shares = [0, *grid] if free else []
        if cpu_experts and (balance_channels or not free):
            shares.append(inter)
        if not shares:  # strict, no free slot: copied when l+1 runs
            continue
        options = []
        for k in shares:
            f = k / inter
            copy_late = copy_free + (1 - f) * cost.copy_ms() - clock.lead if k < inter else 0.0
            options.append((max(cpu_side + f * c, wait, copy_late), 1 if k == 0 else 3 if k == inter else 2, k))
        _, _, k = min(options, key=lambda o: o[:2])
        f = k / inter
        cpu_side += f * c
        if k == inter:
            cpu.append(e)
            continue
        copy_free += (1 - f) * cost.copy_ms()
        wait = max(wait, copy_free - clock.lead)
        if k == 0:
            copies.append((e, free.pop(0)))
            lands.append(copy_free)
        else:
            split.append((e, free.pop(0), k))
            split_lands.append(copy_free)
    return SpeculationPlan(tuple(copies), tuple(cpu), (), tuple(lands), tuple(split), tuple(split_lands))
