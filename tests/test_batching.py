"""Iteration-level batching (`daop.batching`): sequences joining and leaving a running batch get the
tokens they get alone, whatever else runs beside them, under every exact policy."""
import pytest
import torch

from daop.batching import Batcher, Sequence, generate_many
from daop.engine import Engine
from daop.sampling import SamplingParams

PROMPTS = ["In the beginning God created", "ROMEO. But soft, what light", "def fibonacci(n):",
           "The os module provides", "hacker n.", "And the LORD spake unto Moses, saying,", "import json\n",
           "CYNIC, n. A blackguard whose faulty vision sees things as they are, not as they ought to be."]
LIMITS = [20, 5, 33, 12, 40, 8, 25, 17]
STOPS = [(), (), ("\n\n",), (), (".",), (), ("import",), ()]


@pytest.fixture(scope="module")
def shipped():
    return Engine.from_pretrained(None, device="cpu", progress=False)


def alone(engine, prompt, params):
    return engine.generate(prompt, max_new_tokens=params.max_new_tokens, stop=list(params.stop),
                           temperature=params.temperature, seed=params.seed, top_p=params.top_p)


@pytest.mark.parametrize("max_batch,chunk,dtype", [(8, 512, "bf16"), (3, 4, "fp32")])
def test_concurrent_sequences_equal_each_alone(shipped, max_batch, chunk, dtype):
    """Eight requests of different lengths, stops and budgets; fewer rows than requests (a queue) and
    prompts prefilled in chunks of 4 tokens between decode steps. Chunked prefill is checked in fp32:
    in bf16 a chunk's products can round differently from the whole prompt's (seen on an AVX2 CPU),
    so a prompt split into chunks may continue differently from the same prompt prefilled whole."""
    engine = shipped if dtype == "bf16" else Engine.from_pretrained(None, device="cpu", dtype=dtype, progress=False)
    params = [SamplingParams(max_new_tokens=n, stop=s) for n, s in zip(LIMITS, STOPS)]
    want = [alone(engine, p, q) for p, q in zip(PROMPTS, params)]
    got = generate_many(engine, PROMPTS, params, max_batch=max_batch, chunk=chunk)
    assert [g["text"] for g in got] == want
    assert all(g["finish_reason"] in ("stop", "length") for g in got)


def test_seeded_sampling_is_per_request(shipped):
    params = [SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=s) for s in (1, 2, 3)]
    want = [alone(shipped, PROMPTS[0], q) for q in params]
    assert [g["text"] for g in generate_many(shipped, [PROMPTS[0]] * 3, params)] == want


@pytest.mark.parametrize("policy", ["lru", "daop-exact", "daop-exact 0", "static"])
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2", "deepseek_v3", "gpt_oss"])  # grouped-query and latent-attention caches, sliding windows
def test_offloaded_policies_batch_exactly(tiny_dir, monkeypatch, family, policy):
    """"daop-exact 0": DAOP_DECODE_SCRATCH=0, so the scratch slots turn resident at every decode step
    and scratch again at every prompt chunk, as sequences join."""
    policy, _, keep = policy.partition(" ")
    monkeypatch.setenv("DAOP_DECODE_SCRATCH", keep)
    _, path = tiny_dir(family)
    ref = Engine.from_pretrained(path, device="cpu", dtype="fp32", progress=False)
    engine = Engine.from_pretrained(path, device="cpu", dtype="fp32", progress=False, policy=policy, expert_ratio=0.5)
    prompts = [[5, 17, 42, 99, 3], [250, 7, 64, 128, 31, 77, 200, 9], [11, 12]]
    for e in (ref, engine):
        e.eos_ids = frozenset()
    params = SamplingParams(max_new_tokens=10)
    want = [ref.generate(p, max_new_tokens=10) for p in prompts]
    got = generate_many(engine, prompts, params, max_batch=2, chunk=3)
    assert [g["text"] for g in got] == want and all(g["tokens"] == 10 for g in got)
    if keep:  # the slots did change role: scratch in prefill, resident in decode
        assert engine.decoder.experts.policy.prefill_scratch > engine.decoder.experts.policy.decode_scratch == 0


