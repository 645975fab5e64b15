"""Expert store: host copies of every routed expert (pinned once when CUDA exists) and a fixed
pool of GPU expert slots. Nothing here allocates per move; executors copy between the two.

An expert is a tuple of tensors in its format (`daop.quant`): (gate_up [2I, D], down [D, I]) in the
model's dtype, or int8 / int4 weights with their scales. Gate and up are kept stacked as one gate_up
matrix per expert, on the host and in the slots: the CPU reads an expert's first two projections in
one pass, and host, slot and resident experts all run the same `expert_forward`. The loader fills the
two halves from the checkpoint's separate tensors through `load_views` (quantizing as it reads, for
a low-bit format), or, for a folder already quantized, its four stored tensors through `stored_views`.
Shapes: E experts, I intermediate, D hidden, S slots.
"""
from __future__ import annotations

import torch

from daop.config import ModelConfig
from daop.model.moe import split_gate_up
from daop.quant import (ExpertFormat, copy_into_slot, grouped_experts, grouped_on_device, routed_experts, routes_on_device,
                        slot_shapes, stacked_swiglu, stacks_on_cpu)
from daop.weights.expert_views import ScratchBuffers, staged_views, stored_views


class HostExperts:
    """Every routed expert in host memory: per MoE layer, each of the format's tensors stacked over
    the E experts, allocated (and pinned) once."""

    def __init__(self, config: ModelConfig, fmt: ExpertFormat, pin: bool) -> None:
        self.fmt = fmt
        self.hidden, self.inter = config.hidden_size, config.expert_intermediate_size
        E = config.num_experts
        shapes = self.fmt.shapes(self.hidden, self.inter)
        self.tensors = {l: [torch.empty(E, *shape, dtype=dtype, pin_memory=pin) for shape, dtype in shapes]
                        for l in config.moe_layer_ids()}
        zero_biases(self.fmt, self.tensors)
        self.pinned = pin
        self.scratch = ScratchBuffers(self.fmt.dtype)
        self.stored_scratch: dict = {}  # host buffers for stored tensors converted as they are committed

    def release_load_buffers(self) -> None:
        """Free the loader's scratch once every expert is in (a quantizing load keeps one expert's float tensors)."""
        self.scratch, self.stored_scratch = ScratchBuffers(self.fmt.dtype), {}

    @property
    def layers(self) -> list[int]:
        return list(self.tensors)

    def weights(self, layer_idx: int, expert_idx: int) -> tuple[torch.Tensor, ...]:
        """One expert's tensors in its format, as `expert_forward` and the slots take them."""
        return tuple(t[expert_idx] for t in self.tensors[layer_idx])

    def load_views(self, layer_idx: int, expert_idx: int) -> tuple:
        """(gate, up, down) destinations for the checkpoint's three tensors of one expert, then for a
        biased format (gate bias, up bias, down bias)."""
        w = self.weights(layer_idx, expert_idx)
        biases = self.fmt.bias_views(w, self.inter)
        if not self.fmt.quantized:
            return (*split_gate_up(w[0]), w[1], *biases)
        return (*staged_views(self.fmt, lambda: w, self.scratch, self.hidden, self.inter), *biases)

    def stored_views(self, layer_idx: int, expert_idx: int) -> tuple:
        """Destinations for one expert's stored tensors (a quantized folder): the expert's own tensors,
        through a converting buffer where this CPU's int4 layout is not the folder's."""
        return stored_views(self.fmt, self.weights(layer_idx, expert_idx), self.stored_scratch, self.hidden, self.inter)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self.tensors.values() for t in ts)


def zero_biases(fmt: ExpertFormat, tensors: dict[int, list[torch.Tensor]]) -> None:
    """Biases start at zero: int4's padded rows are never loaded and must stay zero."""
    if fmt.biased:
        for stacked in tensors.values():
            for t in stacked[fmt.num_weights:]:
                t.zero_()


class ExpertStore:
    def __init__(self, config: ModelConfig, fmt: ExpertFormat, device: torch.device, num_slots: int,
                 host: HostExperts | None = None) -> None:
        I, D = config.expert_intermediate_size, config.hidden_size
        self.host = host or HostExperts(config, fmt, pin=device.type == "cuda")
        self.fmt = self.host.fmt
        self.slots = [torch.empty(num_slots, *shape, dtype=dtype, device=device)
                      for shape, dtype in slot_shapes(self.fmt, D, I, device)]
        self.num_slots = num_slots
        self.hidden, self.inter = D, I
        self.expert_bytes = self.fmt.bytes(D, I)

    def host_weights(self, layer_idx: int, expert_idx: int) -> tuple[torch.Tensor, ...]:
        return self.host.weights(layer_idx, expert_idx)

    def load_views(self, layer_idx: int, expert_idx: int) -> tuple:
        return self.host.load_views(layer_idx, expert_idx)

    def stored_views(self, layer_idx: int, expert_idx: int) -> tuple[torch.Tensor, ...]:
        return self.host.stored_views(layer_idx, expert_idx)

    def slot_weights(self, slot: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[slot] for t in self.slots)

    def release_load_buffers(self) -> None:
        self.host.release_load_buffers()


