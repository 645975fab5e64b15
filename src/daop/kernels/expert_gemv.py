"""Weight-streaming matrix-vector products on CUDA, in Triton, for a few tokens through routed experts.

    y[m, n] = s[e, n] * sum_k x[m // x_div, k] * W[e, n, k],   e = idx[m] (or 0 without idx)

W is a float or int8 weight [N, K] or a stack of them [E, N, K] (s: one float32-accumulated scale
per output row, int8 only). With `idx`, each row m reads the expert idx[m] from the stack on the
device, so a decode step routes its tokens without sending the routing to the host (and can be
captured in a CUDA graph); x_div lets the K routed picks of a token share its input row.

Why a kernel of our own: decode reads each weight once, so the product is bound by memory. For
int8, torch's CUDA `_weight_int8pack_mm` took 1.6 ms for one Mixtral expert on an H200 (111 GB/s;
the bf16 product 0.11 ms, `scripts/lowbit_kernel_probe.py`). For float weights, cuBLAS needs the
expert on the host to pick the matrix. One kernel serves both, and since a row's sum is walked in
the same order whether it is one row of one expert or a row among many routed on the device, an
expert computed alone (a resident or copied expert of an offloaded policy) equals the same expert
computed in a routed batch, bit for bit.

One program computes BLOCK_N outputs of one row, walking K in BLOCK_K steps; the block shape
depends only on (N, K), never on the number of rows. The row is the fastest-varying program index,
so the rows that read one weight tile run side by side and share it through the L2 cache (callers
put rows of one expert next to each other). Used only on CUDA with Triton installed.

int4 weights (`gemv` with a uint8 W, `dequantize_int4`) are read in the host's packed layout
(`daop.int4_layout`: blocks of B output rows, byte j of input column k holding rows j and B/2 + j),
with one float scale and zero per group of G input columns ([K/G, N, 2]): w = (q - 8) * scale + zero.
A copied expert needs no conversion on the GPU. One program computes one block of B rows over all
of K, or over 1/SPLIT of it where there are too few blocks to fill the chip (a down matrix): the
parts are then added in a fixed order by a second kernel, so the sums, like the float ones, depend
only on (N, K) and never on the number of rows.
"""
from __future__ import annotations

import os

import torch

from daop import int4_layout

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: no Triton, no kernel
    triton = None


# Triton is installed and not switched off (DAOP_NO_TRITON=1: torch's products, for comparisons);
# read once, at import, not on every product.
AVAILABLE = triton is not None and os.environ.get("DAOP_NO_TRITON", "") != "1"


