"""CPU experts' results consumed by the GPU without the host waiting for them.

Without this, the thread that drives the GPU waits for a layer's CPU experts, then launches their
upload, the weighted sum and the next layer's dense work: on an H200 host 0.5 ms per layer passed
between the CPU's last write and the next layer's routing on the host (`scripts/step_timeline.py`).
Here the C kernel's serving thread (`cpu_expert.c`) publishes its count of finished jobs in pinned
host memory; the compute stream waits for a job's ticket with the CUDA driver's
`cuStreamWaitValue32` (called through ctypes on `libcuda.so.1`), then a kernel reads the results from
pinned memory (`host_read`). The host queues all of that at once and goes on; it next waits when it
reads the next layer's routing, by then computed on the GPU right after the CPU's results.

Used on CUDA for jobs queued on the C kernel's thread, once `checked` has seen a stream held by the
wait and released by a job (else CPU results are awaited on the host, as before, with a warning).
"""
from __future__ import annotations

import ctypes
import time
import warnings

import torch

from daop.kernels import cpu_expert

_WAIT_GEQ = 0  # CU_STREAM_WAIT_VALUE_GEQ: (int32)(*addr - value) >= 0


def _driver():
    lib = ctypes.CDLL("libcuda.so.1")
    wait = getattr(lib, "cuStreamWaitValue32_v2", None) or lib.cuStreamWaitValue32
    wait.restype = ctypes.c_int
    wait.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
    pointer = lib.cuMemHostGetDevicePointer_v2
    pointer.restype = ctypes.c_int
    pointer.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
    return wait, pointer


def _writer():
    lib = ctypes.CDLL("libcuda.so.1")
    write = getattr(lib, "cuStreamWriteValue32_v2", None) or lib.cuStreamWriteValue32
    write.restype = ctypes.c_int
    write.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
    return write


def device_pointer(host: torch.Tensor) -> int:
    """The device address of a pinned host tensor (unified addressing)."""
    _, pointer = _driver()
    dptr = ctypes.c_uint64()
    rc = pointer(ctypes.byref(dptr), ctypes.c_void_p(host.data_ptr()), 0)
    if rc != 0:
        raise RuntimeError(f"cuMemHostGetDevicePointer returned CUDA error {rc}")
    return dptr.value


