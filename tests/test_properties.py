"""Invariants under random inputs: placement policies over random layer calls, degradation, headers.

test_predict.py already covers quota placement, the CPU/copy split and degrade() for softmax
routers that renormalise top-k weights with enough resident experts; here: every policy driven
like the runner drives it, degrade() for routers that do not renormalise (and probabilities as
scores) and for layers short of resident experts, and the safetensors header parser on junk.
"""
from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daop.errors import DaopError
from daop.hardware import HardwareProfile
from daop.placement.cost import CostModel
from daop.placement.daop import make_daop
from daop.placement.policies import LayerPlan, PolicyContext, make_policy
from daop.placement.table import HOST
from daop.runtime.scheduler import plan_decode_layer, plan_prefill_layer
from daop.predict.degrade import degrade
from daop.weights.safetensors_io import SafetensorsFile

EXACT = ["gpu", "ondemand", "lru", "static", "fiddler", "daop-exact", "daop-strict"]


def profile(copy_ms: float, cpu_ms: float) -> HardwareProfile:
    """Costs that make copies win (copy_ms < cpu_ms) or lose, for every policy that asks."""
    return HardwareProfile(64, 96, "float32", 1, copy_ms, copy_ms, 1, (1, 64), (cpu_ms, 8 * cpu_ms), (1, 64), (0.05, 0.4))


@st.composite
def contexts(draw):
    num_layers = draw(st.integers(1, 5))
    num_experts = draw(st.integers(1, 10))
    top_k = draw(st.integers(1, num_experts))
    moe = sorted(draw(st.sets(st.integers(0, num_layers - 1), min_size=1)))
    gpu_slots = draw(st.integers(0, len(moe) * num_experts + 4))
    popularity = np.array(draw(st.lists(st.lists(st.integers(0, 50), min_size=num_experts, max_size=num_experts),
                                        min_size=num_layers, max_size=num_layers)), dtype=np.float64)
    costs = draw(st.one_of(st.none(), st.tuples(st.floats(0.1, 5), st.floats(0.1, 5))))
    cost = CostModel(None if costs is None else profile(*costs))
    return PolicyContext(num_layers, num_experts, top_k, gpu_slots, moe, popularity, cost)


def layer_calls(ctx: PolicyContext):
    """(layer, {expert: tokens}) as the runner passes them: only routed experts, at least one token each."""
    counts = st.dictionaries(st.integers(0, ctx.num_experts - 1), st.integers(1, 64), min_size=1,
                             max_size=min(ctx.num_experts, 3 * ctx.top_k))
    return st.lists(st.tuples(st.sampled_from(ctx.moe_layers), counts), min_size=1, max_size=12)


def build(name: str, ctx: PolicyContext):
    return make_daop(name, ctx) if name.startswith("daop") else make_policy(name, ctx)


def precondition(name: str, ctx: PolicyContext) -> str | None:
    """The error a policy must raise for this budget, or None when it must accept it."""
    if name == "gpu" and ctx.gpu_slots < len(ctx.moe_layers) * ctx.num_experts:
        return "policy 'gpu' needs all"
    if name == "ondemand" and ctx.gpu_slots < 1:
        return "at least one GPU expert slot"
    if name == "lru" and ctx.gpu_slots < len(ctx.moe_layers):
        return "at least one GPU slot per MoE layer"
    if name == "daop-strict" and ctx.gpu_slots < 1:
        return "without CPU experts needs at least one"
    return None


def daop_plan(policy, layer_idx: int, counts: dict[int, int], prefill: bool) -> LayerPlan:
    """The plan DaopRunner executes for this call (nothing prepared by an earlier layer)."""
    cpu_experts = policy.config.cpu_experts
    if prefill:  # the slots hold the placement before the swaps until the layer is settled
        held = resident_slots(policy, layer_idx)
        policy.swap_hot(layer_idx, counts)
        return plan_prefill_layer(counts, held, policy.scratch(), None, policy.split, cpu_experts,
                                  wanted=resident_slots(policy, layer_idx)).layer
    return plan_decode_layer(counts, {}, resident_slots(policy, layer_idx), policy.scratch(), None, policy.split,
                             cpu_experts).layer


def resident_slots(policy, layer_idx: int) -> dict[int, int]:
    return {e: policy.placement.slot(layer_idx, e) for e in policy.placement.resident_experts(layer_idx)}


