"""Every exact offloading policy routes as the all-GPU path and, where no expert runs on another
kind of processor, gives bitwise its logits and greedy tokens.

On the CPU (the default) every exact policy is bitwise equal to `gpu`: CPU experts and "GPU"
experts run the same kernels. DAOP_TEST_DEVICE=cuda (and DAOP_TEST_DTYPE=bf16) runs the same
checks on a GPU: policies that only copy experts (ondemand, lru, daop-strict) must still be bitwise
equal; policies that compute experts on the CPU differ by CPU-vs-GPU rounding, so their prefill
logits are compared with a tolerance and their greedy agreement is measured by scripts/gpu_checks.py.
"""
import os

import pytest
import torch

from daop.engine import Engine, GenerationStats
from daop.errors import DaopError
from daop.sampling import SamplingParams
from helpers import write_profile

PROMPT = [5, 17, 42, 99, 3, 250, 7, 64, 128, 31, 77, 200, 9, 11]
POLICIES = ["ondemand", "lru", "static", "fiddler", "daop-exact", "daop-strict"]
COPY_ONLY = {"ondemand", "lru", "daop-strict"}
DEVICE = os.environ.get("DAOP_TEST_DEVICE", "cpu")
DTYPE = os.environ.get("DAOP_TEST_DTYPE", "fp32")
TORCH_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[DTYPE]
TOLERANCE = {"fp32": 1e-3, "bf16": 0.25, "fp16": 0.05}[DTYPE]  # max |logit difference| with CPU experts on a GPU


def bitwise(policy: str) -> bool:
    return DEVICE == "cpu" or policy in COPY_ONLY


def assert_same_logits(policy, ours, ref):
    if bitwise(policy):
        assert torch.equal(ours, ref)
    else:
        assert (ours - ref).abs().max().item() < TOLERANCE


def greedy(engine, n=24):
    engine.eos_ids = frozenset()
    return list(engine.generate_ids(PROMPT, SamplingParams(max_new_tokens=n)))


@pytest.fixture(scope="module")
def reference(tiny_dir):
    cache = {}

    def get(family):
        if family not in cache:
            _, path = tiny_dir(family)
            engine = Engine.from_pretrained(path, device=DEVICE, dtype=DTYPE, progress=False)
            cache[family] = (greedy(engine), engine.logits(PROMPT))
        return cache[family]

    return get


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_policy_matches_gpu(tiny_dir, reference, family, policy, ratio, tmp_path):
    _, path = tiny_dir(family)
    ref_tokens, ref_logits = reference(family)
    extra = {"hardware_profile": write_profile(path, tmp_path, 10.0, 1.0, TORCH_DTYPE)} if policy == "fiddler" else {}
    engine = Engine.from_pretrained(path, device=DEVICE, dtype=DTYPE, progress=False, policy=policy, expert_ratio=ratio, **extra)
    assert engine.policy == policy
    tokens = greedy(engine)
    if bitwise(policy):
        assert tokens == ref_tokens
    assert_same_logits(policy, engine.logits(PROMPT), ref_logits)
    totals = engine.counters()
    assert totals["resident_calls"] + totals["cpu_calls"] + totals["copy_calls"] > 0
    if policy in COPY_ONLY:
        assert totals["copy_calls"] > 0 and totals["cpu_calls"] == 0
    if policy in ("static", "fiddler"):
        assert totals["cpu_calls"] > 0


def test_second_sequence_starts_from_calibrated_placement(tiny_dir):
    _, path = tiny_dir("mixtral")
    engine = Engine.from_pretrained(path, device=DEVICE, dtype=DTYPE, progress=False, policy="lru", expert_ratio=0.25)
    runner = engine.decoder.experts
    initial = runner.policy.initial.table.copy()
    first = greedy(engine)
    assert not (runner.policy.placement.table == initial).all()  # LRU moved experts
    second = greedy(engine)
    assert first == second
    runner.reset()
    assert (runner.policy.placement.table == initial).all()
    runner.policy.placement.check()


def test_gpu_policy_that_does_not_fit_is_an_error(tiny_dir):
    _, path = tiny_dir("mixtral")
    with pytest.raises(DaopError, match="policy 'gpu' needs all"):
        Engine.from_pretrained(path, device="cpu", progress=False, policy="gpu", expert_ratio=0.5)


def test_budget_too_small_for_lru_is_an_error(tiny_dir):
    _, path = tiny_dir("mixtral")
    with pytest.raises(DaopError, match="at least one GPU slot per MoE layer"):
        Engine.from_pretrained(path, device="cpu", progress=False, policy="lru", expert_ratio=0.0)


