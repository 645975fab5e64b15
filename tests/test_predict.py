"""Pure DAOP planners on hand-built tables: quota placement, swaps, CPU/GPU split, degradation, prediction."""
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from daop.config import ModelConfig
from daop.errors import DaopError
from daop.hardware import HardwareProfile
from daop.model.moe import select_experts
from daop.placement.cost import CostModel
from daop.placement.table import HOST, Placement
from daop.predict import (apply_swaps, degrade, makespan_split, plan_swaps, prediction_accuracy,
                          quota_placement, sum_of_costs_split)


def free_slots(placement):
    return [s for s in range(placement.num_slots) if placement.owner[s, 0] == HOST]


def resident_of(placement, layer_idx):
    return {e: placement.slot(layer_idx, e) for e in placement.resident_experts(layer_idx)}


# Quota placement (paper 2.1)

COUNTS = np.array([
    [5, 9, 9, 1],  # tie 9/9: expert 1 before 2
    [3, 3, 3, 3],  # all tied: lowest indices
    [0, 7, 2, 8],
])


def test_quota_then_global_leftover():
    p = quota_placement(COUNTS, [0, 1, 2], capacity=7)  # q = 2 per layer, 1 leftover
    assert resident_of(p, 0) == {0: 6, 1: 0, 2: 1}  # leftover: (0, 0) with 5 is the hottest unplaced
    assert resident_of(p, 1) == {0: 2, 1: 3}
    assert resident_of(p, 2) == {3: 4, 1: 5}
    assert p.num_slots == 7 and free_slots(p) == []
    p.check()


def test_leftover_ties_lower_layer_then_lower_expert():
    p = quota_placement(COUNTS, [0, 1, 2], capacity=8)  # leftovers: (0, 0)=5, then (1, 2)=3 beats (1, 3)=3
    assert resident_of(p, 0)[0] == 6 and resident_of(p, 1) == {0: 2, 1: 3, 2: 7}
    counts = np.array([[4, 1], [4, 1]])
    p = quota_placement(counts, [0, 1], capacity=1)  # q = 0: one global slot, layer 0 wins the tie
    assert resident_of(p, 0) == {0: 0} and resident_of(p, 1) == {}


def test_quota_skips_dense_layers_and_clips_capacity():
    counts = np.array([[1, 2, 3], [9, 9, 9], [3, 2, 1]])
    p = quota_placement(counts, [0, 2], capacity=100)
    assert p.resident_experts(1) == []
    assert resident_of(p, 0) == {2: 0, 1: 1, 0: 2} and resident_of(p, 2) == {0: 3, 1: 4, 2: 5}
    assert p.num_slots == 6
    p = quota_placement(counts, [0, 2], capacity=3, num_slots=5)  # scratch slots stay free
    assert free_slots(p) == [3, 4] and resident_of(p, 0) == {2: 0, 1: 2} and resident_of(p, 2) == {0: 1}


def test_quota_rejects_negative_capacity():
    with pytest.raises(DaopError, match="capacity"):
        quota_placement(COUNTS, [0, 1, 2], capacity=-1)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 8), st.integers(0, 60), st.data())
