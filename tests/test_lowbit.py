"""Low-bit routed experts (int8 per channel, int4 group-wise): formats, kernels, loading, policies, budget.

On the CPU every expert, wherever it runs, goes through the same kernels, so every exact policy with
int8 or int4 experts gives bitwise the tokens and logits of `gpu` with the same expert format.
"""
from __future__ import annotations

import pytest
import torch

from daop import int4_layout
from daop.bench.geometry import geometry_config
from daop.engine import Engine
from daop.errors import DaopError
from daop.quant import (ExpertFormat, dequantize, expert_forward, int4_codes, linear_q, pack_int4, quantize,
                        unpack_int4)
from daop.runtime.setup import resolve_expert_format
from daop.sampling import SamplingParams
from daop.weights.expert_views import ScratchBuffers, staged_views
from helpers import write_profile

PROMPT = [5, 17, 42, 99, 3, 250, 7, 64, 128, 31, 77, 200, 9, 11]
FORMATS = [("int8", 128), ("int4", 64)]  # the tiny models' hidden size is 64: int4 groups of 64
POLICIES = ["ondemand", "lru", "static", "fiddler", "daop-exact", "daop-strict"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# ------------------------------------------------------------------------------------------ formats

@pytest.mark.parametrize("shape", [(128, 256), (256, 128), (64, 64)])
def test_int4_packing_is_the_cpu_kernels_layout_and_inverts(shape):
    codes = torch.randint(0, 16, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    packed = pack_int4(codes)
    assert packed.shape == (shape[0], shape[1] // 2) and packed.dtype == torch.uint8
    assert torch.equal(packed, torch._convert_weight_to_int4pack_for_cpu(codes.int(), 2))
    assert torch.equal(unpack_int4(packed), codes)


@pytest.mark.parametrize("src,dst", [(64, 32), (32, 64), (64, 16), (32, 32)])
def test_int4_relayout_between_block_heights_keeps_the_codes(src, dst):
    codes = torch.randint(0, 16, (128, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    moved = int4_layout.relayout(int4_layout.pack(codes, src), src, dst)
    assert torch.equal(moved, int4_layout.pack(codes, dst))
    assert torch.equal(int4_layout.unpack(moved, dst), codes)
    assert (src == dst) == torch.equal(int4_layout.pack(codes, src), moved)


def test_the_folder_layout_is_the_same_on_every_cpu():
    codes = torch.randint(0, 16, (128, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    host = pack_int4(codes)  # this machine's layout
    assert torch.equal(int4_layout.to_disk(host), int4_layout.pack(codes, int4_layout.DISK_BLOCK_N))
    assert torch.equal(int4_layout.from_disk(int4_layout.to_disk(host)), host)


def test_quantization_error_is_at_most_half_a_step():
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(2)) * 0.05
    q, s = quantize(w, "int8")
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (dequantize((q, s)) - w).abs()
    assert (err <= s[:, None] / 2 * (1 + 1e-5) + 1e-7).all()
    codes, sz = int4_codes(w, 64)
    assert int(codes.max()) <= 15
    step = sz[..., 0].t().repeat_interleave(64, dim=1)  # [N, K]
    err = (dequantize((pack_int4(codes), sz)) - w).abs()
    assert (err <= step / 2 * (1 + 1e-4) + 1e-7).all()
    # each group's extremes are represented to within half a step, the group's range is covered
    assert err.max() < w.abs().max() / 15


@pytest.mark.parametrize("kind,group", FORMATS + [("int4", 128)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_kernel_equals_the_dequantized_product(kind, group, dtype, tol):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(192, 256, generator=gen) * 0.02
    q, s = quantize(w.to(dtype), kind, group, dtype)
    for m in (1, 5):
        x = torch.randn(m, 256, generator=gen).to(dtype)
        y = linear_q(x, q, s)
        assert y.dtype == dtype and y.shape == (m, 192)
        assert rel(y, x.float() @ dequantize((q, s)).t()) < tol


@pytest.mark.parametrize("kind,group", FORMATS + [("int4", 128)])
def test_expert_forward_with_padding_computes_the_dequantized_expert(kind, group):
    """int4 pads the intermediate size (176 -> a multiple of max(64, group)); the expert's function
    is that of its dequantized, unpadded weights."""
    D, I = 128, 176
    gen = torch.Generator().manual_seed(4)
    gate_up, down = torch.randn(2 * I, D, generator=gen) * 0.02, torch.randn(D, I, generator=gen) * 0.02
    fmt = ExpertFormat(kind, torch.float32, group)
    w = fmt.from_float(gate_up, down)
    assert [tuple(t.shape) for t in w] == [shape for shape, _ in fmt.shapes(D, I)]
    assert sum(t.numel() * t.element_size() for t in w) == fmt.bytes(D, I)
    Ip = fmt.padded_inter(I)
    gu = dequantize(w[:2])
    gate, up = gu[:I], gu[Ip:Ip + I]
    assert (Ip > I) == (kind == "int4")
    assert gu[I:Ip].abs().sum() < 1e-9 and gu[Ip + I:].abs().sum() < 1e-9  # padding is zero
    dn = dequantize(w[2:])[:, :I]
    x = torch.randn(3, D, generator=gen)
    ref = torch.nn.functional.linear(torch.nn.functional.silu(x @ gate.t()) * (x @ up.t()), dn)
    assert rel(expert_forward(x, list(w)), ref) < 1e-5
    # and it approximates the float expert
    full = expert_forward(x, [gate_up, down])
    assert rel(expert_forward(x, list(w)), full) < (0.02 if kind == "int8" else 0.3)


@pytest.mark.parametrize("kind,group", FORMATS + [("int4", 128)])
def test_a_biased_clamped_expert_computes_its_dequantized_weights(kind, group):
    """gpt-oss's experts (biases after the weights, clamped SwiGLU) in a low-bit format compute the
    function of their dequantized weights, padding included, as float experts do."""
    D, I, glu = 128, 176, (1.702, 0.5)  # a low limit: the clamp is reached
    gen = torch.Generator().manual_seed(6)
    gate_up, down = torch.randn(2 * I, D, generator=gen) * 0.05, torch.randn(D, I, generator=gen) * 0.05
    fmt = ExpertFormat(kind, torch.float32, group)
    w = list(fmt.from_float(gate_up, down))
    Ip = fmt.padded_inter(I)
    gu_bias = torch.zeros(2 * Ip)
    gu_bias[:I], gu_bias[Ip:Ip + I] = torch.randn(I, generator=gen), torch.randn(I, generator=gen)
    dn_bias = torch.randn(D, generator=gen)
    x = torch.randn(3, D, generator=gen)
    ref = expert_forward(x, [dequantize(w[:2]), dequantize(w[2:]), gu_bias, dn_bias], glu)
    assert rel(expert_forward(x, w + [gu_bias, dn_bias], glu), ref) < 1e-5


@pytest.mark.parametrize("kind,group", FORMATS)
def test_loading_part_by_part_equals_quantizing_the_whole_expert(kind, group):
    D, I = 64, 96
    gen = torch.Generator().manual_seed(5)
    gate_up, down = torch.randn(2 * I, D, generator=gen), torch.randn(D, I, generator=gen)
    fmt = ExpertFormat(kind, torch.float32, group)
    target = tuple(torch.full(shape, 7, dtype=dtype) for shape, dtype in fmt.shapes(D, I))
    done = []
    views = staged_views(fmt, lambda: target, ScratchBuffers(torch.float32), D, I, lambda: done.append(1))
    for view, src in zip(views, (gate_up[:I], gate_up[I:], down)):
        assert tuple(view.shape) == tuple(src.shape)
        view.buffer.copy_(src)
        view.commit()
    assert len(done) == 3
    assert all(torch.equal(a, b) for a, b in zip(target, fmt.from_float(gate_up, down)))


def test_stored_bytes_per_format_on_the_mixtral_geometry():
    c, _ = geometry_config("mixtral-8x7b", 1)
    sizes = {k: ExpertFormat(k, torch.bfloat16).bytes(c.hidden_size, c.expert_intermediate_size) for k in ("auto", "int8", "int4")}
    assert sizes["auto"] == 3 * 4096 * 14336 * 2
    assert 0.5 <= sizes["int8"] / sizes["auto"] < 0.501
    assert sizes["int4"] / sizes["auto"] < 0.27  # 4 bits plus a bf16 scale and zero per 128 weights


# ------------------------------------------------------------------------------------------ engines

def greedy(engine, n=16):
    engine.eos_ids = frozenset()
    return list(engine.generate_ids(PROMPT, SamplingParams(max_new_tokens=n)))


@pytest.fixture(scope="module")
def lowbit_reference(tiny_dir):
    cache = {}

    def get(family, kind, group):
        key = (family, kind, group)
        if key not in cache:
            _, path = tiny_dir(family)
            engine = Engine.from_pretrained(path, device="cpu", dtype="fp32", progress=False, expert_dtype=kind, group_size=group)
            assert engine.policy == "gpu" and engine.expert_format.kind == kind
            cache[key] = (greedy(engine), engine.logits(PROMPT))
        return cache[key]

    return get


@pytest.mark.parametrize("kind,group", FORMATS)
@pytest.mark.parametrize("policy", POLICIES)
def test_exact_policies_equal_gpu_with_lowbit_experts(tiny_dir, lowbit_reference, kind, group, policy, tmp_path):
    _, path = tiny_dir("mixtral")
    ref_tokens, ref_logits = lowbit_reference("mixtral", kind, group)
    fmt = ExpertFormat(kind, torch.float32, group)
    extra = {"hardware_profile": write_profile(path, tmp_path, 10.0, 1.0, expert_format=fmt.name)} if policy == "fiddler" else {}
    engine = Engine.from_pretrained(path, device="cpu", dtype="fp32", progress=False, policy=policy, expert_ratio=0.25,
                                    expert_dtype=kind, group_size=group, **extra)
    assert greedy(engine) == ref_tokens
    assert torch.equal(engine.logits(PROMPT), ref_logits)
    totals = engine.counters()
    if policy in ("static", "fiddler"):
        assert totals["cpu_calls"] > 0
    if policy in ("lru", "ondemand", "daop-strict"):
        assert totals["copy_calls"] > 0


@pytest.mark.parametrize("kind,group,tol", [("int8", 128, 0.1), ("int4", 64, 0.5)])
def test_lowbit_logits_stay_near_the_float_model(tiny_dir, lowbit_reference, family, kind, group, tol):
    """Every family runs with low-bit experts; the logits move, by an amount that fits the bits (random
    tiny models are sensitive: a small change can flip a routing choice; the shipped trained model's
    perplexity change is measured by `daop eval`, in README). gpt-oss's tiny model, whose clamp is set
    low so that it is reached, moves most: 0.54 with int4 (mixtral's 0.38); that its experts compute
    their dequantized weights is tested on its own above."""
    if family == "gpt_oss" and kind == "int4":
        tol = 0.65
    _, path = tiny_dir(family)
    engine = Engine.from_pretrained(path, device="cpu", dtype="fp32", progress=False)
    float_logits = engine.logits(PROMPT)
    _, logits = lowbit_reference(family, kind, group)
    assert 0 < rel(logits, float_logits) < tol


def test_same_gpu_memory_holds_more_lowbit_experts(tiny_dir):
    _, path = tiny_dir("mixtral")
    b = Engine.from_pretrained(path, device="cpu", dtype="fp32", progress=False, policy="lru", expert_ratio=0.5).budget
    per = {k: ExpertFormat(k, torch.float32, g).bytes(64, 96) for k, g in (("auto", 128), *FORMATS)}
    assert per["int8"] < per["auto"] / 3.5 and per["int4"] < per["int8"]  # fp32 experts: 4 bytes a weight
    assert b.expert_bytes == per["auto"]
    room = 6 * per["auto"]  # GPU memory left for experts: six float experts' worth
    limit = b.dense_bytes + b.kv_bytes + b.workspace_bytes + room
    slots = {}
    for kind, group in (("auto", 128), *FORMATS):
        engine = Engine.from_pretrained(path, device="cpu", dtype="fp32", progress=False, policy="lru",
                                        gpu_memory=limit, expert_dtype=kind, group_size=group)
        slots[kind] = engine.budget.gpu_slots
        assert kind == "auto" or kind in engine.budget.describe()
        assert engine.budget.expert_bytes == per[kind]
    assert slots == {k: min(b.total_experts, room // per[k]) for k in per}
    assert slots["auto"] == 6 < slots["int8"] <= slots["int4"]


def test_budget_slots_scale_with_stored_bytes():
    from daop.placement.budget import resolve_budget

    c, _ = geometry_config("mixtral-8x7b", 8)
    per = {k: ExpertFormat(k, torch.bfloat16).bytes(c.hidden_size, c.expert_intermediate_size) for k in ("auto", "int8", "int4")}
    limit = 4 * 2**30 + 2 * 2**30
    slots = {k: resolve_budget(c, b, 2**30, 0, None, limit, workspace_bytes=2**30).gpu_slots for k, b in per.items()}
    assert slots["auto"] == (4 * 2**30) // per["auto"]
    assert slots["int8"] >= 2 * slots["auto"] - 1
    assert slots["int4"] >= 3.7 * slots["auto"]


# ------------------------------------------------------------------------------------------ bad input

def test_int4_group_that_does_not_divide_the_hidden_size_is_one_clear_error(tiny_dir):
    _, path = tiny_dir("mixtral")
    with pytest.raises(DaopError, match="hidden size 64 is not a multiple of --group-size 128"):
        Engine.from_pretrained(path, device="cpu", progress=False, expert_dtype="int4")
    with pytest.raises(DaopError, match="power of two"):
        Engine.from_pretrained(path, device="cpu", progress=False, expert_dtype="int4", group_size=48)


def test_int8_sizes_torch_cannot_multiply_are_one_clear_error():
    from daop.quant import ExpertFormat, check_geometry

    with pytest.raises(DaopError, match="hidden size 72 is not a multiple of 16"):
        check_geometry("int8", 72, 48, 128)
    with pytest.raises(DaopError, match="intermediate size 40 is not a multiple of 16"):
        ExpertFormat("int8", torch.bfloat16).check(64, 40)
    ExpertFormat("int8", torch.bfloat16).check(64, 48)  # whole 16s: fine


def test_expert_dtype_names_are_checked():
    c, _ = geometry_config("mixtral-8x7b", 1)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_expert_format(c, torch.bfloat16, cpu, "bf16").kind == "auto"
    with pytest.raises(DaopError, match="differs from the model's dtype"):
        resolve_expert_format(c, torch.float32, cpu, "fp16")
    with pytest.raises(DaopError, match="unsupported expert dtype 'int3'"):
        resolve_expert_format(c, torch.float32, cpu, "int3")
    with pytest.raises(DaopError, match="int4 experts on CUDA need --dtype bf16"):
        resolve_expert_format(c, torch.float16, cuda, "int4")


def test_profile_of_another_expert_format_is_refused(tiny_dir, tmp_path):
    _, path = tiny_dir("mixtral")
    profile = write_profile(path, tmp_path, 10.0, 1.0, expert_format=ExpertFormat("int8", torch.float32).name)
    with pytest.raises(DaopError, match="hardware profile is for experts 64x96 int8"):
        Engine.from_pretrained(path, device="cpu", dtype="fp32", progress=False, policy="fiddler", expert_ratio=0.25,
                               hardware_profile=profile)


def test_cli_rejects_a_bad_group_size_before_loading(capsys):
    from daop.cli import main

    assert main(["generate", "hi", "--device", "cpu", "--expert-dtype", "int4", "--group-size", "100"]) != 0
    assert "--group-size 100 must be a power of two" in capsys.readouterr().err
