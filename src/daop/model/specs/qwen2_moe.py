"""Qwen2-MoE (Qwen1.5-MoE): biased q/k/v, shared expert with a sigmoid gate, optional dense layers."""
from daop.config import ModelConfig, common_fields, num_routed_experts
from daop.model.specs import FamilySpec


def moe_layer_pattern(raw: dict) -> tuple[bool, ...]:
    """Which layers are sparse: not in mlp_only_layers and on the decoder_sparse_step grid."""
    step = int(raw.get("decoder_sparse_step", 1))
    dense = set(raw.get("mlp_only_layers") or [])
    return tuple(
        i not in dense and num_routed_experts(raw) > 0 and (i + 1) % step == 0
        for i in range(int(raw["num_hidden_layers"]))
    )


def config_from_hf(raw: dict) -> ModelConfig:
    return ModelConfig(
        family="qwen2_moe",
        num_experts=num_routed_experts(raw),
        expert_intermediate_size=int(raw["moe_intermediate_size"]),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        router_weights_in_hidden_dtype=True,
        qkv_bias=bool(raw.get("qkv_bias", True)),
        shared_expert_intermediate_size=int(raw.get("shared_expert_intermediate_size", 0)),
        dense_intermediate_size=int(raw.get("intermediate_size", 0)),
        moe_layers=moe_layer_pattern(raw),
        **common_fields(raw),
    )


SPEC = FamilySpec(
    name="Qwen2-MoE", model_type="qwen2_moe", architecture="Qwen2MoeForCausalLM", config_from_hf=config_from_hf
)
