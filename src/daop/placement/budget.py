"""The GPU budget: how many routed experts fit next to everything else.

Everything that is not a routed expert (embeddings, attention, norms, routers, shared experts,
LM head), the KV cache for the requested context and a workspace margin stay on the GPU; what
is left holds expert slots. One knob: a memory size (`20GiB`) or an expert ratio (`0.5`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from daop.config import ModelConfig
from daop.errors import DaopError

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str) -> int:
    """'20GiB', '20 GB', '512MiB', '1.5g' -> bytes; a DaopError names the malformed value."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in UNITS:
        raise DaopError(f"malformed memory size {text!r}; use a number with a unit, e.g. 20GiB, 512MiB, 24GB")
    value = float(match.group(1)) * UNITS[match.group(2).lower()]
    if value <= 0:
        raise DaopError(f"memory size {text!r} must be positive")
    return int(value)


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class Budget:
    """Resolved budget: expert slots on the GPU and the accounting behind the number."""

    gpu_slots: int
    total_experts: int
    expert_bytes: int
    dense_bytes: int
    kv_bytes: int
    workspace_bytes: int
    expert_format: str = ""  # the stored format's name, for describe()

    @property
    def expert_ratio(self) -> float:
        return self.gpu_slots / self.total_experts if self.total_experts else 1.0

    def describe(self) -> str:
        stored = f" {self.expert_format}" if self.expert_format else ""
        return (f"{self.gpu_slots}/{self.total_experts}{stored} experts on GPU ({self.expert_ratio:.1%}), "
                f"{fmt_bytes(self.gpu_slots * self.expert_bytes)} of experts + {fmt_bytes(self.dense_bytes)} dense + "
                f"{fmt_bytes(self.kv_bytes)} KV cache + {fmt_bytes(self.workspace_bytes)} workspace")


def resolve_budget(
    config: ModelConfig,
    per_expert_bytes: int,
    dense_bytes: int,
    kv_bytes: int,
    device_free_bytes: int | None,
    gpu_memory: str | int | None = None,
    expert_ratio: float | None = None,
    workspace_bytes: int | None = None,
) -> Budget:
    """Number of GPU expert slots for a memory budget, an expert ratio, or (default) free device memory.

    per_expert_bytes: one routed expert in its stored format (`ExpertFormat.bytes`), so a low-bit
    format fits 2x (int8) or about 4x (int4) more experts into the same memory."""
    total = len(config.moe_layer_ids()) * config.num_experts
    per = per_expert_bytes
    work = workspace_bytes if workspace_bytes is not None else max(256 * 2**20, dense_bytes // 20)
    if gpu_memory is not None and expert_ratio is not None:
        raise DaopError("give either --gpu-memory or --expert-ratio, not both")
    if expert_ratio is not None:
        if not 0 <= expert_ratio <= 1:
            raise DaopError(f"--expert-ratio {expert_ratio} must be between 0 and 1")
        return Budget(int(round(expert_ratio * total)), total, per, dense_bytes, kv_bytes, work)
    limit = parse_bytes(gpu_memory) if isinstance(gpu_memory, str) else gpu_memory
    if limit is None:
        limit = device_free_bytes
    if limit is None:
        return Budget(total, total, per, dense_bytes, kv_bytes, work)
    fixed = dense_bytes + kv_bytes + work
    if fixed > limit:
        raise DaopError(
            f"GPU budget {fmt_bytes(limit)} cannot hold the non-expert part of the model: it needs "
            f"{fmt_bytes(fixed)} ({fmt_bytes(dense_bytes)} weights + {fmt_bytes(kv_bytes)} KV cache + "
            f"{fmt_bytes(work)} workspace); lower --max-context or give more memory"
        )
    return Budget(min(total, (limit - fixed) // per), total, per, dense_bytes, kv_bytes, work)
