"""Weight-streaming matrix-vector products on CUDA, in Triton, for a few tokens through routed experts.

    y[m, n] = s[e, n] * sum_k x[m // x_div, k] * W[e, n, k],   e = idx[m] (or 0 without idx)

(y[m] = 0 where idx[m] < 0: a pick served elsewhere, whose row reads no weights.)

W is a float or int8 weight [N, K] or a stack of them [E, N, K] (s: one float32-accumulated scale
per output row, int8 only). With `idx`, each row m reads the expert idx[m] from the stack on the
device, so a decode step routes its tokens without sending the routing to the host (and can be
captured in a CUDA graph); x_div lets the K routed picks of a token share its input row.

With `glu`, W is a SwiGLU expert's gate_up [2I, K] and the kernel returns silu(gate) * up [M, I],
rounded as torch's `F.silu(gate) * up` rounds it, so the activation takes no kernels of its own
(two per expert product before, 16 of 170 launches in a Mixtral-shaped 8-layer step). Each tile
holds gate rows and their up rows side by side, a tile of the plain product's shape, so every row's
sum is walked as there: the same bits as the plain product, then torch's activation.

Why a kernel of our own: decode reads each weight once, so the product is bound by memory. For
int8, torch's CUDA `_weight_int8pack_mm` took 1.6 ms for one Mixtral expert on an H200 (111 GB/s;
the bf16 product 0.11 ms, `scripts/lowbit_kernel_probe.py`). For float weights, cuBLAS needs the
expert on the host to pick the matrix. One kernel serves both, and since a row's sum is walked in
the same order whether it is one row of one expert or a row among many routed on the device, an
expert computed alone (a resident or copied expert of an offloaded policy) equals the same expert
computed in a routed batch, bit for bit.

One program computes BLOCK_N outputs of one row, walking K in BLOCK_K steps; the block shape
depends only on (N, K), never on the number of rows. The row is the fastest-varying program index,
so all the rows' programs for one weight tile run side by side, and rows routed to one expert
share its tile through the L2 cache in whatever order they come (sorting them by expert made the
GEMV 1-2 % faster on an H200 but cost more in the sort's launches). At 4 and 8 tokens the GEMV is
then likely bound by the L2 cache rather than by memory (from the bytes; no hardware counters
read): a Mixtral-shaped 4-token step of 8 layers reads about 15.6 GB of distinct experts from
memory (4 TB/s) but 22.5 GB through the L2 cache (5.8 TB/s), since each row reads its tiles. Reading a tile once per program for all of an expert's rows, with a
sum per row, was slower (4.58 against 3.85 ms: the rows' reductions run one after another). A
product on the tensor cores would read it once, but sums a row in another order than this kernel:
an expert alone and the same expert in a batch would then agree bit for bit only if both went
through it (`benchmarks/results/h200-mixtral-8x7b-8layers-gpu-batch-rows.jsonl`). Used only on
CUDA with Triton installed.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU-only installs: no Triton, no kernel
    triton = None


# Triton is installed and not switched off (DAOP_NO_TRITON=1: torch's products, for comparisons);
# read once, at import, not on every product.
AVAILABLE = triton is not None and os.environ.get("DAOP_NO_TRITON", "") != "1"
INTERPRETED = os.environ.get("TRITON_INTERPRET", "") == "1"  # on CPU tensors (tests): no libdevice there


if triton is not None:
    @triton.jit
    def _gemv(x_ptr, w_ptr, s_ptr, idx_ptr, rw_ptr, y_ptr, N, K, x_div, stride_xm, stride_we, stride_wn, stride_se, stride_ym,
              INDEXED: tl.constexpr, SCALED: tl.constexpr, ROW_WEIGHTED: tl.constexpr, GLU: tl.constexpr,
              LIBDEVICE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        m = tl.program_id(0)
        pid_n = tl.program_id(1)
        if INDEXED:  # a negative index: a row served elsewhere, stored as zeros without reading a weight
            picked = tl.load(idx_ptr + m).to(tl.int64)
            e = tl.maximum(picked, 0)
        else:
            picked = 0
            e = 0
        w_base = w_ptr + e * stride_we
        x_row = x_ptr + (m // x_div) * stride_xm
        if GLU:  # tile row r reads gate row n (r even) or up row N + n (r odd) of output n = first + r // 2
            rows = tl.arange(0, BLOCK_N)
            offs_n = pid_n * (BLOCK_N // 2) + rows // 2
            mask_n = offs_n < N
            offs_w = offs_n + (rows % 2) * N
        else:
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            offs_w = offs_n
        read_n = mask_n
        if INDEXED:
            read_n = mask_n & (tl.zeros_like(offs_n) + picked >= 0)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_row + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            w = tl.load(w_base + offs_w[:, None] * stride_wn + offs_k[None, :],
                        mask=read_n[:, None] & mask_k[None, :], other=0).to(tl.float32)
            acc += tl.sum(w * x[None, :], axis=1)
        if SCALED:
            acc = acc * tl.load(s_ptr + e * stride_se + offs_w, mask=mask_n, other=0.0).to(tl.float32)
        y = acc.to(y_ptr.dtype.element_ty)
        if GLU:  # F.silu(gate) * up on the rounded products: g / (1 + exp(-g)) in float32 (CUDA's
            # expf, an IEEE division), rounded, then the product, rounded
            g, up = tl.split(tl.reshape(y.to(tl.float32), (BLOCK_N // 2, 2)))
            if LIBDEVICE:
                exp_neg = libdevice.exp(-g)
            else:
                exp_neg = tl.exp(-g)
            act = tl.math.div_rn(g, 1.0 + exp_neg).to(y_ptr.dtype.element_ty).to(tl.float32)
            y = (act * up).to(y_ptr.dtype.element_ty)
            offs_n = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            mask_n = offs_n < N
        if ROW_WEIGHTED:  # as daop.model.moe.combine: the stored output times the weight in float32, rounded
            y = (y.to(tl.float32) * tl.load(rw_ptr + m)).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + m * stride_ym + offs_n, y, mask=mask_n)


_SMS: dict = {}  # device index -> multiprocessor count (asked once: a launch should cost as little host time as it can)


def block_shape(N: int, K: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, warps) for an [N, K] weight: enough programs per row to fill the chip."""
    sms = _SMS.get(device.index)
    if sms is None:
        sms = _SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    # Measured on an H200 (scripts/expert_gemv_probe.py, h200-expert-gemv-probe-2.jsonl): flat tiles,
    # 2 rows x 2048 columns, for Mixtral's gate_up and down alike; for one token's two experts, bf16
    # gate_up 0.116 ms (4.0 TB/s) and down 0.067 ms (3.5 TB/s), against 0.123 and 0.075 ms with the
    # 32 x 256 and 8 x 1024 tiles before; int8 0.078 and 0.048 ms against 0.097 and 0.056. Narrower
    # matrices get taller tiles of at least 4096 weights, as tall as leaves three programs per
    # multiprocessor.
    block_k = min(2048, triton.next_power_of_2(K))
    block_n = max(2, min(32, 4096 // block_k))
    while block_n > 2 and triton.cdiv(N, block_n) < 3 * sms:
        block_n //= 2
    return block_n, block_k, 4


def gemv(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None = None, idx: torch.Tensor | None = None,
         x_div: int = 1, row_weights: torch.Tensor | None = None, blocks: tuple[int, int, int] | None = None,
         glu: bool = False) -> torch.Tensor:
    """x [R, K] (contiguous rows) times W [N, K] (or the stack [E, N, K] picked per row by idx [M])
    -> y [M, N] in x's dtype, M = R without idx, len(idx) with it (row m reads x[m // x_div]).
    row_weights [M] (float32): each output row y[m] is stored as (y[m] * row_weights[m]) rounded to
    x's dtype, what `daop.model.moe.combine` computes from y. glu: W is gate_up [2I, K] and y is
    silu(gate) * up [M, I], bit for bit what `F.silu(gate) * up` gives from the plain product's
    halves. blocks overrides block_shape (for probes)."""
    stacked = w.dim() == 3
    N, K = w.shape[-2], w.shape[-1]
    if glu and (N % 2 or row_weights is not None or (blocks is not None and blocks[0] < 2)):
        raise ValueError(f"a gated product needs gate and up rows of one size, tiles of 2 rows or more and "
                         f"no row weights, got {N} rows")
    M = x.shape[0] if idx is None else idx.shape[0]
    # the tiles of the plain product over all 2I rows, so every row's sum is walked as there
    block_n, block_k, warps = blocks or block_shape(N, K, x.device)
    N = N // 2 if glu else N
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    scale = s if s is not None else y  # never read when not SCALED
    _gemv[(M, triton.cdiv(N, block_n // 2 if glu else block_n))](
        x, w, scale, idx if idx is not None else y, row_weights if row_weights is not None else y, y, N, K, x_div, x.stride(0),
        w.stride(0) if stacked else 0, w.stride(-2), scale.stride(0) if (s is not None and s.dim() == 2) else 0, y.stride(0),
        INDEXED=idx is not None, SCALED=s is not None, ROW_WEIGHTED=row_weights is not None, GLU=glu,
        LIBDEVICE=not INTERPRETED, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return y
