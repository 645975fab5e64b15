"""Where a layer's expert choice comes from: the model's own routers, or an injected source.

The decoder asks its `Routing` for every MoE layer's experts; offloading runners that look ahead
ask the same object for the next layer's prediction (layer l+1's router on layer l's normed
input, paper section 2.4), and for the one after it (layer l+2's router on the same input). Benchmarks replay a trained model's routing and observers (routing
statistics, trace recording) wrap the model's routing; none of them is a field the model checks
in its hot path. Shapes: N tokens, D hidden, E experts, K top-k.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from daop.config import ModelConfig
from daop.model.moe import select_experts


class Routing(Protocol):
    """Expert choice per layer; `begin` is told the cache position and length of every forward."""

    def begin(self, start: int, num_new: int) -> None: ...

    def route(self, layer_idx: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids [N, K] and weights [N, K] of layer_idx for its normed input h [N, D]."""
        ...

    def predict(self, layer_idx: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits [N, E], ids [N, K] and weights [N, K] predicted for layer_idx from the
        previous layer's normed input h [N, D]."""
        ...

    def predict_ahead(self, layer_idx: int, h: torch.Tensor) -> torch.Tensor | None:
        """Expert ids [N, K] predicted for layer_idx from the normed input h [N, D] of the MoE layer
        two before it (copies get two layers of lead), or None where this source has no such
        prediction (a trace recorded without it). Optional: runners treat a source without it as None."""
        ...


class ModelRouting:
    """The checkpoint's routers, applied as the family defines them."""

    device_only = True  # nothing read from the host per step: a decode step may be captured
    graph_key = ("model routers",)  # a captured step reads the decoder's own router tensors

    def __init__(self, config: ModelConfig, routers: dict[int, torch.Tensor],
                 biases: dict[int, torch.Tensor] | None = None,
                 logit_biases: dict[int, torch.Tensor] | None = None) -> None:
        """routers: each MoE layer's router weight [E, D]; biases: its score bias [E], for routers with one;
        logit_biases: the bias [E] of a linear router (added to the logits)."""
        self.config, self.routers, self.biases = config, routers, biases or {}
        self.logit_biases = logit_biases or {}

    def begin(self, start: int, num_new: int) -> None:
        pass

    def logits(self, layer_idx: int, h: torch.Tensor) -> torch.Tensor:
        """Router logits [N, E], in the router's dtype (float32 where the family keeps it so)."""
        router = self.routers[layer_idx]
        return F.linear(h.to(router.dtype), router, self.logit_biases.get(layer_idx))

    def route(self, layer_idx: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return select_experts(self.config, self.logits(layer_idx, h), self.biases.get(layer_idx))

    def predict(self, layer_idx: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.logits(layer_idx, h)
        return (logits, *select_experts(self.config, logits, self.biases.get(layer_idx)))

    def predict_ahead(self, layer_idx: int, h: torch.Tensor) -> torch.Tensor:
        return self.predict(layer_idx, h)[1]  # the same router, on an earlier layer's input
