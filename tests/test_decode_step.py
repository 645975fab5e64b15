"""The decode step on the device (`Decoder.decode`, `daop.runtime.decode_step`): fixed shapes, rotary
rows from a table, a cache written at a position tensor and read whole under a mask; on CUDA the
experts routed on the device and the step captured as a graph.

The CPU tests check the pieces and that a decode step computes what a full forward computes. The
CUDA tests (skipped without a GPU; run by scripts/gpu_checks.py --tests) check that routing on the
device gives, bit for bit, what computing each expert alone gives, and that a captured step gives
the eager step's logits and tokens.
"""
from dataclasses import replace

import pytest
import torch

from daop.engine import Engine, GenerationStats
from daop.model.layers import Rotary, additive_mask, attend, decode_mask
from daop.runtime import decode_step
from daop.runtime.decode_step import StepInputs, cache_length, captures
from daop.sampling import SamplingParams

PROMPT = [5, 17, 42, 99, 3, 250, 7, 64, 128, 31]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def engine_for(tiny_dir, family="mixtral", **kw):
    _, path = tiny_dir(family)
    return Engine.from_pretrained(path, progress=False, **kw)


def test_cache_length_rounds_up_within_the_model_limits(tiny_dir):
    engine = engine_for(tiny_dir, device="cpu", dtype="fp32")
    dec = engine.decoder
    dec.config = replace(dec.config, max_positions=4096)
    assert cache_length(dec, 10) == 256
    assert cache_length(dec, 257) == 512
    assert cache_length(dec, 512) == 512
    assert cache_length(dec, 3000) == 4096
    assert cache_length(dec, 4100) == 4100  # never shorter than needed


def test_longrope_cache_stays_on_the_short_side(tiny_dir):
    dec = engine_for(tiny_dir, "phimoe", device="cpu", dtype="fp32").decoder
    original = 48
    dec.config = replace(dec.config, rope=replace(dec.config.rope, kind="longrope", original_max_positions=original))
    assert cache_length(dec, original) == original  # the rotary choice for `original` tokens is the short one
    assert cache_length(dec, original + 1) > original


def test_rotary_table_rows_equal_computed_rows():
    from daop.config import RopeConfig

    rot = Rotary(RopeConfig(theta=10000.0), 16, 4096, torch.device("cpu"))
    positions = torch.tensor([[0], [3], [299]])
    cos, sin = rot.cos_sin(positions, torch.bfloat16, 300)
    table_cos, table_sin = rot.table(torch.bfloat16, 300)
    assert torch.equal(table_cos[positions], cos) and torch.equal(table_sin[positions], sin)


def test_decode_mask_hides_unwritten_positions_row_by_row():
    assert decode_mask(torch.tensor([3]), 6).flatten().tolist() == [True] * 4 + [False] * 2
    m = decode_mask(torch.tensor([3, 1]), 6)  # a position per row (a batch of sequences of different lengths)
    assert m.shape == (2, 1, 1, 6)
    assert m[1].flatten().tolist() == [True, True, False, False, False, False]


def test_additive_mask_is_zero_where_attended_and_minus_infinity_elsewhere():
    m = additive_mask(decode_mask(torch.tensor([3, 1]), 5), torch.bfloat16)
    inf = float("-inf")
    assert m.dtype == torch.bfloat16 and m.shape == (2, 1, 1, 5)
    assert m[0].flatten().tolist() == [0.0] * 4 + [inf] and m[1].flatten().tolist() == [0.0, 0.0, inf, inf, inf]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("window", [0, 3])
