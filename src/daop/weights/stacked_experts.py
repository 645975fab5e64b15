"""Loading experts stored stacked per layer, as gpt-oss publishes them, into daop's expert stores.

Per MoE layer the checkpoint holds, over its E experts (transformers' orientation, products as x @ W):
- float: `experts.gate_up_proj` [E, D, 2I] with gate and up interleaved in its columns (gate at even
  ones, up at odd ones), `experts.down_proj` [E, I, D];
- MXFP4 (the published checkpoints): `experts.gate_up_proj_blocks` [E, 2I, D/32, 16] and `_scales`
  [E, 2I, D/32] (rows interleaved the same way), `experts.down_proj_blocks` [E, D, I/32, 16] and
  `_scales` [E, D, I/32] (`daop.weights.mxfp4`);
- either way, `experts.gate_up_proj_bias` [E, 2I] (interleaved) and `experts.down_proj_bias` [E, D].

Peak host memory: experts are read one at a time. For each, only that expert's slice of the stacked
tensor is read from the memory map (its pages released after), dequantized or transposed into one
float32 scratch matrix of one expert ([2I, D] at most: 66 MB for gpt-oss-20b), and written into the
expert store's tensors in their final format; with --expert-dtype int8/int4 each part is quantized
right after (the store's Staged destinations). No float copy of a layer's, or the model's, experts
is ever held besides the store itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from daop.config import ModelConfig
from daop.model.specs import FamilySpec
from daop.weights.expert_views import DEFERRED
from daop.weights.mxfp4 import BLOCK, dequantize_mxfp4
from daop.weights.safetensors_io import Checkpoint

ExpertViews = tuple  # (gate, up, down, gate bias, up bias, down bias) destinations of one expert


@dataclass
class StackedPart:
    """A loader target for one stacked checkpoint tensor [E, ...]: `load` fills every expert's part."""

    shape: tuple[int, ...]
    dtype: torch.dtype | None  # uint8 for MXFP4 blocks and scales (checked exactly); None: any float type
    load: Callable[[Checkpoint, str], None]


def put(dest, value: torch.Tensor) -> None:
    """Write one expert's part into a store destination: a tensor view, or a Staged one that quantizes."""
    if isinstance(dest, DEFERRED):
        dest.buffer.copy_(value)
        dest.commit()
    else:
        dest.copy_(value)


def per_expert(views: list[ExpertViews], shape: tuple[int, ...], dtype: torch.dtype,
               write: Callable[[int, torch.Tensor], None]) -> Callable[[Checkpoint, str], None]:
    """A load function reading expert after expert's slice [shape] into one scratch tensor, then `write`."""
    def load(ckpt: Checkpoint, name: str) -> None:
        scratch = torch.empty(shape, dtype=dtype)
        for e in range(len(views)):
            ckpt.read_into(name, scratch, index=e)
            write(e, scratch)
    return load


def bias_parts(base: str, views: list[ExpertViews], config: ModelConfig) -> dict[str, StackedPart]:
    E, D, I = config.num_experts, config.hidden_size, config.expert_intermediate_size

    def gate_up(e: int, b: torch.Tensor) -> None:
        put(views[e][3], b[0::2])
        put(views[e][4], b[1::2])

    return {f"{base}.gate_up_proj_bias": StackedPart((E, 2 * I), None, per_expert(views, (2 * I,), torch.float32, gate_up)),
            f"{base}.down_proj_bias": StackedPart((E, D), None, per_expert(
                views, (D,), torch.float32, lambda e, b: put(views[e][5], b)))}


def float_parts(base: str, views: list[ExpertViews], config: ModelConfig) -> dict[str, StackedPart]:
    E, D, I = config.num_experts, config.hidden_size, config.expert_intermediate_size

    def gate_up(e: int, w: torch.Tensor) -> None:  # w [D, 2I]
        put(views[e][0], w[:, 0::2].t())
        put(views[e][1], w[:, 1::2].t())

    return {f"{base}.gate_up_proj": StackedPart((E, D, 2 * I), None, per_expert(views, (D, 2 * I), torch.float32, gate_up)),
            f"{base}.down_proj": StackedPart((E, I, D), None, per_expert(
                views, (I, D), torch.float32, lambda e, w: put(views[e][2], w.t())))}


def mxfp4_load(views: list[ExpertViews], rows: int, cols: int,
               write: Callable[[int, torch.Tensor], None]) -> Callable[[Checkpoint, str], None]:
    """Load function of a `_blocks` tensor: each expert's blocks and scales read, dequantized to [rows, cols]."""
    groups = cols // BLOCK

    def load(ckpt: Checkpoint, name: str) -> None:
        blocks = torch.empty(rows, groups, BLOCK // 2, dtype=torch.uint8)
        scales = torch.empty(rows, groups, dtype=torch.uint8)
        for e in range(len(views)):
            ckpt.read_into(name, blocks, index=e)
            ckpt.read_into(name.removesuffix("_blocks") + "_scales", scales, index=e)
            write(e, dequantize_mxfp4(blocks, scales))
    return load


def read_with_blocks(ckpt: Checkpoint, name: str) -> None:
    """Scales are read with their blocks (`mxfp4_load`)."""


def mxfp4_parts(base: str, views: list[ExpertViews], config: ModelConfig) -> dict[str, StackedPart]:
    E, D, I = config.num_experts, config.hidden_size, config.expert_intermediate_size

    def gate_up(e: int, w: torch.Tensor) -> None:  # w [2I, D], rows interleaved
        put(views[e][0], w[0::2])
        put(views[e][1], w[1::2])

    u8 = torch.uint8
    return {
        f"{base}.gate_up_proj_blocks": StackedPart((E, 2 * I, D // BLOCK, BLOCK // 2), u8, mxfp4_load(views, 2 * I, D, gate_up)),
        f"{base}.gate_up_proj_scales": StackedPart((E, 2 * I, D // BLOCK), u8, read_with_blocks),
        f"{base}.down_proj_blocks": StackedPart((E, D, I // BLOCK, BLOCK // 2), u8, mxfp4_load(
            views, D, I, lambda e, w: put(views[e][2], w))),
        f"{base}.down_proj_scales": StackedPart((E, D, I // BLOCK), u8, read_with_blocks),
    }


def stacked_expert_tensors(ckpt: Checkpoint, spec: FamilySpec, config: ModelConfig,
                           dest: Callable[[int, int], ExpertViews]) -> dict[str, StackedPart]:
    """Checkpoint name -> StackedPart for every MoE layer's stacked expert tensors (MXFP4 where the
    checkpoint has `_blocks` tensors, else float); dest gives an expert's six destinations."""
    out: dict[str, StackedPart] = {}
    for layer_idx in config.moe_layer_ids():
        base = f"{spec.layer(layer_idx)}.{spec.moe_prefix}.experts"
        views = [dest(layer_idx, e) for e in range(config.num_experts)]
        assert all(len(v) == 6 for v in views), "stacked experts load into a biased expert format"
        mxfp4 = ckpt.entry(f"{base}.gate_up_proj_blocks") is not None
        out.update(mxfp4_parts(base, views, config) if mxfp4 else float_parts(base, views, config))
        out.update(bias_parts(base, views, config))
    return out
