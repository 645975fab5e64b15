"""HardwareProfile: measured expert costs on this machine (copy, CPU, GPU), saved as JSON.

Units are in field names; provenance (device names, torch version, time) travels with the numbers.
A profile is tied to one expert shape and dtype: loading it for another model is an error.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from daop.errors import DaopError

SCHEMA = "daop.hardware_profile/1"


@dataclass(frozen=True)
class HardwareProfile:
    hidden_size: int
    intermediate_size: int
    dtype: str
    expert_bytes: int
    copy_pinned_ms: float
    copy_pageable_ms: float
    cpu_threads: int
    cpu_token_counts: tuple[int, ...]
    cpu_expert_ms: tuple[float, ...]  # at cpu_threads, per token count
    gpu_token_counts: tuple[int, ...]
    gpu_expert_ms: tuple[float, ...]
    cpu_threads_sweep: dict[str, float] = field(default_factory=dict)  # threads -> ms at 1 token
    provenance: dict[str, str] = field(default_factory=dict)

    def matches(self, hidden_size: int, intermediate_size: int, dtype: str) -> bool:
        return (self.hidden_size, self.intermediate_size, self.dtype) == (hidden_size, intermediate_size, dtype)

    def save(self, path: Path) -> None:
        data = {"schema": SCHEMA, **asdict(self)}
        tmp = path.with_suffix(path.suffix + ".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, hidden_size: int | None = None, intermediate_size: int | None = None,
             dtype: str | None = None) -> "HardwareProfile":
        """Load and validate; with a shape given, reject a profile measured for another expert shape."""
        try:
            data = json.loads(Path(path).read_text())
            if data.pop("schema", None) != SCHEMA:
                raise ValueError(f"schema is not {SCHEMA}")
            for key in ("cpu_token_counts", "cpu_expert_ms", "gpu_token_counts", "gpu_expert_ms"):
                data[key] = tuple(data[key])
            profile = cls(**data)
        except (OSError, json.JSONDecodeError, TypeError, ValueError, KeyError) as exc:
            raise DaopError(f"{path}: not a valid hardware profile ({exc})") from exc
        if hidden_size is not None and not profile.matches(hidden_size, intermediate_size or 0, dtype or ""):
            raise DaopError(
                f"{path}: hardware profile is for experts {profile.hidden_size}x{profile.intermediate_size} {profile.dtype}, "
                f"but this model has {hidden_size}x{intermediate_size} {dtype}; run `daop calibrate` for it"
            )
        return profile


def _median_ms(fn, repeat: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return times[len(times) // 2]


def calibrate(hidden_size: int, intermediate_size: int, dtype: torch.dtype, device: torch.device,
              threads: int, quick: bool = False) -> HardwareProfile:
    """Measure copy, CPU and GPU expert times for one expert shape on this machine."""
    from daop.model.moe import swiglu

    D, I = hidden_size, intermediate_size
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    repeat = 3 if quick else 10
    host = [torch.randn(2 * I, D, dtype=dtype) * 0.02, torch.randn(D, I, dtype=dtype) * 0.02]
    pinned = [t.pin_memory() for t in host] if cuda else host
    dev = [torch.empty_like(t, device=device) for t in host]

    def copy(src):
        return lambda: [d.copy_(s, non_blocking=True) for d, s in zip(dev, src)]

    copy_pinned = _median_ms(copy(pinned), repeat, sync)
    copy_pageable = _median_ms(copy(host), repeat, sync)
    counts = (1, 4, 16, 64) if quick else (1, 2, 4, 8, 16, 32, 64, 128, 256)
    previous = torch.get_num_threads()
    sweep = {}
    try:
        for n_threads in sorted({1, max(1, threads // 2), threads}):
            torch.set_num_threads(n_threads)
            x = torch.randn(1, D, dtype=dtype)
            sweep[str(n_threads)] = _median_ms(lambda: swiglu(x, *host), repeat, lambda: None)
        torch.set_num_threads(threads)
        cpu_ms = tuple(_median_ms(lambda n=n: swiglu(torch.randn(n, D, dtype=dtype), *host), repeat, lambda: None) for n in counts)
    finally:
        torch.set_num_threads(previous)
    gpu_counts = counts + ((1024,) if not quick else ())
    gpu_ms = tuple(_median_ms(lambda n=n: swiglu(torch.randn(n, D, dtype=dtype, device=device), *dev), repeat, sync) for n in gpu_counts)
    esize = torch.empty((), dtype=dtype).element_size()
    return HardwareProfile(
        hidden_size=D, intermediate_size=I, dtype=str(dtype).replace("torch.", ""), expert_bytes=3 * D * I * esize,
        copy_pinned_ms=copy_pinned, copy_pageable_ms=copy_pageable, cpu_threads=threads,
        cpu_token_counts=counts, cpu_expert_ms=cpu_ms, gpu_token_counts=gpu_counts, gpu_expert_ms=gpu_ms,
        cpu_threads_sweep=sweep,
        provenance={
            "gpu": torch.cuda.get_device_name(device) if cuda else "none (device is the CPU)",
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "quick": str(quick),
        },
    )