def test_attention_under_the_additive_mask_equals_the_boolean_mask(dtype, window):
    """A decode step's masks are made additive once (`Decoder.begin_decode`); torch's attention
    gives the same bits as with the boolean mask it converts itself in every layer."""
    torch.manual_seed(window)
    q = torch.randn(2, 8, 1, 128, device="cuda").to(dtype)
    k, v = (torch.randn(2, 4, 40, 128, device="cuda").to(dtype) for _ in range(2))
    mask = decode_mask(torch.tensor([17, 39], device="cuda"), 40, window)
    want = attend(q, k, v, mask, 128**-0.5, gqa=True)
    assert torch.equal(attend(q, k, v, additive_mask(mask, dtype), 128**-0.5, gqa=True), want)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])  # a scatter on CUDA, indexed writes on the CPU
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2"])  # grouped-query heads; one latent per position
def test_a_batch_step_writes_each_row_at_its_own_position(tiny_dir, family, device):
    """`KVCache.write_at` with a position per row, into the whole cache and into a view of some of
    its rows and positions (`rows`): each row's entry lands at its position, nothing else moves."""
    from daop.model.layers import KVCache

    engine = engine_for(tiny_dir, family, device="cpu", dtype="fp32")
    cache = KVCache(engine.decoder.config, 5, 16, torch.device(device), torch.bfloat16)
    for t in (*cache.keys, *cache.values):
        t.copy_(torch.randn(t.shape))
    view = cache.rows(1, 4, 12)
    before = [t.clone() for t in cache.keys[1:2] + cache.values[1:2]]
    pos = torch.tensor([3, 0, 11], device=device)
    k = torch.randn(3, view.keys[1].shape[1], 1, view.keys[1].shape[3]).to(device, torch.bfloat16)
    v = torch.randn(3, view.values[1].shape[1], 1, view.values[1].shape[3]).to(device, torch.bfloat16)
    keys, values = view.write_at(1, pos, k, v)
    assert keys.shape[:3] == (3, k.shape[1], 12)
    for whole, old, new in ((cache.keys[1], before[0], k), (cache.values[1], before[1], v)):
        want = old.clone()
        for row, p in enumerate(pos.tolist()):
            want[1 + row, :, p] = new[row, :, 0]
        assert torch.equal(whole, want)


def test_a_gated_product_needs_gate_and_up_rows_of_one_size():
    from daop.kernels import expert_gemv

    with pytest.raises(ValueError, match="gate and up rows of one size.*got 5 rows"):
        expert_gemv.gemv(torch.zeros(1, 6), torch.zeros(5, 6), glu=True)
    with pytest.raises(ValueError, match="tiles of 2 rows or more"):
        expert_gemv.gemv(torch.zeros(1, 6), torch.zeros(4, 6), glu=True, blocks=(1, 8, 4))


@needs_cuda
@pytest.mark.parametrize("expert_dtype,dtype", [("auto", torch.bfloat16), ("auto", torch.float16),
                                                 ("auto", torch.float32), ("int8", torch.bfloat16)])
@pytest.mark.parametrize("rows", [1, 5])
def test_gated_product_equals_the_product_then_torch_activation(expert_dtype, dtype, rows):
    """The gate_up GEMV that stores silu(gate) * up (`glu`) gives, bit for bit, what torch's F.silu
    and product kernels make of the plain GEMV's output, with gates from about -90 to 90."""
    from daop.kernels import expert_gemv
    from daop.quant import ExpertFormat

    if not expert_gemv.AVAILABLE:
        pytest.skip("needs Triton")
    torch.manual_seed(rows)
    S, D, I = 3, 256, 1024
    fmt = ExpertFormat(expert_dtype, dtype)
    experts = []
    for _ in range(S):
        gate_up = torch.randn(2 * I, D) * 0.05
        gate_up[:64] *= 60  # saturating and vanishing gates
        experts.append(fmt.from_float(gate_up.to(dtype), (torch.randn(D, I) * 0.05).to(dtype)))
    stacked = [torch.stack([e[i] for e in experts]).cuda() for i in range(len(experts[0]))]
    scales = stacked[1] if len(stacked) == 4 else None
    x = torch.randn(rows, D).to(dtype).cuda()
    idx = torch.tensor([2, 0, 1, 2, 0][:rows], device="cuda")
    gate, up = expert_gemv.gemv(x, stacked[0], scales, idx=idx).chunk(2, dim=-1)
    assert gate[:, :64].abs().max() > 30
    want = torch.nn.functional.silu(gate) * up
    assert torch.equal(expert_gemv.gemv(x, stacked[0], scales, idx=idx, glu=True), want)


def test_step_inputs_on_the_cpu_hold_ids_and_position():
    inputs = StepInputs(2, torch.device("cpu"))
    inputs.load([7, 9], 41)
    assert inputs.ids.tolist() == [[7], [9]] and inputs.pos.tolist() == [41]
    inputs.load(torch.tensor([1, 2]), 42)
    assert inputs.ids.tolist() == [[1], [2]] and inputs.pos.tolist() == [42]


