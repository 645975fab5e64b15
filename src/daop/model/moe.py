"""Routers and the MoE block. Routing is computed here; expert compute is delegated to a runner.

The split matters: a runner decides where each expert runs (resident GPU weights, CPU, copies),
while routing stays identical for every runner, so exact runners give the same tokens.
Shapes: N tokens, D hidden, E experts, K top-k, I expert intermediate size.
"""
from __future__ import annotations

import functools
from typing import Optional, Protocol, Tuple

import torch
import torch.nn.functional as F

from daop.config import ModelConfig
from daop.kernels import fused


def sparsemixer_top2(logits: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's inference-time sparsemixer: two argmax rounds, each with a masked softmax weight."""
    weights, ids = [], []
    scores = logits
    for _ in range(2):
        top, idx = scores.max(dim=-1, keepdim=True)
        factor = logits.abs().clamp(min=top)
        masked = scores.masked_fill((top - logits) / factor > 2 * jitter_eps, float("-inf"))
        weights.append(torch.softmax(masked, dim=-1).gather(-1, idx))
        ids.append(idx)
        scores = scores.scatter(-1, idx, float("-inf"))
    return torch.cat(weights, dim=-1), torch.cat(ids, dim=-1)


Routed = tuple[torch.Tensor, torch.Tensor]  # (weights [N, K], ids [N, K]) before normalisation and scaling


def group_limited(probs: torch.Tensor, num_groups: int, top_groups: int) -> torch.Tensor:
    """DeepSeek-V2's group-limited greedy: probs [N, E] with every expert outside the top_groups
    groups (ranked by their best expert) set to zero, so the top-k that follows stays inside them."""
    grouped = probs.view(probs.shape[0], num_groups, -1)  # [N, groups, E / groups]
    best = grouped.max(dim=-1).values
    keep = torch.zeros_like(best, dtype=torch.bool).scatter_(1, best.topk(top_groups, dim=-1).indices, True)
    return grouped.masked_fill(~keep[..., None], 0.0).view_as(probs)


def sigmoid_group_limited(scores: torch.Tensor, bias: torch.Tensor, num_groups: int, top_groups: int,
                          top_k: int) -> Routed:
    """DeepSeek-V3's router on sigmoid scores [N, E]: experts are chosen by score + bias [E] inside
    the top_groups groups (ranked by the sum of their two best biased scores); the weights [N, K]
    are the chosen experts' unbiased scores. Returns (weights, ids)."""
    choice = (scores + bias).view(scores.shape[0], num_groups, -1)  # [N, groups, E / groups]
    group_scores = choice.topk(2, dim=-1).values.sum(dim=-1)
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, group_scores.topk(top_groups, dim=-1).indices, True)
    ids = choice.masked_fill(~keep[..., None], float("-inf")).view_as(scores).topk(top_k, dim=-1).indices
    return scores.gather(1, ids), ids


def softmax_topk(config: ModelConfig, logits: torch.Tensor, bias: torch.Tensor | None) -> Routed:
    return torch.topk(torch.softmax(logits.float(), dim=-1), config.top_k, dim=-1)


def group_limited_topk(config: ModelConfig, logits: torch.Tensor, bias: torch.Tensor | None) -> Routed:
    probs = group_limited(torch.softmax(logits.float(), dim=-1), config.expert_groups, config.top_groups)
    return torch.topk(probs, config.top_k, dim=-1)


def biased_sigmoid_topk(config: ModelConfig, logits: torch.Tensor, bias: torch.Tensor | None) -> Routed:
    assert bias is not None, "the sigmoid group-limited router needs its score correction bias"
    return sigmoid_group_limited(logits.float().sigmoid(), bias, config.expert_groups, config.top_groups, config.top_k)


def topk_softmax(config: ModelConfig, logits: torch.Tensor, bias: torch.Tensor | None) -> Routed:
    """gpt-oss: the top-k logits, then a softmax over those alone (in the logits' dtype)."""
    top, ids = torch.topk(logits, config.top_k, dim=-1)
    return torch.softmax(top, dim=-1), ids


ROUTERS = {"softmax_topk": softmax_topk, "group_limited": group_limited_topk,
           "sigmoid_group_limited": biased_sigmoid_topk, "topk_softmax": topk_softmax}


