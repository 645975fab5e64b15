"""DAOP on the shipped trained model (real routing): exact mode equals the all-GPU path, the
approximate presets predict, degrade and pre-calculate, and results never depend on prompt order."""
import pytest

from daop.engine import Engine
from daop.sampling import SamplingParams

PROMPTS = ["And God said unto Moses,", "def parse(self, text):\n    ", "ROMEO. But soft, what light"]


@pytest.fixture(scope="module")
def reference():
    engine = Engine.from_pretrained(None, device="cpu", dtype="fp32", progress=False)
    return {p: run(engine, p) for p in PROMPTS}


def run(engine, prompt, n=32):
    engine.eos_ids = frozenset()
    return list(engine.generate_ids(engine.tokenizer.encode(prompt), SamplingParams(max_new_tokens=n)))


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_daop_exact_equals_gpu_on_trained_model(reference, ratio):
    engine = Engine.from_pretrained(None, device="cpu", dtype="fp32", progress=False, policy="daop-exact", expert_ratio=ratio)
    for prompt in PROMPTS:
        assert run(engine, prompt) == reference[prompt]
    totals = engine.counters()
    assert totals["predicted_total"] > 0
    assert totals["predicted_hits"] / totals["predicted_total"] > 0.8  # a trained model is predictable
    assert totals["degraded_tokens"] == 0 and totals["precalc_used"] == 0  # no approximation ran


def test_paper_preset_predicts_and_degrades(reference):
    engine = Engine.from_pretrained(None, device="cpu", dtype="fp32", progress=False, policy="daop-paper", expert_ratio=0.25)
    outputs = [run(engine, p) for p in PROMPTS]
    totals = engine.counters()
    assert totals["degraded_tokens"] > 0
    assert totals["precalc_used"] > 0
    assert all(len(o) == 32 for o in outputs)


def test_stale_input_preset_uses_precalculated_experts():
    engine = Engine.from_pretrained(None, device="cpu", dtype="fp32", progress=False, policy="daop-stale", expert_ratio=0.5)
    run(engine, PROMPTS[0])
    totals = engine.counters()
    assert totals["precalc_used"] > 0
    assert totals["degraded_tokens"] == 0


@pytest.mark.parametrize("policy", ["daop-paper", "lru"])
def test_results_do_not_depend_on_prompt_order(policy):
    engine = Engine.from_pretrained(None, device="cpu", dtype="fp32", progress=False, policy=policy, expert_ratio=0.25)
    forward = {p: run(engine, p, 16) for p in PROMPTS}
    backward = {p: run(engine, p, 16) for p in reversed(PROMPTS)}
    assert forward == backward
