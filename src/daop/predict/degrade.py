"""Graceful degradation: cap how many of a token's experts run on the CPU (paper section 2.5).

The paper's rule is for top-2 (both experts on the CPU -> replace the lower-ranked one). Here it
holds for any top-k and any cap, per token of a batch, as one batched tensor computation.
Shapes: N tokens, K top-k, E experts.
"""
from __future__ import annotations

import torch


def degrade(
    ids: torch.Tensor,
    weights: torch.Tensor,
    router_scores: torch.Tensor,
    resident_mask: torch.Tensor,
    max_cpu_per_token: int,
    scores_are_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace each token's lower-ranked host experts beyond the cap by the best GPU-resident ones.

    ids [N, K] and weights [N, K] are the routing; router_scores [N, E] are the router logits (or
    probabilities with `scores_are_probs`) and rank experts; resident_mask [E] marks this layer's
    GPU-resident experts. Per token, the `max_cpu_per_token` best-ranked host experts are kept and
    every other host expert is replaced, in its column, by the best-scoring resident expert not
    already chosen (the best replacement goes to the best-ranked replaced column). A degraded
    token's weights become its router probabilities over the chosen set, scaled to the token's
    original weight total (1 for routers that normalise top-k weights), so the kept weights are
    renormalised over the chosen set. Tokens with nothing replaced keep their weights unchanged.
    If a layer has too few resident experts to replace them all, the best-ranked host experts
    stay (the cap cannot hold there). Returns ids [N, K] (long), float32 weights [N, K] and the
    mask [N] of tokens where something was replaced.
    """
    if max_cpu_per_token < 0:
        raise ValueError(f"max_cpu_per_token must be >= 0, got {max_cpu_per_token}")
    if ids.dim() != 2 or weights.shape != ids.shape or router_scores.shape[0] != ids.shape[0]:
        raise ValueError(f"shapes do not fit: ids {list(ids.shape)}, weights {list(weights.shape)}, "
                         f"router_scores {list(router_scores.shape)}")
    ids = ids.long()
    k, num_experts = ids.shape[1], router_scores.shape[1]
    resident = resident_mask.to(device=ids.device, dtype=torch.bool)
    scores = router_scores.float()
    chosen_scores = scores.gather(1, ids)
    order = torch.argsort(chosen_scores, dim=1, descending=True, stable=True)  # [N, K] rank -> column
    ranked = ids.gather(1, order)
    on_cpu = ~resident[ranked]
    excess = on_cpu & (on_cpu.cumsum(1) > max_cpu_per_token)
    free = resident.expand_as(scores).scatter(1, ids, False)  # resident and not already chosen
    cand_ids = scores.masked_fill(~free, float("-inf")).topk(min(k, num_experts), dim=1).indices
    available = free.sum(1, keepdim=True)
    below = excess.sum(1, keepdim=True) - excess.cumsum(1)  # excess experts ranked below this one
    replace = excess & (below < available)  # short of resident experts: the best-ranked excess stays
    pick = (replace.cumsum(1) - 1).clamp(0, cand_ids.shape[1] - 1)
    new_ranked = torch.where(replace, cand_ids.gather(1, pick), ranked)
    new_ids = torch.empty_like(ids).scatter_(1, order, new_ranked)
    degraded = replace.any(dim=1)
    w = weights.float()
    probs = scores if scores_are_probs else torch.softmax(scores, dim=-1)
    p = probs.gather(1, new_ids)
    w_degraded = p / p.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) * w.sum(1, keepdim=True)
    return new_ids, torch.where(degraded[:, None], w_degraded, w), degraded
