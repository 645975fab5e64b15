"""Fill a Decoder (and an expert store) from a checkpoint, tensor by tensor, with checks.

Every destination tensor is preallocated on its final device in its final dtype; each checkpoint
tensor is validated (present, right shape) before it is read, and read straight into place.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm import tqdm

from daop.config import ModelConfig
from daop.errors import DaopError
from daop.model.decoder import Decoder
from daop.model.specs import FamilySpec
from daop.weights.safetensors_io import Checkpoint

DTYPE_NAMES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def parse_dtype(name: str | torch.dtype | None, default: str) -> torch.dtype:
    """A torch dtype from a user string (bf16, fp16, fp32) or the checkpoint's own dtype."""
    if isinstance(name, torch.dtype):
        return name
    key = (name or default).lower()
    if key not in DTYPE_NAMES:
        raise DaopError(f"unsupported dtype {name!r}; choose one of bf16, fp16, fp32")
    return DTYPE_NAMES[key]


def expert_tensors(spec: FamilySpec, config: ModelConfig, dest: Callable[[int, int], tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
    """Checkpoint name -> destination for every routed expert's (gate, up, down) weights."""
    out: dict[str, torch.Tensor] = {}
    for layer_idx in range(config.num_layers):
        if not config.is_moe_layer(layer_idx):
            continue
        for expert_idx in range(config.num_experts):
            names = spec.expert_names(layer_idx, expert_idx)
            out.update(zip(names, dest(layer_idx, expert_idx)))
    return out


def check_tensors(ckpt: Checkpoint, targets: dict[str, torch.Tensor]) -> None:
    """Every expected tensor exists with the expected shape; errors name the file and tensor."""
    for name, dest in targets.items():
        entry = ckpt.entry(name)
        if entry is None:
            raise DaopError(f"{ckpt.model_dir}: tensor {name!r} is missing from the checkpoint (required by config.json)")
        if tuple(entry.shape) != tuple(dest.shape):
            raise DaopError(
                f"{ckpt.file_of(name)}: tensor {name!r} has shape {list(entry.shape)}, "
                f"but config.json implies {list(dest.shape)}"
            )
        if entry.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise DaopError(f"{ckpt.file_of(name)}: tensor {name!r} has dtype {entry.dtype}, expected a float type")


def read_tensors(ckpt: Checkpoint, targets: dict[str, torch.Tensor], progress: bool) -> None:
    """Read every target from the checkpoint with a progress bar over bytes."""
    order: Iterable[str] = sorted(targets, key=lambda n: (str(ckpt.file_of(n)), ckpt.entry(n).start))  # type: ignore[union-attr]
    total = sum(ckpt.entry(n).nbytes for n in targets)  # type: ignore[union-attr]
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not progress, file=sys.stderr, leave=False) as bar:
        for name in order:
            ckpt.read_into(name, targets[name])
            bar.update(ckpt.entry(name).nbytes)  # type: ignore[union-attr]


def open_checkpoint(model_dir: Path) -> Checkpoint:
    return Checkpoint(model_dir)


def load_weights(
    ckpt: Checkpoint,
    decoder: Decoder,
    expert_dest: Callable[[int, int], tuple[torch.Tensor, ...]],
    progress: bool = True,
) -> None:
    """Read every weight of the decoder from the checkpoint; routed experts go where expert_dest says."""
    try:
        targets = decoder.dense_tensors()
        targets.update(expert_tensors(decoder.spec, decoder.config, expert_dest))
        check_tensors(ckpt, targets)
        read_tensors(ckpt, targets, progress)
    finally:
        ckpt.close()
