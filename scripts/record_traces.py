"""Record routing traces of a trained model on held-out text, for `daop bench --trace`.

    python scripts/record_traces.py --data .data/corpus/heldout.txt --prompts 10 \
        --prompt-tokens 256 --gen-tokens 64 --output benchmarks/traces/daop-moe-mini-heldout.npz
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from daop.bench.trace import record, save_traces
from daop.engine import Engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="trained checkpoint (default: the shipped daop-moe-mini)")
    ap.add_argument("--data", required=True, help="plain text; prompts are consecutive chunks of it")
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    engine = Engine.from_pretrained(args.model, device="cpu", dtype="fp32", progress=False)
    engine.eos_ids = frozenset()  # record exactly gen-tokens decode steps per prompt
    ids = engine.tokenizer.encode(Path(args.data).read_text(encoding="utf-8"), add_special_tokens=False)
    stride = len(ids) // args.prompts
    traces = []
    for i in range(args.prompts):
        prompt = [engine.tokenizer.bos_token_id] + ids[i * stride: i * stride + args.prompt_tokens - 1]
        traces.append(record(engine, prompt, args.gen_tokens))
    provenance = {"model": str(engine.model_dir.name), "data": Path(args.data).name, "prompts": args.prompts,
                  "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "torch": torch.__version__,
                  "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    save_traces(traces, Path(args.output), provenance)
    print(f"{len(traces)} traces -> {args.output}")


if __name__ == "__main__":
    main()
