"""The generic decoder: one implementation for every supported family, driven by ModelConfig.

Weights are plain tensors created empty on the target device and filled by the loader through
`dense_tensors()` (name -> destination). Routed experts live behind an ExpertRunner so that the
offloading runtime can replace the all-resident one without touching this file.
Shapes: B batch, T new tokens, D hidden, V vocab.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from daop.config import ModelConfig
from daop.model.latent_attention import LatentAttention
from daop.model.layers import Attention, KVCache, Norm, Rotary, additive_mask, attention_mask, decode_mask
from daop.model.moe import ExpertRunner, SharedExpert
from daop.model.routing import ModelRouting, Routing
from daop.model.specs import FamilySpec

CPU_ATTEND_POSITIONS = 64  # a CPU decode step attends over a multiple of this many positions (`Decoder.written_part`); 0: the whole cache


def written_length(pos: torch.Tensor, block: int) -> int:
    """The positions up to the furthest one in pos (host tensor), rounded up to a multiple of block."""
    return -(-(int(pos.max()) + 1) // block) * block


class DecoderLayer:
    def __init__(self, config: ModelConfig, layer_idx: int, device: torch.device, dtype: torch.dtype) -> None:
        c = config
        self.layer_idx = layer_idx
        self.is_moe = c.is_moe_layer(layer_idx)
        self.input_norm = Norm(c.hidden_size, c, device, dtype)
        self.post_norm = Norm(c.hidden_size, c, device, dtype)
        self.attn = (LatentAttention if c.latent_attention else Attention)(c, device, dtype)
        router_dtype = torch.float32 if c.router_in_float32 else dtype
        self.router = torch.empty(c.num_experts, c.hidden_size, device=device, dtype=router_dtype) if self.is_moe else None
        has_bias = self.is_moe and c.router_score_bias
        self.router_bias = torch.empty(c.num_experts, device=device, dtype=torch.float32) if has_bias else None
        has_logit_bias = self.is_moe and c.router_logit_bias
        self.router_logit_bias = torch.empty(c.num_experts, device=device, dtype=router_dtype) if has_logit_bias else None
        self.shared: SharedExpert | None = None
        if self.is_moe and c.shared_expert_intermediate_size:
            self.shared = SharedExpert(c.hidden_size, c.shared_expert_intermediate_size, c.shared_expert_gated, device, dtype)
        elif not self.is_moe:
            self.shared = SharedExpert(c.hidden_size, c.dense_intermediate_size, False, device, dtype)

    def tensors(self, spec: FamilySpec) -> dict[str, torch.Tensor]:
        p = spec.layer(self.layer_idx)
        out = {**self.input_norm.tensors(f"{p}.input_layernorm"), **self.post_norm.tensors(f"{p}.post_attention_layernorm")}
        out.update(self.attn.tensors(f"{p}.self_attn"))
        if self.router is not None:
            out[spec.router_name(self.layer_idx)] = self.router
        if self.router_bias is not None:
            out[spec.router_bias_name(self.layer_idx)] = self.router_bias
        if self.router_logit_bias is not None:
            out[spec.router_logit_bias_name(self.layer_idx)] = self.router_logit_bias
        if self.shared is not None and self.is_moe:
            shared = f"{p}.mlp.{spec.shared_expert_prefix}"
            out.update(self.shared.tensors(shared, f"{shared}_gate.weight"))
        elif self.shared is not None:
            out.update(self.shared.tensors(f"{p}.mlp"))
        return out


@dataclass
class Step:
    """Per-forward context shared by all layers. start: the first new position, an int, or for a
    decode step a position tensor [1] on the device (then the step has no host values in it)."""

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None  # boolean (True = attend); in a CUDA decode step additive (`additive_mask`)
    start: int | torch.Tensor
    cache: KVCache
    window_masks: dict[int, torch.Tensor | None] = field(default_factory=dict)  # by window, for sliding layers

    def mask_for(self, window: int) -> torch.Tensor | None:
        return self.window_masks[window] if window else self.mask


class Decoder:
    """Embedding, decoder layers, final norm and LM head of any supported family."""

    def __init__(self, config: ModelConfig, spec: FamilySpec, device: torch.device, dtype: torch.dtype) -> None:
        c = config
        self.config, self.spec, self.device, self.dtype = c, spec, device, dtype
        self.embed = torch.empty(c.vocab_size, c.hidden_size, device=device, dtype=dtype)
        self.layers = [DecoderLayer(c, i, device, dtype) for i in range(c.num_layers)]
        self.norm = Norm(c.hidden_size, c, device, dtype)
        self.lm_head = self.embed if c.tie_word_embeddings else torch.empty(c.vocab_size, c.hidden_size, device=device, dtype=dtype)
        self.lm_head_bias = torch.empty(c.vocab_size, device=device, dtype=dtype) if c.lm_head_bias else None
        self.rotary = Rotary(c.rope, c.head_dim, c.max_positions, device)
        self.windows = sorted({w for w in c.layer_windows if w})  # sliding layers' windows, masked per step
        # transformers rotates DeepSeek-V2's (not V3's) query and key parts in float32
        self.rotary_dtype = torch.float32 if c.latent_attention and c.latent_attention.rope_in_float32 else dtype
        self.experts: ExpertRunner | None = None
        self.cuda_graphs = True  # decode steps that stay on the device are captured (daop.runtime.decode_step)
        routers = {layer.layer_idx: layer.router for layer in self.layers if layer.router is not None}
        biases = {layer.layer_idx: layer.router_bias for layer in self.layers if layer.router_bias is not None}
        logit_biases = {layer.layer_idx: layer.router_logit_bias for layer in self.layers
                        if layer.router_logit_bias is not None}
        self.model_routing = ModelRouting(c, routers, biases, logit_biases)
        self.routing: Routing = self.model_routing  # replaced to replay or observe routing

    @contextmanager
    def routed_by(self, routing: Routing) -> Iterator[Routing]:
        """Route with `routing` (a replayed trace, an observer wrapping the model's routing) inside the block."""
        previous, self.routing = self.routing, routing
        try:
            yield routing
        finally:
            self.routing = previous

    def dense_tensors(self) -> dict[str, torch.Tensor]:
        """Every non-expert tensor by its checkpoint name."""
        out = {"model.embed_tokens.weight": self.embed, **self.norm.tensors("model.norm")}
        if not self.config.tie_word_embeddings:
            out["lm_head.weight"] = self.lm_head
        if self.lm_head_bias is not None:
            out["lm_head.bias"] = self.lm_head_bias
        for layer in self.layers:
            out.update(layer.tensors(self.spec))
        return out

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch, max_len, self.device, self.dtype)

    def begin(self, input_ids: torch.Tensor, start: int, cache: KVCache) -> tuple[torch.Tensor, Step]:
        """Embed input_ids [B, T] at cache position `start`; returns hidden [B, T, D] and the step context."""
        B, T = input_ids.shape
        positions = torch.arange(start, start + T, device=self.device).expand(B, T)
        cos, sin = self.rotary.cos_sin(positions, self.rotary_dtype, cache.max_len)
        windows = {w: attention_mask(start, T, self.device, w) for w in self.windows}
        step = Step(cos, sin, attention_mask(start, T, self.device), start, cache, windows)
        self.routing.begin(start, T)
        return F.embedding(input_ids.to(self.device), self.embed), step

    def begin_decode(self, input_ids: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, Step]:
        """Embed one token per row, input_ids [B, 1] on the device, at position pos [1] (every row) or
        pos [B] (a position per row: sequences of different lengths in one batch), a device tensor.

        Fixed shapes and no host values: rotary rows are gathered from a table, the cache is written
        at pos and read whole under a mask. Every decode step runs this, captured or not."""
        positions = pos.view(-1, 1).expand(input_ids.shape[0], 1)
        cos, sin = self.rotary.table(self.rotary_dtype, cache.max_len)
        cache = self.written_part(cache, pos)
        # on CUDA the masks are made additive once here, not by torch's attention in every layer
        # (sink attention takes the boolean mask)
        additive = self.device.type == "cuda" and not self.config.attention_sinks

        def mask(window: int = 0) -> torch.Tensor:
            m = decode_mask(pos, cache.max_len, window)
            return additive_mask(m, self.dtype) if additive else m

        windows = {w: mask(w) for w in self.windows}
        step = Step(cos[positions], sin[positions], mask(), pos, cache, windows)
        return F.embedding(input_ids, self.embed), step

    def written_part(self, cache: KVCache, pos: torch.Tensor) -> KVCache:
        """The cache a decode step attends over: on a CPU device (nothing captured; pos is on the host)
        its first positions up to the furthest one the step writes, rounded up to a multiple of
        CPU_ATTEND_POSITIONS; elsewhere the whole cache. torch's CPU attention gives that part's
        result bit for bit as it gives the whole cache's under the mask (its blocks of positions
        divide the multiple; `test_decode_attends_over_the_written_part_with_the_whole_caches_bits`),
        and a sequence's cache holds at least MIN_CACHE = 256 positions: a short request attended
        over 192 positions it had not written, and an 8-row step of the shipped model took 19.8
        against 18.2 ms (`scripts/cpu_attend_probe.py`, benchmarks/results/cpu-attend-written-part-
        2core.jsonl). The rotary table keeps the whole cache's length (a longrope
        model's choice depends on it). Sink and latent attention keep the whole cache."""
        c = self.config
        if self.device.type != "cpu" or not CPU_ATTEND_POSITIONS or c.attention_sinks or c.latent_attention is not None:
            return cache
        length = written_length(pos, CPU_ATTEND_POSITIONS)
        return cache.rows(0, cache.batch, length) if length < cache.max_len else cache

    def attention_block(self, layer: DecoderLayer, x: torch.Tensor, step: Step,
                        delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual stream after attention [B, T, D] and its post-attention norm (the MoE input).
        delta: the previous layer's FFN output, still to be added to x (with the input norm, and the
        attention's residual with the post-attention norm: one kernel each on CUDA, `Norm.add`)."""
        mask = step.mask_for(self.config.layer_window(layer.layer_idx))
        x, normed = layer.input_norm.add(x, delta) if delta is not None else (x, layer.input_norm(x))
        return layer.post_norm.add(x, layer.attn(normed, step.cos, step.sin, step.cache, layer.layer_idx, step.start, mask))

    def ffn_block(self, layer: DecoderLayer, normed: torch.Tensor) -> torch.Tensor:
        """MoE (routed experts plus optional shared expert) or dense MLP output [B, T, D]."""
        shape = normed.shape
        flat = normed.reshape(-1, shape[-1])
        if layer.router is None:
            return layer.shared(flat).view(shape)  # type: ignore[misc]
        ids, weights = self.routing.route(layer.layer_idx, flat)
        assert self.experts is not None, "no expert runner attached"
        return self.moe_output(layer, flat, self.experts(layer.layer_idx, flat, ids, weights)).view(shape)

    def moe_output(self, layer: DecoderLayer, flat: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        """A MoE layer's output [N, D]: the routed experts' sum plus the shared expert, if any."""
        return routed + layer.shared(flat) if layer.shared is not None else routed

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] in float32 from the last hidden states."""
        return F.linear(self.norm(x), self.lm_head, self.lm_head_bias).float()

    def run_layers(self, layers: list[DecoderLayer], x: torch.Tensor, step: Step,
                   delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layers on the residual stream x plus delta (an FFN output not added yet, or None): returns
        the stream and the last layer's FFN output, not added (the next norm adds it, `attention_block`)."""
        for layer in layers:
            x, normed = self.attention_block(layer, x, step, delta)
            delta = self.ffn_block(layer, normed)
        return x, delta

    def head_of(self, x: torch.Tensor, delta: torch.Tensor | None, all_logits: bool = False) -> torch.Tensor:
        """`head` of the stream x plus the last FFN output not added yet (delta, or None): every
        position's logits, or the last position's."""
        if not all_logits:
            x, delta = x[:, -1], None if delta is None else delta[:, -1]
        return self.head(x if delta is None else x + delta)

    def layers_and_head(self, x: torch.Tensor, step: Step, all_logits: bool = False) -> torch.Tensor:
        return self.head_of(*self.run_layers(self.layers, x, step), all_logits)

    @torch.inference_mode()
    def decode(self, input_ids: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decode step, everything on the device (see begin_decode): logits [B, V].
        The caller tells the routing the step's position (routing.begin) beforehand."""
        x, step = self.begin_decode(input_ids, pos, cache)
        return self.layers_and_head(x, step)

    @torch.inference_mode()
    def decode_and_prefill(self, input_ids: torch.Tensor, pos: torch.Tensor, cache: KVCache, prompt_ids: torch.Tensor,
                           start: int, prompt_cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step of rows (as `decode`) and a prompt chunk of one more sequence (as `forward`,
        prompt_ids [1, T] at `start` of prompt_cache) in one pass: each layer's attention runs apart,
        its FFN (routed experts and shared expert) once over the step's tokens and the chunk's, so an
        expert that both route to is read once. Experts act per token, so every token gets what it
        gets in a pass of its own. Returns the rows' logits [R, V] and the chunk's last position's [1, V].
        The caller sets the expert runner's phase (a prompt's: the pass holds many tokens)."""
        xd, sd = self.begin_decode(input_ids, pos, cache)
        xp, sp = self.begin(prompt_ids, start, prompt_cache)
        rows = xd.shape[0] * xd.shape[1]
        dd = dp = None
        for layer in self.layers:
            xd, nd = self.attention_block(layer, xd, sd, dd)
            xp, np_ = self.attention_block(layer, xp, sp, dp)
            both = torch.cat([nd.reshape(rows, -1), np_.reshape(-1, np_.shape[-1])])
            out = self.ffn_block(layer, both[None])[0]
            dd, dp = out[:rows].view(nd.shape), out[rows:].view(np_.shape)
        return self.head_of(xd, dd), self.head_of(xp, dp)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, start: int, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """Run T new tokens through the model; logits [B, T, V] or for the last position [B, V]."""
        x, step = self.begin(input_ids, start, cache)
        return self.layers_and_head(x, step, all_logits)
