"""Command line: daop generate | chat | quantize (more subcommands register themselves from their modules).

Errors caused by input print one line `daop: error: ...` and exit with status 2; Ctrl-C exits
with status 130 without a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from typing import Callable

from daop import __version__
from daop.console import clean_text, read_prompt, warn_replaced
from daop.errors import DaopError
from daop.threads import apply_threads

Command = Callable[[argparse.Namespace], int]


DTYPES = ["auto", "bfloat16", "float16", "float32", "bf16", "fp16", "fp32"]
DTYPE_HELP = "weights' dtype: auto (the checkpoint's), bfloat16|bf16, float16|fp16, float32|fp32 (default: auto)"
EXPERT_DTYPES = ["auto", "int8", "int4", *DTYPES[1:]]
EXPERT_DTYPE_HELP = ("how routed experts are stored: auto (as --dtype), int8 (per-channel weight-only, half the bytes) or "
                     "int4 (group-wise, about a quarter); quantized once at load, dense weights stay in --dtype (default: auto, "
                     "or what a folder from `daop quantize` stores)")


def add_expert_dtype_args(g) -> None:
    g.add_argument("--expert-dtype", default=None, choices=EXPERT_DTYPES, metavar="DTYPE", help=EXPERT_DTYPE_HELP)
    g.add_argument("--group-size", type=int, default=None, metavar="N",
                   help="int4 experts: input channels per scale and zero, a power of two >= 32 (default: 128, or "
                        "what a folder from `daop quantize` stores)")
def add_graph_arg(g) -> None:
    g.add_argument("--no-cuda-graphs", action="store_true",
                   help="run every decode step eagerly; by default a CUDA step that stays on the device (the all-GPU "
                        "path) is captured once as a CUDA graph and replayed")


THREADS_HELP = ("torch threads for the dense path (attention, resident experts), like llama.cpp's -t "
                "(default: on a CPU device the cores other processes leave idle, one fewer for serve, "
                "or OMP_NUM_THREADS if set; "
                "on CUDA torch's default)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="local checkpoint folder in Hugging Face layout, e.g. from `huggingface-cli download REPO "
                        "--local-dir DIR` (default: the shipped daop-moe-mini)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=DTYPES, metavar="DTYPE", help=DTYPE_HELP)
    p.add_argument("--threads", "-t", type=int, default=None, metavar="N", help=THREADS_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bar while loading")
    g = p.add_argument_group("offloading")
    g.add_argument("--policy", default=None, help="gpu, daop, daop-exact, daop-strict, daop-paper, daop-stale, fiddler, static, "
                   "lru, ondemand (default: gpu if all experts fit, else daop). Exact policies route as gpu does; their "
                   "outputs differ from gpu only by CPU-vs-GPU rounding of experts run on the CPU (daop-strict, lru and "
                   "ondemand run none: bitwise equal to gpu); daop-paper and daop-stale approximate")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--gpu-memory", default=None, help="GPU memory budget, e.g. 20GiB (default: free GPU memory)")
    budget.add_argument("--expert-ratio", type=float, default=None,
                        help="share of routed experts resident on the GPU, 0..1 (default: from --gpu-memory)")
    g.add_argument("--cpu-threads", type=int, default=None, metavar="N",
                   help="threads of the pool that computes offloaded experts on the CPU; not the dense path "
                        "(see --threads) (default: the --threads count on a CPU device; with CUDA, the calibrated choice)")
    g.add_argument("--cpu-mode", default=None, choices=["worker", "inline"],
                   help="run CPU experts on a worker thread or inline on the driving thread (default: the calibrated choice)")
    g.add_argument("--hardware-profile", default=None, help="JSON from `daop calibrate` (default: cached or quick calibration)")
    g.add_argument("--routing-stats", default=None,
                   help="routing statistics JSON from `daop profile` (expert popularity for placement) (default: uniform)")
    g.add_argument("--max-context", type=int, default=None,
                   help="context to reserve KV cache for in the GPU budget (default: the model's context window)")
    add_expert_dtype_args(g)
    add_graph_arg(g)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the checkpoint's generation_config.json where it sets them)")
    g.add_argument("--max-new-tokens", "-n", type=int, default=256, metavar="N",
                   help="most tokens to generate; the context window can stop it sooner (default: 256)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1] (default: 1 = off)")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: 0 = off)")
    g.add_argument("--min-p", type=float, default=None,
                   help="drop tokens less likely than min-p times the top token, in [0, 1] (default: 0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help="> 1 discourages tokens of the prompt and the output so far (default: 1 = off)")
    g.add_argument("--presence-penalty", type=float, default=None,
                   help="subtracted from tokens already generated, in [-2, 2] (default: 0)")
    g.add_argument("--frequency-penalty", type=float, default=None,
                   help="subtracted per earlier occurrence in the output, in [-2, 2] (default: 0)")
    g.add_argument("--seed", "-s", type=int, default=None, help="random seed for sampling (default: random)")
    g.add_argument("--stop", action="append", default=[], help="stop string, repeatable (default: none)")


SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "seed")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """Engine.stream arguments; values left None come from generation_config.json, then the built-in defaults."""
    stop = []
    for s in args.stop:
        text, replaced = clean_text(s)
        if replaced:
            warn_replaced("--stop")
        stop.append(text)
    return dict({k: getattr(args, k) for k in SAMPLING_FLAGS}, stop=stop)


def validate_args(args: argparse.Namespace) -> None:
    """Check every value that does not need the model before it loads, so a typo costs no load time."""
    from daop.placement.budget import parse_bytes
    from daop.sampling import sampling_params
    from daop.threads import check_threads

    model = getattr(args, "model", None)
    if model and re.fullmatch(r"[\w.-]+/[\w.-]+", model) and not os.path.exists(os.path.expanduser(model)):
        raise DaopError(f"model folder not found: {model}; daop reads local folders only: "
                        f"huggingface-cli download {model} --local-dir DIR, then --model DIR")
    if hasattr(args, "max_new_tokens"):
        sampling_params(None, **sampling_kwargs(args))
    ratio = getattr(args, "expert_ratio", None)
    if ratio is not None and not 0 <= ratio <= 1:
        raise DaopError(f"--expert-ratio {ratio} must be between 0 and 1")
    if getattr(args, "gpu_memory", None) is not None:
        parse_bytes(args.gpu_memory)
    for name in ("threads", "cpu_threads", "max_context"):
        check_threads(getattr(args, name, None), "--" + name.replace("_", "-"))
    if getattr(args, "expert_dtype", None) == "int4":
        from daop.quant import check_geometry
        check_geometry("int4", 1 << 30, 1 << 30, args.group_size or 128)  # the group size alone; shapes once loaded


def load_engine(args: argparse.Namespace, reserved_cores: int = 0):
    """The engine the arguments ask for; reserved_cores: cores the automatic thread count leaves to
    other threads of this process (see daop.threads.choose_threads)."""
    from daop.engine import Engine

    return Engine.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, progress=not args.no_progress, threads=args.threads,
        reserved_cores=reserved_cores,
        policy=args.policy, gpu_memory=args.gpu_memory, expert_ratio=args.expert_ratio, cpu_threads=args.cpu_threads,
        cpu_mode=args.cpu_mode, hardware_profile=args.hardware_profile, routing_stats=args.routing_stats,
        max_context=args.max_context, expert_dtype=args.expert_dtype, group_size=args.group_size,
        cuda_graphs=not args.no_cuda_graphs, max_batch=getattr(args, "max_batch", 1),
    )


def print_stats(engine, detailed: bool = False, max_new_tokens: int | None = None) -> None:
    from daop.runtime.stats import per_token

    s = engine.last_stats
    reason = s.finish_reason
    if reason == "length" and max_new_tokens is not None and s.generated_tokens < max_new_tokens:
        reason = f"length: the context window of {engine.config.context_length} tokens is full"
    if detailed:
        import torch

        print(f"[daop] policy {engine.policy}: {engine.budget.describe()}; dense-path threads {torch.get_num_threads()}",
              file=sys.stderr)
        totals = engine.counters()
        if totals:
            rates = per_token(totals, s.prompt_tokens + s.generated_tokens)
            print("[daop] per token: " + ", ".join(f"{k} {v:.3g}" for k, v in rates.items()), file=sys.stderr)
    print(
        f"[daop] prompt {s.prompt_tokens} tokens, generated {s.generated_tokens} tokens ({reason}); "
        f"prefill {s.prefill_s * 1000:.0f} ms, decode {s.decode_tokens_per_s:.1f} tokens/s; load {engine.load_s:.2f} s",
        file=sys.stderr,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = read_prompt(args.prompt)
    engine = load_engine(args)
    for piece in engine.stream(prompt, **sampling_kwargs(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print_stats(engine, args.stats, args.max_new_tokens)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from daop.config import load_config
    from daop.engine import default_model_dir, resolve_device
    from daop.hardware import calibrate
    from daop.runtime.profile_cache import ProfileRequest, locate
    from daop.config import read_json
    from daop.runtime.setup import resolve_expert_format
    from daop.weights.lowbit_folder import load_options

    model_dir = Path(args.model) if args.model else default_model_dir()
    config = load_config(model_dir)
    device = resolve_device(args.device)
    dtype, expert_dtype, group_size, _ = load_options(read_json(model_dir / "config.json", "config.json"), model_dir,
                                                      args.dtype, config.torch_dtype, args.expert_dtype, args.group_size)
    fmt = resolve_expert_format(config, dtype, device, expert_dtype, group_size)
    if args.show:
        request = ProfileRequest(config, dtype, device, args.hardware_profile, args.cpu_threads, args.cpu_mode, fmt)
        source = locate(request)
        print(f"{source.kind}: {source.path}")
        print(f"why: {source.reason}")
        if source.profile is not None:
            p = source.profile
            print(f"cpu: {p.cpu_mode} with {p.cpu_threads} threads, {p.cpu_expert_ms[0]:.3f} ms per expert at "
                  f"{p.cpu_token_counts[0]} token; chosen because: {p.cpu_threads_reason}")
        return 0
    profile = calibrate(config.hidden_size, config.expert_intermediate_size, dtype, device, args.cpu_threads,
                        quick=args.quick, mode=args.cpu_mode, fmt=fmt)
    profile.provenance["model"] = str(model_dir)
    out = Path(args.output)
    profile.save(out)
    print(f"[daop] expert {profile.expert_bytes / 2**20:.1f} MiB ({fmt.name}): copy pinned {profile.copy_pinned_ms:.2f} ms, "
          f"pageable {profile.copy_pageable_ms:.2f} ms, CPU 1 token {profile.cpu_expert_ms[0]:.2f} ms "
          f"({profile.cpu_mode}, {profile.cpu_threads} threads), GPU 1 token {profile.gpu_expert_ms[0]:.3f} ms -> {out}",
          file=sys.stderr)
    print(f"[daop] CPU threads: {profile.cpu_threads_reason}", file=sys.stderr)
    if profile.shared_cpu_factor:
        print(f"[daop] side by side a CPU expert took {profile.shared_cpu_factor:.2f}x and a copy {profile.shared_copy_factor:.2f}x "
              f"their time alone (both read host memory)", file=sys.stderr)
    doubt = profile.implausible()
    if doubt:
        print(f"[daop] warning: the CPU numbers look noisy ({doubt}): was the host busy? Calibrate again before "
              f"quoting runs made with {out}", file=sys.stderr)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from daop.placement.budget import fmt_bytes
    from daop.quantize import quantize_checkpoint

    r = quantize_checkpoint(args.model, args.output, args.expert_dtype, args.group_size, args.dtype, not args.no_progress)
    print(f"{r.output}: experts {r.fmt.name}, weights {fmt_bytes(r.bytes_before)} -> {fmt_bytes(r.bytes_after)} "
          f"in {r.shards} file{'s' if r.shards > 1 else ''}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from daop.console import chat

    engine = load_engine(args)
    return chat(engine, args.system, sampling_kwargs(args))


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise DaopError("the server needs FastAPI and uvicorn: pip install '.[server]' in the daop folder") from None
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
    parse_bench_lists(args)
    apply_threads(args.threads)
    run(args)
    return 0


def parse_bench_lists(args: argparse.Namespace) -> None:
    """The bench's comma-separated options as lists: policies, ratios, prompt and generation lengths, batches."""
    args.policies = [p.strip() for p in args.policies.split(",") if p.strip()]

    def numbers(name: str, kind):
        try:
            return [kind(x) for x in str(getattr(args, name)).split(",") if x.strip()]
        except ValueError as exc:
            raise DaopError(f"--{name.replace('_', '-')} must be comma-separated numbers ({exc})") from exc

    args.ratios = numbers("ratios", float)
    args.prompt_tokens, args.gen_tokens, args.batch = (numbers(n, int) for n in ("prompt_tokens", "gen_tokens", "batch"))


