"""Start and stop a local `daop serve` for the load, soak and fuzz scripts (loopback only)."""
from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(host: str, port: int, path: str, timeout: float = 5) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def start_server(model: str, device: str | None, port: int, timeout: float, log_path: str | None = None,
                 label: str = "serve", extra: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    """`daop serve` on 127.0.0.1:port, once /health answers; (process, log file)."""
    if log_path is None:
        log_path = tempfile.NamedTemporaryFile(prefix=f"daop-{label}-", suffix=".log", delete=False).name
    cmd = [sys.executable, "-m", "daop.cli", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
           "--no-progress"] + (["--device", device] if device else []) + list(extra or [])
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = Path(log_path).read_text(errors="replace")[-2000:]
            raise SystemExit(f"server exited with {proc.returncode}; log: {log_path}; its end:\n{tail}")
        try:
            if http_get("127.0.0.1", port, "/health", 2)[0] == 200:
                print(f"server up on port {port} (log: {log_path})", file=sys.stderr)
                return proc, log_path
        except OSError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise SystemExit(f"server not healthy after {timeout} s; log: {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
