"""Fill a Decoder (and an expert store) from a checkpoint, tensor by tensor, with checks.

Every destination tensor is preallocated on its final device in its final dtype; each checkpoint
tensor is validated (present, right shape) before it is read, and read straight into place.
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Callable, Iterable

import torch
from tqdm import tqdm

from daop.config import ModelConfig
from daop.errors import DaopError
from daop.model.decoder import Decoder
from daop.model.specs import FamilySpec
from daop.weights.expert_views import DEFERRED, Staged, SlotCopy
from daop.weights.safetensors_io import Checkpoint
from daop.weights.stacked_experts import StackedPart, stacked_expert_tensors

DTYPE_NAMES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def parse_dtype(name: str | torch.dtype | None, default: str) -> torch.dtype:
    """A torch dtype from a user string (auto, bfloat16/bf16, float16/fp16/half, float32/fp32) or `default`
    (the checkpoint's own dtype) for None and auto."""
    if isinstance(name, torch.dtype):
        return name
    key = (name if name is not None and str(name).lower() != "auto" else default).lower()
    if key not in DTYPE_NAMES:
        raise DaopError(f"unsupported dtype {name!r}; choose one of auto, bfloat16 (bf16), float16 (fp16), float32 (fp32)")
    return DTYPE_NAMES[key]


Destination = torch.Tensor | Staged | SlotCopy | StackedPart


def expert_tensors(spec: FamilySpec, config: ModelConfig, dest: Callable[[int, int], tuple],
                   names: Callable[[int, int], tuple[str, ...]] | None = None) -> dict[str, Destination]:
    """Checkpoint name -> destination for every routed expert's weights: (gate, up, down) by the
    family's names, or the tensors `names` gives (a quantized folder's stored ones)."""
    names = names or spec.expert_names
    out: dict[str, Destination] = {}
    for layer_idx in range(config.num_layers):
        if not config.is_moe_layer(layer_idx):
            continue
        for expert_idx in range(config.num_experts):
            out.update(zip(names(layer_idx, expert_idx), dest(layer_idx, expert_idx)))
    return out


def dtype_of(dest: Destination) -> torch.dtype:
    return dest.buffer.dtype if isinstance(dest, DEFERRED) else dest.dtype  # type: ignore[return-value]


def exact_dtype(name: str, dest: Destination, exact: frozenset[str]) -> torch.dtype | None:
    """The dtype a checkpoint tensor must have (stored quantized experts, MXFP4 blocks), or None for any float."""
    if isinstance(dest, StackedPart):
        return dest.dtype
    return dtype_of(dest) if name in exact else None


def check_tensors(ckpt: Checkpoint, targets: dict[str, Destination], exact: frozenset[str] = frozenset()) -> None:
    """Every expected tensor exists with the expected shape; errors name the file and tensor.

    Missing tensors are reported before shape mismatches: a config.json that asks for more experts
    or layers than the checkpoint holds names the first tensor it lacks, not a router's shape.
    Tensors named in `exact` (stored quantized experts) must also have their destination's dtype:
    they are copied bit for bit, never converted.
    """
    for name in targets:
        if ckpt.entry(name) is None:
            raise DaopError(f"{ckpt.model_dir}: tensor {name!r} is missing from the checkpoint (required by config.json)")
    for name, dest in targets.items():
        entry = ckpt.entry(name)
        assert entry is not None
        if tuple(entry.shape) != tuple(dest.shape):
            raise DaopError(
                f"{ckpt.file_of(name)}: tensor {name!r} has shape {list(entry.shape)}, "
                f"but config.json implies {list(dest.shape)}"
            )
        want = exact_dtype(name, dest, exact)
        if want is not None and entry.dtype != want:
            source = "config.json's daop_quantization" if name in exact else "config.json"
            raise DaopError(f"{ckpt.file_of(name)}: tensor {name!r} has dtype {entry.dtype}, but {source} implies {want}")
        if want is None and entry.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise DaopError(f"{ckpt.file_of(name)}: tensor {name!r} has dtype {entry.dtype}, expected a float type")


CHECK_FINITE_ENV = "DAOP_CHECK_FINITE"  # "1": check every weight for NaN and Inf while loading


def maybe_not_finite(t: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor on t's device, True when t may hold NaN or Inf (no host sync, no large temporary).

    One float32 sum: any NaN or Inf makes it non-finite. Huge finite values can overflow it too, so
    a True answer is confirmed exactly (`torch.isfinite(t).all()`) before anything is reported.
    """
    return ~torch.isfinite(t.sum(dtype=torch.float32))


def read_tensors(ckpt: Checkpoint, targets: dict[str, Destination], progress: bool) -> None:
    """Read every target from the checkpoint with a progress bar over bytes.

    With the environment variable DAOP_CHECK_FINITE=1, every tensor is also checked for NaN and
    Inf once it is in place, in its final dtype (so an overflow when converting, e.g. bf16 to fp16,
    is caught too): the first bad one is a DaopError naming its file and tensor. The check is one
    reduction per tensor, and flags of tensors on an accelerator are read once at the end, but it
    is off by default: on the shipped daop-moe-mini (CPU, warm page cache) it made loading about
    1.5x slower, since reading a checkpoint is itself a single pass over its bytes.
    A `Staged` target (a low-bit expert's part) is read into its float buffer, then quantized; a
    `SlotCopy` (a stored int4 expert bound for CUDA) into its host buffer, then converted into its slot.
    """
    check = os.environ.get(CHECK_FINITE_ENV, "") == "1"
    order: Iterable[str] = sorted(targets, key=lambda n: (str(ckpt.file_of(n)), ckpt.entry(n).start))  # type: ignore[union-attr]
    total = sum(ckpt.entry(n).nbytes for n in targets)  # type: ignore[union-attr]
    pending: list[tuple[str, torch.Tensor]] = []  # (name, suspect flag) of tensors on an accelerator
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not progress, file=sys.stderr, leave=False) as bar:
        for name in order:
            if isinstance(targets[name], StackedPart):  # every expert's slice, read and converted in turn
                targets[name].load(ckpt, name)  # type: ignore[union-attr]
                bar.update(ckpt.entry(name).nbytes)  # type: ignore[union-attr]
                continue
            staged = targets[name] if isinstance(targets[name], DEFERRED) else None
            dest = staged.buffer if staged is not None else targets[name]
            ckpt.read_into(name, dest)
            if check and dest.device.type == "cpu":
                if maybe_not_finite(dest) and not torch.isfinite(dest).all():
                    raise not_finite(ckpt, name, dest)
            elif check:
                pending.append((name, maybe_not_finite(dest)))
            if staged is not None:
                staged.commit()  # quantize (or convert) into the expert's tensors
            bar.update(ckpt.entry(name).nbytes)  # type: ignore[union-attr]
    if pending:
        flags = torch.stack([flag.to(pending[0][1].device) for _, flag in pending]).cpu().tolist()
        for (name, _), suspect in zip(pending, flags):
            if suspect and not torch.isfinite(targets[name]).all():
                raise not_finite(ckpt, name, targets[name])


def not_finite(ckpt: Checkpoint, name: str, dest: torch.Tensor) -> DaopError:
    """The error for a tensor holding NaN or Inf, with counts (computed on the error path only)."""
    nan, inf = int(torch.isnan(dest).sum()), int(torch.isinf(dest).sum())
    entry = ckpt.entry(name)
    cause = "corrupt or diverged weights"
    if entry is not None and entry.dtype != dest.dtype:
        source = torch.empty(entry.shape, dtype=entry.dtype)
        ckpt.read_into(name, source)
        if torch.isfinite(source).all():
            cause = f"its {entry.dtype} values overflow {dest.dtype}; choose another --dtype"
    return DaopError(f"{ckpt.file_of(name)}: tensor {name!r} has {nan} NaN and {inf} Inf values ({cause})")


def load_weights(
    ckpt: Checkpoint,
    decoder: Decoder,
    expert_dest: Callable[[int, int], tuple],
    progress: bool = True,
    stored_names: Callable[[int, int], tuple[str, ...]] | None = None,
) -> None:
    """Read every weight of the decoder from the checkpoint; routed experts go where expert_dest says.

    stored_names: for a quantized folder, the names of an expert's stored tensors; expert_dest then
    gives destinations for exactly those tensors (`stored_views`).
    """
    try:
        targets: dict[str, Destination] = dict(decoder.dense_tensors())
        if decoder.spec.stacked_experts and stored_names:
            raise DaopError(f"{ckpt.model_dir}: quantized folders of {decoder.spec.name} are not supported")
        if decoder.spec.stacked_experts:
            experts = stacked_expert_tensors(ckpt, decoder.spec, decoder.config, expert_dest)
        else:
            experts = expert_tensors(decoder.spec, decoder.config, expert_dest, stored_names)
        targets.update(experts)
        check_tensors(ckpt, targets, frozenset(experts) if stored_names else frozenset())
        read_tensors(ckpt, targets, progress)
    finally:
        ckpt.close()
        return_freed_heap()


def return_freed_heap() -> None:
    """Give the heap pages freed while loading (read buffers, quantization temporaries) back to the
    system: glibc keeps them otherwise, and a loaded int4 model then holds up to a GB it does not use."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass
