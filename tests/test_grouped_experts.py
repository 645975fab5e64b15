"""Grouped products for a layer's experts (`daop.quant.grouped_experts`, `OffloadedExperts.grouped`).

On CUDA a prefill's float experts run as two grouped products over the layer's stacked experts
(all-resident) or over the slot stack (offloaded), with no host sync in the all-resident case. The
CPU keeps its per-expert products; here the grouped path is turned on for the CPU device to check
its bookkeeping: sorting, offsets, empty groups, waves around reused slots, the weighted sum. On a
GPU (DAOP_TEST_DEVICE=cuda) test_policies checks that copy-only policies stay bitwise equal to `gpu`
with it.
"""
import pytest
import torch

from daop import quant
from daop.engine import Engine
from daop.model.moe import group_by_expert, swiglu, token_rows, weighted_sum
from daop.runtime.offload import OffloadedExperts
from daop.sampling import SamplingParams

PROMPT = [5, 17, 42, 99, 3, 250, 7, 64, 128, 31, 77, 200, 9, 11, 13, 300, 21]


def stacked_experts(E=6, D=32, I=48, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(E, 2 * I, D, generator=gen).to(dtype) * 0.2, torch.randn(E, D, I, generator=gen).to(dtype) * 0.2]


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_grouped_experts_adds_the_grouped_outputs_as_weighted_sum_does(K, ids_dtype):
    E, N = 6, 23
    stacked = stacked_experts(E)
    gen = torch.Generator().manual_seed(K)
    h = torch.randn(N, stacked[0].shape[2], generator=gen)
    logits = torch.randn(N, E, generator=gen)
    logits[:, 3] = -1e9  # expert 3 is never picked: an empty group
    weights, ids = torch.softmax(logits, -1).topk(K, dim=-1)
    ids = ids.to(ids_dtype)
    out = quant.grouped_experts(h, ids, weights, stacked)

    rows_host = group_by_expert(ids.long())
    assert 3 not in rows_host
    rows = token_rows(h, rows_host)
    one = torch.tensor([0], dtype=torch.int32)  # each expert alone, as a group of a one-expert stack
    alone = {e: quant.grouped_swiglu(h[r[0]], one + len(r[0]), stacked[0][e:e + 1], stacked[1][e:e + 1])
             for e, r in rows_host.items()}
    assert torch.equal(out, weighted_sum(h, alone, weights, rows_host, rows))
    per_expert = {e: swiglu(h[r[0]], stacked[0][e], stacked[1][e]) for e, r in rows_host.items()}
    ref = weighted_sum(h, per_expert, weights, rows_host, rows)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_grouped_products_are_used_only_where_they_apply(monkeypatch):
    cpu = torch.device("cpu")
    fmt = quant.ExpertFormat("auto", torch.float32)
    monkeypatch.setitem(quant.GROUPED, "cpu", True)
    assert quant.grouped_on_device(fmt, cpu, quant.GEMV_MAX_ROWS + 1, 64, 32)
    assert not quant.grouped_on_device(fmt, cpu, quant.GEMV_MAX_ROWS, 64, 32)  # decode rows: the GEMV kernel's
    assert not quant.grouped_on_device(quant.ExpertFormat("int8", torch.float32), cpu, 64, 64, 32)
    assert not quant.grouped_on_device(quant.ExpertFormat("auto", torch.float32, glu=(1.7, 7.0)), cpu, 64, 64, 32)
    monkeypatch.setitem(quant.GROUPED, "cpu", False)
    assert not quant.grouped_on_device(fmt, cpu, 64, 64, 32)


def test_grouped_products_need_rows_of_whole_16_bytes_on_cuda(monkeypatch):
    """torch's CUDA grouped product refuses rows that are not whole 16 bytes: such sizes keep a product
    pair per expert (decided before the one-time device check, so this runs without a GPU)."""
    cuda = torch.device("cuda")
    assert quant.grouped_sizes_ok(cuda, torch.bfloat16, 4096, 14336)
    assert not quant.grouped_sizes_ok(cuda, torch.bfloat16, 100, 14336)  # 200-byte rows
    assert not quant.grouped_sizes_ok(cuda, torch.bfloat16, 4096, 1404)
    assert quant.grouped_sizes_ok(cuda, torch.float32, 100, 36)  # 400 and 144 bytes
    assert quant.grouped_sizes_ok(torch.device("cpu"), torch.bfloat16, 100, 1404)
    monkeypatch.setitem(quant.GROUPED, "cuda", True)
    checked = []
    monkeypatch.setattr(quant, "grouped_mm_works", lambda device, dtype: checked.append(device) or True)
    fmt = quant.ExpertFormat("auto", torch.bfloat16)
    assert not quant.grouped_on_device(fmt, cuda, 64, 100, 1404) and checked == []
    assert quant.grouped_on_device(fmt, cuda, 64, 4096, 14336) and checked == [cuda]


@pytest.fixture
def grouped_on_cpu(monkeypatch):
    monkeypatch.setitem(quant.GROUPED, "cpu", True)
    launches = []
    real = quant.grouped_swiglu

    def counted(x, offs, gate_up, down):  # calls through; counts the launches by stack size
        launches.append(gate_up.shape[0])
        return real(x, offs, gate_up, down)

    monkeypatch.setattr(quant, "grouped_swiglu", counted)
    monkeypatch.setattr("daop.runtime.offload.grouped_swiglu", counted)
    return launches


def greedy(engine, n=10):
    engine.eos_ids = frozenset()
    return list(engine.generate_ids(PROMPT, SamplingParams(max_new_tokens=n)))


@pytest.mark.parametrize("policy,ratio", [("ondemand", 0.25), ("lru", 0.25), ("daop-strict", 0.5), ("daop-exact", 0.5),
                                          ("static", 0.5), ("fiddler", 0.25)])
def test_offloaded_prefill_in_grouped_waves_equals_gpu(tiny_dir, grouped_on_cpu, policy, ratio):
    _, path = tiny_dir("mixtral")
    ref_engine = Engine.from_pretrained(path, device="cpu", dtype="fp32", progress=False)
    ref_tokens, ref_logits = greedy(ref_engine), ref_engine.logits(PROMPT)
    layers = ref_engine.config.num_layers
    experts = ref_engine.config.num_experts
    assert grouped_on_cpu and set(grouped_on_cpu) == {experts}  # the all-resident prefill: one launch per layer
    del grouped_on_cpu[:]
    engine = Engine.from_pretrained(path, device="cpu", dtype="fp32", progress=False, policy=policy, expert_ratio=ratio)
    assert greedy(engine) == ref_tokens
    assert torch.equal(engine.logits(PROMPT), ref_logits)
    slots = engine.decoder.experts.store.num_slots
    assert grouped_on_cpu and set(grouped_on_cpu) == {slots}  # over the slot stack
    if policy == "ondemand":  # scratch slots reused within a layer: more than one wave in some layer
        assert len(grouped_on_cpu) > 2 * layers


def test_batch_prefill_and_wide_decode_use_grouped_products(tiny_dir, grouped_on_cpu):
    """A batch of more rows than the GEMV kernel takes decodes through grouped products too."""
    _, path = tiny_dir("mixtral")
    prompts = [PROMPT[i:] for i in range(10)]
    params = SamplingParams(max_new_tokens=5)

    def run(**kw):
        engine = Engine.from_pretrained(path, device="cpu", dtype="fp32", progress=False, **kw)
        engine.eos_ids = frozenset()
        return engine.generate_batch(prompts, params)

    ref = run()
    assert grouped_on_cpu
    assert run(policy="lru", expert_ratio=0.25) == ref
