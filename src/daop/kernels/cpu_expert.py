"""A bf16 expert on the CPU at memory speed (`cpu_expert.c`), for CPU experts of a GPU model: 1-8
tokens with AVX-512 or AVX2 vectors, and, on CPUs with AMX, 4-128 tokens (a batch's or a prompt's
share of an expert) with bf16 tile products. int8 experts (`daop.quant`: codes with a bf16 scale per
output row) run on the same vector paths at 1-8 tokens: each code is widened to float32 in the
registers, so the host reads one byte per weight. They round where torch's int8 weight-only product
rounds (sums in another order: 98.6-99.9 % of a Mixtral-sized expert's outputs equal at 1-8 tokens,
`scripts/cpu_int8_probe.py`, benchmarks/results/cpu-int8-kernel-2core.jsonl), so, as for bf16, only
CPU experts of a GPU model use it.

Why a kernel of our own: a decode-time expert reads every weight once, so it is bound by host memory.
On an H200 host (16 cores, 96 GB/s read), torch's bf16 `F.linear` ran one Mixtral expert in 6.3 ms,
1.7x its bytes / bandwidth: the gate_up product reached 73 GB/s and the down product ([4096, 14336])
42 GB/s (`scripts/cpu_split_probe.py`, `benchmarks/results/h200-cpu-split-probe.jsonl`). oneDNN's
pre-packed weights came within 1.17x but need a second, re-laid copy of every expert next to the
one the copy channel sends to the GPU. The C kernel reads the weights as stored.

Where torch's products stood on the same host (`scripts/cpu_prefill_gemm_probe.py`, benchmarks/results/
h200-diagnostics-2026-12-03.jsonl): oneDNN's AMX kernel read one expert's weights at only 66 / 41 / 14
GB/s at 16 / 64 / 256 tokens, where the tile path reads each 16-row slice of a weight once per 96 tokens.

The source is compiled once per machine with the system C compiler (`$CC`, else `cc`) into
`$XDG_CACHE_HOME/daop/kernels/` (default `~/.cache/daop/kernels/`) and loaded with ctypes, which
releases the GIL for the whole expert. Without a compiler, with `DAOP_NO_CPU_KERNEL=1`, or for
other formats and token counts, callers use torch as before (`available()` says which).

Results round where torch's bf16 products round, but are not bitwise equal to them (float32 sums
in another order), so only CPU experts of a model on a GPU use it: those already differ
from the GPU's products. A model on the CPU keeps torch's products everywhere, so its exact
policies stay bitwise equal to the all-resident path.
"""
from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
import weakref
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_expert.c")
MAX_TOKENS = 8  # the most token rows the kernel takes
# The most it is used for: on an H200 host (16 threads, one bf16 Mixtral expert) it took 3.84 / 4.00 / 4.87 /
# 6.22 ms at 1 / 4 / 5 / 8 tokens against torch's 7.14-7.89 ms at each (scripts/cpu_kernel_sweep.py,
# benchmarks/results/h200-cpu-kernel-tokens.jsonl)
SERVES_TOKENS = MAX_TOKENS
AMX_MAX_TOKENS = 128  # on the AMX path (AMX_MAX_TOKENS in the source, which says why)
ISA_NAMES = {3: "amx", 2: "avx512", 1: "avx2", 0: "plain C"}