def test_quota_placement_properties(num_layers, num_experts, capacity, data):
    counts = np.array(data.draw(st.lists(st.lists(st.integers(0, 5), min_size=num_experts, max_size=num_experts),
                                         min_size=num_layers, max_size=num_layers)))
    moe = data.draw(st.lists(st.sampled_from(range(num_layers)), unique=True, min_size=1))
    p = quota_placement(counts, moe, capacity)
    p.check()
    used = p.table[p.table != HOST]
    placed = min(capacity, len(moe) * num_experts)
    assert len(used) == placed <= capacity
    assert sorted(used.tolist()) == list(range(placed))  # unique, consecutive from 0
    quota = min(placed // len(moe), num_experts)
    for l in range(num_layers):
        mine = p.resident_experts(l)
        assert len(mine) <= num_experts
        if l not in moe:
            assert mine == []
            continue
        assert len(mine) >= quota
        others = [counts[l, e] for e in range(num_experts) if e not in mine]
        if others and mine:
            assert max(others) <= max(counts[l, e] for e in mine)  # a layer's hottest expert goes first


# Prefill swaps (paper 2.2)

def test_swap_threshold_is_strict():
    assert plan_swaps({0: 20, 1: 21}, {0}, num_experts=2) == []  # 21 == 1.05 * 20: no swap
    assert plan_swaps({0: 20, 1: 22}, {0}, num_experts=2) == [(1, 0)]
    assert plan_swaps(np.array([100, 105]), {0}) == []
    assert plan_swaps(np.array([100, 106]), {0}) == [(1, 0)]
    assert plan_swaps(np.array([100, 106]), {0}, swap_ratio=1.06) == []
    assert plan_swaps(np.array([0, 0]), {0}) == []  # nothing is hotter than an idle expert


def test_swap_ties_and_order():
    n = [1, 1, 5, 9, 9, 0]  # GPU: 0, 1, 2; host: 3, 4, 5
    assert plan_swaps(n, {0, 1, 2}) == [(3, 0), (4, 1)]  # (5, 2) fails and ends the pairing
    assert plan_swaps([2, 2, 0, 7, 7, 7], {0, 1, 2}, swap_fraction=1.0) == [(3, 2), (4, 0), (5, 1)]


def test_swap_fraction_caps_pairs():
    n = [0, 0, 0, 0, 5, 6, 7, 8]
    assert plan_swaps(n, {0, 1, 2, 3}, swap_fraction=0.25) == [(7, 0), (6, 1)]
    assert plan_swaps(n, {0, 1, 2, 3}) == [(7, 0), (6, 1), (5, 2), (4, 3)]
    assert plan_swaps(n, {0, 1, 2, 3}, swap_fraction=0.0) == []
    assert plan_swaps(n, {0}, swap_fraction=1.0) == [(7, 0)]  # fewer GPU experts than the cap


def test_swap_noise_margin_asks_for_a_difference_beyond_z_standard_deviations():
    # 10 against 6: difference 4, sqrt(16) = 4 standard deviations' unit
    assert plan_swaps([6, 10], {0}) == [(1, 0)]
    assert plan_swaps([6, 10], {0}, margin_z=0.99) == [(1, 0)]
    assert plan_swaps([6, 10], {0}, margin_z=1.0) == []  # 4 > 1.0 * 4 fails: strict
    assert plan_swaps([0, 4], {0}, margin_z=1.9) == [(1, 0)]  # 4 > 1.9 * 2
    assert plan_swaps([0, 4], {0}, margin_z=2.0) == []
    # the margin ends the pairing like the ratio: (3, 0) passes, (2, 1) does not
    assert plan_swaps([0, 9, 12, 20], {0, 1}, margin_z=1.0) == [(3, 0)]
    assert plan_swaps([0, 9, 12, 20], {0, 1}) == [(3, 0), (2, 1)]


def test_swap_input_checks():
    with pytest.raises(ValueError, match="num_experts"):
        plan_swaps({0: 1}, {0})
    with pytest.raises(ValueError, match="swap_ratio"):
        plan_swaps([1, 2], {0}, swap_ratio=0.9)
    for z in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="margin_z"):
            plan_swaps([1, 2], {0}, margin_z=z)


def test_apply_swaps_moves_hot_into_cold_slot():
    p = Placement(2, 4, 3)
    p.assign(0, 0, 0), p.assign(0, 1, 1), p.assign(1, 2, 2)
    copies = apply_swaps(p, 0, plan_swaps({0: 9, 1: 1, 3: 4}, {0, 1}, num_experts=4))
    assert copies == [(3, 1)]
    assert resident_of(p, 0) == {0: 0, 3: 1} and resident_of(p, 1) == {2: 2}
    p.check()
    with pytest.raises(ValueError, match="not on the GPU"):
        apply_swaps(p, 0, [(2, 1)])


# CPU / GPU split (paper 2.3)

def cost(cpu_ms, copy_ms, gpu_ms=0.0):
    """Per-expert costs independent of the token count (below the first measured point)."""
    profile = HardwareProfile(64, 96, "float32", 1, copy_ms, copy_ms, 1, (100,), (cpu_ms,), (100,), (gpu_ms,))
    return CostModel(profile)


def test_makespan_beats_sum_when_copies_queue():
    counts, c = {e: 1 for e in range(4)}, cost(cpu_ms=6.0, copy_ms=5.0)
    paper = sum_of_costs_split(counts, set(), c)
    assert paper.copy == (0, 1, 2, 3) and paper.makespan_ms == 20.0  # four copies back to back
    best = makespan_split(counts, set(), c)
    assert best.makespan_ms == 12.0 and len(best.copy) == 2 and len(best.cpu) == 2
    assert sorted(best.cpu + best.copy) == [0, 1, 2, 3]


def test_makespan_copies_when_the_cpu_side_is_long():
    counts, c = {e: 1 for e in range(4)}, cost(cpu_ms=4.0, copy_ms=5.0)
    assert sum_of_costs_split(counts, set(), c).makespan_ms == 16.0  # never copies: 4 < 5 per expert
    best = makespan_split(counts, set(), c)
    assert best.makespan_ms == 10.0 and len(best.copy) == 2


