"""daop's C kernel for bf16 CPU experts (`daop.kernels.cpu_expert`): accuracy against a float32
reference at every instruction-set path, its limits, the executor's use of it (only when asked, for
CPU experts of a GPU model), and the fallback when it cannot be built."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from daop.executors.cpu import CpuExecutor, kernel_name
from daop.kernels import cpu_expert
from daop.quant import ExpertFormat, expert_forward

SRC = str(Path(__file__).resolve().parents[1] / "src")
needs_kernel = pytest.mark.skipif(not cpu_expert.available(), reason="no C compiler: the kernel cannot be built")


def expert(D, I, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(2 * I, D, generator=g) * 0.05).bfloat16(), (torch.randn(D, I, generator=g) * 0.05).bfloat16())


def reference(x, gate_up, down):
    """The same expert in float32 from the same bf16 weights and inputs."""
    I = down.shape[1]
    h = F.linear(x.float(), gate_up.float())
    return F.linear(F.silu(h[:, :I]) * h[:, I:], down.float())


@needs_kernel
@pytest.mark.parametrize("D,I", [(256, 176), (64, 96), (100, 37), (48, 17)])  # whole vectors, and ragged tails
@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_kernel_matches_float32_reference_on_every_path(D, I, n):
    gate_up, down = expert(D, I)
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(1)).bfloat16()
    ref = reference(x, gate_up, down)
    torch_bf16 = expert_forward(x, [gate_up, down]).float()
    scale = ref.abs().max().item()
    for level in (2, 1, 0):  # AVX-512, AVX2, plain C (a path this CPU lacks falls to the next one down)
        y = cpu_expert.expert(x, gate_up, down, threads=2, isa_level=level)
        assert y.dtype == torch.bfloat16 and y.shape == (n, D)
        err = (y.float() - ref).abs().max().item()
        # bf16 roundings between the products and of the output, as torch's bf16 expert has them
        assert err <= 2 * (torch_bf16 - ref).abs().max().item() + scale * 2**-8, (level, err, scale)
        # and next to torch's bf16 expert, which rounds at the same points: a few units in the last place
        assert (y.float() - torch_bf16).abs().max().item() <= scale * 2**-6, level


@needs_kernel
def test_kernel_token_rows_are_independent_and_thread_count_does_not_change_results():
    gate_up, down = expert(128, 96)
    x = torch.randn(8, 128).bfloat16()
    together = cpu_expert.expert(x, gate_up, down, threads=2)
    alone = torch.cat([cpu_expert.expert(x[i:i + 1], gate_up, down, threads=1) for i in range(8)])
    assert torch.equal(together, alone)  # each row's sums run in one fixed order whatever the split


@needs_kernel
def test_kernel_refuses_what_it_cannot_run():
    gate_up, down = expert(64, 40)  # I not a multiple of 32: no AMX path either, on any CPU
    with pytest.raises(ValueError, match="1-8 tokens"):
        cpu_expert.expert(torch.randn(9, 64).bfloat16(), gate_up, down, threads=1)
    with pytest.raises(ValueError, match="do not fit"):
        cpu_expert.expert(torch.randn(1, 64).bfloat16(), gate_up[:10], down, threads=1)
    assert cpu_expert.serves(torch.bfloat16, cpu_expert.SERVES_TOKENS, [gate_up, down])
    assert not cpu_expert.serves(torch.bfloat16, cpu_expert.SERVES_TOKENS + 1, [gate_up, down])
    assert not cpu_expert.serves(torch.float32, 1, [gate_up.float(), down.float()])
    # int8 experts: whole ones at 1-8 tokens; int4 ones go to torch
    int8 = list(ExpertFormat("int8", torch.bfloat16).from_float(gate_up.float(), down.float()))
    assert cpu_expert.serves(torch.bfloat16, cpu_expert.MAX_TOKENS, int8)
    assert not cpu_expert.serves(torch.bfloat16, cpu_expert.MAX_TOKENS + 1, int8)
    assert not cpu_expert.serves(torch.bfloat16, 1, int8, 32)  # a part of a split expert
    assert not cpu_expert.serves(torch.float32, 1, int8)
    gate_up4, down4 = expert(128, 128)
    int4 = list(ExpertFormat("int4", torch.bfloat16, group_size=32).from_float(gate_up4.float(), down4.float()))
    assert not cpu_expert.serves(torch.bfloat16, 1, int4)


def int8_expert(D, I, seed=0):
    """An int8 expert (codes and bf16 scales per output row, `daop.quant`) from random float weights."""
    gate_up, down = expert(D, I, seed)
    return list(ExpertFormat("int8", torch.bfloat16).from_float(gate_up.float(), down.float()))


def int8_reference(x, w):
    """The int8 expert in float32 from its codes and scales, rounded to bf16 where torch's int8 products round."""
    q1, s1, q2, s2 = w
    I = q2.shape[1]
    h = (F.linear(x.float(), q1.float()) * s1.float()).bfloat16()
    a = F.silu(h[:, :I]) * h[:, I:]  # bf16, as in `expert_forward`
    return (F.linear(a.float(), q2.float()) * s2.float()).bfloat16()


