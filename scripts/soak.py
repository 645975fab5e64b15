#!/usr/bin/env python
"""Bounded soak of a local `daop serve`: many mixed requests, watching the server's memory, threads and files.

    python scripts/soak.py --serve path/to/checkpoint --device cpu            # starts and stops a server
    python scripts/soak.py --base-url http://127.0.0.1:8000 --pid 12345 -n 5000 --minutes 30

Sends up to --requests requests (default 2000) or runs --minutes (default 10), whichever ends first,
--concurrency at a time (default 4), cycling through: non-streamed and streamed completions and chat
completions (greedy and sampled), streams the client abandons after the first event, and bad requests
(malformed JSON, wrong types, unknown model, a prompt over the context window, an oversized body).
Every --sample-every requests it samples the server process: resident memory (psutil when installed,
else /proc/PID/status), threads and open file descriptors. The last stdout line is JSON: first, last
and max RSS, growth per 1,000 requests (end to end, and a least-squares slope after the first 20 % of
samples, which excludes warm-up), the sampled series, status counts and unexpected answers. Exit status 1 when a request
got an unexpected answer (a 5xx, a bad request not answered 4xx, a broken stream) or the server died.
Only loopback addresses are accepted.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling serverctl module, also when loaded by path
from serverctl import free_port, start_server, stop_server  # noqa: E402

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
PROMPTS = ["In the beginning was the word", "Shall I compare thee to a summer's day?", "def forward(self, x):",
           "Thou art more lovely and more temperate", "The model was with the word"]


# ------------------------------------------------------------------------------------ process sampling

def process_sample(pid: int) -> dict[str, int]:
    """RSS in bytes, thread count and open file descriptors of pid."""
    try:
        import psutil

        p = psutil.Process(pid)
        return {"rss": p.memory_info().rss, "threads": p.num_threads(), "fds": p.num_fds()}
    except ImportError:
        pass
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return {"rss": int(fields["VmRSS"].split()[0]) * 1024, "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def slope_per_1000(points: list[tuple[int, int]]) -> float | None:
    """Least-squares slope of (requests done, bytes) in bytes per 1,000 requests."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return 1000 * sum((x - mx) * (y - my) for x, y in points) / sxx


# -------------------------------------------------------------------------------------------- requests

