"""OLMoE: q/k RMSNorm over the whole projection, optional clip_qkv, softmax top-k router."""
from daop.config import ModelConfig, common_fields, num_routed_experts
from daop.model.specs import FamilySpec


def config_from_hf(raw: dict) -> ModelConfig:
    bias = bool(raw.get("attention_bias", False))
    clip = raw.get("clip_qkv")
    return ModelConfig(
        family="olmoe",
        num_experts=num_routed_experts(raw),
        expert_intermediate_size=int(raw["intermediate_size"]),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        router_weights_in_hidden_dtype=True,
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="full",
        clip_qkv=None if clip is None else float(clip),
        **common_fields(raw),
    )


SPEC = FamilySpec(name="OLMoE", model_type="olmoe", architecture="OlmoeForCausalLM", config_from_hf=config_from_hf)
