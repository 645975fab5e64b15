"""Checkpoint folders whose routed experts are already quantized (written by `daop quantize`).

Such a folder is a Hugging Face-layout folder whose config.json carries a `daop_quantization`
section; every routed expert is stored as the four tensors of daop's host layout for its format
(`daop.quant`), under the expert's own prefix:
    <prefix>.gate_up.qweight, <prefix>.gate_up.scales, <prefix>.down.qweight, <prefix>.down.scales
Dense tensors keep their checkpoint names. The format is fixed when the folder is written: loading
reads the stored tensors as they are, and options asking for another format are refused rather
than quantizing twice. Non-goal: reading other tools' quantized checkpoints (GPTQ, AWQ, ...).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from daop.errors import DaopError
from daop.model.specs import FamilySpec
from daop.quant import ExpertFormat, bits_of, parse_expert_dtype
from daop.weights.loader import parse_dtype

SECTION = "daop_quantization"
METHOD = "rtn"  # round to nearest, the only method of daop.quant
LAYOUT = "daop-host-v1"  # daop.quant's expert layout, int4 in 64-row blocks (daop.int4_layout.DISK_BLOCK_N)
STORED_PARTS = ("gate_up.qweight", "gate_up.scales", "down.qweight", "down.scales")
SCALE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def expert_prefix(spec: FamilySpec, layer_idx: int, expert_idx: int) -> str:
    """The name components an expert's (gate, up, down) checkpoint names share, e.g.
    'model.layers.0.block_sparse_moe.experts.3'."""
    parts = [name.split(".") for name in spec.expert_names(layer_idx, expert_idx)]
    common = []
    for pieces in zip(*parts):
        if len(set(pieces)) > 1:
            break
        common.append(pieces[0])
    return ".".join(common)


def stored_names(spec: FamilySpec, layer_idx: int, expert_idx: int) -> tuple[str, ...]:
    """Names of one routed expert's stored tensors, in the order of `ExpertFormat.shapes`."""
    prefix = expert_prefix(spec, layer_idx, expert_idx)
    return tuple(f"{prefix}.{part}" for part in STORED_PARTS)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def section(fmt: ExpertFormat, version: str) -> dict[str, Any]:
    """The config.json section describing a folder's stored experts."""
    return {"method": METHOD, "expert_dtype": fmt.kind, "bits": bits_of(fmt.kind),
            "group_size": fmt.group_size if fmt.kind == "int4" else None, "scale_dtype": dtype_name(fmt.dtype),
            "layout": LAYOUT, "daop_version": version}


def stored_format(raw: dict[str, Any], folder: Path) -> ExpertFormat | None:
    """The format of a folder's stored experts from its config.json (None for a float checkpoint).

    Every field is checked: a layout or method this version cannot read is refused by name rather
    than loaded as something else."""
    info = raw.get(SECTION)
    if info is None:
        return None
    where = f"{folder / 'config.json'}: {SECTION}"
    if not isinstance(info, dict):
        raise DaopError(f"{where} must be a JSON object")
    if info.get("layout") != LAYOUT:
        raise DaopError(f"{where}: unknown layout {info.get('layout')!r}; this daop reads {LAYOUT!r}")
    if info.get("method") != METHOD:
        raise DaopError(f"{where}: unknown method {info.get('method')!r}; this daop reads {METHOD!r}")
    kind = info.get("expert_dtype")
    if kind not in ("int8", "int4") or info.get("bits") != bits_of(kind):
        raise DaopError(f"{where}: unsupported expert_dtype {kind!r} with bits {info.get('bits')!r}; "
                        "this daop reads int8 (8 bits) and int4 (4 bits)")
    scale = SCALE_DTYPES.get(info.get("scale_dtype"))  # type: ignore[arg-type]
    if scale is None:
        raise DaopError(f"{where}: unsupported scale_dtype {info.get('scale_dtype')!r}; choose one of {', '.join(SCALE_DTYPES)}")
    group = info.get("group_size")
    if kind == "int4" and (type(group) is not int or group < 1):
        raise DaopError(f"{where}: int4 needs a positive integer group_size, got {group!r}")
    return ExpertFormat(kind, scale, group) if kind == "int4" else ExpertFormat(kind, scale)


def check_request(stored: ExpertFormat, folder: Path, dtype: torch.dtype, expert_dtype: str | None,
                  group_size: int | None) -> None:
    """Options that ask a quantized folder for another format are one clear error: the folder holds
    only the quantized experts, so the format cannot change without the float checkpoint."""
    hint = "use the float checkpoint to quantize differently"
    if dtype != stored.dtype:
        raise DaopError(f"{folder}: experts' scales are stored in {dtype_name(stored.dtype)}; --dtype {dtype_name(dtype)} "
                        f"asks for another; leave --dtype out (or {dtype_name(stored.dtype)}), or {hint}")
    wanted = parse_expert_dtype(expert_dtype, dtype) if expert_dtype is not None else "auto"
    if str(expert_dtype).lower() not in ("none", "auto") and wanted != stored.kind:
        raise DaopError(f"{folder}: experts are stored as {stored.name}; --expert-dtype {expert_dtype} asks for another "
                        f"format; {hint}")
    if stored.kind == "int4" and group_size is not None and group_size != stored.group_size:
        raise DaopError(f"{folder}: experts are stored as {stored.name}; --group-size {group_size} asks for another "
                        f"format; {hint}")


def load_options(raw: dict[str, Any], folder: Path, dtype: str | torch.dtype | None, default_dtype: str,
                 expert_dtype: str | None, group_size: int | None) -> tuple[torch.dtype, str | None, int | None, ExpertFormat | None]:
    """(dtype, expert dtype, group size, stored format) a folder loads with: the user's options for a
    float checkpoint; a quantized folder's own format (its scales' dtype by default), once the
    options are checked against it."""
    stored = stored_format(raw, folder)
    torch_dtype = parse_dtype(dtype, dtype_name(stored.dtype) if stored else default_dtype)
    if stored is None:
        return torch_dtype, expert_dtype, group_size, None
    check_request(stored, folder, torch_dtype, expert_dtype, group_size)
    return torch_dtype, stored.kind, stored.group_size, stored
