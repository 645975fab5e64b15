"""Command line: daop generate | chat (more subcommands register themselves from their modules).

Errors caused by input print one line `daop: error: ...` and exit with status 2; Ctrl-C exits
with status 130 without a traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from daop.errors import DaopError

Command = Callable[[argparse.Namespace], int]


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint folder (Hugging Face layout); default: the shipped daop-moe-mini")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: the checkpoint's dtype")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while loading")
    g = p.add_argument_group("offloading")
    g.add_argument("--policy", default=None, help="gpu, daop, daop-exact, daop-paper, daop-stale, fiddler, static, lru, ondemand "
                   "(default: gpu if all experts fit, else daop)")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--gpu-memory", default=None, help="GPU memory budget, e.g. 20GiB (default: free GPU memory)")
    budget.add_argument("--expert-ratio", type=float, default=None, help="share of routed experts resident on the GPU, 0..1")
    g.add_argument("--cpu-threads", type=int, default=None, help="threads for CPU experts (default: the calibrated choice)")
    g.add_argument("--cpu-mode", default=None, choices=["worker", "inline"],
                   help="run CPU experts on a worker thread or inline on the driving thread (default: the calibrated choice)")
    g.add_argument("--hardware-profile", default=None, help="JSON from `daop calibrate` (default: cached or quick calibration)")
    g.add_argument("--routing-stats", default=None, help="routing statistics JSON (expert popularity for placement)")
    g.add_argument("--max-context", type=int, default=None, help="context to reserve KV cache for in the budget")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed, stop=args.stop)


def load_engine(args: argparse.Namespace):
    from daop.engine import Engine

    return Engine.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, progress=not args.no_progress, policy=args.policy,
        gpu_memory=args.gpu_memory, expert_ratio=args.expert_ratio, cpu_threads=args.cpu_threads,
        cpu_mode=args.cpu_mode, hardware_profile=args.hardware_profile, routing_stats=args.routing_stats, max_context=args.max_context,
    )


def print_stats(engine, detailed: bool = False) -> None:
    s = engine.last_stats
    if detailed:
        print(f"[daop] policy {engine.policy}: {engine.budget.describe()}", file=sys.stderr)
        counters = getattr(engine.decoder.experts, "counters", None)
        if counters is not None:
            rates = counters.summary(s.prompt_tokens + s.generated_tokens)
            print("[daop] per token: " + ", ".join(f"{k} {v:.3g}" for k, v in rates.items()), file=sys.stderr)
    print(
        f"[daop] prompt {s.prompt_tokens} tokens, generated {s.generated_tokens} tokens ({s.finish_reason}); "
        f"prefill {s.prefill_s * 1000:.0f} ms, decode {s.decode_tokens_per_s:.1f} tokens/s; load {engine.load_s:.2f} s",
        file=sys.stderr,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    engine = load_engine(args)
    for piece in engine.stream(prompt, **sampling_kwargs(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print_stats(engine, args.stats)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from daop.config import load_config
    from daop.engine import default_model_dir, resolve_device
    from daop.hardware import calibrate
    from daop.runtime.profile_cache import ProfileRequest, locate
    from daop.weights.loader import parse_dtype

    model_dir = Path(args.model) if args.model else default_model_dir()
    config = load_config(model_dir)
    device = resolve_device(args.device)
    dtype = parse_dtype(args.dtype, config.torch_dtype)
    if args.show:
        request = ProfileRequest(config, dtype, device, args.hardware_profile, args.cpu_threads, args.cpu_mode)
        source = locate(request)
        print(f"{source.kind}: {source.path}")
        print(f"why: {source.reason}")
        if source.profile is not None:
            p = source.profile
            print(f"cpu: {p.cpu_mode} with {p.cpu_threads} threads, {p.cpu_expert_ms[0]:.3f} ms per expert at "
                  f"{p.cpu_token_counts[0]} token; chosen because: {p.cpu_threads_reason}")
        return 0
    profile = calibrate(config.hidden_size, config.expert_intermediate_size, dtype, device, args.cpu_threads,
                        quick=args.quick, mode=args.cpu_mode)
    profile.provenance["model"] = str(model_dir)
    out = Path(args.output)
    profile.save(out)
    print(f"[daop] expert {profile.expert_bytes / 2**20:.1f} MiB: copy pinned {profile.copy_pinned_ms:.2f} ms, "
          f"pageable {profile.copy_pageable_ms:.2f} ms, CPU 1 token {profile.cpu_expert_ms[0]:.2f} ms "
          f"({profile.cpu_mode}, {profile.cpu_threads} threads), GPU 1 token {profile.gpu_expert_ms[0]:.3f} ms -> {out}",
          file=sys.stderr)
    print(f"[daop] CPU threads: {profile.cpu_threads_reason}", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    engine = load_engine(args)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print(f"daop chat with {engine.model_dir.name} on {engine.device}. /exit or Ctrl-D leaves, /reset forgets.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            pieces = []
            for piece in engine.stream(engine.chat_prompt(messages), **sampling_kwargs(args)):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except DaopError as exc:
            messages.pop()
            print(f"daop: error: {exc}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(pieces).strip()})


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise DaopError("the server needs FastAPI and uvicorn: pip install 'daop[server]'") from None
    from daop.server import serve

    return serve(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from daop.bench import report
    from daop.bench.sweep import run

    if args.plot:
        print(report.plot(Path(args.plot), Path(args.plot).with_suffix(".png")))
        return 0
    if args.table:
        print(report.markdown_table(Path(args.table)), end="")
        return 0
    if args.smoke:
        args.geometry, args.layers, args.device, args.dtype = "tiny-mixtral", None, "cpu", "fp32"
        args.prompt_tokens, args.gen_tokens, args.prompts = "32", "8", 2
    args.policies = [p.strip() for p in args.policies.split(",") if p.strip()]

    def numbers(name: str, kind):
        try:
            return [kind(x) for x in str(getattr(args, name)).split(",") if x.strip()]
        except ValueError as exc:
            raise DaopError(f"--{name.replace('_', '-')} must be comma-separated numbers ({exc})") from exc

    args.ratios = numbers("ratios", float)
    args.prompt_tokens, args.gen_tokens, args.batch = (numbers(n, int) for n in ("prompt_tokens", "gen_tokens", "batch"))
    run(args)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from daop.profile import run_profile

    stats = run_profile(args.model, args.data, args.output, args.max_docs, args.prompt_tokens, args.gen_tokens,
                        args.device, args.dtype)
    prov, parts = stats["provenance"], []
    for key, label in (("prefill_decode_overlap", "prefill->decode overlap"), ("next_layer_top1", "next-layer top-1"),
                       ("next_layer_set_overlap", "set overlap")):
        mean = stats[key]["mean"]
        parts.append(f"{label} " + ("n/a" if mean is None else f"{100 * mean:.1f} %"))
    print(f"[daop] {prov['docs']} documents, {prov['prompt_tokens']} prompt + {prov['decode_tokens']} decode tokens: "
          f"{', '.join(parts)} -> {args.output}", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from daop.engine import Engine
    from daop.evaluate import EvalArgs, compare, score

    eval_args = EvalArgs(Path(args.data), args.max_docs, args.prompt_tokens, args.continuation_tokens, args.gen_tokens,
                         Path(args.gsm8k) if args.gsm8k else None, args.gsm8k_items)
    base = dict(device=args.device, dtype=args.dtype, progress=not args.no_progress, gpu_memory=args.gpu_memory,
                expert_ratio=args.expert_ratio, cpu_threads=args.cpu_threads, cpu_mode=args.cpu_mode,
                hardware_profile=args.hardware_profile,
                routing_stats=args.routing_stats, max_context=args.max_context)
    # Exact inference at the same budget is the reference (every exact policy equals the all-GPU path);
    # the two engines run one after the other so only one model is in memory at a time.
    ref_policy = "gpu" if args.expert_ratio is None and args.gpu_memory is None else "daop-exact"
    reference = score(Engine.from_pretrained(args.model, policy=ref_policy, **base), eval_args)
    ours = score(Engine.from_pretrained(args.model, policy=args.policy, **base), eval_args)
    report = {"policy": args.policy, "reference_policy": ref_policy, "expert_ratio": args.expert_ratio,
              "data": args.data, **compare(reference, ours, args.gen_tokens)}
    print(json.dumps(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="daop", description="Run Mixture-of-Experts models on a GPU too small to hold them.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete a prompt, streaming to stdout")
    add_model_args(gen)
    add_sampling_args(gen)
    gen.add_argument("prompt", nargs="?", default=None, help="prompt text (default: read stdin)")
    gen.add_argument("--stats", action="store_true", help="print budget, placement and expert counters to stderr")
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", help="interactive chat using the checkpoint's chat template")
    add_model_args(chat)
    add_sampling_args(chat)
    chat.add_argument("--system", default=None, help="system message")
    chat.set_defaults(func=cmd_chat)
    cal = sub.add_parser("calibrate", help="measure copy, CPU and GPU expert costs; write a hardware profile JSON")
    cal.add_argument("--model", default=None)
    cal.add_argument("--device", default=None, choices=["cpu", "cuda"])
    cal.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    cal.add_argument("--cpu-threads", type=int, default=None, help="measure only this thread count (default: choose)")
    cal.add_argument("--cpu-mode", default=None, choices=["worker", "inline"], help="measure only this mode (default: choose)")
    cal.add_argument("--show", action="store_true",
                     help="print which profile a run would use (file, cached, or fresh) and why; measure nothing")
    cal.add_argument("--hardware-profile", default=None, help="with --show: the profile file a run would be given")
    cal.add_argument("--quick", action="store_true", help="fewer repeats and token counts")
    cal.add_argument("--output", default="hardware-profile.json")
    cal.set_defaults(func=cmd_calibrate)
    ev = sub.add_parser("eval", help="quality of a policy against exact inference (decode-path perplexity, greedy agreement, GSM8K)")
    add_model_args(ev)
    ev.add_argument("--data", required=True, help="text / JSONL / ShareGPT JSON documents")
    ev.add_argument("--max-docs", type=int, default=16)
    ev.add_argument("--prompt-tokens", type=int, default=64)
    ev.add_argument("--continuation-tokens", type=int, default=64)
    ev.add_argument("--gen-tokens", type=int, default=32)
    ev.add_argument("--gsm8k", default=None, help="JSONL with question/answer (GSM8K format)")
    ev.add_argument("--gsm8k-items", type=int, default=20)
    ev.set_defaults(func=cmd_eval)
    bench = sub.add_parser("bench", help="sweep policies x expert ratios on a model geometry; JSON last")
    bench.add_argument("--geometry", default="mixtral-8x7b", help="mixtral-8x7b, phi-3.5-moe, qwen3-30b-a3b, tiny-mixtral")
    bench.add_argument("--layers", type=int, default=None, help="cut depth when host memory is short (stated on the card)")
    bench.add_argument("--policies", default="gpu,fiddler,static,lru,ondemand,daop-paper,daop-exact",
                       help="comma-separated; 'accelerate' adds transformers + accelerate offloading (pip install 'daop[bench]')")
    bench.add_argument("--ratios", default="0.25,0.375,0.5,0.625", help="comma-separated shares of routed experts on the GPU")
    bench.add_argument("--model", default=None, help="benchmark a real checkpoint instead of a synthetic geometry")
    bench.add_argument("--prompts-file", default=None, help="prompt texts for --model: a text/JSONL/ShareGPT file, or 'sharegpt'")
    bench.add_argument("--prompt-tokens", default="256", help="comma-separated prompt lengths")
    bench.add_argument("--gen-tokens", default="256", help="comma-separated generation lengths")
    bench.add_argument("--batch", default="1", help="comma-separated batch sizes")
    bench.add_argument("--prompts", type=int, default=10)
    bench.add_argument("--device", default=None, choices=["cpu", "cuda"])
    bench.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    bench.add_argument("--cpu-threads", type=int, default=None)
    bench.add_argument("--cpu-mode", default=None, choices=["worker", "inline"])
    bench.add_argument("--hardware-profile", default=None)
    bench.add_argument("--output", default=None, help="append every row to this JSONL file")
    bench.add_argument("--trace", default=None, help="replay routing recorded from a trained model (.npz from scripts/record_traces.py)")
    bench.add_argument("--smoke", action="store_true", help="tiny CPU run (under a minute) that checks the benchmark works")
    bench.add_argument("--plot", metavar="RESULTS", default=None, help="draw RESULTS (JSONL) as a PNG next to it, then exit")
    bench.add_argument("--table", metavar="RESULTS", default=None, help="print RESULTS (JSONL) as a Markdown table, then exit")
    bench.set_defaults(func=cmd_bench)
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs: pip install 'daop[server]')")
    add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body accepted (default: 1 MiB)")
    serve.add_argument("--model-name", default=None, help="model id clients use (default: the checkpoint folder's name)")
    serve.set_defaults(func=cmd_serve)
    prof = sub.add_parser("profile", help="routing statistics of a calibration set (expert popularity, overlap, prediction); JSON")
    prof.add_argument("--model", default=None, help="checkpoint folder (default: the shipped daop-moe-mini)")
    prof.add_argument("--data", required=True, help="calibration text: plain text (blank-line separated), .jsonl with \"text\", or ShareGPT .json")
    prof.add_argument("--max-docs", type=int, default=None, help="use only the first N documents")
    prof.add_argument("--prompt-tokens", type=int, default=128, help="prompt tokens per document (prefill)")
    prof.add_argument("--gen-tokens", type=int, default=32, help="greedy decode steps per document")
    prof.add_argument("--output", default="routing-stats.json")
    prof.add_argument("--device", default=None, choices=["cpu", "cuda"])
    prof.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    prof.set_defaults(func=cmd_profile)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DaopError as exc:
        print(f"daop: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ndaop: interrupted", file=sys.stderr)
        return 130
    except MemoryError as exc:
        print(f"daop: error: out of host memory ({exc}); use a smaller --max-context or --dtype", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if "out of memory" not in str(exc):
            raise
        first = str(exc).strip().splitlines()[0]
        print(f"daop: error: GPU out of memory ({first}); lower --gpu-memory / --expert-ratio or --max-context", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