def cmd_profile(args: argparse.Namespace) -> int:
    from daop.profile import run_profile

    if args.threads is not None:  # the engine keeps a count set this way (see daop.threads.choose_threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        apply_threads(args.threads)
    stats = run_profile(args.model, args.data, args.output, args.max_docs, args.prompt_tokens, args.gen_tokens,
                        args.device, args.dtype)
    prov, parts = stats["provenance"], []
    for key, label in (("prefill_decode_overlap", "prefill->decode overlap"), ("next_layer_top1", "next-layer top-1"),
                       ("next_layer_set_overlap", "set overlap"), ("two_layers_ahead_set_overlap", "two layers ahead")):
        mean = stats[key]["mean"]
        parts.append(f"{label} " + ("n/a" if mean is None else f"{100 * mean:.1f} %"))
    print(f"[daop] {prov['docs']} documents, {prov['prompt_tokens']} prompt + {prov['decode_tokens']} decode tokens: "
          f"{', '.join(parts)} -> {args.output}", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from daop.engine import Engine
    from daop.evaluate import EvalArgs, compare, load_reference, score

    eval_args = EvalArgs(Path(args.data), args.max_docs, args.prompt_tokens, args.continuation_tokens, args.gen_tokens,
                         Path(args.gsm8k) if args.gsm8k else None, args.gsm8k_items, args.gsm8k_max_tokens)
    base = dict(device=args.device, dtype=args.dtype, progress=not args.no_progress, threads=args.threads,
                gpu_memory=args.gpu_memory, expert_ratio=args.expert_ratio, cpu_threads=args.cpu_threads, cpu_mode=args.cpu_mode,
                hardware_profile=args.hardware_profile, routing_stats=args.routing_stats, max_context=args.max_context,
                cuda_graphs=not args.no_cuda_graphs)
    # The all-GPU path is the reference; the two engines run one after the other so only one model
    # is in memory at a time.
    sequences = 2 * args.max_docs + (args.gsm8k_items if args.gsm8k else 0)  # perplexity + greedy per document
    engine, ref_info = load_reference(args.model, base)
    with eval_progress("reference (gpu)", sequences, args.no_progress) as tick:
        reference = score(counting(engine, tick), eval_args)
    engine.close()
    engine = None  # one model in memory at a time
    # the same dense-path thread count as the reference: other counts round differently on a CPU
    engine = Engine.from_pretrained(args.model, policy=args.policy, expert_dtype=args.expert_dtype, group_size=args.group_size,
                                    **dict(base, threads=ref_info["reference_threads"]))
    with eval_progress(f"{engine.policy}", sequences, args.no_progress) as tick:
        ours = score(counting(engine, tick), eval_args)
    report = {"policy": engine.policy, "expert_ratio": args.expert_ratio, "device": engine.device.type,
              "dtype": str(engine.decoder.dtype).replace("torch.", ""), "expert_format": engine.expert_format.name, **ref_info, "data": args.data,
              **compare(reference, ours, args.gen_tokens)}
    print(json.dumps(report))
    return 0


@contextlib.contextmanager
def eval_progress(label: str, total: int, disable: bool):
    """A progress bar on stderr over the sequences an eval scores; yields the function that advances it."""
    from tqdm import tqdm

    with tqdm(total=total, desc=f"eval {label}", unit="seq", file=sys.stderr, disable=disable) as bar:
        yield bar.update


def counting(engine, tick):
    """The engine, with every new sequence it starts (Engine.session) advancing the progress bar."""
    start = engine.session

    def start_and_tick(*args, **kwargs):
        tick(1)
        return start(*args, **kwargs)

    engine.session = start_and_tick
    return engine


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="daop", description="Run Mixture-of-Experts models on a GPU too small to hold them.")
    parser.add_argument("--version", action="version", version=f"daop {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = sub.add_parser("generate", help="complete a prompt, streaming to stdout")
    add_model_args(gen)
    add_sampling_args(gen)
    gen.add_argument("prompt", nargs="?", default=None, help="prompt text; '-' or none reads standard input")
    gen.add_argument("--stats", action="store_true", help="print budget, placement and expert counters to stderr")
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", help="interactive chat using the checkpoint's chat template (/help inside lists commands)")
    add_model_args(chat)
    add_sampling_args(chat)
    chat.add_argument("--system", default=None, help="system message (default: none)")
    chat.set_defaults(func=cmd_chat)
    add_calibrate_parser(sub)
    add_quantize_parser(sub)
    add_eval_parser(sub)
    add_bench_parser(sub)
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs the server extra: pip install '.[server]')")
    add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument("--api-key", default=os.environ.get("DAOP_API_KEY") or None,
                       help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                            "(default: $DAOP_API_KEY, else no key)")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body accepted (default: 1 MiB)")
    serve.add_argument("--model-name", default=None, help="model id clients use (default: the checkpoint folder's name)")
    serve.add_argument("--max-batch", type=int, default=None, metavar="N",
                       help="requests decoded together; more wait in a queue. Each holds a KV cache row of --max-context "
                            "positions, reserved in the GPU budget (default: 8 on a CPU; on a GPU up to 8, as many as "
                            "keep the rows within 15%% of the free memory)")
    serve.add_argument("--no-warmup", action="store_true",
                       help="listen at once, without first running a few short sequences at every batch size up to "
                            "--max-batch (the warm-up compiles kernels and captures decode steps before the first request)")
    serve.set_defaults(func=cmd_serve)
    prof = sub.add_parser("profile", help="routing statistics of a calibration set (expert popularity, overlap, prediction); JSON")
    prof.add_argument("--model", "-m", default=None, help="checkpoint folder (default: the shipped daop-moe-mini)")
    prof.add_argument("--data", required=True, help="calibration text: plain text (blank-line separated), .jsonl with \"text\", or ShareGPT .json")
    prof.add_argument("--max-docs", type=int, default=None, help="use only the first N documents (default: all)")
    prof.add_argument("--prompt-tokens", type=int, default=128, help="prompt tokens per document, prefill (default: 128)")
    prof.add_argument("--gen-tokens", type=int, default=32, help="greedy decode steps per document (default: 32)")
    prof.add_argument("--output", default="routing-stats.json", help="statistics JSON to write (default: routing-stats.json)")
    prof.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    prof.add_argument("--dtype", default=None, choices=DTYPES, metavar="DTYPE", help=DTYPE_HELP)
    prof.add_argument("--threads", "-t", type=int, default=None, metavar="N", help=THREADS_HELP)
    prof.set_defaults(func=cmd_profile)
    return parser


