"""How well a one-layer-ahead expert prediction (paper section 2.4) matches the true routing.

Layer l's post-attention normed state h_l, fed to layer l+1's router, predicts layer l+1's experts
(daop.model.routing.Routing.predict): the residual stream changes little between layers.
Shapes: N tokens, K top-k.
"""
from __future__ import annotations

import torch


def prediction_accuracy(pred_ids: torch.Tensor, true_ids: torch.Tensor) -> tuple[float, float]:
    """(top-1 match, set overlap) of predicted vs. true ids [N, K], averaged over tokens.

    Top-1 compares the first column (the best-ranked expert of both routers); set overlap is
    |predicted set & true set| / K per token, the paper's notion of prediction accuracy.
    Zero tokens give (nan, nan).
    """
    if pred_ids.shape != true_ids.shape or pred_ids.dim() != 2:
        raise ValueError(f"ids must both be [N, K]; got {list(pred_ids.shape)} and {list(true_ids.shape)}")
    if pred_ids.shape[0] == 0:
        return float("nan"), float("nan")
    pred, true = pred_ids.long(), true_ids.long().to(pred_ids.device)
    top1 = (pred[:, 0] == true[:, 0]).float().mean().item()
    shared = (pred[:, :, None] == true[:, None, :]).any(dim=2).sum(dim=1)  # [N]
    return top1, (shared.float() / pred.shape[1]).mean().item()
