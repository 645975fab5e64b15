"""Fused small operations of the dense decoder on CUDA, in Triton: one kernel where torch launches several.

A captured all-GPU decode step of the Mixtral geometry spent about as much time in some 40 small
kernels per layer (and the gaps between them) as in reading the attention weights: an RMSNorm was
four kernels (a float copy, the norm, a cast back, the weight's product), rotary embeddings four
(two products, a roll, a sum), the router's softmax, top-k and normalisation six. Each function here
does one of those in one kernel (an RMSNorm also takes the residual sum before it), with the reference's arithmetic (float32 where it computes in
float32, each bf16 product rounded where it rounds), so the results stay within rounding of the
torch operations they replace, usually equal to them.

Used on CUDA with Triton installed (`enabled(x)`) in every path (prefill, decode, captured or
not), so every policy computes the dense part with the same kernels; DAOP_NO_TRITON=1 or a CPU
device keeps torch's operations. Under Triton's interpreter (TRITON_INTERPRET=1) they also run on
CPU tensors, which is how the CPU test suite checks them against torch.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: no Triton, no kernel
    triton = None

AVAILABLE = triton is not None and os.environ.get("DAOP_NO_TRITON", "") != "1"
MAX_EXPERTS = 256  # the fused router keeps a token's logits in one block
MAX_TOP_K = 8


def enabled(x: torch.Tensor) -> bool:
    """Whether x's operations go through these kernels: CUDA with Triton (switched off by DAOP_NO_TRITON=1)."""
    return x.is_cuda and AVAILABLE


