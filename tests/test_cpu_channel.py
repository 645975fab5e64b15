"""The CPU expert channel: stacked gate_up store, the executor (worker / inline, one native call per
job list), calibration of its mode and threads, and the hardware-profile cache."""
import json
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

from daop.cli import main
from daop.config import load_config
from daop.engine import Engine
from daop.errors import DaopError
from daop.executors import cpu as cpu_executor
from daop.executors.cpu import SWITCH_INTERVAL_S, CpuExecutor, run_jobs_eager
from daop.executors.cpu_tuning import Trial, choose, distinct_experts, driving_load, thread_candidates, tune
from daop.hardware import OLD_REASON, HardwareProfile, calibrate
from daop.model.moe import swiglu
from daop.runtime import profile_cache
from daop.runtime.profile_cache import ProfileRequest, cache_path, locate, obtain
from daop.sampling import SamplingParams
from daop.weights.safetensors_io import Checkpoint

CPU = torch.device("cpu")


def read(ckpt, name):
    entry = ckpt.entry(name)
    out = torch.empty(tuple(entry.shape), dtype=torch.float32)
    ckpt.read_into(name, out)
    return out


def test_stacked_store_holds_checkpoint_tensors_and_matches_separate_weights(tiny_dir):
    _, path = tiny_dir("mixtral")
    engine = Engine.from_pretrained(path, device="cpu", dtype="fp32", progress=False, policy="static", expert_ratio=0.25)
    store, c = engine.decoder.experts.store, engine.config
    I = c.expert_intermediate_size
    ckpt = Checkpoint(path)
    try:
        for layer_idx in (0, c.num_layers - 1):
            for expert_idx in (0, c.num_experts - 1):
                gate, up, down = (read(ckpt, n) for n in engine.spec.expert_names(layer_idx, expert_idx))
                gate_up, d = store.host_weights(layer_idx, expert_idx)
                assert gate_up.shape == (2 * I, c.hidden_size)
                assert torch.equal(gate_up[:I], gate) and torch.equal(gate_up[I:], up) and torch.equal(d, down)
                x = torch.randn(5, c.hidden_size)
                separate = F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
                torch.testing.assert_close(swiglu(x, gate_up, d), separate, rtol=1e-5, atol=1e-5)
    finally:
        ckpt.close()


def jobs_and_reference(threads):
    gen = torch.Generator().manual_seed(0)
    D, I = 48, 80
    weights = [(torch.randn(2 * I, D, generator=gen), torch.randn(D, I, generator=gen)) for _ in range(3)]
    h = torch.randn(6, D, generator=gen)
    jobs = [(1, torch.tensor([0, 3, 5]), weights[0]), (4, torch.arange(6), weights[1]), (6, torch.tensor([2]), weights[2])]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ref = {e: swiglu(h[rows], *w) for e, rows, w in jobs}
    finally:
        torch.set_num_threads(previous)
    return jobs, h, ref


@pytest.mark.parametrize("mode", ["worker", "inline"])
@pytest.mark.parametrize("scripted", [True, False])
def test_executor_equals_swiglu_bitwise_and_counts(mode, scripted):
    threads = torch.get_num_threads()
    jobs, h, ref = jobs_and_reference(threads)
    ex = CpuExecutor(threads, mode, scripted=scripted)
    try:
        for _ in range(3):  # TorchScript would switch to an optimised graph after a few calls
            out = ex.submit(jobs, h, None).result()
            assert sorted(out) == [1, 4, 6]
            assert all(torch.equal(out[e], ref[e]) for e in ref)
        assert ex.expert_tokens == 3 * (3 + 6 + 1)
        assert ex.busy_s > 0
    finally:
        ex.close()


def test_scripted_kernel_is_used_and_equals_eager():
    kernel = cpu_executor.job_kernel()
    assert kernel is not run_jobs_eager  # TorchScript is available in the supported torch versions
    jobs, h, _ = jobs_and_reference(torch.get_num_threads())
    rows, weights = [r for _, r, _ in jobs], [list(w) for _, _, w in jobs]
    with torch.jit.optimized_execution(False):
        for _ in range(3):
            assert all(torch.equal(a, b) for a, b in zip(kernel(h, rows, weights), run_jobs_eager(h, rows, weights)))


def test_worker_lowers_switch_interval_while_running_and_restores_it():
    original = sys.getswitchinterval()
    seen = {}

    def compute(x, gate_up, down):
        seen["interval"], seen["thread"] = sys.getswitchinterval(), threading.get_ident()
        return swiglu(x, gate_up, down)

    jobs, h, _ = jobs_and_reference(1)
    ex = CpuExecutor(1, "worker")
    try:
        ex.submit(jobs[:1], h, None, compute).result()
    finally:
        ex.close()
    assert seen["interval"] == pytest.approx(min(original, SWITCH_INTERVAL_S)) and seen["interval"] < original
    assert seen["thread"] != threading.get_ident()
    assert sys.getswitchinterval() == original