@needs_kernel
@pytest.mark.parametrize("D,I", [(256, 176), (64, 96), (100, 37), (48, 17)])  # whole vectors, and ragged tails
@pytest.mark.parametrize("n", [1, 3, 8])
def test_int8_kernel_matches_the_int8_expert_on_every_path(D, I, n):
    w = int8_expert(D, I)
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(1)).bfloat16()
    ref = int8_reference(x, w).float()
    scale = ref.abs().max().item()
    # torch's int8 product (`expert_forward` on the CPU) takes sizes in whole 16s only (others read past
    # the rows here, and crashed); where it runs, the kernel rounds where it does
    torch_int8 = expert_forward(x, w).float() if D % 16 == 0 and I % 16 == 0 else None
    for level in (2, 1, 0):
        y = cpu_expert.expert(x, w[0], w[2], threads=2, isa_level=level, scales=(w[1], w[3]))
        assert y.dtype == torch.bfloat16 and y.shape == (n, D)
        assert (y.float() - ref).abs().max().item() <= scale * 2**-6, level
        if torch_int8 is not None:
            assert (y.float() - torch_int8).abs().max().item() <= scale * 2**-6, level
    rows = torch.cat([cpu_expert.expert(x[i:i + 1], w[0], w[2], threads=1, scales=(w[1], w[3])) for i in range(n)])
    assert torch.equal(rows, cpu_expert.expert(x, w[0], w[2], threads=2, scales=(w[1], w[3])))


@needs_kernel
def test_int8_kernel_refuses_what_it_cannot_run():
    w = int8_expert(64, 48)
    x = torch.randn(1, 64).bfloat16()
    with pytest.raises(ValueError, match="1-8 tokens for an int8 expert"):
        cpu_expert.expert(torch.randn(9, 64).bfloat16(), w[0], w[2], threads=1, scales=(w[1], w[3]))
    with pytest.raises(ValueError, match="int8 scales"):
        cpu_expert.expert(x, w[0], w[2], threads=1, scales=(w[1][:10], w[3]))
    with pytest.raises(ValueError, match="int8 codes and bf16 scales"):
        cpu_expert.expert(x, w[0], w[2], threads=1, scales=(w[1].float(), w[3]))
    with pytest.raises(ValueError, match="whole int8 experts"):
        cpu_expert.expert(x, w[0], w[2], threads=1, rows=16, scales=(w[1], w[3]))


@needs_kernel
@pytest.mark.parametrize("mode", ["worker", "inline"])
def test_executor_runs_int8_experts_on_the_kernel_queued_or_inline(mode):
    experts = [int8_expert(64, 48, seed=s) for s in range(3)]
    h = torch.randn(12, 64).bfloat16()
    jobs = [(0, torch.tensor([0, 3]), experts[0]), (1, torch.tensor([1]), experts[1]), (2, torch.arange(12), experts[2])]
    ex = CpuExecutor(2, mode, native=True)
    try:
        mixed = ex.submit(jobs, h, None).result()  # 12 tokens: more than the kernel serves, so torch for that one
        queued = ex.submit(jobs[:2], h, None).result()  # every job served: queued on the kernel's thread
    finally:
        ex.close()
    for e, rows, w in jobs[:2]:
        want = cpu_expert.expert(h[rows], w[0], w[2], threads=2, scales=(w[1], w[3]))
        assert torch.equal(mixed[e], want) and torch.equal(queued[e], want)
    assert torch.equal(mixed[2], expert_forward(h, list(experts[2])))


def amx_libraries():
    """The tile path emulated in C (any CPU with a compiler), and the real one where this CPU has AMX."""
    cc = cpu_expert.compiler()
    if cc is None:
        return []
    libs = [pytest.param(("emulated",), id="emulated")]
    if cpu_expert.isa() == "amx":
        libs.append(pytest.param(("native",), id="native"))
    return libs


