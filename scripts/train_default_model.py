#!/usr/bin/env python3
"""Train a small Mixture-of-Experts language model, saved in Hugging Face layout.

By default this trains daop's default model (daop-moe-mini): a small Mixtral-architecture
MoE. ``--family`` selects the checkpoint format and the matching network:

  mixtral    (default) Mixtral: RMSNorm, GQA attention with RoPE, ``block_sparse_moe`` with a
             softmax top-k router (k weights renormalised to sum to one), experts w1/w3/w2.
  qwen3_moe  Qwen3-MoE: as Mixtral plus a per-head RMSNorm on queries and keys before RoPE;
             the router renormalises the top-k weights when ``--norm-topk-prob`` (default
             true); tensors ``mlp.gate`` and ``mlp.experts.{j}.{gate,up,down}_proj``;
             config fields num_experts, moe_intermediate_size, head_dim.
  phimoe     Phi-3.5-MoE: LayerNorm with bias, biased attention projections and lm_head, the
             sparsemixer top-2 router (trained with its Gumbel sampling and Heun-style
             gradient estimator, as transformers' PhimoeForCausalLM defines it in training
             mode; evaluated and saved for the inference rule), experts w1/w3/w2.

Plain PyTorch, self-contained (needs torch, numpy, safetensors). The network is written
out layer by layer: token embedding, N decoder layers of (norm -> GQA self-attention
with RoPE -> residual, norm -> sparse MoE -> residual), final norm, untied lm_head.
Experts are SwiGLU ``w2(silu(w1 x) * w3 x)``. With ``--moe-impl dense`` the forward
pass evaluates all experts on all tokens and multiplies by the (zero outside the top-k)
routing weights: for a tiny width and few experts a few large matrix products are faster
than gathering tokens per expert, and the result and gradients equal the sparse
computation exactly. ``--moe-impl sparse`` gathers each expert's tokens instead (for many
experts and a small top-k); ``auto`` picks dense when at least a quarter of the experts
are active per token. The Switch/Mixtral load-balancing loss is added per layer and
averaged over layers.

Training: fixed seed, random windows of ``--seq-len + 1`` tokens from the
pre-tokenized stream, bf16 autocast on CUDA (``--precision`` overrides), AdamW, linear
warm-up then a cosine decay whose progress is max(step / max_steps, elapsed / time
budget), so the run ends on a wall-clock budget with the learning rate at its floor.
One window in every ``--val-every-blocks`` blocks of the training stream is kept
out as a validation set; the checkpoint with the lowest validation loss is the
one saved. The held-out split (heldout.npy) is only scored, never used for choices.

Output folder (``--out``): config.json, generation_config.json, model.safetensors
(bf16, Hugging Face tensor names of the family), the tokenizer files copied from
``--tokenizer``, and train_log.json (loss every ``--log-every`` steps, evals,
summary with held-out perplexity).

    python3 scripts/train_default_model.py --data .data/tok --tokenizer .data/tokenizer \
        --out .data/ckpt --time-budget-s 420
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    vocab_size: int = 8192
    hidden_size: int = 128
    intermediate_size: int = 176
    num_hidden_layers: int = 32
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    router_aux_loss_coef: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2
    dropout: float = 0.0  # residual dropout, training only (not part of the HF config)
    family: str = "mixtral"  # checkpoint format: mixtral, qwen3_moe or phimoe
    norm_topk_prob: bool = True  # qwen3_moe: renormalise the top-k weights (mixtral always does)
    router_jitter_noise: float = 0.01  # phimoe: sparsemixer's jitter epsilon

FAMILIES = ("mixtral", "qwen3_moe", "phimoe")


# ---------------------------------------------------------------------------
# Model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(cfg: Config, dim: int) -> nn.Module:
    """RMSNorm, or LayerNorm with bias for phimoe (which reads its epsilon from rms_norm_eps)."""
    return nn.LayerNorm(dim, eps=cfg.rms_norm_eps) if cfg.family == "phimoe" else RMSNorm(dim, cfg.rms_norm_eps)


def rope_cache(cfg: Config, seq_len: int, device):
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=device) / cfg.head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # HF layout: rotate halves, not pairs
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        bias = cfg.family == "phimoe"
        self.q_proj = nn.Linear(h, cfg.num_attention_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=bias)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, h, bias=bias)
        if cfg.family == "qwen3_moe":  # per-head RMSNorm on queries and keys, before RoPE
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        c = self.cfg
        q = self.q_proj(x).view(B, T, c.num_attention_heads, c.head_dim)
        k = self.k_proj(x).view(B, T, c.num_key_value_heads, c.head_dim)
        if c.family == "qwen3_moe":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(B, T, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        cos, sin = cos[:T].to(q.dtype), sin[:T].to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = c.num_attention_heads // c.num_key_value_heads
        if rep > 1:  # HF repeat_kv: each KV head serves `rep` consecutive query heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SparseMixerMultiplier(torch.autograd.Function):
    """Phi-3.5-MoE's gradient estimator for a sampled expert (transformers' PhimoeMultiplier)."""

    @staticmethod
    def forward(ctx, scores, multiplier, selected, masked_gates, mask_for_one):
        ctx.save_for_backward(multiplier, selected, masked_gates)
        return multiplier * mask_for_one

    @staticmethod
    def backward(ctx, grad_out):
        multiplier, selected, masked_gates = ctx.saved_tensors
        grad_out = grad_out * multiplier
        grad_scores = masked_gates * grad_out.mul(-1)
        grad_scores.scatter_add_(dim=-1, index=selected, src=grad_out)
        return grad_scores, None, None, None, None


def sparsemixer(scores, jitter_eps: float, training: bool):
    """Phi-3.5-MoE's top-2 sparsemixer (transformers' `sparsemixer`): weights [N, 2], experts [N, 2].

    Each of the two rounds masks the scores that are relatively far below the round's maximum and
    takes a softmax over the rest; the weight is the chosen expert's share. In training the expert
    is Gumbel-sampled from that softmax and the weight's gradient follows SparseMixer's estimator.
    """
    weights, chosen = [], []
    remaining = scores
    for _ in range(2):
        with torch.no_grad():
            top, top_ind = remaining.max(dim=-1, keepdim=True)
            factor = scores.abs().clamp(min=top)
            far = ((top - scores) / factor) > (2 * jitter_eps)
        masked = remaining.masked_fill(far, float("-inf"))
        if training:
            gumbel = torch.empty_like(masked, memory_format=torch.legacy_contiguous_format).exponential_().log()
            sel = (masked - gumbel).max(dim=-1)[1].unsqueeze(-1)
        else:
            sel = top_ind
        gates = torch.softmax(masked, dim=-1)
        mult = gates.gather(dim=-1, index=sel)
        if training:
            best = gates.max(dim=-1, keepdim=True)[1]
            one = torch.logical_or(sel == best, torch.rand_like(mult) > 0.75)
            one = torch.add(0.3333, one, alpha=0.6667).type_as(gates)
            mult = SparseMixerMultiplier.apply(scores, mult, sel, gates, one)
        weights.append(mult)
        chosen.append(sel)
        remaining = torch.scatter(remaining, -1, sel, float("-inf"))
    return torch.cat(weights, dim=-1), torch.cat(chosen, dim=-1)


class SparseMoE(nn.Module):
    """The family's sparse MoE block. Expert weights stored stacked:
    w13[e] = cat(w1_e, w3_e) (2F x H), w2[e] (H x F)."""

    def __init__(self, cfg: Config, impl: str = "dense"):
        super().__init__()
        self.cfg = cfg
        self.impl = impl
        E, H, Fd = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        self.gate = nn.Linear(H, E, bias=False)
        self.w13 = nn.Parameter(torch.empty(E, 2 * Fd, H))
        self.w2 = nn.Parameter(torch.empty(E, H, Fd))

    def route(self, x2d):
        logits = F.linear(x2d.float(), self.gate.weight.float())
        probs = torch.softmax(logits, dim=-1)
        if self.cfg.family == "phimoe":
            top_w, top_i = sparsemixer(logits, self.cfg.router_jitter_noise, self.training)
            return logits, probs, top_w, top_i
        top_w, top_i = torch.topk(probs, self.cfg.num_experts_per_tok, dim=-1)
        if self.cfg.family == "mixtral" or self.cfg.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return logits, probs, top_w, top_i

    def experts_dense(self, x2d, top_w, top_i, probs):
        E, Fd, H = self.cfg.num_local_experts, self.cfg.intermediate_size, self.cfg.hidden_size
        dense_w = torch.zeros_like(probs).scatter(1, top_i, top_w)  # N x E, zero off the top-k
        h = F.linear(x2d, self.w13.reshape(E * 2 * Fd, H)).view(-1, E, 2 * Fd)
        g, u = h[..., :Fd], h[..., Fd:]
        a = F.silu(g) * u * dense_w.unsqueeze(-1).to(h.dtype)
        return F.linear(a.reshape(-1, E * Fd), self.w2.permute(1, 0, 2).reshape(H, E * Fd))

    def experts_sparse(self, x2d, top_w, top_i):
        """The (token, expert) pairs sorted by expert, one product per expert: the same sums as
        experts_dense at about k/E of its FLOPs."""
        Fd, k = self.cfg.intermediate_size, top_i.shape[1]
        flat = top_i.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.cfg.num_local_experts).tolist()
        tok = order // k
        xs = x2d.index_select(0, tok)
        ws = top_w.reshape(-1).index_select(0, order).unsqueeze(-1)
        outs = []
        # unbind once: indexing w13[e] per expert would make every backward step fill a whole-size gradient
        w13, w2 = self.w13.to(xs.dtype).unbind(0), self.w2.to(xs.dtype).unbind(0)
        for e, (xe, we) in enumerate(zip(xs.split(counts), ws.split(counts))):
            if xe.shape[0]:
                g, u = F.linear(xe, w13[e]).split(Fd, dim=-1)
                outs.append(F.linear(F.silu(g) * u, w2[e]) * we.to(xe.dtype))
        return x2d.new_zeros(x2d.shape).index_add(0, tok, torch.cat(outs))

    def forward(self, x):
        B, T, H = x.shape
        E = self.cfg.num_local_experts
        x2d = x.reshape(-1, H)
        _, probs, top_w, top_i = self.route(x2d)
        if self.impl == "sparse":
            y = self.experts_sparse(x2d, top_w, top_i)
        else:
            y = self.experts_dense(x2d, top_w, top_i, probs)
        # load-balancing loss (transformers' load_balancing_loss_func, one layer)
        # sum over the k slots of the share of tokens sent to each expert (a bincount, not an N x k x E one-hot)
        tokens_per_expert = torch.bincount(top_i.reshape(-1), minlength=E).to(probs.dtype) / top_i.shape[0]  # E
        prob_per_expert = probs.mean(dim=0)  # E
        aux = (tokens_per_expert * prob_per_expert).sum() * E
        return y.view(B, T, H), aux


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config, moe_impl: str = "dense"):
        super().__init__()
        self.input_layernorm = make_norm(cfg, cfg.hidden_size)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = make_norm(cfg, cfg.hidden_size)
        self.block_sparse_moe = SparseMoE(cfg, moe_impl)
        self.p = cfg.dropout

    def forward(self, x, cos, sin):
        a = self.self_attn(self.input_layernorm(x), cos, sin)
        x = x + F.dropout(a, self.p, self.training)
        m, aux = self.block_sparse_moe(self.post_attention_layernorm(x))
        x = x + F.dropout(m, self.p, self.training)
        return x, aux


class Mixtral(nn.Module):
    """The whole network (Mixtral's, or the Qwen3-MoE / Phi-3.5-MoE variant that cfg.family names)."""

    def __init__(self, cfg: Config, moe_impl: str = "dense"):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, moe_impl) for _ in range(cfg.num_hidden_layers))
        self.norm = make_norm(cfg, cfg.hidden_size)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.family == "phimoe")
        self.layer_fns = list(self.layers)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02):
        out_std = std / math.sqrt(2 * self.cfg.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith("o_proj.weight") or name.endswith(".w2"):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets=None):
        T = idx.shape[1]
        cos, sin = rope_cache(self.cfg, T, idx.device)
        x = self.embed_tokens(idx)
        aux_total = x.new_zeros((), dtype=torch.float32)
        for fn in self.layer_fns:
            x, aux = fn(x, cos, sin)
            aux_total = aux_total + aux
        x = self.norm(x)
        logits = self.lm_head(x)
        aux_mean = aux_total / self.cfg.num_hidden_layers
        if targets is None:
            return logits, aux_mean
        ce = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return ce, aux_mean

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under the family's Hugging Face names, bf16, contiguous."""
        c = self.cfg
        Fd = c.intermediate_size
        out: dict[str, torch.Tensor] = {}

        def put(name, t):
            out[name] = t.detach().to(torch.bfloat16).contiguous().cpu()

        def put_module(name, mod):  # weight, and bias where the module has one
            put(name + ".weight", mod.weight)
            if getattr(mod, "bias", None) is not None:
                put(name + ".bias", mod.bias)

        if c.family == "qwen3_moe":
            moe_prefix, proj = "mlp", ("gate_proj", "up_proj", "down_proj")
        else:
            moe_prefix, proj = "block_sparse_moe", ("w1", "w3", "w2")
        put("model.embed_tokens.weight", self.embed_tokens.weight)
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                put_module(p + f"self_attn.{n}", getattr(layer.self_attn, n))
            if c.family == "qwen3_moe":
                put(p + "self_attn.q_norm.weight", layer.self_attn.q_norm.weight)
                put(p + "self_attn.k_norm.weight", layer.self_attn.k_norm.weight)
            moe = layer.block_sparse_moe
            put(p + f"{moe_prefix}.gate.weight", moe.gate.weight)
            for e in range(c.num_local_experts):
                put(p + f"{moe_prefix}.experts.{e}.{proj[0]}.weight", moe.w13[e, :Fd])
                put(p + f"{moe_prefix}.experts.{e}.{proj[1]}.weight", moe.w13[e, Fd:])
                put(p + f"{moe_prefix}.experts.{e}.{proj[2]}.weight", moe.w2[e])
            put_module(p + "input_layernorm", layer.input_layernorm)
            put_module(p + "post_attention_layernorm", layer.post_attention_layernorm)
        put_module("model.norm", self.norm)
        put_module("lm_head", self.lm_head)
        return out


