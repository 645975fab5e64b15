"""Mixtral: RMSNorm, softmax top-k router with renormalised weights, SwiGLU experts w1/w3/w2."""
from daop.config import ModelConfig, common_fields
from daop.model.specs import FamilySpec


def config_from_hf(raw: dict) -> ModelConfig:
    return ModelConfig(
        family="mixtral",
        num_experts=int(raw["num_local_experts"]),
        expert_intermediate_size=int(raw["intermediate_size"]),
        norm_topk_prob=True,
        **common_fields(raw),
    )


SPEC = FamilySpec(
    name="Mixtral",
    model_type="mixtral",
    architecture="MixtralForCausalLM",
    config_from_hf=config_from_hf,
    moe_prefix="block_sparse_moe",
    expert_proj=("w1", "w3", "w2"),
)
