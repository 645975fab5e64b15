"""The decode step on the device: fixed shapes, inputs in one copy, and on CUDA one captured graph.

Every decode step runs `Decoder.decode` (token ids and position as device tensors, a cache read
whole under a mask), so a step can be captured as a CUDA graph and replayed: one launch instead
of some fifty per layer. A step is captured when the routing reads nothing from the host per step
(`device_only`: the model's routers, or a replayed trace read at the step's position tensor; an
observer that records routing on the host is not). When the experts are routed on the device too
(`ResidentExperts.capturable`, the all-GPU path) the whole step is one graph (`CapturedStep`).
Offloaded policies need the routing on the host each layer: the device work between two MoE calls
is captured instead, and the runner serves each MoE layer eagerly between the pieces
(`PiecewiseStep`).

A captured graph is bound to the addresses of its cache and inputs, so a sequence's cache and
captured step are pooled per cache length: the next sequence of that length reuses both. (A batch's
rows and captured steps are kept by its `daop.batching.Batcher`.)
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

    def __init__(self, decoder: Decoder, cache: KVCache, inputs: StepInputs) -> None:
        # Warm up on a side stream (compiles kernels, fills lazy tables, settles the allocator): a
        # real step on the loaded inputs; the replay that follows writes the same cache entries.
        side = torch.cuda.Stream(decoder.device)
        side.wait_stream(torch.cuda.current_stream(decoder.device))
        with torch.cuda.stream(side):
            decoder.decode(inputs.ids, inputs.pos, cache)
        torch.cuda.current_stream(decoder.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = decoder.decode(inputs.ids, inputs.pos, cache)

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits


class PiecewiseStep:
    """One decode step of a (batch, cache) whose experts the host drives (an offloaded runner): the
    device work between two MoE calls is captured as one CUDA graph (piece k: the previous MoE
    layer's residual, the dense layers in between, then the next MoE layer's attention, norm and
    router), and each MoE layer's experts run eagerly in between, as the runner plans them from the
    routing it reads. One launch per piece instead of some forty eager kernels per layer; the
    kernels are the eager step's own, so the tokens are the same.

    Where the runner predicts later layers' routing from a layer's input (`piece_predictions`: the
    DAOP runner), piece k makes those predictions too, after the layer's router, and hands them to
    the runner with the routing: a prediction launched from the host costs its driving thread a few
    hundred microseconds before each routing read, one inside the graph costs nothing there.

    Piece k's outputs (residual, MoE input, routing ids and weights, then any predictions) are
    tensors of the graphs' shared memory pool that later pieces never overwrite; the runner's output
    goes into one static buffer the next piece reads."""

    def __init__(self, decoder: Decoder, cache: KVCache, inputs: StepInputs, graphs: bool = True) -> None:
        self.decoder, self.cache, self.inputs = decoder, cache, inputs
        self.moe_layers = [layer.layer_idx for layer in decoder.layers if layer.router is not None]
        wants = getattr(decoder.experts, "piece_predictions", None)
        # MoE layer -> (l+1, l+2 or None): the layers whose routing its piece predicts for the runner
        self.predicts = {l: p for l in self.moe_layers if (p := wants(l)) is not None} if wants else {}
        c = decoder.config
        self.moe_out = torch.zeros(inputs.batch, c.hidden_size, device=decoder.device, dtype=decoder.dtype)
        self.outputs: list[tuple[torch.Tensor, ...]] = []
        self.step = None
        self.graphs: list[torch.cuda.CUDAGraph] | None = None
        if not graphs:  # the pieces run eagerly at every replay (to check the split on any device)
            return
        # Warm-up on a side stream with a zero expert output (kernels, lazy tables, the allocator):
        # it writes the cache at this step's position, which the first replay writes again.
        side = torch.cuda.Stream(decoder.device)
        side.wait_stream(torch.cuda.current_stream(decoder.device))
        with torch.cuda.stream(side):
            for k in range(len(self.moe_layers) + 1):
                self.outputs.append(self.piece(k))
        torch.cuda.current_stream(decoder.device).wait_stream(side)
        side.synchronize()
        self.outputs, self.graphs = [], []
        pool = torch.cuda.graph_pool_handle()
        for k in range(len(self.moe_layers) + 1):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs.append(self.piece(k))
            self.graphs.append(graph)

    @torch.inference_mode()
    def piece(self, k: int) -> tuple[torch.Tensor, ...]:
        """Piece k's device work; returns (residual, MoE input [N, D], ids, weights), then the
        predictions the runner asked for (l+1's logits, ids and weights, then l+2's ids where asked
        and the routing has them), or (logits,) last."""
        d = self.decoder
        delta = None  # an FFN output the next norm adds to the stream (as `Decoder.run_layers`)
        if k == 0:
            x, self.step = d.begin_decode(self.inputs.ids, self.inputs.pos, self.cache)
            first = 0
        else:
            prev = self.moe_layers[k - 1]
            x, flat = self.outputs[k - 1][:2]
            delta = d.moe_output(d.layers[prev], flat, self.moe_out).view(x.shape)
            first = prev + 1
        last = self.moe_layers[k] if k < len(self.moe_layers) else len(d.layers)
        x, delta = d.run_layers(d.layers[first:last], x, self.step, delta)
        if k == len(self.moe_layers):
            return (d.head_of(x, delta),)
        h, normed = d.attention_block(d.layers[last], x, self.step, delta)
        flat = normed.reshape(-1, normed.shape[-1])
        ids, weights = d.routing.route(last, flat)
        return (h, flat, ids, weights, *self.predictions(last, flat))

    def predictions(self, layer_idx: int, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The runner's predictions from MoE layer layer_idx's input: l+1's (logits, ids, weights),
        then l+2's ids where asked for and the routing predicts that far; () where none is asked."""
        wanted = self.predicts.get(layer_idx)
        if wanted is None:
            return ()
        nxt, nxt2 = wanted
        routing = self.decoder.routing
        out = tuple(routing.predict(nxt, flat))
        source = getattr(routing, "predict_ahead", None) if nxt2 is not None else None
        ahead = source(nxt2, flat) if source is not None else None
        return out + ((ahead,) if ahead is not None else ())

    def run_piece(self, k: int) -> tuple[torch.Tensor, ...]:
        if self.graphs is None:
            if k == 0:
                self.outputs = []
            self.outputs.append(self.piece(k))
        else:
            self.graphs[k].replay()
        return self.outputs[k]

    @torch.inference_mode()
    def replay(self) -> torch.Tensor:
        for k, layer_idx in enumerate(self.moe_layers):
            _, flat, ids, weights, *predicted = self.run_piece(k)
            if predicted:
                out = self.decoder.experts(layer_idx, flat, ids, weights, predicted=tuple(predicted))
            else:
                out = self.decoder.experts(layer_idx, flat, ids, weights)
            self.moe_out.copy_(out)
        return self.run_piece(len(self.moe_layers))[0]