def test_decode_steps_compute_what_a_full_forward_computes(tiny_dir):
    """Teacher-forced decode steps (fixed-shape attention over the whole cache) against one forward
    over the whole sequence (attention over exactly the written positions)."""
    engine = engine_for(tiny_dir, device="cpu", dtype="fp32")
    ids = PROMPT + [11, 12, 13, 14]
    full = engine.logits(ids)
    session = engine.session(PROMPT, 4)
    session.prefill()
    for i, token in enumerate(ids[len(PROMPT):]):
        step = session.step([token])[0]
        assert (step - full[len(PROMPT) + i]).abs().max().item() < 1e-4
    assert not captures(engine.decoder, 1)  # no graphs on the CPU


def test_batch_generation_matches_single_rows(tiny_dir):
    engine = engine_for(tiny_dir, device="cpu", dtype="fp32")
    engine.eos_ids = frozenset()
    prompts = [PROMPT, PROMPT[:4]]
    params = SamplingParams(max_new_tokens=8)
    assert engine.generate_batch(prompts, params) == [list(engine.generate_ids(p, params)) for p in prompts]


# --- CUDA: experts routed on the device, captured steps ---

@needs_cuda
@pytest.mark.parametrize("pinned", [True, False])
def test_cpu_results_reach_the_gpu_exactly_past_a_queued_copy(pinned):
    """A CPU result of any size comes to the device bit for bit, in compute order, while an expert
    copy is queued on the copy stream; a pinned source is kept until the kernel read it."""
    from daop.executors.transfer import Transfer
    from daop.kernels import host_read

    transfer = Transfer(torch.device("cuda"))
    big = torch.randn(64 << 20 >> 1).bfloat16().pin_memory()
    slot = torch.empty_like(big, device="cuda")
    if transfer.host_reader is not None:
        torch.cuda.synchronize()
        transfer.host_reader.in_flight.clear()  # the start-up check's upload has been read
    transfer.copy_expert((big,), (slot,), 0)
    for tokens in (1, 3, 64, 257):
        y = torch.randn(tokens, 4096).bfloat16()
        y = y.pin_memory() if pinned else y
        z = transfer.to_device(y)
        assert z.device.type == "cuda" and torch.equal(z.cpu(), y)
    if host_read.available():
        assert transfer.host_reader.in_flight  # the larger ones went through the kernel
    torch.cuda.synchronize()
    assert torch.equal(slot[:1024].cpu(), big[:1024])


@needs_cuda
@pytest.mark.parametrize("expert_dtype", ["auto", "int8"])
@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_routed_experts_equal_experts_computed_alone(tokens, expert_dtype):
    from daop.model.moe import expert_input, group_by_expert, token_rows, weighted_sum
    from daop.quant import ExpertFormat, expert_forward, routed_experts
    from daop.kernels import expert_gemv

    if not expert_gemv.AVAILABLE:
        pytest.skip("needs Triton")
    torch.manual_seed(tokens)
    E, K, D, I = 8, 2, 256, 512
    fmt = ExpertFormat(expert_dtype, torch.bfloat16)
    experts = [fmt.from_float((torch.randn(2 * I, D) * 0.05).bfloat16(), (torch.randn(D, I) * 0.05).bfloat16())
               for _ in range(E)]
    stacked = [torch.stack([e[i] for e in experts]).cuda() for i in range(len(experts[0]))]
    h = torch.randn(tokens, D, device="cuda").bfloat16()
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(tokens)]).cuda()
    weights = torch.softmax(torch.randn(tokens, K, device="cuda"), -1).bfloat16()
    ours = routed_experts(h, ids, weights, stacked)
    rows_host = group_by_expert(ids.cpu())
    rows = token_rows(h, rows_host)
    ys = {e: expert_forward(expert_input(h, rows, e), [t[e] for t in stacked]) for e in rows_host}
    assert torch.equal(ours, weighted_sum(h, ys, weights, rows_host, rows))