def test_cpu_worker_exception_surfaces_and_engine_recovers(tiny_dir, monkeypatch):
    _, path = tiny_dir("mixtral")
    # static computes every host layer's experts on the CPU, whatever the calibrated costs say
    engine = Engine.from_pretrained(path, device=DEVICE, dtype=DTYPE, progress=False, policy="static", expert_ratio=0.25)
    expected = greedy(engine, 8)
    cpu = engine.decoder.experts.cpu
    real_submit = cpu.submit
    calls = {"n": 0}

    def failing(*args):
        raise RuntimeError("injected CPU expert failure")

    def submit(jobs, h_host, ready, **options):
        calls["n"] += 1  # the fifth CPU batch (mid-decode) fails inside the worker thread
        return real_submit(jobs, h_host, ready, failing, **options) if calls["n"] == 5 else real_submit(jobs, h_host, ready, **options)

    monkeypatch.setattr(cpu, "submit", submit)
    with pytest.raises(RuntimeError, match="injected CPU expert failure"):
        greedy(engine, 8)
    monkeypatch.setattr(cpu, "submit", real_submit)
    assert greedy(engine, 8) == expected


BATCH = [PROMPT, PROMPT[:5], [300, 301, 302, 7, 8, 9, 10, 11, 12], PROMPT[3:]]


@pytest.mark.parametrize("policy", ["daop-exact", "fiddler", "lru", "ondemand", "static", "daop-strict"])
def test_batch_of_four_matches_gpu(tiny_dir, family, policy):
    if not bitwise(policy):
        pytest.skip("CPU experts on a GPU: agreement is measured by scripts/gpu_checks.py, not assumed")
    _, path = tiny_dir(family)
    params = SamplingParams(max_new_tokens=12)

    def batch(**kw):
        engine = Engine.from_pretrained(path, device=DEVICE, dtype=DTYPE, progress=False, **kw)
        engine.eos_ids = frozenset()
        return engine.generate_batch(BATCH, params)

    ref = batch()
    assert [len(r) for r in ref] == [12] * 4
    assert batch(policy=policy, expert_ratio=0.25) == ref


def test_batch_rows_equal_single_sequences(tiny_dir):
    _, path = tiny_dir("mixtral")
    engine = Engine.from_pretrained(path, device="cpu", dtype="fp32", progress=False)
    engine.eos_ids = frozenset()
    params = SamplingParams(max_new_tokens=12)
    singles = [list(engine.generate_ids(p, params)) for p in BATCH]
    assert engine.generate_batch(BATCH, params) == singles


# decode-phase counters each branch must show: (policy, copies win) -> predicate
BRANCHES = {
    ("fiddler", True): lambda d: d["copy_calls"] > 0 and d["cpu_calls"] == 0,
    ("fiddler", False): lambda d: d["copy_calls"] == 0 and d["cpu_calls"] > 0,
    ("daop-exact", True): lambda d: d["speculative_copies"] > 0 and d["cpu_calls"] == 0,
    ("daop-exact", False): lambda d: d["speculative_copies"] == 0 and d["copy_calls"] == 0 and d["cpu_calls"] > 0,
    ("daop-strict", True): lambda d: d["speculative_copies"] > 0 and d["cpu_calls"] == 0,
    ("daop-strict", False): lambda d: d["speculative_copies"] > 0 and d["cpu_calls"] == 0,
}


@pytest.mark.parametrize("policy,copies_win", sorted(BRANCHES))
def test_cost_model_decides_between_copies_and_cpu(tiny_dir, tmp_path, monkeypatch, reference, policy, copies_win):
    """Explicit profiles force each branch; the counters show it was taken, the tokens that it is exact.
    (DAOP_DECODE_SCRATCH=keep: daop-exact's decode has scratch slots to copy into.)"""
    monkeypatch.setenv("DAOP_DECODE_SCRATCH", "keep")
    _, path = tiny_dir("mixtral")
    profile = write_profile(path, tmp_path, 1.0, 10.0, TORCH_DTYPE) if copies_win else write_profile(path, tmp_path, 10.0, 1.0, TORCH_DTYPE)
    engine = Engine.from_pretrained(path, device=DEVICE, dtype=DTYPE, progress=False, policy=policy, expert_ratio=0.5,
                                    hardware_profile=profile)
    engine.eos_ids = frozenset()
    stats = GenerationStats()
    tokens = list(engine.generate_ids(PROMPT, SamplingParams(max_new_tokens=24), stats))
    start, end = stats.extra["counters_after_prefill"], engine.counters()
    decode = {k: end[k] - start[k] for k in end}
    assert BRANCHES[policy, copies_win](decode), decode
    if bitwise(policy):
        assert tokens == reference("mixtral")[0]
