"""Model configuration: one frozen dataclass, mapped from a Hugging Face config.json in one place.

Non-goal: covering every field transformers knows; only what the supported families need. Fields a
family does not use keep neutral defaults, so the generic decoder reads one shape of config.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daop.errors import DaopError


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (default, Phi-style "longrope" or "yarn")."""

    theta: float = 10000.0
    kind: str = "default"
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    original_max_positions: int = 0
    attention_factor: float | None = None  # for short contexts (Phi: short_mscale)
    long_attention_factor: float | None = None  # for long contexts (Phi: long_mscale)
    factor: float = 1.0  # yarn: context extension over original_max_positions
    beta_fast: float = 32.0  # yarn: rotations bounding the dimensions kept as trained ...
    beta_slow: float = 1.0  # ... and those interpolated by factor
    truncate: bool = True  # yarn: round that range outward to whole dimensions


@dataclass(frozen=True)
class LatentAttentionConfig:
    """DeepSeek-V2 multi-head latent attention: low-rank q and a compressed kv latent shared by all heads.

    Each head's query and key are a non-rotated part (nope_head_dim) followed by a rotated part
    (ModelConfig.head_dim, shared by all heads on the key side); values have v_head_dim."""

    q_lora_rank: int | None  # None: q is one projection of the hidden state
    kv_lora_rank: int
    nope_head_dim: int
    v_head_dim: int
    softmax_scale: float  # 1/sqrt(nope_head_dim + head_dim), more with yarn (transformers' yarn_apply_mscale)
    rope_interleave: bool = True  # the rotated part holds (x0, x1), (x2, x3), .. pairs, not two halves
    rope_in_float32: bool = True  # rotated in float32 at every model dtype (DeepSeek-V2), else in the model dtype


@dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs to know about a checkpoint's architecture."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    max_positions: int
    norm_eps: float
    rope: RopeConfig = field(default_factory=RopeConfig)
    norm_kind: str = "rms"  # "rms" or "layer" (LayerNorm with bias)
    router_kind: str = "softmax_topk"  # or "sparsemixer", "group_limited" (DeepSeek-V2), "sigmoid_group_limited" (V3),
    # "topk_softmax" (gpt-oss: softmax over the top-k logits)
    norm_topk_prob: bool = True
    router_weights_in_hidden_dtype: bool = False
    router_in_float32: bool = False  # router weight kept and applied in float32 at every model dtype
    router_jitter_eps: float = 0.0
    routed_scaling_factor: float = 1.0
    expert_groups: int = 1  # group-limited routers: experts split into expert_groups groups ...
    top_groups: int = 1  # ... of which the top_groups best may be chosen from
    router_score_bias: bool = False  # a float32 bias [E] per router, added to the scores only to choose experts
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"  # "none", "head" (per head, Qwen3) or "full" (whole projection, OLMoE)
    clip_qkv: float | None = None
    lm_head_bias: bool = False
    tie_word_embeddings: bool = False
    shared_expert_intermediate_size: int = 0
    shared_expert_gated: bool = True  # Qwen2-MoE's sigmoid gate on the shared expert
    dense_intermediate_size: int = 0
    moe_layers: tuple[bool, ...] = ()
    sliding_window: int | None = None  # a window the engine does not mask: it caps the context instead
    layer_windows: tuple[int, ...] = ()  # per layer, keys within this many positions (0: all); masked, not capped
    attention_sinks: bool = False  # a learned logit per query head in every softmax denominator (gpt-oss)
    router_logit_bias: bool = False  # the router is a linear layer with a bias (gpt-oss)
    expert_bias: bool = False  # routed experts' gate_up and down products have biases (gpt-oss)
    expert_glu: tuple[float, float] | None = None  # (alpha, limit): gpt-oss's clamped SwiGLU; None: silu(gate) * up
    latent_attention: LatentAttentionConfig | None = None
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def context_length(self) -> int:
        """Longest sequence the engine runs exactly (a sliding window caps it)."""
        if self.sliding_window and self.sliding_window < self.max_positions:
            return int(self.sliding_window)
        return self.max_positions

    def layer_window(self, layer_idx: int) -> int:
        """Keys a query of this layer attends to, counting itself (0: every earlier position)."""
        return self.layer_windows[layer_idx] if self.layer_windows else 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.moe_layers[layer_idx] if self.moe_layers else True

    def moe_layer_ids(self) -> list[int]:
        """The layers with routed experts, ascending."""
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object file, turning every failure into a DaopError naming the file."""
    if not path.is_file():
        raise DaopError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DaopError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DaopError(f"{path}: expected a JSON object at the top level")
    return data


def load_config(model_dir: Path) -> ModelConfig:
    """Read config.json of a checkpoint folder and map it through its family spec."""
    from daop.model.specs import spec_for

    path = model_dir / "config.json"
    raw = read_json(path, "config.json")
    spec = spec_for(raw, path)
    try:
        return spec.config_from_hf(raw)
    except KeyError as exc:
        raise DaopError(f"{path}: missing field {exc.args[0]!r} required for {spec.name}") from exc
    except (TypeError, ValueError) as exc:
        raise DaopError(f"{path}: invalid value ({exc})") from exc


def rope_params(raw: dict[str, Any]) -> dict[str, Any]:
    """Rope parameters of transformers 5 (rope_parameters) over those of transformers 4 (rope_scaling)."""
    return {**(raw.get("rope_scaling") or {}), **(raw.get("rope_parameters") or {})}


def rope_type(raw: dict[str, Any]) -> str:
    """The rope type a config.json names, in either transformers 4 or 5 spelling; "default" if none."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    return params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's scale for a context extended `factor` times (1 when not extended), as transformers computes it."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_from_hf(raw: dict[str, Any], theta: float) -> RopeConfig:
    """YaRN parameters with transformers' defaults (original context: max_position_embeddings)."""
    merged = rope_params(raw)
    max_positions = int(raw.get("max_position_embeddings", 4096))
    original = int(merged.get("original_max_position_embeddings",
                              raw.get("original_max_position_embeddings", max_positions)))
    factor = float(merged.get("factor") or max_positions / original)
    attention = merged.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = merged.get("mscale"), merged.get("mscale_all_dim")
        both = mscale and mscale_all_dim
        attention = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim) if both else yarn_mscale(factor)
    return RopeConfig(theta=theta, kind="yarn", original_max_positions=original, attention_factor=float(attention),
                      factor=factor, beta_fast=float(merged.get("beta_fast") or 32),
                      beta_slow=float(merged.get("beta_slow") or 1), truncate=bool(merged.get("truncate", True)))