def test_inline_runs_on_the_asking_thread_when_asked_and_raises_there():
    calls = []

    def compute(x, gate_up, down):
        calls.append(threading.get_ident())
        return swiglu(x, gate_up, down)

    jobs, h, _ = jobs_and_reference(1)
    ex = CpuExecutor(1, "inline")
    future = ex.submit(jobs[:1], h, None, compute)
    assert calls == []  # nothing ran yet: the driving thread first launches its GPU work
    future.result()
    assert calls == [threading.get_ident()]

    def failing(*args):
        raise RuntimeError("injected")

    with pytest.raises(RuntimeError, match="injected"):
        ex.submit(jobs[:1], h, None, failing).result()


def test_inline_mode_runs_jobs_for_a_later_layer_on_a_worker_at_once():
    """A pre-calculation must overlap the caller's work even in inline mode."""
    calls, started = [], threading.Event()

    def compute(x, gate_up, down):
        calls.append(threading.get_ident())
        started.set()
        return swiglu(x, gate_up, down)

    jobs, h, _ = jobs_and_reference(1)
    ex = CpuExecutor(1, "inline")
    try:
        future = ex.submit(jobs[:1], h, None, compute, ahead=True)
        assert started.wait(10)  # runs without anybody asking for the result
        future.result()
        assert calls and calls[0] != threading.get_ident()
    finally:
        ex.close()


def test_thread_candidates():
    assert thread_candidates(16) == [16, 15, 14, 8]
    assert thread_candidates(2) == [2, 1]
    assert thread_candidates(1) == [1]


def test_choose_takes_the_fastest_and_says_why():
    trials = [Trial("worker", 15, (7.1, 7.4), ()), Trial("worker", 16, (3.7, 4.0), ()), Trial("inline", 16, (3.9, 4.1), ())]
    best, reason = choose(trials, (1, 4))
    assert (best.mode, best.threads) == ("worker", 16)
    assert reason.startswith("worker x16 (fastest measured candidate)")
    assert reason.index("worker x16 3.70/4.00") < reason.index("inline x16 3.90/4.10") < reason.index("worker x15 7.10/7.40")


def test_tune_measures_every_candidate_off_the_cpu_device():
    experts = distinct_experts(32, 48, torch.float32)
    meta = torch.device("meta")  # a non-CPU device: threads are chosen, not pinned to the driving thread's
    trials, best, reason = tune(experts, driving_load(meta), meta, 2, None, None, (1, 4), 2)
    assert {(t.mode, t.threads) for t in trials} == {("worker", 2), ("worker", 1), ("inline", 2), ("inline", 1)}
    assert best.score == min(t.score for t in trials)
    assert reason.startswith(f"{best.label} (fastest measured candidate)")


def test_calibration_records_choice_reason_and_round_trips(tmp_path):
    profile = calibrate(32, 48, torch.float32, CPU, None, quick=True)
    assert profile.cpu_threads == torch.get_num_threads()  # the CPU device keeps the driving thread's count
    assert profile.cpu_mode in ("worker", "inline")
    assert profile.cpu_threads_reason.startswith(f"{profile.cpu_mode} x{profile.cpu_threads} (the device is the CPU")
    assert set(profile.cpu_candidates_ms) == {f"worker x{profile.cpu_threads}", f"inline x{profile.cpu_threads}"}
    assert profile.repeats == 3 and len(profile.cpu_expert_ms_max) == len(profile.cpu_token_counts)
    for key in ("host", "cpu", "cpu_capability", "torch", "cuda"):
        assert profile.provenance[key]
    profile.save(tmp_path / "p.json")
    assert HardwareProfile.load(tmp_path / "p.json", 32, 48, "float32") == profile


def old_profile_json(**changes):
    data = {"schema": "daop.hardware_profile/1", "hidden_size": 32, "intermediate_size": 48, "dtype": "float32",
            "expert_bytes": 18432, "copy_pinned_ms": 0.01, "copy_pageable_ms": 0.02, "cpu_threads": 4,
            "cpu_token_counts": [1, 4], "cpu_expert_ms": [0.1, 0.2], "gpu_token_counts": [1, 4], "gpu_expert_ms": [0.01, 0.01],
            "cpu_threads_sweep": {"4": 0.1}, "provenance": {"cpu": "x86_64"}}
    return json.dumps({**data, **changes})


