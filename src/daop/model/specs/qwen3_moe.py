"""Qwen3-MoE: per-head q/k RMSNorm, no shared expert, norm_topk_prob from config."""
from daop.config import ModelConfig, common_fields, num_routed_experts
from daop.model.specs import FamilySpec
from daop.model.specs.qwen2_moe import moe_layer_pattern


def config_from_hf(raw: dict) -> ModelConfig:
    bias = bool(raw.get("attention_bias", False))
    return ModelConfig(
        family="qwen3_moe",
        num_experts=num_routed_experts(raw),
        expert_intermediate_size=int(raw["moe_intermediate_size"]),
        norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
        router_weights_in_hidden_dtype=True,
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="head",
        dense_intermediate_size=int(raw.get("intermediate_size", 0)),
        moe_layers=moe_layer_pattern(raw),
        **common_fields(raw),
    )


SPEC = FamilySpec(
    name="Qwen3-MoE", model_type="qwen3_moe", architecture="Qwen3MoeForCausalLM", config_from_hf=config_from_hf
)
