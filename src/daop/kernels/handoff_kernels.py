"""The two kernels of a handed-off decode layer (`daop.runtime.handoff`), each one launch where torch
took several, since every launch of the chain from the CPU's last write to its next start keeps the
CPU idle:

- `post`: the token's routing (int64 ids -> int32) and activations written straight into the CPU
  jobs' pinned buffers (zero-copy stores through unified addressing), where a dtype conversion and
  two device-to-host copies took three operations;
- `finish`: each pick's output, from the GPU's slot product or, for a pick of a host expert, the CPU
  job's output read from pinned memory and scaled by its weight as `daop.model.moe.combine` scales it,
  added left to right in the given order as `daop.model.moe.add_picks` adds them: the upload, the
  scaling (three kernels), the choice and the additions took six or more.

Both give torch's bits (float32 products and sums rounded to the activations' dtype, round to
nearest even). Used on CUDA with Triton installed; under Triton's interpreter (TRITON_INTERPRET=1)
they also run on CPU tensors, for tests.
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
BLOCK = 1024

if triton is not None:
    @triton.jit
    def _post(ids_ptr, x_ptr, ids_out, x_out, K, D, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        tl.store(x_out + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)
        k = tl.arange(0, BLOCK)
        kmask = k < tl.where(tl.program_id(0) == 0, K, 0)  # the first program writes the ids
        tl.store(ids_out + k, tl.load(ids_ptr + k, mask=kmask).to(tl.int32), mask=kmask)

    @triton.jit
    def _finish(on_gpu, y_host, slots, cols, w, out, D, K: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in tl.static_range(K):
            host = (tl.zeros_like(offs) + tl.load(slots + k)) < 0  # the CPU's pick (a vector: masks want one)
            col = tl.load(cols + k)
            gpu = tl.load(on_gpu + k * D + offs, mask=mask, other=0.0)
            # .cv: fetched again from host memory, never a cached copy of the reused buffer
            cpu = tl.load(y_host + col * D + offs, mask=mask & host, other=0.0, cache_modifier=".cv")
            cpu = (cpu.to(tl.float32) * tl.load(w + k)).to(out.dtype.element_ty)
            pick = tl.where(host, cpu, gpu)
            if k == 0:
                acc = pick.to(tl.float32)
            else:
                acc = (acc.to(out.dtype.element_ty).to(tl.float32) + pick.to(tl.float32))
        tl.store(out + offs, acc.to(out.dtype.element_ty), mask=mask)


def available() -> bool:
    return AVAILABLE


def post(ids: torch.Tensor, x: torch.Tensor, ids_host: torch.Tensor, x_host: torch.Tensor) -> None:
    """ids [K] (int64) and x [1, D] into ids_host [K] int32 and x_host [1, D] (pinned, x's dtype)."""
    K, D = ids.numel(), x.numel()
    if K > BLOCK or ids_host.numel() != K or x_host.numel() != D or x_host.dtype != x.dtype:
        raise ValueError(f"post: {K} ids and {D} activations do not fit buffers of {ids_host.numel()} and "
                         f"{x_host.numel()} {x_host.dtype}")
    _post[(triton.cdiv(D, BLOCK),)](ids.contiguous(), x.contiguous(), ids_host, x_host, K, D, BLOCK=BLOCK)


def finish(on_gpu: torch.Tensor, y_host: torch.Tensor, slots: torch.Tensor, cols: torch.Tensor,
           w: torch.Tensor) -> torch.Tensor:
    """[1, D]: the picks in the given order, pick k being on_gpu[k] where slots[k] >= 0, else
    y_host[cols[k]] scaled by w[k] (float32, as `combine`), added left to right (as `add_picks`).
    on_gpu [K, D] and y_host [K, D] in one dtype; slots, cols, w [K] (w float32)."""
    K, D = on_gpu.shape
    if y_host.shape != (K, D) or y_host.dtype != on_gpu.dtype or slots.numel() != K or cols.numel() != K:
        raise ValueError(f"finish: picks {tuple(on_gpu.shape)}, CPU outputs {tuple(y_host.shape)}, "
                         f"{slots.numel()} slots and {cols.numel()} columns do not fit")
    out = torch.empty(1, D, dtype=on_gpu.dtype, device=on_gpu.device)
    _finish[(triton.cdiv(D, BLOCK),)](on_gpu.contiguous(), y_host, slots, cols, w.float().contiguous(), out, D,
                                      K=K, BLOCK=BLOCK)
    return out
