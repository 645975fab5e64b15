"""Experts split between the two channels: the CPU computes an expert's first intermediate rows while
the copy stream brings the rest to a scratch slot for the GPU (`plan_speculation` with `SplitRows`,
`daop.quant.expert_rows`, the C kernel's row limit, `Transfer.copy_expert_rows`).

The split is off by default (on the H200 host it made decode slower: the copy and the CPU share host
memory bandwidth); DAOP_SPLIT_EXPERTS=1 turns it on, on a CPU device too, which is how the runner's
split path is exercised here."""
import os

import pytest
import torch

from daop.engine import Engine, default_model_dir
from daop.executors import copy2d
from daop.executors.cpu import CpuExecutor
from daop.executors.transfer import Transfer
from daop.kernels import cpu_expert
from daop.quant import expert_forward, expert_rows
from daop.runtime.scheduler import Clock, Prepared, SplitRows, plan_decode_layer, plan_speculation
from daop.sampling import SamplingParams

from helpers import write_profile
from test_scheduler import Costs, split_with

needs_kernel = pytest.mark.skipif(not cpu_expert.available(), reason="no C compiler: the kernel cannot be built")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICE = os.environ.get("DAOP_TEST_DEVICE", "cpu")
ROWS = SplitRows(160, tuple(range(16, 160, 16)))  # an expert of 160 rows: K = 16, 32, .. 144


def expert(D, I, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2 * I, D, generator=g) * 0.05).to(dtype), (torch.randn(D, I, generator=g) * 0.05).to(dtype)


def test_split_rows_grid():
    assert SplitRows.for_inter(160) == ROWS
    big = SplitRows.for_inter(14336)  # Mixtral: 15 split points, 896 rows apart
    assert big.grid[0] == 896 and len(big.grid) == 15 and all(k % 16 == 0 for k in big.grid)
    assert SplitRows.for_inter(16).grid == ()  # nothing to split


def test_parts_of_an_expert_add_up_to_it():
    gate_up, down = expert(64, 160, torch.float32)
    x = torch.randn(3, 64)
    whole = expert_forward(x, [gate_up, down])
    for k in ROWS.grid:
        head, tail = expert_rows(x, [gate_up, down], 0, k), expert_rows(x, [gate_up, down], k, 160)
        torch.testing.assert_close(head + tail, whole, rtol=1e-5, atol=1e-6)
    # only the rows read need to be there: a slot holding rows [k, I) serves the tail
    partial = [torch.full_like(gate_up, float("nan")), torch.full_like(down, float("nan"))]
    partial[0][96:160], partial[0][256:], partial[1][:, 96:] = gate_up[96:160], gate_up[256:], down[:, 96:]
    torch.testing.assert_close(expert_rows(x, partial, 96, 160), expert_rows(x, [gate_up, down], 96, 160))


@needs_kernel
@pytest.mark.parametrize("k", [16, 96, 144, 160])
def test_kernel_computes_the_first_rows_of_an_expert(k):
    gate_up, down = expert(64, 160)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    ref = expert_rows(x.float(), [gate_up.float(), down.float()], 0, k)
    y = cpu_expert.expert(x, gate_up, down, threads=2, rows=k)
    assert (y.float() - ref).abs().max().item() <= ref.abs().max().item() * 2**-6 + 1e-3
    if k == 160:  # all rows: the whole expert, bit for bit as before
        assert torch.equal(y, cpu_expert.expert(x, gate_up, down, threads=2))
    queued = cpu_expert.Queued([x], [(gate_up, down)], threads=2, rows=[k]).wait()[0]
    assert torch.equal(queued, y)


@needs_kernel
def test_kernel_refuses_a_part_that_does_not_fit():
    gate_up, down = expert(64, 160)
    x = torch.randn(1, 64).bfloat16()
    for k in (0, 161):
        with pytest.raises(ValueError, match=f"part of {k} intermediate rows does not fit an expert of 160"):
            cpu_expert.expert(x, gate_up, down, threads=1, rows=k)


def test_executor_computes_the_cpus_part_of_a_split_expert():
    gate_up, down = expert(64, 160, torch.float32)
    h = torch.randn(4, 64)
    rows = torch.tensor([0, 2])
    ex = CpuExecutor(threads=1, mode="inline")
    out = ex.submit([(3, rows, (gate_up, down)), (5, rows, (gate_up, down))], h, None, parts={3: 48}).result()
    torch.testing.assert_close(out[3], expert_rows(h[rows], [gate_up, down], 0, 48))
    torch.testing.assert_close(out[5], expert_forward(h[rows], [gate_up, down]))
    with pytest.raises(ValueError, match="whole experts only"):
        ex.submit([(3, rows, (gate_up, down))], h, None, lambda x, g, d: x, parts={3: 48})
    ex.close()


def test_a_rows_copy_fills_only_those_rows_of_the_slot():
    src = expert(8, 160, torch.float32)
    dst = (torch.zeros(320, 8), torch.zeros(8, 160))
    assert Transfer(torch.device("cpu")).copy_expert_rows(src, dst, 0, 96, 160) is None
    assert torch.equal(dst[0][96:160], src[0][96:160]) and torch.equal(dst[0][256:], src[0][256:])
    assert torch.equal(dst[1][:, 96:], src[1][:, 96:])
    assert dst[0][:96].abs().sum() == 0 and dst[0][160:256].abs().sum() == 0 and dst[1][:, :96].abs().sum() == 0