def select_experts(config: ModelConfig, logits: torch.Tensor,
                   bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k expert ids and their weights from router logits (and the router's score bias, for
    routers that have one), as the family defines them."""
    if config.router_kind == "sparsemixer":
        weights, ids = sparsemixer_top2(logits, config.router_jitter_eps)
        return ids, weights
    if (config.router_kind == "softmax_topk" and fused.enabled(logits) and logits.is_contiguous()
            and logits.shape[-1] <= fused.MAX_EXPERTS and config.top_k <= fused.MAX_TOP_K):
        out_dtype = logits.dtype if config.router_weights_in_hidden_dtype else torch.float32
        return fused.softmax_topk(logits, config.top_k, config.norm_topk_prob, config.routed_scaling_factor, out_dtype)
    weights, ids = ROUTERS[config.router_kind](config, logits, bias)
    if config.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if config.routed_scaling_factor != 1.0:
        weights = weights * config.routed_scaling_factor
    if config.router_weights_in_hidden_dtype:
        weights = weights.to(logits.dtype)
    return ids, weights


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert, down(silu(gate x) * up x), with gate and up stacked as gate_up [2I, D].

    One product over [2I, D] reads the weights in one pass (one parallel region on the CPU). It is
    not bitwise equal to two separate products at every shape (the GEMM may block 2I differently,
    and silu of a strided half vectorises its row tails differently), so every expert (resident,
    copied, CPU) goes through this one function: exact runners stay bitwise equal to each other,
    and agree with the reference implementation within tolerance.
    """
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def gated(gate: torch.Tensor, up: torch.Tensor, glu: Optional[Tuple[float, float]]) -> torch.Tensor:
    """An expert's activation: silu(gate) * up, or for glu = (alpha, limit) gpt-oss's clamped SwiGLU,
    (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with g = min(gate, limit) (TorchScript-compatible)."""
    if glu is None:
        return F.silu(gate) * up
    alpha, limit = glu
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def split_gate_up(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate [.., I, D] and up [.., I, D] halves of a stacked gate_up [.., 2I, D] (views, for loading)."""
    gate, up = gate_up.chunk(2, dim=-2)
    return gate, up


class ExpertRunner(Protocol):
    """Computes the weighted sum of routed experts' outputs for one layer.

    A runner may keep per-sequence state (placement changes, next-layer preparations): `reset`
    starts a new sequence, `set_phase` switches between "prefill" and "decode", `totals` returns
    its counters since load (empty when it keeps none) and `close` stops its worker threads. Only
    DecodeSession (one sequence) and the Batcher (`daop.batching`) call the first two, so every
    generation, evaluation, benchmark and profile runs the same sequence.
    """

    def __call__(self, layer_idx: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ...

    def reset(self) -> None: ...

    def set_phase(self, phase: str) -> None: ...

    def totals(self) -> dict[str, float]: ...

    def close(self) -> None: ...


def group_by_expert(ids_host: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """For every routed expert, ascending: (token rows, top-k column) of its assignments, on the host
    (as torch.where gives them: by token, then column). A decode step's few picks are grouped in
    Python, which is quicker than a unique and a where per expert."""
    if ids_host.numel() > 64:
        return {e: torch.where(ids_host == e) for e in torch.unique(ids_host).tolist()}
    picks: dict[int, tuple[list[int], list[int]]] = {}
    for t, row in enumerate(ids_host.tolist()):
        for k, e in enumerate(row):
            tokens, cols = picks.setdefault(e, ([], []))
            tokens.append(t)
            cols.append(k)
    return {e: (index_tensor(tuple(picks[e][0])), index_tensor(tuple(picks[e][1]))) for e in sorted(picks)}


@functools.lru_cache(maxsize=4096)
def index_tensor(values: tuple[int, ...]) -> torch.Tensor:
    """A host int64 tensor of `values`, made once: a decode step's few index lists repeat (read only)."""
    return torch.tensor(values, dtype=torch.int64)


def device_rows(rows_host: dict[int, tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The same index tensors on `device`, moved in one copy rather than two per expert."""
    if device.type == "cpu" or not rows_host:
        return rows_host
    parts = [t for pair in rows_host.values() for t in pair]
    packed = torch.cat(parts).to(device, non_blocking=True)
    pieces = iter(packed.split([len(t) for t in parts]))
    return {e: (next(pieces), next(pieces)) for e in rows_host}


def combine(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Scale expert outputs [n, D] by routing weights [n] the way the reference does (float32 product)."""
    return (y.float() * w.float()[:, None]).to(y.dtype)


def token_rows(h: torch.Tensor, rows_host: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict | None:
    """Each expert's (token rows, top-k column) on h's device; None for a single token, which every
    expert reads whole (no index tensors, no index copy)."""
    return None if h.shape[0] == 1 else device_rows(rows_host, h.device)


def expert_input(h: torch.Tensor, rows: dict | None, expert_idx: int) -> torch.Tensor:
    return h if rows is None else h[rows[expert_idx][0]]


def expert_inputs(h: torch.Tensor, rows: dict | None, experts) -> dict[int, torch.Tensor]:
    """`expert_input` for several experts with one gather (one kernel rather than one per expert;
    the same values)."""
    experts = list(experts)
    if rows is None or len(experts) < 2:
        return {e: expert_input(h, rows, e) for e in experts}
    gathered = h[torch.cat([rows[e][0] for e in experts])]
    return dict(zip(experts, gathered.split([len(rows[e][0]) for e in experts])))


def weighted_sum(h: torch.Tensor, ys: dict[int, torch.Tensor], weights: torch.Tensor,
                 rows_host: dict[int, tuple[torch.Tensor, torch.Tensor]], rows: dict | None) -> torch.Tensor:
    """Every expert's output scaled by its routing weight (combine()) and added in ascending expert order.

    Each token's picks are summed left to right in ascending expert order, as adding them into a
    zero tensor expert by expert (`index_put_` with accumulation) does, bit for bit; for many tokens
    in a few batched operations: every pick scaled at once, gathered token by token (a stable sort
    of the expert-major picks keeps each token's in expert order), then K - 1 additions. A routing
    whose tokens do not all have K picks is added expert by expert. One token (rows None) takes
    three kernels for two picks (`one_token_sum`)."""
    if rows is None:
        return one_token_sum(ys, weights, rows_host)
    order = sorted(ys)
    token_idx = torch.cat([rows[e][0] for e in order])
    N, K = weights.shape
    if token_idx.numel() != N * K:
        out = torch.zeros_like(h)
        for e in order:
            tokens, k_slot = rows[e]
            out.index_put_((tokens,), combine(ys[e], weights[tokens, k_slot]), accumulate=True)
        return out
    k_slot = torch.cat([rows[e][1] for e in order])
    parts = combine(torch.cat([ys[e] for e in order]), weights[token_idx, k_slot])
    return add_picks(parts[token_idx.argsort(stable=True)].view(N, K, -1))


def one_token_sum(ys: dict[int, torch.Tensor], weights: torch.Tensor,
                  rows_host: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """`weighted_sum` of one token [1, D]: its picks scaled as `combine` does and added left to
    right in ascending expert order. Where each of the K columns picks its own expert and the
    outputs share a dtype, the outputs are stacked in column order and scaled in one product (a
    bf16 output times a weight is computed in float32 and rounded once, as `combine` does), then the
    K - 1 additions follow in expert order: 3 kernels for two picks, where scaling pick by pick
    took 8, each a few tens of microseconds of the driving thread on a GPU. Otherwise (an expert
    picked twice, outputs of mixed dtypes) the picks are scaled and added one at a time."""
    order = sorted(ys)
    cols = [c for e in order for c in rows_host[e][1].tolist()]
    K = weights.shape[1]
    if len(order) == K and sorted(cols) == list(range(K)) and len({ys[e].dtype for e in order}) == 1:
        by_col = [0] * K
        for e, c in zip(order, cols):
            by_col[c] = ys[e]
        stacked = torch.stack(by_col)  # [K, 1, D], column order
        parts = torch.mul(stacked, weights[0].view(K, *[1] * by_col[0].dim()), out=torch.empty_like(stacked))
        out = parts[cols[0]]
        for c in cols[1:]:
            out = out + parts[c]
        return out
    w = weights[0].float()
    out = None
    for e in order:
        for c in rows_host[e][1].tolist():  # an expert picked twice adds both picks, in column order
            part = (ys[e].float() * w[c]).to(ys[e].dtype)
            out = part if out is None else out + part
    return out


def add_picks(picks: torch.Tensor) -> torch.Tensor:
    """Each token's K scaled pick outputs [N, K, D] added left to right: [N, D]."""
    out = picks[:, 0]
    for k in range(1, picks.shape[1]):
        out = out + picks[:, k]
    return out


class SharedExpert:
    """An always-on expert (Qwen2-MoE's with a sigmoid gate; DeepSeek-V2's without), or a dense MLP."""

    def __init__(self, hidden: int, inter: int, gated: bool, device: torch.device, dtype: torch.dtype) -> None:
        self.gate_up_proj = torch.empty(2 * inter, hidden, device=device, dtype=dtype)
        self.down_proj = torch.empty(hidden, inter, device=device, dtype=dtype)
        self.gate = torch.empty(1, hidden, device=device, dtype=dtype) if gated else None

    def tensors(self, prefix: str, gate_name: str | None = None) -> dict[str, torch.Tensor]:
        views = (*split_gate_up(self.gate_up_proj), self.down_proj)
        out = {f"{prefix}.{n}.weight": t for n, t in zip(("gate_proj", "up_proj", "down_proj"), views)}
        if self.gate is not None and gate_name:
            out[gate_name] = self.gate
        return out

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        y = swiglu(h, self.gate_up_proj, self.down_proj)
        if self.gate is not None:
            y = torch.sigmoid(F.linear(h, self.gate)) * y
        return y
