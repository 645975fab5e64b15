"""A CPU device's small bf16 experts, several at once, through one batched product pair over the
stack (`daop.quant.stacked_swiglu`): the same bits as each expert alone, so the all-resident runner
that uses it still gives every exact policy's tokens."""
import pytest
import torch

import daop.quant as quant
from daop.batching import generate_many
from daop.engine import Engine
from daop.model.moe import group_by_expert
from daop.quant import expert_forward, stacked_swiglu, stacks_on_cpu
from daop.sampling import SamplingParams

PROMPTS = ["In the beginning God created", "ROMEO. But soft, what light", "def fibonacci(n):",
           "The os module provides", "hacker n.", "import json\n"]


@pytest.fixture(scope="module")
def shipped():
    return Engine.from_pretrained(None, device="cpu", progress=False)  # bf16, as shipped


def needs_exact_stacking(engine):
    """Skip where this CPU's batched product rounds otherwise than its plain one at the shipped
    sizes: the stacked path is off there (`stacked_is_exact`), and the rule tests below still run."""
    c = engine.config
    if not quant.stacked_is_exact(c.hidden_size, c.expert_intermediate_size, torch.bfloat16):
        pytest.skip("this CPU's batched bf16 product differs from its plain one at these sizes: stacking is off here")


def routing(tokens, experts, top_k, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])


@pytest.mark.parametrize("tokens", [1, 2, 3, 8, 17])
def test_stacked_experts_give_each_experts_bits_alone(shipped, tokens):
    """The shipped model's first layer, random rows and routing: every routed expert's output rows
    equal `expert_forward` on its rows alone, bit for bit (experts skipped inside the range, padding)."""
    needs_exact_stacking(shipped)
    c, experts = shipped.config, shipped.decoder.experts
    layer = c.moe_layer_ids()[0]
    assert stacks_on_cpu(experts.fmt, torch.empty(tokens, c.hidden_size, dtype=torch.bfloat16), c.hidden_size,
                         c.expert_intermediate_size, [0, 1])
    for seed in range(4):
        h = torch.randn(tokens, c.hidden_size, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
        rows_host = group_by_expert(routing(tokens, c.num_experts, c.top_k, seed))
        ys = stacked_swiglu(h, rows_host, experts.tensors[layer])
        assert sorted(ys) == sorted(rows_host)
        for e, (rows, _) in rows_host.items():
            alone = expert_forward(h if tokens == 1 else h[rows], experts.weights_of(layer, e))
            assert ys[e].shape == alone.shape
            assert torch.equal(ys[e], alone), (tokens, seed, e)


def test_only_small_bf16_float_experts_of_few_rows_on_a_cpu_are_stacked(shipped):
    c, fmt = shipped.config, shipped.decoder.experts.fmt
    D, I = c.hidden_size, c.expert_intermediate_size
    bf16 = torch.empty(4, D, dtype=torch.bfloat16)
    assert not stacks_on_cpu(fmt, bf16, D, I, [0, 7])  # more read for nothing than saved
    assert not stacks_on_cpu(fmt, bf16, D, I, [4])  # one expert: its own product pair
    assert not stacks_on_cpu(fmt, torch.empty(4, D), D, I, [1, 2, 3])  # float32 keeps its pairs
    assert not stacks_on_cpu(fmt, torch.empty(quant.STACKED_MAX_TOKENS + 1, D, dtype=torch.bfloat16), D, I, [1, 2, 3])
    assert not stacks_on_cpu(fmt, bf16, 4096, 14336, [1, 2, 3])  # a Mixtral expert: its reads, not the call, cost
    needs_exact_stacking(shipped)
    assert stacks_on_cpu(fmt, bf16, D, I, [1, 2, 3])
    assert stacks_on_cpu(fmt, bf16, D, I, [0, 2])  # one pair saved, one expert read for nothing
    assert stacks_on_cpu(fmt, bf16, D, I, [0, 2, 3, 6])


def test_the_exactness_check_catches_a_batched_product_that_differs(monkeypatch):
    """`stacked_is_exact` compares against `expert_forward` alone: a batched product that differs in
    one element of one expert's rows turns stacking off."""
    real_bmm = torch.bmm

    def one_element_off(a, b):
        out = real_bmm(a, b)
        out[-1, 0, 0] = out[-1, 0, 0] * 2 + 1  # the last expert's first row
        return out

    quant.stacked_is_exact.cache_clear()
    try:
        monkeypatch.setattr(torch, "bmm", one_element_off)
        assert quant.stacked_is_exact(32, 48, torch.bfloat16) is False
    finally:
        quant.stacked_is_exact.cache_clear()


@pytest.mark.parametrize("policy,ratio", [("daop-exact", 0.5), ("lru", 0.25)])
def test_exact_policies_in_bf16_give_the_stacked_all_resident_paths_tokens(shipped, policy, ratio, monkeypatch):
    """Batches of six prompts on the CPU in bf16: the all-resident runner (stacked products) and an
    offloaded exact policy (a product pair per expert) give the same tokens, and the stacked path
    gives the per-expert path's tokens."""
    import daop.weights.expert_store as store

    needs_exact_stacking(shipped)
    calls = []
    monkeypatch.setattr(store, "stacked_swiglu", lambda *a: calls.append(a[0].shape[0]) or stacked_swiglu(*a))
    params = SamplingParams(max_new_tokens=24)
    stacked = generate_many(shipped, PROMPTS, params, max_batch=6)
    assert max(calls) > 1 and min(calls) < 6  # prompt chunks and batch steps of several sizes went through it
    before = quant.STACKED_MAX_TOKENS
    try:
        quant.STACKED_MAX_TOKENS = 0  # off: a product pair per expert
        per_expert = generate_many(shipped, PROMPTS, params, max_batch=6)
    finally:
        quant.STACKED_MAX_TOKENS = before
    assert [r["text"] for r in stacked] == [r["text"] for r in per_expert]
    offloaded = Engine.from_pretrained(None, device="cpu", progress=False, policy=policy, expert_ratio=ratio)
    assert [r["text"] for r in generate_many(offloaded, PROMPTS, params, max_batch=6)] == [r["text"] for r in stacked]


def test_cpu_stacked_probe_checks_bits_and_times_both_ways(shipped):
    """scripts/cpu_stacked_probe.py (the README's stacked-expert numbers), a few calls and steps."""
    from helpers import load_script

    needs_exact_stacking(shipped)
    before = torch.get_num_threads()
    try:
        rows = load_script("cpu_stacked_probe").main(["--tokens", "1,8", "--batch", "2", "--steps", "3", "--repeats", "3"])
    finally:
        torch.set_num_threads(before)
    assert [r["kind"] for r in rows] == ["card", "layer", "layer", "step"]
    assert all(r["bitwise_equal"] and r["per_expert_us"] > 0 and r["stacked_us"] > 0 for r in rows[1:3])
    assert rows[3]["same_tokens"] and rows[3]["per_expert_ms"] > 0 and rows[3]["stacked_ms"] > 0
