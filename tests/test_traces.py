"""Routing traces: what is recorded from a checkpoint is what a geometry replays; committed traces fit their geometry."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from daop.bench.geometry import GEOMETRIES, geometry_config, synthetic_decoder, synthetic_host_experts
from daop.bench.sweep import replay
from daop.bench.trace import TraceRouting, load_traces, record, rerecord, save_traces
from daop.engine import Engine, GenerationStats
from daop.errors import DaopError
from daop.model.routing import ModelRouting
from daop.runtime.setup import RuntimeOptions, prepare_runtime
from daop.sampling import SamplingParams

TRACES = Path(__file__).resolve().parents[1] / "benchmarks" / "traces"
# every committed trace and the full-size geometry it is the routing source for
GEOMETRY_OF = {
    "daop-moe-mini-heldout.npz": "mixtral-8x7b",
    "daop-moe-mini-heldout-sampled256.npz": "mixtral-8x7b",
    "proxy-32x16-top2-heldout.npz": "phi-3.5-moe",
    "proxy-48x128-top8-heldout.npz": "qwen3-30b-a3b",
}


class Recording:
    """Expert runner wrapper that keeps the experts and weights the runner is asked for, per layer."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.ids: dict[int, list[torch.Tensor]] = {}
        self.weights: dict[int, list[torch.Tensor]] = {}

    def reset(self):
        self.inner.reset()

    def set_phase(self, phase):
        self.inner.set_phase(phase)

    def totals(self):
        return self.inner.totals()

    def close(self):
        self.inner.close()

    def __call__(self, layer_idx, h, ids, weights):
        self.ids.setdefault(layer_idx, []).append(ids.cpu())
        self.weights.setdefault(layer_idx, []).append(weights.float().cpu())
        return self.inner(layer_idx, h, ids, weights)


def check_fits(trace, config) -> None:
    """TraceRouting's check that a trace is a routing source for the geometry."""
    TraceRouting(trace, ModelRouting(config, {}), torch.device("cpu"))


def geometry_engine(name: str, layers: int | None = None) -> Engine:
    """A synthetic-weight engine of a geometry on the CPU, all experts resident."""
    config, spec = geometry_config(name, layers)
    decoder = synthetic_decoder(config, spec, torch.device("cpu"), torch.float32)
    host = synthetic_host_experts(config, torch.float32, pin=False)
    decoder.experts = prepare_runtime(decoder, RuntimeOptions(policy="gpu", expert_ratio=1.0), host=host).start()
    return Engine(None, config, spec, decoder, None, 0.0)


@pytest.fixture(scope="module")
def recorded(tiny_dir, tmp_path_factory):
    """A trace recorded from the tiny Mixtral checkpoint (3 layers, top-2 of 8), saved and loaded back."""
    _, path = tiny_dir("mixtral")
    engine = Engine.from_pretrained(path, device="cpu", dtype="fp32", progress=False)
    engine.eos_ids = frozenset()
    prompt = [1] + torch.randint(3, 384, (15,), generator=torch.Generator().manual_seed(0)).tolist()
    trace = record(engine, prompt, 6)
    out = tmp_path_factory.mktemp("trace") / "tiny.npz"
    save_traces([trace], out, {"model": "tiny-mixtral"})
    loaded, provenance = load_traces(out)
    return trace, loaded[0], provenance


def test_recorded_trace_shapes_and_roundtrip(recorded):
    trace, loaded, provenance = recorded
    assert provenance == {"model": "tiny-mixtral"}
    assert trace.ids.shape == (3, 16 + 6 - 1, 2) and trace.prompt_len == 16 and len(trace.tokens) == 16 + 6
    assert trace.ids.min() >= 0 and trace.ids.max() < 8
    assert (trace.pred_ids[0] == -1).all() and (trace.pred_ids[1:] >= 0).all()  # layer 0 has no predictor
    np.testing.assert_array_equal(loaded.ids, trace.ids)
    np.testing.assert_array_equal(loaded.pred_ids, trace.pred_ids)
    assert loaded.tokens == trace.tokens
    np.testing.assert_allclose(loaded.weights, trace.weights, atol=1e-3)  # stored as float16