def param_counts(cfg: Config) -> dict[str, int]:
    H, Fd, E, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_hidden_layers
    attn = H * cfg.head_dim * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    norm = H  # one norm's parameters
    if cfg.family == "phimoe":  # attention biases; LayerNorm bias
        attn += cfg.head_dim * (cfg.num_attention_heads + cfg.num_key_value_heads) + H
        norm = 2 * H
    elif cfg.family == "qwen3_moe":  # q/k per-head norms
        attn += 2 * cfg.head_dim
    expert = 3 * H * Fd
    per_layer = attn + E * H + E * expert + 2 * norm
    emb = cfg.vocab_size * H
    head = emb + (cfg.vocab_size if cfg.family == "phimoe" else 0)
    total = emb + head + L * per_layer + norm
    active = emb + head + L * (attn + E * H + cfg.num_experts_per_tok * expert + 2 * norm) + norm
    return {
        "total": total,
        "active_per_token": active,
        "embedding": emb,
        "lm_head": head,
        "attention_per_layer": attn,
        "router_per_layer": E * H,
        "expert": expert,
        "experts_all_layers": L * E * expert,
        "non_expert": total - L * E * expert,
    }


def hf_config(cfg: Config) -> dict:
    """config.json of the family, as transformers writes it for such a model."""
    common = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "output_router_logits": False,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": None,
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
    }
    if cfg.family == "qwen3_moe":
        return {
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", **common,
            # dense MLP width, used only by mlp_only_layers (none here); set to the active expert width
            "intermediate_size": cfg.intermediate_size * cfg.num_experts_per_tok,
            "moe_intermediate_size": cfg.intermediate_size,
            "head_dim": cfg.head_dim,
            "attention_bias": False,
            "use_sliding_window": False,
            "max_window_layers": cfg.num_hidden_layers,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "num_experts": cfg.num_local_experts,
            "norm_topk_prob": cfg.norm_topk_prob,
        }
    if cfg.family == "phimoe":  # head_dim is hidden_size / num_attention_heads
        return {
            "architectures": ["PhimoeForCausalLM"], "model_type": "phimoe", **common,
            "intermediate_size": cfg.intermediate_size,
            "rope_scaling": None,
            "num_local_experts": cfg.num_local_experts,
            "router_jitter_noise": cfg.router_jitter_noise,
            "input_jitter_noise": 0.0,
            "attention_bias": True,
            "lm_head_bias": True,
        }
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **common,
        "intermediate_size": cfg.intermediate_size,
        "head_dim": cfg.head_dim,
        "num_local_experts": cfg.num_local_experts,
        "router_jitter_noise": 0.0,
    }