def add_calibrate_parser(sub) -> None:
    cal = sub.add_parser("calibrate", help="measure copy, CPU and GPU expert costs; write a hardware profile JSON")
    cal.add_argument("--model", "-m", default=None, help="checkpoint folder whose expert shape is measured (default: the shipped daop-moe-mini)")
    cal.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    cal.add_argument("--dtype", default=None, choices=DTYPES, metavar="DTYPE", help=DTYPE_HELP)
    cal.add_argument("--cpu-threads", type=int, default=None, metavar="N",
                     help="measure only this thread count of the CPU-expert pool (default: measure candidates and choose)")
    cal.add_argument("--cpu-mode", default=None, choices=["worker", "inline"],
                     help="measure only this mode (default: measure both and choose)")
    cal.add_argument("--show", action="store_true",
                     help="print which profile a run would use (file, cached, or fresh) and why; measure nothing")
    cal.add_argument("--hardware-profile", default=None, help="with --show: the profile file a run would be given (default: none)")
    cal.add_argument("--quick", action="store_true", help="fewer repeats and token counts")
    add_expert_dtype_args(cal)
    cal.add_argument("--output", default="hardware-profile.json", help="profile JSON to write (default: hardware-profile.json)")
    cal.set_defaults(func=cmd_calibrate)


