"""Peak host memory while loading a checkpoint, relative to the model's bytes.

    python scripts/measure_load_memory.py --make /tmp/mixtral-2gb   # once: a ~2 GB random bf16 Mixtral checkpoint
    python scripts/measure_load_memory.py /tmp/mixtral-2gb           # prints one JSON line
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--make", action="store_true")
    ap.add_argument("--expert-dtype", default=None, help="auto, int8 or int4: the routed experts' stored format")
    args = ap.parse_args()
    if args.make:
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
