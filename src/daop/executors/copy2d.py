"""Strided host->device copies on a stream, for the down columns of a split expert.

A split expert's GPU part needs columns [lo, hi) of its down matrix [D, I]: D rows of (hi - lo)
elements, I apart. torch copies a non-contiguous host tensor to the GPU by first making it
contiguous in pageable host memory (a blocking copy through the CPU), so the copy engines would not
be used. The CUDA driver's `cuMemcpy2DAsync` copies such a pitched block with the copy engines, on a
stream, as one transfer. It is called through ctypes on `libcuda.so.1` (present wherever CUDA runs).
Where it cannot be called, `copy_2d` says so once and copies through torch (correct, slower).
"""
from __future__ import annotations

import ctypes
import warnings

import torch

_MEMORYTYPE_HOST, _MEMORYTYPE_DEVICE = 1, 2
_STATE: dict = {}


class _Memcpy2D(ctypes.Structure):
    """CUDA_MEMCPY2D of the driver API."""

    _fields_ = [("srcXInBytes", ctypes.c_size_t), ("srcY", ctypes.c_size_t), ("srcMemoryType", ctypes.c_int),
                ("srcHost", ctypes.c_void_p), ("srcDevice", ctypes.c_uint64), ("srcArray", ctypes.c_void_p),
                ("srcPitch", ctypes.c_size_t),
                ("dstXInBytes", ctypes.c_size_t), ("dstY", ctypes.c_size_t), ("dstMemoryType", ctypes.c_int),
                ("dstHost", ctypes.c_void_p), ("dstDevice", ctypes.c_uint64), ("dstArray", ctypes.c_void_p),
                ("dstPitch", ctypes.c_size_t),
                ("WidthInBytes", ctypes.c_size_t), ("Height", ctypes.c_size_t)]


def _driver_copy():
    if "fn" not in _STATE:
        try:
            fn = ctypes.CDLL("libcuda.so.1").cuMemcpy2DAsync_v2
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.POINTER(_Memcpy2D), ctypes.c_void_p]
        except (OSError, AttributeError) as exc:
            warn(f"the CUDA driver's 2D copy is unavailable ({exc})")
            fn = None
        _STATE["fn"] = fn
    return _STATE["fn"]


def warn(problem: str) -> None:
    if not _STATE.get("warned"):
        _STATE["warned"] = True
        warnings.warn(f"daop: split experts' down columns are copied through torch: {problem}", RuntimeWarning,
                      stacklevel=3)


def rows_of(t: torch.Tensor) -> tuple[int, int, int]:
    """(rows, bytes per row, pitch in bytes) of a 2D tensor whose rows are contiguous."""
    if t.dim() != 2 or t.stride(1) != 1:
        raise ValueError(f"a 2D copy needs contiguous rows, got shape {tuple(t.shape)} strides {t.stride()}")
    return t.shape[0], t.shape[1] * t.element_size(), t.stride(0) * t.element_size()


def copy_2d(dst: torch.Tensor, src: torch.Tensor, stream: "torch.cuda.Stream") -> None:
    """dst (a CUDA view with contiguous rows) <- src (a pinned host view of the same shape and dtype),
    asynchronously on `stream` (the caller records the event that says when it has landed)."""
    if dst.shape != src.shape or dst.dtype != src.dtype:
        raise ValueError(f"2D copy of {tuple(src.shape)} {src.dtype} into {tuple(dst.shape)} {dst.dtype}")
    (h, width, dpitch), (_, _, spitch) = rows_of(dst), rows_of(src)
    fn = _driver_copy() if src.is_pinned() else None
    if fn is not None and h and width:
        spec = _Memcpy2D(srcMemoryType=_MEMORYTYPE_HOST, srcHost=src.data_ptr(), srcPitch=spitch,
                         dstMemoryType=_MEMORYTYPE_DEVICE, dstDevice=dst.data_ptr(), dstPitch=dpitch,
                         WidthInBytes=width, Height=h)
        rc = fn(ctypes.byref(spec), ctypes.c_void_p(stream.cuda_stream))
        if rc == 0:
            return
        warn(f"cuMemcpy2DAsync returned CUDA error {rc}")
        _STATE["fn"] = None
    with torch.cuda.stream(stream):
        dst.copy_(src, non_blocking=True)