@needs_cuda
def test_a_rows_copy_on_cuda_lands_exactly_through_the_drivers_2d_copy():
    src = tuple(t.pin_memory() for t in expert(64, 160))
    dst = tuple(torch.zeros(t.shape, dtype=t.dtype, device="cuda") for t in src)
    done = Transfer(torch.device("cuda")).copy_expert_rows(src, dst, 0, 96, 160)
    done.synchronize()
    got = tuple(t.cpu() for t in dst)
    assert torch.equal(got[0][96:160], src[0][96:160]) and torch.equal(got[0][256:], src[0][256:])
    assert torch.equal(got[1][:, 96:], src[1][:, 96:]) and got[1][:, :96].abs().sum() == 0
    assert not copy2d._STATE.get("warned")  # the driver's copy ran, not the fallback


def speculate(counts, slots, clock, cost, **kw):
    return plan_speculation(counts, set(), slots, clock, cost, stale_input=False, speculative_copies=True,
                            balance_channels=kw.pop("balance", True), rows=kw.pop("rows", ROWS), **kw)


def test_speculation_splits_an_expert_that_neither_channel_serves_in_time():
    cost = Costs(cpu=3.0, copy=6.0)
    # 1 ms of lead: the whole copy lands 5 ms late, the CPU takes 3; with rows [0, 96) (60 %) on the
    # CPU (1.8 ms) and the rest copied (2.4 ms, 1.4 late) the next layer waits 1.8 ms
    spec = speculate({1: 1}, [8], Clock(lead=1.0), cost)
    assert spec.split == ((1, 8, 96),) and spec.split_lands == (pytest.approx(2.4),)
    assert spec.copies == () and spec.cpu_assigned == ()
    # without a grid (a CPU device, low-bit experts, the switch off): as before, the CPU
    assert speculate({1: 1}, [8], Clock(lead=1.0), cost, rows=None).cpu_assigned == (1,)
    # a copy that lands in time is not split; neither is one without a free slot
    assert speculate({1: 1}, [8], Clock(lead=6.0), cost).copies == ((1, 8),)
    full = speculate({1: 1, 2: 1}, [8], Clock(lead=1.0), cost)
    assert full.split == ((1, 8, 96),) and full.cpu_assigned == (2,)
    # the split sees the copy stream's backlog: behind 1 ms of copies the CPU takes rows [0, 112)
    # (2.1 ms; the copy lands at 2.8), behind 4 ms the whole expert
    late = speculate({1: 1}, [8], Clock(copy_free=1.0, lead=1.0), cost)
    assert late.split == ((1, 8, 112),) and late.split_lands == (pytest.approx(2.8),)
    assert speculate({1: 1}, [8], Clock(copy_free=4.0, lead=1.0), cost).cpu_assigned == (1,)


def test_speculation_splits_only_where_balancing_and_cpu_experts_allow():
    cost = Costs(cpu=3.0, copy=6.0)
    assert speculate({1: 1}, [8], Clock(lead=1.0), cost, balance=False).copies == ((1, 8),)
    strict = speculate({1: 1}, [8], Clock(lead=1.0), cost, cpu_experts=False)
    assert strict.copies == ((1, 8),) and strict.split == ()


def test_decode_serves_split_experts_and_keeps_their_slots():
    prepared = Prepared(split={3: (8, 96), 4: (9, 48)})
    plan = plan_decode_layer({0: 1, 3: 1, 6: 1}, {}, {0: 0}, [8, 9], prepared, split_with(Costs(cpu=1.0, copy=6.0)))
    assert plan.layer.split == ((3, 8, 96),)  # 4 was predicted, not routed: its part is wasted
    assert plan.layer.gpu == ((0, 0),) and plan.layer.cpu == (6,)
    copied = plan_decode_layer({0: 1, 3: 1, 6: 1}, {}, {0: 0}, [8, 9], prepared, split_with(Costs(cpu=10.0, copy=1.0)))
    assert copied.layer.copy == ((6, 9),)  # slot 8 holds 3's rows; 9 is free again


def test_daop_exact_with_split_experts_gives_the_gpu_policys_tokens(tmp_path, monkeypatch):
    """In float32 (on the CPU, or on CUDA with DAOP_TEST_DEVICE=cuda, where the parts' copies go
    through the driver's 2D copy) the added parts give the all-GPU path's greedy tokens."""
    prompt, params = "And God said unto Moses,", SamplingParams(max_new_tokens=24)

    def tokens(**options):
        engine = Engine.from_pretrained(None, device=DEVICE, dtype="fp32", progress=False, **options)
        engine.eos_ids = frozenset()
        out = list(engine.generate_ids(engine.tokenizer.encode(prompt), params))
        return out, engine.counters()

    reference, _ = tokens()
    monkeypatch.setenv("DAOP_SPLIT_EXPERTS", "1")
    monkeypatch.setenv("DAOP_DECODE_SCRATCH", "keep")  # a split's rows are copied into a scratch slot
    profile = write_profile(default_model_dir(), tmp_path, copy_ms=20.0, cpu_ms=5.0)  # neither channel alone serves a miss in time
    split, counters = tokens(policy="daop-exact", expert_ratio=0.25, hardware_profile=profile)
    assert counters["speculative_splits"] > 0 and counters["split_calls"] > 0
    assert split == reference  # float32 parts added: the same greedy tokens
    monkeypatch.setenv("DAOP_SPLIT_EXPERTS", "0")
    _, off = tokens(policy="daop-exact", expert_ratio=0.25, hardware_profile=profile)
    assert off["speculative_splits"] == 0 and off["split_calls"] == 0