_LOCK = threading.Lock()
_STATE: dict = {}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "daop" / "kernels"


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def build(cc: str, defines: tuple[str, ...] = (), amx: bool = True) -> Path:
    """Compile the source into the cache (once per source, compiler and defines); the library's path.
    defines: NAME=VALUE settings of the source's tunables (PREFETCH, GROUP_ROWS, ...), for probes.
    amx: with the AMX tile path (DAOP_AMX) where the compiler knows AMX; a compiler that does not
    gets the library without it."""
    if amx:
        try:
            return build(cc, ("DAOP_AMX=1", *defines), amx=False)
        except RuntimeError:
            pass
    flags = ["-O3", "-shared", "-fPIC", "-fopenmp", "-pthread", "-std=c11", *(f"-D{d}" for d in defines)]
    digest = hashlib.sha1(SOURCE.read_bytes() + " ".join([cc, *flags, sys.platform]).encode()).hexdigest()[:12]
    target = cache_dir() / f"cpu_expert-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed on {SOURCE.name}: {done.stderr.strip()[-400:]}")
        os.replace(tmp, target)  # atomic: a concurrent build or an interrupted one leaves no half library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class JobStruct(ctypes.Structure):
    """One queued expert (`daop_job` in the source); start and end are filled in by the serving thread."""

    _fields_ = [("x", ctypes.c_void_p), ("n", ctypes.c_int), ("gate_up", ctypes.c_void_p), ("down", ctypes.c_void_p),
                ("y", ctypes.c_void_p), ("D", ctypes.c_long), ("I", ctypes.c_long), ("K", ctypes.c_long), ("threads", ctypes.c_int),
                ("isa", ctypes.c_int), ("scratch", ctypes.c_void_p), ("rc", ctypes.c_int), ("start", ctypes.c_double),
                ("end", ctypes.c_double), ("gate", ctypes.c_void_p), ("gate_value", ctypes.c_uint32),
                ("pick", ctypes.c_void_p), ("gate_ups", ctypes.c_void_p), ("downs", ctypes.c_void_p),
                ("experts", ctypes.c_int), ("served", ctypes.c_int), ("gate_up_s", ctypes.c_void_p),
                ("down_s", ctypes.c_void_p)]

    # (a plain job leaves the gate and pick fields zero: see `Picks` for the gated pick jobs)


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.daop_expert_bf16.restype = ctypes.c_int
    lib.daop_expert_bf16.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.c_int,
                                     ctypes.c_void_p]
    lib.daop_expert_int8.restype = ctypes.c_int
    lib.daop_expert_int8.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_int,
                                     ctypes.c_int, ctypes.c_void_p]
    lib.daop_cpu_isa.restype = ctypes.c_int
    lib.daop_max_tokens.restype = ctypes.c_int
    lib.daop_max_tokens.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_long]
    lib.daop_scratch_floats.restype = ctypes.c_long
    lib.daop_scratch_floats.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    lib.daop_submit.restype = ctypes.c_long
    lib.daop_submit.argtypes = [ctypes.POINTER(ctypes.POINTER(JobStruct)), ctypes.c_int]
    lib.daop_wait.restype = None
    lib.daop_wait.argtypes = [ctypes.c_long]
    lib.daop_finished.restype = ctypes.c_long
    lib.daop_set_flag.restype = ctypes.c_long
    lib.daop_set_flag.argtypes = [ctypes.c_void_p]
    lib.daop_set_spin_us.restype = None
    lib.daop_set_spin_us.argtypes = [ctypes.c_long]
    lib.daop_spin_us.restype = ctypes.c_long
    lib.isa = lib.daop_cpu_isa()  # the best path this CPU has, asked once
    lib.limits = Limits(lib)
    return lib


def library():
    """The loaded library, or None (switched off, no compiler, or the build failed: said once)."""
    with _LOCK:
        if "lib" in _STATE:
            return _STATE["lib"]
        lib = None
        if os.environ.get("DAOP_NO_CPU_KERNEL", "") != "1":
            cc = compiler()
            try:
                if cc is None:
                    raise RuntimeError("no C compiler found (set CC)")
                lib = load(build(cc))
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                warnings.warn(f"daop: CPU expert kernel unavailable, CPU experts use torch's products: {exc}",
                              RuntimeWarning, stacklevel=2)
                lib = None
        _STATE["lib"] = lib
        return lib


def available() -> bool:
    return library() is not None


MAX_SPIN_US = 100_000


def spin_us() -> int:
    """DAOP_CPU_SPIN_US: how long (microseconds) the serving thread polls for the next job before it
    sleeps; 0 (the default) sleeps at once. A sleeping thread starts the next job only once the
    submit has woken it; polling keeps a core busy for up to this long after each job."""
    env = os.environ.get("DAOP_CPU_SPIN_US", "").strip()
    if not env:
        return 0
    try:
        us = int(env)
    except ValueError:
        us = -1
    if not 0 <= us <= MAX_SPIN_US:
        from daop.errors import DaopError
        raise DaopError(f"DAOP_CPU_SPIN_US={env!r}: expected whole microseconds from 0 to {MAX_SPIN_US}")
    return us


def set_spin_us(us: int, lib: ctypes.CDLL | None = None) -> None:
    """Set the serving thread's polling time (`spin_us`); it applies from the next idle period on."""
    lib = lib or library()
    if lib is not None:
        lib.daop_set_spin_us(int(us))


