"""The measured decode timeline (daop.runtime.timeline) on the CPU: marks in order on the driving
thread, CPU jobs inside their step, a summary of what was recorded."""
import pytest

from daop.engine import Engine
from daop.errors import DaopError
from daop.runtime.timeline import Timeline

ORDER = ["enter", "routed", "cpu_submitted", "copies_queued", "speculated", "gpu_launched", "cpu_collected", "exit"]
# a layer whose experts the GPU alone serves speculates for the next layer once they are launched
GPU_ONLY_ORDER = ["enter", "routed", "cpu_submitted", "copies_queued", "gpu_launched", "speculated", "cpu_collected", "exit"]


@pytest.mark.parametrize("policy,launch_first", [("static", ""), ("daop-exact", ""), ("daop-exact", "0")])
def test_timeline_records_each_layer_in_order_and_cpu_jobs_inside_their_step(tiny_dir, monkeypatch, policy, launch_first):
    monkeypatch.setenv("DAOP_LAUNCH_FIRST", launch_first)
    _, path = tiny_dir("mixtral")
    engine = Engine.from_pretrained(path, device="cpu", dtype="fp32", progress=False, policy=policy, expert_ratio=0.25)
    runner = engine.decoder.experts
    session = engine.session([5, 17, 42, 99, 3, 250, 7], 6)
    logits = session.prefill()
    tl = runner.timeline = Timeline()
    for _ in range(5):
        tl.begin_step()
        logits = session.step(logits.argmax(-1))
        tl.end_step()
    assert len(tl.steps) == 5
    moe_layers = engine.config.moe_layer_ids()
    orders = set()
    for step in tl.steps:
        times = [ms for _, _, ms in step.marks]
        assert times == sorted(times) and 0 <= times[0] and times[-1] <= step.end_ms
        for layer in moe_layers:
            names = [n for l, n, _ in step.marks if l == layer]
            assert names in ([n for n in ORDER if n in names], [n for n in GPU_ONLY_ORDER if n in names])
            assert names[0] == "enter" and names[-1] == "exit"
            if "speculated" in names:
                late = names.index("speculated") > names.index("gpu_launched")
                orders.add(late)
                if late:  # only a layer without CPU work speculates after its launch
                    assert not any(l == layer and kind == "cpu" for l, kind, *_ in step.cpu)
    if policy == "daop-exact":  # layers with CPU work and layers the GPU alone serves, each in its order
        assert orders == ({False} if launch_first == "0" else {False, True})  # =0: every layer speculates first
        for layer, kind, submitted, start, end in step.cpu:
            assert layer in moe_layers and kind in ("cpu", "ahead")
            assert 0 <= submitted <= start <= end <= step.end_ms
    if policy == "static":  # a quarter of the experts resident, every miss computed on the CPU
        assert sum(len(s.cpu) for s in tl.steps) > 0
    summary = tl.summary(skip=1)
    assert summary["steps"] == 4 and summary["step_ms"] > 0 and summary["copy_busy_ms"] is None  # no copy stream on the CPU
    assert set(summary["marks"]) >= {f"{moe_layers[0]}:enter", f"{moe_layers[-1]}:exit"}
    raw = tl.raw(tl.steps[-1])
    assert raw["marks"] and raw["copies"] == []


def test_launch_first_setting_is_checked(tiny_dir, monkeypatch):
    _, path = tiny_dir("mixtral")
    monkeypatch.setenv("DAOP_LAUNCH_FIRST", "yes")
    with pytest.raises(DaopError, match="DAOP_LAUNCH_FIRST=.yes."):
        Engine.from_pretrained(path, device="cpu", dtype="fp32", progress=False, policy="daop-exact", expert_ratio=0.25)
