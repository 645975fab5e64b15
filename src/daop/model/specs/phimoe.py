"""Phi-3.5-MoE: LayerNorm with bias, biased attention and lm_head, sparsemixer top-2 router."""
from daop.config import ModelConfig, common_fields
from daop.model.specs import FamilySpec


def config_from_hf(raw: dict) -> ModelConfig:
    fields = common_fields(raw)
    fields["norm_eps"] = float(raw.get("rms_norm_eps", 1e-5))
    if fields["top_k"] != 2:
        raise ValueError(f"num_experts_per_tok={fields['top_k']}: the sparsemixer router is defined for top-2 only")
    bias = bool(raw.get("attention_bias", True))
    return ModelConfig(
        family="phimoe",
        num_experts=int(raw["num_local_experts"]),
        expert_intermediate_size=int(raw["intermediate_size"]),
        norm_kind="layer",
        router_kind="sparsemixer",
        router_jitter_eps=float(raw.get("router_jitter_noise", 0.01)),
        qkv_bias=bias,
        o_bias=bias,
        lm_head_bias=bool(raw.get("lm_head_bias", True)),
        **fields,
    )


SPEC = FamilySpec(
    name="Phi-3.5-MoE",
    model_type="phimoe",
    architecture="PhimoeForCausalLM",
    config_from_hf=config_from_hf,
    moe_prefix="block_sparse_moe",
    expert_proj=("w1", "w3", "w2"),
)
