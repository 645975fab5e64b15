"""Dense building blocks of the decoder: norms, rotary embeddings, attention, KV cache.

Shapes: B batch, T new tokens, S cached positions, D hidden, H query heads, G kv heads, d head dim.
Numerics follow the transformers implementations (RMSNorm in float32, rotary tables in float32).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from daop.config import ModelConfig, RopeConfig
from daop.kernels import fused


class Norm:
    """RMSNorm (weight only) or LayerNorm (weight and bias), by config.norm_kind."""

    def __init__(self, size: int, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.kind = config.norm_kind
        self.eps = config.norm_eps
        self.weight = torch.empty(size, device=device, dtype=dtype)
        self.bias = torch.empty(size, device=device, dtype=dtype) if self.kind == "layer" else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        if fused.enabled(x) and x.is_contiguous() and self.weight.dtype == x.dtype:
            return fused.rms_norm(x, self.weight, self.eps)  # the same arithmetic in one kernel
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def add(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual sum s = x + delta and its norm: (s, self(s)), in one kernel where it can be."""
        if (self.kind != "layer" and fused.enabled(x) and x.is_contiguous() and delta.is_contiguous()
                and delta.shape == x.shape and delta.dtype == x.dtype == self.weight.dtype):
            return fused.add_rms_norm(x, delta, self.weight, self.eps)
        s = x + delta
        return s, self(s)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.weight": self.weight}
        if self.bias is not None:
            out[f"{prefix}.bias"] = self.bias
        return out


