"""The packed int4 layout: blocks of output rows, two rows' nibbles per byte, as torch's CPU kernel reads it.

torch's `_weight_int4pack_mm_for_cpu` reads blocks whose height depends on the CPU it runs on: 64
output rows with AVX-512, 32 on CPUs without it (torch 2.13). Packed [N, K] codes are laid out as
[N/B, K, B/2] bytes: in block b, byte j of input column k holds row B*b + j in its low nibble and
row B*b + B/2 + j in its high nibble.

The host store keeps this machine's layout (`cpu_block_n()`), so the CPU kernel reads experts as
stored. A quantized folder on disk always holds DISK_BLOCK_N-row blocks (layout "daop-host-v1"), so
a folder written on one machine loads on another: `relayout` converts at those two boundaries only.
"""
from __future__ import annotations

import functools

import torch

from daop.errors import DaopError

DISK_BLOCK_N = 64  # output rows per block in a quantized folder (and on AVX-512 CPUs)
KNOWN_BLOCKS = (64, 32, 16)


def pack(codes: torch.Tensor, block: int) -> torch.Tensor:
    """Codes uint8 [N, K] in 0..15 -> packed uint8 [N, K/2] in blocks of `block` output rows."""
    N, K = codes.shape
    blocks = codes.reshape(N // block, 2, block // 2, K)  # [b, half, j, k]
    return (blocks[:, 0] | (blocks[:, 1] << 4)).transpose(1, 2).contiguous().view(N, K // 2)


def unpack(packed: torch.Tensor, block: int) -> torch.Tensor:
    """The inverse of pack: codes uint8 [N, K]."""
    N, K = packed.shape[0], packed.shape[1] * 2
    nb, half = N // block, block // 2
    blocks = packed.reshape(nb, K, half)
    lo, hi = blocks & 15, blocks >> 4
    return torch.stack([lo, hi], dim=1).transpose(2, 3).reshape(nb * 2 * half, K)


@functools.cache
def cpu_block_n() -> int:
    """The block height torch's CPU int4 kernel reads on this machine, found by packing a probe
    with torch's own converter and comparing it with each known layout."""
    convert = getattr(torch, "_convert_weight_to_int4pack_for_cpu", None)
    if convert is None:
        return DISK_BLOCK_N
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (64, 64), dtype=torch.uint8, generator=gen)
    theirs = convert(codes.int(), 2)
    for block in KNOWN_BLOCKS:
        if torch.equal(pack(codes, block), theirs):
            return block
    raise DaopError(f"torch {torch.__version__} packs int4 weights for this CPU in a layout daop does not know "
                    f"(not blocks of {', '.join(map(str, KNOWN_BLOCKS))} rows); use --expert-dtype int8")


def relayout(packed: torch.Tensor, src_block: int, dst_block: int) -> torch.Tensor:
    """Packed int4 bytes from blocks of src_block rows to blocks of dst_block rows (the same tensor if equal)."""
    return packed if src_block == dst_block else pack(unpack(packed, src_block), dst_block)


def to_disk(packed: torch.Tensor) -> torch.Tensor:
    """Host-layout packed int4 bytes as a quantized folder stores them."""
    return relayout(packed, cpu_block_n(), DISK_BLOCK_N)


def from_disk(packed: torch.Tensor) -> torch.Tensor:
    """A quantized folder's packed int4 bytes in this machine's host layout."""
    return relayout(packed, DISK_BLOCK_N, cpu_block_n())
