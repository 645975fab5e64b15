#!/usr/bin/env python
"""Bounded load test of a local `daop serve`: N requests, C at a time; the last stdout line is JSON.

    python scripts/load_test.py --base-url http://127.0.0.1:8000 -n 50 -c 4
    python scripts/load_test.py --serve path/to/checkpoint --device cpu -n 50 -c 4   # starts and stops a server

Reports latency percentiles (p50/p90/p99), time to first token and the time between streamed text
events (inter-token latency) when streaming, and generated tokens per
second over the whole run. Only loopback addresses are accepted.
"""
from __future__ import annotations

import argparse
import http.client
import json
import re
import shlex
import sys
import threading
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling serverctl module, also when loaded by path
from serverctl import free_port, start_server, stop_server  # noqa: E402

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
PROMPTS = [
    "In the beginning was the word",
    "Shall I compare thee to a summer's day?",
    "def forward(self, x):",
    "Thou art more lovely and more temperate",
    "The model was with the word",
]


def server_threads(log_path: str) -> int | None:
    """The dense-path thread count a CPU server says it uses in its start line (None on CUDA)."""
    match = re.search(r"(\d+) dense-path thread", Path(log_path).read_text(errors="replace"))
    return int(match.group(1)) if match else None


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (q in [0, 100])."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summary(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    if not v:
        return {}
    return {"p50": round(percentile(v, 50), 4), "p90": round(percentile(v, 90), 4), "p99": round(percentile(v, 99), 4),
            "mean": round(sum(v) / len(v), 4), "max": round(v[-1], 4)}


def one_request(host: str, port: int, path: str, body: dict, stream: bool, timeout: float) -> dict:
    """Send one request; return latency, time to first token and completion tokens (or an error)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return {"error": f"HTTP {resp.status}: {resp.read()[:200]!r}"}
        if not stream:
            data = json.loads(resp.read())
            return {"latency": time.perf_counter() - t0, "ttft": None, "tokens": data["usage"]["completion_tokens"]}
        ttft, tokens, gaps, last = None, 0, [], None
        for _ in range(100_000):  # bounded: a stream has at most max_tokens + a few events
            line = resp.readline()
            if not line:
                return {"error": "stream ended without [DONE]"}
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            if payload == b"[DONE]":
                break
            event = json.loads(payload)
            if "error" in event:
                return {"error": event["error"].get("message", "error event")}
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for c in event.get("choices", []):
                if c.get("text") or (c.get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    if ttft is None:
                        ttft = now - t0
                    else:
                        gaps.append(now - last)
                    last = now
        return {"latency": time.perf_counter() - t0, "ttft": ttft, "tokens": tokens, "gaps": gaps}
    except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        conn.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (loopback only)")
    ap.add_argument("--serve", metavar="CHECKPOINT", default=None, help="start `daop serve` on this checkpoint first")
    ap.add_argument("--device", default=None, help="with --serve: cpu or cuda")
    ap.add_argument("--max-batch", type=int, default=None, help="with --serve: the server's --max-batch")
    ap.add_argument("--threads", type=int, default=None, help="with --serve: the server's --threads (default: its own choice)")
    ap.add_argument("--server-args", default="", help="with --serve: more `daop serve` options, one string "
                    "(e.g. \"--policy daop-exact --expert-ratio 0.5\")")
    ap.add_argument("-n", "--requests", type=int, default=50)
    ap.add_argument("-c", "--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    ap.add_argument("--stream", action="store_true", help="stream responses (also measures time to first token)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    args = ap.parse_args()
    if not 1 <= args.requests <= 100_000 or not 1 <= args.concurrency <= 256:
        ap.error("need 1 <= --requests <= 100000 and 1 <= --concurrency <= 256")

    proc, server = None, None
    if args.serve:
        port = free_port()
        host = "127.0.0.1"
        extra = ["--max-batch", str(args.max_batch)] if args.max_batch else []
        extra += ["--threads", str(args.threads)] if args.threads else []
        extra += shlex.split(args.server_args)
        proc, log_path = start_server(args.serve, args.device, port, timeout=300, label="load", extra=extra)
        server = {"max_batch": args.max_batch, "threads": server_threads(log_path), "threads_asked": args.threads,
                  "args": extra}
    else:
        url = urlsplit(args.base_url)
        host, port = url.hostname or "", url.port or 80
        if host not in LOOPBACK:
            ap.error(f"refusing non-loopback host {host!r}: this tool only loads a local server")
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"

    def body(i: int) -> dict:
        prompt = f"{PROMPTS[i % len(PROMPTS)]} ({i})"
        b = {"max_tokens": args.max_tokens, "temperature": args.temperature, "stream": args.stream}
        if args.stream:
            b["stream_options"] = {"include_usage": True}
        if args.endpoint == "chat":
            b["messages"] = [{"role": "user", "content": prompt}]
        else:
            b["prompt"] = prompt
        return b

    try:
        done = [0]
        lock = threading.Lock()

        def task(i: int) -> dict:
            r = one_request(host, port, path, body(i), args.stream, args.timeout)
            with lock:
                done[0] += 1
                if done[0] % max(1, args.requests // 10) == 0:
                    print(f"{done[0]}/{args.requests} done", file=sys.stderr)
            return r

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            results = list(pool.map(task, range(args.requests)))
        wall = time.perf_counter() - t0
    finally:
        if proc is not None:
            stop_server(proc)

    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    tokens = sum(r["tokens"] for r in ok)
    report = {
        "endpoint": path, "stream": args.stream, "requests": args.requests, "concurrency": args.concurrency,
        "max_tokens": args.max_tokens, "ok": len(ok), "errors": len(errors), "wall_s": round(wall, 3),
        "latency_s": summary([r["latency"] for r in ok]),
        "ttft_s": summary([r["ttft"] for r in ok if r["ttft"] is not None]) if args.stream else None,
        "inter_token_s": summary([g for r in ok for g in r.get("gaps", [])]) if args.stream else None,
        "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 1) if wall > 0 else 0.0,
        "requests_per_s": round(len(ok) / wall, 2) if wall > 0 else 0.0,
    }
    if server is not None:
        report["server"] = server
    for e in errors[:5]:
        print(f"error: {e}", file=sys.stderr)
    print(json.dumps(report))
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