def test_old_profiles_still_load_and_unknown_schemas_are_errors(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(old_profile_json())
    profile = HardwareProfile.load(path, 32, 48, "float32")
    assert (profile.cpu_threads, profile.cpu_mode, profile.cpu_threads_reason) == (4, "worker", OLD_REASON)
    path.write_text(old_profile_json(schema="daop.hardware_profile/9"))
    with pytest.raises(DaopError, match="not a valid hardware profile"):
        HardwareProfile.load(path)


def profile_with(ms, worst=None, **changes):
    base = dict(hidden_size=32, intermediate_size=48, dtype="float32", expert_bytes=18432, copy_pinned_ms=0.01,
                copy_pageable_ms=0.02, cpu_threads=1, cpu_token_counts=(1, 4, 16)[: len(ms)], cpu_expert_ms=tuple(ms),
                gpu_token_counts=(1,), gpu_expert_ms=(0.01,), cpu_expert_ms_max=tuple(worst or ms), repeats=3)
    return HardwareProfile(**{**base, **changes})


def test_plausibility():
    assert profile_with([1.0, 1.2, 2.0]).implausible() is None
    assert profile_with([1.0, 0.9, 2.0]).implausible() is None  # a 10 % dip is noise
    assert "falls from 1.000 ms at 1 tokens to 0.500 ms at 4" in profile_with([1.0, 0.5, 2.0]).implausible()
    assert profile_with([1.0, 1.2], worst=[2.1, 1.3]).implausible() is None
    assert "a repeat at 1 tokens took 3.000 ms" in profile_with([1.0, 1.2], worst=[3.0, 1.3]).implausible()


@pytest.fixture
def request_for(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    _, path = tiny_dir("mixtral")
    config = load_config(path)
    return path, (lambda **kw: ProfileRequest(config, torch.float32, CPU, **kw))


def test_cache_key_follows_cpu_model_threads_and_versions(request_for, tmp_path, monkeypatch):
    _, make = request_for
    first = cache_path(make())
    assert first.parent == tmp_path / "xdg" / "daop" / "profiles"
    assert cache_path(make()) == first
    assert cache_path(make(cpu_threads=3)) != first
    assert cache_path(make(cpu_mode="inline")) != first
    monkeypatch.setattr("daop.hardware.cpu_model", lambda: "Another CPU")
    other_cpu = cache_path(make())
    assert other_cpu != first
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert cache_path(make()) not in (first, other_cpu)


class FakeCalibration:
    """Stands in for the measurement (which the tests above cover) so cache decisions are deterministic."""

    def __init__(self):
        self.calls = 0

    def __call__(self, hidden, inter, dtype, device, threads, quick=False, mode=None, fmt=None):
        self.calls += 1
        return profile_with([0.1, 0.2, 0.4], hidden_size=hidden, intermediate_size=inter,
                            provenance={"measured_at": f"call {self.calls}"})


def test_implausible_or_foreign_cached_profile_is_measured_again(request_for, monkeypatch):
    _, make = request_for
    fake = FakeCalibration()
    monkeypatch.setattr(profile_cache, "calibrate", fake)
    request = make()
    profile, source = obtain(request)
    assert (source.kind, fake.calls) == ("fresh", 1) and "no cached profile" in source.reason
    profile, source = obtain(request)
    assert (source.kind, fake.calls, profile.provenance["measured_at"]) == ("cached", 1, "call 1")

    path = cache_path(request)
    data = json.loads(path.read_text())
    data["cpu_expert_ms"] = [0.4, 0.1, 0.4]  # falls with more tokens: the host was busy while measuring
    path.write_text(json.dumps(data))
    profile, source = obtain(request)
    assert source.kind == "fresh" and "implausible (CPU expert time falls" in source.reason and fake.calls == 2
    assert locate(request).kind == "cached"  # the plausible re-measurement replaced it

    data = json.loads(path.read_text())
    key = json.loads(data["provenance"]["cache_key"])
    data["provenance"]["cache_key"] = json.dumps({**key, "torch": "1.0"}, sort_keys=True)
    path.write_text(json.dumps(data))
    source = locate(request)
    assert source.kind == "fresh" and "torch '1.0' -> " in source.reason


def test_a_host_noisy_in_every_attempt_is_calibrated_once_not_on_every_run(request_for, monkeypatch):
    """Every attempt implausible: the attempt with the lowest CPU times is used and cached with a
    note, and later runs use it (saying so) instead of calibrating ATTEMPTS times again."""
    _, make = request_for
    calls = []

    def noisy(hidden, inter, *args, **kwargs):
        calls.append(1)
        slow = 0.5 if len(calls) == 2 else 1.0  # the second attempt is the least disturbed
        return profile_with([0.4 * slow, 0.1 * slow, 0.4 * slow], hidden_size=hidden, intermediate_size=inter,
                            provenance={"measured_at": f"call {len(calls)}"})

    monkeypatch.setattr(profile_cache, "calibrate", noisy)
    request = make()
    profile, source = obtain(request)
    assert len(calls) == profile_cache.ATTEMPTS
    assert source.kind == "fresh" and "still implausible after 3 attempts (CPU expert time falls" in source.reason
    assert profile.cpu_expert_ms == (0.2, 0.05, 0.2) and profile.provenance["measured_at"] == "call 2"
    assert cache_path(request).exists()

    again, source = obtain(request)
    assert len(calls) == profile_cache.ATTEMPTS  # not measured again
    assert source.kind == "cached" and again.cpu_expert_ms == profile.cpu_expert_ms
    assert "3 calibrations in a row looked noisy (CPU expert time falls" in source.reason
    assert f"delete {cache_path(request)} to measure again" in source.reason


def test_calibrate_show_prints_the_source(request_for, monkeypatch, capsys, tmp_path):
    path, make = request_for
    args = ["calibrate", "--show", "--model", str(path), "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"fresh: {cache_path(make())}" and out[1].startswith("why: no cached profile")
    monkeypatch.setattr(profile_cache, "calibrate", FakeCalibration())
    obtain(make())
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"cached: {cache_path(make())}" and out[2].startswith("cpu: worker with 1 threads")
    given = tmp_path / "given.json"
    profile_with([0.1, 0.2], hidden_size=64, intermediate_size=96).save(given)
    assert main(args + ["--hardware-profile", str(given)]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == [f"file: {given}", "why: given by --hardware-profile"]
    profile_with([0.4, 0.1], hidden_size=64, intermediate_size=96).save(given)  # a time that falls with more tokens
    assert main(args + ["--hardware-profile", str(given)]) == 0
    why = capsys.readouterr().out.splitlines()[1]
    assert why.startswith("why: given by --hardware-profile; its CPU numbers look noisy (CPU expert time falls from 0.400 ms")


def test_calibrate_warns_when_its_cpu_numbers_look_noisy(request_for, monkeypatch, capsys, tmp_path):
    import daop.hardware

    path, _ = request_for
    out = tmp_path / "profile.json"
    args = ["calibrate", "--model", str(path), "--device", "cpu", "--output", str(out)]
    monkeypatch.setattr(daop.hardware, "calibrate", lambda hidden, inter, *a, **kw: profile_with(
        [0.1, 0.2, 0.4], hidden_size=hidden, intermediate_size=inter))
    assert main(args) == 0 and out.exists()
    assert "noisy" not in capsys.readouterr().err
    monkeypatch.setattr(daop.hardware, "calibrate", lambda hidden, inter, *a, **kw: profile_with(
        [0.4, 0.1, 0.4], hidden_size=hidden, intermediate_size=inter))
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "warning: the CPU numbers look noisy (CPU expert time falls from 0.400 ms at 1 tokens" in err and str(out) in err


def test_every_row_means_all_token_rows_in_order():
    from daop.executors.cpu import every_row

    assert every_row(torch.tensor([0]), 1) and every_row(torch.tensor([0, 1, 2]), 3)
    assert not every_row(torch.tensor([1]), 1) and not every_row(torch.tensor([0, 2, 1]), 3)
    assert not every_row(torch.tensor([0]), 2) and not every_row(torch.tensor([0, 1]), 1)


def test_engine_uses_driving_thread_count_on_cpu_and_counts_expert_tokens(tiny_dir):
    _, path = tiny_dir("mixtral")
    engine = Engine.from_pretrained(path, device="cpu", dtype="fp32", progress=False, policy="static", expert_ratio=0.25,
                                    cpu_mode="inline")
    cpu = engine.decoder.experts.cpu
    assert (cpu.threads, cpu.mode) == (torch.get_num_threads(), "inline")
    engine.eos_ids = frozenset()
    list(engine.generate_ids([5, 17, 42, 99], SamplingParams(max_new_tokens=4)))
    totals = engine.counters()
    assert totals["cpu_calls"] > 0 and totals["cpu_expert_tokens"] >= totals["cpu_calls"]
    with pytest.raises(DaopError, match="--cpu-mode must be one of"):
        Engine.from_pretrained(path, device="cpu", progress=False, policy="static", expert_ratio=0.25, cpu_mode="gpu")
