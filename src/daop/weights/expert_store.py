"""Expert store: host copies of every routed expert (pinned once when CUDA exists) and a fixed
pool of GPU expert slots. Nothing here allocates per move; executors copy between the two.
Shapes: E experts, I intermediate, D hidden, S slots.
"""
from __future__ import annotations

import torch

from daop.config import ModelConfig


class ExpertStore:
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device, num_slots: int) -> None:
        E, I, D = config.num_experts, config.expert_intermediate_size, config.hidden_size
        pin = device.type == "cuda"
        layers = [i for i in range(config.num_layers) if config.is_moe_layer(i)]

        def host(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, dtype=dtype, pin_memory=pin)

        self.host_gate = {l: host(E, I, D) for l in layers}
        self.host_up = {l: host(E, I, D) for l in layers}
        self.host_down = {l: host(E, D, I) for l in layers}
        self.slot_gate = torch.empty(num_slots, I, D, dtype=dtype, device=device)
        self.slot_up = torch.empty(num_slots, I, D, dtype=dtype, device=device)
        self.slot_down = torch.empty(num_slots, D, I, dtype=dtype, device=device)
        self.num_slots = num_slots
        self.expert_bytes = 3 * I * D * torch.empty((), dtype=dtype).element_size()
        self.pinned = pin

    def host_weights(self, layer_idx: int, expert_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.host_gate[layer_idx][expert_idx], self.host_up[layer_idx][expert_idx], self.host_down[layer_idx][expert_idx]

    def slot_weights(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.slot_gate[slot], self.slot_up[slot], self.slot_down[slot]
