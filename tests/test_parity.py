"""Every family equals transformers on tiny random checkpoints: logits, greedy tokens, KV cache."""
import json

import pytest
import torch

from daop.engine import Engine
from daop.sampling import SamplingParams

PROMPT = torch.tensor([5, 17, 42, 99, 3, 250, 7, 64, 128, 31, 77, 200])


def load(path, dtype="fp32"):
    return Engine.from_pretrained(path, device="cpu", dtype=dtype, progress=False)


def hf_greedy(model, ids, n):
    out = model.generate(ids[None], max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_logits_match_transformers(tiny_dir, family):
    model, path = tiny_dir(family)
    with torch.no_grad():
        ref = model(PROMPT[None]).logits[0].float()
    ours = load(path).logits(PROMPT)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-4


def test_greedy_tokens_match_transformers(tiny_dir, family):
    model, path = tiny_dir(family)
    engine = load(path)
    engine.eos_ids = frozenset()  # compare all 32 tokens even if a random model emits EOS
    ours = list(engine.generate_ids(PROMPT.tolist(), SamplingParams(max_new_tokens=32)))
    assert len(ours) == 32
    assert ours == hf_greedy(model, PROMPT, 32)


def test_kv_cached_decode_equals_full_recompute(tiny_dir, family):
    _, path = tiny_dir(family)
    engine = load(path)
    dec = engine.decoder
    full = engine.logits(PROMPT)
    cache = dec.new_cache(1, len(PROMPT))
    step_logits = [dec.forward(PROMPT[None, :4], 0, cache)]
    for pos in range(4, len(PROMPT)):
        step_logits.append(dec.forward(PROMPT[None, pos:pos + 1], pos, cache))
    stepped = torch.cat(step_logits)
    assert (stepped - full[3:]).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2", "deepseek_v3", "gpt_oss"])
def test_sharded_checkpoint_equals_single_file(tiny_dir, family):
    _, single = tiny_dir(family)
    _, sharded = tiny_dir(family, shard_mb=1)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert torch.equal(load(single).logits(PROMPT), load(sharded).logits(PROMPT))


def test_bf16_checkpoint_with_dtype_conversion(tiny_dir):
    from transformers import AutoModelForCausalLM

    _, path = tiny_dir("qwen3_moe", dtype=torch.bfloat16)
    ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(PROMPT[None]).logits[0]
    as_fp32 = load(path, "fp32")
    assert as_fp32.decoder.dtype == torch.float32
    assert (as_fp32.logits(PROMPT) - ref).abs().max().item() < 1e-4
    native = load(path, None)
    assert native.decoder.dtype == torch.bfloat16
    assert (native.logits(PROMPT) - ref).abs().max().item() < 0.25


def test_seeded_sampling_is_reproducible_and_varies(tiny_dir):
    _, path = tiny_dir("mixtral")
    engine = load(path)
    engine.eos_ids = frozenset()
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    a = list(engine.generate_ids(PROMPT.tolist(), params))
    b = list(engine.generate_ids(PROMPT.tolist(), params))
    c = list(engine.generate_ids(PROMPT.tolist(), SamplingParams(max_new_tokens=16, temperature=1.0, seed=8)))
    assert a == b
    assert a != c


def test_phimoe_longrope_within_original_context(tmp_path):
    from tiny_models import hf_model, save_checkpoint

    half = 8
    rope = {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(half)],
            "long_factor": [2.0 + 0.3 * i for i in range(half)], "short_mscale": 1.2, "long_mscale": 1.3,
            "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    model = hf_model("phimoe", rope_parameters=rope, original_max_position_embeddings=64)
    path = save_checkpoint(model, tmp_path / "phimoe-longrope")
    engine = load(path)
    assert engine.config.rope.kind == "longrope"
    with torch.no_grad():
        ref = model(PROMPT[None]).logits[0].float()
    assert (engine.logits(PROMPT) - ref).abs().max().item() < 1e-4