def yarn_inv_freq(rope: RopeConfig, head_dim: int, wavelengths: torch.Tensor) -> torch.Tensor:
    """YaRN's frequencies [d/2] from the default wavelengths theta^(2i/d): the dimensions that turn
    less than beta_slow times over the original context are interpolated (divided by factor), those
    turning more than beta_fast times are kept, with a linear ramp between (transformers' arithmetic)."""

    def dimension(rotations: float) -> float:
        return head_dim * math.log(rope.original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = dimension(rope.beta_fast), dimension(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    kept = 1 - ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return 1.0 / (rope.factor * wavelengths) * (1 - kept) + 1.0 / wavelengths * kept


class Rotary:
    """Rotary position tables; 'longrope' picks short or long factors (and scale) from the sequence length.

    The choice is made once per sequence from its full length (prompt plus new tokens), so cached
    keys and new queries always share one rotation; transformers re-chooses per forward call and
    agrees with this whenever the sequence stays on one side of original_max_position_embeddings.
    """

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int, device: torch.device) -> None:
        self.rope = rope
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.device = device
        self._tables: dict[bool, tuple[torch.Tensor, float]] = {}
        self._rows: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _inv_freq(self, long: bool) -> tuple[torch.Tensor, float]:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        base = self.rope.theta**exponent
        scale = 1.0
        if self.rope.kind == "longrope":
            factors = torch.tensor(self.rope.long_factor if long else self.rope.short_factor, dtype=torch.float32)
            base = factors * base
            factor = self.max_positions / max(self.rope.original_max_positions, 1)
            given = self.rope.long_attention_factor if long else self.rope.attention_factor
            scale = given or (
                1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(self.rope.original_max_positions))
            )
        if self.rope.kind == "yarn":
            return yarn_inv_freq(self.rope, self.head_dim, base).to(self.device), float(self.rope.attention_factor or 1.0)
        return (1.0 / base).to(self.device), scale

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype, total_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [B, T, 1, d] for integer positions [B, T] (see apply_rotary)."""
        long = self.rope.kind == "longrope" and total_len > self.rope.original_max_positions
        if long not in self._tables:
            self._tables[long] = self._inv_freq(long)
        inv_freq, scale = self._tables[long]
        freqs = positions.float()[..., None, None] * inv_freq  # [B, T, 1, d/2]
        cos = (freqs.cos() * scale).to(dtype)
        sin = (freqs.sin() * scale).to(dtype)
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)

    def table(self, dtype: torch.dtype, total_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos_sin for every position below total_len, computed once: [total_len, 1, d] each.

        A decode step gathers its rows by a position tensor instead of computing them, so the step
        has no Python-int positions (it can be captured). The rows are cos_sin's, element for element."""
        key = (dtype, total_len, self.rope.kind == "longrope" and total_len > self.rope.original_max_positions)
        if key not in self._rows:
            positions = torch.arange(total_len, device=self.device)[:, None]
            self._rows[key] = tuple(t[:, 0] for t in self.cos_sin(positions, dtype, total_len))
        return self._rows[key]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, heads, d] by cos and signed sin [B, T, 1, d].

    The usual x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1): rolling x by
    half a head gives cat(x2, x1), and the sign moves into the sin table, so the products (and
    the result) are bitwise the same with two fewer kernels per call. On CUDA, one kernel
    (`daop.kernels.fused.rotary`) computes the same products and sum.
    """
    if fused.enabled(x) and fused.rotary_fits(x, cos, signed_sin):
        return fused.rotary(x, cos, signed_sin)
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class KVCache:
    """Preallocated keys and values for every layer: [B, G, S_max, d] each (see entry_shapes).

    Zero-filled: a decode step attends over all S_max positions with a mask (a fixed shape; on a CPU
    device over the written part, `Decoder.written_part`), and a masked position must hold a finite
    value (a zero weight times NaN is NaN)."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype):
        (kg, kd), (vg, vd) = self.entry_shapes(config)
        self.batch, self.max_len = batch, max_len
        self.keys = [torch.zeros(batch, kg, max_len, kd, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.values = [torch.zeros(batch, vg, max_len, vd, device=device, dtype=dtype) for _ in range(config.num_layers)]

    @staticmethod
    def entry_shapes(config: ModelConfig) -> tuple[tuple[int, int], tuple[int, int]]:
        """(heads, dim) of the keys and of the values per position: G kv heads of head_dim each, or
        for latent attention one compressed latent (kv_lora_rank) and one rotated key part
        (head_dim), both shared by all heads (see daop.model.latent_attention)."""
        latent = config.latent_attention
        if latent is not None:
            return (1, latent.kv_lora_rank), (1, config.head_dim)
        return (config.num_kv_heads, config.head_dim), (config.num_kv_heads, config.head_dim)

    @staticmethod
    def bytes_needed(config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype) -> int:
        (kg, kd), (vg, vd) = KVCache.entry_shapes(config)
        per = batch * max_len * (kg * kd + vg * vd) * torch.empty((), dtype=dtype).element_size()
        return config.num_layers * per

    def write(self, layer_idx: int, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new k, v [B, G, T, d] from `start`: an int (prefill, see update) or a decode step's
        position tensor (see write_at); returns the keys and values to attend over."""
        if isinstance(start, torch.Tensor):
            return self.write_at(layer_idx, start, k, v)
        return self.update(layer_idx, start, k, v)

    def update(self, layer_idx: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.keys[layer_idx][:, :, start:end] = k
        self.values[layer_idx][:, :, start:end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def write_at(self, layer_idx: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one new token's k, v [B, G, 1, d] at position pos [1] (every row) or pos [B] (one
        position per row), a device tensor; returns the whole cache."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if pos.numel() == 1:
            keys.index_copy_(2, pos, k)
            values.index_copy_(2, pos, v)
        elif keys.is_cuda:  # one kernel each: row b's entries land at position pos[b] (an expanded index, no copy)
            keys.scatter_(2, pos.view(-1, 1, 1, 1).expand_as(k), k)
            values.scatter_(2, pos.view(-1, 1, 1, 1).expand_as(v), v)
        else:  # torch's CPU scatter_ walks the whole cache in bf16 and fp16: at 4096 positions 0.29 ms against
            # 5.6 us per write for the shipped model's cache, 64 ms against 8.5 us for Mixtral's
            # (scripts/kv_write_probe.py, benchmarks/results/kv-write-2core-cpu.jsonl)
            rows = torch.arange(k.shape[0], device=pos.device)
            keys[rows, :, pos] = k[:, :, 0]
            values[rows, :, pos] = v[:, :, 0]
        return keys, values

    def rows(self, first: int, end: int, length: int | None = None) -> "KVCache":
        """A cache over rows [first, end) and the first `length` positions of this one (views:
        writes land here)."""
        length = length or self.max_len
        view = KVCache.__new__(KVCache)
        view.batch, view.max_len = end - first, length
        view.keys = [k[first:end, :, :length] for k in self.keys]
        view.values = [v[first:end, :, :length] for v in self.values]
        return view

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row src into row dst, in every layer."""
        for t in (*self.keys, *self.values):
            t[dst, :, :length] = t[src, :, :length]


class Attention:
    """Grouped-query self-attention with optional biases and q/k norms (per head or whole projection)."""

    def __init__(self, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        c = config
        self.c = c
        q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, device=device, dtype=dtype)

        # q, k and v projections are row blocks of one matrix (one product per step); the checkpoint's
        # separate tensors are loaded into these views
        self.split = (q_out, kv_out, kv_out)
        self.qkv_proj = empty(q_out + 2 * kv_out, c.hidden_size)
        self.q_proj, self.k_proj, self.v_proj = self.qkv_proj.split(self.split)
        self.qkv_bias = empty(q_out + 2 * kv_out) if c.qkv_bias else None
        self.q_bias, self.k_bias, self.v_bias = self.qkv_bias.split(self.split) if c.qkv_bias else (None, None, None)
        self.o_proj = empty(c.hidden_size, q_out)
        self.o_bias = empty(c.hidden_size) if c.o_bias else None
        self.sinks = empty(c.num_heads) if c.attention_sinks else None
        rms = ModelConfig(**{**c.__dict__, "norm_kind": "rms"})
        norm_size = {"head": (c.head_dim, c.head_dim), "full": (q_out, kv_out)}.get(c.qk_norm)
        self.q_norm = Norm(norm_size[0], rms, device, dtype) if norm_size else None
        self.k_norm = Norm(norm_size[1], rms, device, dtype) if norm_size else None

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name in ("q", "k", "v", "o"):
            out[f"{prefix}.{name}_proj.weight"] = getattr(self, f"{name}_proj")
            bias = getattr(self, f"{name}_bias")
            if bias is not None:
                out[f"{prefix}.{name}_proj.bias"] = bias
        if self.q_norm is not None and self.k_norm is not None:
            out.update(self.q_norm.tensors(f"{prefix}.q_norm"))
            out.update(self.k_norm.tensors(f"{prefix}.k_norm"))
        if self.sinks is not None:
            out[f"{prefix}.sinks"] = self.sinks
        return out

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
        """start: the first new position as an int (the cache up to the new tokens is read), or as a
        position tensor [T] (a decode step: the cache given is read whole, `mask` hides what is not yet written)."""
        c = self.c
        B, T, _ = x.shape
        H, G, d = c.num_heads, c.num_kv_heads, c.head_dim
        qkv = F.linear(x, self.qkv_proj, self.qkv_bias)
        if c.qk_norm == "none" and c.clip_qkv is None:  # q and k are adjacent: rotate both in one pass
            qk = qkv[..., : (H + G) * d].view(B, T, H + G, d)
            v = qkv[..., (H + G) * d:]
        else:
            q, k, v = qkv.split(self.split, dim=-1)
            if c.qk_norm == "full":
                q, k = self.q_norm(q), self.k_norm(k)  # type: ignore[misc]
            if c.clip_qkv is not None:
                q, k, v = (t.clamp(-c.clip_qkv, c.clip_qkv) for t in (q, k, v))
            q, k = q.reshape(B, T, H, d), k.reshape(B, T, G, d)
            if c.qk_norm == "head":
                q, k = self.q_norm(q), self.k_norm(k)  # type: ignore[misc]
            qk = torch.cat((q, k), dim=2)
        qk = apply_rotary(qk, cos, sin)
        q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)
        v = v.reshape(B, T, G, d).transpose(1, 2)
        keys, values = cache.write(layer_idx, start, k, v)
        if self.sinks is not None:
            out = sink_attention(q, keys, values, mask, self.sinks, c.head_dim**-0.5)
        else:
            out = attend(q, keys, values, mask, c.head_dim**-0.5, c.num_kv_heads != c.num_heads)
        out = out.transpose(1, 2).reshape(B, T, c.num_heads * c.head_dim)
        return F.linear(out, self.o_proj, self.o_bias)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float,
           gqa: bool = False) -> torch.Tensor:
    """torch's attention (q [B, H, T, d], keys and values [B, G, S, d]). A decode step (T = 1) in bf16
    or fp16 on a CPU device attends in float32 on the same values and rounds the output once: torch's
    bf16 CPU kernel took 1.2-4.2x float32's time (more rows and positions, more; on the 2-core test
    machine, which has AVX512-BF16), and float32 lands closer to a float64 reference. A prompt (T > 1)
    keeps the model's dtype: both take about the same time there (`scripts/cpu_attention_probe.py`)."""
    if mask is not None and mask.is_floating_point() and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)  # an additive mask made for the model's dtype (`additive_mask`)
    if q.device.type == "cpu" and q.shape[2] == 1 and q.dtype in (torch.bfloat16, torch.float16):
        mask = mask.float() if mask is not None and mask.dtype != torch.bool else mask
        out = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=mask, scale=scale,
                                             enable_gqa=gqa)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa)


