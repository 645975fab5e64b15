"""The DAOP runner's pure planners on hand-built cases: every branch of decide-then-execute."""
from dataclasses import dataclass

import pytest

from daop.placement.policies import LayerPlan
from daop.predict.split import SplitPlan, makespan_split
from daop.runtime.scheduler import (Clock, Prepared, SettlePlan, SpeculationPlan, late_to_cpu, plan_decode_layer,
                                    plan_early_copies, plan_layer, plan_prefill_layer, plan_settle, plan_speculation)


@dataclass(frozen=True)
class Costs:
    cpu: float  # per expert, whatever the token count
    copy: float
    gpu: float = 0.1

    def cpu_ms(self, n: int) -> float:
        return self.cpu * n

    def gpu_ms(self, n: int) -> float:
        return self.gpu

    def copy_ms(self) -> float:
        return self.copy


COPY_WINS, CPU_WINS = Costs(cpu=10.0, copy=1.0), Costs(cpu=1.0, copy=10.0)


def split_with(cost):
    return lambda counts, resident, max_copies, *backlog: makespan_split(counts, resident, cost, max_copies, *backlog)


def test_plan_layer_copies_when_copies_win_and_computes_on_cpu_when_cpu_wins():
    counts, resident = {0: 1, 1: 1, 2: 1}, {0: 5}
    assert plan_layer(counts, resident, [8, 9], split_with(COPY_WINS)) == LayerPlan(gpu=((0, 5),), copy=((1, 8), (2, 9)))
    assert plan_layer(counts, resident, [8, 9], split_with(CPU_WINS)) == LayerPlan(gpu=((0, 5),), cpu=(1, 2))
    # one free slot: the other miss goes to the CPU even where copies win
    assert plan_layer(counts, resident, [8], split_with(COPY_WINS)) == LayerPlan(gpu=((0, 5),), cpu=(2,), copy=((1, 8),))


def test_strict_plans_copy_every_miss_through_the_free_slots_in_turn():
    plan = plan_layer({0: 1, 1: 2, 2: 1, 3: 1}, {0: 5}, [8], split_with(CPU_WINS), cpu_experts=False)
    assert plan == LayerPlan(gpu=((0, 5),), copy=((1, 8), (2, 8), (3, 8)))
    assert plan_layer({0: 1}, {0: 5}, [], split_with(CPU_WINS), cpu_experts=False) == LayerPlan(gpu=((0, 5),))
    with pytest.raises(RuntimeError, match="no free scratch slot"):
        plan_layer({1: 1}, {0: 5}, [], split_with(CPU_WINS), cpu_experts=False)


def test_a_split_rule_that_copies_more_than_the_free_slots_is_refused():
    def greedy(counts, resident, max_copies):
        misses = tuple(e for e in sorted(counts) if e not in resident)
        return SplitPlan((), (), misses, 0.0, 0.0, 0.0)

    with pytest.raises(RuntimeError, match="copies 2 experts into 1 free slots"):
        plan_layer({1: 1, 2: 1}, {}, [8], greedy)


def test_prefill_computes_what_the_slots_hold_and_uses_what_was_prefetched():
    # slots hold experts 3 and 1 (the previous sequence's placement); 2 was prefetched into 8; 5 was
    # promised to the CPU; 0 is split (the copy wins, into the free scratch slot 9)
    prepared = Prepared(prefetched={2: 8}, cpu_assigned=frozenset({5}))
    plan = plan_prefill_layer({0: 4, 1: 1, 2: 3, 3: 9, 5: 2}, {3: 5, 1: 6}, [8, 9], prepared, split_with(COPY_WINS))
    assert plan.ready == ((2, 8),)
    assert plan.layer == LayerPlan(gpu=((1, 6), (3, 5)), cpu=(5,), copy=((0, 9),))
    # nothing prepared (the first MoE layer): misses split over every scratch slot
    plan = plan_prefill_layer({0: 4, 1: 1}, {1: 6}, [8, 9], None, split_with(CPU_WINS))
    assert plan.layer == LayerPlan(gpu=((1, 6),), cpu=(0,))