def amx_library(kind):
    if kind[0] == "native":
        return cpu_expert.library()
    return cpu_expert.load(cpu_expert.build(cpu_expert.compiler(), ("DAOP_AMX_EMULATE=1",), amx=False))


@needs_kernel
@pytest.mark.parametrize("kind", amx_libraries())
@pytest.mark.parametrize("D,I,rows", [(64, 96, None), (96, 64, None), (64, 128, 64)])
def test_tile_path_matches_torch_and_each_token_row_stands_alone(kind, D, I, rows):
    lib = amx_library(kind)
    assert lib.isa == 3 and cpu_expert.max_tokens(D, rows or I, lib=lib) == cpu_expert.AMX_MAX_TOKENS
    gate_up, down = expert(D, I)
    K = rows or I
    x = torch.randn(100, D, generator=torch.Generator().manual_seed(2)).bfloat16()  # 7 blocks of 16: two passes
    h = F.linear(x.float(), gate_up.float())
    ref = F.linear(F.silu(h[:, :K]) * h[:, I:I + K], down[:, :K].float())
    part = [gate_up[:K], gate_up[I:I + K]]
    torch_bf16 = expert_forward(x, [torch.cat(part), down[:, :K].contiguous()]).float()
    scale = ref.abs().max().item()
    whole = cpu_expert.expert(x, gate_up, down, threads=3, lib=lib, rows=rows)
    assert (whole.float() - ref).abs().max().item() <= 2 * (torch_bf16 - ref).abs().max().item() + scale * 2**-8
    assert (whole.float() - torch_bf16).abs().max().item() <= scale * 2**-6
    for n in (4, 9, 16, 17, 33):  # a token's row does not depend on the others, the padding or the thread count
        assert torch.equal(cpu_expert.expert(x[:n], gate_up, down, threads=2, lib=lib, rows=rows), whole[:n])
    queued = cpu_expert.Queued([x[:20], x[:3]], [(gate_up, down)] * 2, threads=2, lib=lib, rows=[rows, rows])
    got = queued.wait()
    assert torch.equal(got[0], whole[:20])  # 3 tokens: the vector path, its own sums
    assert torch.equal(got[1], cpu_expert.expert(x[:3], gate_up, down, threads=2, lib=lib, rows=rows))


@needs_kernel
def test_tile_path_takes_only_aligned_shapes_and_at_most_its_token_limit():
    lib = amx_library(("emulated",))
    assert cpu_expert.max_tokens(64, 96, lib=lib) == cpu_expert.AMX_MAX_TOKENS
    assert cpu_expert.max_tokens(64, 40, lib=lib) == cpu_expert.MAX_TOKENS  # 40 rows: not whole 32-wide steps
    assert cpu_expert.max_tokens(48, 96, lib=lib) == cpu_expert.MAX_TOKENS
    assert cpu_expert.max_tokens(64, 96, lib=lib, isa_level=2) == cpu_expert.MAX_TOKENS
    gate_up, down = expert(64, 96)
    with pytest.raises(ValueError, match="1-128 tokens"):
        cpu_expert.expert(torch.randn(cpu_expert.AMX_MAX_TOKENS + 1, 64).bfloat16(), gate_up, down, threads=1, lib=lib)
    with pytest.raises(ValueError, match="1-8 tokens"):
        cpu_expert.expert(torch.randn(9, 64).bfloat16(), gate_up, down, threads=1, lib=lib, isa_level=2)


@needs_kernel
@pytest.mark.parametrize("mode", ["worker", "inline"])
def test_executor_uses_the_kernel_only_when_asked(mode):
    experts = [expert(64, 48, seed=s) for s in range(3)]
    h = torch.randn(5, 64).bfloat16()
    jobs = [(e, torch.tensor(rows), experts[e]) for e, rows in ((0, [0, 3]), (1, [1]), (2, [0, 1, 2, 4]))]
    native = CpuExecutor(2, mode, native=True)
    plain = CpuExecutor(2, mode, native=False)
    try:
        got, want = native.submit(jobs, h, None).result(), plain.submit(jobs, h, None).result()
    finally:
        native.close()
        plain.close()
    for e, rows, w in jobs:
        assert torch.equal(got[e], cpu_expert.expert(h[rows], w[0], w[1], threads=2))
        assert torch.equal(want[e], expert_forward(h[rows], list(w)))
    assert native.expert_tokens == plain.expert_tokens == 7
    assert kernel_name(True).startswith("daop C kernel") and kernel_name(False) == "torch"