@pytest.mark.parametrize("cpu_ms,expect_copy", [(6.0, (3,)), (4.0, ())])
def test_split_variants_agree_on_one_miss(cpu_ms, expect_copy):
    counts, c = {1: 2, 3: 1}, cost(cpu_ms=cpu_ms, copy_ms=5.0, gpu_ms=0.5)
    for plan in (makespan_split(counts, {1}, c), sum_of_costs_split(counts, {1}, c)):
        assert plan.gpu == (1,) and plan.copy == expect_copy
        assert plan.makespan_ms == (5.5 if expect_copy else 4.0)  # copy 5 (overlaps resident 0.5) + 0.5, or CPU 4


def test_without_profile_everything_misses_to_the_cpu():
    plan = makespan_split({0: 3, 1: 1, 2: 0}, {1}, CostModel())
    assert plan == sum_of_costs_split({0: 3, 1: 1}, {1}, CostModel())
    assert plan.gpu == (1,) and plan.cpu == (0,) and plan.copy == () and plan.makespan_ms == 1.0


def test_split_respects_max_copies():
    counts, c = {e: 1 for e in range(6)}, cost(cpu_ms=10.0, copy_ms=1.0)
    assert len(makespan_split(counts, set(), c, max_copies=2).copy) == 2
    assert len(sum_of_costs_split(counts, set(), c, max_copies=1).copy) == 1
    assert makespan_split(counts, set(), c, max_copies=0).copy == ()


def brute_force_makespan(counts, resident, c):
    """Every assignment, simulated independently: copies back to back, GPU compute in any copy order."""
    misses = [e for e in counts if e not in resident and counts[e] > 0]
    resident_ms = sum(c.gpu_ms(counts[e]) for e in counts if e in resident and counts[e] > 0)
    best = float("inf")
    for mask in itertools.product([False, True], repeat=len(misses)):
        copied = [e for e, m in zip(misses, mask) if m]
        cpu_side = sum(c.cpu_ms(counts[e]) for e, m in zip(misses, mask) if not m)
        for order in itertools.permutations(copied):
            t = resident_ms
            for i, e in enumerate(order):
                t = max(t, (i + 1) * c.copy_ms()) + c.gpu_ms(counts[e])
            best = min(best, max(cpu_side, t))
        if not copied:
            best = min(best, max(cpu_side, resident_ms))
    return best


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.integers(0, 7), st.integers(1, 64), min_size=1, max_size=5), st.sets(st.integers(0, 7)),
       st.floats(0.5, 8.0), st.floats(0.05, 0.5))
def test_makespan_split_never_worse_than_alternatives(counts, resident, copy_ms, cpu_per_token):
    profile = HardwareProfile(64, 96, "float32", 1, copy_ms, copy_ms, 1, (1, 64), (1.0, 1.0 + 64 * cpu_per_token),
                              (1, 64), (0.05, 0.4))
    c = CostModel(profile)
    plan = makespan_split(counts, resident, c)
    assert sorted(plan.gpu + plan.cpu + plan.copy) == sorted(counts)
    optimum = brute_force_makespan(counts, resident, c)
    assert optimum - 1e-9 <= plan.makespan_ms <= sum_of_costs_split(counts, resident, c).makespan_ms + 1e-9
    all_cpu = max(sum(c.cpu_ms(n) for e, n in counts.items() if e not in resident),
                  sum(c.gpu_ms(n) for e, n in counts.items() if e in resident))
    assert plan.makespan_ms <= all_cpu + 1e-9
    assert plan.makespan_ms <= 1.5 * optimum + 1e-9


# Degradation (paper 2.5)