def test_two_ahead_predictions_are_recorded_kept_and_replayed(recorded, tiny_dir):
    trace, loaded, _ = recorded
    assert (trace.pred2_ids[:2] == -1).all() and (trace.pred2_ids[2:] >= 0).all()  # layers 0, 1 have none
    np.testing.assert_array_equal(loaded.pred2_ids, trace.pred2_ids)
    # a trace recorded before they were kept gains them by feeding its tokens through the model again
    _, path = tiny_dir("mixtral")
    engine = Engine.from_pretrained(path, device="cpu", dtype="fp32", progress=False)
    again = rerecord(engine, replace(loaded, pred2_ids=None))
    np.testing.assert_array_equal(again.pred2_ids, trace.pred2_ids)
    np.testing.assert_array_equal(again.ids, trace.ids)
    # ...and only from the model that recorded it
    other = replace(loaded, ids=(loaded.ids + 1) % 8)
    with pytest.raises(DaopError, match="re-recorded routing differs from the trace at layer 0, position 0"):
        rerecord(engine, other)
    # replay predicts two ahead from the trace, or not at all where it has no such predictions
    geo = geometry_engine("tiny-mixtral", layers=3)
    routing = TraceRouting(trace, geo.decoder.model_routing, torch.device("cpu"))
    routing.begin(0, 4)
    h = torch.zeros(4, geo.config.hidden_size)
    np.testing.assert_array_equal(routing.predict_ahead(2, h).numpy(), trace.pred2_ids[2, :4])
    old = TraceRouting(replace(trace, pred2_ids=None), geo.decoder.model_routing, torch.device("cpu"))
    old.begin(0, 4)
    assert old.predict_ahead(2, h) is None


def test_replay_on_a_geometry_routes_exactly_as_recorded(recorded):
    _, trace, _ = recorded
    engine = geometry_engine("tiny-mixtral", layers=3)
    runner = Recording(engine.decoder.experts)
    engine.decoder.experts = runner
    steps = replay(engine, trace, GenerationStats())
    assert steps == len(trace.tokens) - trace.prompt_len
    for layer in range(3):
        ids = torch.cat(runner.ids[layer]).numpy()
        weights = torch.cat(runner.weights[layer]).numpy()
        np.testing.assert_array_equal(ids, trace.ids[layer])  # prefill positions, then one per decode step
        np.testing.assert_array_equal(weights, trace.weights[layer])


def test_trace_that_does_not_fit_the_geometry_is_refused(recorded):
    _, trace, _ = recorded
    with pytest.raises(DaopError, match="3 layers"):  # tiny-mixtral has 4 layers, the trace 3
        replay(geometry_engine("tiny-mixtral"), trace, GenerationStats())
    config, _ = geometry_config("qwen3-30b-a3b", layers=2)  # top-8 of 128: top-2 routing does not fit
    with pytest.raises(DaopError, match="top-8"):
        check_fits(trace, config)
    config, _ = geometry_config("tiny-mixtral", layers=3)
    fewer = replace(config, num_experts=int(trace.ids.max()))
    with pytest.raises(DaopError, match="experts"):  # fewer experts than the trace uses
        check_fits(trace, fewer)


def test_not_a_trace_file_is_a_daop_error(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DaopError, match="not a routing trace"):
        load_traces(bad)


@pytest.mark.parametrize("name", sorted(p.name for p in TRACES.glob("*.npz")))
def test_committed_trace_fits_its_geometry(name):
    assert name in GEOMETRY_OF, f"{name}: add the geometry it is a routing source for to GEOMETRY_OF"
    path = TRACES / name
    assert path.stat().st_size < 8_000_000  # compact: the whole repository travels to benchmark machines
    traces, provenance = load_traces(path)
    assert traces and provenance.get("model")
    geometry = GEOMETRY_OF[name]
    assert geometry in GEOMETRIES
    config, _ = geometry_config(geometry)
    for trace in traces:
        L, T, K = trace.ids.shape
        assert L >= config.num_layers and K == config.top_k
        assert 0 <= trace.ids.min() and trace.ids.max() < config.num_experts
        assert T == len(trace.tokens) - 1 and 0 < trace.prompt_len < T
        assert trace.pred_ids.shape == trace.ids.shape and trace.weights.shape == trace.ids.shape
        check_fits(trace, config)  # does not raise
    used = np.unique(np.concatenate([t.ids.reshape(-1) for t in traces]))
    assert len(used) == config.num_experts  # a trained router that uses every expert somewhere


def narrow_engine(geometry: str, policy: str, ratio: float) -> Engine:
    """The geometry's layer count, expert count and top-k at a tiny width, on the CPU, under `policy`."""
    raw = dict(GEOMETRIES[geometry])
    raw.update(vocab_size=8192, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_attention_heads=2,
               num_key_value_heads=1, head_dim=16)
    spec = geometry_config(geometry)[1]
    config = spec.config_from_hf(raw)
    decoder = synthetic_decoder(config, spec, torch.device("cpu"), torch.float32)
    host = synthetic_host_experts(config, torch.float32, pin=False)
    decoder.experts = prepare_runtime(decoder, RuntimeOptions(policy=policy, expert_ratio=ratio), host=host).start()
    return Engine(None, config, spec, decoder, None, 0.0)