def capture_step(decoder: Decoder, cache: KVCache, inputs: StepInputs) -> CapturedStep | PiecewiseStep:
    """The whole step as one graph where the experts are routed on the device, else in pieces."""
    if whole_step(decoder, inputs.batch):
        return CapturedStep(decoder, cache, inputs)
    return PiecewiseStep(decoder, cache, inputs)


class PooledStep:
    """A sequence's cache, its step inputs and the captured step, kept for the next sequence of the
    same cache length; `owner` is the session using it now."""

    def __init__(self, decoder: Decoder, length: int) -> None:
        self.cache = decoder.new_cache(1, length)
        self.inputs = StepInputs(1, decoder.device)
        self.graph: CapturedStep | PiecewiseStep | None = None
        self.owner: weakref.ref | None = None
        self.experts = weakref.ref(decoder.experts)  # the graph reads these experts' tensors
        self.routing_key = decoder.routing.graph_key  # and these routing tensors

    def busy(self) -> bool:
        return self.owner is not None and self.owner() is not None

    def stale(self, decoder: Decoder) -> bool:
        """The decoder's experts were replaced (a benchmark's next engine) or its routing reads other
        tensors: the graph would read freed or wrong memory."""
        return self.experts() is not decoder.experts or self.routing_key != decoder.routing.graph_key


_POOLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # decoder -> {length: PooledStep}


def captures(decoder: Decoder, batch: int) -> bool:
    """Whether decode steps of `batch` rows are captured: on CUDA, graphs not switched off, a
    routing that stays on the device. Experts routed on the device: the whole step is one graph;
    experts the host drives (offloaded runners): the device work between MoE calls, in pieces."""
    return (decoder.device.type == "cuda" and decoder.cuda_graphs and getattr(decoder.routing, "device_only", False)
            and decoder.experts is not None)


def whole_step(decoder: Decoder, batch: int) -> bool:
    experts = decoder.experts
    return hasattr(experts, "capturable") and experts.capturable(batch)


def capture_kind(decoder: Decoder, batch: int) -> str:
    """How decode steps of `batch` rows run: "step" (one graph), "pieces" (graphs between MoE calls) or "eager"."""
    if not captures(decoder, batch):
        return "eager"
    return "step" if whole_step(decoder, batch) else "pieces"


class Stepper:
    """Runs one sequence's decode steps: captured (a pooled cache and graph) or eager (its own cache)."""

    def __init__(self, decoder: Decoder, owner: Any, needed: int) -> None:
        self.decoder = decoder
        length = cache_length(decoder, needed)
        self.pooled: PooledStep | None = None
        if captures(decoder, 1):
            self.pooled = self.claim(owner, length)
        if self.pooled is not None:
            self.cache, self.inputs = self.pooled.cache, self.pooled.inputs
        else:
            self.cache = decoder.new_cache(1, length)
            self.inputs = StepInputs(1, decoder.device)
        bind = getattr(decoder.routing, "bind_position", None)
        if bind is not None:  # a routing that reads per-position tables (a replayed trace) reads them at the step's position
            bind(self.inputs.pos)

    def claim(self, owner: Any, length: int) -> PooledStep | None:
        pool = _POOLS.setdefault(self.decoder, {})
        for key in [k for k, e in pool.items() if e.stale(self.decoder)]:
            del pool[key]
        entry = pool.get(length)
        if entry is not None and entry.busy():
            return None  # another live session holds it: this one runs uncaptured on its own cache
        if entry is None:
            for key in [k for k, e in pool.items() if not e.busy()]:
                del pool[key]  # one shape at a time: idle caches of other lengths are freed first
            if self.decoder.device.type == "cuda":
                torch.cuda.empty_cache()
            entry = pool[length] = PooledStep(self.decoder, length)
        entry.owner = weakref.ref(owner)
        return entry

    def run(self, tokens: Sequence[int] | torch.Tensor, position: int) -> torch.Tensor:
        """Logits [1, V] of one decode step at `position` (a fresh tensor: the graph's own is reused)."""
        self.inputs.load(tokens, position)
        if self.pooled is None:
            return self.decoder.decode(self.inputs.ids, self.inputs.pos, self.cache)
        if self.pooled.graph is None:
            try:
                self.pooled.graph = capture_step(self.decoder, self.cache, self.inputs)
            except (torch.cuda.OutOfMemoryError, MemoryError):
                raise
            except Exception as exc:  # noqa: BLE001 - a step that cannot be captured still runs, eagerly
                log.warning("decode steps run uncaptured from now on: capture failed (%s: %s)", type(exc).__name__, exc)
                self.decoder.cuda_graphs, self.pooled = False, None
                return self.decoder.decode(self.inputs.ids, self.inputs.pos, self.cache)
        return self.pooled.graph.replay().clone()

    @property
    def captured(self) -> bool:
        return self.pooled is not None
