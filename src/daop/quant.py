"""Low-bit routed experts: weight-only int8 and int4, quantized once at load.

An expert is a tuple of tensors in one of three formats, told apart by its tensors' dtypes:
- float: (gate_up [2I, D], down [D, I]) in the model's dtype;
- int8: (gate_up int8 [2I, D], gate_up scales [2I], down int8 [D, I], down scales [D]); symmetric,
  one scale per output channel: w = q * scale;
- int4: (gate_up packed uint8 [2I, D/2], gate_up scales and zeros [D/G, 2I, 2], down packed
  [D, I/2], down scales and zeros [I/G, D, 2]); asymmetric, one scale and zero per group of G
  input channels: w = (q - 8) * scale + zero, q in 0..15. The packed bytes are laid out as torch's
  CPU kernel reads them: [N/64, K, 32] in memory, blocks of 64 output rows; in block b, byte j of
  input column k holds row 64b + j in its low nibble and row 64b + 32 + j in its high nibble. A GPU
  slot holds the CUDA kernel's own layout, converted on the GPU after each copy (`to_slot_format`).

Scales are in the model's dtype (the kernels take activations and scales in one dtype). Every
expert, wherever it runs, goes through `expert_forward`, so exact runners stay bitwise equal
to each other on one device. Kernels: `_weight_int8pack_mm` and the int4 pack/mm ops of torch;
where a device has none, the expert's weights are dequantized for the product.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from daop.errors import DaopError

EXPERT_DTYPES = ("auto", "int8", "int4")
DEFAULT_GROUP_SIZE = 128
INT4_BLOCK_N = 64  # output rows per block in the CPU int4 layout


def bits_of(expert_dtype: str) -> int | None:
    return {"int8": 8, "int4": 4}.get(expert_dtype)


def parse_expert_dtype(name: str | None, model_dtype: torch.dtype) -> str:
    """'auto' (experts in the model's dtype), 'int8' or 'int4'; a float name must be the model's own dtype."""
    if name is None:
        return "auto"
    key = str(name).lower()
    if key in EXPERT_DTYPES:
        return key
    from daop.weights.loader import DTYPE_NAMES  # late import: the loader imports this module
    if key in DTYPE_NAMES:
        if DTYPE_NAMES[key] != model_dtype:
            raise DaopError(f"--expert-dtype {name} differs from the model's dtype {str(model_dtype).removeprefix('torch.')}; "
                            "float experts use --dtype, low-bit ones int8 or int4")
        return "auto"
    raise DaopError(f"unsupported expert dtype {name!r}; choose one of auto, int8, int4")


def check_geometry(expert_dtype: str, hidden: int, inter: int, group_size: int) -> None:
    """A clear error when the expert shapes cannot be quantized in this format."""
    if expert_dtype != "int4":
        return
    if group_size < 32 or group_size & (group_size - 1):
        raise DaopError(f"--group-size {group_size} must be a power of two of at least 32")
    for what, size in (("hidden size", hidden), ("expert intermediate size", inter)):
        if size % group_size:
            raise DaopError(f"int4 experts: the {what} {size} is not a multiple of --group-size {group_size}")
        if size % INT4_BLOCK_N:
            raise DaopError(f"int4 experts: the {what} {size} is not a multiple of {INT4_BLOCK_N}")


def expert_bytes(hidden: int, inter: int, element_size: int, expert_dtype: str = "auto",
                 group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Bytes of one routed expert (weights and scales) in a format."""
    n = 3 * hidden * inter
    if expert_dtype == "int8":
        return n + (2 * inter + hidden) * element_size
    if expert_dtype == "int4":
        return n // 2 + 2 * (n // group_size) * element_size
    return n * element_size


def expert_shapes(hidden: int, inter: int, expert_dtype: str, group_size: int, dtype: torch.dtype
                  ) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of each tensor of one expert in a format (host layout)."""
    D, I = hidden, inter
    if expert_dtype == "int8":
        return [((2 * I, D), torch.int8), ((2 * I,), dtype), ((D, I), torch.int8), ((D,), dtype)]
    if expert_dtype == "int4":
        return [((2 * I, D // 2), torch.uint8), ((D // group_size, 2 * I, 2), dtype),
                ((D, I // 2), torch.uint8), ((I // group_size, D, 2), dtype)]
    return [((2 * I, D), dtype), ((D, I), dtype)]


# --- quantization (float weights -> format) ---

def quantize_int8(w: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 of w [N, K]: (q int8 [N, K], scale [N]); w ~ q * scale."""
    wf = w.float()
    scale = (wf.abs().amax(dim=1) / 127).clamp_min(1e-12)
    scale = scale.to(dtype or w.dtype)  # round the scale first, quantize against the stored value
    q = torch.round(wf / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int4_codes(w: torch.Tensor, group_size: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4 of w [N, K]: (codes uint8 [N, K] in 0..15, scales and zeros [K/G, N, 2])."""
    N, K = w.shape
    wg = w.float().reshape(N, K // group_size, group_size)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    zero = lo + 8 * scale
    sz = torch.stack([scale, zero], dim=-1).to(dtype or w.dtype)  # [N, K/G, 2]
    s, z = sz[..., 0].float(), sz[..., 1].float()
    codes = torch.round((wg - z[..., None]) / s[..., None] + 8).clamp_(0, 15).to(torch.uint8).reshape(N, K)
    return codes, sz.transpose(0, 1).contiguous()


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes uint8 [N, K] -> packed uint8 [N, K/2] in the CPU kernel's layout (see the module docstring)."""
    N, K = codes.shape
    blocks = codes.reshape(N // INT4_BLOCK_N, 2, INT4_BLOCK_N // 2, K)  # [b, half, j, k]
    return (blocks[:, 0] | (blocks[:, 1] << 4)).transpose(1, 2).contiguous().view(N, K // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: codes uint8 [N, K]."""
    N, K = packed.shape[0], packed.shape[1] * 2
    nb, half = N // INT4_BLOCK_N, INT4_BLOCK_N // 2
    blocks = packed.reshape(nb, K, half)
    lo, hi = blocks & 15, blocks >> 4
    return torch.stack([lo, hi], dim=1).transpose(2, 3).reshape(nb * 2 * half, K)


def quantize(w: torch.Tensor, expert_dtype: str, group_size: int = DEFAULT_GROUP_SIZE,
             dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One weight matrix [N, K] in a low-bit format: (quantized weights, scales) as the host stores them."""
    if expert_dtype == "int8":
        return quantize_int8(w, dtype)
    if expert_dtype == "int4":
        codes, sz = int4_codes(w, group_size, dtype)
        return pack_int4(codes), sz
    raise ValueError(f"not a low-bit format: {expert_dtype!r}")


def quantize_expert(gate_up: torch.Tensor, down: torch.Tensor, expert_dtype: str,
                    group_size: int = DEFAULT_GROUP_SIZE) -> tuple[torch.Tensor, ...]:
    """A float expert in a format (host layout)."""
    if expert_dtype == "auto":
        return gate_up, down
    return (*quantize(gate_up, expert_dtype, group_size), *quantize(down, expert_dtype, group_size))


def dequantize(w: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
    """One matrix (weights, scales) in float32 [N, K], or a float matrix as float32."""
    if len(w) == 1:
        return w[0].float()
    q, s = w
    if q.dtype == torch.int8:
        return q.float() * s.float()[:, None]
    codes = unpack_int4(q).float()  # [N, K]
    G = codes.shape[1] // s.shape[0]
    scale = s[..., 0].float().t().repeat_interleave(G, dim=1)
    zero = s[..., 1].float().t().repeat_interleave(G, dim=1)
    return (codes - 8) * scale + zero


# --- products ---

def _has_kernel(op: str, device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    try:
        return key is not None and bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", key))
    except RuntimeError:
        return False


_KERNELS: dict[tuple[str, str], bool] = {}


def has_kernel(op: str, device_type: str) -> bool:
    key = (op, device_type)
    if key not in _KERNELS:
        _KERNELS[key] = _has_kernel(op, device_type)
    return _KERNELS[key]


def int4_inner_k_tiles(K: int) -> int:
    """The CUDA int4 layout's inner K tiles for K input channels (8 where K allows)."""
    for tiles in (8, 4, 2):
        if K % (tiles * 16) == 0:
            return tiles
    raise DaopError(f"int4 experts on CUDA need input sizes that are multiples of 32, got {K}")


def to_slot_format(q: torch.Tensor) -> torch.Tensor:
    """Weights copied to a CUDA device, in the layout that device's int4 kernel reads (int8 and float
    weights are used as copied). Runs on the weights' device, on the current stream."""
    if q.dtype != torch.uint8 or q.device.type != "cuda" or not has_kernel("_convert_weight_to_int4pack", "cuda"):
        return q
    codes = unpack_int4(q)
    plain = (codes[:, ::2] << 4) | codes[:, 1::2]
    return torch._convert_weight_to_int4pack(plain.contiguous(), int4_inner_k_tiles(codes.shape[1]))


def linear_q(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x [M, K] times a quantized matrix's transpose -> [M, N] in x's dtype."""
    x = x.contiguous()
    if q.dtype == torch.int8:
        if has_kernel("_weight_int8pack_mm", x.device.type):
            return torch._weight_int8pack_mm(x, q, s)
        return F.linear(x, q.to(x.dtype)) * s
    if q.dtype == torch.uint8:  # int4, CPU layout
        G = 2 * q.shape[1] // s.shape[0]
        if x.device.type == "cpu":
            return torch._weight_int4pack_mm_for_cpu(x, q, G, s)
        return F.linear(x, dequantize((q, s)).to(x.dtype))
    if q.dtype == torch.int32:  # int4, CUDA layout (to_slot_format)
        K = x.shape[1]
        return torch._weight_int4pack_mm(x, q, K // s.shape[0], s)
    raise TypeError(f"not a quantized weight: {q.dtype}")


def expert_forward(x: torch.Tensor, w: tuple[torch.Tensor, ...] | List[torch.Tensor]) -> torch.Tensor:
    """One SwiGLU expert, down(silu(gate x) * up x), for an expert in any format."""
    if len(w) == 2:
        from daop.model.moe import swiglu
        return swiglu(x, w[0], w[1])
    gate, up = linear_q(x, w[0], w[1]).chunk(2, dim=-1)
    return linear_q(F.silu(gate) * up, w[2], w[3])