def test_a_prefill_copies_into_the_slots_it_read_when_copies_win():
    prepared = Prepared(prefetched={2: 8})
    plan = plan_prefill_layer({0: 5, 2: 1}, {}, [8], prepared, split_with(COPY_WINS))
    assert plan.ready == ((2, 8),) and plan.layer == LayerPlan(copy=((0, 8),))
    # not a slot whose expert the sequence wants resident: it moves there from the slot after the call
    plan = plan_prefill_layer({0: 5, 2: 1}, {}, [8], prepared, split_with(COPY_WINS), wanted={2})
    assert plan.layer == LayerPlan(cpu=(0,))
    # decode keeps prefetched slots for the next layer's copies
    plan = plan_decode_layer({0: 5, 2: 1}, {}, {}, [8], prepared, split_with(COPY_WINS))
    assert plan.layer == LayerPlan(cpu=(0,))


def test_a_prefill_copies_the_experts_it_wants_resident_rather_than_leaving_them_to_the_cpu():
    # 4 and 6 are wanted in the layer's slots (swapped in); 4 was promised to the CPU, 6 would be
    # split to it: both are copied (the settle needs them on the GPU anyway), 0 stays on the CPU
    prepared = Prepared(cpu_assigned=frozenset({4}))
    plan = plan_prefill_layer({0: 1, 1: 1, 4: 3, 6: 3}, {1: 5}, [8, 9], prepared, split_with(CPU_WINS), wanted={1, 4, 6})
    assert plan.layer == LayerPlan(gpu=((1, 5),), cpu=(0,), copy=((4, 8), (6, 9)))
    # more wanted than free slots: the first ones by expert index
    plan = plan_prefill_layer({4: 3, 6: 3}, {}, [8], None, split_with(CPU_WINS), wanted={4, 6})
    assert plan.layer == LayerPlan(cpu=(6,), copy=((4, 8),))
    # without CPU experts the rest reuses those slots after their reads
    plan = plan_prefill_layer({4: 3, 6: 3}, {}, [8], None, split_with(CPU_WINS), cpu_experts=False, wanted={4})
    assert plan.layer == LayerPlan(copy=((4, 8), (6, 8)))


def test_without_cpu_experts_a_prefill_copies_into_prefetched_slots_once_they_are_read():
    prepared = Prepared(prefetched={2: 8, 4: 9})
    plan = plan_prefill_layer({0: 1, 2: 1, 4: 1, 6: 1}, {}, [8, 9], prepared, split_with(CPU_WINS), cpu_experts=False)
    assert plan.ready == ((2, 8), (4, 9))
    assert plan.layer == LayerPlan(copy=((0, 8), (6, 9)))


def test_settling_moves_what_the_call_copied_and_copies_the_rest_from_the_host():
    wanted = {3: 5, 1: 6, 4: 7}  # expert -> slot the sequence wants
    holds = {5: 0, 6: 1, 7: 2}  # slot -> expert it holds now
    # 3 was copied to scratch slot 9 by this call: moved on the device; 4 was not: copied from the host
    assert plan_settle(wanted, holds, {3: 9, 2: 8}) == SettlePlan(moves=((3, 9, 5),), copies=((4, 7),))
    assert plan_settle(wanted, {5: 3, 6: 1, 7: 4}, {3: 9}) == SettlePlan()  # already settled
    assert plan_settle({0: 2}, {}, {}) == SettlePlan(copies=((0, 2),))  # the slot held another layer's expert