def check_placement(policy) -> None:
    ctx, table = policy.ctx, policy.placement
    table.check()  # table and owner agree, no slot holds two experts
    used = table.table[table.table != HOST]
    assert len(used) <= policy.resident_capacity() <= ctx.gpu_slots  # within the budget, scratch slots left free
    assert ((0 <= used) & (used < ctx.gpu_slots)).all()
    dense = [l for l in range(ctx.num_layers) if l not in ctx.moe_layers]
    assert not (table.table[dense] != HOST).any()  # nothing placed for layers without experts


@pytest.mark.parametrize("name", EXACT)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_policy_plans_serve_every_routed_expert_once_within_budget(name, data):
    ctx = data.draw(contexts())
    expected_error = precondition(name, ctx)
    if expected_error:
        with pytest.raises(DaopError, match=expected_error):
            build(name, ctx)
        return
    policy = build(name, ctx)
    assert policy.exact
    check_placement(policy)
    initial = policy.placement.table.copy()
    prefill = name.startswith("daop") and data.draw(st.booleans(), label="prefill path")
    for layer_idx, counts in data.draw(layer_calls(ctx), label="calls"):
        before = policy.placement.copy()
        plan = daop_plan(policy, layer_idx, counts, prefill) if name.startswith("daop") else policy.plan(layer_idx, counts)
        served = [e for e, _ in plan.gpu] + list(plan.cpu) + [e for e, _ in plan.copy]
        if name == "lru":  # see test_lru_never_copies_an_expert_it_already_serves below
            served = sorted(set(served))
        assert sorted(served) == sorted(counts), plan  # every routed expert exactly once, nothing else
        for e, slot in plan.gpu:  # resident experts are read from the slot that held them
            assert before.slot(layer_idx, e) == slot, (e, slot)
        for _, slot in plan.copy:
            assert 0 <= slot < ctx.gpu_slots
        if name == "gpu":
            assert not plan.cpu and not plan.copy
        if name == "static" or ctx.cost.profile is None and name == "fiddler":
            assert not plan.copy  # nothing to copy into, or copies never pay off without a profile
        if name == "daop-exact" and ctx.cost.profile is None:
            # copies never pay off then: only a prefill copies, the experts its swaps want resident
            # (into scratch slots, from where they move to the slots they want)
            wanted = set(policy.placement.resident_experts(layer_idx))
            assert (prefill or not plan.copy) and all(e in wanted for e, _ in plan.copy)
            assert all(slot >= policy.resident_capacity() for _, slot in plan.copy)
        if name in ("ondemand", "lru", "daop-strict"):
            assert not plan.cpu
        check_placement(policy)
    policy.reset()
    assert (policy.placement.table == initial).all()  # every sequence starts from the calibrated placement


def test_lru_never_copies_an_expert_it_already_serves():
    """One LRU slot, experts 0 and 1 routed, 1 resident: 1 is read from its slot, then 0 is copied over it.

    Outputs stay right (the second result for 1 overwrites the first), but the step copies twice as
    much as it needs whenever a layer's cache is smaller than the experts a step routes to.
    """
    ctx = PolicyContext(1, 4, 1, 1, [0], np.array([[0.0, 1.0, 0.0, 0.0]]), CostModel(None))
    policy = make_policy("lru", ctx)
    plan = policy.plan(0, {0: 1, 1: 1})
    assert plan.gpu == ((1, 0),)
    assert plan.copy == ((0, 0),)


# ------------------------------------------------------------------------------------------ degrade()

