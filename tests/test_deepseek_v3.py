"""DeepSeek-V3 beyond the tests every family runs: the biased sigmoid router on a hand-built table,
the routing prediction equal to transformers' router, rope on two halves, bf16 as transformers runs it."""
import torch

from daop.config import ModelConfig
from daop.engine import Engine
from daop.model.moe import select_experts, sigmoid_group_limited
from tiny_models import hf_model, save_checkpoint

PROMPT = torch.tensor([5, 17, 42, 99, 3, 250, 7, 64, 128, 31, 77, 200])

# four groups of two experts; expert 6 gets a bias of 0.3
SCORES = torch.tensor([[0.90, 0.10, 0.60, 0.55, 0.70, 0.05, 0.50, 0.45]])
BIAS = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.0])


def test_groups_rank_by_their_two_best_biased_scores_and_weights_are_unbiased():
    # biased group sums: 1.00, 1.15, 0.75, 1.25 -> groups 3 and 1, so the best expert (0, 0.90) is out;
    # ranked by their best expert alone, groups 0 and 3 would win
    weights, ids = sigmoid_group_limited(SCORES, BIAS, num_groups=4, top_groups=2, top_k=3)
    assert ids[0].tolist() == [6, 2, 3]  # biased scores 0.80, 0.60, 0.55
    assert torch.equal(weights[0], torch.tensor([0.50, 0.60, 0.55]))
    # without the bias group 3 sums to 0.95: groups 1 and 0
    weights, ids = sigmoid_group_limited(SCORES, torch.zeros(8), num_groups=4, top_groups=2, top_k=3)
    assert ids[0].tolist() == [0, 2, 3]
    assert torch.equal(weights[0], torch.tensor([0.90, 0.60, 0.55]))


def test_select_experts_normalises_and_scales_the_unbiased_scores():
    config = ModelConfig(family="deepseek_v3", vocab_size=8, hidden_size=8, num_layers=1, num_heads=1,
                         num_kv_heads=1, head_dim=2, num_experts=8, top_k=3, expert_intermediate_size=4,
                         max_positions=8, norm_eps=1e-6, router_kind="sigmoid_group_limited", expert_groups=4,
                         top_groups=2, routed_scaling_factor=2.5, router_score_bias=True)
    ids, weights = select_experts(config, SCORES.logit(), BIAS)
    assert ids[0].tolist() == [6, 2, 3]
    assert torch.allclose(weights[0], 2.5 * torch.tensor([0.50, 0.60, 0.55]) / 1.65)


def test_predicted_routing_equals_transformers_router(tiny_dir):
    model, path = tiny_dir("deepseek_v3")
    engine = Engine.from_pretrained(path, device="cpu", dtype="fp32", progress=False)
    h = torch.randn(16, model.config.hidden_size)
    for layer_idx in engine.config.moe_layer_ids():
        with torch.no_grad():
            ref_logits, ref_weights, ref_ids = model.model.layers[layer_idx].mlp.gate(h)
        logits, ids, weights = engine.decoder.model_routing.predict(layer_idx, h)
        assert torch.allclose(logits, ref_logits, atol=1e-5)
        order, ref_order = ids.sort(dim=-1), ref_ids.sort(dim=-1)
        assert torch.equal(order.values, ref_order.values)
        assert torch.allclose(weights.gather(1, order.indices), ref_weights.gather(1, ref_order.indices), atol=1e-6)


def test_rope_on_two_halves(tmp_path):
    model = hf_model("deepseek_v3", rope_interleave=False)
    engine = Engine.from_pretrained(save_checkpoint(model, tmp_path / "ds"), device="cpu", dtype="fp32", progress=False)
    assert not engine.config.latent_attention.rope_interleave
    with torch.no_grad():
        ref = model(PROMPT[None]).logits[0]
    assert (engine.logits(PROMPT) - ref).abs().max().item() < 1e-4


def test_bf16_follows_transformers_in_bf16(tiny_dir):
    """The router and its bias stay float32 while the rotary parts are rotated in bf16, as in transformers;
    rotating them in float32 instead (as for DeepSeek-V2) moves these logits by about 0.17."""
    from transformers import AutoModelForCausalLM

    _, path = tiny_dir("deepseek_v3", dtype=torch.bfloat16)
    ref_model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert ref_model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    with torch.no_grad():
        ref = ref_model(PROMPT[None]).logits[0].float()
    engine = Engine.from_pretrained(path, device="cpu", dtype=None, progress=False)
    layer = engine.decoder.layers[1]
    assert engine.decoder.rotary_dtype == torch.bfloat16 and layer.router_bias.dtype == torch.float32
    assert (engine.logits(PROMPT) - ref).abs().max().item() < 0.1