def add_quantize_parser(sub) -> None:
    q = sub.add_parser("quantize", help="write a copy of a checkpoint with its routed experts in int8 or int4; "
                                        "daop loads the result directly")
    q.add_argument("--model", "-m", required=True, help="float checkpoint folder in Hugging Face layout")
    q.add_argument("--output", "-o", required=True, help="folder to create (refused if it exists)")
    q.add_argument("--expert-dtype", required=True, choices=["int8", "int4"],
                   help="int8 (per-channel, half the bytes of bf16) or int4 (group-wise, about a quarter)")
    q.add_argument("--group-size", type=int, default=None, metavar="N",
                   help="int4: input channels per scale and zero, a power of two >= 32 (default: 128)")
    q.add_argument("--dtype", default=None, choices=DTYPES, metavar="DTYPE",
                   help="dense weights and expert scales: auto (the checkpoint's), bfloat16|bf16, float16|fp16, "
                        "float32|fp32; the folder loads in this dtype (default: auto)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_quantize)


def add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="quality of a policy against exact inference (decode-path perplexity, greedy agreement, GSM8K)")
    add_model_args(ev)
    ev.add_argument("--data", required=True, help="text / JSONL / ShareGPT JSON documents")
    ev.add_argument("--max-docs", type=int, default=16, help="documents scored (default: 16)")
    ev.add_argument("--prompt-tokens", type=int, default=64, help="prompt tokens per document (default: 64)")
    ev.add_argument("--continuation-tokens", type=int, default=64,
                    help="teacher-forced decode steps per document for perplexity (default: 64)")
    ev.add_argument("--gen-tokens", type=int, default=32, help="greedy tokens compared per document (default: 32)")
    ev.add_argument("--gsm8k", default=None, help="JSONL with question/answer (GSM8K format) (default: none)")
    ev.add_argument("--gsm8k-items", type=int, default=20, help="GSM8K questions asked (default: 20)")
    ev.add_argument("--gsm8k-max-tokens", type=int, default=256, help="longest generated answer (default: 256)")
    ev.set_defaults(func=cmd_eval)


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="sweep policies x expert ratios on a model geometry; JSON last")
    bench.add_argument("--geometry", default="mixtral-8x7b",
                       help="mixtral-8x7b, phi-3.5-moe, qwen3-30b-a3b, deepseek-v2-lite, gpt-oss-20b, tiny-mixtral (default: mixtral-8x7b; "
                            "its experts need ~90 GB of host memory at 32 layers, see --layers)")
    bench.add_argument("--layers", type=int, default=None,
                       help="cut depth when host memory is short, stated on the card (default: all layers)")
    bench.add_argument("--policies", default="gpu,fiddler,static,lru,ondemand,daop-paper,daop-exact",
                       help="comma-separated; 'accelerate' adds transformers + accelerate offloading (pip install '.[bench]') "
                            "(default: %(default)s)")
    bench.add_argument("--ratios", default="0.25,0.375,0.5,0.625",
                       help="comma-separated shares of routed experts on the GPU (default: %(default)s)")
    bench.add_argument("--model", default=None, help="benchmark a real checkpoint instead of a synthetic geometry (default: none)")
    bench.add_argument("--prompts-file", default=None,
                       help="prompt texts for --model: a text/JSONL/ShareGPT file, or 'sharegpt' (default: random token ids)")
    bench.add_argument("--prompt-tokens", default="256", help="comma-separated prompt lengths (default: 256)")
    bench.add_argument("--gen-tokens", default="256", help="comma-separated generation lengths (default: 256)")
    bench.add_argument("--batch", default="1",
                       help="comma-separated batch sizes (default: 1); a batch runs the server's batch path: "
                            "its prompts prefilled one after another, then decode steps of all rows")
    bench.add_argument("--prompts", type=int, default=10, help="prompts per point; medians are reported (default: 10)")
    bench.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    bench.add_argument("--dtype", default="bf16", choices=DTYPES, metavar="DTYPE",
                       help="bfloat16|bf16, float16|fp16, float32|fp32 (default: bf16)")
    bench.add_argument("--threads", "-t", type=int, default=None, metavar="N",
                       help="torch threads for the dense path (default: torch's default)")
    bench.add_argument("--cpu-threads", type=int, default=None, metavar="N",
                       help="threads of the CPU-expert pool (default: physical cores, less one with a CUDA device)")
    bench.add_argument("--cpu-mode", default=None, choices=["worker", "inline"],
                       help="CPU experts on a worker thread or inline (default: the calibrated choice)")
    bench.add_argument("--hardware-profile", default=None, help="JSON from `daop calibrate` (default: cached or quick calibration)")
    add_expert_dtype_args(bench)
    add_graph_arg(bench)
    bench.add_argument("--ratio-in-float-bytes", action="store_true",
                       help="read --ratios as GPU memory for that share of experts in --dtype, so low-bit experts fill the "
                            "same bytes with more experts (default: a share of experts in their stored format)")
    bench.add_argument("--output", default=None, help="append every row to this JSONL file (default: stdout only)")
    bench.add_argument("--trace", default=None,
                       help="replay routing recorded from a trained model, .npz from scripts/record_traces.py "
                            "(default: the synthetic model's own routers)")
    bench.add_argument("--smoke", action="store_true", help="tiny CPU run (under a minute) that checks the benchmark works")
    bench.add_argument("--plot", metavar="RESULTS", default=None, help="draw RESULTS (JSONL) as a PNG next to it, then exit (default: none)")
    bench.add_argument("--table", metavar="RESULTS", default=None, help="print RESULTS (JSONL) as a Markdown table, then exit (default: none)")
    bench.set_defaults(func=cmd_bench)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate_args(args)
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