@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(2, 12), st.data())
def test_degrade_keeps_weight_totals_and_unique_experts_for_any_router(num_tokens, num_experts, data):
    """Routers that do not renormalise (Qwen2-MoE, OLMoE), probabilities as scores, few resident experts."""
    k = data.draw(st.integers(1, min(num_experts, 8)))
    cap = data.draw(st.integers(0, k))
    resident = torch.tensor(data.draw(st.lists(st.booleans(), min_size=num_experts, max_size=num_experts)))
    renormalise, as_probs = data.draw(st.booleans()), data.draw(st.booleans())
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    logits = torch.randn(num_tokens, num_experts) * 3
    probs = torch.softmax(logits, dim=-1)
    weights, ids = probs.topk(k, dim=-1)
    if renormalise:
        weights = weights / weights.sum(-1, keepdim=True)
    new_ids, new_w, degraded = degrade(ids, weights, probs if as_probs else logits, resident, cap, scores_are_probs=as_probs)
    assert new_ids.dtype == torch.long and new_w.dtype == torch.float32 and new_ids.shape == ids.shape
    assert all(len(set(row)) == k for row in new_ids.tolist())
    torch.testing.assert_close(new_w.sum(-1), weights.sum(-1))  # 1 when renormalised, the top-k mass otherwise
    assert (new_w >= 0).all()
    host_after = (~resident[new_ids]).sum(-1)
    free = resident.sum() - resident[ids].sum(-1)  # resident experts a token could switch to
    host_before = (~resident[ids]).sum(-1)
    need = (host_before - cap).clamp_min(0)
    for t in range(num_tokens):
        if need[t] <= free[t]:
            assert host_after[t] <= cap  # the cap holds whenever there are enough resident experts
        else:
            assert host_after[t] == host_before[t] - free[t]  # otherwise every free resident expert is used
        assert bool(degraded[t]) == bool(host_after[t] < host_before[t])
        kept_host = set(new_ids[t].tolist()) - set(torch.nonzero(resident).flatten().tolist())
        assert kept_host <= set(ids[t].tolist())  # host experts are only ever removed, never added


# ------------------------------------------------------------------------------ safetensors headers

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                      st.text(max_size=8))
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                                   max_size=4), max_leaves=12)
entry = st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "F16", "BF16", "I32", "U8", "F8", "X"]) | json_value,
                               "shape": st.lists(st.integers(-3, 40), max_size=3) | json_value,
                               "data_offsets": st.lists(st.integers(-8, 300), min_size=0, max_size=3) | json_value})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.text(min_size=1, max_size=10), entry | json_value, max_size=4) | json_value,
       st.integers(0, 256), st.booleans())
