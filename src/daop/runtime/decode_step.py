"""The decode step on the device: fixed shapes, inputs in one copy, and on CUDA one captured graph.

Every decode step runs `Decoder.decode` (token ids and position as device tensors, a cache read
whole under a mask), so a step can be captured as a CUDA graph and replayed: one launch instead
of some fifty per layer. A step is captured when everything in it stays on the device: the
experts are routed on the device (`ResidentExperts.capturable`, the all-GPU path) and the routing
reads nothing from the host per step (`device_only`: the model's routers, or a replayed trace read
at the step's position tensor; an observer that records routing on the host is not). Offloaded policies
need the routing on the host each layer; they run the same step uncaptured.

A captured graph is bound to the addresses of its cache and inputs, so caches of captured steps
are pooled per (batch, length): the next sequence of the same shape reuses the cache and the graph.
Cache lengths are rounded up to a power of two (`cache_length`) for every sequence, captured or
not, so a step reads the same cache shape under every policy and exact policies stay equal.
"""
from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from daop.model.decoder import Decoder
from daop.model.layers import KVCache

MIN_CACHE = 256
log = logging.getLogger("daop.decode_step")


def cache_length(decoder: Decoder, needed: int) -> int:
    """Positions to allocate for a sequence of `needed` tokens: the next power of two (at least
    MIN_CACHE), but never past the model's limit, nor past a longrope model's original length when
    the sequence fits in it (the rotary choice depends on the cache length)."""
    c = decoder.config
    length = max(MIN_CACHE, 1 << max(needed - 1, 0).bit_length())
    length = min(length, c.max_positions)
    if c.rope.kind == "longrope" and needed <= c.rope.original_max_positions:
        length = min(length, c.rope.original_max_positions)
    return max(length, needed)


