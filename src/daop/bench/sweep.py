"""`daop bench`: sweep policy x expert ratio on a geometry; card first, a row per point, JSON last.

Each point: warm-up, then several prompts of random token ids (routing from the model's own
routers), greedy decode; medians of TTFT and decode time per output token, expert counters of
the decode phase per token, and measured/bound where the bound is
max(resident GPU expert time, bytes of non-resident experts / host memory bandwidth).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from daop.bench.geometry import geometry_config, synthetic_decoder, synthetic_host_experts
from daop.bench.trace import RoutingTrace, TraceRouting, load_traces
from daop.engine import Engine, GenerationStats, resolve_device
from daop.executors.cpu import physical_cores
from daop.hardware import HardwareProfile, calibrate
from daop.placement.cost import CostModel
from daop.runtime.setup import RuntimeOptions, hardware_profile, prepare_runtime
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


def git_sha() -> str:
    if os.environ.get("DAOP_GIT_SHA"):
        return os.environ["DAOP_GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def card(args, config, device, dtype, profile: HardwareProfile, bw: float) -> dict:
    cuda = device.type == "cuda"
    return {
        "kind": "card", "geometry": args.geometry, "layers": config.num_layers, "experts": config.num_experts,
        "top_k": config.top_k, "dtype": str(dtype).replace("torch.", ""),
        "gpu": torch.cuda.get_device_name(device) if cuda else "none (CPU as device)",
        "gpu_memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1) if cuda else None,
        "cpu": platform.processor() or platform.machine(), "cpu_threads": profile.cpu_threads,
        "torch": torch.__version__, "git_sha": git_sha(), "expert_bytes": profile.expert_bytes,
        "host_bandwidth_gbps": round(bw, 1), "routing_source": "synthetic model's own routers",
        "hardware_profile": {k: v for k, v in profile.__dict__.items() if k != "provenance"},
        "prompt_tokens": args.traces[0].prompt_len if args.traces else args.prompt_tokens,
        "gen_tokens": len(args.traces[0].tokens) - args.traces[0].prompt_len if args.traces else args.gen_tokens,
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
    dec.routing_override = TraceRouting(trace, engine.config.num_layers, engine.config.num_experts, engine.config.top_k)
    runner = dec.experts
    runner.prediction_source = dec.routing_override if hasattr(runner, "prediction_source") else None
    tokens, p = trace.tokens, trace.prompt_len
    engine.reset_runner("prefill")
    cache = dec.new_cache(1, len(tokens))
    t0 = time.perf_counter()
    dec.forward(torch.tensor([tokens[:p]]), 0, cache).argmax(-1).cpu()
    stats.prefill_s = time.perf_counter() - t0
    stats.extra["counters_after_prefill"] = engine.counters()
    engine.set_phase("decode")
    t1 = time.perf_counter()
    for pos in range(p, len(tokens) - 1):
        dec.forward(torch.tensor([[tokens[pos]]]), pos, cache).argmax(-1).cpu()
    stats.decode_s = time.perf_counter() - t1
    stats.generated_tokens = len(tokens) - p
    return stats.generated_tokens


def measure_point(engine: Engine, args, cost: CostModel, bw: float, expert_bytes: int) -> dict:
    gen = torch.Generator().manual_seed(1234)
    params = SamplingParams(max_new_tokens=args.gen_tokens)
    prompts = [torch.randint(3, engine.config.vocab_size, (args.prompt_tokens,), generator=gen).tolist() for _ in range(args.prompts + 1)]
    list(engine.generate_ids(prompts[0], SamplingParams(max_new_tokens=4)))  # warm-up
    ttft, tpot, totals = [], [], []
    runs = args.traces if args.traces else prompts[1:]
    for item in runs:
        stats = GenerationStats()
        t0 = time.perf_counter()
        n = replay(engine, item, stats) if args.traces else len(list(engine.generate_ids(item, params, stats)))
        wall = time.perf_counter() - t0
        ttft.append(stats.prefill_s * 1000)
        tpot.append(stats.decode_s / max(n - 1, 1) * 1000)
        totals.append((n, wall, decode_counters(engine, stats)))
    steps = sum(max(n - 1, 1) for n, _, _ in totals)
    agg = {k: sum(c[k] for _, _, c in totals) / steps for k in totals[0][2]} if totals[0][2] else {}
    resident = agg.get("resident_calls", engine.config.top_k * sum(engine.config.is_moe_layer(i) for i in range(engine.config.num_layers)))
    missing = agg.get("cpu_calls", 0.0) + agg.get("copy_calls", 0.0)
    host_bytes = agg.get("cpu_calls", 0.0) * expert_bytes + agg.get("copied_bytes", 0.0)
    bound_ms = max(resident * cost.gpu_ms(1), host_bytes / (bw * 1e9) * 1000)
    calls = resident + missing
    med_tpot = statistics.median(tpot)
    return {
        "ttft_ms": round(statistics.median(ttft), 2), "decode_ms_per_token": round(med_tpot, 3),
        "decode_ms_spread": [round(min(tpot), 3), round(max(tpot), 3)],
        "tokens_per_s_incl_prefill": round(statistics.median(n / w for n, w, _ in totals), 3),
        "gpu_hit_rate": round(resident / calls, 4) if calls else 1.0,
        "resident_calls_per_token": round(resident, 3), "cpu_calls_per_token": round(agg.get("cpu_calls", 0.0), 3),
        "copy_calls_per_token": round(agg.get("copy_calls", 0.0), 3),
        "h2d_bytes_per_token": round(agg.get("copied_bytes", 0.0)),
        "cpu_wait_share": round(agg.get("cpu_wait_s", 0.0) * 1000 / med_tpot, 3) if med_tpot else 0.0,
        "prediction_precision": round(agg["predicted_hits"] / agg["predicted_total"], 4) if agg.get("predicted_total") else None,
        "degradation_rate": round(agg["degraded_tokens"] / agg["predicted_total"], 4) if agg.get("predicted_total") else None,
        "bound_ms": round(bound_ms, 3), "measured_over_bound": round(med_tpot / bound_ms, 2) if bound_ms else None,
    }


def run(args) -> dict:
    device = resolve_device(args.device)
    dtype = parse_dtype(args.dtype, "bf16")
    config, spec = geometry_config(args.geometry, args.layers)
    args.traces, trace_source = [], "synthetic model's own routers"
    if args.trace:
        args.traces, provenance = load_traces(Path(args.trace))
        args.traces = args.traces[: args.prompts]
        trace_source = {"trace": str(args.trace), **provenance}
    decoder = synthetic_decoder(config, spec, device, dtype)
    host = synthetic_host_experts(config, dtype, pin=device.type == "cuda")
    threads = args.cpu_threads or physical_cores()
    opts = RuntimeOptions(cpu_threads=threads, hardware_profile=args.hardware_profile)
    if args.hardware_profile:
        profile = hardware_profile(decoder, opts, threads)
    else:  # a full calibration, saved next to the results so the run can be repeated with it
        profile = calibrate(config.hidden_size, config.expert_intermediate_size, dtype, device, threads, quick=args.smoke)
        if args.output:
            profile.save(Path(args.output).with_suffix(".profile.json"))
    cost, bw = CostModel(profile), host_bandwidth_gbps()
    out = open(args.output, "a") if args.output else None

    def emit(row: dict) -> None:
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()

    the_card = card(args, config, device, dtype, profile, bw)
    the_card["routing_source"] = trace_source
    print(json.dumps(the_card), file=sys.stderr)
    emit(the_card)
    rows = []
    print(f"{'policy':10} {'ratio':>6} {'TTFT ms':>9} {'ms/token':>9} {'tok/s':>7} {'hit':>6} {'cpu/t':>6} {'copy/t':>6} {'x bound':>7}")
    for ratio in args.ratios:
        for policy in args.policies:
            r = 1.0 if policy == "gpu" else ratio
            if policy == "gpu" and any(x["policy"] == "gpu" for x in rows):
                continue
            runtime = prepare_runtime(decoder, RuntimeOptions(policy=policy, expert_ratio=r, cpu_threads=threads,
                                                             hardware_profile=args.hardware_profile), host=host)
            decoder.experts = runtime.start()
            engine = Engine(None, config, spec, decoder, None, 0.0)
            point = {"kind": "point", "geometry": args.geometry, "layers": config.num_layers, "policy": policy,
                     "expert_ratio": r, "batch": 1, **measure_point(engine, args, cost, bw, profile.expert_bytes)}
            rows.append(point)
            emit(point)
            print(f"{policy:10} {r:6.3f} {point['ttft_ms']:9.1f} {point['decode_ms_per_token']:9.2f} "
                  f"{1000 / point['decode_ms_per_token']:7.2f} {point['gpu_hit_rate']:6.2f} {point['cpu_calls_per_token']:6.2f} "
                  f"{point['copy_calls_per_token']:6.2f} {point['measured_over_bound'] or 0:7.2f}", flush=True)
            decoder.routing_override = None
            cpu = getattr(decoder.experts, "cpu", None)
            if cpu is not None:
                cpu.close()
            decoder.experts = None
            del runtime, engine
            if device.type == "cuda":
                torch.cuda.empty_cache()
    summary = {"kind": "summary", "card": the_card, "points": rows}
    emit(summary)
    if out:
        out.close()
    print(json.dumps(summary))
    return summary