def test_any_header_loads_or_raises_daop_error(header, payload_bytes, lie_about_length):
    """Junk headers (any JSON, wrong types, huge or negative numbers) never escape as another exception."""
    raw = json.dumps(header).encode()
    length = len(raw) + (payload_bytes if lie_about_length else 0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(struct.pack("<Q", length) + raw + bytes(payload_bytes))
        try:
            f = SafetensorsFile(path)
        except DaopError as exc:
            assert str(path) in str(exc)
            return
        try:
            for name, e in f.entries.items():
                assert 0 <= e.start <= e.end <= path.stat().st_size
                dest = torch.empty(e.shape, dtype=e.dtype)
                f.read_into(name, dest)
        finally:
            f.close()


# ------------------------------------------------------------------- the real runners, random routing

RUNNER_POLICIES = ["ondemand", "lru", "static", "fiddler", "daop-exact", "daop-strict"]


@pytest.fixture(scope="module")
def runners(tmp_path_factory):
    """A tiny synthetic geometry on the CPU: the all-resident runner and a factory of offloaded ones."""
    from daop.bench.geometry import geometry_config, synthetic_decoder, synthetic_host_experts
    from daop.runtime.setup import RuntimeOptions, prepare_runtime

    config, spec = geometry_config("tiny-mixtral")
    decoder = synthetic_decoder(config, spec, torch.device("cpu"), torch.float32)
    host = synthetic_host_experts(config, torch.float32, pin=False, prototypes=8)
    resident = prepare_runtime(decoder, RuntimeOptions(policy="gpu", expert_ratio=1.0), host=host).start()
    folder = tmp_path_factory.mktemp("profiles")
    built: dict = {}

    def offloaded(policy: str, ratio: float, copies_win: bool):
        key = (policy, ratio, copies_win)
        if key not in built:
            path = folder / f"{copies_win}.json"
            copy_ms, cpu_ms = (1.0, 10.0) if copies_win else (10.0, 1.0)
            HardwareProfile(hidden_size=config.hidden_size, intermediate_size=config.expert_intermediate_size,
                            dtype="float32", expert_bytes=1, copy_pinned_ms=copy_ms, copy_pageable_ms=copy_ms, cpu_threads=1,
                            cpu_token_counts=(1, 64), cpu_expert_ms=(cpu_ms, 8 * cpu_ms), gpu_token_counts=(1, 64),
                            gpu_expert_ms=(0.05, 0.4)).save(path)
            # CPU experts at the dense path's thread count (what a CPU device gets by default): torch's
            # float32 products differ in their last bits between thread counts (rows 4-5 of six, 1 thread
            # against 2), so only at one count are the outputs bitwise the resident runner's
            options = RuntimeOptions(policy=policy, expert_ratio=ratio, hardware_profile=str(path))
            built[key] = prepare_runtime(decoder, options, host=host).start()
        return built[key]

    yield config, resident, offloaded
    for runner in built.values():
        runner.close()


@pytest.mark.parametrize("policy", RUNNER_POLICIES)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_offloaded_runners_equal_the_resident_runner_for_any_routing(runners, policy, data):
    """The production runners (plans, copies, CPU jobs, DAOP's prefetches and promises) on random
    routing and inputs, prefill then decode steps: bitwise the all-resident runner's outputs."""
    config, resident, offloaded = runners
    ratio = data.draw(st.sampled_from([0.25, 0.5, 0.75]), label="ratio")
    runner = offloaded(policy, ratio, data.draw(st.booleans(), label="copies win"))
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    runner.reset()
    runner.set_phase("prefill")
    moe_layers = [l for l in range(config.num_layers) if config.is_moe_layer(l)]
    for step in range(data.draw(st.integers(1, 4), label="steps")):
        if step == 1:
            runner.set_phase("decode")
        num_tokens = data.draw(st.integers(1, 6 if step == 0 else 2), label="tokens")
        for layer_idx in moe_layers:
            h = torch.randn(num_tokens, config.hidden_size)
            ids = torch.stack([torch.randperm(config.num_experts)[: config.top_k] for _ in range(num_tokens)])
            weights = torch.softmax(torch.randn(num_tokens, config.top_k), dim=-1)
            assert torch.equal(runner(layer_idx, h, ids, weights), resident(layer_idx, h, ids, weights))


def test_group_by_expert_in_python_equals_unique_and_where():
    from daop.model.moe import group_by_expert

    g = torch.Generator().manual_seed(3)
    for tokens, k, experts in ((1, 2, 8), (3, 2, 8), (4, 8, 64), (8, 8, 16), (32, 2, 8)):
        ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
        got = group_by_expert(ids)
        want = {e: torch.where(ids == e) for e in torch.unique(ids).tolist()}
        assert list(got) == list(want)
        for e in want:
            assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got[e], want[e]))


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_placement_on_the_prompt_is_the_quota_rule_and_keeps_every_staying_expert_in_its_slot(data):
    from daop.predict.placement import quota_placement

    ctx = data.draw(contexts())
    if precondition("daop-exact", ctx):
        return
    policy = make_daop("daop-exact", ctx)
    counts = np.array(data.draw(st.lists(st.lists(st.integers(0, 40), min_size=ctx.num_experts, max_size=ctx.num_experts),
                                         min_size=ctx.num_layers, max_size=ctx.num_layers)), dtype=np.float64)
    for layer_idx, n in data.draw(layer_calls(ctx), label="prefill swaps first"):
        policy.swap_hot(layer_idx, n)
    before = policy.placement.copy()
    changed = policy.place_on(counts)
    after = policy.placement
    after.check()
    capacity = policy.resident_capacity()
    ties = ctx.popularity / (ctx.popularity.sum() + 1.0)
    want = quota_placement(counts + ties, ctx.moe_layers, capacity)
    for layer_idx in range(ctx.num_layers):
        assert after.resident_experts(layer_idx) == want.resident_experts(layer_idx)
        for e in after.resident_experts(layer_idx):
            assert 0 <= after.slot(layer_idx, e) < capacity  # scratch slots stay free
            if before.resident(layer_idx, e):
                assert after.slot(layer_idx, e) == before.slot(layer_idx, e)
    assert sorted(changed) == sorted((l, e, after.slot(l, e)) for l in ctx.moe_layers for e in after.resident_experts(l)
                                     if not before.resident(l, e))


