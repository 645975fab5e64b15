"""Counters per layer: resident hits, CPU expert calls, copies and bytes, CPU busy time, waits."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FIELDS = ("resident_calls", "cpu_calls", "copy_calls", "copied_bytes", "cpu_wait_s", "layer_calls", "tokens",
          "predicted_hits", "predicted_total", "degraded_tokens", "speculative_copies", "precalc_used", "precalc_wasted",
          "settle_moves", "settle_copies", "split_calls", "split_cpu_share", "speculative_splits",
          "two_ahead_copies", "two_ahead_used", "late_copies_to_cpu", "decode_swaps", "prompt_placements", "late_predictions",
          "early_submits", "handoff_calls")


@dataclass
class Counters:
    num_layers: int
    data: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.data = {name: np.zeros(self.num_layers, dtype=np.float64) for name in FIELDS}

    def add(self, name: str, layer_idx: int, value: float) -> None:
        self.data[name][layer_idx] += value

    def totals(self) -> dict[str, float]:
        return {name: float(v.sum()) for name, v in self.data.items()}


def per_token(t: dict[str, float], generated_tokens: int) -> dict[str, float]:
    """Per-token rates over the whole model from a runner's totals (what --stats prints)."""
    calls = t["resident_calls"] + t["cpu_calls"] + t["copy_calls"] + t.get("split_calls", 0.0)
    per = max(generated_tokens, 1)
    return {
        "gpu_hit_rate": t["resident_calls"] / calls if calls else 1.0,
        "resident_calls_per_token": t["resident_calls"] / per,
        "cpu_calls_per_token": t["cpu_calls"] / per,
        "copy_calls_per_token": t["copy_calls"] / per,
        "split_calls_per_token": t.get("split_calls", 0.0) / per,
        "h2d_bytes_per_token": t["copied_bytes"] / per,
        "cpu_wait_s": t["cpu_wait_s"],
        "prediction_precision": t["predicted_hits"] / t["predicted_total"] if t["predicted_total"] else float("nan"),
        "degradation_rate": t["degraded_tokens"] / t["predicted_total"] if t["predicted_total"] else 0.0,
    }
