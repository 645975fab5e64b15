"""Tiny random checkpoints of every supported family, built offline with transformers (the oracle)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 384
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False)

# low-rank q, rope part narrower than the rest of a head, value heads of another width, shared experts, a
# dense first layer and group-limited routing (top 4 experts from the best 2 of 4 groups); as in DeepSeek
# checkpoints, num_key_value_heads equals the heads (transformers repeats keys by their ratio)
DEEPSEEK = dict(COMMON, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=16,
                num_experts_per_tok=4, n_shared_experts=2, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=24,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_group=4, topk_group=2)

# four layers sliding (window 4, so a 12-token prompt outgrows it) and full in turn, a clamp low enough
# that random weights reach it on both sides, attention sinks and every bias random (set by hf_model)
GPT_OSS = dict(COMMON, num_hidden_layers=4, head_dim=16, intermediate_size=64, num_local_experts=8,
               num_experts_per_tok=2, sliding_window=4, swiglu_limit=1.5,
               layer_types=["sliding_attention", "full_attention"] * 2,
               rope_parameters={"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                "original_max_position_embeddings": 32, "rope_theta": 150000.0})

FAMILIES = ["mixtral", "phimoe", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss"]


def hf_config(family: str, **overrides):
    import transformers as tf

    if family == "mixtral":
        cfg = tf.MixtralConfig(**COMMON, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2)
    elif family == "phimoe":
        cfg = tf.PhimoeConfig(**COMMON, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2,
                              attention_bias=True, lm_head_bias=True)
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**COMMON, intermediate_size=128, moe_intermediate_size=48,
                                shared_expert_intermediate_size=96, num_experts=8, num_experts_per_tok=2,
                                norm_topk_prob=False, mlp_only_layers=[1])
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**COMMON, head_dim=24, intermediate_size=128, moe_intermediate_size=48,
                                num_experts=16, num_experts_per_tok=8, norm_topk_prob=True)
    elif family == "olmoe":
        cfg = tf.OlmoeConfig(**COMMON, intermediate_size=48, num_experts=8, num_experts_per_tok=2, clip_qkv=4.0)
    elif family == "deepseek_v2":
        cfg = tf.DeepseekV2Config(**DEEPSEEK, topk_method="group_limited_greedy", routed_scaling_factor=1.5)
    elif family == "deepseek_v3":
        # the sigmoid router: each group ranked by its two best scores plus the score bias (random, set by hf_model)
        cfg = tf.DeepseekV3Config(**DEEPSEEK, routed_scaling_factor=2.5)
    elif family == "gpt_oss":
        cfg = tf.GptOssConfig(**GPT_OSS)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def hf_model(family: str, seed: int = 0, **overrides):
    """A transformers model with weights large enough that routing and greedy choices are decisive."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = hf_config(family, **overrides)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn_like(p) * (1.5 / fan_in**0.5))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's router bias: zero at init
                b.copy_(0.3 * torch.randn_like(b))
    return model


def write_tokenizer(path: Path) -> None:
    """A small byte-level BPE (ids < VOCAB) with a chat template, written next to the weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["In the beginning was the word, and the word was with the model.",
            "def forward(self, x):\n    return self.layer(x) + x\n",
            "Shall I compare thee to a summer's day? Thou art more lovely and more temperate."] * 20
    tok.train_from_iterator(text, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.save(str(path / "tokenizer.json"))
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
                "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": template,
         "tokenizer_class": "PreTrainedTokenizerFast"}))


def save_checkpoint(model, path: Path, dtype: torch.dtype = torch.float32, shard_mb: int | None = None) -> Path:
    """Save as safetensors (sharded with an index when shard_mb is given) plus a tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(path, max_shard_size=f"{shard_mb}MB" if shard_mb else "50GB")
    write_tokenizer(path)
    return path


def fail_long_prefills(engine, limit: int, error=torch.OutOfMemoryError):
    """Make the attention of layer 1 run out of memory for any step of more than `limit` tokens, as CUDA's
    allocator does for a prompt too long for the free memory (layer 0 has already written its KV cache)."""
    inner = engine.decoder.attention_block

    def attention_block(layer, x, step, delta=None):
        if layer.layer_idx == 1 and x.shape[1] > limit:
            raise error("CUDA out of memory. Tried to allocate 20.00 GiB")
        return inner(layer, x, step, delta)

    engine.decoder.attention_block = attention_block


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., K] (K a multiple of 32) in MXFP4 as gpt-oss publishes it: (blocks uint8 [..., K/32, 16], two
    FP4 codes a byte, low nibble first; scales uint8 [..., K/32], exponents biased by 127). Each block's
    scale is the smallest power of two that keeps its largest magnitude within 6, each value the nearest
    FP4 value under it."""
    from daop.weights.mxfp4 import FP4_VALUES

    *lead, K = w.shape
    blocks = w.float().reshape(*lead, K // 32, 32)
    exponent = torch.ceil(torch.log2(blocks.abs().amax(dim=-1).clamp_min(2.0 ** -100) / 6.0))
    scaled = blocks / torch.exp2(exponent)[..., None]
    codes = (scaled[..., None] - torch.tensor(FP4_VALUES)).abs().argmin(dim=-1).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exponent.int() + 127).to(torch.uint8)


def save_mxfp4_checkpoint(model, path: Path) -> Path:
    """A gpt-oss checkpoint in the published layout: its routed experts in MXFP4 (`*_blocks`, `*_scales`,
    rows as nn.Linear orders them: [E, out, in/32, 16]), everything else, biases included, as saved."""
    from safetensors.torch import save_file

    save_checkpoint(model, path)
    tensors = {}
    for name, t in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = quantize_mxfp4(t.transpose(1, 2))
        else:
            tensors[name] = t.contiguous()
    for old in path.glob("*.safetensors"):
        old.unlink()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((path / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    return path
