"""Loader destinations for routed experts: where the loader reads each checkpoint tensor of an expert.

A float expert's tensors are read in place. A low-bit expert's float tensors are read into shared
scratch and quantized into the expert's tensors (`Staged`, `staged_views`); a quantized folder's
stored tensors are read in place, or through a host buffer and converted where the destination holds
another layout (`SlotCopy`, `stored_views`: int4 in a CUDA slot, or int4 blocks of another height on
this CPU). The loader reads into `buffer` and calls `commit()` for every DEFERRED destination.
"""
from __future__ import annotations

from typing import Callable

import torch

from daop import int4_layout
from daop.quant import ExpertFormat, copy_into_slot


class Staged:
    """A loader destination that quantizes: the checkpoint tensor is read into `buffer` (float,
    shared scratch), then `commit()` writes its quantized rows into the expert's tensors, which
    `target()` gives (host layout)."""

    def __init__(self, fmt: ExpertFormat, buffer: torch.Tensor, target: Callable[[], tuple[torch.Tensor, ...]],
                 part: str, done: Callable[[], None] | None = None) -> None:
        self.fmt, self.buffer, self.target, self.part, self.done = fmt, buffer, target, part, done

    @property
    def shape(self) -> torch.Size:
        return self.buffer.shape

    def commit(self) -> None:
        gu_q, gu_s, dn_q, dn_s = self.target()[:4]
        q_dst, s_dst = (dn_q, dn_s) if self.part == "down" else (gu_q, gu_s)
        q, s = self.fmt.quantize_part(self.buffer, self.part)
        n = q.shape[0]
        rows = slice(n, 2 * n) if self.part == "up" else slice(0, n)
        q_dst[rows].copy_(q)
        (s_dst[rows] if self.fmt.kind == "int8" else s_dst[:, rows]).copy_(s)
        if self.done is not None:
            self.done()


class ScratchBuffers:
    """One float scratch tensor per shape, reused for every checkpoint tensor read before quantizing."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.buffers: dict[tuple[int, ...], torch.Tensor] = {}

    def get(self, *shape: int) -> torch.Tensor:
        if shape not in self.buffers:
            self.buffers[shape] = torch.empty(*shape, dtype=self.dtype)
        return self.buffers[shape]


def staged_views(fmt: ExpertFormat, target: Callable[[], tuple[torch.Tensor, ...]], scratch: ScratchBuffers,
                 hidden: int, inter: int, done: Callable[[], None] | None = None) -> tuple[Staged, Staged, Staged]:
    """(gate, up, down) loader destinations that quantize into one expert's tensors (host layout,
    given by `target()` when the first part is committed). done: called after each part."""
    I, D = inter, hidden
    return (Staged(fmt, scratch.get(I, D), target, "gate", done), Staged(fmt, scratch.get(I, D), target, "up", done),
            Staged(fmt, scratch.get(D, I), target, "down", done))


class SlotCopy:
    """A loader destination for a stored tensor whose slot holds another layout (int4 on CUDA, or
    int4 blocks of another height than a quantized folder's on this CPU): the checkpoint tensor is
    read into `buffer` (the folder's layout, shared scratch), then `commit()` copies it into the
    slot, converting it."""

    def __init__(self, buffer: torch.Tensor, slot: torch.Tensor) -> None:
        self.buffer, self.slot = buffer, slot

    @property
    def shape(self) -> torch.Size:
        return self.buffer.shape

    def commit(self) -> None:
        src = int4_layout.from_disk(self.buffer) if self.buffer.dtype == torch.uint8 else self.buffer
        copy_into_slot(self.slot, src)


DEFERRED = (Staged, SlotCopy)  # destinations read into a host buffer, then committed


def stored_views(fmt: ExpertFormat, slots: tuple[torch.Tensor, ...], scratch: dict, hidden: int, inter: int) -> tuple:
    """Loader destinations for one expert's stored tensors (host layout, from a quantized folder):
    the slot's own tensors where they share the host layout, else a `SlotCopy` through a host buffer
    kept in `scratch` (one per shape and dtype, reused: each commit copies synchronously)."""
    out = []
    for slot, (shape, dtype) in zip(slots, fmt.shapes(hidden, inter)):
        same_bytes = dtype != torch.uint8 or int4_layout.cpu_block_n() == int4_layout.DISK_BLOCK_N
        if tuple(slot.shape) == tuple(shape) and slot.dtype == dtype and same_bytes:
            out.append(slot)
            continue
        if (shape, dtype) not in scratch:
            scratch[(shape, dtype)] = torch.empty(shape, dtype=dtype)
        out.append(SlotCopy(scratch[(shape, dtype)], slot))
    return tuple(out)
