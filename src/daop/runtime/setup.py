"""Turn user options (policy, budget, threads, profile) into an expert runner for a decoder."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from daop.errors import DaopError
from daop.executors.cpu import MODES as CPU_MODES
from daop.executors.cpu import CpuExecutor, default_cpu_threads
from daop.executors.transfer import Transfer
from daop.hardware import HardwareProfile
from daop.model.decoder import Decoder
from daop.model.layers import KVCache
from daop.model.moe import ExpertRunner
from daop.placement.budget import Budget, resolve_budget
from daop.placement.cost import CostModel
from daop.placement.daop import PRESETS, make_daop
from daop.placement.policies import POLICIES, PolicyContext, make_policy
from daop.runtime.daop_runner import DaopRunner

from daop.runtime.offload import OffloadedExperts
from daop.runtime.profile_cache import ProfileRequest, obtain
from daop.quant import DEFAULT_GROUP_SIZE, ExpertFormat, parse_expert_dtype
from daop.weights.expert_store import ExpertStore, HostExperts, ResidentExperts

ALL_POLICIES = [*POLICIES, *PRESETS]


@dataclass(frozen=True)
class RuntimeOptions:
    """The user's knobs. policy None = automatic: all on the GPU if it fits, else daop (exact)."""

    policy: str | None = None
    gpu_memory: str | int | None = None
    expert_ratio: float | None = None
    cpu_threads: int | None = None
    cpu_mode: str | None = None
    hardware_profile: str | HardwareProfile | None = None  # a path, or a profile already in hand (benchmarks)
    routing_stats: str | None = None
    max_context: int | None = None
    expert_dtype: str | None = None  # auto (the model's dtype), int8 or int4: how routed experts are stored
    group_size: int | None = None  # int4: input channels per scale and zero (None: the default, 128)
    cuda_graphs: bool = True  # capture decode steps that stay on the device (the all-GPU path)
    max_batch: int | None = 1  # sequences served at once (`daop serve`): KV cache rows reserved in the
    # budget; None: as many as fit in a share of the free memory (auto_max_batch)

    def __post_init__(self) -> None:
        if self.policy is not None and self.policy not in ALL_POLICIES:
            raise DaopError(f"unknown policy {self.policy!r}; choose one of {', '.join(ALL_POLICIES)}")
        if self.cpu_threads is not None and (not isinstance(self.cpu_threads, int) or self.cpu_threads < 1):
            raise DaopError(f"--cpu-threads must be a positive integer, got {self.cpu_threads!r}")
        if self.cpu_mode is not None and self.cpu_mode not in CPU_MODES:
            raise DaopError(f"--cpu-mode must be one of {', '.join(CPU_MODES)}, got {self.cpu_mode!r}")
        if self.max_batch is not None and (not isinstance(self.max_batch, int) or isinstance(self.max_batch, bool)
                                           or self.max_batch < 1):
            raise DaopError(f"--max-batch must be a positive integer, got {self.max_batch!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise DaopError(f"--group-size must be a positive integer, got {self.group_size!r}")

    def expert_format(self, decoder: Decoder) -> ExpertFormat:
        """The routed experts' stored format for this model, checked against its shapes and device."""
        return resolve_expert_format(decoder.config, decoder.dtype, decoder.device, self.expert_dtype, self.group_size)


def resolve_expert_format(config, dtype: torch.dtype, device: torch.device, expert_dtype: str | None,
                  group_size: int | None = None) -> ExpertFormat:
    """--expert-dtype and --group-size as a checked ExpertFormat (one clear line when they cannot work)."""
    fmt = ExpertFormat(parse_expert_dtype(expert_dtype, dtype), dtype, group_size or DEFAULT_GROUP_SIZE).for_model(config)
    fmt.check(config.hidden_size, config.expert_intermediate_size)
    if fmt.kind == "int4" and device.type == "cuda" and dtype != torch.bfloat16:
        raise DaopError(f"int4 experts on CUDA need --dtype bf16 (torch's CUDA int4 kernel), not {str(dtype).removeprefix('torch.')}")
    return fmt


def dense_bytes(decoder: Decoder) -> int:
    seen, total = set(), 0
    for t in decoder.dense_tensors().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def load_popularity(path: str | None, num_layers: int, num_experts: int) -> np.ndarray:
    """Decode activation counts [L, E] from a routing-statistics JSON; uniform when none is given."""
    if path is None:
        return np.ones((num_layers, num_experts))
    try:
        data = json.loads(Path(path).read_text())
        counts = np.asarray(data["decode_counts"], dtype=np.float64)
    except (OSError, json.JSONDecodeError, KeyError, ValueError, TypeError) as exc:
        raise DaopError(f"{path}: not a routing-statistics file ({exc})") from exc
    if counts.shape != (num_layers, num_experts):
        raise DaopError(f"{path}: decode_counts has shape {list(counts.shape)}, this model needs [{num_layers}, {num_experts}]")
    return counts


def profile_request(decoder: Decoder, opts: RuntimeOptions) -> ProfileRequest:
    return ProfileRequest(decoder.config, decoder.dtype, decoder.device, opts.hardware_profile, opts.cpu_threads, opts.cpu_mode,
                          opts.expert_format(decoder))


def hardware_profile(decoder: Decoder, opts: RuntimeOptions) -> HardwareProfile:
    """The given profile (validated against the model), a trusted cached one, or a quick calibration."""
    return obtain(profile_request(decoder, opts))[0]


@dataclass
class PreparedRuntime:
    """Where the loader writes expert weights, and how to start the runner once they are loaded."""

    budget: Budget
    policy_name: str
    fmt: ExpertFormat
    expert_dest: Callable[[int, int], tuple]  # (gate, up, down) of a float checkpoint
    stored_dest: Callable[[int, int], tuple]  # the stored tensors of a quantized folder
    start: Callable[[], ExpertRunner]
    max_batch: int = 1  # KV cache rows the budget holds for concurrent sequences


AUTO_BATCH_ROWS = 8  # the most sequences --max-batch picks by itself
AUTO_BATCH_KV_SHARE = 0.15  # of the free GPU memory, at most, for the KV cache rows it picks


def auto_max_batch(kv_row_bytes: int, free_bytes: int | None) -> int:
    """Concurrent sequences when --max-batch is not given: AUTO_BATCH_ROWS on the CPU; on a GPU as
    many (1 to AUTO_BATCH_ROWS) as keep their KV cache rows within AUTO_BATCH_KV_SHARE of the free
    memory, so experts keep most of it (--max-context shortens each row)."""
    if free_bytes is None:
        return AUTO_BATCH_ROWS
    return max(1, min(AUTO_BATCH_ROWS, int(AUTO_BATCH_KV_SHARE * free_bytes // max(kv_row_bytes, 1))))


def prepare_runtime(decoder: Decoder, opts: RuntimeOptions, kv_batch: int = 1, host: HostExperts | None = None) -> PreparedRuntime:
    """Resolve the budget and policy, and allocate expert storage (host store and GPU slots).

    With `host` (already filled), the runner reuses it, so benchmarks can try many policies
    without reloading; the all-resident path then copies experts from it.
    """
    c, dev = decoder.config, decoder.device
    decoder.cuda_graphs = opts.cuda_graphs
    fmt = opts.expert_format(decoder)
    if host is not None and host.fmt != fmt:
        raise DaopError(f"the host experts are stored as {host.fmt.name}, this runtime asks for {fmt.name}")
    context = min(opts.max_context or c.context_length, c.context_length)
    free = torch.cuda.mem_get_info(dev)[0] + dense_bytes(decoder) if dev.type == "cuda" else None
    rows = opts.max_batch or auto_max_batch(KVCache.bytes_needed(c, 1, context, decoder.dtype), free)
    kv = KVCache.bytes_needed(c, max(kv_batch, rows), context, decoder.dtype)
    budget = resolve_budget(c, fmt.bytes(c.hidden_size, c.expert_intermediate_size), dense_bytes(decoder), kv, free,
                            opts.gpu_memory, opts.expert_ratio)
    budget = replace(budget, expert_format=fmt.name)
    policy_name = opts.policy or ("gpu" if budget.gpu_slots >= budget.total_experts else "daop")
    if policy_name == "gpu" and budget.gpu_slots >= budget.total_experts:
        experts = ResidentExperts(c, dev, fmt)
        if host is not None:
            experts.fill_from(host)
        def start_resident() -> ExpertRunner:
            experts.release_load_buffers()
            return experts

        return PreparedRuntime(budget, policy_name, fmt, experts.load_views, experts.stored_views, start_resident, rows)
    moe_layers = c.moe_layer_ids()
    if dev.type == "cpu" and opts.cpu_threads is None:
        # CPU experts use the "GPU" work's thread count, so exact policies stay bitwise equal, and
        # the profile is measured at that count
        opts = replace(opts, cpu_threads=torch.get_num_threads())
    needs_costs = policy_name == "fiddler" or policy_name in PRESETS
    uses_cpu = needs_costs or policy_name == "static"
    # The CPU executor's threads and mode come from the profile's measurements unless the user set them.
    profile = hardware_profile(decoder, opts) if needs_costs or (uses_cpu and opts.cpu_threads is None) else None
    threads = opts.cpu_threads or (profile.cpu_threads if profile else default_cpu_threads(dev))
    mode = opts.cpu_mode or (profile.cpu_mode if profile else "worker")
    ctx = PolicyContext(
        num_layers=c.num_layers, num_experts=c.num_experts, top_k=c.top_k, gpu_slots=budget.gpu_slots,
        moe_layers=moe_layers, popularity=load_popularity(opts.routing_stats, c.num_layers, c.num_experts),
        cost=CostModel(profile),
    )
    policy = make_daop(policy_name, ctx) if policy_name in PRESETS else make_policy(policy_name, ctx)
    store = ExpertStore(c, fmt, dev, budget.gpu_slots, host)
    native = dev.type == "cuda"  # CPU experts of a GPU model may use daop's CPU kernel (see executors/cpu.py)

    def start() -> ExpertRunner:
        store.release_load_buffers()
        if policy_name in PRESETS:
            return DaopRunner(store, policy, CpuExecutor(threads, mode, native=native, glu=fmt.glu), Transfer(dev), c.num_layers,
                              routing=lambda: decoder.routing)
        return OffloadedExperts(store, policy, CpuExecutor(threads, mode, native=native, glu=fmt.glu), Transfer(dev), c.num_layers)

    return PreparedRuntime(budget, policy_name, fmt, store.load_views, store.stored_views, start, rows)