@pytest.mark.parametrize("name", sorted(n for n in GEOMETRY_OF if n.startswith("proxy-")))
def test_committed_proxy_trace_drives_daop_prediction(name, monkeypatch):
    """Replaying a full-size geometry's routing source: the runner routes exactly as recorded and its
    next-layer prediction scores what the trace's recorded predictions say it should (with scratch
    slots kept in decode, where daop-exact predicts)."""
    monkeypatch.setenv("DAOP_DECODE_SCRATCH", "keep")
    path = TRACES / name
    if not path.exists():
        pytest.fail(f"{path} is listed in GEOMETRY_OF but not committed")
    traces, _ = load_traces(path)
    trace = traces[0]
    engine = narrow_engine(GEOMETRY_OF[name], "daop-exact", 0.5)
    runner = engine.decoder.experts
    recording = Recording(runner)
    engine.decoder.experts = recording
    runner.counters.reset()
    replay(engine, trace, GenerationStats())
    L = engine.config.num_layers
    for layer in (0, L // 2, L - 1):
        np.testing.assert_array_equal(torch.cat(recording.ids[layer]).numpy(), trace.ids[layer])
    # the runner scores its prediction for every decode step and predicted layer (>= 1 for daop-exact)
    P = trace.prompt_len
    true, pred = trace.ids[1:, P:].astype(np.int64), trace.pred_ids[1:, P:].astype(np.int64)
    expected = (pred[..., :, None] == true[..., None, :]).any(-1).sum()
    totals = runner.counters.totals()
    assert totals["predicted_total"] == true.size
    assert totals["predicted_hits"] == expected
    assert 0.5 < expected / true.size < 1.0  # trained routing: predictable, not trivially so


def test_sampled_recording_is_reproducible_and_differs_from_greedy(tiny_dir):
    _, path = tiny_dir("mixtral")
    engine = Engine.from_pretrained(path, device="cpu", dtype="fp32", progress=False)
    engine.eos_ids = frozenset()
    prompt = [1] + list(range(10, 25))
    sampled = SamplingParams(temperature=1.0, seed=3)
    first, again = record(engine, prompt, 12, sampled), record(engine, prompt, 12, sampled)
    greedy = record(engine, prompt, 12)
    assert first.tokens == again.tokens and len(first.tokens) == len(prompt) + 12
    np.testing.assert_array_equal(first.ids, again.ids)
    assert first.tokens != greedy.tokens


def test_placement_replay_counts_resident_decode_picks():
    """scripts/placement_sim.py on a hand-made trace: 2 layers, 4 experts, top-1, a 2-token prompt."""
    from helpers import load_script

    sim = load_script("placement_sim")
    # prompt: layer 0 uses expert 3, layer 1 expert 2; decode: layer 0 expert 1 twice then 3, layer 1 expert 2
    ids = np.array([[[3], [3], [1], [1], [3]], [[2], [2], [2], [2], [2]]])
    # one slot per layer: the uniform quota puts experts 0 there; the prompt's swaps bring 3 and 2
    # (hits, picks, swaps, experts resident that the prompt's swaps did not place: copied at decode start)
    assert sim.replay(ids, 2, [0, 1], 2, "calibrated+swaps") == (4, 6, 0, 0)
    assert sim.replay(ids, 2, [0, 1], 2, "quota-on-prompt") == (4, 6, 0, 0)
    assert sim.replay(ids, 2, [0, 1], 2, "oracle") == (5, 6, 0, 1)  # expert 1, the decode's commonest in layer 0
    assert sim.replay(ids, 2, [0, 1], 8, "calibrated+swaps") == (6, 6, 0, 0)  # everything resident
    # 3 slots: the uniform quota's leftover goes to layer 0, whose swaps keep {1, 3}, layer 1 {1};
    # the prompt's quota (layer 0 used only expert 3, layer 1 experts 1 and 2) gives it to layer 1's
    # expert 2: one copy at decode start; layer 0 loses expert 1 (two decode hits), layer 1 gains
    # expert 2 (two hits)
    ids3 = np.array([[[3], [3], [1], [1], [3]], [[2], [1], [2], [1], [2]]])
    assert sim.replay(ids3, 2, [0, 1], 3, "calibrated+swaps") == (4, 6, 0, 0)
    assert sim.replay(ids3, 2, [0, 1], 3, "quota-on-prompt") == (4, 6, 0, 1)
    # then re-swaps every 2 decode steps on the last 2 (z = 0): layer 0 swaps 1 in for 3 before the
    # last step, which uses 3
    assert sim.replay(ids3, 2, [0, 1], 3, "quota-on-prompt decode window", 2, 2, 0.0) == (3, 6, 1, 1)
