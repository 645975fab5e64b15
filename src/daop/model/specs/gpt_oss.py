"""gpt-oss: attention with per-head sinks and biases on every projection, sliding-window layers between
full ones, a biased linear router (softmax over the top-k logits), experts with biases and a clamped
SwiGLU, stored stacked per layer (`daop.weights.stacked_experts`, MXFP4 or float)."""
from daop.config import ModelConfig, common_fields
from daop.model.specs import FamilySpec

LAYER_TYPES = ("sliding_attention", "full_attention")
# transformers' GptOssConfig defaults: what a config.json without rope fields gets
DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}
DEFAULT_THETA = 150000.0


def layer_windows(raw: dict) -> tuple[int, ...]:
    """Each layer's window: sliding_window for "sliding_attention", 0 (every position) for "full_attention";
    without layer_types, transformers' default (even layers slide)."""
    layers = int(raw["num_hidden_layers"])
    types = raw.get("layer_types") or [LAYER_TYPES[i % 2] for i in range(layers)]
    if len(types) != layers or any(t not in LAYER_TYPES for t in types):
        raise ValueError(f"layer_types must list {layers} entries of {', '.join(LAYER_TYPES)}, got {types!r}")
    window = raw.get("sliding_window")
    if "sliding_attention" in types and (not isinstance(window, int) or window < 1):
        raise ValueError(f"sliding_window must be a positive integer for sliding_attention layers, got {window!r}")
    return tuple(window if t == "sliding_attention" else 0 for t in types)


def with_rope_defaults(raw: dict) -> dict:
    if raw.get("rope_parameters") or raw.get("rope_scaling"):
        return {"rope_theta": DEFAULT_THETA, **raw}
    return {**raw, "rope_parameters": {**DEFAULT_ROPE, "rope_theta": raw.get("rope_theta", DEFAULT_THETA)}}


def config_from_hf(raw: dict) -> ModelConfig:
    method = (raw.get("quantization_config") or {}).get("quant_method")
    if method not in (None, "mxfp4"):
        raise ValueError(f"quantization_config.quant_method {method!r} is not supported for gpt-oss (supported: mxfp4)")
    fields = common_fields(with_rope_defaults(raw))
    fields.update(norm_eps=float(raw.get("rms_norm_eps", 1e-5)), sliding_window=None)
    bias = bool(raw.get("attention_bias", True))
    return ModelConfig(
        family="gpt_oss",
        num_experts=int(raw["num_local_experts"]),
        expert_intermediate_size=int(raw["intermediate_size"]),
        router_kind="topk_softmax",
        norm_topk_prob=False,
        router_logit_bias=True,
        qkv_bias=bias,
        o_bias=bias,
        layer_windows=layer_windows(raw),
        attention_sinks=True,
        expert_bias=True,
        expert_glu=(float(raw.get("swiglu_alpha", 1.702)), float(raw.get("swiglu_limit", 7.0))),
        **fields,
    )


SPEC = FamilySpec(
    name="gpt-oss",
    model_type="gpt_oss",
    architecture="GptOssForCausalLM",
    config_from_hf=config_from_hf,
    router_prefix="router",
    stacked_experts=True,
)
