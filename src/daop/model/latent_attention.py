"""DeepSeek-V2/V3 multi-head latent attention (MLA), as transformers' DeepseekV2Attention and
DeepseekV3Attention compute it (V3 rotates pairs or, without rope_interleave, two halves).

The KV cache holds what all heads share, per position: the normed kv latent [B, 1, S, r] (as the
cache's keys) and the rotated key part [B, 1, S, d_r] (as its values). Each step expands the cached
latents into per-head keys and values with kv_b_proj. Non-goal: the absorbed form (attention in
latent space), which is faster at long contexts but reorders the arithmetic.
Shapes: B batch, T new tokens, S cached positions, D hidden, H heads, r kv_lora_rank, n the
non-rotated and d_r the rotated part of a query/key head, v value head dim.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from daop.config import ModelConfig
from daop.model.layers import KVCache, Norm, apply_rotary, attend


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """x [..., d] reordered from pairs (x0, x1), (x2, x3), .. to (x0, x2, .., x1, x3, ..).

    DeepSeek-V2 (and V3 with rope_interleave) rotates adjacent pairs; rotating the two halves of the
    reordered vector (apply_rotary) is the same rotation, and a score q.k does not change when q
    and k are reordered alike, so the cache keeps rotated keys in this order."""
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


class LatentAttention:
    """Low-rank (or plain) query projection, compressed kv latent, rotary on the d_r part only."""

    def __init__(self, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        assert config.latent_attention is not None
        c, m = config, config.latent_attention
        self.c, self.m = c, m
        self.qk_dim = m.nope_head_dim + c.head_dim
        q_out = c.num_heads * self.qk_dim

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, device=device, dtype=dtype)

        def bias(size: int) -> torch.Tensor | None:
            return empty(size) if c.qkv_bias else None

        # transformers builds the two latent norms with RMSNorm's default eps, not rms_norm_eps
        latent_norm = replace(c, norm_kind="rms", norm_eps=1e-6)
        rank = m.q_lora_rank
        self.q_proj = empty(q_out, c.hidden_size) if rank is None else None
        self.q_a_proj = empty(rank, c.hidden_size) if rank else None
        self.q_a_bias = bias(rank) if rank else None
        self.q_a_norm = Norm(rank, latent_norm, device, dtype) if rank else None
        self.q_b_proj = empty(q_out, rank) if rank else None
        self.kv_a_proj = empty(m.kv_lora_rank + c.head_dim, c.hidden_size)
        self.kv_a_bias = bias(m.kv_lora_rank + c.head_dim)
        self.kv_a_norm = Norm(m.kv_lora_rank, latent_norm, device, dtype)
        self.kv_b_proj = empty(c.num_heads * (m.nope_head_dim + m.v_head_dim), m.kv_lora_rank)
        self.o_proj = empty(c.hidden_size, c.num_heads * m.v_head_dim)
        self.o_bias = empty(c.hidden_size) if c.o_bias else None

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        named = {"q_proj": (self.q_proj, None), "q_a_proj": (self.q_a_proj, self.q_a_bias),
                 "q_b_proj": (self.q_b_proj, None), "kv_a_proj_with_mqa": (self.kv_a_proj, self.kv_a_bias),
                 "kv_b_proj": (self.kv_b_proj, None), "o_proj": (self.o_proj, self.o_bias)}
        out: dict[str, torch.Tensor] = {}
        for name, (weight, bias) in named.items():
            if weight is not None:
                out[f"{prefix}.{name}.weight"] = weight
            if bias is not None:
                out[f"{prefix}.{name}.bias"] = bias
        if self.q_a_norm is not None:
            out.update(self.q_a_norm.tensors(f"{prefix}.q_a_layernorm"))
        out.update(self.kv_a_norm.tensors(f"{prefix}.kv_a_layernorm"))
        return out

    def query(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_proj is not None:
            return F.linear(x, self.q_proj)
        low_rank = self.q_a_norm(F.linear(x, self.q_a_proj, self.q_a_bias))  # type: ignore[misc, arg-type]
        return F.linear(low_rank, self.q_b_proj)  # type: ignore[arg-type]

    def __call__(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache,
        layer_idx: int,
        start: int | torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Same contract as Attention.__call__."""
        c, m = self.c, self.m
        B, T, _ = x.shape
        H, n = c.num_heads, m.nope_head_dim
        q = self.query(x).view(B, T, H, self.qk_dim)
        latent, k_rot = F.linear(x, self.kv_a_proj, self.kv_a_bias).split((m.kv_lora_rank, c.head_dim), dim=-1)
        # the queries' rotated parts and the shared key part, rotated in one pass (in the tables'
        # dtype, float32 for DeepSeek-V2, then rounded once): [B, T, H + 1, d_r]
        to_rotate = torch.cat((q[..., n:], k_rot[:, :, None]), dim=2)
        if m.rope_interleave:
            to_rotate = deinterleave(to_rotate)
        rotated = apply_rotary(to_rotate, cos, sin).to(x.dtype)
        q = torch.cat((q[..., :n], rotated[:, :, :H]), dim=-1).transpose(1, 2)  # [B, H, T, n + d_r]
        k_rot = rotated[:, :, H:].transpose(1, 2)  # [B, 1, T, d_r]
        latents, k_rots = cache.write(layer_idx, start, self.kv_a_norm(latent)[:, None], k_rot)
        S = latents.shape[2]
        kv = F.linear(latents[:, 0], self.kv_b_proj).view(B, S, H, n + m.v_head_dim).transpose(1, 2)
        k_nope, values = kv.split((n, m.v_head_dim), dim=-1)  # [B, H, S, n], [B, H, S, v]
        keys = torch.cat((k_nope, k_rots.expand(B, H, S, c.head_dim)), dim=-1)
        out = attend(q, keys, values, mask, m.softmax_scale)
        return F.linear(out.transpose(1, 2).reshape(B, T, H * m.v_head_dim), self.o_proj, self.o_bias)
