"""Decode hand-off (DAOP_HANDOFF=1, `daop.runtime.handoff`): gated pick jobs on the C kernel's thread
read a layer's routing themselves, so the host launches a decode layer without reading its routing.

On the CPU (the C kernel serving CPU experts, as it does for a model on a GPU) the handed-off layers
give the planned path's tokens and counters, decode re-swaps included. DAOP_TEST_DEVICE=cuda runs the
same on a GPU, plus the masked GEMV rows and the stream's write to host memory that the path uses."""
import os
import threading
import time

import pytest
import torch

from daop.errors import DaopError
from daop.kernels import cpu_expert

DEVICE = os.environ.get("DAOP_TEST_DEVICE", "cpu")
CUDA = DEVICE == "cuda" and torch.cuda.is_available()
PROMPTS = ["And God said unto Moses,", "def parse(self, text):\n    ", "ROMEO. But soft, what light"]

pytestmark = pytest.mark.skipif(not cpu_expert.available(), reason="needs the CPU expert kernel")


def weights(E, D, I, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {e: ((torch.randn(2 * I, D, generator=g) / 8).bfloat16(), (torch.randn(D, I, generator=g) / 8).bfloat16())
            for e in range(E)}


def test_pick_jobs_wait_for_the_gate_then_compute_only_the_cpus_experts():
    D, I, E, K = 64, 96, 4, 2
    ws = weights(E, D, I)
    picks = cpu_expert.Picks(K, D, I, E, 2, cpu_expert.scratch_for(D, I))
    picks.set_tables({e: ws[e] for e in (1, 3)})
    gate = torch.zeros(1, dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    for call, routed in enumerate([(3, 0), (0, 2), (1, 3)], start=1):
        x = torch.randn(1, D, generator=g).bfloat16()
        picks.y.fill_(7.0)
        picks.submit(gate, call)
        time.sleep(0.02)
        assert not picks.done()  # waiting for the gate: its routing is not there yet
        picks.x.copy_(x)
        picks.ids.copy_(torch.tensor(routed, dtype=torch.int32))
        gate[0] = call
        served = picks.wait()
        assert served == [e in (1, 3) for e in routed]
        for k, e in enumerate(routed):
            if served[k]:
                assert torch.equal(picks.y[k:k + 1], cpu_expert.expert(x, *ws[e], 2))
            else:
                assert torch.all(picks.y[k] == 7.0)  # the GPU's pick: nothing written
        assert len(picks.spans()) == sum(served)


def test_the_gate_compares_values_that_wrap_at_32_bits():
    D, I, E = 32, 32, 2
    ws = weights(E, D, I)
    picks = cpu_expert.Picks(1, D, I, E, 1, cpu_expert.scratch_for(D, I))
    picks.set_tables({0: ws[0]})
    gate = torch.tensor([-2], dtype=torch.int32)  # 0xFFFFFFFE
    picks.submit(gate, 1)  # 0xFFFFFFFE - 1 < 0 as 32-bit integers: closed
    time.sleep(0.02)
    assert not picks.done()
    gate[0] = 1
    assert picks.wait() == [True]


def test_a_pick_outside_the_layer_and_bad_tables_are_errors():
    D, I, E = 32, 32, 2
    ws = weights(E, D, I)
    picks = cpu_expert.Picks(1, D, I, E, 1, cpu_expert.scratch_for(D, I))
    picks.set_tables({0: ws[0]})
    gate = torch.zeros(1, dtype=torch.int32)
    picks.ids[0] = 5
    picks.submit(gate, 0)  # open already
    with pytest.raises(ValueError, match="expert 5, outside the layer's 2 experts"):
        picks.wait()
    with pytest.raises(ValueError, match="expert 2 is outside"):
        picks.set_tables({2: ws[0]})
    with pytest.raises(ValueError, match="contiguous bf16 host weights"):
        picks.set_tables({1: (ws[1][0].float(), ws[1][1])})
    with pytest.raises(ValueError, match="contiguous bf16 host weights"):
        picks.set_tables({1: (ws[1][0], ws[1][1].t().contiguous().t())})
    with pytest.raises(ValueError, match="scratch buffer needs"):
        cpu_expert.Picks(1, D, I, E, 1, torch.empty(1))
    # the tables as they were: pick 0 computes expert 0
    picks.ids[0] = 0
    picks.submit(gate, 0)
    assert picks.wait() == [True]


def load(**options):
    from daop.engine import Engine

    engine = Engine.from_pretrained(None, device=DEVICE, dtype="bf16", progress=False, **options)
    engine.decoder.experts.cpu.native = True  # on a CPU device too: CPU experts on the C kernel, as on a GPU
    return engine


def run(engine, prompt, n=24):
    from daop.sampling import SamplingParams

    engine.eos_ids = frozenset()
    return list(engine.generate_ids(engine.tokenizer.encode(prompt), SamplingParams(max_new_tokens=n)))


COUNTED = ("resident_calls", "cpu_calls", "copy_calls", "layer_calls", "tokens", "decode_swaps", "settle_copies")


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_handed_off_decode_gives_the_planned_paths_tokens_and_counts(monkeypatch, ratio):
    """daop-exact with its scratch slots resident in decode (DAOP_DECODE_SCRATCH=0): every decode
    layer is handed off, and the tokens, the GPU/CPU split and the decode re-swaps are the planned
    path's, call for call."""
    monkeypatch.setenv("DAOP_DECODE_SCRATCH", "0")
    monkeypatch.setenv("DAOP_HANDOFF", "0")
    planned = load(policy="daop-exact", expert_ratio=ratio)
    want = [run(planned, p) for p in PROMPTS]
    want_counts = planned.counters()
    assert planned.decoder.experts.handoff is None
    monkeypatch.setenv("DAOP_HANDOFF", "1")
    engine = load(policy="daop-exact", expert_ratio=ratio)
    got = [run(engine, p) for p in PROMPTS]
    counts = engine.counters()
    handoff = engine.decoder.experts.handoff
    assert handoff is not None and not handoff.pending  # the counters flushed every call
    if DEVICE == "cpu":
        assert got == want
        assert {k: counts.get(k) for k in COUNTED} == {k: want_counts.get(k) for k in COUNTED}
    else:  # a settle or swap copy in flight goes to the CPU here, where the plan may wait for it: the split may differ
        def picks(c):
            return c["resident_calls"] + c["cpu_calls"] + c["copy_calls"]

        assert picks(counts) == picks(want_counts)
    assert counts["cpu_calls"] > 0 and counts["resident_calls"] > 0 and counts["decode_swaps"] > 0
    decode_calls = len(PROMPTS) * 23 * len(engine.decoder.experts.policy.ctx.moe_layers)
    assert handoff.calls == counts["handoff_calls"] == decode_calls and want_counts["handoff_calls"] == 0
    assert counts["cpu_busy_s"] > 0
    if DEVICE == "cpu":
        assert counts["cpu_expert_tokens"] == want_counts["cpu_expert_tokens"]


def test_a_preset_that_predicts_in_decode_is_planned_on_the_host(monkeypatch):
    """With scratch slots kept for copies made ahead (=keep), decode predicts: nothing is handed off."""
    monkeypatch.setenv("DAOP_DECODE_SCRATCH", "keep")
    monkeypatch.setenv("DAOP_HANDOFF", "1")
    engine = load(policy="daop-exact", expert_ratio=0.5)
    run(engine, PROMPTS[0], 8)
    assert engine.decoder.experts.handoff.calls == 0
    assert engine.counters()["predicted_total"] > 0


def test_an_error_inside_a_handed_off_layer_leaves_no_job_waiting(monkeypatch):
    """A failure between a layer's submit and its gate's write opens the gate from the host: the
    error reaches the caller, the queued jobs run (nothing hangs), and the next request's tokens are
    the planned path's."""
    from daop.runtime.handoff import Handoff

    monkeypatch.setenv("DAOP_DECODE_SCRATCH", "0")
    monkeypatch.setenv("DAOP_HANDOFF", "0")
    want = run(load(policy="daop-exact", expert_ratio=0.5), PROMPTS[1])
    monkeypatch.setenv("DAOP_HANDOFF", "1")
    engine = load(policy="daop-exact", expert_ratio=0.5)
    real, calls = Handoff.combine, []

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("injected")
        return real(self, *args)

    monkeypatch.setattr(Handoff, "combine", failing)
    with pytest.raises(RuntimeError, match="injected"):
        run(engine, PROMPTS[1])
    handoff = engine.decoder.experts.handoff
    done = threading.Event()
    threading.Thread(target=lambda: (cpu_expert.library().daop_wait(max(p.ticket for p in handoff.picks.values())),
                                     done.set()), daemon=True).start()
    assert done.wait(10.0)  # every queued pick job ran
    again = run(engine, PROMPTS[1])
    assert again == want if DEVICE == "cpu" else len(again) == len(want)


def test_the_setting_is_checked_and_a_runner_that_cannot_hand_off_says_why(monkeypatch):
    monkeypatch.setenv("DAOP_HANDOFF", "yes")
    engine = load(policy="daop-exact", expert_ratio=0.5)
    with pytest.raises(DaopError, match="DAOP_HANDOFF='yes'"):
        run(engine, PROMPTS[0], 4)
    from daop.engine import Engine

    monkeypatch.setenv("DAOP_HANDOFF", "1")
    monkeypatch.setenv("DAOP_DECODE_SCRATCH", "0")
    fp32 = Engine.from_pretrained(None, device=DEVICE, dtype="fp32", progress=False, policy="daop-exact",
                                  expert_ratio=0.5)
    with pytest.warns(RuntimeWarning, match="planned on the host: the CPU kernel serves plain bf16 experts only"):
        run(fp32, PROMPTS[0], 4)
    assert fp32.decoder.experts.handoff is None


def test_masked_gemv_rows_read_nothing_and_come_out_zero():
    """A pick of a host expert (slot -1) reads no weights and comes out zero; the others keep their
    bits. On CUDA, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1 with Triton installed)."""
    from daop.kernels import expert_gemv

    if not (expert_gemv.AVAILABLE and (CUDA or expert_gemv.INTERPRETED)):
        pytest.skip("needs Triton on CUDA, or its interpreter")
    device = "cuda" if CUDA else "cpu"
    blocks = None if CUDA else (8, 256, 4)
    S, D, I = 4, 256, 512
    g = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(S, 2 * I, D, generator=g) / 16).bfloat16().to(device)
    down = (torch.randn(S, D, I, generator=g) / 16).bfloat16().to(device)
    x = torch.randn(1, D, generator=g).bfloat16().to(device)
    w = torch.tensor([0.7, 0.3], device=device)

    def picks(idx):
        act = expert_gemv.gemv(x, gate_up, None, idx=idx, x_div=2, glu=True, blocks=blocks)
        return expert_gemv.gemv(act, down, None, idx=idx, row_weights=w, blocks=blocks)

    full = picks(torch.tensor([2, 1], device=device))
    for masked_idx, kept in (([2, -1], 0), ([-1, 1], 1)):
        masked = picks(torch.tensor(masked_idx, dtype=torch.int32, device=device))
        assert torch.equal(masked[kept], full[kept]) and torch.all(masked[1 - kept] == 0)
    assert torch.all(picks(torch.tensor([-1, -1], device=device)) == 0)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_a_stream_writes_the_gate_after_the_copies_before_it():
    from daop.kernels import device_wait

    gate = device_wait.checked_gate(torch.device("cuda"))
    assert gate is not None
    D, I, E = 256, 512, 2
    ws = weights(E, D, I)
    picks = cpu_expert.Picks(1, D, I, E, 2, cpu_expert.scratch_for(D, I), pin=True)
    picks.set_tables({1: ws[1]})
    x = torch.randn(1, D).bfloat16()
    ids = torch.tensor([1], dtype=torch.int32)
    picks.submit(gate.flag, gate.next())
    torch.cuda._sleep(50_000_000)  # the stream is busy a while: the job must wait for it
    picks.x.copy_(x.cuda(), non_blocking=True)
    picks.ids.copy_(ids.cuda(), non_blocking=True)
    gate.open()
    assert picks.wait() == [True]
    assert torch.equal(picks.y, cpu_expert.expert(x, *ws[1], 2))


def test_a_cpu_devices_gate_is_written_at_once_and_wraps_at_32_bits():
    from daop.kernels import device_wait

    gate = device_wait.checked_gate(torch.device("cpu"))
    assert int(gate.flag[0]) == 0 and gate.next() == 1
    assert gate.open() == 1 and int(gate.flag[0]) == 1
    gate.value = 0xFFFFFFFF
    assert gate.next() == 0 and gate.open() == 0 and int(gate.flag[0]) == 0
    gate.force()
    assert int(gate.flag[0]) == 1 and gate.value == 1


def test_post_and_finish_give_torchs_bits():
    """`post` writes the routing (as int32) and activations into host buffers; `finish` takes each pick
    from the GPU's product or the CPU's scaled output and adds them left to right. On CUDA they give
    torch's bits; Triton's interpreter converts float32 to bf16 by truncation, so there the reference
    rounds the same way."""
    from daop.kernels import expert_gemv, handoff_kernels

    if not (handoff_kernels.available() and (CUDA or expert_gemv.INTERPRETED)):
        pytest.skip("needs Triton on CUDA, or its interpreter")
    device = "cuda" if CUDA else "cpu"

    def rounded(t: torch.Tensor) -> torch.Tensor:
        if CUDA:
            return t.bfloat16()
        return (t.float().view(torch.int32) & -65536).view(torch.float32).bfloat16()

    g = torch.Generator().manual_seed(0)
    D = 3000
    for K in (1, 2, 4):
        ids = torch.randint(0, 8, (K,), generator=g).to(device)
        x = torch.randn(1, D, generator=g).bfloat16().to(device)
        ids_host = torch.zeros(K, dtype=torch.int32, pin_memory=CUDA)
        x_host = torch.zeros(1, D, dtype=torch.bfloat16, pin_memory=CUDA)
        handoff_kernels.post(ids, x, ids_host, x_host)
        if CUDA:
            torch.cuda.synchronize()
        assert torch.equal(ids_host, ids.int().cpu()) and torch.equal(x_host, x.cpu())
        on_gpu = torch.randn(K, D, generator=g).bfloat16()
        y = torch.randn(K, D, generator=g).bfloat16()
        slots = torch.tensor([-1 if k % 2 else k for k in range(K)], dtype=torch.int32)
        cols = torch.randperm(K, generator=g)
        w = torch.rand(K, generator=g)
        got = handoff_kernels.finish(on_gpu.to(device), y.pin_memory() if CUDA else y, slots.to(device),
                                     cols.to(device), w.to(device))
        parts = [on_gpu[k] if slots[k] >= 0 else rounded(y[cols[k]].float() * w[k]) for k in range(K)]
        want = parts[0]
        for part in parts[1:]:
            want = rounded(want.float() + part.float())
        assert torch.equal(got.cpu()[0], want)
    with pytest.raises(ValueError, match="do not fit"):
        handoff_kernels.post(ids, x, ids_host[:1], x_host)


def test_the_batcher_hands_off_a_lone_row_and_plans_several(monkeypatch):
    """The server's batch path: a batch of one row is handed off; two rows are planned on the host
    (after the hand-off's last calls are counted); both give the planned path's tokens on the CPU."""
    from daop.sampling import SamplingParams

    monkeypatch.setenv("DAOP_DECODE_SCRATCH", "0")
    params = SamplingParams(max_new_tokens=12)
    monkeypatch.setenv("DAOP_HANDOFF", "0")
    planned = load(policy="daop-exact", expert_ratio=0.5)
    planned.eos_ids = frozenset()
    want_one = planned.generate_batch([PROMPTS[0]], params)
    want_two = planned.generate_batch(PROMPTS[1:], params)
    monkeypatch.setenv("DAOP_HANDOFF", "1")
    engine = load(policy="daop-exact", expert_ratio=0.5)
    engine.eos_ids = frozenset()
    one = engine.generate_batch([PROMPTS[0]], params)
    handoff = engine.decoder.experts.handoff
    calls = handoff.calls
    assert calls == 11 * len(engine.decoder.experts.policy.ctx.moe_layers)
    two = engine.generate_batch(PROMPTS[1:], params)
    assert handoff.calls == calls and not handoff.pending
    if DEVICE == "cpu":
        assert one == want_one and two == want_two


def test_by_default_a_runner_hands_off_where_it_can_and_is_silent_where_not(monkeypatch, recwarn):
    """Unset, DAOP_HANDOFF follows `handoff.DEFAULT` (on): a runner that can hands off its decode
    layers; one that cannot (here fp32) plans them on the host without a warning."""
    from daop.engine import Engine
    from daop.runtime import handoff

    monkeypatch.delenv("DAOP_HANDOFF", raising=False)
    monkeypatch.setenv("DAOP_DECODE_SCRATCH", "0")
    assert handoff.DEFAULT is True
    engine = load(policy="daop-exact", expert_ratio=0.5)
    run(engine, PROMPTS[0], 4)
    assert engine.decoder.experts.handoff is not None and engine.decoder.experts.handoff.calls > 0
    fp32 = Engine.from_pretrained(None, device=DEVICE, dtype="fp32", progress=False, policy="daop-exact",
                                  expert_ratio=0.5)
    run(fp32, PROMPTS[0], 4)
    assert fp32.decoder.experts.handoff is None
    assert not [w for w in recwarn if "DAOP_HANDOFF" in str(w.message)]


def test_a_one_token_prompt_is_prefilled_on_the_host_after_a_handed_off_decode(monkeypatch):
    """Only decode calls are handed off: a later prompt of one token (a one-row prefill) runs the
    prefill's own path, and its tokens are the planned path's."""
    from daop.sampling import SamplingParams

    monkeypatch.setenv("DAOP_DECODE_SCRATCH", "0")

    def one_token(engine):
        engine.eos_ids = frozenset()
        first = engine.tokenizer.encode(PROMPTS[0])[:1]
        return list(engine.generate_ids(first, SamplingParams(max_new_tokens=6)))

    monkeypatch.setenv("DAOP_HANDOFF", "0")
    want = one_token(load(policy="daop-exact", expert_ratio=0.5))
    monkeypatch.setenv("DAOP_HANDOFF", "1")
    engine = load(policy="daop-exact", expert_ratio=0.5)
    run(engine, PROMPTS[1], 4)
    handoff = engine.decoder.experts.handoff
    before = handoff.calls
    got = one_token(engine)
    assert handoff.calls - before == 5 * len(engine.decoder.experts.policy.ctx.moe_layers)  # the 5 decode steps only
    if DEVICE == "cpu":
        assert got == want