if triton is not None:
    @triton.jit
    def _rms_norm(x_ptr, d_ptr, w_ptr, s_ptr, y_ptr, D, eps, stride_x, stride_d, stride_s, stride_y,
                  BLOCK_D: tl.constexpr, ADD: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_D)
        mask = offs < D
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
        if ADD:  # the residual sum first, rounded to x's dtype and stored, as torch's add gives it
            d = tl.load(d_ptr + row * stride_d + offs, mask=mask, other=0.0)
            x = (x.to(tl.float32) + d.to(tl.float32)).to(s_ptr.dtype.element_ty)
            tl.store(s_ptr + row * stride_s + offs, x, mask=mask)
        x = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        normed = (x * rstd).to(y_ptr.dtype.element_ty)  # the norm in float32, cast back, as the reference
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        y = (w.to(tl.float32) * normed.to(tl.float32)).to(y_ptr.dtype.element_ty)  # then the weight's product
        tl.store(y_ptr + row * stride_y + offs, y, mask=mask)

    @triton.jit
    def _rotary(x_ptr, cos_ptr, sin_ptr, y_ptr, heads, stride_xt, stride_xh, stride_ct, stride_yt, stride_yh,
                HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, BLOCK_H)[:, None]
        i = tl.arange(0, 2 * HALF)[None, :]
        mask = (h < heads) & (i < 2 * HALF)
        rolled = (i + HALF) % (2 * HALF)
        x = tl.load(x_ptr + t * stride_xt + h * stride_xh + i, mask=mask, other=0.0)
        xr = tl.load(x_ptr + t * stride_xt + h * stride_xh + rolled, mask=mask, other=0.0)
        cos = tl.load(cos_ptr + t * stride_ct + i)
        sin = tl.load(sin_ptr + t * stride_ct + i)
        dt = y_ptr.dtype.element_ty
        a = (x.to(tl.float32) * cos.to(tl.float32)).to(dt)  # each product rounded, then the sum, as torch
        b = (xr.to(tl.float32) * sin.to(tl.float32)).to(dt)
        tl.store(y_ptr + t * stride_yt + h * stride_yh + i, (a.to(tl.float32) + b.to(tl.float32)).to(dt), mask=mask)

    @triton.jit
    def _softmax_topk(logits_ptr, ids_ptr, w_ptr, E, stride_l, scale, K: tl.constexpr, NORM: tl.constexpr,
                      SCALED: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_E)
        logits = tl.load(logits_ptr + row * stride_l + offs, mask=offs < E, other=float("-inf")).to(tl.float32)
        z = logits - tl.max(logits, axis=0)
        num = tl.exp(z)
        probs = num / tl.sum(num, axis=0)
        kk = tl.arange(0, BLOCK_K)
        top = tl.zeros((BLOCK_K,), dtype=tl.float32)
        picked = tl.zeros((BLOCK_K,), dtype=tl.int64)
        total = 0.0
        for k in tl.static_range(K):  # the largest, then the next: descending, ties to the lower expert
            best = tl.max(probs, axis=0)
            # (a NaN row matches nothing: its ids stay in range, so the experts' kernels read no stray memory)
            idx = tl.minimum(tl.min(tl.where(probs == best, offs, BLOCK_E), axis=0), E - 1)
            top = tl.where(kk == k, best, top)
            picked = tl.where(kk == k, idx.to(tl.int64), picked)
            total = total + best
            probs = tl.where(offs == idx, -1.0, probs)
        if NORM:
            top = top / total
        if SCALED:
            top = top * scale
        tl.store(ids_ptr + row * K + kk, picked, mask=kk < K)
        tl.store(w_ptr + row * K + kk, top.to(w_ptr.dtype.element_ty), mask=kk < K)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * rms_norm(x in float32).to(x's dtype) over the last dimension, in one kernel; x contiguous."""
    return _norm(x, None, weight, eps)[1]


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, rms_norm(s)) for the residual sum s = x + delta, in one kernel: s as torch's add rounds it,
    the norm as `rms_norm`; x and delta contiguous, of one shape and dtype."""
    return _norm(x, delta, weight, eps)


def _norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    D = x.shape[-1]
    rows = x.reshape(-1, D)
    y = torch.empty_like(rows)
    add = delta is not None
    d, s = (delta.reshape(-1, D), torch.empty_like(rows)) if add else (rows, rows)
    block = triton.next_power_of_2(D)
    _rms_norm[(rows.shape[0],)](rows, d, weight, s, y, D, eps, rows.stride(0), d.stride(0), s.stride(0), y.stride(0),
                                BLOCK_D=block, ADD=add, num_warps=4 if block <= 2048 else 8)
    return s.view(x.shape), y.view(x.shape)


def rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """`daop.model.layers.apply_rotary` in one kernel: x [B, T, heads, d] with unit stride in d (a view
    of the fused qkv product is fine), cos and signed sin [B, T, 1, d] contiguous; a new contiguous tensor."""
    B, T, heads, d = x.shape
    rows = x.reshape(B * T, heads, d)  # a view where B and T merge, else a copy (unit stride in d either way)
    c, s = cos.reshape(B * T, d), signed_sin.reshape(B * T, d)
    y = torch.empty(B * T, heads, d, dtype=x.dtype, device=x.device)
    _rotary[(B * T,)](rows, c, s, y, heads, rows.stride(0), rows.stride(1), c.stride(0), y.stride(0), y.stride(1),
                      HALF=d // 2, BLOCK_H=triton.next_power_of_2(heads), num_warps=4)
    return y.view(B, T, heads, d)


def rotary_fits(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> bool:
    """Shapes the rotary kernel takes: x [B, T, heads, d] with a power-of-two d and unit stride in it,
    tables [B, T, 1, d] of x's dtype, contiguous."""
    d = x.shape[-1]
    return (x.dim() == 4 and (d & (d - 1)) == 0 and x.stride(-1) == 1 and cos.shape == signed_sin.shape
            and tuple(cos.shape) == (*x.shape[:2], 1, d) and cos.dtype == x.dtype == signed_sin.dtype
            and cos.is_contiguous() and signed_sin.is_contiguous())


def softmax_topk(logits: torch.Tensor, top_k: int, normalize: bool, scale: float,
                 out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The top_k experts of softmax(logits in float32) per token, logits [N, E] contiguous: ids [N, K]
    (int64, descending probability) and weights [N, K] (divided by their sum if normalize, times
    scale), in out_dtype; one kernel."""
    N, E = logits.shape
    ids = torch.empty(N, top_k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(N, top_k, dtype=out_dtype, device=logits.device)
    _softmax_topk[(N,)](logits, ids, weights, E, logits.stride(0), float(scale), K=top_k, NORM=normalize,
                        SCALED=scale != 1.0, BLOCK_E=triton.next_power_of_2(E), BLOCK_K=triton.next_power_of_2(top_k),
                        num_warps=1)
    return ids, weights