@needs_kernel
def test_executor_runs_jobs_the_kernel_does_not_serve_through_torch():
    gate_up, down = expert(64, 48)
    h = torch.randn(12, 64).bfloat16()
    other = expert(64, 48, seed=1)
    # 12 tokens: more than the kernel serves; 2 tokens of another expert in the same list: served
    jobs = [(0, torch.arange(12), (gate_up, down)), (1, torch.tensor([3, 7]), other)]
    ex = CpuExecutor(2, "worker", native=True)
    try:
        got = ex.submit(jobs, h, None).result()
    finally:
        ex.close()
    assert torch.equal(got[0], expert_forward(h, [gate_up, down]))
    assert torch.equal(got[1], cpu_expert.expert(h[[3, 7]], other[0], other[1], threads=2))


@needs_kernel
def test_queued_jobs_run_in_order_on_the_kernels_thread_and_report_their_spans():
    import time

    experts = [expert(64, 48, seed=s) for s in range(4)]
    xs = [torch.randn(n, 64).bfloat16() for n in (1, 2, 3, 4)]
    t0 = time.perf_counter()
    first = cpu_expert.Queued(xs[:2], experts[:2], threads=2)
    second = cpu_expert.Queued(xs[2:], experts[2:], threads=2)
    later = second.wait()  # a later ticket is done only after every earlier job
    assert first.done() and second.done()
    for x, w, y in zip(xs, experts, first.wait() + later):
        assert torch.equal(y, cpu_expert.expert(x, w[0], w[1], threads=2))
    spans = first.spans() + second.spans()
    assert t0 <= spans[0][0] and spans[-1][1] <= time.perf_counter()  # perf_counter's clock
    assert all(a <= b for a, b in spans) and all(spans[i][1] <= spans[i + 1][0] for i in range(3))
    with pytest.raises(ValueError, match="1-8 tokens"):
        cpu_expert.Queued([torch.randn(9, 64).bfloat16()], experts[:1], threads=1)


@needs_kernel
def test_a_polling_serving_thread_runs_the_same_jobs(monkeypatch):
    """DAOP_CPU_SPIN_US: the kernel's serving thread polls for the next job a while before it sleeps;
    jobs submitted while it polls, right after a job and after it has gone to sleep, all run, in
    order, with the same outputs; an executor built without the setting puts it back to sleeping at once."""
    import time

    experts = [expert(64, 48, seed=s) for s in range(3)]
    xs = [torch.randn(n, 64).bfloat16() for n in (1, 2, 3)]
    want = [cpu_expert.expert(x, w[0], w[1], threads=2) for x, w in zip(xs, experts)]
    monkeypatch.setenv("DAOP_CPU_SPIN_US", "20000")
    ex = CpuExecutor(threads=2, mode="inline", native=True)
    assert cpu_expert.library().daop_spin_us() == 20000
    try:
        for pause in (0.0, 0.001, 0.05):  # back to back, while it polls (20 ms), after it slept
            got = []
            for x, w in zip(xs, experts):
                time.sleep(pause)
                got += cpu_expert.Queued([x], [w], threads=2).wait()
            assert all(torch.equal(a, b) for a, b in zip(got, want))
    finally:
        ex.close()
    monkeypatch.delenv("DAOP_CPU_SPIN_US")
    CpuExecutor(threads=2, mode="inline", native=True).close()
    assert cpu_expert.library().daop_spin_us() == 0
    assert torch.equal(cpu_expert.Queued([xs[0]], [experts[0]], threads=2).wait()[0], want[0])


@pytest.mark.parametrize("value", ["-1", "fast", "100001"])
def test_a_bad_spin_setting_is_named(monkeypatch, value):
    from daop.errors import DaopError

    monkeypatch.setenv("DAOP_CPU_SPIN_US", value)
    with pytest.raises(DaopError, match="DAOP_CPU_SPIN_US"):
        cpu_expert.spin_us()