def test_decode_uses_prefetches_promised_cpu_work_and_matching_precalculations():
    prepared = Prepared(prefetched={2: 8, 6: 9}, precalc_rows={4: (0,)}, cpu_assigned=frozenset({3}))
    counts = {0: 1, 2: 1, 3: 1, 4: 1, 5: 1}
    plan = plan_decode_layer(counts, {4: (0,)}, {0: 1}, [8, 9, 10], prepared, split_with(COPY_WINS))
    assert plan.ready == ((2, 8),)  # 6 was prefetched but not routed
    assert plan.precalc_used == (4,) and plan.precalc_wasted == 0
    assert plan.layer.cpu == (3,)  # promised to the CPU by the previous layer
    assert plan.layer.gpu == ((0, 1),)
    assert plan.layer.copy == ((5, 9),)  # slot 8 holds the prefetch in use; 9 is free again


def test_decode_never_copies_into_slots_reserved_for_a_later_layer():
    # slot 8 is being filled for layer l+1 (a copy started two layers ahead): l's misses use 9, then 10
    plan = plan_decode_layer({5: 1, 6: 1}, {}, {}, [8, 9, 10], None, split_with(COPY_WINS), reserved={8})
    assert plan.layer.copy == ((5, 9), (6, 10))
    strict = plan_decode_layer({5: 1}, {}, {}, [8, 9], Prepared(prefetched={7: 9}), split_with(COPY_WINS),
                               cpu_experts=False, reserved={8})
    assert strict.layer.copy == ((5, 9),)  # the prefetched slot once read, never the reserved one


def test_two_ahead_copies_are_made_where_they_land_before_the_cpu_would_be_through():
    cost = Costs(cpu=3.0, copy=6.0)
    # layer l+2 starts in 5 ms: a copy started now lands 1 ms into it, the CPU would take 3 ms there
    early = plan_early_copies({1: 1, 2: 1, 0: 1}, {0}, [8, 9], Clock(lead=5.0), cost)
    assert early.copies == ((1, 8),) and early.lands == (6.0,)
    # the second copy would land 7 ms into l+2, later than the CPU's 3 + 3: it stays with layer l+1's plan
    assert early.cpu_assigned == () and early.precalc == ()  # nothing promised to the CPU
    # with a long lead both land in time; with no free slot nothing is copied
    assert plan_early_copies({1: 1, 2: 1}, set(), [8, 9], Clock(lead=20.0), cost).copies == ((1, 8), (2, 9))
    assert plan_early_copies({1: 1}, set(), [], Clock(lead=20.0), cost) == SpeculationPlan()
    # the copy stream's backlog counts: 10 ms of queued copies make even the first one late
    assert plan_early_copies({1: 1}, set(), [8], Clock(copy_free=10.0, lead=5.0), cost).copies == ()


def test_decode_discards_precalculations_for_other_rows_or_experts():
    prepared = Prepared(precalc_rows={4: (0,), 7: (0,)})
    plan = plan_decode_layer({4: 2}, {4: (0, 1)}, {}, [], prepared, split_with(CPU_WINS))
    assert plan.precalc_used == () and plan.precalc_wasted == 2
    assert plan.layer.cpu == (4,)  # computed again, on the true rows
    assert plan_decode_layer({4: 1}, {4: (0,)}, {}, [], None, split_with(CPU_WINS)).layer.cpu == (4,)