class HostGate:
    """A 32-bit flag in host memory that opens the C kernel's gated jobs (`cpu_expert.Picks`): on
    CUDA a stream writes it (`cuStreamWriteValue32`, after a memory barrier: the device-to-host
    copies queued before it have landed when a job sees the value); on a CPU device the caller
    writes it at once, its copies being done already."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.flag = torch.zeros(1, dtype=torch.int32, pin_memory=self.cuda)
        self.value = 0
        if self.cuda:
            self.fn = _writer()
            self.dptr = device_pointer(self.flag)

    def next(self) -> int:
        """The value the next `open` writes (it grows by one each time, wrapping at 32 bits)."""
        return (self.value + 1) & 0xFFFFFFFF

    def open(self, stream: "torch.cuda.Stream | None" = None) -> int:
        """Write the next value once the work queued so far on the stream is done; returns it."""
        self.value = self.next()
        if not self.cuda:
            self.flag[0] = ctypes.c_int32(self.value).value
            return self.value
        stream = stream or torch.cuda.current_stream(self.device)
        rc = self.fn(ctypes.c_void_p(stream.cuda_stream), self.dptr, self.value, 0)
        if rc != 0:
            raise RuntimeError(f"cuStreamWriteValue32 returned CUDA error {rc}")
        return self.value

    def force(self) -> None:
        """Open every gate up to the last value from the host (after an error between a submit and
        its `open`, so no job waits for a write that never comes)."""
        self.value = self.next()
        self.flag[0] = ctypes.c_int32(self.value).value


_GATES: dict = {}


def checked_gate(device: torch.device) -> HostGate | None:
    """A HostGate once a stream's write was seen from the host after the copy queued before it
    (CUDA: probed once per device), a plain one on a CPU device; None (said once) where the stream
    write does not work."""
    if device.type != "cuda":
        return HostGate(device)
    key = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    if key not in _GATES:
        _GATES[key] = _probe_gate(key)
    return _GATES[key]


def _probe_gate(device: torch.device) -> HostGate | None:
    from daop.kernels import handoff_kernels

    try:
        if not handoff_kernels.available():
            raise RuntimeError("needs Triton")
        gate = HostGate(device)
        ids = torch.arange(2, device=device) + 5
        x = torch.arange(4096, device=device).to(torch.bfloat16)
        ids_host = torch.zeros(2, dtype=torch.int32, pin_memory=True)
        x_host = torch.zeros(1, 4096, dtype=torch.bfloat16, pin_memory=True)
        handoff_kernels.post(ids, x, ids_host, x_host)  # compiled here, before the timed part
        torch.cuda.synchronize(device)
        ids_host.zero_()
        x_host.zero_()
        torch.cuda._sleep(50_000_000)  # the stream busy a while: the host sees the write only after it
        handoff_kernels.post(ids, x, ids_host, x_host)  # as a handed-off layer writes its routing
        value = gate.open()
        early = int(gate.flag[0]) == value
        deadline = time.perf_counter() + 2.0
        while int(gate.flag[0]) != value and time.perf_counter() < deadline:
            time.sleep(0.0005)
        if int(gate.flag[0]) != value:
            problem = "the write did not arrive"
        elif early:
            problem = "the write arrived before the work queued ahead of it"
        elif not (torch.equal(ids_host, ids.int().cpu()) and torch.equal(x_host[0], x.cpu())):
            problem = "the routing written before it had not landed"
        else:
            return gate
    except Exception as exc:  # noqa: BLE001 - any failure means: no gated jobs here
        problem = f"{type(exc).__name__}: {exc}"
    warnings.warn(f"daop: decode hand-off off: GPU stream writes to host memory do not work here ({problem})",
                  RuntimeWarning, stacklevel=2)
    return None


class DeviceWait:
    """The C kernel's finished-job count in pinned memory, and stream waits on it."""

    def __init__(self, lib: ctypes.CDLL, device: torch.device) -> None:
        self.lib, self.device = lib, device
        self.fn, _ = _driver()
        self.flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        self.dptr = device_pointer(self.flag)
        lib.daop_set_flag(ctypes.c_void_p(self.flag.data_ptr()))

    def wait(self, ticket: int, stream: "torch.cuda.Stream | None" = None) -> None:
        """Work queued on the stream after this starts once job `ticket` (a Queued's) has finished."""
        stream = stream or torch.cuda.current_stream(self.device)
        rc = self.fn(ctypes.c_void_p(stream.cuda_stream), self.dptr, ticket & 0xFFFFFFFF, _WAIT_GEQ)
        if rc != 0:
            raise RuntimeError(f"cuStreamWaitValue32 returned CUDA error {rc}")

    def close(self) -> None:
        self.lib.daop_set_flag(None)


_CHECKED: dict = {}


def checked(device: torch.device) -> DeviceWait | None:
    """A DeviceWait once a side stream was seen held by a wait and released by one small job, else
    None (said once): where stream waits do not work, CPU results are awaited on the host. One per
    process and device (the C kernel publishes its count at one place), checked once."""
    key = torch.device(device.type, device.index if device.index is not None else torch.cuda.current_device())
    if key not in _CHECKED:
        _CHECKED[key] = _probe(key)
    return _CHECKED[key]


def _probe(device: torch.device) -> DeviceWait | None:
    lib = cpu_expert.library()
    if lib is None:
        return None
    waiter = None
    try:
        waiter = DeviceWait(lib, device)
        stream, passed = torch.cuda.Stream(device), torch.cuda.Event()
        ticket = lib.daop_finished() + 1
        waiter.wait(ticket, stream)
        passed.record(stream)
        time.sleep(0.002)
        held = not passed.query()
        x, gate_up, down = (torch.zeros(*s, dtype=torch.bfloat16) for s in ((1, 16), (32, 16), (16, 16)))
        cpu_expert.Queued([x], [(gate_up, down)], threads=1).wait()
        deadline = time.perf_counter() + 2.0
        while not passed.query() and time.perf_counter() < deadline:
            time.sleep(0.001)
        if held and passed.query():
            return waiter
        problem = "the stream was not held" if not held else "the stream was not released"
        waiter.flag.fill_(ticket)  # let the probe's stream go whatever happened
    except Exception as exc:  # noqa: BLE001 - any failure means: wait on the host
        problem = f"{type(exc).__name__}: {exc}"
    if waiter is not None:
        waiter.close()
    warnings.warn(f"daop: the host waits for CPU experts: GPU stream waits do not work here ({problem})",
                  RuntimeWarning, stacklevel=2)
    return None