class ResidentExperts:
    """All routed experts of every layer held as stacked tensors on one device (the all-GPU path).

    A low-bit expert bound for a GPU is quantized on the host as the loader reads it, then copied
    (and converted to the device's layout) once its three tensors are in; the host copy is freed."""

    def __init__(self, config: ModelConfig, device: torch.device, fmt: ExpertFormat) -> None:
        self.fmt = fmt
        self.hidden, self.inter, self.device = config.hidden_size, config.expert_intermediate_size, device
        E = config.num_experts
        shapes = slot_shapes(self.fmt, self.hidden, self.inter, device)
        self.tensors = {l: [torch.empty(E, *shape, dtype=dtype, device=device) for shape, dtype in shapes]
                        for l in config.moe_layer_ids()}
        zero_biases(self.fmt, self.tensors)
        self.scratch = ScratchBuffers(self.fmt.dtype)
        self.stored_scratch: dict = {}

    def reset(self) -> None:
        pass

    def release_load_buffers(self) -> None:
        """Free the loader's scratch once every expert is in."""
        self.scratch, self.stored_scratch = ScratchBuffers(self.fmt.dtype), {}

    def set_phase(self, phase: str) -> None:
        pass

    def totals(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass

    def weights_of(self, layer_idx: int, expert_idx: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[expert_idx] for t in self.tensors[layer_idx])

    def fill_from(self, host: HostExperts) -> None:
        """Copy every expert from a filled host store."""
        for l in self.tensors:
            for e in range(self.tensors[l][0].shape[0]):
                for dst, src in zip(self.weights_of(l, e), host.weights(l, e)):
                    copy_into_slot(dst, src)

    def load_views(self, layer_idx: int, expert_idx: int) -> tuple:
        """(gate, up, down) destinations for the checkpoint's three tensors of one expert, then for a
        biased format (gate bias, up bias, down bias), which are written in place."""
        w = self.weights_of(layer_idx, expert_idx)
        biases = self.fmt.bias_views(w, self.inter)
        if not self.fmt.quantized:
            return (*split_gate_up(w[0]), w[1], *biases)
        if self.device.type == "cpu":
            return (*staged_views(self.fmt, lambda: w, self.scratch, self.hidden, self.inter), *biases)
        pending: list[tuple[torch.Tensor, ...]] = []
        parts = [0]
        weight_shapes = self.fmt.shapes(self.hidden, self.inter)[:self.fmt.num_weights]

        def host_copy() -> tuple[torch.Tensor, ...]:
            if not pending:
                pending.append(tuple(torch.empty(shape, dtype=dtype) for shape, dtype in weight_shapes))
            return pending[0]

        def done() -> None:
            parts[0] += 1
            if parts[0] == 3:
                for dst, src in zip(w, pending.pop()):
                    copy_into_slot(dst, src)

        return (*staged_views(self.fmt, host_copy, self.scratch, self.hidden, self.inter, done), *biases)

    def stored_views(self, layer_idx: int, expert_idx: int) -> tuple:
        """Destinations for one expert's stored tensors (a quantized folder): read straight into the
        device tensors, or through a host buffer where the device's layout differs (int4 on CUDA)."""
        return stored_views(self.fmt, self.weights_of(layer_idx, expert_idx), self.stored_scratch, self.hidden, self.inter)

    def capturable(self, batch: int) -> bool:
        """Whether a decode step of `batch` rows routes its experts on the device (no host sync):
        the GEMV kernel's few rows, or grouped products for more."""
        return routes_on_device(self.fmt, self.device, batch) or grouped_on_device(self.fmt, self.device, batch, self.hidden, self.inter)

    def __call__(self, layer_idx: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        from daop.model.moe import expert_inputs, group_by_expert, token_rows, weighted_sum
        from daop.quant import expert_forward

        if routes_on_device(self.fmt, self.device, h.shape[0]):
            return routed_experts(h, ids, weights, self.tensors[layer_idx])
        if grouped_on_device(self.fmt, self.device, h.shape[0], self.hidden, self.inter):  # prefill on CUDA: no host sync either
            return grouped_experts(h, ids, weights, self.tensors[layer_idx])
        rows_host = group_by_expert(ids.cpu())  # one sync per layer, grouping on the host
        rows = token_rows(h, rows_host)
        if stacks_on_cpu(self.fmt, h, self.hidden, self.inter, list(rows_host)):  # small bf16 experts on a CPU
            return weighted_sum(h, stacked_swiglu(h, rows_host, self.tensors[layer_idx]), weights, rows_host, rows)
        xs = expert_inputs(h, rows, rows_host)
        ys = {e: expert_forward(xs[e], self.weights_of(layer_idx, e), self.fmt.glu) for e in rows_host}
        return weighted_sum(h, ys, weights, rows_host, rows)