def test_speculation_on_the_timeline_copies_what_lands_in_time_and_leaves_the_rest_to_the_cpu():
    cost = Costs(cpu=5.0, copy=6.0)
    # Layer l+1 needs its experts in 7 ms and the copy stream is idle: expert 1 (busiest) lands at
    # 6 ms, in time; a second copy would land at 12 ms (5 ms late), the CPU would take expert 2 in
    # 5 ms from l+1's start: a tie in l+1's finish, which goes to the copy
    spec = plan_speculation({1: 2, 2: 1, 0: 1}, {0}, [8, 9], Clock(lead=7.0), cost, stale_input=False,
                            speculative_copies=True, balance_channels=True)
    assert spec.copies == ((1, 8), (2, 9)) and spec.cpu_assigned == () and spec.lands == (6.0, 12.0)
    # with 6.5 ms of copies still queued, expert 1 would land 5.5 ms late: the CPU (10 ms for its
    # 2 tokens) is slower, so it is copied; expert 2 would be 11.5 ms late, the CPU takes it in 5
    spec = plan_speculation({1: 2, 2: 1, 0: 1}, {0}, [8, 9], Clock(copy_free=6.5, lead=7.0), cost, stale_input=False,
                            speculative_copies=True, balance_channels=True)
    assert spec.copies == ((1, 8),) and spec.cpu_assigned == (2,) and spec.lands == (12.5,)
    # a layer that will be through in 1 ms: a copy would be 5 ms late, the CPU takes the first
    # expert in 3; the second would make the CPU's share 6 ms, so it is copied (l+1 is through at 5)
    spec = plan_speculation({1: 1, 2: 1}, set(), [8, 9], Clock(lead=1.0), Costs(cpu=3.0, copy=6.0), stale_input=False,
                            speculative_copies=True, balance_channels=True)
    assert spec.copies == ((2, 8),) and spec.cpu_assigned == (1,) and spec.lands == (6.0,)


def test_speculation_counts_the_cpus_backlog_from_the_next_layers_start():
    cost = Costs(cpu=3.0, copy=6.0)
    # 1 ms of lead: a copy is 5 ms late; the CPU would be free only 4 ms after l+1 starts (a job
    # still queued for 5 ms), then 3 ms more: 7 ms, so the copy wins
    spec = plan_speculation({1: 1}, set(), [8], Clock(cpu_free=5.0, lead=1.0), cost, stale_input=False,
                            speculative_copies=True, balance_channels=True)
    assert spec.copies == ((1, 8),) and spec.cpu_assigned == ()
    idle = plan_speculation({1: 1}, set(), [8], Clock(lead=1.0), cost, stale_input=False,
                            speculative_copies=True, balance_channels=True)
    assert idle.copies == () and idle.cpu_assigned == (1,)


def test_split_counts_each_channels_backlog():
    cost = Costs(cpu=5.0, copy=4.0)
    assert makespan_split({1: 1}, set(), cost).copy == (1,)  # a copy lands at 4 ms, the CPU needs 5
    late = makespan_split({1: 1}, set(), cost, copy_start=3.0)  # behind 3 ms of queued copies: 7 ms
    assert late.copy == () and late.cpu == (1,) and late.makespan_ms == 5.0
    busy_cpu = makespan_split({1: 1}, set(), cost, cpu_start=2.0, copy_start=3.0)  # CPU done at 7, copy at 7.1 with GPU
    assert busy_cpu.cpu == (1,) and busy_cpu.cpu_side_ms == 7.0
    both = makespan_split({1: 1, 2: 1}, set(), cost, copy_start=3.0)  # 5 + 5 on the CPU, or 5 and a copy at 7.1
    assert len(both.copy) == len(both.cpu) == 1 and both.makespan_ms == pytest.approx(7.1)
    assert makespan_split({1: 1}, {1}, cost, cpu_start=9.0, copy_start=9.0).makespan_ms == pytest.approx(0.1)


def test_speculation_without_balance_copies_while_slots_last_then_cpu():
    spec = plan_speculation({1: 1, 2: 1, 3: 1}, set(), [8], Clock(), Costs(cpu=1.0, copy=6.0), stale_input=False,
                            speculative_copies=True, balance_channels=False)
    assert spec.copies == ((1, 8),) and spec.cpu_assigned == (2, 3)


def test_speculation_strict_never_assigns_the_cpu():
    spec = plan_speculation({1: 1, 2: 1, 3: 1}, set(), [8, 9], Clock(), Costs(cpu=1.0, copy=6.0), stale_input=False,
                            speculative_copies=True, balance_channels=True, cpu_experts=False)
    assert spec.copies == ((1, 8), (2, 9)) and spec.cpu_assigned == ()


