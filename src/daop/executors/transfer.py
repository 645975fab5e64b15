"""Transfers between host and GPU: the one owner of the copy stream, pinned staging and events.

Every asynchronous copy is paired with an event; host code reads a device->host copy only after
its event has completed, and a slot is overwritten only after the last compute that read it.
On a CPU-only machine the "GPU" is the CPU and every transfer is a plain synchronous copy.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import Future

import torch

from daop.executors import copy2d
from daop.kernels import device_wait, host_read
from daop.quant import copy_into_slot


SPIN_S = 0.02  # `read_on_host(spin=True)` polls at most this long, then sleeps
RESERVED: Future = Future()  # a staging buffer's reader while it is held for a job not yet started (never done)


class Both:
    """Two jobs reading one staging buffer: done once both are."""

    def __init__(self, first, second) -> None:
        self.first, self.second = first, second

    def done(self) -> bool:
        return self.first.done() and self.second.done()


class Transfer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda and device.index is None:  # with its index: `current_stream` then skips a device lookup per call
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.last_copy: torch.cuda.Event | None = None  # the copy stream's latest copy
        self.slot_released: dict[int, torch.cuda.Event] = {}
        self.routing_buf: dict[torch.dtype, torch.Tensor] = {}  # pinned, for `read_on_host`
        self.routing_ready = torch.cuda.Event(blocking=True) if self.cuda else None
        # Pinned staging buffers, each with the CPU job that reads it: a buffer is handed out again
        # only once that job has finished (the pool grows if every buffer is still being read).
        self.staging: list[torch.Tensor] = []
        self.readers: list[Future | None] = []
        # Activations copied into a staging buffer ahead of a host read (`stage`): (the device
        # tensor, its buffer's index, the host view, whether a host read has covered the copy since)
        self.staged: tuple[torch.Tensor, int, torch.Tensor, bool] | None = None
        # the last job's activations since the last `stage`: (device tensor, buffer index, host view), so a
        # second job of the same layer call on the same activations reads them from that buffer too
        self.last_job: tuple[torch.Tensor, int, torch.Tensor] | None = None
        self.host_reader = host_read.checked_reader(device) if self.cuda and host_read.available() else None
        # the GPU waits for CPU experts queued on the C kernel's thread and reads their results itself
        self.device_wait = device_wait.checked(device) if self.host_reader is not None else None

    def copy_expert(self, src: tuple[torch.Tensor, ...], dst: tuple[torch.Tensor, ...], slot: int,
                    timing: tuple | None = None) -> "torch.cuda.Event | None":
        """Copy host expert weights into a GPU slot on the copy stream; returns the completion event.
        timing: two timing events recorded around the copy itself (for a measured timeline)."""
        def body() -> None:
            for d, s in zip(dst, src):
                copy_into_slot(d, s, non_blocking=self.cuda)  # int4 is converted here, on the copy stream
        return self.on_copy_stream(slot, body, timing)

    def copy_expert_rows(self, src: tuple[torch.Tensor, ...], dst: tuple[torch.Tensor, ...], slot: int, lo: int,
                         hi: int, timing: tuple | None = None) -> "torch.cuda.Event | None":
        """Copy intermediate rows [lo, hi) of a float expert (gate_up [2I, D], down [D, I]; what
        `daop.quant.expert_rows` reads) into the same rows of a slot; returns the completion event.
        The down columns are a strided block: one 2D copy (`copy2d`)."""
        I = src[1].shape[1]

        def body() -> None:
            for a, b in ((lo, hi), (I + lo, I + hi)):
                dst[0][a:b].copy_(src[0][a:b], non_blocking=self.cuda)
            if self.cuda:
                copy2d.copy_2d(dst[1][:, lo:hi], src[1][:, lo:hi], self.stream)
            else:
                dst[1][:, lo:hi].copy_(src[1][:, lo:hi])
        return self.on_copy_stream(slot, body, timing)

    def on_copy_stream(self, slot: int, body: Callable[[], None], timing: tuple | None) -> "torch.cuda.Event | None":
        """Run body's copies on the copy stream once the slot's last read is done; their event."""
        if not self.cuda:
            body()
            return None
        with torch.cuda.stream(self.stream):
            released = self.slot_released.get(slot)
            if released is not None:
                self.stream.wait_event(released)
            if timing is not None:
                timing[0].record(self.stream)
            body()
            if timing is not None:
                timing[1].record(self.stream)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.last_copy = done
        return done

    def read_on_host(self, x: torch.Tensor, spin: bool = False) -> torch.Tensor:
        """A small device tensor (a layer's routing) on the host, once the compute stream has made it:
        copied into pinned memory and awaited on a blocking event, so the host thread sleeps instead of
        spinning on a core the CPU experts need (a plain `.cpu()` spins while the GPU works). spin: poll
        the event instead, yielding the core between polls (for a wait known to be short: a sleeping
        thread wakes tens of microseconds late, and on a slower clock), sleeping past SPIN_S."""
        if not self.cuda:
            return x.cpu()
        n = x.numel()
        buf = self.routing_buf.get(x.dtype)
        if buf is None or buf.numel() < n:
            buf = self.routing_buf[x.dtype] = torch.empty(max(n, 1024), dtype=x.dtype, pin_memory=True)
        host = buf[:n].view(x.shape)
        host.copy_(x, non_blocking=True)
        self.routing_ready.record(torch.cuda.current_stream(self.device))
        if spin:
            until = time.perf_counter() + SPIN_S
            while not self.routing_ready.query() and time.perf_counter() < until:
                os.sched_yield()
        self.routing_ready.synchronize()
        if self.staged is not None:  # a staging copy queued before this read has landed too
            self.staged = (*self.staged[:3], True)
        return host.clone()  # the buffer is reused by the next read

    def copies_done(self) -> bool:
        """Whether every copy queued so far has landed (asked without blocking)."""
        return self.last_copy is None or self.last_copy.query()

    def wait(self, event: "torch.cuda.Event | None") -> None:
        """Make the compute stream wait for a copy (no host blocking)."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def release_slot(self, slot: int) -> None:
        """Record that all compute queued so far that reads `slot` must finish before it is overwritten.
        One event per slot, recorded again each time: a copy waits on the record that was last when
        it was queued (CUDA's wait-event semantics), so nothing is lost by reusing it."""
        if self.cuda:
            event = self.slot_released.get(slot)
            if event is None:
                event = self.slot_released[slot] = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))

    def host_job(self, x: torch.Tensor, start: Callable[[torch.Tensor, "torch.cuda.Event | None"], Future]) -> Future:
        """Run a CPU job on activations x [N, D]: x is copied into a pinned staging buffer no
        unfinished job reads, `start(host, ready)` launches the job (which must wait on `ready`
        before reading), and the buffer belongs to that job until it is done. Where x was staged
        (`stage`) and a host read has waited for the copy since, the job takes that buffer and
        `ready` is None."""
        if not self.cuda:
            return start(x, None)
        staged, self.staged = self.staged, None
        last = self.last_job
        if staged is not None and staged[0] is x and staged[3]:
            i, host, ready = staged[1], staged[2], None  # copied and awaited already (`stage`)
        elif staged is None and last is not None and last[0] is x and self.readers[last[1]] is not None:
            i, host = last[1], last[2]  # the job before read the same activations from this buffer
            job = start(host, None)
            self.readers[i] = Both(self.readers[i], job)  # the buffer is free once both are done
            return job
        else:
            if staged is not None:
                self.readers[staged[1]] = None
            i, host = self.copy_to_staging(x)
            ready = torch.cuda.Event(blocking=True)  # a host thread waits on it: sleep, do not spin
            ready.record(torch.cuda.current_stream(self.device))
        job = start(host, ready)
        self.readers[i] = job
        self.last_job = (x, i, host)
        return job

    def stage(self, x: torch.Tensor) -> None:
        """Start copying activations x [N, D] into a staging buffer now, before a host read
        (`read_on_host`) that waits for the compute stream anyway: a CPU job on x started after that
        read (`host_job`) finds them on the host and starts without waiting on an event of its own.
        A staging not taken by the next job is given back then."""
        if not self.cuda:
            return
        self.last_job = None
        if self.staged is not None:
            self.readers[self.staged[1]] = None
        i, host = self.copy_to_staging(x)
        self.readers[i] = RESERVED
        self.staged = (x, i, host, False)

    def copy_to_staging(self, x: torch.Tensor) -> tuple[int, torch.Tensor]:
        """(index, host view) of a free staging buffer that x is being copied into (non-blocking)."""
        i = self.free_staging()
        n, buf = x.numel(), self.staging[i]
        if buf.numel() < n or buf.dtype != x.dtype:
            buf = self.staging[i] = torch.empty(max(n, 2 * buf.numel()), dtype=x.dtype, pin_memory=True)
        host = buf[:n].view(x.shape)
        host.copy_(x, non_blocking=True)
        return i, host

    def free_staging(self) -> int:
        """Index of a staging buffer no unfinished job reads (a new one if every buffer is in use)."""
        for i, reader in enumerate(self.readers):
            if reader is None or reader.done():
                self.readers[i] = None
                return i
        self.staging.append(torch.empty(0))
        self.readers.append(None)
        return len(self.staging) - 1

    def to_device(self, y: torch.Tensor) -> torch.Tensor:
        """A CPU result on the device, in compute order. Past a few KB (`host_read.MIN_BYTES`) a kernel
        reads it from pinned memory: a copy would wait behind every expert copy queued on the copy
        stream. Smaller ones: from pinned memory an asynchronous copy on the compute stream (torch's
        pinned-memory cache keeps the buffer until the copy has read it), else a blocking one."""
        if not self.cuda:
            return y
        if self.host_reader is not None and y.numel() * y.element_size() >= host_read.MIN_BYTES:
            return self.host_reader.upload(y)
        return y.to(self.device, non_blocking=y.is_pinned())