def test_placement_on_the_prompt_moves_leftover_slots_to_the_layers_the_prompt_used_most():
    # 2 layers x 4 experts, 7 slots of which 2 are scratch: a quota of 2 per layer (slots 0-1 and
    # 2-3) and one leftover slot (4), which uniform popularity gives to layer 0
    ctx = PolicyContext(2, 4, 1, 7, [0, 1], np.ones((2, 4)), CostModel(None))
    policy = make_daop("daop-exact", ctx)
    assert policy.resident_capacity() == 5 and policy.scratch() == [5, 6]
    assert {l: policy.placement.resident_experts(l) for l in (0, 1)} == {0: [0, 1, 2], 1: [0, 1]}
    changed = policy.place_on(np.array([[9, 0, 0, 1], [5, 7, 6, 0]]))
    # the prompt wants layer 0's experts 0 and 3, and layer 1's 0, 1 and 2 (the leftover moves there)
    assert {l: policy.placement.resident_experts(l) for l in (0, 1)} == {0: [0, 3], 1: [0, 1, 2]}
    assert [policy.placement.slot(0, 0), policy.placement.slot(1, 0), policy.placement.slot(1, 1)] == [0, 2, 3]
    assert changed == [(0, 3, 1), (1, 2, 4)]  # into the slots layer 0's experts 1 and 2 left, in order