def isa() -> str:
    """The best instruction set the kernel uses on this CPU ("amx", "avx512", "avx2", "plain C"), or "none"."""
    lib = library()
    return ISA_NAMES[lib.isa] if lib is not None else "none"


def max_tokens(D: int, K: int, lib: ctypes.CDLL | None = None, isa_level: int | None = None) -> int:
    """The most tokens a job over hidden size D and K intermediate rows may have: AMX_MAX_TOKENS on
    the AMX path (D and K multiples of 32), else MAX_TOKENS; 0 without the kernel."""
    lib = lib or library()
    if lib is None:
        return 0
    return lib.daop_max_tokens(lib.isa if isa_level is None else min(isa_level, lib.isa), D, K)


def is_int8(w) -> bool:
    """An int8 expert (gate_up codes, their scales, down codes, their scales; `daop.quant`) with bf16 scales."""
    return (len(w) == 4 and w[0].dtype == torch.int8 and w[2].dtype == torch.int8
            and w[1].dtype == torch.bfloat16 and w[3].dtype == torch.bfloat16)


def parts(w) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """(gate_up, down, scales) of a bf16 expert (scales None) or an int8 one (`is_int8`)."""
    if len(w) == 4:
        return w[0], w[2], (w[1], w[3])
    return w[0], w[1], None


def serves(dtype: torch.dtype, tokens: int, w: list, rows: int | None = None) -> bool:
    """Whether the executor runs a job through `expert` (where the kernel is `available()`): bf16
    activations, and a bf16 float expert (gate_up, down) at 1-SERVES_TOKENS tokens, or more where the
    AMX path takes them (`max_tokens`), or a whole int8 expert (`is_int8`) at 1-MAX_TOKENS tokens.
    rows: the CPU's part of a split expert (see `expert`; bf16 only)."""
    if dtype != torch.bfloat16:
        return False
    if is_int8(w):
        return rows is None and 1 <= tokens <= MAX_TOKENS
    if not (len(w) == 2 and w[0].dtype == torch.bfloat16 and w[1].dtype == torch.bfloat16):
        return False
    if 1 <= tokens <= SERVES_TOKENS:
        return True
    D, I = w[1].shape
    return tokens <= max_tokens(D, I if rows is None else int(rows))