def send(host: str, port: int, method: str, path: str, body: bytes | None, timeout: float,
         abandon_after_first_event: bool = False) -> tuple[int, bytes]:
    """(status, body) of one request; with abandon_after_first_event, closes the socket mid-stream."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body is not None else {})
        resp = conn.getresponse()
        if abandon_after_first_event and resp.status == 200:
            first = resp.readline()
            conn.sock.shutdown(socket.SHUT_RDWR)
            return resp.status, first
        return resp.status, resp.read()
    finally:
        conn.close()


def stream_ok(body: bytes) -> str | None:
    """None when body is a well-formed OpenAI event stream ending in [DONE]; else what is wrong."""
    lines = [line for line in body.splitlines() if line.startswith(b"data: ")]
    if not lines or lines[-1] != b"data: [DONE]":
        return "stream does not end with data: [DONE]"
    for line in lines[:-1]:
        event = json.loads(line[6:])
        if "error" in event:
            return f"error event: {event['error'].get('message')}"
    return None


def workload(max_tokens: int, context: int) -> list[tuple[str, Callable[[int], tuple[str, str, bytes | None]], Any]]:
    """(kind, i -> (method, path, body), expectation) cycled through by the soak."""
    def j(obj: dict) -> bytes:
        return json.dumps(obj).encode()

    def completion(i: int, **kw: Any) -> bytes:
        return j({"prompt": f"{PROMPTS[i % len(PROMPTS)]} {i}", "max_tokens": max_tokens, **kw})

    def chat(i: int, **kw: Any) -> bytes:
        return j({"messages": [{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} {i}"}], "max_tokens": max_tokens, **kw})

    return [
        ("completion", lambda i: ("POST", "/v1/completions", completion(i, temperature=0)), 200),
        ("chat-stream", lambda i: ("POST", "/v1/chat/completions", chat(i, stream=True, temperature=0.8, seed=i,
                                                                           stream_options={"include_usage": True})), "stream"),
        ("chat", lambda i: ("POST", "/v1/chat/completions", chat(i, temperature=0.7, top_p=0.9, seed=i)), 200),
        ("completion-stream", lambda i: ("POST", "/v1/completions", completion(i, stream=True, stop=["\n"])), "stream"),
        ("bad-json", lambda i: ("POST", "/v1/completions", b'{"prompt": "x", '), 400),
        ("abandoned-stream", lambda i: ("POST", "/v1/completions", completion(i, stream=True, max_tokens=4 * max_tokens)),
         "abandon"),
        ("bad-type", lambda i: ("POST", "/v1/chat/completions", j({"messages": [{"role": "user", "content": 3}]})), 400),
        ("completion", lambda i: ("POST", "/v1/completions", completion(i, temperature=1.0, top_k=20)), 200),
        ("unknown-model", lambda i: ("POST", "/v1/completions", j({"prompt": "x", "model": f"no-such-model-{i}"})), 404),
        ("over-context", lambda i: ("POST", "/v1/completions", j({"prompt": [1] * (context + 1)})), 400),
        ("metrics", lambda i: ("GET", "/metrics", None), 200),
        ("too-large", lambda i: ("POST", "/v1/completions", b'{"prompt": "' + b"a" * (2 << 20) + b'"}'), 413),
    ]


def context_length(host: str, port: int) -> int:
    """The server's context window, read from its 400 for an over-long prompt (fallback 4096)."""
    probe = {"prompt": [1] * 200_000, "max_tokens": 1}  # token ids: 600 kB of JSON, under the default body limit
    status, body = send(host, port, "POST", "/v1/completions", json.dumps(probe).encode(), 120)
    try:
        message = json.loads(body)["error"]["message"]
        return int(message.split("the context window is ")[1].split()[0])
    except (ValueError, KeyError, IndexError):
        return 4096


# ------------------------------------------------------------------------------------------------ soak