def test_decode_turns_the_scratch_slots_daop_exact_does_not_keep_into_resident_ones():
    # the context above: slots 0-4 resident, 5-6 scratch in prefill; daop-exact keeps none in decode
    ctx = PolicyContext(2, 4, 1, 7, [0, 1], np.ones((2, 4)), CostModel(None))
    policy = make_daop("daop-exact", ctx)
    policy.set_decode(True)
    assert policy.resident_capacity() == 7 and policy.scratch() == []
    counts = np.array([[9, 0, 0, 1], [5, 7, 6, 0]])
    changed = policy.fill_free(counts)
    # the host experts with the most counts: layer 1's 2 (6), then layer 0's 3 (1); ties would go by popularity
    assert changed == [(1, 2, 5), (0, 3, 6)]
    policy.placement.check()
    assert policy.fill_free(counts) == []  # no free slot left
    policy.set_decode(False)  # a prefill again: the two slots are scratch, their experts host ones
    assert policy.resident_capacity() == 5 and policy.scratch() == [5, 6]
    assert not policy.placement.resident(1, 2) and not policy.placement.resident(0, 3)
    assert {l: policy.placement.resident_experts(l) for l in (0, 1)} == {0: [0, 1, 2], 1: [0, 1]}
    policy.placement.check()
    policy.set_decode(True)
    policy.reset()  # a new sequence starts in prefill, from the calibrated placement
    assert policy.resident_capacity() == 5 and policy.placement.resident_experts(0) == [0, 1, 2]


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_decode_scratch_slots_switch_with_the_phase_and_lose_no_resident_expert(data):
    ctx = data.draw(contexts())
    keep = data.draw(st.sampled_from(["", "auto", "0", "1", "keep"]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAOP_DECODE_SCRATCH", keep)
        if precondition("daop-exact", ctx):
            return
        policy = make_daop("daop-exact", ctx)
    prefill_capacity, prefill_scratch = policy.resident_capacity(), policy.scratch()
    auto = len(prefill_scratch) if ctx.cost.copy_beats_cpu(1) else 0  # the default: resident where copies lose
    want = {"": auto, "auto": auto, "0": 0, "1": 1, "keep": len(prefill_scratch)}[keep]
    counts = np.array(data.draw(st.lists(st.lists(st.integers(0, 40), min_size=ctx.num_experts, max_size=ctx.num_experts),
                                         min_size=ctx.num_layers, max_size=ctx.num_layers)), dtype=np.float64)
    for layer_idx, n in data.draw(layer_calls(ctx), label="prefill swaps first"):
        policy.swap_hot(layer_idx, n)
    before = policy.placement.copy()
    policy.set_decode(True)
    assert len(policy.scratch()) == min(want, len(prefill_scratch))
    assert policy.resident_capacity() == ctx.gpu_slots - len(policy.scratch())
    if data.draw(st.booleans(), label="placed on the prompt"):
        policy.place_on(counts)
    placed = policy.placement.copy()
    changed = policy.fill_free(counts)
    after = policy.placement
    after.check()
    for l, e, slot in changed:  # only free resident slots were filled, with host experts
        assert placed.owner[slot][0] == HOST and not placed.resident(l, e) and slot < policy.resident_capacity()
    hosted = [counts[l, e] for l in ctx.moe_layers for e in range(ctx.num_experts) if not after.resident(l, e)]
    if hosted:  # a host expert is left only where every resident slot is full, and none left out beats one placed
        assert all(after.owner[s][0] != HOST for s in range(policy.resident_capacity()))
        assert all(counts[l, e] >= max(hosted) for l, e, _ in changed)
    for l in ctx.moe_layers:  # what the prefill had resident stays where it was unless placed anew on the prompt
        for e in before.resident_experts(l):
            assert after.resident(l, e) or not placed.resident(l, e)
    policy.set_decode(False)
    assert policy.resident_capacity() == prefill_capacity and policy.scratch() == prefill_scratch
    policy.placement.check()
    for l in ctx.moe_layers:
        for e in policy.placement.resident_experts(l):
            assert policy.placement.slot(l, e) < prefill_capacity and after.slot(l, e) == policy.placement.slot(l, e)
        for e in after.resident_experts(l):
            assert policy.placement.resident(l, e) == (after.slot(l, e) < prefill_capacity)


@pytest.mark.parametrize("value", ["x", "-1", "1.5"])
def test_a_bad_decode_scratch_setting_is_an_error_that_names_it(monkeypatch, value):
    monkeypatch.setenv("DAOP_DECODE_SCRATCH", value)
    ctx = PolicyContext(2, 4, 1, 7, [0, 1], np.ones((2, 4)), CostModel(None))
    with pytest.raises(DaopError, match="DAOP_DECODE_SCRATCH"):
        make_daop("daop-exact", ctx)


def test_daop_strict_keeps_its_scratch_slots_in_decode(monkeypatch):
    """Without CPU experts every miss is copied into a scratch slot: the setting does not apply."""
    monkeypatch.setenv("DAOP_DECODE_SCRATCH", "0")
    policy = make_daop("daop-strict", PolicyContext(2, 4, 1, 7, [0, 1], np.ones((2, 4)), CostModel(None)))
    policy.set_decode(True)
    assert policy.scratch() == [5, 6]


@pytest.mark.parametrize("copy_ms,cpu_ms,kept", [(5.0, 1.0, 0), (0.1, 1.0, 2)])
def test_daop_exact_keeps_its_decode_scratch_slots_only_where_a_copy_beats_the_cpu(monkeypatch, copy_ms, cpu_ms, kept):
    """By default (auto) a one-token miss the CPU serves sooner than a copy makes the slots resident
    ones in decode; where copies win they stay scratch, as DAOP_DECODE_SCRATCH=keep has them."""
    monkeypatch.delenv("DAOP_DECODE_SCRATCH", raising=False)
    ctx = PolicyContext(2, 4, 1, 7, [0, 1], np.ones((2, 4)), CostModel(profile(copy_ms, cpu_ms)))
    policy = make_daop("daop-exact", ctx)
    assert policy.decode_scratch == kept
    policy.set_decode(True)
    assert len(policy.scratch()) == kept and policy.resident_capacity() == 7 - kept
    monkeypatch.setenv("DAOP_DECODE_SCRATCH", "auto")
    assert make_daop("daop-exact", PolicyContext(2, 4, 1, 7, [0, 1], np.ones((2, 4)), CostModel(profile(copy_ms, cpu_ms)))).decode_scratch == kept


def test_scratch_slots_setting_sets_them_for_both_phases(monkeypatch):
    monkeypatch.setenv("DAOP_SCRATCH_SLOTS", "1")
    monkeypatch.setenv("DAOP_DECODE_SCRATCH", "keep")
    policy = make_daop("daop-exact", PolicyContext(2, 4, 1, 7, [0, 1], np.ones((2, 4)), CostModel(None)))
    assert policy.scratch() == [6] and policy.resident_capacity() == 6
    policy.set_decode(True)
    assert policy.scratch() == [6]
    monkeypatch.setenv("DAOP_SCRATCH_SLOTS", "two")
    with pytest.raises(DaopError, match="DAOP_SCRATCH_SLOTS='two'"):
        make_daop("daop-exact", PolicyContext(2, 4, 1, 7, [0, 1], np.ones((2, 4)), CostModel(None)))
