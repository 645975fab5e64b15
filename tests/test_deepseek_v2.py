"""DeepSeek-V2 beyond the tests every family runs: group-limited routing on a hand-built table, the
plain query projection, a KV cache of compressed latents equal to transformers', yarn rope."""
import json

import pytest
import torch

from daop.config import ModelConfig, load_config
from daop.engine import Engine
from daop.errors import DaopError
from daop.model.latent_attention import deinterleave
from daop.model.moe import select_experts
from tiny_models import hf_model, save_checkpoint

PROMPT = torch.tensor([5, 17, 42, 99, 3, 250, 7, 64, 128, 31, 77, 200])


def router_config(**overrides) -> ModelConfig:
    return ModelConfig(family="deepseek_v2", vocab_size=8, hidden_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                       head_dim=2, num_experts=8, top_k=3, expert_intermediate_size=4, max_positions=8,
                       norm_eps=1e-6, norm_topk_prob=False, **overrides)


def test_group_limited_routing_chooses_inside_the_best_groups():
    # four groups of two; their best experts score 0.30, 0.25, 0.20, 0.02
    probs = torch.tensor([[0.30, 0.02, 0.25, 0.01, 0.20, 0.19, 0.02, 0.01]])
    greedy_ids, _ = select_experts(router_config(), probs.log())
    assert sorted(greedy_ids[0].tolist()) == [0, 2, 4]
    limited = router_config(router_kind="group_limited", expert_groups=4, top_groups=2, routed_scaling_factor=1.5)
    ids, weights = select_experts(limited, probs.log())
    assert ids[0].tolist() == [0, 2, 1]  # expert 4 (0.20) is in the third group
    assert torch.allclose(weights[0], 1.5 * torch.tensor([0.30, 0.25, 0.02]))


def test_plain_query_projection_and_a_cache_of_compressed_latents(tmp_path):
    model = hf_model("deepseek_v2", q_lora_rank=None)
    engine = Engine.from_pretrained(save_checkpoint(model, tmp_path / "ds"), device="cpu", dtype="fp32", progress=False)
    assert engine.config.latent_attention.q_lora_rank is None
    with torch.no_grad():
        out = model(PROMPT[None], use_cache=True)
    assert (engine.logits(PROMPT) - out.logits[0]).abs().max().item() < 1e-4
    cache = engine.decoder.new_cache(1, len(PROMPT))
    engine.decoder.forward(PROMPT[None], 0, cache)
    for ours_k, ours_v, ref in zip(cache.keys, cache.values, out.cache.layers):
        assert ours_k.shape == (1, 1, len(PROMPT), 24) and ours_v.shape == (1, 1, len(PROMPT), 8)
        assert (ours_k - ref.keys).abs().max().item() < 1e-5  # the normed kv latent
        assert (ours_v - deinterleave(ref.values)).abs().max().item() < 1e-5  # the rotated key part, reordered


def test_yarn_rope_and_its_softmax_scale(tmp_path):
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
            "mscale": 1.0, "mscale_all_dim": 0.8, "beta_fast": 32.0, "beta_slow": 1.0}
    model = hf_model("deepseek_v2", rope_parameters=rope)
    engine = Engine.from_pretrained(save_checkpoint(model, tmp_path / "ds"), device="cpu", dtype="fp32", progress=False)
    c = engine.config
    assert c.rope.kind == "yarn" and c.rope.attention_factor != 1.0
    assert c.latent_attention.softmax_scale > (c.latent_attention.nope_head_dim + c.head_dim) ** -0.5
    with torch.no_grad():
        ref = model(PROMPT[None]).logits[0]
    assert (engine.logits(PROMPT) - ref).abs().max().item() < 1e-4


def test_other_rope_types_are_refused_by_name(tiny_dir, tmp_path):
    _, path = tiny_dir("deepseek_v2")
    raw = json.loads((path / "config.json").read_text())
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    (tmp_path / "config.json").write_text(json.dumps({**raw, "rope_parameters": rope}))
    with pytest.raises(DaopError, match="rope type 'linear' is not supported for DeepSeek-V2"):
        load_config(tmp_path)


def test_bf16_follows_transformers_in_bf16(tiny_dir):
    """The router stays float32 and the rotary parts are rotated in float32, as in transformers; rounding
    them in bf16 instead moves these logits by about 1."""
    from transformers import AutoModelForCausalLM

    _, path = tiny_dir("deepseek_v2", dtype=torch.bfloat16)
    ref_model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert ref_model.dtype == torch.bfloat16
    with torch.no_grad():
        ref = ref_model(PROMPT[None]).logits[0].float()
    engine = Engine.from_pretrained(path, device="cpu", dtype=None, progress=False)
    assert engine.decoder.dtype == torch.bfloat16 and engine.decoder.layers[1].router.dtype == torch.float32
    assert (engine.logits(PROMPT) - ref).abs().max().item() < 0.1
