"""The dense decoder's fused CUDA kernels (`daop.kernels.fused`) against the torch operations they replace.

They run on a CUDA device with Triton (scripts/gpu_checks.py --tests), or on the CPU under Triton's
interpreter (TRITON_INTERPRET=1 set before Triton is imported, and Triton installed); otherwise
skipped. Results are held to the rounding of the operations they replace: the interpreter rounds
float32 to bf16 otherwise than torch does, and on a GPU the compiler may fuse a product into a sum.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from daop.kernels import fused

CUDA = torch.cuda.is_available() and fused.AVAILABLE
if CUDA:
    DEVICE = torch.device("cuda")
elif fused.triton is not None and os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = torch.device("cpu")
else:
    pytestmark = pytest.mark.skip(reason="needs CUDA with Triton, or Triton's interpreter (TRITON_INTERPRET=1)")
    DEVICE = torch.device("cpu")


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    else:  # a bf16 rounding step for each of the (at most two) roundings
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 4096), (3, 5, 64), (2, 1, 8, 128), (7, 96)])
def test_rms_norm_equals_the_reference(dtype, shape):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype).to(DEVICE)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(dtype).to(DEVICE)
    want = w * F.rms_norm(x.float(), (shape[-1],), eps=1e-5).to(dtype)
    got = fused.rms_norm(x, w, 1e-5)
    assert got.shape == x.shape and got.dtype == dtype
    close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 4096), (3, 5, 64), (7, 96)])
def test_add_rms_norm_gives_the_residual_sum_and_its_norm(dtype, shape):
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype).to(DEVICE)
    delta = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(dtype).to(DEVICE)
    total, normed = fused.add_rms_norm(x, delta, w, 1e-5)
    if CUDA or dtype == torch.float32:  # one rounding of an exact float32 sum: torch's own
        assert torch.equal(total, x + delta)
    else:  # the interpreter rounds to bf16 its own way
        close(total, x + delta, dtype)
    assert normed.shape == x.shape and normed.dtype == dtype
    close(normed, w * F.rms_norm((x + delta).float(), (shape[-1],), eps=1e-5).to(dtype), dtype)
    assert torch.equal(normed, fused.rms_norm(total, w, 1e-5))  # the same kernel's norm as alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,heads,d", [(1, 1, 40, 128), (2, 3, 6, 64), (1, 4, 1, 16)])
def test_rotary_equals_the_reference_on_a_strided_view(dtype, B, T, heads, d):
    """x is a view of a wider product (as q and k are of the fused qkv product)."""
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(B, T, heads * d + 24, generator=gen).to(dtype).to(DEVICE)
    x = wide[..., : heads * d].view(B, T, heads, d)
    angle = torch.rand(B, T, 1, d // 2, generator=gen) * 6
    cos = torch.cat((angle.cos(), angle.cos()), -1).to(dtype).to(DEVICE)
    sin = torch.cat((-angle.sin(), angle.sin()), -1).to(dtype).to(DEVICE)
    assert fused.rotary_fits(x, cos, sin)
    want = x * cos + x.roll(d // 2, dims=-1) * sin
    got = fused.rotary(x, cos, sin)
    assert got.shape == x.shape and got.is_contiguous()
    # the same products and sum, but not bit for bit on a GPU: the compiler may fuse a product into
    # the sum (one rounding less)
    close(got, want, dtype)


def test_rotary_refuses_shapes_it_does_not_take():
    x = torch.zeros(1, 2, 4, 48)  # head dim not a power of two
    cos = torch.zeros(1, 2, 1, 48)
    assert not fused.rotary_fits(x, cos, cos)
    assert not fused.rotary_fits(torch.zeros(1, 2, 4, 64), torch.zeros(1, 2, 1, 64, dtype=torch.float64),
                                 torch.zeros(1, 2, 1, 64, dtype=torch.float64))


@pytest.mark.parametrize("E,K,normalize,scale", [(8, 2, True, 1.0), (64, 8, False, 1.0), (60, 4, True, 2.5), (128, 1, False, 1.0)])
@pytest.mark.parametrize("logit_dtype", [torch.float32, torch.bfloat16])
def test_softmax_topk_equals_the_reference(E, K, normalize, scale, logit_dtype):
    gen = torch.Generator().manual_seed(E + K)
    logits = (torch.randn(5, E, generator=gen) * 2).to(logit_dtype).to(DEVICE)
    probs = torch.softmax(logits.float(), dim=-1)
    want_w, want_ids = torch.topk(probs, K, dim=-1)
    if normalize:
        want_w = want_w / want_w.sum(dim=-1, keepdim=True)
    want_w = want_w * scale
    ids, w = fused.softmax_topk(logits, K, normalize, scale, torch.float32)
    if logit_dtype == torch.bfloat16:  # bf16 logits can tie: compare the chosen probabilities
        torch.testing.assert_close(probs.gather(-1, ids), probs.gather(-1, want_ids))
    else:
        assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w, rtol=1e-5, atol=1e-6)
    ids, w16 = fused.softmax_topk(logits, K, normalize, scale, torch.bfloat16)
    assert w16.dtype == torch.bfloat16


def test_softmax_topk_keeps_ids_in_range_for_a_nan_row():
    """A broken hidden state (NaN logits) must not send an expert kernel outside the expert stack."""
    logits = torch.randn(3, 60)
    logits[1] = float("nan")
    ids, _ = fused.softmax_topk(logits.to(DEVICE), 4, True, 1.0, torch.float32)
    assert int(ids.min()) >= 0 and int(ids.max()) < 60


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device with Triton")
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_the_model_with_fused_kernels_stays_with_torchs_operations(tiny_dir, family, monkeypatch):
    """The tiny model's logits (prefill and decode steps) with the fused kernels against torch's
    operations alone, in float32: within rounding, and the same greedy tokens."""
    from daop.engine import Engine

    _, path = tiny_dir(family)
    prompt = [5, 17, 42, 99, 3, 250, 7, 64]
    out = []
    for on in (True, False):
        monkeypatch.setattr(fused, "AVAILABLE", on)
        engine = Engine.from_pretrained(path, device="cuda", dtype="fp32", progress=False, cuda_graphs=False)
        session = engine.session(prompt, 6)
        logits = [session.prefill()]
        for _ in range(5):
            logits.append(session.step(logits[-1].argmax(-1)))
        out.append(torch.stack(logits))
    torch.testing.assert_close(out[0], out[1], rtol=1e-4, atol=1e-4)
    assert torch.equal(out[0].argmax(-1), out[1].argmax(-1))