def test_a_cancelled_sequence_leaves_and_the_others_are_unchanged(shipped):
    params = SamplingParams(max_new_tokens=16)
    want = [alone(shipped, p, params) for p in PROMPTS[:4]]
    events = {i: [] for i in range(4)}
    batcher = Batcher(shipped, max_batch=4)
    seqs = []
    for i, p in enumerate(PROMPTS[:4]):
        seq = Sequence(shipped.encode(p), params, lambda kind, payload, i=i: events[i].append((kind, payload)),
                       cancelled=lambda i=i: i == 1 and len(seqs[1].text.text if seqs[1].text else "") > 0)
        seqs.append(seq)
        batcher.add(seq)
    with torch.inference_mode():
        while not batcher.idle():
            batcher.step()
    assert events[1][-1] == ("cancelled", None)
    for i in (0, 2, 3):
        assert events[i][-1][0] == "done"
        assert "".join(p for k, p in events[i] if k == "text") == want[i]
    assert batcher.running == 0 and not batcher.decoding


def test_prompts_that_cannot_fit_are_refused_alone(shipped):
    events = []
    batcher = Batcher(shipped, max_batch=2, max_len=64)
    batcher.add(Sequence(list(range(3, 70)), SamplingParams(max_new_tokens=4), lambda k, p: events.append((k, p))))
    batcher.add(Sequence([], SamplingParams(max_new_tokens=4), lambda k, p: events.append((k, p))))
    assert [k for k, _ in events] == ["error", "error"]
    assert "67 tokens" in events[0][1] and "64" in events[0][1]
    assert batcher.idle()
    # a completion that would outgrow the row stops at its end
    out = []
    batcher.add(Sequence(list(range(3, 60)), SamplingParams(max_new_tokens=50), lambda k, p: out.append((k, p))))
    with torch.inference_mode():
        while not batcher.idle():
            batcher.step()
    assert out[-1][0] == "done" and out[-1][1].generated_tokens <= 64 - 57


