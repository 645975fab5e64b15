"""daop's int4 kernels (`daop.kernels.expert_gemv`: `gemv_int4`, `dequantize_int4`), which read the
host's packed int4 bytes on CUDA.

They run on a CUDA device with Triton (scripts/gpu_checks.py --tests), or on the CPU under Triton's
interpreter (TRITON_INTERPRET=1 set before Triton is imported, and Triton installed); otherwise
skipped. Checked: the product equals the dequantized weights' product (float32 to rounding, bf16
to the output's rounding), the dequantized weights equal `daop.quant.dequantize`, and a row's output
is bit for bit the same whatever the rows around it and however the sum is split, which is what keeps
exact policies equal to `gpu` on a GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

from daop.kernels import expert_gemv
from daop.quant import dequantize, quantize

if torch.cuda.is_available() and expert_gemv.AVAILABLE:
    DEVICE = torch.device("cuda")
elif expert_gemv.triton is not None and os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = torch.device("cpu")
    expert_gemv._SMS.setdefault(None, 132)  # an H200's multiprocessors, for the split choice
else:
    pytestmark = pytest.mark.skip(reason="needs CUDA with Triton, or Triton's interpreter (TRITON_INTERPRET=1)")
    DEVICE = torch.device("cpu")

SHAPES = [(256, 512, 128), (128, 1024, 32), (512, 256, 256)]  # N, K, group


def quantized(N: int, K: int, group: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, sz = quantize(torch.randn(N, K, generator=gen) * 0.05, "int4", group, dtype)
    return q.to(DEVICE), sz.to(DEVICE), dequantize((q, sz))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("N,K,group", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_product_equals_the_dequantized_product(N, K, group, dtype, tol):
    q, sz, w = quantized(N, K, group, dtype)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = expert_gemv.gemv_int4(x.to(DEVICE), q, sz)
    assert y.dtype == dtype and y.shape == (3, N)
    assert rel(y.cpu(), x.float() @ w.t()) < tol


@pytest.mark.parametrize("N,K,group", SHAPES)
def test_dequantized_weights_equal_the_reference(N, K, group):
    q, sz, w = quantized(N, K, group, torch.float32)
    # (q - 8) * scale + zero: a GPU may fuse the multiply and add (one rounding less)
    torch.testing.assert_close(expert_gemv.dequantize_int4(q, sz, torch.float32).cpu(), w, rtol=1e-6, atol=1e-7)


def test_a_split_sum_equals_the_whole_within_rounding_and_each_split_is_deterministic():
    N, K, group = 128, 1024, 32
    q, sz, _ = quantized(N, K, group, torch.bfloat16)
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(2)).bfloat16().to(DEVICE)
    whole = expert_gemv.gemv_int4(x, q, sz, split=1)
    for split in (2, 4, 8):
        y = expert_gemv.gemv_int4(x, q, sz, split=split)
        assert torch.equal(y, expert_gemv.gemv_int4(x, q, sz, split=split))
        assert rel(y.cpu(), whole.cpu()) < 1e-2


@pytest.mark.parametrize("split", [1, 4])
def test_routed_rows_equal_each_expert_alone_bit_for_bit(split):
    """Rows picking experts from a stack by index, sharing token inputs (x_div) and scaled by their
    routing weights, equal each expert run alone on its token and scaled as `combine` does."""
    N, K, group = 256, 512, 64
    experts = [quantized(N, K, group, torch.bfloat16, seed=e)[:2] for e in range(3)]
    q = torch.stack([e[0] for e in experts])
    sz = torch.stack([e[1] for e in experts])
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(5)).bfloat16().to(DEVICE)
    idx = torch.tensor([2, 0, 1, 2], device=DEVICE)  # token 0 picks 2 and 0, token 1 picks 1 and 2
    # Triton's interpreter rounds float32 to bf16 otherwise than torch does: there, weights whose
    # products are exact; on a GPU, any
    row_weights = torch.tensor([0.3, 0.7, 0.55, 0.45] if DEVICE.type == "cuda" else [0.25, 0.5, 2.0, 1.0], device=DEVICE)
    y = expert_gemv.gemv_int4(x, q, sz, idx=idx, x_div=2, row_weights=row_weights, split=split)
    for m in range(4):
        e = int(idx[m])
        alone = expert_gemv.gemv_int4(x[m // 2:m // 2 + 1], q[e], sz[e], split=split)
        assert torch.equal(y[m:m + 1], (alone.float() * row_weights[m]).bfloat16())


def test_the_split_depends_on_the_shape_only():
    rows = 64
    down = expert_gemv.int4_split(4096, 14336, 128, rows, DEVICE)  # Mixtral's down: 64 row blocks
    gate_up = expert_gemv.int4_split(28672, 4096, 128, rows, DEVICE)  # 448 row blocks
    assert gate_up == 1 and down > 1 and (14336 // 128) % down == 0