@needs_cuda
@pytest.mark.parametrize("expert_dtype", ["auto", "int8"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_slot_experts_in_one_launch_equal_experts_computed_alone(tokens, expert_dtype):
    """The offloaded runner's few-row path: several slots' experts through one GEMV launch per
    product (`indexed_swiglu`), each row as `expert_forward` computes it for its expert alone."""
    from daop.quant import ExpertFormat, expert_forward, indexed_swiglu
    from daop.kernels import expert_gemv

    if not expert_gemv.AVAILABLE:
        pytest.skip("needs Triton")
    torch.manual_seed(tokens)
    S, D, I = 5, 256, 512
    fmt = ExpertFormat(expert_dtype, torch.bfloat16)
    experts = [fmt.from_float((torch.randn(2 * I, D) * 0.05).bfloat16(), (torch.randn(D, I) * 0.05).bfloat16())
               for _ in range(S)]
    stacked = [torch.stack([e[i] for e in experts]).cuda() for i in range(len(experts[0]))]
    h = torch.randn(tokens, D, device="cuda").bfloat16()
    slots = [4, 1, 2]
    if tokens == 1:  # one token read by every row (x_div)
        got = indexed_swiglu(h, torch.tensor(slots, device="cuda"), len(slots), stacked)
        want = torch.cat([expert_forward(h, [t[s] for t in stacked]) for s in slots])
    else:  # a row per (token, slot)
        picks = [(t, s) for s in slots for t in range(tokens) if (t + s) % 2 == 0]
        x = h[torch.tensor([t for t, _ in picks], device="cuda")]
        got = indexed_swiglu(x, torch.tensor([s for _, s in picks], device="cuda"), 1, stacked)
        want = torch.cat([expert_forward(h[t:t + 1], [w[s] for w in stacked]) for t, s in picks])
    assert torch.equal(got, want)


LOWBIT = {"auto": {}, "int8": {"expert_dtype": "int8"}, "int4": {"expert_dtype": "int4", "group_size": 64}}


@needs_cuda
@pytest.mark.parametrize("expert_dtype", list(LOWBIT))
def test_captured_step_equals_eager_step(tiny_dir, expert_dtype):
    """One sequence's steps (a batch's: tests/test_batching.py), in every expert format: one graph
    for the whole step where the experts are routed on the device (float, int8), else pieces
    between the MoE calls (int4, whose products run per expert)."""
    from daop.runtime.decode_step import CapturedStep, PiecewiseStep, capture_kind

    graphed = engine_for(tiny_dir, device="cuda", dtype="bf16", **LOWBIT[expert_dtype])
    if not captures(graphed.decoder, 1):
        pytest.skip("steps are not captured here (no Triton)")
    eager = engine_for(tiny_dir, device="cuda", dtype="bf16", cuda_graphs=False, **LOWBIT[expert_dtype])
    out = []
    for engine in (graphed, eager):
        session = engine.session(PROMPT, 6)
        logits = [session.prefill()]
        for t in range(5):
            logits.append(session.step(logits[-1].argmax(-1)))
        out.append(torch.stack(logits))
        assert session.stepper.captured == (engine is graphed)
        if engine is graphed:
            kind = capture_kind(engine.decoder, 1)
            assert kind == ("pieces" if expert_dtype == "int4" else "step")
            assert isinstance(session.stepper.pooled.graph, CapturedStep if kind == "step" else PiecewiseStep)
    assert torch.equal(out[0], out[1])


@needs_cuda
@pytest.mark.parametrize("expert_dtype", ["int8", "int4"])
@pytest.mark.parametrize("policy", ["lru", "daop-strict"])
def test_lowbit_copy_policies_equal_gpu_on_cuda(tiny_dir, expert_dtype, policy):
    """Policies that only copy experts run the copies through the resident experts' kernels (int4:
    converted to torch's CUDA layout after each copy): on a GPU they give `gpu`'s logits bit for bit."""
    out = []
    for kw in ({}, {"policy": policy, "expert_ratio": 0.25}):
        engine = engine_for(tiny_dir, device="cuda", dtype="bf16", **LOWBIT[expert_dtype], **kw)
        session = engine.session(PROMPT, 8)
        logits = [session.prefill()]
        for _ in range(7):
            logits.append(session.step(logits[-1].argmax(-1)))
        out.append(torch.stack(logits))
        if kw:
            assert engine.counters()["copy_calls"] > 0
    assert torch.equal(out[0], out[1])


@needs_cuda
def test_graph_is_reused_and_a_second_live_session_runs_eagerly(tiny_dir):
    engine = engine_for(tiny_dir, device="cuda", dtype="bf16")
    if not captures(engine.decoder, 1):
        pytest.skip("steps are not captured here (no Triton)")
    first = engine.session(PROMPT, 4)
    first.prefill()
    first.step([1])
    graph = first.stepper.pooled.graph
    second = engine.session(PROMPT, 4)  # same shape while the first is alive: its own cache
    assert not second.stepper.captured
    del first, second
    third = engine.session(PROMPT, 4)
    third.prefill()
    third.step([1])
    assert third.stepper.pooled.graph is graph
    assert len(decode_step._POOLS[engine.decoder]) == 1


def test_a_step_whose_capture_fails_runs_eagerly(tiny_dir, monkeypatch, caplog):
    """If capturing fails (simulated here: the CPU has no graphs), the step runs eagerly with a warning,
    gives the eager logits, and later sessions do not try again."""
    engine = engine_for(tiny_dir, device="cpu", dtype="fp32")
    want = engine.session(PROMPT, 3)
    want.prefill()
    want = want.step([7])

    def fail(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(decode_step, "captures", lambda decoder, batch: decoder.cuda_graphs)
    monkeypatch.setattr(decode_step, "CapturedStep", fail)
    session = engine.session(PROMPT, 3)
    assert session.stepper.captured
    session.prefill()
    assert torch.equal(session.step([7]), want)
    assert not session.stepper.captured and not engine.decoder.cuda_graphs
    assert "capture failed" in caplog.text
    assert not engine.session(PROMPT, 3).stepper.captured


def run_steps(engine, steps: int, pieces: bool, monkeypatch) -> torch.Tensor:
    """Greedy logits of a prefill and `steps` decode steps; with pieces, every step runs through
    PiecewiseStep's pieces (eagerly: the split is what is checked, on any device)."""
    from daop.runtime.decode_step import PiecewiseStep

    session = engine.session(PROMPT, steps + 1)
    if pieces:
        st = session.stepper
        split = PiecewiseStep(engine.decoder, st.cache, st.inputs, graphs=False)

        def run(tokens, position):
            st.inputs.load(tokens, position)
            return split.replay().clone()

        monkeypatch.setattr(st, "run", run)
    logits = [session.prefill()]
    for _ in range(steps):
        logits.append(session.step(logits[-1].argmax(-1)))
    return torch.stack(logits)


@pytest.mark.parametrize("policy", ["gpu", "static", "daop-exact", "daop-stale"])
def test_pieces_between_moe_calls_equal_the_whole_step(tiny_dir, family, policy, monkeypatch):
    """The step split at its MoE calls (what PiecewiseStep captures for offloaded runners) gives the
    whole step's logits bit for bit, dense layers and shared experts included."""
    ratio = None if policy == "gpu" else 0.5
    engine = engine_for(tiny_dir, family, device="cpu", dtype="fp32", policy=policy, expert_ratio=ratio)
    want = run_steps(engine, 4, False, monkeypatch)
    got = run_steps(engine, 4, True, monkeypatch)
    assert torch.equal(got, want)


@pytest.mark.parametrize("paper", [False, True])
def test_pieces_hand_the_runner_its_predictions(tiny_dir, paper, monkeypatch):
    """A DAOP runner's pieces predict the next layers' routing after each router (the layers its
    `piece_predictions` names), and the runner takes those instead of predicting from the host: the
    same predictions (scored the same against the true routing), the same tokens; with predicted
    routing (daop-paper from layer 1) the pieces' predictions are the routing layer l+1 computes with."""
    from daop.runtime.daop_runner import DaopRunner

    monkeypatch.setenv("DAOP_DECODE_SCRATCH", "keep")  # daop-exact predicts in decode only to copy ahead
    kw = dict(device="cpu", dtype="fp32", policy="daop-paper" if paper else "daop-exact", expert_ratio=0.5)
    engine = engine_for(tiny_dir, **kw)
    if paper:
        engine.decoder.experts.policy.config = replace(engine.decoder.experts.policy.config, first_predicted_layer=1)
    calls = {"given": 0, "host": 0}
    original = DaopRunner.predict

    def spy(self, layer_idx, h, given=None):
        pred = original(self, layer_idx, h, given)
        if pred is not None and self.phase == "decode":
            calls["given" if given is not None else "host"] += 1
        return pred

    monkeypatch.setattr(DaopRunner, "predict", spy)
    runs = {}
    for pieces in (False, True):
        before = engine.counters()
        logits = run_steps(engine, 4, pieces, monkeypatch)
        after = engine.counters()
        runs[pieces] = (logits, {k: after[k] - before[k] for k in ("predicted_hits", "predicted_total")}, dict(calls))
        calls.update(given=0, host=0)
    (want, scored, host_calls), (got, scored_pieces, piece_calls) = runs[False], runs[True]
    assert torch.equal(got, want)
    assert scored["predicted_total"] > 0 and scored_pieces == scored
    assert host_calls["given"] == 0 and host_calls["host"] > 0
    assert piece_calls["host"] == 0 and piece_calls["given"] == host_calls["host"]


@needs_cuda
@pytest.mark.parametrize("policy", ["static", "daop-exact"])
def test_offloaded_steps_are_captured_in_pieces_and_equal_eager_ones(tiny_dir, policy):
    from daop.runtime.decode_step import PiecewiseStep, capture_kind

    graphed = engine_for(tiny_dir, device="cuda", dtype="bf16", policy=policy, expert_ratio=0.5)
    eager = engine_for(tiny_dir, device="cuda", dtype="bf16", policy=policy, expert_ratio=0.5, cuda_graphs=False)
    assert capture_kind(graphed.decoder, 1) == "pieces" and capture_kind(eager.decoder, 1) == "eager"
    out = []
    for engine in (graphed, eager):
        session = engine.session(PROMPT, 8)
        logits = [session.prefill()]
        for _ in range(7):
            logits.append(session.step(logits[-1].argmax(-1)))
        out.append(torch.stack(logits))
        if engine is graphed:
            assert isinstance(session.stepper.pooled.graph, PiecewiseStep)
    assert torch.equal(out[0], out[1])


def test_batch_stats_split_prefill_from_decode(tiny_dir):
    """generate_batch's numbers as `daop bench --batch` reads them: every prompt prefilled before
    the first decode step, the counters in between, one decode step per token after the first."""
    engine = engine_for(tiny_dir, device="cpu", dtype="fp32", policy="static", expert_ratio=0.5)
    engine.eos_ids = frozenset()
    prompts = [PROMPT, PROMPT[:4], PROMPT[3:]]
    before = engine.counters()
    stats = GenerationStats()
    out = engine.generate_batch(prompts, SamplingParams(max_new_tokens=6), stats)
    assert [len(o) for o in out] == [6, 6, 6] and stats.generated_tokens == 6
    assert stats.prefill_s > 0 and stats.decode_s > 0 and stats.prompt_tokens == sum(map(len, prompts))
    mid, end = stats.extra["counters_after_prefill"], engine.counters()
    calls = lambda c, since: sum(c[k] - since[k] for k in ("resident_calls", "cpu_calls", "copy_calls"))  # noqa: E731
    moe_layers, top_k = len(engine.config.moe_layer_ids()), engine.config.top_k
    assert calls(mid, before) >= top_k * moe_layers * len(prompts)  # three prefills, each at least top_k experts a layer
    assert top_k * moe_layers * 5 <= calls(end, mid) <= 3 * top_k * moe_layers * 5  # five decode steps of three rows


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [1, 2, 8])
def test_weighted_sum_adds_each_tokens_picks_in_expert_order_bit_for_bit(dtype, K, device):
    """The batched sum equals adding the experts' scaled outputs into zeros one expert after another
    (what it replaced), with many tokens, duplicate picks of one token (a substituted routing) and
    more than a thread's grain of elements; and one token (a decode step's scaling in one product),
    with its picks in any column order, float32 or bf16 weights, and an expert picked twice."""
    from daop.model.moe import combine, group_by_expert, token_rows, weighted_sum

    g = torch.Generator().manual_seed(K)
    for N, D, twice, w_dtype in ((3, 16, True, dtype), (40, 128, True, dtype), (600, 128, True, dtype),
                                 (1, 16, False, dtype), (1, 4096, False, dtype), (1, 64, False, torch.float32),
                                 (1, 64, True, dtype)):
        h = torch.randn(N, D, generator=g).to(dtype).to(device)
        ids = torch.stack([torch.randperm(16, generator=g)[:K] for _ in range(N)])
        if K > 1 and twice:
            ids[::5, 1] = ids[::5, 0]  # a token routed twice to one expert
        weights = torch.rand(N, K, generator=g).to(w_dtype).to(device)
        rows_host = group_by_expert(ids)
        rows = token_rows(h, rows_host)
        # an output row per pick; one token (rows None): one row per expert, which every pick of it reads
        ys = {e: (torch.randn(1 if rows is None else len(r[0]), D, generator=g) * 10).to(dtype).to(device)
              for e, r in rows_host.items()}
        want = torch.zeros_like(h)
        for e in sorted(ys):
            tokens, k_slot = rows_host[e]
            for i in range(len(tokens)):  # one pick at a time: the order is beyond doubt
                y = ys[e][0:1] if rows is None else ys[e][i:i + 1]
                t, k = int(tokens[i]), int(k_slot[i])
                want[t] += combine(y, weights[t, k:k + 1])[0]
        assert torch.equal(weighted_sum(h, ys, weights, rows_host, rows), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_decode_attention_runs_in_float32(dtype):
    """`attend`: one query per row in bf16/fp16 on the CPU attends in float32 on the same values (the
    output rounded once), with a boolean or an additive mask; a prompt's queries keep the dtype."""
    import torch.nn.functional as F

    from daop.model.layers import attend

    gen = torch.Generator().manual_seed(3)
    B, H, G, S, d = 3, 4, 2, 40, 16
    keys, values = (torch.randn(B, G, S, d, generator=gen).to(dtype) for _ in range(2))
    allowed = torch.ones(B, 1, 1, S, dtype=torch.bool)
    allowed[0, ..., 25:] = False
    additive = torch.zeros(B, 1, 1, S).masked_fill(~allowed, float("-inf")).to(dtype)
    q = torch.randn(B, H, 1, d, generator=gen).to(dtype)
    want = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=allowed, scale=0.25,
                                          enable_gqa=True).to(dtype)
    for mask in (allowed, additive):
        got = attend(q, keys, values, mask, 0.25, gqa=True)
        assert got.dtype == dtype and torch.equal(got, want)
    exact = F.scaled_dot_product_attention(q.double(), keys.double(), values.double(), attn_mask=allowed, scale=0.25,
                                           enable_gqa=True)
    assert (want.double() - exact).abs().max() <= 2 * torch.finfo(dtype).eps * exact.abs().max()
    prompt_q = torch.randn(B, H, 5, d, generator=gen).to(dtype)
    causal = torch.ones(5, S, dtype=torch.bool).tril(S - 5)[None, None]
    assert torch.equal(attend(prompt_q, keys, values, causal, 0.25, gqa=True),
                       F.scaled_dot_product_attention(prompt_q, keys, values, attn_mask=causal, scale=0.25, enable_gqa=True))


def test_cpu_attention_probe_reports_both_dtypes():
    """scripts/cpu_attention_probe.py (the README's attention and product costs), a few calls."""
    from helpers import load_script

    before = torch.get_num_threads()
    try:
        out = load_script("cpu_attention_probe").main(["--calls", "3", "--repeats", "1"])
    finally:
        torch.set_num_threads(before)
    kinds = [r["kind"] for r in out["rows"]]
    assert kinds.count("attention") == 6 and kinds.count("linear") == 4
    for r in out["rows"]:
        assert r["native_us"] > 0 and r["float32_us"] > 0
        if r["kind"] == "attention":
            assert r["float32_rel_err"] < 1e-2 and r["native_rel_err"] < 1e-2


def test_kv_write_probe_times_both_writes_and_they_agree():
    """scripts/kv_write_probe.py: the scatter and the indexed write put the same values in the cache."""
    from helpers import load_script

    out = load_script("kv_write_probe").main(["--small"])
    assert out["kind"] == "kv_write_probe" and {r["dtype"] for r in out["results"]} == {"float32", "bfloat16", "float16"}
    assert all(r["same_values"] and r["scatter_us"] > 0 and r["indexed_us"] > 0 for r in out["results"])