if triton is not None:
    @triton.jit
    def _gemv(x_ptr, w_ptr, s_ptr, idx_ptr, rw_ptr, y_ptr, N, K, x_div, stride_xm, stride_we, stride_wn, stride_se, stride_ym,
              INDEXED: tl.constexpr, SCALED: tl.constexpr, ROW_WEIGHTED: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        m = tl.program_id(0)
        pid_n = tl.program_id(1)
        if INDEXED:
            e = tl.load(idx_ptr + m).to(tl.int64)
        else:
            e = 0
        w_base = w_ptr + e * stride_we
        x_row = x_ptr + (m // x_div) * stride_xm
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_row + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            w = tl.load(w_base + offs_n[:, None] * stride_wn + offs_k[None, :],
                        mask=mask_n[:, None] & mask_k[None, :], other=0).to(tl.float32)
            acc += tl.sum(w * x[None, :], axis=1)
        if SCALED:
            acc = acc * tl.load(s_ptr + e * stride_se + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        y = acc.to(y_ptr.dtype.element_ty)
        if ROW_WEIGHTED:  # as daop.model.moe.combine: the stored output times the weight in float32, rounded
            y = (y.to(tl.float32) * tl.load(rw_ptr + m)).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + m * stride_ym + offs_n, y, mask=mask_n)


    @triton.jit
    def _nibble_minus_8(code):
        # q - 8 as a float32, exactly, without an integer-to-float conversion (a quarter-rate
        # instruction): 2^23 + q has q in its low mantissa bits
        return (code | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0

    @triton.jit
    def _gemv_int4(x_ptr, q_ptr, sz_ptr, idx_ptr, rw_ptr, y_ptr, part_ptr, M, N, K, x_div,
                   stride_xm, stride_qe, stride_se, stride_ym,
                   INDEXED: tl.constexpr, ROW_WEIGHTED: tl.constexpr, ROWS: tl.constexpr, GROUP: tl.constexpr,
                   BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
        # Each weight is dequantized in float32 and multiplied into a [BLOCK_K, ROWS / 2] accumulator per
        # nibble; the sum over K is taken once, at the end: the packed bytes are contiguous along the
        # rows, so a sum over K at every step would cross threads.
        m = tl.program_id(0)
        block = tl.program_id(1)
        split = tl.program_id(2)
        if INDEXED:
            e = tl.load(idx_ptr + m).to(tl.int64)
        else:
            e = 0
        HALF: tl.constexpr = ROWS // 2
        j = tl.arange(0, HALF)
        rows_lo = block * ROWS + j
        rows_hi = rows_lo + HALF
        q_base = q_ptr + e * stride_qe + block.to(tl.int64) * K * HALF
        s_base = sz_ptr + e * stride_se
        x_row = x_ptr + (m // x_div) * stride_xm
        per_split = K // SPLIT
        acc_lo = tl.zeros((BLOCK_K, HALF), dtype=tl.float32)
        acc_hi = tl.zeros((BLOCK_K, HALF), dtype=tl.float32)
        for k0 in range(split * per_split, (split + 1) * per_split, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_row + offs_k).to(tl.float32)[:, None]
            b = tl.load(q_base + offs_k[:, None] * HALF + j[None, :]).to(tl.int32)
            sz_group = s_base + (k0 // GROUP) * N * 2
            s_lo = tl.load(sz_group + rows_lo * 2).to(tl.float32)[None, :]
            z_lo = tl.load(sz_group + rows_lo * 2 + 1).to(tl.float32)[None, :]
            s_hi = tl.load(sz_group + rows_hi * 2).to(tl.float32)[None, :]
            z_hi = tl.load(sz_group + rows_hi * 2 + 1).to(tl.float32)[None, :]
            acc_lo += (_nibble_minus_8(b & 15) * s_lo + z_lo) * x
            acc_hi += (_nibble_minus_8(b >> 4) * s_hi + z_hi) * x
        sum_lo = tl.sum(acc_lo, axis=0)
        sum_hi = tl.sum(acc_hi, axis=0)
        if SPLIT == 1:
            y_lo = sum_lo.to(y_ptr.dtype.element_ty)
            y_hi = sum_hi.to(y_ptr.dtype.element_ty)
            if ROW_WEIGHTED:
                rw = tl.load(rw_ptr + m)
                y_lo = (y_lo.to(tl.float32) * rw).to(y_ptr.dtype.element_ty)
                y_hi = (y_hi.to(tl.float32) * rw).to(y_ptr.dtype.element_ty)
            tl.store(y_ptr + m * stride_ym + rows_lo, y_lo)
            tl.store(y_ptr + m * stride_ym + rows_hi, y_hi)
        else:
            part = part_ptr + (split * M + m).to(tl.int64) * N
            tl.store(part + rows_lo, sum_lo)
            tl.store(part + rows_hi, sum_hi)

    @triton.jit
    def _add_parts(part_ptr, rw_ptr, y_ptr, M, N, stride_ym, ROW_WEIGHTED: tl.constexpr, SPLIT: tl.constexpr,
                   BLOCK_N: tl.constexpr):
        m = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = tl.load(part_ptr + m * N + offs_n, mask=mask_n, other=0.0)
        for s in range(1, SPLIT):  # in split order: the same sum whatever the row count
            acc += tl.load(part_ptr + (s * M + m).to(tl.int64) * N + offs_n, mask=mask_n, other=0.0)
        y = acc.to(y_ptr.dtype.element_ty)
        if ROW_WEIGHTED:
            y = (y.to(tl.float32) * tl.load(rw_ptr + m)).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + m * stride_ym + offs_n, y, mask=mask_n)

    @triton.jit
    def _dequantize_int4(q_ptr, sz_ptr, w_ptr, N, K, ROWS: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
        block = tl.program_id(0)
        k_block = tl.program_id(1)
        HALF: tl.constexpr = ROWS // 2
        j = tl.arange(0, HALF)
        rows_lo = block * ROWS + j
        offs_k = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
        b = tl.load(q_ptr + block.to(tl.int64) * K * HALF + offs_k[:, None] * HALF + j[None, :]).to(tl.int32)
        g = (k_block * BLOCK_K) // GROUP
        sz_group = sz_ptr + g.to(tl.int64) * N * 2
        for half in tl.static_range(2):
            rows = rows_lo + half * HALF
            w = _nibble_minus_8((b >> (4 * half)) & 15) * tl.load(sz_group + rows * 2)[None, :].to(tl.float32) \
                + tl.load(sz_group + rows * 2 + 1)[None, :].to(tl.float32)
            tl.store(w_ptr + rows[None, :].to(tl.int64) * K + offs_k[:, None], w.to(w_ptr.dtype.element_ty))


_SMS: dict = {}  # device index -> multiprocessor count (asked once: a launch should cost as little host time as it can)


def block_shape(N: int, K: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, warps) for an [N, K] weight: enough programs per row to fill the chip."""
    sms = _SMS.get(device.index)
    if sms is None:
        sms = _SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    # Measured on an H200 (scripts/expert_gemv_probe.py): tiles of 8192 weights, as tall as leaves
    # at least three programs per multiprocessor; 32 x 256 for Mixtral's gate_up (3.4-3.8 TB/s for
    # one or two rows), 8 x 1024 for its down (2.0-3.2 TB/s).
    block_n = 32
    while block_n > 8 and triton.cdiv(N, block_n) < 3 * sms:
        block_n //= 2
    block_k = min(8192 // block_n, triton.next_power_of_2(K))
    return block_n, block_k, 4


def gemv(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None = None, idx: torch.Tensor | None = None,
         x_div: int = 1, row_weights: torch.Tensor | None = None, blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x [R, K] (contiguous rows) times W [N, K] (or the stack [E, N, K] picked per row by idx [M])
    -> y [M, N] in x's dtype, M = R without idx, len(idx) with it (row m reads x[m // x_div]).
    row_weights [M] (float32): each output row y[m] is stored as (y[m] * row_weights[m]) rounded to
    x's dtype, what `daop.model.moe.combine` computes from y. blocks overrides block_shape (for probes)."""
    if w.dtype == torch.uint8:
        return gemv_int4(x, w, s, idx, x_div, row_weights)
    stacked = w.dim() == 3
    N, K = w.shape[-2], w.shape[-1]
    M = x.shape[0] if idx is None else idx.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    block_n, block_k, warps = blocks or block_shape(N, K, x.device)
    scale = s if s is not None else y  # never read when not SCALED
    _gemv[(M, triton.cdiv(N, block_n))](
        x, w, scale, idx if idx is not None else y, row_weights if row_weights is not None else y, y, N, K, x_div, x.stride(0),
        w.stride(0) if stacked else 0, w.stride(-2), scale.stride(0) if (s is not None and s.dim() == 2) else 0, y.stride(0),
        INDEXED=idx is not None, SCALED=s is not None, ROW_WEIGHTED=row_weights is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return y


def int4_block_k(group: int) -> int:
    """Input columns an int4 program reads per step (within one group)."""
    return min(group, 64)


def int4_split(N: int, K: int, group: int, rows: int, device: torch.device) -> int:
    """Parts each int4 row block's sum is cut into: a power of two dividing the groups, the fewest
    that give at least three programs per multiprocessor for one row (a function of (N, K) only)."""
    sms = _SMS.get(device.index)
    if sms is None:
        sms = _SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    groups, split = K // group, 1
    while (N // rows) * split < 3 * sms and groups % (2 * split) == 0:
        split *= 2
    return split


def gemv_int4(x: torch.Tensor, q: torch.Tensor, sz: torch.Tensor, idx: torch.Tensor | None = None, x_div: int = 1,
              row_weights: torch.Tensor | None = None, split: int | None = None, block_k: int | None = None,
              warps: int = 4) -> torch.Tensor:
    """`gemv` for int4 weights: q packed uint8 [N, K/2] (or stacked [E, N, K/2]) in the host layout,
    sz its scales and zeros [K/G, N, 2] (or [E, K/G, N, 2]). split, block_k and warps override the
    defaults (for probes)."""
    rows = int4_layout.cpu_block_n()
    stacked = q.dim() == 3
    N, K = q.shape[-2], 2 * q.shape[-1]
    group = K // sz.shape[-3]
    M = x.shape[0] if idx is None else idx.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    split = split or int4_split(N, K, group, rows, x.device)
    parts = torch.empty(split, M, N, dtype=torch.float32, device=x.device) if split > 1 else y
    weighted = row_weights is not None
    _gemv_int4[(M, N // rows, split)](
        x, q, sz, idx if idx is not None else y, row_weights if weighted else y, y, parts, M, N, K, x_div,
        x.stride(0), q.stride(0) if stacked else 0, sz.stride(0) if stacked else 0, y.stride(0),
        INDEXED=idx is not None, ROW_WEIGHTED=weighted, ROWS=rows, GROUP=group, BLOCK_K=block_k or int4_block_k(group),
        SPLIT=split, num_warps=warps)
    if split > 1:
        _add_parts[(M, triton.cdiv(N, 1024))](parts, row_weights if weighted else y, y, M, N, y.stride(0),
                                               ROW_WEIGHTED=weighted, SPLIT=split, BLOCK_N=1024, num_warps=4)
    return y


def dequantize_int4(q: torch.Tensor, sz: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One int4 matrix (q [N, K/2] in the host layout, sz [K/G, N, 2]) as a `dtype` matrix [N, K] on its
    device: each weight (q - 8) * scale + zero in float32, rounded once (products of many rows)."""
    rows = int4_layout.cpu_block_n()
    N, K = q.shape[0], 2 * q.shape[1]
    group = K // sz.shape[0]
    block_k = int4_block_k(group)
    w = torch.empty(N, K, dtype=dtype, device=q.device)
    _dequantize_int4[(N // rows, K // block_k)](q, sz, w, N, K, ROWS=rows, GROUP=group, BLOCK_K=block_k, num_warps=4)
    return w
