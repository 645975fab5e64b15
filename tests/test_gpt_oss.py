"""gpt-oss beyond the tests every family runs: MXFP4 experts against transformers' dequantization, the
router and the clamped SwiGLU on hand-built values, the window and the sinks exercised, bad configs."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from daop.config import ModelConfig, load_config
from daop.engine import Engine
from daop.errors import DaopError
from daop.model.moe import gated, select_experts
from daop.model.routing import ModelRouting
from daop.weights.mxfp4 import dequantize_mxfp4
from tiny_models import hf_model, quantize_mxfp4, save_checkpoint, save_mxfp4_checkpoint

PROMPT = torch.tensor([5, 17, 42, 99, 3, 250, 7, 64, 128, 31, 77, 200])


def load(path, **options):
    return Engine.from_pretrained(path, device="cpu", dtype="fp32", progress=False, **options)


def dequantized(model, path):
    """The transformers model with its experts replaced by transformers' dequantization of the checkpoint."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    tensors = load_file(path / "model.safetensors")
    ref = hf_model("gpt_oss")
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.copy_(convert_moe_packed_tensors(tensors[f"{name}_blocks"], tensors[f"{name}_scales"], dtype=torch.float32))
            else:
                assert torch.equal(p, model.state_dict()[name])
    return ref


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory):
    model = hf_model("gpt_oss")
    path = save_mxfp4_checkpoint(model, tmp_path_factory.mktemp("gpt-oss-mxfp4"))
    return dequantized(model, path), path


def test_mxfp4_dequantization_equals_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    torch.manual_seed(0)
    blocks = torch.randint(0, 256, (3, 8, 2, 16), dtype=torch.uint8)  # every nibble pair, both orders
    scales = torch.randint(100, 150, (3, 8, 2), dtype=torch.uint8)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
    assert torch.equal(dequantize_mxfp4(blocks, scales), ref.transpose(1, 2))
    w = torch.randn(2, 4, 64) * torch.logspace(-3, 1, 4)[:, None]  # the test helper's quantizer: within FP4's steps
    assert ((dequantize_mxfp4(*quantize_mxfp4(w)) - w).abs() <= w.abs().amax(dim=-1, keepdim=True) / 6).all()
    with pytest.raises(ValueError, match="do not pair"):
        dequantize_mxfp4(blocks, scales[..., :1])


def test_mxfp4_experts_load_as_transformers_dequantizes_them(mxfp4):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    _, path = mxfp4
    engine = load(path)
    tensors = load_file(path / "model.safetensors")
    for layer in range(4):
        base = f"model.layers.{layer}.mlp.experts"
        gate_up = convert_moe_packed_tensors(tensors[f"{base}.gate_up_proj_blocks"], tensors[f"{base}.gate_up_proj_scales"],
                                             dtype=torch.float32)  # [E, D, 2I], gate and up interleaved
        down = convert_moe_packed_tensors(tensors[f"{base}.down_proj_blocks"], tensors[f"{base}.down_proj_scales"],
                                          dtype=torch.float32)  # [E, I, D]
        bias = tensors[f"{base}.gate_up_proj_bias"]
        for e in range(8):
            w = engine.decoder.experts.weights_of(layer, e)
            assert torch.equal(w[0], torch.cat((gate_up[e][:, 0::2].t(), gate_up[e][:, 1::2].t())))
            assert torch.equal(w[1], down[e].t())
            assert torch.equal(w[2], torch.cat((bias[e][0::2], bias[e][1::2])))
            assert torch.equal(w[3], tensors[f"{base}.down_proj_bias"][e])


def test_mxfp4_logits_equal_transformers_on_the_dequantized_weights(mxfp4):
    ref, path = mxfp4
    with torch.no_grad():
        want = ref(PROMPT[None]).logits[0]
    engine = load(path)
    assert (engine.logits(PROMPT) - want).abs().max().item() < 1e-4
    offloaded = load(path, policy="lru", expert_ratio=0.5)
    assert torch.equal(offloaded.logits(PROMPT), engine.logits(PROMPT))


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_mxfp4_quantized_at_load_equals_quantizing_the_dequantized_checkpoint(mxfp4, tmp_path, kind):
    ref, path = mxfp4
    float_path = save_checkpoint(ref, tmp_path / "dequantized")
    from_mxfp4 = load(path, expert_dtype=kind, group_size=64)
    from_float = load(float_path, expert_dtype=kind, group_size=64)
    for layer in (0, 3):
        for a, b in zip(from_mxfp4.decoder.experts.weights_of(layer, 5), from_float.decoder.experts.weights_of(layer, 5)):
            assert torch.equal(a, b)
    assert torch.equal(from_mxfp4.logits(PROMPT), from_float.logits(PROMPT))


