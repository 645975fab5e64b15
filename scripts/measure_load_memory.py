"""Peak host memory while loading a checkpoint, relative to the model's bytes.

    python scripts/measure_load_memory.py --make /tmp/mixtral-2gb   # once: a ~2 GB random bf16 Mixtral checkpoint
    python scripts/measure_load_memory.py /tmp/mixtral-2gb           # prints one JSON line
    python scripts/measure_load_memory.py --make --geometry mixtral-8x7b --layers 4 /tmp/mx4   # Mixtral's shapes, 4 layers
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
from pathlib import Path


def rss_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def make(path: Path) -> None:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=4,
                        num_attention_heads=16, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    shutil.copy(Path(__file__).parents[1] / "src/daop/assets/daop-moe-mini/tokenizer.json", path)
    shutil.copy(Path(__file__).parents[1] / "src/daop/assets/daop-moe-mini/tokenizer_config.json", path)


def make_geometry(path: Path, geometry: str, layers: int) -> None:
    """A random bf16 checkpoint of a geometry's shapes (Mixtral's published tensor names), written one
    layer per file, so a checkpoint of many GB is made without holding it in memory."""
    import torch
    from safetensors.torch import save_file

    from daop.bench.geometry import GEOMETRIES

    raw = dict(GEOMETRIES[geometry], num_hidden_layers=layers, torch_dtype="bfloat16", architectures=["MixtralForCausalLM"])
    if raw["model_type"] != "mixtral":
        raise SystemExit("--geometry: only Mixtral-shaped geometries are written")
    D, I, E, V = raw["hidden_size"], raw["intermediate_size"], raw["num_local_experts"], raw["vocab_size"]
    head = D // raw["num_attention_heads"]
    kv = raw["num_key_value_heads"] * head
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    path.mkdir(parents=True)
    files: dict[str, str] = {}

    def save(name: str, tensors: dict) -> None:
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        files.update(dict.fromkeys(tensors, name))

    save("embed.safetensors", {"model.embed_tokens.weight": rand(V, D), "model.norm.weight": torch.ones(D, dtype=torch.bfloat16),
                               "lm_head.weight": rand(V, D)})
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + "input_layernorm.weight": torch.ones(D, dtype=torch.bfloat16),
             p + "post_attention_layernorm.weight": torch.ones(D, dtype=torch.bfloat16),
             p + "self_attn.q_proj.weight": rand(D, D), p + "self_attn.k_proj.weight": rand(kv, D),
             p + "self_attn.v_proj.weight": rand(kv, D), p + "self_attn.o_proj.weight": rand(D, D),
             p + "block_sparse_moe.gate.weight": rand(E, D)}
        for e in range(E):
            q = f"{p}block_sparse_moe.experts.{e}."
            t.update({q + "w1.weight": rand(I, D), q + "w3.weight": rand(I, D), q + "w2.weight": rand(D, I)})
        save(f"layer-{i:03d}.safetensors", t)
        del t
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": files}))
    (path / "config.json").write_text(json.dumps(raw, indent=1))
    shutil.copy(Path(__file__).parents[1] / "src/daop/assets/daop-moe-mini/tokenizer.json", path)
    shutil.copy(Path(__file__).parents[1] / "src/daop/assets/daop-moe-mini/tokenizer_config.json", path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--make", action="store_true")
    ap.add_argument("--geometry", default=None, help="with --make: a Mixtral-shaped geometry (e.g. mixtral-8x7b)")
    ap.add_argument("--layers", type=int, default=4, help="with --make --geometry: layers written")
    ap.add_argument("--expert-dtype", default=None, help="auto, int8 or int4: the routed experts' stored format")
    args = ap.parse_args()
    if args.make:
        if args.geometry:
            make_geometry(Path(args.path), args.geometry, args.layers)
        else:
            make(Path(args.path))
        return
    import torch  # noqa: F401  (imported before the baseline so it is not counted)

    from daop.engine import Engine

    base = rss_bytes()
    engine = Engine.from_pretrained(args.path, device="cpu", progress=False, expert_dtype=args.expert_dtype)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model_bytes = sum(f.stat().st_size for f in Path(args.path).glob("*.safetensors"))
    print(json.dumps({"model_bytes": model_bytes, "baseline_rss": base, "peak_rss": peak, "after_load_rss": rss_bytes(),
                      "peak_over_model": round((peak - base) / model_bytes, 3), "dtype": str(engine.decoder.dtype),
                      "expert_format": engine.expert_format.name,
                      "loaded_over_model": round((rss_bytes() - base) / model_bytes, 3)}))


if __name__ == "__main__":
    sys.exit(main())
