"""The GPU waits for CPU experts itself (`daop.kernels.device_wait`): the compute stream is held until
the C kernel's thread has finished a job, then reads the job's outputs from pinned memory, while the
host goes on. CUDA only (run by scripts/gpu_checks.py); elsewhere CPU results are awaited on the host."""
import time

import pytest
import torch

from daop.kernels import cpu_expert, device_wait, host_read

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and cpu_expert.available() and host_read.available()),
                                reason="needs CUDA, Triton and the CPU expert kernel")


def test_the_stream_waits_for_the_job_and_reads_its_outputs():
    device = torch.device("cuda")
    waiter = device_wait.checked(device)
    assert waiter is not None and device_wait.checked(device) is waiter  # one per process and device
    reader = host_read.HostReader(device)
    reader.upload(torch.ones(8192, dtype=torch.bfloat16))  # compiled here, not in the timed launches
    g = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(2 * 8192, 2048, generator=g) * 0.02).bfloat16()  # about 100 MB: a job of a few ms
    down = (torch.randn(2048, 8192, generator=g) * 0.02).bfloat16()
    x = torch.randn(1, 2048, generator=g).bfloat16()
    want = cpu_expert.expert(x, gate_up, down, threads=2)
    for _ in range(3):
        queued = cpu_expert.Queued([x], [(gate_up, down)], threads=2, pin=True)
        t0 = time.perf_counter()
        waiter.wait(queued.ticket)
        got = reader.upload(queued.ys[0])
        launched = time.perf_counter() - t0
        passed = torch.cuda.Event()
        passed.record()
        held = not queued.done() and not passed.query()
        torch.cuda.synchronize()
        assert queued.done() and torch.equal(got.cpu(), want)
        assert launched < 0.05  # the host queued it all without waiting for the job
        if held:  # seen at least once: the stream was behind the job
            break
    else:
        pytest.fail("the stream never waited for a job")


def test_a_runner_on_cuda_consumes_cpu_results_on_the_device():
    from daop.engine import Engine
    from daop.sampling import SamplingParams
    engine = Engine.from_pretrained(None, device="cuda", dtype="bf16", progress=False, policy="static", expert_ratio=0.25)
    runner = engine.decoder.experts
    assert runner.transfer.device_wait is not None
    engine.eos_ids = frozenset()
    out = list(engine.generate_ids(engine.tokenizer.encode("And God said unto Moses,"), SamplingParams(max_new_tokens=8)))
    assert len(out) == 8
    totals = engine.counters()  # collects what the GPU consumed: its busy time is counted
    assert totals["cpu_calls"] > 0 and totals["cpu_busy_s"] > 0 and runner.deferred == []
