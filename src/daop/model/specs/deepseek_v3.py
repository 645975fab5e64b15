"""DeepSeek-V3: DeepSeek-V2's latent attention, shared experts and dense layers, with a sigmoid router
whose score bias steers only the choice of experts (groups ranked by their two best biased scores)."""
from daop.config import ModelConfig
from daop.model.specs import FamilySpec
from daop.model.specs.deepseek_v2 import deepseek_config


def config_from_hf(raw: dict) -> ModelConfig:
    # transformers' DeepseekV3 rotates in the model dtype, and reads neither topk_method nor scoring_func
    return deepseek_config(raw, "DeepSeek-V3", "deepseek_v3", rope_interleave=bool(raw.get("rope_interleave", True)),
                           rope_in_float32=False, router_kind="sigmoid_group_limited", router_score_bias=True,
                           norm_topk_prob=bool(raw.get("norm_topk_prob", True)))


SPEC = FamilySpec(
    name="DeepSeek-V3",
    model_type="deepseek_v3",
    architecture="DeepseekV3ForCausalLM",
    config_from_hf=config_from_hf,
    shared_expert_prefix="shared_experts",
)