def test_degrade_top2_replaces_lower_ranked_cpu_expert():
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0],   # top-2 = 2, 3: both on the host
                           [2.0, 0.0, 3.0, 1.0]])  # top-2 = 2, 0: one host expert, allowed
    resident = torch.tensor([True, True, False, False])
    probs = torch.softmax(logits, dim=-1)
    weights, ids = probs.topk(2, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    new_ids, new_w, degraded = degrade(ids, weights, logits, resident, max_cpu_per_token=1)
    assert new_ids.tolist() == [[2, 1], [2, 0]] and degraded.tolist() == [True, False]
    expected = probs[0, [2, 1]] / probs[0, [2, 1]].sum()
    torch.testing.assert_close(new_w[0], expected)
    assert torch.equal(new_w[1], weights[1]) and new_w.dtype == torch.float32
    torch.testing.assert_close(new_w.sum(-1), torch.ones(2))
    ids0, w0, d0 = degrade(ids, weights, logits, resident, max_cpu_per_token=0)
    assert ids0.tolist() == [[1, 0], [1, 0]] and d0.tolist() == [True, True]  # best free GPU expert to the best column
    same = degrade(ids, weights, probs, resident, max_cpu_per_token=2, scores_are_probs=True)
    assert torch.equal(same[0], ids) and not same[2].any()


def test_degrade_top8_keeps_best_cpu_experts():
    torch.manual_seed(0)
    config = ModelConfig("qwen3_moe", 10, 8, 1, 1, 1, 8, 16, 8, 8, 16, 1e-6)
    logits = torch.randn(32, 16) * 3
    ids, weights = select_experts(config, logits)
    resident = torch.arange(16) % 2 == 0
    new_ids, new_w, degraded = degrade(ids, weights, logits, resident, max_cpu_per_token=2)
    for t in range(32):
        chosen = new_ids[t].tolist()
        assert len(set(chosen)) == 8
        cpu_before = [e for e in ids[t].tolist() if not resident[e]]  # ids are in rank order
        cpu_after = [e for e in chosen if not resident[e]]
        assert sorted(cpu_after) == sorted(cpu_before[:2])
        gpu_after = [e for e in chosen if resident[e]]
        best_gpu = [e for e in logits[t].argsort(descending=True).tolist() if resident[e]][:len(gpu_after)]
        assert sorted(gpu_after) == sorted(best_gpu)
        assert bool(degraded[t]) == (len(cpu_before) > 2)
    torch.testing.assert_close(new_w.sum(-1), torch.ones(32))
    assert degraded.any()


def test_degrade_with_too_few_resident_experts_keeps_best_cpu_experts():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    ids = torch.tensor([[0, 1, 2, 3]])
    weights = torch.full((1, 4), 0.25)
    resident = torch.tensor([False, False, False, False, True])
    new_ids, new_w, degraded = degrade(ids, weights, logits, resident, max_cpu_per_token=1)
    assert new_ids.tolist() == [[0, 1, 2, 4]] and degraded.tolist() == [True]
    torch.testing.assert_close(new_w.sum(-1), torch.ones(1))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(2, 12), st.data())
def test_degrade_properties(num_tokens, num_experts, data):
    k = data.draw(st.integers(1, min(num_experts, 8)))
    cap = data.draw(st.integers(0, k))
    resident = torch.tensor(data.draw(st.lists(st.booleans(), min_size=num_experts, max_size=num_experts)))
    if int(resident.sum()) < k - cap:
        resident[: k - cap] = True
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    logits = torch.randn(num_tokens, num_experts)
    probs = torch.softmax(logits, dim=-1)
    weights, ids = probs.topk(k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    new_ids, new_w, degraded = degrade(ids, weights, logits, resident, cap)
    assert ((~resident[new_ids]).sum(-1) <= cap).all()
    torch.testing.assert_close(new_w.sum(-1), torch.ones(num_tokens))
    assert all(len(set(row)) == k for row in new_ids.tolist())
    assert torch.equal(new_ids[~degraded], ids[~degraded]) and torch.equal(new_w[~degraded], weights[~degraded])
    kept_gpu = resident[ids] & ~degraded[:, None]
    assert (new_ids[kept_gpu] == ids[kept_gpu]).all()


# Next-layer prediction (paper 2.4)

def test_prediction_accuracy_counts_top1_and_set_overlap():
    ids = torch.tensor([[0, 1], [2, 3]])
    assert prediction_accuracy(ids, ids.clone()) == (1.0, 1.0)
    top1, overlap = prediction_accuracy(torch.tensor([[0, 1], [2, 3]]), torch.tensor([[0, 3], [3, 2]]))
    assert top1 == 0.5 and overlap == 0.75


def test_recent_counts_keep_the_last_window_calls_and_fall_due_every_period():
    from daop.predict.swaps import RecentCounts

    recent = RecentCounts(num_layers=2, num_experts=4, window=3, every=2)
    assert not recent.due(0) and list(recent.sums(0)) == [0, 0, 0, 0]
    recent.add(0, {1: 2, 3: 1})
    assert not recent.due(0)
    recent.add(0, {1: 1})
    assert recent.due(0) and not recent.due(1)  # each layer counts its own calls
    assert list(recent.sums(0)) == [0, 3, 0, 1]
    recent.add(0, {0: 5})
    recent.add(0, {2: 1})  # the first call falls out of the window of 3
    assert recent.due(0) and list(recent.sums(0)) == [5, 1, 1, 0]
    assert list(recent.sums(1)) == [0, 0, 0, 0]
    recent.clear()
    assert not recent.due(0) and list(recent.sums(0)) == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="at least one call"):
        RecentCounts(2, 4, window=0, every=2)
