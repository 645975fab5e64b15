"""DeepSeek-V2: multi-head latent attention, group-limited routing, always-on shared experts, leading dense layers."""
from typing import Any

from daop.config import (LatentAttentionConfig, ModelConfig, RopeConfig, common_fields, rope_params, rope_type,
                         yarn_mscale)
from daop.model.specs import FamilySpec

ROUTER_KINDS = {"greedy": "softmax_topk", "group_limited_greedy": "group_limited"}


def softmax_scale(raw: dict, rope: RopeConfig) -> float:
    """1/sqrt(query head dim), times yarn's mscale(mscale_all_dim) squared when the rope is yarn."""
    scale = (int(raw["qk_nope_head_dim"]) + int(raw["qk_rope_head_dim"])) ** -0.5
    mscale_all_dim = rope_params(raw).get("mscale_all_dim")
    if rope.kind == "yarn" and mscale_all_dim:
        scale *= yarn_mscale(rope.factor, mscale_all_dim) ** 2
    return scale


def deepseek_config(raw: dict, name: str, family: str, rope_interleave: bool, rope_in_float32: bool,
                    **routing: Any) -> ModelConfig:
    """The ModelConfig of a DeepSeek-V2 or V3 config.json, given the family's routing fields."""
    if rope_type(raw) not in ("default", "yarn"):
        raise ValueError(f"rope type {rope_type(raw)!r} is not supported for {name} (supported: default, yarn)")
    fields = common_fields(raw)
    q_lora_rank = raw.get("q_lora_rank")
    bias = bool(raw.get("attention_bias", False))
    dense_layers = int(raw.get("first_k_dense_replace", 0))
    fields["head_dim"] = int(raw["qk_rope_head_dim"])  # the rotated part of each head
    return ModelConfig(
        family=family,
        num_experts=int(raw["n_routed_experts"]),
        expert_intermediate_size=int(raw["moe_intermediate_size"]),
        router_in_float32=True,
        routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
        expert_groups=int(raw.get("n_group") or 1),
        top_groups=int(raw.get("topk_group") or 1),
        qkv_bias=bias,
        o_bias=bias,
        shared_expert_intermediate_size=int(raw.get("n_shared_experts") or 0) * int(raw["moe_intermediate_size"]),
        shared_expert_gated=False,
        dense_intermediate_size=int(raw["intermediate_size"]),
        moe_layers=tuple(i >= dense_layers for i in range(int(raw["num_hidden_layers"]))),
        latent_attention=LatentAttentionConfig(
            q_lora_rank=None if q_lora_rank is None else int(q_lora_rank),
            kv_lora_rank=int(raw["kv_lora_rank"]),
            nope_head_dim=int(raw["qk_nope_head_dim"]),
            v_head_dim=int(raw["v_head_dim"]),
            softmax_scale=softmax_scale(raw, fields["rope"]),
            rope_interleave=rope_interleave,
            rope_in_float32=rope_in_float32,
        ),
        **routing,
        **fields,
    )


def config_from_hf(raw: dict) -> ModelConfig:
    method = raw.get("topk_method", "greedy")
    if method not in ROUTER_KINDS:
        raise ValueError(f"topk_method {method!r} is not supported (supported: {', '.join(ROUTER_KINDS)})")
    # transformers' DeepseekV2 router never renormalises the top-k weights, whatever norm_topk_prob says
    return deepseek_config(raw, "DeepSeek-V2", "deepseek_v2", rope_interleave=True, rope_in_float32=True,
                           router_kind=ROUTER_KINDS[method], norm_topk_prob=False)


SPEC = FamilySpec(
    name="DeepSeek-V2",
    model_type="deepseek_v2",
    architecture="DeepseekV2ForCausalLM",
    config_from_hf=config_from_hf,
    shared_expert_prefix="shared_experts",
)
