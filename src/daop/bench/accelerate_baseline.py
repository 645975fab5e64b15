"""The comparison a Python user would try first: transformers + accelerate offloading.

The same geometry, a device_map from accelerate under the same GPU budget (whole decoder layers
go to the host and are copied in at every forward), random weights, greedy generation. Needs
`pip install transformers accelerate` (not daop dependencies); only `daop bench` imports this.
"""
from __future__ import annotations

import statistics
import time

import torch

from daop.bench.geometry import GEOMETRIES
from daop.errors import DaopError


def build(geometry: str, layers: int | None, dtype: torch.dtype, gpu_bytes: int, device: torch.device):
    """An HF model of the geometry, dispatched by accelerate under a GPU budget of gpu_bytes."""
    try:
        import transformers
        from accelerate import dispatch_model, infer_auto_device_map
    except ImportError as exc:
        raise DaopError("the accelerate comparison needs: pip install transformers accelerate") from exc
    raw = dict(GEOMETRIES[geometry])
    if layers is not None:
        raw["num_hidden_layers"] = layers
    config = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
        for module in model.modules():  # buffers such as rotary tables were never computed on meta
            if hasattr(module, "rope_init_fn") and hasattr(module, "inv_freq"):
                inv_freq, _ = module.rope_init_fn(module.config, torch.device("cpu"))
                module.inv_freq.copy_(inv_freq)
                if hasattr(module, "original_inv_freq"):
                    module.original_inv_freq = inv_freq.clone()
    if device.type != "cuda":
        return model
    layer_class = type(model.model.layers[0]).__name__
    device_map = infer_auto_device_map(model, max_memory={device.index or 0: gpu_bytes, "cpu": 10**13},
                                       no_split_module_classes=[layer_class])
    return dispatch_model(model, device_map=device_map, main_device=device)


@torch.inference_mode()
def measure(model, prompts: list[list[int]], gen_tokens: int, device: torch.device) -> dict:
    """Median TTFT and decode time per token of greedy generation."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(ids, n):
        sync()
        t0 = time.perf_counter()
        model.generate(torch.tensor([ids], device=device), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0, eos_token_id=None)
        sync()
        return time.perf_counter() - t0

    timed(prompts[0], 2)  # warm-up
    ttft, tpot = [], []
    for ids in prompts[1:]:
        first = timed(ids, 1)
        total = timed(ids, gen_tokens)
        ttft.append(first * 1000)
        tpot.append((total - first) / (gen_tokens - 1) * 1000)
    return {"ttft_ms": round(statistics.median(ttft), 2), "decode_ms_per_token": round(statistics.median(tpot), 3),
            "decode_ms_spread": [round(min(tpot), 3), round(max(tpot), 3)],
            "decode_tokens_per_s": round(1000 / statistics.median(tpot), 3)}