def test_speculation_stale_input_precalculates_and_paper_without_copies_does_nothing():
    args = dict(predicted_counts={1: 1, 2: 1, 0: 1}, resident={0}, free_scratch=[8], clock=Clock(1.0, 2.0, 3.0),
                cost=Costs(cpu=1.0, copy=1.0), balance_channels=True)
    stale = plan_speculation(**args, stale_input=True, speculative_copies=False)
    assert stale.precalc == (1, 2) and stale.copies == () and stale.lands == ()
    assert plan_speculation(**args, stale_input=False, speculative_copies=False) == SpeculationPlan()
    everything_resident = dict(args, resident={0, 1, 2})
    assert plan_speculation(**everything_resident, stale_input=True, speculative_copies=False).precalc == ()



def test_a_plan_that_misses_or_repeats_an_expert_is_refused_before_it_runs():
    from daop.runtime.offload import check_served

    rows = {1: None, 2: None, 5: None}
    check_served(0, rows, LayerPlan(gpu=((1, 0),), cpu=(2,), copy=((5, 8),)), {}, ())
    check_served(0, rows, LayerPlan(gpu=((1, 0),)), {2: (8, None)}, (5,))
    with pytest.raises(RuntimeError, match="serves experts \\[1, 2\\], the routing needs \\[1, 2, 5\\]"):
        check_served(0, rows, LayerPlan(gpu=((1, 0),), cpu=(2,)), {}, ())
    with pytest.raises(RuntimeError, match="layer 3"):
        check_served(3, rows, LayerPlan(gpu=((1, 0),), cpu=(2, 5), copy=((5, 8),)), {}, ())


def test_a_staging_buffer_is_handed_out_again_only_after_its_reader_finished():
    from concurrent.futures import Future

    import torch

    from daop.executors.transfer import Transfer

    transfer = Transfer(torch.device("cpu"))
    reading, finished = Future(), Future()
    finished.set_result({})
    transfer.staging, transfer.readers = [torch.empty(4), torch.empty(4)], [reading, finished]
    assert transfer.free_staging() == 1  # the finished job's buffer
    transfer.readers[1] = reading
    assert transfer.free_staging() == 2 and len(transfer.staging) == 3  # all read: a new buffer
    reading.set_result({})
    assert transfer.free_staging() == 0


def test_a_prefetched_copy_landing_after_the_cpu_could_be_through_goes_to_the_cpu():
    cost = Costs(cpu=3.0, copy=6.0)
    # expert 2's copy lands in 5 ms; the idle CPU is through with it in 3: the CPU takes it
    assert late_to_cpu({2: 5.0}, {2: 1}, 0.0, 0.0, 0.0, cost) == (2,)
    # it lands in 2 ms: the copy is sooner
    assert late_to_cpu({2: 2.0}, {2: 1}, 0.0, 0.0, 0.0, cost) == ()
    # the CPU is busy for 3 ms more with earlier work: 3 + 3 = 6 ms, later than the copy's 5
    assert late_to_cpu({2: 5.0}, {2: 1}, 3.0, 0.0, 0.0, cost) == ()
    # the layer's own CPU expert (3 ms) already ends at 3: with 2 added at 6, still sooner than 7
    assert late_to_cpu({2: 7.0}, {2: 1}, 0.0, 3.0, 0.0, cost) == (2,)
    # two late copies: moving the last (9 ms) ends the call at max(3, 8) = 8; moving 8's too would
    # take the CPU to 6, sooner than 8: both move
    assert late_to_cpu({1: 8.0, 2: 9.0}, {1: 1, 2: 1}, 0.0, 0.0, 0.0, cost) == (1, 2)
    # the earlier copy lands in 4 ms: once 2 is on the CPU (3 ms), moving 1 as well (6) would be later than 4
    assert late_to_cpu({1: 4.0, 2: 9.0}, {1: 1, 2: 1}, 0.0, 0.0, 0.0, cost) == (2,)
    # the call waits 10 ms for another copy anyway: moving gains nothing
    assert late_to_cpu({2: 9.0}, {2: 1}, 0.0, 0.0, 10.0, cost) == ()
    # the CPU's time grows with the expert's tokens: 3 x 2 = 6 ms is later than 5
    assert late_to_cpu({2: 5.0}, {2: 2}, 0.0, 0.0, 0.0, cost) == ()
    # two copies landing together in 9 ms: moving one alone gains nothing, moving both ends at 6
    assert late_to_cpu({1: 9.0, 2: 9.0}, {1: 1, 2: 1}, 0.0, 0.0, 0.0, cost) == (1, 2)
    # three landing in 7 ms: all three on the CPU would end at 9, later: none moves
    assert late_to_cpu({0: 7.0, 1: 7.0, 2: 7.0}, {0: 1, 1: 1, 2: 1}, 0.0, 0.0, 0.0, cost) == ()
    assert late_to_cpu({}, {}, 0.0, 3.0, 0.0, cost) == ()