# ---------------------------------------------------------------------------
# Data


class Stream:
    """Training windows from the token stream, with a validation window kept out of every segment."""

    def __init__(self, tokens: np.ndarray, seq_len: int, val_every_blocks: int, device):
        self.T = seq_len
        self.seg = val_every_blocks * seq_len  # tokens per segment
        self.data = torch.from_numpy(tokens.astype(np.int64)).to(device)
        self.n_seg = len(tokens) // self.seg
        assert self.n_seg >= 1, "corpus too small for one segment"
        self.train_span = self.seg - (seq_len + 1)  # train windows start in [0, train_span - seq_len - 1]
        self.device = device

    def train_batch(self, batch: int, gen: torch.Generator):
        seg = torch.randint(0, self.n_seg, (batch,), generator=gen, device=self.device)
        off = torch.randint(0, self.train_span - self.T - 1, (batch,), generator=gen, device=self.device)
        start = seg * self.seg + off
        idx = start.unsqueeze(1) + torch.arange(self.T + 1, device=self.device)
        w = self.data[idx]
        return w[:, :-1], w[:, 1:]

    def val_windows(self):
        starts = torch.arange(self.n_seg, device=self.device) * self.seg + self.train_span
        idx = starts.unsqueeze(1) + torch.arange(self.T + 1, device=self.device)
        return self.data[idx]

    @property
    def train_tokens(self) -> int:
        return self.n_seg * self.train_span


def windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping windows of seq_len + 1 tokens (consecutive windows share one token)."""
    n = (len(tokens) - 1) // seq_len
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return tokens[idx].astype(np.int64)


@torch.no_grad()
def evaluate(model, wins: torch.Tensor, batch: int, amp) -> tuple[float, int]:
    """Mean next-token NLL (nats) over all predicted tokens of the windows (eager layers)."""
    fns, model.layer_fns = model.layer_fns, list(model.layers)
    model.eval()
    total, count = 0.0, 0
    for i in range(0, wins.shape[0], batch):
        w = wins[i : i + batch]
        with amp():
            loss, _ = model(w[:, :-1], w[:, 1:])
        n = w[:, 1:].numel()
        total += loss.item() * n
        count += n
    model.train()
    model.layer_fns = fns
    return total / max(count, 1), count


# ---------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(".data/tok"))
    ap.add_argument("--tokenizer", type=Path, default=Path(".data/tokenizer"))
    ap.add_argument("--out", type=Path, default=Path(".data/ckpt"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=64, help="sequences per step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--max-epochs", type=float, default=1e9, help="cap on training tokens, in passes over train.npy")
    ap.add_argument("--time-budget-s", type=float, default=420.0, help="wall-clock training budget (after compilation)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--val-every-blocks", type=int, default=100)
    ap.add_argument("--eval-max-windows", type=int, default=0,
                    help="score at most this many validation and held-out windows in evaluations during training "
                         "(0: all); the final held-out evaluation always scores all")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--max-checkpoint-mb", type=float, default=45.0)
    ap.add_argument("--moe-impl", choices=["auto", "dense", "sparse"], default="auto",
                    help="all experts on all tokens (dense) or tokens gathered per expert (sparse); "
                         "auto: dense when top-k is at least a quarter of the experts")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="autocast dtype; auto: bf16 on CUDA, fp32 on the CPU")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    # architecture (defaults: the shipped model)
    for f, v in asdict(Config()).items():
        if f in ("dropout", "bos_token_id", "eos_token_id"):
            continue
        if isinstance(v, bool):
            ap.add_argument("--" + f.replace("_", "-"), type=lambda s: s.lower() in ("1", "true", "yes"), default=v)
        elif f == "family":
            ap.add_argument("--family", choices=FAMILIES, default=v, help="checkpoint format and network")
        else:
            ap.add_argument("--" + f.replace("_", "-"), type=type(v), default=v)
    args = ap.parse_args(argv)

    cfg = Config(**{f: getattr(args, f) for f in asdict(Config()) if hasattr(args, f)})
    cfg.dropout = args.dropout
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, args.seq_len)
    if cfg.family == "phimoe" and (cfg.num_experts_per_tok != 2 or cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size):
        print("phimoe needs top-2 routing and head_dim * num_attention_heads == hidden_size", file=sys.stderr)
        return 1
    moe_impl = args.moe_impl
    if moe_impl == "auto":
        moe_impl = "dense" if 4 * cfg.num_experts_per_tok >= cfg.num_local_experts else "sparse"
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # on the CPU, tiny gradients of rarely chosen experts would otherwise crawl
    counts = param_counts(cfg)
    ckpt_mb = counts["total"] * 2 / 1e6
    print(f"config: {cfg}, MoE {moe_impl}")
    print(f"parameters: total {counts['total']:,}, active/token {counts['active_per_token']:,}, bf16 checkpoint ~{ckpt_mb:.1f} MB")
    if ckpt_mb > args.max_checkpoint_mb:
        print(f"checkpoint would be {ckpt_mb:.1f} MB > {args.max_checkpoint_mb} MB", file=sys.stderr)
        return 1

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    bf16 = args.precision == "bf16" or (args.precision == "auto" and cuda)

    def amp():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    meta = json.loads((args.data / "meta.json").read_text())
    assert meta["vocab_size"] == cfg.vocab_size, (meta["vocab_size"], cfg.vocab_size)
    train_np = np.load(args.data / "train.npy")
    held_np = np.load(args.data / "heldout.npy")
    stream = Stream(train_np, args.seq_len, args.val_every_blocks, device)
    val_w = stream.val_windows()
    held_w = torch.from_numpy(windows(held_np, args.seq_len)).to(device)
    print(f"train stream {len(train_np):,} tokens ({stream.train_tokens:,} in training windows), "
          f"val {val_w.numel():,}, heldout {held_w.shape[0]} windows")

    model = Mixtral(cfg, moe_impl).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=cuda,
    )

    compiled = False
    compile_s = 0.0
    if args.compile == "on" or (args.compile == "auto" and cuda):
        try:
            model.layer_fns = [torch.compile(layer) for layer in model.layers]
            t0 = time.time()
            x, y = stream.train_batch(args.batch_size, torch.Generator(device=device).manual_seed(0))
            with amp():
                loss, aux = model(x, y)
            (loss + aux).backward()
            opt.zero_grad(set_to_none=True)
            compiled = True
            compile_s = time.time() - t0
            print(f"torch.compile ok ({compile_s:.1f}s for the first step)")
        except Exception as exc:  # fall back to eager
            print(f"torch.compile failed, running eager: {type(exc).__name__}: {exc}")
            model.layer_fns = list(model.layers)
            opt.zero_grad(set_to_none=True)

    gen = torch.Generator(device=device).manual_seed(args.seed)
    tokens_per_step = args.batch_size * args.seq_len
    max_steps = min(args.max_steps, int(args.max_epochs * len(train_np) / tokens_per_step))
    log = {"config": asdict(cfg), "args": {k: str(v) for k, v in vars(args).items()}, "params": counts,
           "compiled": compiled, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
           "moe_impl": moe_impl, "precision": "bf16" if bf16 else "fp32", "threads": torch.get_num_threads(),
           "torch": torch.__version__, "train": [], "eval": []}

    def lr_at(step, progress):
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        p = min(1.0, progress)
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))

    best = {"val_loss": float("inf"), "step": -1, "state": None}

    def do_eval(step, elapsed):
        n = args.eval_max_windows or None
        vl, _ = evaluate(model, val_w[:n], 32, amp)
        hl, _ = evaluate(model, held_w[:n], 32, amp)
        rec = {"step": step, "tokens": step * tokens_per_step, "elapsed_s": round(elapsed, 2),
               "val_loss": vl, "heldout_loss": hl, "heldout_ppl": math.exp(hl)}
        log["eval"].append(rec)
        print(f"eval step {step}: val {vl:.4f} heldout {hl:.4f} (ppl {math.exp(hl):.2f})")
        if vl < best["val_loss"]:
            best.update(val_loss=vl, step=step, state={k: v.detach().clone() for k, v in model.state_dict().items()})

    model.train()
    if cuda:
        torch.cuda.synchronize()
    t_start = time.time()
    step = 0
    acc_loss = acc_aux = None
    while True:
        elapsed = time.time() - t_start
        progress = max(step / max_steps, elapsed / args.time_budget_s)
        if step >= max_steps or elapsed >= args.time_budget_s:
            break
        lr = lr_at(step, progress)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = stream.train_batch(args.batch_size, gen)
        with amp():
            loss, aux = model(x, y)
        (loss + cfg.router_aux_loss_coef * aux).backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        acc_loss = loss.detach() if acc_loss is None else acc_loss + loss.detach()
        acc_aux = aux.detach() if acc_aux is None else acc_aux + aux.detach()
        step += 1
        if step % args.log_every == 0:
            l, a = acc_loss.item() / args.log_every, acc_aux.item() / args.log_every
            acc_loss = acc_aux = None
            el = time.time() - t_start
            rec = {"step": step, "tokens": step * tokens_per_step, "elapsed_s": round(el, 2), "loss": l,
                   "aux_loss": a, "lr": lr, "grad_norm": float(gn), "tokens_per_s": step * tokens_per_step / el}
            log["train"].append(rec)
            if step % (args.log_every * 10) == 0 or step == args.log_every:
                print(f"step {step} loss {l:.4f} aux {a:.3f} lr {lr:.2e} gn {float(gn):.2f} "
                      f"{rec['tokens_per_s'] / 1e3:.0f}k tok/s elapsed {el:.0f}s")
        if step % args.eval_every == 0:
            do_eval(step, time.time() - t_start)
    if cuda:
        torch.cuda.synchronize()
    train_time = time.time() - t_start
    if not log["eval"] or log["eval"][-1]["step"] != step:
        do_eval(step, train_time)
    print(f"trained {step} steps, {step * tokens_per_step:,} tokens in {train_time:.1f}s; best val at step {best['step']}")
    model.load_state_dict(best["state"])
    model.layer_fns = list(model.layers)  # eager for the final evaluation

    held_loss, held_n = evaluate(model, held_w, 16, amp)
    held_bytes = meta["heldout"]["bytes"]
    held_tokens = meta["heldout"]["tokens"]
    summary = {
        "steps": step,
        "best_step": best["step"],
        "tokens_seen": step * tokens_per_step,
        "epochs": step * tokens_per_step / len(train_np),
        "train_time_s": train_time,
        "tokens_per_s": step * tokens_per_step / train_time,
        "val_loss": best["val_loss"],
        "heldout_loss": held_loss,
        "heldout_ppl": math.exp(held_loss),
        "heldout_tokens_scored": held_n,
        "heldout_bits_per_byte_approx": held_loss / math.log(2) * held_tokens / held_bytes,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "tokens_per_step": tokens_per_step,
        "compile_s": compile_s,
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
    }

    # Save in Hugging Face layout.
    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    sd = model.hf_state_dict()
    save_file(sd, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    (args.out / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
    gen_cfg = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    (args.out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (args.tokenizer / name).exists():
            shutil.copy(args.tokenizer / name, args.out / name)
    blob = (args.out / "model.safetensors").read_bytes()
    summary["checkpoint_bytes"] = len(blob)
    summary["checkpoint_sha256"] = hashlib.sha256(blob).hexdigest()
    summary["checkpoint_tensors"] = len(sd)
    log["summary"] = summary
    (args.out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
