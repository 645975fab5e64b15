"""Full-size model geometries with synthetic weights, for speed measurements without checkpoints.

Real checkpoints of these sizes cannot be downloaded here, so the dense part is random on the GPU
and the experts are a few random prototypes copied into the host store (timing does not depend on
their values). Routing comes from the random routers unless a routing source replaces it.
"""
from __future__ import annotations

import torch

from daop.config import ModelConfig
from daop.errors import DaopError
from daop.model.decoder import Decoder
from daop.model.specs import spec_by_name
from daop.quant import ExpertFormat
from daop.weights.expert_store import HostExperts

GEOMETRIES: dict[str, dict] = {
    "tiny-mixtral": dict(model_type="mixtral", vocab_size=8192, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                         num_experts_per_tok=2, rope_theta=1e4, max_position_embeddings=1024, rms_norm_eps=1e-5),
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                         num_experts_per_tok=2, rope_theta=1e6, max_position_embeddings=32768, rms_norm_eps=1e-5),
    "phi-3.5-moe": dict(model_type="phimoe", vocab_size=32064, hidden_size=4096, intermediate_size=6400,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=16,
                        num_experts_per_tok=2, rope_theta=1e4, max_position_embeddings=4096, rms_norm_eps=1e-5,
                        attention_bias=True, lm_head_bias=True),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, moe_intermediate_size=768,
                          intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                          head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, rope_theta=1e6,
                          max_position_embeddings=40960, rms_norm_eps=1e-6),
    # DeepSeek-V2-Lite's config.json: latent attention (kv_lora_rank 512, no q compression), 64 routed
    # experts (top 6) and 2 shared ones per layer after one dense layer, yarn rope
    "deepseek-v2-lite": dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                             moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
                             num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6,
                             routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
                             qk_nope_head_dim=128, v_head_dim=128, topk_method="greedy", n_group=1, topk_group=1,
                             first_k_dense_replace=1, norm_topk_prob=False, max_position_embeddings=163840,
                             rms_norm_eps=1e-6, rope_theta=10000.0,
                             rope_scaling=dict(type="yarn", factor=40, beta_fast=32, beta_slow=1, mscale=0.707,
                                               mscale_all_dim=0.707, original_max_position_embeddings=4096)),
    # gpt-oss-20b's config.json: 32 experts (top 4) with biases and the clamped SwiGLU, attention sinks,
    # 128-token sliding windows on every other layer, yarn rope without truncation
    "gpt-oss-20b": dict(model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880,
                        num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                        num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
                        layer_types=["sliding_attention", "full_attention"] * 12, attention_bias=True,
                        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=150000.0, swiglu_limit=7.0,
                        rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                                          original_max_position_embeddings=4096)),
}


def geometry_config(name: str, layers: int | None = None) -> tuple[ModelConfig, object]:
    if name not in GEOMETRIES:
        raise DaopError(f"unknown geometry {name!r}; choose one of {', '.join(GEOMETRIES)}")
    raw = dict(GEOMETRIES[name])
    if layers is not None:
        if not 1 <= layers <= raw["num_hidden_layers"]:
            raise DaopError(f"--layers {layers} must be between 1 and {raw['num_hidden_layers']} for {name}")
        raw["num_hidden_layers"] = layers
        if "layer_types" in raw:
            raw["layer_types"] = raw["layer_types"][:layers]
    spec = spec_by_name(raw["model_type"])
    return spec.config_from_hf(raw), spec


def synthetic_decoder(config: ModelConfig, spec, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Decoder:
    """A decoder whose dense weights are random (std 0.02; norms 1, biases 0) on `device`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    decoder = Decoder(config, spec, device, dtype)
    for name, t in decoder.dense_tensors().items():
        if "norm" in name and name.endswith("weight"):
            t.fill_(1.0)
        elif name.endswith("bias"):
            t.zero_()
        else:
            t.normal_(0.0, 0.02, generator=gen)
    return decoder


def synthetic_host_experts(config: ModelConfig, fmt: ExpertFormat | torch.dtype, pin: bool, seed: int = 0,
                           prototypes: int = 4) -> HostExperts:
    """Host store filled from a few random prototype experts (fast even for ~100 GB of experts),
    in the given stored format (prototypes quantized once), with the model's expert biases if it has them."""
    fmt = ExpertFormat.of(fmt).for_model(config)
    host = HostExperts(config, fmt, pin)
    gen = torch.Generator().manual_seed(seed)
    I, D = config.expert_intermediate_size, config.hidden_size
    biases = fmt.shapes(D, I)[fmt.num_weights:]
    protos = [(*fmt.from_float(*(torch.randn(*shape, generator=gen) * 0.02 for shape in ((2 * I, D), (D, I)))),
               *(torch.randn(*shape, generator=gen).to(dtype) * 0.02 for shape, dtype in biases))
              for _ in range(prototypes)]
    for n, layer_idx in enumerate(host.layers):
        for e in range(config.num_experts):
            for dst, src in zip(host.weights(layer_idx, e), protos[(n * config.num_experts + e) % prototypes]):
                dst.copy_(src)
    return host


def synthetic_model(geometry: str, layers: int | None, device: torch.device,
                    dtype: torch.dtype) -> tuple[ModelConfig, Decoder, HostExperts]:
    """A geometry's config, its random decoder on `device` and its host experts in `dtype` (pinned on CUDA)."""
    config, spec = geometry_config(geometry, layers)
    return config, synthetic_decoder(config, spec, device, dtype), synthetic_host_experts(config, dtype, pin=device.type == "cuda")
