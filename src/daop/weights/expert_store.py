"""Expert store: host copies of every routed expert (pinned once when CUDA exists) and a fixed
pool of GPU expert slots. Nothing here allocates per move; executors copy between the two.
Shapes: E experts, I intermediate, D hidden, S slots.
"""
from __future__ import annotations

import torch

from daop.config import ModelConfig


class HostExperts:
    """Every routed expert in host memory: three tensors per MoE layer, allocated (and pinned) once."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, pin: bool) -> None:
        E, I, D = config.num_experts, config.expert_intermediate_size, config.hidden_size
        layers = [i for i in range(config.num_layers) if config.is_moe_layer(i)]

        def host(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, dtype=dtype, pin_memory=pin)

        self.gate = {l: host(E, I, D) for l in layers}
        self.up = {l: host(E, I, D) for l in layers}
        self.down = {l: host(E, D, I) for l in layers}
        self.pinned = pin

    def weights(self, layer_idx: int, expert_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.gate[layer_idx][expert_idx], self.up[layer_idx][expert_idx], self.down[layer_idx][expert_idx]


class ExpertStore:
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device, num_slots: int,
                 host: HostExperts | None = None) -> None:
        E, I, D = config.num_experts, config.expert_intermediate_size, config.hidden_size
        self.host = host or HostExperts(config, dtype, pin=device.type == "cuda")
        self.slot_gate = torch.empty(num_slots, I, D, dtype=dtype, device=device)
        self.slot_up = torch.empty(num_slots, I, D, dtype=dtype, device=device)
        self.slot_down = torch.empty(num_slots, D, I, dtype=dtype, device=device)
        self.num_slots = num_slots
        self.expert_bytes = 3 * I * D * torch.empty((), dtype=dtype).element_size()

    def host_weights(self, layer_idx: int, expert_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.host.weights(layer_idx, expert_idx)

    def slot_weights(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.slot_gate[slot], self.slot_up[slot], self.slot_down[slot]
