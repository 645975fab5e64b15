"""A CPU result onto the GPU without the copy engines: a kernel that reads pinned host memory.

Why: a host->device copy of more than a few KB goes through the GPU's copy engines, which serve the
copies queued on every stream in order. With expert copies (hundreds of MB each) queued on the copy
stream, a CPU expert's 512 KB output waited until every queued copy had landed: on an H200, 26 ms
for 64 tokens behind four Mixtral experts, against 0.3 ms alone (`scripts/upload_probe.py`,
`benchmarks/results/h200-upload-probe.jsonl`; an 8 KB output did not wait). A kernel that loads
the pinned buffer through unified addressing (zero-copy) is not queued behind them: it was done in
0.4-0.7 ms with the copies running.

Used only on CUDA with Triton installed (`available()`), once one small upload has come through bit
for bit (`checked_reader`, when a runner starts; it also compiles the kernel there rather than in the
first request); elsewhere callers copy as before.
"""
from __future__ import annotations

import os
import warnings
from collections import deque

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: no Triton, no kernel
    triton = None

AVAILABLE = triton is not None and os.environ.get("DAOP_NO_TRITON", "") != "1"
MIN_BYTES = 16 << 10  # smaller uploads do not wait behind copies (seen at 8 KB): torch's copy serves them
BLOCK = 1024

if triton is not None:
    @triton.jit
    def _read_host(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        # .cv: fetched again from host memory, never an earlier kernel's cached copy of a reused buffer
        tl.store(dst + offs, tl.load(src + offs, mask=mask, cache_modifier=".cv"), mask=mask)


def available() -> bool:
    return AVAILABLE


class HostReader:
    """Uploads host tensors with the kernel on the current stream; keeps each pinned source alive
    until the kernel that reads it has run (a freed pinned block could be handed out again before)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.in_flight: deque[tuple[torch.cuda.Event, torch.Tensor]] = deque()

    def upload(self, y: torch.Tensor) -> torch.Tensor:
        """y (host, any layout) as a new contiguous tensor on the device."""
        while self.in_flight and self.in_flight[0][0].query():
            self.in_flight.popleft()
        src = y.contiguous()
        if not src.is_pinned():
            src = torch.empty(src.shape, dtype=src.dtype, pin_memory=True).copy_(src)
        out = torch.empty(src.shape, dtype=src.dtype, device=self.device)
        n = src.numel()
        if n:
            _read_host[(triton.cdiv(n, BLOCK),)](src, out, n, BLOCK=BLOCK)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        self.in_flight.append((done, src))
        return out


def checked_reader(device: torch.device) -> HostReader | None:
    """A HostReader once one small upload came through bit for bit, else None (said once): where the
    kernel cannot read pinned host memory, CPU results are copied as before."""
    try:
        reader = HostReader(device)
        probe = torch.randn(MIN_BYTES // 2).to(torch.bfloat16)
        if torch.equal(reader.upload(probe).cpu(), probe):
            return reader
        problem = "it read other values"
    except Exception as exc:  # noqa: BLE001 - any failure means: copy instead
        problem = f"{type(exc).__name__}: {exc}"
    warnings.warn(f"daop: CPU expert results are copied to the GPU: the host-read kernel does not work here ({problem})",
                  RuntimeWarning, stacklevel=2)
    return None
