"""Sampling parameters (validated) and next-token selection: penalties, greedy, temperature, min-p,
top-k, top-p; plus the sampling defaults of a checkpoint's generation_config.json."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch

from daop.errors import DaopError

# generation_config.json keys honoured as defaults when the caller gives none (as transformers and vLLM do).
GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy.

    repetition_penalty divides positive logits (multiplies negative ones) of every token in the prompt
    or the output so far (transformers, vLLM); presence_penalty and frequency_penalty subtract a constant
    and a per-occurrence amount from tokens of the output so far (OpenAI); min_p drops tokens whose
    probability is below min_p times the top token's.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens must be an integer >= 1"),
            (_number(self.temperature) and self.temperature >= 0, "temperature must be a finite number >= 0"),
            (_number(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0 (0 = off)"),
            (self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63), "seed must be an integer in [0, 2**63)"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be a list of non-empty strings"),
            (_number(self.min_p) and 0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (_number(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty must be a finite number > 0"),
            (_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
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

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def sampling_params(defaults: dict[str, Any] | None = None, **given: Any) -> SamplingParams:
    """SamplingParams from the caller's values; those left None come from `defaults`, then the built-in ones."""
    names = {f.name for f in fields(SamplingParams)}
    unknown = set(given) - names
    if unknown:
        raise TypeError(f"unknown sampling argument(s): {', '.join(sorted(unknown))}")
    kw = {k: v for k, v in (defaults or {}).items() if k in names}
    kw.update({k: v for k, v in given.items() if v is not None})
    if "stop" in kw:
        kw["stop"] = tuple(kw["stop"])
    return SamplingParams(**kw)


def generation_defaults(model_dir: Path) -> dict[str, Any]:
    """Sampling defaults of generation_config.json: temperature, top_p, top_k, min_p, repetition_penalty.

    `do_sample: false` means greedy, as in transformers: temperature, top_p, top_k and min_p are then
    not used. Values that SamplingParams would reject are an error naming the file.
    """
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DaopError(f"{path}: cannot read JSON: {exc}") from exc
    if not isinstance(raw, dict):
        return {}
    keys = GENERATION_CONFIG_KEYS if raw.get("do_sample", True) is not False else ("repetition_penalty",)
    out = {k: raw[k] for k in keys if raw.get(k) is not None}
    if isinstance(out.get("top_k"), float) and out["top_k"].is_integer():
        out["top_k"] = int(out["top_k"])
    try:
        SamplingParams(**out)
    except (DaopError, TypeError) as exc:
        raise DaopError(f"{path}: {exc}") from exc
    return out


class Sampler:
    """Picks next tokens from logits [B, V]; the random stream lives on the CPU so seeds are portable.

    The sampler keeps its own token history, seeded with the prompt ids, for the penalties: every
    token it returns is added to it.
    """

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int] | Sequence[Sequence[int]] | None = None) -> None:
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        rows = list(prompt_ids or [])
        self.prompt_rows: list[list[int]] = [list(r) for r in rows] if rows and not isinstance(rows[0], int) else [rows]
        self.seen: torch.Tensor | None = None     # [B, V] bool: in the prompt or the output (repetition_penalty)
        self.counts: torch.Tensor | None = None   # [B, V] float: occurrences in the output (presence, frequency)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Token ids [B] (on the CPU)."""
        p = self.params
        if p.penalised:
            logits = self._penalise(logits.float())
        if p.greedy:
            token = logits.argmax(dim=-1).cpu()
        else:
            token = self._sample(logits)
        if p.penalised:
            self._record(token)
        return token

    def _penalise(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if self.seen is None:
            B, V = logits.shape
            self.seen = torch.zeros(B, V, dtype=torch.bool, device=logits.device)
            self.counts = torch.zeros(B, V, device=logits.device)
            for b, row in enumerate(self.prompt_rows[:B] if len(self.prompt_rows) >= B else self.prompt_rows * B):
                ids = torch.tensor([t for t in row if 0 <= t < V], dtype=torch.long, device=logits.device)
                self.seen[b, ids] = True
        if p.repetition_penalty != 1:
            penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self.seen, penalised, logits)
        if p.presence_penalty or p.frequency_penalty:
            logits = logits - p.frequency_penalty * self.counts - p.presence_penalty * (self.counts > 0).float()
        return logits

    def _record(self, token: torch.Tensor) -> None:
        idx = token.to(self.seen.device)[:, None]
        self.seen.scatter_(1, idx, True)
        self.counts.scatter_add_(1, idx, torch.ones(idx.shape, device=self.counts.device))

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        logits = logits.float()
        # Shift before dividing so a tiny temperature cannot overflow to inf; the top token stays at 0.
        scores = (logits - logits.max(dim=-1, keepdim=True).values) * min(1.0 / p.temperature, 1e30)
        scores = scores.nan_to_num(nan=float("-inf"))
        if p.min_p > 0:  # the top token's score is 0, so probability ratios are exp(score)
            scores = scores.masked_fill(scores < math.log(p.min_p), float("-inf"))
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
