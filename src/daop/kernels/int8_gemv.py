"""int8 weight-only matrix-vector product on CUDA, in Triton: y[m, n] = s[n] * sum_k x[m, k] q[n, k].

Why: torch's CUDA `_weight_int8pack_mm` took 1.6 ms for one token through one Mixtral expert on an
H200 (111 GB/s), and dequantizing the weights through float32 for a float product 1.35 ms; the
bf16 product itself takes 0.12 ms (`scripts/lowbit_kernel_probe.py`). Decode reads each weight once, so a kernel that loads int8, accumulates in
float32 and scales once per output should run near HBM bandwidth on half the bytes.

One program computes BLOCK_N outputs of one row of x, walking K in BLOCK_K steps; rows are
separate programs (decode has 1-4). Used only on CUDA with Triton installed; elsewhere daop
falls back to a float product (`daop.quant.int8_linear_cuda`).
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: no Triton, no kernel
    triton = None


# Triton is installed and not switched off (DAOP_NO_TRITON=1: the float-product fallback, for
# comparisons); read once, at import, not on every product.
AVAILABLE = triton is not None and os.environ.get("DAOP_NO_TRITON", "") != "1"


if triton is not None:
    @triton.jit
    def _gemv(x_ptr, q_ptr, s_ptr, y_ptr, N, K, stride_xm, stride_qn, stride_ym,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        m = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_ptr + m * stride_xm + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            w = tl.load(q_ptr + offs_n[:, None] * stride_qn + offs_k[None, :],
                        mask=mask_n[:, None] & mask_k[None, :], other=0).to(tl.float32)
            acc += tl.sum(w * x[None, :], axis=1)
        scale = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * stride_ym + offs_n, (acc * scale).to(y_ptr.dtype.element_ty), mask=mask_n)


_SMS: dict = {}  # device index -> multiprocessor count (asked once: a launch should cost as little host time as it can)


def gemv(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x [M, K] (float, contiguous rows), q int8 [N, K] contiguous, s [N] -> y [M, N] in x's dtype."""
    M, K = x.shape
    N = q.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    sms = _SMS.get(x.device.index)
    if sms is None:
        sms = _SMS[x.device.index] = torch.cuda.get_device_properties(x.device).multi_processor_count
    block_n = 64 if triton.cdiv(N, 64) >= 2 * sms else 16  # enough programs to fill the chip
    block_k = 128 if block_n == 64 else 512
    grid = (triton.cdiv(N, block_n), M)
    _gemv[grid](x, q, s, y, N, K, x.stride(0), q.stride(0), y.stride(0), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return y