def check_shapes(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, rows: int | None, lib: ctypes.CDLL,
                 level: int, scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> int:
    """The intermediate rows the job computes (rows, or all of them), once the shapes fit and the
    token count is one the library's path at `level` takes (`daop_max_tokens`; int8: MAX_TOKENS)."""
    D, I = x.shape[1], down.shape[1]
    if gate_up.shape != (2 * I, D) or down.shape != (D, I):
        raise ValueError(f"expert shapes gate_up {tuple(gate_up.shape)}, down {tuple(down.shape)} do not fit x {tuple(x.shape)}")
    K = I if rows is None else int(rows)
    if not 1 <= K <= I:
        raise ValueError(f"an expert part of {K} intermediate rows does not fit an expert of {I}")
    if scales is not None:
        if not is_int8((gate_up, scales[0], down, scales[1])):
            raise ValueError("an int8 expert needs int8 codes and bf16 scales")
        if tuple(scales[0].shape) != (2 * I,) or tuple(scales[1].shape) != (D,):
            raise ValueError(f"int8 scales {tuple(scales[0].shape)}, {tuple(scales[1].shape)} do not fit gate_up {tuple(gate_up.shape)}, "
                             f"down {tuple(down.shape)}")
        if K != I:
            raise ValueError("the CPU expert kernel computes whole int8 experts only, not a part of one")
        if not 1 <= x.shape[0] <= MAX_TOKENS:
            raise ValueError(f"the CPU expert kernel takes 1-{MAX_TOKENS} tokens for an int8 expert, got {x.shape[0]}")
        return K
    limit = lib.limits[("tokens", level, D, K)]
    if not 1 <= x.shape[0] <= limit:
        raise ValueError(f"the CPU expert kernel takes 1-{limit} tokens for this expert shape, got {x.shape[0]}")
    return K


class Limits(dict):
    """A library's answers for shapes, asked once each (a decode step asks the same ones every layer):
    ("tokens", level, D, K) -> daop_max_tokens, ("scratch", level, n, D, K) -> daop_scratch_floats."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        super().__init__()
        self.lib = lib

    def __missing__(self, key: tuple) -> int:
        value = self[key] = int((self.lib.daop_max_tokens if key[0] == "tokens" else self.lib.daop_scratch_floats)(*key[1:]))
        return value


_IN_FLIGHT: list["Queued"] = []  # queued jobs whose buffers the serving thread may still use


class Queued:
    """Experts queued on the library's own serving thread (`daop_submit`): it starts at once,
    needs no GIL, and `wait()` blocks without it. Jobs of every Queued run in submission order.
    pin: outputs in pinned memory (for a GPU model: their upload is an asynchronous copy).
    rows: per job, the intermediate rows [0, K) it computes (None: the whole expert; see `expert`).
    The buffers stay referenced here until the serving thread is done with them."""

    def __init__(self, xs: list[torch.Tensor], weights: list, threads: int, lib: ctypes.CDLL | None = None,
                 pin: bool = False, rows: list[int | None] | None = None) -> None:
        lib = self.lib = lib or library()
        if lib is None:
            raise RuntimeError("the CPU expert kernel is not available")
        self.pinned = pin
        self.keep: list[torch.Tensor] = []
        self.ys: list[torch.Tensor] = []
        self.jobs: list[JobStruct] = []
        for x, w, part in zip(xs, weights, rows or [None] * len(xs), strict=True):
            gate_up, down, scales = parts(w)
            K = check_shapes(x, gate_up, down, part, lib, lib.isa, scales)
            x, gate_up, down = x.contiguous(), gate_up.contiguous(), down.contiguous()
            n, D = x.shape
            I = down.shape[1]
            y = torch.empty(n, D, dtype=torch.bfloat16, pin_memory=pin)  # pinned: uploaded without a host sync
            level = lib.isa if scales is None else min(lib.isa, 2)  # int8: the vector paths
            scratch = torch.empty(lib.limits[("scratch", level, n, D, K)], dtype=torch.float32)
            self.keep += [x, gate_up, down, scratch]
            job = JobStruct(x.data_ptr(), n, gate_up.data_ptr(), down.data_ptr(), y.data_ptr(), D, I, K,
                            max(1, int(threads)), level, scratch.data_ptr(), 0, 0.0, 0.0)
            if scales is not None:
                s_gate_up, s_down = scales[0].contiguous(), scales[1].contiguous()
                self.keep += [s_gate_up, s_down]
                job.gate_up_s, job.down_s = s_gate_up.data_ptr(), s_down.data_ptr()
            self.ys.append(y)
            self.jobs.append(job)
        ptrs = (ctypes.POINTER(JobStruct) * len(self.jobs))(*[ctypes.pointer(j) for j in self.jobs])
        if _IN_FLIGHT:  # one read of the finished count for all of them
            finished = lib.daop_finished() if all(q.lib is lib for q in _IN_FLIGHT) else None
            _IN_FLIGHT[:] = [q for q in _IN_FLIGHT if (q.ticket > finished if finished is not None else not q.done())]
        self.ticket = lib.daop_submit(ptrs, len(self.jobs))
        if self.ticket < 0:
            raise RuntimeError("the CPU expert kernel could not start its thread")
        _IN_FLIGHT.append(self)

    def done(self) -> bool:
        return self.lib.daop_finished() >= self.ticket

    def wait(self) -> list[torch.Tensor]:
        """The outputs [n, D] in job order, once every job has run."""
        self.lib.daop_wait(self.ticket)
        if any(j.rc != 0 for j in self.jobs):
            raise ValueError("the CPU expert kernel refused a job")
        return self.ys

    def spans(self) -> list[tuple[float, float]]:
        """(start, end) of each job in perf_counter seconds, once done."""
        return [(j.start, j.end) for j in self.jobs]


_PICKS: "weakref.WeakSet[Picks]" = weakref.WeakSet()  # every Picks: its jobs may still be queued at exit


@atexit.register
def _drain() -> None:
    """At exit, let queued jobs finish before their buffers are freed."""
    for q in [*_IN_FLIGHT, *_PICKS]:
        q.lib.daop_wait(q.ticket)


def expert(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, threads: int,
           isa_level: int | None = None, lib: ctypes.CDLL | None = None, rows: int | None = None,
           scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """down(silu(gate x) * up x) for x [n, D] bf16 (n <= `max_tokens`); gate_up [2I, D], down [D, I] bf16, on the host.

    rows: only intermediate rows [0, rows) (gate rows [0, rows), up rows [I, I + rows), down columns
    [0, rows)), the CPU's part of an expert split with the GPU; default all of them.
    scales: an int8 expert (`daop.quant`): gate_up and down are int8 codes, scales their bf16 scales
    per output row ([2I], [D]); 1-MAX_TOKENS tokens, the whole expert, on the vector paths.
    isa_level: force a lower path (0 plain C, 1 AVX2, 2 AVX-512) for tests; default the best this CPU has.
    lib: a library built with other tunables (`load(build(cc, defines))`), for probes."""
    lib = lib or library()
    if lib is None:
        raise RuntimeError("the CPU expert kernel is not available")
    level = lib.isa if isa_level is None else min(isa_level, lib.isa)
    if scales is not None:
        level = min(level, 2)
    K = check_shapes(x, gate_up, down, rows, lib, level, scales)
    n, D = x.shape
    I = down.shape[1]
    x = x.contiguous()
    gate_up, down = gate_up.contiguous(), down.contiguous()
    y = torch.empty(n, D, dtype=torch.bfloat16)
    scratch = torch.empty(lib.limits[("scratch", level, n, D, K)], dtype=torch.float32)
    if scales is not None:
        s_gate_up, s_down = scales[0].contiguous(), scales[1].contiguous()
        rc = lib.daop_expert_int8(x.data_ptr(), n, gate_up.data_ptr(), s_gate_up.data_ptr(), down.data_ptr(),
                                  s_down.data_ptr(), y.data_ptr(), D, I, max(1, int(threads)), level, scratch.data_ptr())
    else:
        rc = lib.daop_expert_bf16(x.data_ptr(), n, gate_up.data_ptr(), down.data_ptr(), y.data_ptr(), D, I, K,
                                  max(1, int(threads)), level, scratch.data_ptr())
    if rc != 0:
        raise ValueError(f"the CPU expert kernel refused {n} tokens")
    return y


GATE_TIMED_OUT, PICK_OUT_OF_RANGE = -2, -3  # a gated pick job's return codes (`daop_job` in the source)


class Picks:
    """One token's K routed picks of a layer, computed on the library's serving thread where the
    expert is on the host, with nothing decided by a host thread: pick job k waits until the 32-bit
    `gate` flag (pinned host memory that a GPU stream writes, or the caller) reaches the value given
    to `submit`, reads the expert e = ids[k], and computes it on x [1, D] into y[k] with the weights
    whose addresses the layer's tables hold for e (`set_tables`; 0 for an expert the GPU serves:
    the job writes nothing). The buffers (x, ids, y: pinned where pin) are this object's and are
    reused by every call; the caller must not write x or ids for a call until the call before it is
    done (`wait`). Jobs of every Picks and Queued run in submission order on one thread, so the
    picks of all layers share one scratch buffer (`scratch`)."""

    def __init__(self, K: int, D: int, I: int, num_experts: int, threads: int, scratch: torch.Tensor,
                 lib: ctypes.CDLL | None = None, pin: bool = False) -> None:
        lib = self.lib = lib or library()
        if lib is None:
            raise RuntimeError("the CPU expert kernel is not available")
        need = lib.limits[("scratch", lib.isa, 1, D, I)]
        if scratch.dtype != torch.float32 or scratch.numel() < need:
            raise ValueError(f"the picks' scratch buffer needs {need} float32 values, got {scratch.numel()} {scratch.dtype}")
        self.K, self.D, self.I, self.E = K, D, I, num_experts
        self.x = torch.zeros(1, D, dtype=torch.bfloat16, pin_memory=pin)
        self.ids = torch.zeros(K, dtype=torch.int32, pin_memory=pin)
        self.y = torch.zeros(K, D, dtype=torch.bfloat16, pin_memory=pin)
        self.gate_ups = torch.zeros(num_experts, dtype=torch.int64)  # the expert's address, or 0 (the GPU's)
        self.downs = torch.zeros(num_experts, dtype=torch.int64)
        self.keep: list[torch.Tensor] = [scratch]  # the weights the tables point at, kept alive here
        self.ticket = 0
        self.jobs = [JobStruct(self.x.data_ptr(), 1, None, None, self.y[k].data_ptr(), D, I, I, max(1, int(threads)),
                               lib.isa, scratch.data_ptr(), 0, 0.0, 0.0, None, 0, self.ids[k:].data_ptr(),
                               self.gate_ups.data_ptr(), self.downs.data_ptr(), num_experts, 0) for k in range(K)]
        self.ptrs = (ctypes.POINTER(JobStruct) * K)(*[ctypes.pointer(j) for j in self.jobs])
        _PICKS.add(self)

    def set_tables(self, host: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The experts the CPU computes, expert -> (gate_up [2I, D], down [D, I]) contiguous bf16 on
        the host; every other expert is the GPU's. Only between calls (after `wait`)."""
        gate_ups, downs = [0] * self.E, [0] * self.E
        keep: list[torch.Tensor] = [self.keep[0]]
        for e, (gate_up, down) in host.items():
            if not 0 <= e < self.E:
                raise ValueError(f"expert {e} is outside the layer's {self.E} experts")
            if (gate_up.dtype != torch.bfloat16 or down.dtype != torch.bfloat16 or gate_up.shape != (2 * self.I, self.D)
                    or down.shape != (self.D, self.I) or not gate_up.is_contiguous() or not down.is_contiguous()
                    or gate_up.device.type != "cpu" or down.device.type != "cpu"):
                raise ValueError(f"expert {e}: the CPU kernel reads contiguous bf16 host weights gate_up "
                                 f"{(2 * self.I, self.D)} and down {(self.D, self.I)}, got {tuple(gate_up.shape)} "
                                 f"{gate_up.dtype} and {tuple(down.shape)} {down.dtype}")
            gate_ups[e], downs[e] = gate_up.data_ptr(), down.data_ptr()
            keep += [gate_up, down]
        self.gate_ups.copy_(torch.tensor(gate_ups, dtype=torch.int64))
        self.downs.copy_(torch.tensor(downs, dtype=torch.int64))
        self.keep = keep

    def submit(self, gate: torch.Tensor, value: int) -> int:
        """Queue the K pick jobs, the first waiting until gate (an int32 host tensor [1]) reaches
        value (compared as 32-bit integers that wrap); returns the last job's ticket."""
        first = self.jobs[0]
        first.gate, first.gate_value = gate.data_ptr(), value & 0xFFFFFFFF
        for job in self.jobs:
            job.rc, job.served = 0, 0
        self.ticket = self.lib.daop_submit(self.ptrs, self.K)
        if self.ticket < 0:
            raise RuntimeError("the CPU expert kernel could not start its thread")
        return self.ticket

    def done(self) -> bool:
        return self.lib.daop_finished() >= self.ticket

    def wait(self) -> list[bool]:
        """Block (without the GIL) until the last call's jobs have run; which picks the CPU computed.
        Raises where a job failed (its gate timed out, a pick out of range, a refused shape)."""
        self.lib.daop_wait(self.ticket)
        for k, job in enumerate(self.jobs):
            if job.rc == GATE_TIMED_OUT:
                raise RuntimeError("a CPU pick job waited past the kernel's gate timeout for its routing")
            if job.rc == PICK_OUT_OF_RANGE:
                raise ValueError(f"pick {k} routed to expert {int(self.ids[k])}, outside the layer's {self.E} experts")
            if job.rc != 0:
                raise ValueError("the CPU expert kernel refused a pick job")
        return [bool(job.served) for job in self.jobs]

    def __del__(self) -> None:
        # the serving thread may still read these jobs and buffers (a call whose gate was opened by
        # an error path just now): they go only once it is through with them
        try:
            self.lib.daop_wait(self.ticket)
        except Exception:  # noqa: BLE001 - at interpreter exit the library may be gone already
            pass

    def spans(self) -> list[tuple[float, float]]:
        """(start, end) of each served pick of the last call, in perf_counter seconds, once done."""
        return [(j.start, j.end) for j in self.jobs if j.served]


def scratch_for(D: int, I: int, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """A float32 scratch buffer for one-token jobs over a [D, I] expert (what `Picks` shares)."""
    lib = lib or library()
    return torch.empty(lib.limits[("scratch", lib.isa, 1, D, I)], dtype=torch.float32)
