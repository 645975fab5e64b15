#!/usr/bin/env python3
"""The GPU path under test: run on a CUDA machine, print a table, write JSON lines.

1. `--tests`: the policy, DAOP and out-of-memory tests with DAOP_TEST_DEVICE=cuda, in fp32 and in
   bf16 (pytest's summary line of each run). On a GPU, policies that only copy experts must be
   bitwise equal to `gpu`; policies with CPU experts are held to a logit tolerance there.
2. `--agreement`: how close every exact policy comes to the all-GPU path on the shipped model in
   bf16. Per (policy, expert ratio): the reference's greedy continuation of each prompt is fed back
   as decode steps; the policy's greedy choice at each position gives the first divergence of its
   own free-running greedy output (identical up to there), "identical" means no divergence, and the
   decode-path perplexity of the reference continuation is compared with the reference's own.

    python3 scripts/gpu_checks.py --tests --agreement --output gpu-checks.jsonl
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

PROMPTS = [
    "In the beginning God created the heaven and the earth.",
    "ROMEO. But soft, what light through yonder window breaks?",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The os module provides a portable way of using operating system dependent functionality.",
    "hacker n. [originally, someone who makes furniture with an axe]",
    "And the LORD spake unto Moses, saying,",
    "import json\nfrom pathlib import Path\n\n\ndef load(path):\n",
    "CYNIC, n. A blackguard whose faulty vision sees things as they are,",
]
EXACT_POLICIES = ["static", "fiddler", "ondemand", "lru", "daop-exact", "daop-strict"]
TEST_FILES = ["tests/test_policies.py", "tests/test_daop.py", "tests/test_reliability.py", "tests/test_decode_step.py",
              "tests/test_batching.py", "tests/test_split_experts.py", "tests/test_device_wait.py", "tests/test_fused_kernels.py",
              "tests/test_quantize.py", "tests/test_handoff.py"]


def run_tests(dtype: str) -> dict:
    # wide lines: pytest drops a failure's message from its summary line when the test name fills the width
    env = dict(os.environ, DAOP_TEST_DEVICE="cuda", DAOP_TEST_DTYPE=dtype, PYTHONPATH=str(ROOT / "src"), COLUMNS="400")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=line", *TEST_FILES,
                           "-k", "not fuzzed and not ctrl_c"], cwd=ROOT, env=env, capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    failures = [l[:600] for l in lines if l.startswith("FAILED") or l.startswith("ERROR")]
    where = [l[:600] for l in lines if "Error" in l and l.startswith((str(ROOT), "tests/"))]  # --tb=line
    return {"kind": "tests", "dtype": dtype, "files": TEST_FILES, "returncode": proc.returncode,
            "summary": lines[-1] if lines else "", "failures": failures[:20], "where": where[:20],
            "seconds": round(time.perf_counter() - t0, 1)}


def agreement(prompts: list[str], tokens: int, ratios: list[float], policies: list[str], device: str,
              emit=lambda row: None, expert_dtype: str | None = None) -> list[dict]:
    import torch

    from daop.engine import Engine
    from daop.evaluate import teacher_forced
    from daop.sampling import SamplingParams

    ref = Engine.from_pretrained(None, device=device, dtype="bf16", progress=False, policy="gpu", expert_dtype=expert_dtype)
    ref.eos_ids = frozenset()
    docs = []
    for text in prompts:
        ids = ref.tokenizer.encode(text)
        docs.append((ids, ids + list(ref.generate_ids(ids, SamplingParams(max_new_tokens=tokens)))))
    ref_nll = sum(teacher_forced(ref, full, len(p))[0] for p, full in docs)
    ref.close()
    del ref
    rows = []
    for ratio in ratios:
        for policy in policies:
            engine = Engine.from_pretrained(None, device=device, dtype="bf16", progress=False, policy=policy,
                                            expert_ratio=ratio, expert_dtype=expert_dtype)
            nll, first, cpu_calls = 0.0, [], 0.0
            for prompt, full in docs:
                before = engine.counters().get("cpu_calls", 0.0)
                d_nll, choices = teacher_forced(engine, full, len(prompt))
                cpu_calls += engine.counters().get("cpu_calls", 0.0) - before
                nll += d_nll
                continuation = full[len(prompt):]
                first.append(next((i for i, (a, b) in enumerate(zip(choices, continuation)) if a != b), tokens))
            engine.close()
            n = len(docs) * tokens
            rows.append({
                "kind": "agreement", "model": "daop-moe-mini", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": "bfloat16",
                "policy": policy, "expert_ratio": ratio, "expert_format": engine.expert_format.name,
                "reference": f"gpu (bf16, {device}, the same expert format)", "prompts": len(docs),
                "tokens": tokens, "identical_sequences": sum(f == tokens for f in first),
                "first_divergence": first, "first_divergence_median": statistics.median(first),
                "cpu_expert_calls_per_token_incl_prefill": round(cpu_calls / n, 3),
                "decode_path_perplexity": round(math.exp(nll / n), 4),
                "reference_perplexity": round(math.exp(ref_nll / n), 4),
                "perplexity_change_pct": round(100 * (math.exp((nll - ref_nll) / n) - 1), 4),
            })
            emit(rows[-1])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tests", action="store_true", help="run the CUDA tests in fp32 and bf16")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--agreement", action="store_true", help="measure agreement with gpu on the shipped model")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--ratios", default="0.25,0.5")
    ap.add_argument("--policies", default=",".join(EXACT_POLICIES))
    ap.add_argument("--device", default="cuda", help="cpu only to try the script")
    ap.add_argument("--expert-dtype", default=None, help="auto, int8 or int4 (reference and policies alike)")
    ap.add_argument("--output", default=None, help="append JSON lines here")
    args = ap.parse_args()
    rows = []

    def emit(row: dict) -> None:
        """Print a row and append it to --output at once, so a run cut short keeps what it measured."""
        print(json.dumps(row), flush=True)
        if args.output:
            with open(args.output, "a") as f:
                f.write(json.dumps({**row, "command": " ".join(sys.argv)}) + "\n")

    if args.tests:
        for dtype in args.dtypes.split(","):
            rows.append(run_tests(dtype))
            emit(rows[-1])
    if args.agreement:
        rows += agreement(PROMPTS, args.tokens, [float(r) for r in args.ratios.split(",")], args.policies.split(","),
                          args.device, emit, args.expert_dtype)
    print(f"{'check':28} {'result'}")
    for row in rows:
        if row["kind"] == "tests":
            print(f"tests {row['dtype']:22} {row['summary']} ({row['seconds']} s)")
        else:
            print(f"{row['policy']:12} ratio {row['expert_ratio']:<5} identical {row['identical_sequences']}/{row['prompts']}, "
                  f"first divergence median {row['first_divergence_median']}, ppl change {row['perplexity_change_pct']:+.3f} %, "
                  f"CPU experts/token {row['cpu_expert_calls_per_token_incl_prefill']}")
    return 0 if all(r.get("returncode", 0) == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