def test_decode_gives_late_prefetches_to_the_cpu_and_keeps_the_ones_that_land_in_time():
    cost = Costs(cpu=3.0, copy=6.0)
    prepared = Prepared(prefetched={2: 8, 6: 9, 7: 10})
    counts = {0: 1, 2: 1, 6: 1}
    # 2 lands in 5 ms (the CPU would take 3), 6 has landed (not listed), 7 was not routed
    plan = plan_decode_layer(counts, {}, {0: 1}, [8, 9, 10], prepared, split_with(CPU_WINS), clock=Clock(),
                             landing={2: 5.0, 7: 9.0}, cost=cost)
    assert plan.late == (2,) and plan.ready == ((6, 9),)
    assert plan.layer.cpu == (2,) and plan.layer.gpu == ((0, 1),)
    # without a cost model, or without CPU experts (strict), every prefetch is read from its slot
    for kwargs in ({"landing": {2: 5.0}}, {"landing": {2: 5.0}, "cost": cost, "cpu_experts": False}):
        plan = plan_decode_layer(counts, {}, {0: 1}, [8, 9, 10], prepared, split_with(CPU_WINS), **kwargs)
        assert plan.late == () and plan.ready == ((2, 8), (6, 9))
    # a split expert's CPU rows count their share of the expert: rows [0, 8) of 16 is 1.5 ms, then
    # 2's 3 ms ends at 4.5, sooner than 5; counted whole (no `inter`) it would end at 6
    split = Prepared(prefetched={2: 8}, split={6: (9, 8)})
    plan = plan_decode_layer(counts, {}, {0: 1}, [8, 9, 10], split, split_with(CPU_WINS), clock=Clock(),
                             landing={2: 5.0}, cost=cost, inter=16)
    assert plan.late == (2,) and plan.layer.cpu == (2,) and plan.layer.split == ((6, 9, 8),)
    plan = plan_decode_layer(counts, {}, {0: 1}, [8, 9, 10], split, split_with(CPU_WINS), clock=Clock(),
                             landing={2: 5.0}, cost=cost)
    assert plan.late == ()


def test_decode_gives_a_resident_expert_whose_slot_is_still_being_filled_to_the_cpu():
    cost = Costs(cpu=3.0, copy=6.0)
    # slot 1 is being filled with expert 0 (a settle or swap copy landing in 5 ms); 4 in slot 2 has landed
    plan = plan_decode_layer({0: 1, 4: 1}, {}, {0: 1, 4: 2}, [8, 9], None, split_with(CPU_WINS), clock=Clock(),
                             landing={0: 5.0}, cost=cost)
    assert plan.late == (0,) and plan.layer.gpu == ((4, 2),) and plan.layer.cpu == (0,)
    # landing in 2 ms: the GPU waits for it
    plan = plan_decode_layer({0: 1, 4: 1}, {}, {0: 1, 4: 2}, [8, 9], None, split_with(CPU_WINS), clock=Clock(),
                             landing={0: 2.0}, cost=cost)
    assert plan.late == () and plan.layer.gpu == ((0, 1), (4, 2))