def test_mxfp4_errors_name_the_tensor(mxfp4, tmp_path):
    _, path = mxfp4
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.2.mlp.experts.down_proj_scales"
    for label, change, message in [("missing", lambda t: t.pop(name), f"{name}' is missing"),
                                   ("float", lambda t: t.update({name: t[name].float()}), f"{name}' has dtype torch.float32, "
                                                                                          "but config.json implies torch.uint8")]:
        bad = tmp_path / label
        shutil.copytree(path, bad)
        changed = dict(tensors)
        change(changed)
        save_file(changed, str(bad / "model.safetensors"))
        with pytest.raises(DaopError, match=message):
            load(bad)


@pytest.mark.parametrize("change", ["window", "sinks"])
def test_the_window_and_the_sinks_are_exercised(tiny_dir, tmp_path, change):
    """A model differing only in its window (64: never reached) or its sinks (zero) gives other logits on
    the test prompt, and daop follows transformers on each."""
    model, _ = tiny_dir("gpt_oss")
    other = hf_model("gpt_oss", sliding_window=64) if change == "window" else hf_model("gpt_oss")
    if change == "sinks":
        with torch.no_grad():
            for layer in other.model.layers:
                layer.self_attn.sinks.zero_()
    path = save_checkpoint(other, tmp_path / change)
    with torch.no_grad():
        ref, want = model(PROMPT[None]).logits[0], other(PROMPT[None]).logits[0]
    assert (ref - want).abs().max().item() > 1e-2
    assert (load(path).logits(PROMPT) - want).abs().max().item() < 1e-4


def test_config_maps_windows_sinks_and_the_clamp(tiny_dir):
    _, path = tiny_dir("gpt_oss")
    c = load_config(path)
    assert c.layer_windows == (4, 0, 4, 0) and c.sliding_window is None and c.context_length == c.max_positions
    assert c.attention_sinks and c.expert_bias and c.router_logit_bias and c.expert_glu == (1.702, 1.5)
    assert c.rope.kind == "yarn" and not c.rope.truncate and c.norm_eps == 1e-5


@pytest.mark.parametrize("field,value,message", [
    ("layer_types", ["sliding_attention", "full_attention", "chunked_attention", "full_attention"], "layer_types"),
    ("layer_types", ["full_attention"], "layer_types must list 4"),
    ("sliding_window", None, "sliding_window must be a positive integer"),
    ("quantization_config", {"quant_method": "gptq"}, "quant_method 'gptq'"),
])
def test_bad_config_names_the_field(tiny_dir, tmp_path, field, value, message):
    _, path = tiny_dir("gpt_oss")
    raw = json.loads((path / "config.json").read_text())
    raw[field] = value
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(DaopError, match=message):
        load_config(tmp_path)


def test_router_is_a_softmax_over_the_top_k_logits_of_a_biased_linear():
    config = ModelConfig(family="gpt_oss", vocab_size=8, hidden_size=4, num_layers=1, num_heads=1, num_kv_heads=1,
                         head_dim=4, num_experts=4, top_k=2, expert_intermediate_size=4, max_positions=8, norm_eps=1e-5,
                         router_kind="topk_softmax", norm_topk_prob=False, router_logit_bias=True)
    ids, weights = select_experts(config, torch.tensor([[1.0, 3.0, 2.0, -1.0]]))
    assert ids.tolist() == [[1, 2]]
    assert torch.allclose(weights, torch.softmax(torch.tensor([[3.0, 2.0]]), dim=-1))
    routing = ModelRouting(config, {0: torch.eye(4)}, logit_biases={0: torch.tensor([0.0, 0.0, 0.0, 4.5])})
    ids, weights = routing.route(0, torch.tensor([[1.0, 3.0, 2.0, -1.0]]))  # expert 3's logit becomes 3.5
    assert ids.tolist() == [[3, 1]]
    assert torch.allclose(weights, torch.softmax(torch.tensor([[3.5, 3.0]]), dim=-1))


def test_clamped_swiglu_equals_transformers():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    experts = GptOssExperts(GptOssConfig(hidden_size=8, intermediate_size=4, num_local_experts=2, swiglu_limit=7.0))
    gate = torch.tensor([[10.0, 1.0, -10.0, 0.3]])
    up = torch.tensor([[10.0, 0.5, -10.0, -7.5]])
    interleaved = torch.stack((gate, up), dim=-1).flatten(-2)
    assert torch.equal(gated(gate, up, (1.702, 7.0)), experts._apply_gate(interleaved))
    out = gated(gate, up, (1.702, 7.0))
    g = torch.tensor(7.0)  # the gate clamped above, up to 7 ...
    assert torch.isclose(out[0, 0], 8 * g * torch.sigmoid(1.702 * g))
    g = torch.tensor(0.3)  # ... and to -7 below
    assert torch.isclose(out[0, 3], -6 * g * torch.sigmoid(1.702 * g))