def sink_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                   sinks: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention whose softmax has one more logit per head, sinks [H], that takes a share of the weight
    and no value (gpt-oss), as transformers' eager attention computes it. q [B, H, T, d], keys and
    values [B, G, S, d], mask [B or 1, 1, T, S] (True = attend) or None; returns [B, H, T, d]."""
    B, H, T, d = q.shape
    G, S = keys.shape[1], keys.shape[2]
    grouped = q.reshape(B, G, H // G * T, d)  # query heads sharing a kv head side by side
    scores = (grouped @ keys.transpose(-1, -2) * scale).view(B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    logits = torch.cat((scores, sinks.view(1, H, 1, 1).expand(B, H, T, 1).to(scores.dtype)), dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = torch.softmax(logits, dim=-1)[..., :-1].to(values.dtype)
    return (probs.reshape(B, G, H // G * T, S) @ values).view(B, H, T, d)


def attention_mask(start: int, num_new: int, device: torch.device, window: int = 0) -> torch.Tensor | None:
    """Boolean mask [1, 1, T, S] (True = attend): causal over the cache and, with a window, only the
    last `window` positions up to each query's own. Returns None when plain causal attention of a
    single token needs no mask."""
    total = start + num_new
    if num_new == 1 and not window:
        return None
    q_pos = torch.arange(start, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]  # [1, 1, T, S]
    if window:
        mask = mask & (k_pos > q_pos - window)[None, None]
    return mask


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask (True = attend) as the additive mask torch's attention makes of it
    on every call (0 where attended, -inf elsewhere, in the query's dtype): the same values, made
    once per decode step instead of once per layer (two small kernels each time on CUDA)."""
    return torch.full(mask.shape, float("-inf"), dtype=dtype, device=mask.device).masked_fill_(mask, 0.0)


def decode_mask(pos: torch.Tensor, max_len: int, window: int = 0) -> torch.Tensor:
    """Boolean mask [B or 1, 1, 1, S_max] (True = attend) for one new token at position pos [1] or,
    one per row, pos [B] (a device tensor): every written position up to pos (with a window, the
    last `window` of them)."""
    k_pos = torch.arange(max_len, device=pos.device)
    mask = (k_pos[None] <= pos[:, None])[:, None, None]
    if window:
        mask = mask & (k_pos[None] > pos[:, None] - window)[:, None, None]
    return mask
