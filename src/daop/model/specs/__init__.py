"""Family specs: how a Hugging Face config.json and tensor names map onto the generic decoder.

A new family is a small module here: a config mapping plus the names of its MoE tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from daop.config import ModelConfig
from daop.errors import DaopError


@dataclass(frozen=True)
class FamilySpec:
    """Config mapping and tensor naming of one model family."""

    name: str
    model_type: str
    architecture: str
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    moe_prefix: str = "mlp"
    expert_proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared_expert_prefix: str = "shared_expert"
    router_prefix: str = "gate"
    stacked_experts: bool = False  # experts stored as per-layer tensors over all experts (gpt-oss)

    def layer(self, layer_idx: int) -> str:
        return f"model.layers.{layer_idx}"

    def router_name(self, layer_idx: int) -> str:
        return f"{self.layer(layer_idx)}.{self.moe_prefix}.{self.router_prefix}.weight"

    def router_logit_bias_name(self, layer_idx: int) -> str:
        """The bias of a linear router (gpt-oss's)."""
        return f"{self.layer(layer_idx)}.{self.moe_prefix}.{self.router_prefix}.bias"

    def router_bias_name(self, layer_idx: int) -> str:
        """The router's score bias (DeepSeek-V3's e_score_correction_bias)."""
        return f"{self.layer(layer_idx)}.{self.moe_prefix}.gate.e_score_correction_bias"

    def expert_names(self, layer_idx: int, expert_idx: int) -> tuple[str, str, str]:
        """Names of (gate, up, down) weights of one routed expert."""
        base = f"{self.layer(layer_idx)}.{self.moe_prefix}.experts.{expert_idx}"
        return tuple(f"{base}.{proj}.weight" for proj in self.expert_proj)  # type: ignore[return-value]


def _registry() -> dict[str, FamilySpec]:
    from daop.model.specs import deepseek_v2, deepseek_v3, gpt_oss, mixtral, olmoe, phimoe, qwen2_moe, qwen3_moe

    specs = [mixtral.SPEC, phimoe.SPEC, qwen2_moe.SPEC, qwen3_moe.SPEC, olmoe.SPEC, deepseek_v2.SPEC, deepseek_v3.SPEC,
             gpt_oss.SPEC]
    return {s.model_type: s for s in specs}


def spec_for(raw: dict[str, Any], path: Path | str = "config.json") -> FamilySpec:
    """The spec for a config.json's model_type, or a DaopError listing the supported ones."""
    registry = _registry()
    model_type = raw.get("model_type")
    if model_type in registry:
        return registry[model_type]
    supported = ", ".join(f"{s.architecture} ({s.model_type})" for s in registry.values())
    found = model_type or (raw.get("architectures") or ["<none>"])[0]
    raise DaopError(f"{path}: unsupported architecture {found!r}; supported: {supported}")


def spec_by_name(model_type: str) -> FamilySpec:
    return _registry()[model_type]
