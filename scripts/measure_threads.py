"""Decode and prefill speed on a CPU device against torch's intra-op thread count, per model width.

Measures what `--threads` should default to: the shipped model, then synthetic Mixtral-shaped models
of growing width (random bf16 weights, all experts resident), each at 1, 2, 4, ... threads up to the
physical cores. `--busy N` starts N spinning processes first, as on a machine shared with other jobs.
A card first, a JSON row per point, a summary last (the fastest thread count per width):

    python scripts/measure_threads.py --output benchmarks/results/threads-2core-cpu-idle.jsonl
    python scripts/measure_threads.py --busy 1 --output benchmarks/results/threads-2core-cpu-busy1.jsonl

Rows of kind "automatic" measure the count daop picks by itself at that moment (daop.threads).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this checkout's daop, installed or not
from daop.bench.geometry import synthetic_decoder  # noqa: E402
from daop.engine import Engine  # noqa: E402
from daop.executors.cpu import physical_cores  # noqa: E402
from daop.model.specs import spec_by_name  # noqa: E402
from daop.runtime.setup import RuntimeOptions, prepare_runtime  # noqa: E402
from daop.sampling import SamplingParams  # noqa: E402
from daop.threads import choose_threads  # noqa: E402


def synthetic_engine(width: int, layers: int) -> Engine:
    """A Mixtral-shaped model of the given width (8 experts, top-2), every expert resident on the CPU."""
    heads = max(4, width // 128)
    raw = dict(model_type="mixtral", vocab_size=32000, hidden_size=width, intermediate_size=width * 7 // 2,
               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(2, heads // 4),
               num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6, max_position_embeddings=4096,
               rms_norm_eps=1e-5)
    spec = spec_by_name("mixtral")
    config = spec.config_from_hf(raw)
    decoder = synthetic_decoder(config, spec, torch.device("cpu"), torch.bfloat16)
    runtime = prepare_runtime(decoder, RuntimeOptions(policy="gpu", expert_ratio=1.0))
    gen = torch.Generator().manual_seed(0)
    for layer_idx in range(layers):
        for expert_idx in range(config.num_experts):
            for t in runtime.expert_dest(layer_idx, expert_idx):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.02)
    decoder.experts = runtime.start()
    return Engine(None, config, spec, decoder, None, 0.0)


def measure(engine: Engine, threads: int, prompt_tokens: int, gen_tokens: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    params = SamplingParams(max_new_tokens=gen_tokens)
    vocab = engine.config.vocab_size
    prefill, decode = [], []
    for r in range(repeats + 1):  # the first run warms up
        ids = [(7919 * (r * prompt_tokens + i)) % (vocab - 3) + 3 for i in range(prompt_tokens)]
        engine.eos_ids = frozenset()
        stats_gen = engine.generate_ids(ids, params)
        n = sum(1 for _ in stats_gen)
        s = engine.last_stats
        if r:
            prefill.append(s.prefill_s * 1000)
            decode.append(s.decode_s * 1000 / max(n - 1, 1))
    ms = statistics.median(decode)
    return {"threads": threads, "prefill_ms": round(statistics.median(prefill), 2), "decode_ms_per_token": round(ms, 3),
            "tokens_per_s": round(1000 / ms, 2)}


def spin() -> None:
    while True:
        pass


def thread_counts(cores: int) -> list[int]:
    out, t = [], 1
    while t < cores:
        out.append(t)
        t *= 2
    return out + [cores]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="128,512,1024,2048", help="hidden sizes; 128 is the shipped model itself")
    ap.add_argument("--layers", type=int, default=2, help="layers of the synthetic models")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--busy", type=int, default=0, help="spinning processes started first (a shared machine)")
    ap.add_argument("--output", default=None, help="also write the rows to this JSONL file")
    args = ap.parse_args()
    cores = physical_cores()
    spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.busy)]
    for p in spinners:
        p.start()
    out = open(args.output, "w") if args.output else None

    def emit(row: dict) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    emit({"kind": "card", "command": "python " + " ".join(sys.argv), "physical_cores": cores,
          "logical_cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(), "busy_processes": args.busy,
          "loadavg_1min": os.getloadavg()[0], "torch": torch.__version__, "commit": sha, "dtype": "bfloat16",
          "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "repeats": args.repeats})
    best: dict[int, int] = {}
    try:
        for width in (int(w) for w in args.widths.split(",")):
            engine = Engine.from_pretrained(None, device="cpu", progress=False) if width == 128 else \
                synthetic_engine(width, args.layers)
            model = "daop-moe-mini" if width == 128 else f"synthetic-mixtral-{width}-{args.layers}layers"
            points = []
            for threads in thread_counts(cores):
                row = {"kind": "point", "model": model, "hidden_size": width, "layers": engine.config.num_layers,
                       **measure(engine, threads, args.prompt_tokens, args.gen_tokens, args.repeats)}
                points.append(row)
                emit(row)
            auto = choose_threads(None, torch.device("cpu"))  # what `daop` would pick now (None: OMP_NUM_THREADS set)
            if auto is not None:
                emit({"kind": "automatic", "model": model, "hidden_size": width, "layers": engine.config.num_layers,
                      **measure(engine, auto, args.prompt_tokens, args.gen_tokens, args.repeats)})
            best[width] = min(points, key=lambda r: r["decode_ms_per_token"])["threads"]
            del engine
    finally:
        for p in spinners:
            p.terminate()
    emit({"kind": "summary", "fastest_decode_threads_by_hidden_size": best, "loadavg_1min": os.getloadavg()[0]})
    if out:
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