def soak(host: str, port: int, pid: int, requests: int, seconds: float, concurrency: int, sample_every: int,
         max_tokens: int, timeout: float, proc: subprocess.Popen | None = None) -> dict[str, Any]:
    kinds = workload(max_tokens, context_length(host, port))
    lock = threading.Lock()
    done = [0]
    samples: list[dict[str, int]] = [{"requests": 0, **process_sample(pid)}]
    statuses: dict[str, int] = {}
    unexpected: list[str] = []
    latencies: dict[str, list[float]] = {}
    deadline = time.monotonic() + seconds
    stop = threading.Event()

    def task(i: int) -> None:
        if stop.is_set() or time.monotonic() > deadline:
            stop.set()
            return
        kind, make, expect = kinds[i % len(kinds)]
        method, path, body = make(i)
        t0 = time.perf_counter()
        problem = None
        try:
            status, data = send(host, port, method, path, body, timeout, abandon_after_first_event=expect == "abandon")
            if expect in ("stream", "abandon", 200) and status != 200:
                problem = f"HTTP {status}: {data[:200]!r}"
            elif isinstance(expect, int) and expect != 200 and status != expect:
                problem = f"expected {expect}, got HTTP {status}: {data[:200]!r}"
            elif expect == "stream":
                problem = stream_ok(data)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            status, problem = 0, f"{type(exc).__name__}: {exc}"
        elapsed = time.perf_counter() - t0
        with lock:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            latencies.setdefault(kind, []).append(elapsed)
            if problem and len(unexpected) < 50:
                unexpected.append(f"{kind} #{i}: {problem}")
            done[0] += 1
            n = done[0]
            take = n % sample_every == 0
        if take:
            try:
                sample = process_sample(pid)
            except (OSError, KeyError, ValueError):
                stop.set()
                return
            with lock:
                samples.append({"requests": n, **sample})
                if n % (10 * sample_every) == 0:
                    print(f"{n} requests, server RSS {sample['rss'] / 2**20:.1f} MiB", file=sys.stderr)

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for _ in pool.map(task, range(requests)):
            pass
    wall = time.monotonic() - t0
    alive = proc is None or proc.poll() is None
    if alive:
        try:
            samples.append({"requests": done[0], **process_sample(pid)})
            alive = send(host, port, "GET", "/health", None, 10)[0] == 200
        except (OSError, KeyError, ValueError):
            alive = False
    rss = [s["rss"] for s in samples]
    steady = [(s["requests"], s["rss"]) for s in samples[len(samples) // 5:]]
    mib = 2 ** 20
    slope = slope_per_1000(steady)
    return {
        "requests": done[0], "wall_s": round(wall, 1), "requests_per_s": round(done[0] / wall, 2) if wall else 0.0,
        "concurrency": concurrency, "max_tokens": max_tokens, "samples": len(samples),
        "rss_first_mib": round(rss[0] / mib, 1), "rss_last_mib": round(rss[-1] / mib, 1), "rss_max_mib": round(max(rss) / mib, 1),
        "rss_growth_per_1000_requests_mib": round((rss[-1] - rss[0]) / mib * 1000 / max(1, done[0]), 2),
        "rss_slope_per_1000_requests_after_warmup_mib": None if slope is None else round(slope / mib, 2),
        "threads_first_last": [samples[0]["threads"], samples[-1]["threads"]],
        "fds_first_last": [samples[0]["fds"], samples[-1]["fds"]],
        "status_counts": dict(sorted(statuses.items())),
        "latency_p50_s": {k: round(sorted(v)[len(v) // 2], 3) for k, v in sorted(latencies.items())},
        "unexpected": len(unexpected), "unexpected_examples": unexpected[:10], "server_alive": alive,
        "rss_series_mib": [[s["requests"], round(s["rss"] / mib, 1)] for s in samples],
        "stopped_by": "requests" if done[0] >= requests else "time",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (loopback only)")
    ap.add_argument("--pid", type=int, default=None, help="with --base-url: the server's process id (for RSS)")
    ap.add_argument("--serve", metavar="CHECKPOINT", default=None, help="start `daop serve` on this checkpoint first")
    ap.add_argument("--device", default=None, help="with --serve: cpu or cuda")
    ap.add_argument("-n", "--requests", type=int, default=2000)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("-c", "--concurrency", type=int, default=4)
    ap.add_argument("--sample-every", type=int, default=25, help="sample the server process every N requests")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    args = ap.parse_args()
    if not (1 <= args.requests <= 1_000_000 and 0 < args.minutes <= 24 * 60 and 1 <= args.concurrency <= 64
            and 1 <= args.sample_every and 1 <= args.max_tokens <= 4096):
        ap.error("out of range: 1 <= -n <= 1e6, 0 < --minutes <= 1440, 1 <= -c <= 64, --sample-every >= 1, "
                 "1 <= --max-tokens <= 4096")
    proc = None
    if args.serve:
        port, host = free_port(), "127.0.0.1"
        proc, log = start_server(args.serve, args.device, port, timeout=300, label="soak")
        pid = proc.pid
        print(f"server up on port {port}, pid {pid} (log: {log})", file=sys.stderr)
    else:
        url = urlsplit(args.base_url)
        host, port = url.hostname or "", url.port or 80
        if host not in LOOPBACK:
            ap.error(f"refusing non-loopback host {host!r}: this tool only loads a local server")
        if args.pid is None:
            ap.error("--pid is required with --base-url (the server process to sample)")
        pid = args.pid
    try:
        report = soak(host, port, pid, args.requests, args.minutes * 60, args.concurrency, args.sample_every,
                      args.max_tokens, args.timeout, proc)
    finally:
        if proc is not None:
            stop_server(proc)
    for line in report["unexpected_examples"]:
        print(f"unexpected: {line}", file=sys.stderr)
    print(json.dumps(report))
    return 0 if report["unexpected"] == 0 and report["server_alive"] else 1


if __name__ == "__main__":
    sys.exit(main())