def rope_from_hf(raw: dict[str, Any]) -> RopeConfig:
    """Rotary parameters from either transformers 4 (rope_theta, rope_scaling) or 5 (rope_parameters)."""
    params = raw.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = rope_type(raw)
    merged = rope_params(raw)
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "yarn":
        return yarn_from_hf(raw, theta)
    if kind != "longrope":
        raise ValueError(f"rope type {kind!r} is not supported (supported: default, longrope, yarn)")
    mscale = merged.get("attention_factor", merged.get("short_mscale"))
    long_mscale = merged.get("attention_factor", merged.get("long_mscale"))
    return RopeConfig(
        theta=theta,
        kind="longrope",
        short_factor=tuple(float(x) for x in merged["short_factor"]),
        long_factor=tuple(float(x) for x in merged["long_factor"]),
        original_max_positions=int(
            merged.get("original_max_position_embeddings", raw.get("original_max_position_embeddings", 0))
        ),
        attention_factor=None if mscale is None else float(mscale),
        long_attention_factor=None if long_mscale is None else float(long_mscale),
    )


def eos_ids(raw: dict[str, Any]) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(x) for x in (eos if isinstance(eos, list) else [eos]))


def common_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """Fields every supported family spells the same way in config.json."""
    hidden = int(raw["hidden_size"])
    heads = int(raw["num_attention_heads"])
    return dict(
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        top_k=int(raw["num_experts_per_tok"]),
        max_positions=int(raw.get("max_position_embeddings", 4096)),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope=rope_from_hf(raw),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        sliding_window=raw.get("sliding_window") if raw.get("use_sliding_window", True) else None,
        torch_dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids(raw),
    )


def num_routed_experts(raw: dict[str, Any]) -> int:
    """Routed experts per layer: `num_experts` in original checkpoints, `num_local_experts` in some re-saves."""
    if "num_experts" in raw:
        return int(raw["num_experts"])
    return int(raw["num_local_experts"])
