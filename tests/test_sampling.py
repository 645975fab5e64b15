"""Sampler penalties and min_p, generation_config.json defaults, and the dense-path thread choice."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from daop.errors import DaopError
from daop.sampling import Sampler, SamplingParams, generation_defaults, sampling_params
from daop.threads import choose_threads, idle_cores, idle_share, usable_cores

LOGITS = torch.tensor([[4.0, 3.0, -1.0, -2.0, 0.5]])


def greedy(prompt=(), **kw) -> Sampler:
    return Sampler(SamplingParams(**kw), list(prompt))


def test_repetition_penalty_uses_the_prompt_and_the_output():
    assert greedy([0])(LOGITS).tolist() == [0]                              # off by default
    s = greedy([0], repetition_penalty=2.0)
    assert s(LOGITS).tolist() == [1]                                        # 4 / 2 < 3: the prompt's token loses
    assert s(LOGITS).tolist() == [0]                                        # now token 1 (output) is penalised too
    neg = greedy([2, 4], repetition_penalty=4.0)
    scores = neg._penalise(LOGITS.clone())
    assert scores.tolist() == [[4.0, 3.0, -4.0, -2.0, 0.125]]              # negative logits are multiplied


def test_presence_and_frequency_penalties_count_only_the_output():
    s = greedy([0, 0, 0], frequency_penalty=0.6)
    assert s(LOGITS).tolist() == [0]                                        # the prompt is not penalised
    assert s(LOGITS).tolist() == [0]                                        # 4 - 0.6 > 3
    assert s(LOGITS).tolist() == [1]                                        # 4 - 1.2 < 3
    p = greedy([], presence_penalty=1.5)
    assert [p(LOGITS).item() for _ in range(3)] == [0, 1, 0]                # 2.5 < 3; then 1.5 < 2.5
    assert torch.equal(p.counts[0], torch.tensor([2.0, 1.0, 0.0, 0.0, 0.0]))


def test_history_is_per_row_in_a_batch():
    s = Sampler(SamplingParams(repetition_penalty=10.0), [[0], [1]])
    assert s(LOGITS.repeat(2, 1)).tolist() == [1, 0]


def test_min_p_keeps_tokens_near_the_top():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    seen = set()
    for seed in range(200):
        seen.add(Sampler(SamplingParams(temperature=1.0, min_p=0.5, seed=seed))(probs.log()).item())
    assert seen == {0, 1}                                                   # 0.15 < 0.5 * 0.5
    seen = {Sampler(SamplingParams(temperature=1.0, seed=s))(probs.log()).item() for s in range(200)}
    assert seen == {0, 1, 2, 3}


@pytest.mark.parametrize("kw", [dict(min_p=-0.1), dict(min_p=1.1), dict(repetition_penalty=0), dict(repetition_penalty=float("inf")),
                                dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(min_p=True)])
def test_invalid_values(kw):
    with pytest.raises(DaopError, match="invalid sampling value"):
        SamplingParams(**kw)


def test_sampling_params_fill_gaps_from_defaults():
    p = sampling_params({"temperature": 0.6, "top_k": 20}, temperature=None, top_k=5, seed=None)
    assert (p.temperature, p.top_k, p.top_p) == (0.6, 5, 1.0)
    with pytest.raises(TypeError):
        sampling_params(None, temprature=1.0)


def test_generation_config_defaults(tmp_path):
    assert generation_defaults(tmp_path) == {}
    cfg = tmp_path / "generation_config.json"
    cfg.write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "eos_token_id": 2,
                               "repetition_penalty": 1.05}))
    assert generation_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.05}
    cfg.write_text(json.dumps({"do_sample": False, "temperature": 0.6, "repetition_penalty": 1.1}))
    assert generation_defaults(tmp_path) == {"repetition_penalty": 1.1}     # greedy, as in transformers
    cfg.write_text(json.dumps({"top_p": 0}))
    with pytest.raises(DaopError, match="generation_config.json: invalid sampling value: top_p"):
        generation_defaults(tmp_path)


def test_engine_honours_generation_config_unless_told_otherwise(tiny_dir, tmp_path):
    from daop.engine import Engine

    _, src = tiny_dir("mixtral")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    (ckpt / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 1.5, "top_k": 50}))
    engine = Engine.from_pretrained(ckpt, device="cpu", progress=False)
    plain = Engine.from_pretrained(src, device="cpu", progress=False)
    prompt = [5, 6, 7]
    for seed in range(3):
        assert engine.generate(prompt, max_new_tokens=12, seed=seed) == \
            plain.generate(prompt, max_new_tokens=12, seed=seed, temperature=1.5, top_k=50)
    assert engine.generate(prompt, max_new_tokens=12, temperature=0) == plain.generate(prompt, max_new_tokens=12)
    assert any(engine.generate(prompt, max_new_tokens=12, seed=s) != plain.generate(prompt, max_new_tokens=12)
               for s in range(3))


# ------------------------------------------------------------------------------------------ threads

def test_idle_cores_rule():
    assert idle_cores(2, 0.2) == 2
    assert idle_cores(2, 1.2) == 1       # one other busy process on two cores: one thread (1.9-2.8x faster)
    assert idle_cores(2, 6.0) == 1
    assert idle_cores(16, 3.4) == 13
    assert idle_cores(8, None) == 8
    assert idle_cores(2, 0.1, 0.45) == 1     # a job that just started: the load average has not seen it yet
    assert idle_cores(2, 0.1, 0.97) == 2
    assert idle_cores(16, 1.0, 0.5) == 8
    assert idle_cores(4, None, 0.0) == 1


def test_idle_share_reads_the_cpu_times():
    share = idle_share(0.05)
    assert share is None or 0.0 <= share <= 1.0


def test_choose_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpu = torch.device("cpu")
    assert choose_threads(3, cpu) == 3
    assert choose_threads(None, torch.device("cuda")) is None
    assert 1 <= choose_threads(None, cpu) <= usable_cores()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert choose_threads(None, cpu) is None  # the user's choice stays
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(DaopError, match="must be a positive integer"):
            choose_threads(bad, cpu)


def test_reserved_cores_come_out_of_the_automatic_count(monkeypatch):
    import daop.threads as threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpu = torch.device("cpu")
    for idle, reserved, expected in ((2, 1, 1), (1, 1, 1), (16, 1, 15), (4, 0, 4), (3, 5, 1)):
        monkeypatch.setattr(threads, "_AUTOMATIC", [idle])
        assert choose_threads(None, cpu, reserved) == expected
    assert choose_threads(2, cpu, 1) == 2  # the user's count is kept
    assert choose_threads(None, torch.device("cuda"), 1) is None


def test_serve_leaves_a_core_to_its_event_loop(tiny_dir, monkeypatch):
    """`daop serve` on a CPU device loads with one core fewer than the automatic count (the server
    itself, up to the point where uvicorn would start listening)."""
    pytest.importorskip("fastapi")
    import daop.threads as threads
    from daop.cli import build_parser
    from daop.server import app as server_app

    _, ckpt = tiny_dir("mixtral")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "_AUTOMATIC", [2])
    engines = []

    class NotListening:
        def __init__(self, config, worker):
            engines.append(config.app.state.worker.engine)  # its worker thread is never started

        def run(self):
            return None

    monkeypatch.setattr(server_app, "_server", NotListening)
    args = build_parser().parse_args(["serve", "--model", str(ckpt), "--device", "cpu", "--no-progress"])
    before = torch.get_num_threads()
    try:
        assert server_app.serve(args) == 0
    finally:
        torch.set_num_threads(before)
    assert engines[0].threads == 1


def test_engine_threads(tiny_dir):
    from daop.engine import Engine

    _, ckpt = tiny_dir("mixtral")
    before = torch.get_num_threads()
    try:
        engine = Engine.from_pretrained(ckpt, device="cpu", progress=False, threads=1)
        torch.set_num_threads(2)
        engine.generate([5, 6], max_new_tokens=2)
        assert engine.threads == 1 and torch.get_num_threads() == 1
        offloaded = Engine.from_pretrained(ckpt, device="cpu", progress=False, threads=1, policy="static", expert_ratio=0.5)
        assert offloaded.decoder.experts.cpu.threads == 1  # the CPU-expert pool follows on a CPU device
        with pytest.raises(DaopError, match="threads must be a positive integer"):
            Engine.from_pretrained(ckpt, device="cpu", progress=False, threads=0)
    finally:
        torch.set_num_threads(before)


def test_lone_surrogates_in_the_python_api_are_a_clear_error(tiny_dir):
    from daop.engine import Engine

    _, ckpt = tiny_dir("mixtral")
    engine = Engine.from_pretrained(ckpt, device="cpu", progress=False)
    with pytest.raises(DaopError, match="unpaired surrogates"):
        engine.generate("caf\udce9 hello", max_new_tokens=2)