@needs_kernel
def test_executor_counts_queued_work_and_reports_its_span():
    experts = [expert(64, 48, seed=s) for s in range(2)]
    h = torch.randn(3, 64).bfloat16()
    jobs = [(0, torch.tensor([0, 2]), experts[0]), (1, torch.tensor([1]), experts[1])]
    spans = []
    ex = CpuExecutor(2, "worker", native=True)
    try:
        future = ex.submit(jobs, h, None, span=lambda *t: spans.append(t))
        got = future.result()
        assert future.done() and future.result() is got  # taken once
    finally:
        ex.close()
    assert torch.equal(got[1], cpu_expert.expert(h[[1]], *experts[1], threads=2))
    assert ex.expert_tokens == 3 and ex.busy_s > 0
    (submitted, start, end), = spans
    assert submitted <= start <= end and ex.busy_s <= end - start + 1e-6


def test_engine_on_the_cpu_never_uses_the_kernel(tiny_dir):
    from daop.engine import Engine

    _, path = tiny_dir("mixtral")
    engine = Engine.from_pretrained(path, device="cpu", dtype="bf16", progress=False, policy="static", expert_ratio=0.25)
    engine.generate("hello", max_new_tokens=2)
    runner = engine.decoder.experts
    assert runner.cpu.native is False  # exact policies on a CPU device stay bitwise equal to the resident path


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": SRC, **env})


def test_switched_off_or_unbuildable_kernel_falls_back_with_one_warning(tmp_path):
    probe = ("import warnings; warnings.simplefilter('always')\n"
             "from daop.kernels import cpu_expert; from daop.executors.cpu import kernel_name\n"
             "print(cpu_expert.available(), cpu_expert.available(), cpu_expert.isa(), kernel_name(True))")
    off = run_python(probe, DAOP_NO_CPU_KERNEL="1", XDG_CACHE_HOME=str(tmp_path / "a"))
    assert off.returncode == 0 and off.stdout.split() == ["False", "False", "none", "torch"]
    assert "unavailable" not in off.stderr  # switched off on purpose: nothing to warn about
    broken = run_python(probe, CC="false", XDG_CACHE_HOME=str(tmp_path / "b"))
    assert broken.returncode == 0 and broken.stdout.split() == ["False", "False", "none", "torch"]
    assert broken.stderr.count("CPU expert kernel unavailable") == 1 and "false failed" in broken.stderr
    assert not list((tmp_path / "b").rglob("*.so"))  # no half-built library left in the cache


def test_cpu_prefill_gemm_probe_times_each_token_count():
    """scripts/cpu_prefill_gemm_probe.py (the CPU channel's products at a prompt's token counts), a tiny expert."""
    from helpers import load_script

    before = torch.get_num_threads()
    try:
        out = load_script("cpu_prefill_gemm_probe").main(["--small", "--threads", "1", "--tokens", "1,16", "--repeat", "2"])
    finally:
        torch.set_num_threads(before)
    assert [r["tokens"] for r in out["rows"]] == [1, 16]
    assert all(r["ms"] > 0 and r["weights_gbps"] > 0 for r in out["rows"])
    assert out["expert_bytes"] == 3 * 64 * 96 * 2


@needs_kernel
def test_int8_probe_times_the_kernel_and_torch_at_each_token_count(tmp_path):
    """scripts/cpu_int8_probe.py on a small int8 expert."""
    from helpers import load_script

    before = torch.get_num_threads()
    try:
        rows = load_script("cpu_int8_probe").main(["--hidden", "64", "--inter", "48", "--tokens", "1,3", "--threads", "1",
                                                   "--rounds", "2", "--output", str(tmp_path / "p.jsonl")])
    finally:
        torch.set_num_threads(before)
    assert [r["tokens"] for r in rows] == [1, 3]
    assert all(r["kernel_ms"] > 0 and r["torch_ms"] > 0 and r["kernel_gbps"] > 0 for r in rows)
    assert all(0.5 < r["equal_share"] <= 1 for r in rows)  # rounded where torch rounds: mostly the same bits
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [x["kind"] for x in lines] == ["card", "point", "point"]


def test_host_costs_probe_times_a_queued_jobs_setup():
    """scripts/host_costs_probe.py (the driving thread's host costs), a tiny expert; its CUDA part needs a GPU."""
    from helpers import load_script

    out = load_script("host_costs_probe").main(["--small"])
    assert out["kind"] == "host_costs" and (out["hidden"], out["intermediate"]) == (64, 96)
    if cpu_expert.available():
        setup = out["queued_setup_us pin=False gap=0.5ms"]
        assert all(setup[k] > 0 for k in ("shapes", "output", "scratch", "structs", "submit"))
        assert setup["total"] >= setup["submit"]
    if torch.cuda.is_available() and "one_launch_equal_bitwise" in out:
        assert out["one_launch_equal_bitwise"]
