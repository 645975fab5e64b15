"""HardwareProfile: measured expert costs on this machine (copy, CPU, GPU), saved as JSON.

Units are in field names; provenance (host, CPU model and capability, device, versions, time)
travels with the numbers. A profile is tied to one expert shape and dtype: loading it for another
model is an error. The CPU expert is measured the way the executor runs it (through `submit`,
while the calling thread drives), and the executor's mode and thread count are chosen from those
measurements (`daop.executors.cpu_tuning`); the reason for the choice is recorded.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from daop.errors import DaopError
from daop.quant import ExpertFormat

SCHEMA = "daop.hardware_profile/2"
OLD_SCHEMAS = ("daop.hardware_profile/1",)  # load with defaults for the fields added since
OLD_REASON = "not recorded (profile written by an older daop)"
NOISE_REL, NOISE_ABS_MS = 0.15, 0.05  # a CPU time may fall by this much with more tokens and still be noise
OUTLIER_FACTOR, OUTLIER_ABS_MS = 2.0, 0.2  # a repeat above factor x median + abs is an outlier
TUPLE_FIELDS = ("cpu_token_counts", "cpu_expert_ms", "gpu_token_counts", "gpu_expert_ms", "cpu_expert_ms_min",
                "cpu_expert_ms_max", "cpu_candidate_token_counts")


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
    cpu_expert_ms: tuple[float, ...]  # median executor busy time per expert call, per token count
    gpu_token_counts: tuple[int, ...]
    gpu_expert_ms: tuple[float, ...]
    cpu_threads_sweep: dict[str, float] = field(default_factory=dict)  # threads -> ms at 1 token (chosen mode)
    provenance: dict[str, str] = field(default_factory=dict)
    cpu_mode: str = "worker"  # where CPU experts run: a worker thread, or inline on the driving thread
    cpu_threads_reason: str = OLD_REASON
    cpu_expert_ms_min: tuple[float, ...] = ()  # fastest and slowest repeat per token count
    cpu_expert_ms_max: tuple[float, ...] = ()
    repeats: int = 0
    cpu_candidate_token_counts: tuple[int, ...] = ()
    cpu_candidates_ms: dict[str, list[float]] = field(default_factory=dict)  # "mode xN" -> wall ms per count

    expert_format: str = ""  # the experts' stored format ('int8', 'int4-g128'); empty: the model's dtype
    cpu_kernel: str = ""  # which products the CPU experts were measured on (executors.cpu.kernel_name); empty: torch
    # How much longer a one-token CPU expert and an expert's copy take while the other channel runs
    # than alone (both read host memory; `shared_channels`); 0: not measured (a CPU device, older profiles)
    shared_cpu_factor: float = 0.0
    shared_copy_factor: float = 0.0

    def matches(self, hidden_size: int, intermediate_size: int, dtype: str, expert_format: str | None = None) -> bool:
        mine = (self.hidden_size, self.intermediate_size, self.dtype, self.expert_format or self.dtype)
        return mine == (hidden_size, intermediate_size, dtype, expert_format or dtype)

    def implausible(self) -> str | None:
        """Why these CPU numbers should not be trusted (the host was busy while measuring), or None."""
        ms, counts = self.cpu_expert_ms, self.cpu_token_counts
        for i in range(len(ms)):
            for j in range(i + 1, len(ms)):
                if ms[j] < ms[i] * (1 - NOISE_REL) - NOISE_ABS_MS:
                    return f"CPU expert time falls from {ms[i]:.3f} ms at {counts[i]} tokens to {ms[j]:.3f} ms at {counts[j]}"
        for n, med, worst in zip(counts, ms, self.cpu_expert_ms_max):
            if worst > OUTLIER_FACTOR * med + OUTLIER_ABS_MS:
                return f"a repeat at {n} tokens took {worst:.3f} ms against a median of {med:.3f} ms"
        return None

    def save(self, path: Path) -> None:
        data = {"schema": SCHEMA, **asdict(self)}
        tmp = path.with_suffix(path.suffix + ".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, hidden_size: int | None = None, intermediate_size: int | None = None,
             dtype: str | None = None, expert_format: str | None = None) -> "HardwareProfile":
        """Load and validate; with a shape given, reject a profile measured for another expert shape."""
        try:
            data = json.loads(Path(path).read_text())
            schema = data.pop("schema", None)
            if schema != SCHEMA and schema not in OLD_SCHEMAS:
                raise ValueError(f"schema is not {SCHEMA}")
            for key in TUPLE_FIELDS:
                if key in data:
                    data[key] = tuple(data[key])
            profile = cls(**data)
        except (OSError, json.JSONDecodeError, TypeError, ValueError, KeyError, AttributeError) as exc:
            raise DaopError(f"{path}: not a valid hardware profile ({exc})") from exc
        if hidden_size is not None and not profile.matches(hidden_size, intermediate_size or 0, dtype or "", expert_format):
            raise DaopError(
                f"{path}: hardware profile is for experts {profile.hidden_size}x{profile.intermediate_size} "
                f"{profile.expert_format or profile.dtype}, but this model has {hidden_size}x{intermediate_size} "
                f"{expert_format or dtype}; run `daop calibrate` for it"
            )
        return profile


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() is empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_identity(device: torch.device) -> dict[str, str]:
    """What a measured profile depends on besides the expert shape: host, CPU, device, versions."""
    from daop.executors.cpu import physical_cores

    cuda = device.type == "cuda"
    return {
        "host": platform.node(),
        "cpu": cpu_model(),
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "cpu_cores": str(physical_cores()),
        "torch_threads": str(torch.get_num_threads()),
        "gpu": torch.cuda.get_device_name(device) if cuda else "none (device is the CPU)",
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda) if cuda else "none",
    }


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
              threads: int | None = None, quick: bool = False, mode: str | None = None,
              fmt: ExpertFormat | None = None) -> HardwareProfile:
    """Measure copy, CPU and GPU expert times for one expert shape (and stored format) on this machine.

    threads / mode None: chosen by measurement among the candidates; given: only that one is used.
    """
    from daop.executors.cpu import kernel_name, physical_cores
    from daop.executors.cpu_tuning import distinct_experts, driving_load, run_trial, tune
    from daop.quant import copy_into_slot, expert_forward, slot_shapes

    D, I = hidden_size, intermediate_size
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    repeat = 3 if quick else 10
    fmt = fmt or ExpertFormat("auto", dtype)
    experts = distinct_experts(D, I, fmt)
    host = list(experts[0])
    pinned = [t.pin_memory() for t in host] if cuda else host
    dev = [torch.empty(shape, dtype=dt, device=device) for shape, dt in slot_shapes(fmt, D, I, device)]

    def copy(src):
        return lambda: [copy_into_slot(d, s, non_blocking=True) for d, s in zip(dev, src)]

    copy_pinned = _median_ms(copy(pinned), repeat, sync)
    copy_pageable = _median_ms(copy(host), repeat, sync)
    load = driving_load(device)
    choice_counts = (1, 4) if quick else (1, 2, 4, 8)
    trials, best, reason = tune(experts, load, device, physical_cores(), threads, mode, choice_counts, repeat)
    shared = shared_channels(experts, copy(pinned), best.threads, repeat, device) if cuda else (0.0, 0.0)
    counts = (1, 4, 16, 64) if quick else (1, 2, 4, 8, 16, 32, 64, 128, 256)
    busy = run_trial(best.mode, best.threads, experts, counts, repeat, load, native=cuda).busy_ms
    gpu_counts = counts + ((1024,) if not quick else ())
    gpu_ms = tuple(_median_ms(lambda n=n: expert_forward(torch.randn(n, D, dtype=dtype, device=device), dev), repeat, sync)
                   for n in gpu_counts)
    return HardwareProfile(
        hidden_size=D, intermediate_size=I, dtype=str(dtype).replace("torch.", ""), expert_bytes=fmt.bytes(D, I),
        copy_pinned_ms=copy_pinned, copy_pageable_ms=copy_pageable, cpu_threads=best.threads,
        cpu_token_counts=counts, cpu_expert_ms=tuple(statistics.median(b) for b in busy),
        gpu_token_counts=gpu_counts, gpu_expert_ms=gpu_ms,
        cpu_threads_sweep={str(t.threads): round(t.wall_ms[0], 4) for t in trials if t.mode == best.mode},
        provenance={**host_identity(device), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "quick": str(quick)},
        cpu_mode=best.mode, cpu_threads_reason=reason,
        cpu_expert_ms_min=tuple(min(b) for b in busy), cpu_expert_ms_max=tuple(max(b) for b in busy), repeats=repeat,
        cpu_candidate_token_counts=choice_counts,
        cpu_candidates_ms={t.label: [round(ms, 4) for ms in t.wall_ms] for t in trials},
        expert_format=fmt.name, cpu_kernel=kernel_name(cuda),
        shared_cpu_factor=round(shared[0], 4), shared_copy_factor=round(shared[1], 4),
    )


def shared_channels(experts: list, copy, threads: int, repeat: int, device: torch.device) -> tuple[float, float]:
    """(CPU factor, copy factor): a one-token CPU expert's time while expert copies run, over its time
    alone, and an expert copy's time while CPU experts run, over its time alone. Both channels read
    host memory, so each slows the other (on an H200 host a CPU expert took 2.05 ms alone and 2.78 ms
    beside a copy, `scripts/channel_overlap_probe.py`). The CPU experts run as decode runs them (the
    C kernel where it serves, on `threads`); the copies on a side stream, timed by its events."""
    from daop.executors.cpu import CpuExecutor

    ex = CpuExecutor(threads, "inline", native=True)
    hidden, dtype = experts[0][len(experts[0]) // 2].shape[0], experts[0][1].dtype  # as `run_trial` reads them
    x = torch.randn(1, hidden).to(dtype)
    rows = torch.zeros(1, dtype=torch.long)
    calls = [0]

    def cpu_call() -> float:
        w = experts[calls[0] % len(experts)]
        calls[0] += 1
        t0 = time.perf_counter()
        ex.submit([(0, rows, w)], x, None).result()
        return (time.perf_counter() - t0) * 1000

    side = torch.cuda.Stream(device)

    def copies(n: int) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(side):
            start.record(side)
            for _ in range(n):
                copy()
            end.record(side)
        return start, end

    try:
        cpu_call()
        cpu_alone = statistics.median(cpu_call() for _ in range(repeat))
        start, end = copies(repeat)
        end.synchronize()
        copy_alone = start.elapsed_time(end) / repeat
        start, end = copies(repeat)
        beside = []
        while not end.query():
            beside.append(cpu_call())
        copy_beside = start.elapsed_time(end) / repeat
    finally:
        ex.close()
    if len(beside) < 3:  # the copies ended before the CPU got going: nothing to say
        return 0.0, 0.0
    return statistics.median(beside[1:]) / cpu_alone, copy_beside / copy_alone
