"""Sampling parameters (validated) and next-token selection: greedy, temperature, top-k, top-p."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from daop.errors import DaopError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens must be an integer >= 1"),
            (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0,
             "temperature must be a finite number >= 0"),
            (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0"),
            (self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63), "seed must be an integer in [0, 2**63)"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be a list of non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise DaopError(f"invalid sampling value: {message}")
        for name in ("max_new_tokens", "top_k"):
            if isinstance(getattr(self, name), bool):
                raise DaopError(f"invalid sampling value: {name} must be an integer")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class Sampler:
    """Picks next tokens from logits [B, V]; the random stream lives on the CPU so seeds are portable."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Token ids [B] (on the CPU)."""
        p = self.params
        if p.greedy:
            return logits.argmax(dim=-1).cpu()
        logits = logits.float()
        # Shift before dividing so a tiny temperature cannot overflow to inf; the top token stays at 0.
        scores = (logits - logits.max(dim=-1, keepdim=True).values) * min(1.0 / p.temperature, 1e30)
        scores = scores.nan_to_num(nan=float("-inf"))
        if p.top_k:
            kth = torch.topk(scores, min(p.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1:
            ordered, order = torch.sort(scores, dim=-1, descending=True)
            cum = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
            drop = cum - torch.softmax(ordered, dim=-1) >= p.top_p  # keep the token that crosses top_p
            drop[..., 0] = False  # the most likely token always survives, whatever top_p rounds to
            ordered = ordered.masked_fill(drop, float("-inf"))
            scores = torch.full_like(scores, float("-inf")).scatter(-1, order, ordered)
        probs = torch.softmax(scores, dim=-1).cpu()
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]