def test_max_batch_must_be_positive(shipped):
    from daop.errors import DaopError

    with pytest.raises(DaopError, match="max-batch"):
        Batcher(shipped, max_batch=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_batch_steps_equal_eager_ones(tiny_dir):
    """On CUDA the batch's decode steps are captured per (rows, cache length): the same tokens as eager."""
    from daop.runtime.decode_step import captures

    _, path = tiny_dir("mixtral")
    graphed = Engine.from_pretrained(path, device="cuda", dtype="bf16", progress=False)
    if not captures(graphed.decoder, 3):
        pytest.skip("steps are not captured here (no Triton)")
    eager = Engine.from_pretrained(path, device="cuda", dtype="bf16", progress=False, cuda_graphs=False)
    prompts = [[5, 17, 42, 99, 3], [250, 7, 64, 128, 31, 77, 200, 9], [11, 12]]
    params = SamplingParams(max_new_tokens=12)
    for e in (graphed, eager):
        e.eos_ids = frozenset()
    assert generate_many(graphed, prompts, params, max_batch=3) == generate_many(eager, prompts, params, max_batch=3)


def test_max_batch_rows_are_reserved_in_the_budget(tiny_dir):
    from daop.model.layers import KVCache
    from daop.runtime.setup import auto_max_batch

    assert auto_max_batch(100, None) == 8  # CPU: memory is not the limit
    assert auto_max_batch(4 << 30, 24 << 30) == 1  # a long-context row on a 24 GB GPU: one at a time
    assert auto_max_batch(512 << 20, 24 << 30) == 7
    _, path = tiny_dir("mixtral")
    for asked, rows in ((None, 8), (3, 3), (1, 1)):
        engine = Engine.from_pretrained(path, device="cpu", progress=False, max_batch=asked)
        c = engine.config
        assert engine.max_batch == rows
        assert engine.budget.kv_bytes == KVCache.bytes_needed(c, rows, c.context_length, engine.decoder.dtype)


def test_batch_steps_whose_capture_fails_run_eagerly(shipped, monkeypatch):
    import daop.batching as batching

    params = SamplingParams(max_new_tokens=6)
    want = generate_many(shipped, PROMPTS[:3], params)

    def fail(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(batching, "captures", lambda decoder, rows: True)
    monkeypatch.setattr(batching, "CapturedStep", fail)
    assert generate_many(shipped, PROMPTS[:3], params) == want


def test_longrope_rows_keep_the_rotary_choice_they_have_alone(tmp_path):
    """Phi-3.5's longrope picks short or long factors from a sequence's total length: sequences
    within the original context, batched together, and one beyond it, each equal their alone runs."""
    from tiny_models import hf_model, save_checkpoint

    half = 8
    rope = {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(half)],
            "long_factor": [2.0 + 0.3 * i for i in range(half)], "short_mscale": 1.2, "long_mscale": 1.3,
            "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    path = save_checkpoint(hf_model("phimoe", rope_parameters=rope, original_max_position_embeddings=64),
                           tmp_path / "phimoe-longrope")
    engine = Engine.from_pretrained(path, device="cpu", dtype="fp32", progress=False)
    engine.eos_ids = frozenset()
    short = [[5, 17, 42, 99, 3, 8], [250, 7, 64, 128, 31, 77, 200, 9, 11]]
    long = [list(range(3, 40))]
    for prompts, n in ((short, 20), (long, 40)):
        want = [engine.generate(p, max_new_tokens=n) for p in prompts]
        assert [g["text"] for g in generate_many(engine, prompts, SamplingParams(max_new_tokens=n))] == want


@pytest.mark.parametrize("policy", [None, "daop-exact", "daop-exact 0", "lru"])
def test_prompt_chunks_share_the_decode_pass(tiny_dir, monkeypatch, policy):
    """A prompt chunk that arrives while others decode runs in one pass with their step
    (`Decoder.decode_and_prefill`), and every request gets the tokens it gets with separate passes
    ("daop-exact 0": with DAOP_DECODE_SCRATCH=0, whose slots change role with the phase)."""
    policy, _, keep = (policy or "").partition(" ")
    policy = policy or None
    monkeypatch.setenv("DAOP_DECODE_SCRATCH", keep)
    _, path = tiny_dir("mixtral")
    kw = dict(policy=policy, expert_ratio=0.5) if policy else {}
    engine = Engine.from_pretrained(path, device="cpu", dtype="fp32", progress=False, **kw)
    engine.eos_ids = frozenset()
    prompts = [[5, 17, 42, 99, 3], [250, 7, 64, 128, 31, 77, 200, 9], [11, 12], [8, 9, 10, 11, 12, 13, 14]]
    params = SamplingParams(max_new_tokens=9)
    passes = []
    real = engine.decoder.decode_and_prefill

    def counted(*args):
        passes.append(args[3].shape[1])
        return real(*args)

    engine.decoder.decode_and_prefill = counted
    results = {}
    for mix in (True, False):
        batcher = Batcher(engine, max_batch=3, chunk=4, mix_prefill=mix)
        for p in prompts:
            batcher.add(Sequence(p, params, lambda kind, payload: None))
        seqs = list(batcher.waiting)
        with torch.inference_mode():
            while not batcher.idle():
                batcher.step()
        results[mix] = [s.tokens for s in seqs]
        assert all(len(t) == 9 for t in results[mix])
        if mix:
            assert passes and max(passes) <= 4  # chunks of at most 4 prompt tokens rode along with decode steps
            shared = len(passes)
    assert len(passes) == shared  # no shared pass with mixing off
    assert results[True] == results[False]
    alone = [engine.generate_ids(p, params) for p in prompts]
    assert results[True] == [list(a) for a in alone]


def test_shared_passes_are_on_unless_told(shipped, monkeypatch):
    from daop.batching import mix_by_default

    monkeypatch.delenv("DAOP_MIX_PREFILL", raising=False)
    assert mix_by_default() and Batcher(shipped, max_batch=2, max_len=64).mix_prefill
    monkeypatch.setenv("DAOP_MIX_PREFILL", "0")
    assert not mix_by_default() and not Batcher(shipped, max_batch=2, max_len=64).mix_prefill
    monkeypatch.setenv("DAOP_MIX_PREFILL", "1")
    assert mix_by_default() and Batcher(shipped, max_batch=2, max_len=64).mix_prefill
    assert not Batcher(shipped, max_batch=2, max_len=64, mix_prefill=False).mix_prefill