class StepInputs:
    """A step's token ids [B, 1] and position [1] (or one per row, [B]) on the device, staged in one
    pinned host buffer and moved in one non-blocking copy (a token already on the device is copied
    there)."""

    def __init__(self, batch: int, device: torch.device, per_row: bool = False) -> None:
        cuda = device.type == "cuda"
        self.batch, self.cuda = batch, cuda
        size = 2 * batch if per_row else batch + 1
        self.host = torch.zeros(size, dtype=torch.long, pin_memory=cuda)
        self.device_buf = torch.zeros(size, dtype=torch.long, device=device) if cuda else self.host
        self.ids = self.device_buf[:batch].view(batch, 1)
        self.pos = self.device_buf[batch:]
        self.copied: torch.cuda.Event | None = None

    def load(self, tokens: Sequence[int] | torch.Tensor, position: int | Sequence[int]) -> None:
        if self.copied is not None:
            self.copied.synchronize()  # the last copy has read the host buffer
        on_device = isinstance(tokens, torch.Tensor) and tokens.device == self.device_buf.device and self.cuda
        if not on_device:
            self.host[: self.batch] = torch.as_tensor(tokens, dtype=torch.long).reshape(self.batch)
        self.host[self.batch:] = torch.as_tensor(position, dtype=torch.long)
        if not self.cuda:
            return
        if on_device:
            self.device_buf[: self.batch].copy_(tokens.reshape(self.batch))
            self.device_buf[self.batch:].copy_(self.host[self.batch:], non_blocking=True)
        else:
            self.device_buf.copy_(self.host, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()


class CapturedStep:
    """One decode step of a (batch, cache) captured as a CUDA graph; `replay` runs it again."""

    def __init__(self, decoder: Decoder, cache: KVCache, inputs: StepInputs, pad: torch.Tensor | None) -> None:
        # Warm up on a side stream (compiles kernels, fills lazy tables, settles the allocator): a
        # real step on the loaded inputs; the replay that follows writes the same cache entries.
        side = torch.cuda.Stream(decoder.device)
        side.wait_stream(torch.cuda.current_stream(decoder.device))
        with torch.cuda.stream(side):
            decoder.decode(inputs.ids, inputs.pos, cache, pad)
        torch.cuda.current_stream(decoder.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = decoder.decode(inputs.ids, inputs.pos, cache, pad)

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits


class PooledStep:
    """A cache, its step inputs and padding buffer, and the captured step, kept for the next
    sequence of the same shape; `owner` is the session using it now."""

    def __init__(self, decoder: Decoder, batch: int, length: int) -> None:
        self.cache = decoder.new_cache(batch, length)
        self.inputs = StepInputs(batch, decoder.device)
        self.pad = torch.zeros(batch, dtype=torch.long, device=decoder.device) if batch > 1 else None
        self.graph: CapturedStep | None = None
        self.owner: weakref.ref | None = None
        self.experts = weakref.ref(decoder.experts)  # the graph reads these experts' tensors
        self.routing_key = decoder.routing.graph_key  # and these routing tensors

    def busy(self) -> bool:
        return self.owner is not None and self.owner() is not None

    def stale(self, decoder: Decoder) -> bool:
        """The decoder's experts were replaced (a benchmark's next engine) or its routing reads other
        tensors: the graph would read freed or wrong memory."""
        return self.experts() is not decoder.experts or self.routing_key != decoder.routing.graph_key


_POOLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # decoder -> {(batch, length): PooledStep}


def captures(decoder: Decoder, batch: int) -> bool:
    """Whether decode steps of `batch` rows are captured: CUDA, graphs not switched off, experts
    routed on the device and a routing that stays on the device."""
    experts = decoder.experts
    return (decoder.device.type == "cuda" and decoder.cuda_graphs and getattr(decoder.routing, "device_only", False)
            and hasattr(experts, "capturable") and experts.capturable(batch))


class Stepper:
    """Runs one session's decode steps: captured (a pooled cache and graph) or eager (its own cache)."""

    def __init__(self, decoder: Decoder, owner: Any, batch: int, needed: int, pad: torch.Tensor | None) -> None:
        self.decoder = decoder
        length = cache_length(decoder, needed)
        self.pooled: PooledStep | None = None
        if captures(decoder, batch):
            self.pooled = self.claim(owner, batch, length)
        if self.pooled is not None:
            self.cache, self.inputs, self.pad = self.pooled.cache, self.pooled.inputs, self.pooled.pad
            if pad is not None:
                self.pad.copy_(pad)
        else:
            self.cache = decoder.new_cache(batch, length)
            self.inputs = StepInputs(batch, decoder.device)
            self.pad = pad.to(decoder.device) if pad is not None else None
        bind = getattr(decoder.routing, "bind_position", None)
        if bind is not None:  # a routing that reads per-position tables (a replayed trace) reads them at the step's position
            bind(self.inputs.pos)

    def claim(self, owner: Any, batch: int, length: int) -> PooledStep | None:
        pool = _POOLS.setdefault(self.decoder, {})
        for key in [k for k, e in pool.items() if e.stale(self.decoder)]:
            del pool[key]
        entry = pool.get((batch, length))
        if entry is not None and entry.busy():
            return None  # another live session holds it: this one runs uncaptured on its own cache
        if entry is None:
            for key in [k for k, e in pool.items() if not e.busy()]:
                del pool[key]  # one shape at a time: idle caches of other shapes are freed first
            if self.decoder.device.type == "cuda":
                torch.cuda.empty_cache()
            entry = pool[(batch, length)] = PooledStep(self.decoder, batch, length)
        entry.owner = weakref.ref(owner)
        return entry

    def run(self, tokens: Sequence[int] | torch.Tensor, position: int) -> torch.Tensor:
        """Logits [B, V] of one decode step at `position` (a fresh tensor: the graph's own is reused)."""
        self.inputs.load(tokens, position)
        if self.pooled is None:
            return self.decoder.decode(self.inputs.ids, self.inputs.pos, self.cache, self.pad)
        if self.pooled.graph is None:
            try:
                self.pooled.graph = CapturedStep(self.decoder, self.cache, self.inputs, self.pad)
            except (torch.cuda.OutOfMemoryError, MemoryError):
                raise
            except Exception as exc:  # noqa: BLE001 - a step that cannot be captured still runs, eagerly
                log.warning("decode steps run uncaptured from now on: capture failed (%s: %s)", type(exc).__name__, exc)
                self.decoder.cuda_graphs, self.pooled = False, None
                return self.decoder.decode(self.inputs.ids, self.inputs.pos, self.cache, self.pad)
        return self.pooled.graph.replay().clone()

    @property
    def captured(self) -> bool:
        return self.pooled is not None
