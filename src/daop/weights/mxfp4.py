"""MXFP4 (the OCP microscaling format gpt-oss's published experts use): blocks of 32 FP4 (e2m1) values
sharing one power-of-two scale. Dequantized as transformers' `convert_moe_packed_tensors` does.

Layout of one matrix [N, K]: blocks uint8 [N, K/32, 16], two values per byte, the low nibble first;
scales uint8 [N, K/32], the exponent biased by 127: value = FP4[nibble] * 2^(scale - 127).
"""
from __future__ import annotations

import torch

BLOCK = 32  # values per scale
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks uint8 [..., G, 16] and scales uint8 [..., G] -> float32 [..., G * 32] (exact: every
    value is a few bits times a power of two)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} ({blocks.dtype}) and scales {list(scales.shape)} "
                         f"({scales.dtype}) do not pair: expected uint8 [..., G, 16] and uint8 [..., G]")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    values = torch.stack((lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]), dim=-1).flatten(-2)  # [..., G, 32]
    return torch.ldexp(values, scales.to(torch.int32)[..., None] - SCALE_BIAS).flatten(-2)

