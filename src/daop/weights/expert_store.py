"""Expert store: host copies of every routed expert (pinned once when CUDA exists) and a fixed
pool of GPU expert slots. Nothing here allocates per move; executors copy between the two.

Gate and up are kept stacked as one gate_up [2I, D] matrix per expert, on the host and in the
slots: the CPU reads an expert's first two projections in one pass, and host, slot and resident
experts all run the same `swiglu`. The loader fills the two halves from the checkpoint's separate
tensors through `load_views`.
Shapes: E experts, I intermediate, D hidden, S slots.
"""
from __future__ import annotations

import torch

from daop.config import ModelConfig
from daop.model.moe import split_gate_up


class HostExperts:
    """Every routed expert in host memory: gate_up [E, 2I, D] and down [E, D, I] per MoE layer,
    allocated (and pinned) once."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, pin: bool) -> None:
        E, I, D = config.num_experts, config.expert_intermediate_size, config.hidden_size
        layers = [i for i in range(config.num_layers) if config.is_moe_layer(i)]

        def host(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, dtype=dtype, pin_memory=pin)

        self.gate_up = {l: host(E, 2 * I, D) for l in layers}
        self.down = {l: host(E, D, I) for l in layers}
        self.pinned = pin

    def weights(self, layer_idx: int, expert_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, D], down [D, I]) of one expert, as `swiglu` and the slots take them."""
        return self.gate_up[layer_idx][expert_idx], self.down[layer_idx][expert_idx]

    def load_views(self, layer_idx: int, expert_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate, up, down) destinations for the checkpoint's three tensors of one expert."""
        return (*split_gate_up(self.gate_up[layer_idx][expert_idx]), self.down[layer_idx][expert_idx])


class ExpertStore:
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device, num_slots: int,
                 host: HostExperts | None = None) -> None:
        I, D = config.expert_intermediate_size, config.hidden_size
        self.host = host or HostExperts(config, dtype, pin=device.type == "cuda")
        self.slot_gate_up = torch.empty(num_slots, 2 * I, D, dtype=dtype, device=device)
        self.slot_down = torch.empty(num_slots, D, I, dtype=dtype, device=device)
        self.num_slots = num_slots
        self.expert_bytes = 3 * I * D * torch.empty((), dtype=dtype).element_size()

    def host_weights(self, layer_idx: int, expert_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.host.weights(layer_idx, expert_idx)

    def load_views(self, layer_idx: int, expert_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.host.load_views(layer_idx, expert_idx)

    def slot_weights(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.slot_gate_up[slot], self.slot_down[slot]
