"""`daop quantize`: write a checkpoint folder whose routed experts are stored in a low-bit format.

The folder loads directly (`daop.weights.lowbit_folder` describes it): dense tensors as in the
input (converted to --dtype when given), every routed expert as the tensors `ExpertFormat.from_float`
makes of it, so loading it gives bitwise the model that quantizing at load gives. Memory stays near
one output shard plus one expert: tensors are read one at a time, appended to the current shard, and
each shard is written once it is full. The folder appears whole or not at all: it is built next to
the output under a temporary name and renamed at the end; any failure (Ctrl-C too) removes it.
Non-goal: calibrated methods (GPTQ, AWQ); the rounding is daop.quant's, as at load.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from daop import __version__, int4_layout
from daop.config import ModelConfig, load_config, read_json
from daop.errors import DaopError
from daop.model.specs import FamilySpec, spec_for
from daop.quant import DEFAULT_GROUP_SIZE, ExpertFormat
from daop.weights.loader import check_tensors, parse_dtype
from daop.weights.lowbit_folder import SECTION, dtype_name, section, stored_names
from daop.weights.safetensors_io import Checkpoint

SHARD_BYTES = 2 * 2**30
INDEX = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
SMALL_FILE_BYTES = 256 * 2**20  # tokenizers are at most tens of MiB; larger files are weights of some kind
FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


@dataclass(frozen=True)
class QuantizeResult:
    output: Path
    fmt: ExpertFormat
    bytes_before: int  # the input's weight files
    bytes_after: int  # the output's weight files
    shards: int


class ShardWriter:
    """Tensors appended in order, written as safetensors shards of at most `max_bytes` each (a larger
    tensor gets a shard of its own); shards get their final names, and the index, in `finish`."""

    def __init__(self, folder: Path, max_bytes: int = SHARD_BYTES) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Append tensors that belong together (an expert's four) to one shard."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending.update(tensors)
        self.pending_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"shard-{len(self.shards) + 1:05d}.safetensors"
        save_file(self.pending, str(self.folder / name), metadata={"format": "pt"})
        self.shards.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Write the last shard, name the shards as Hugging Face does, and write the index when there are several."""
        self.flush()
        n = len(self.shards)
        final = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for (tmp, _), name in zip(self.shards, final):
            os.replace(self.folder / tmp, self.folder / name)
        paths = [self.folder / name for name in final]
        if n > 1:
            weight_map = {t: name for (_, names), name in zip(self.shards, final) for t in names}
            index = {"metadata": {"total_size": sum(p.stat().st_size for p in paths)}, "weight_map": weight_map}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return paths


def moe_experts(config: ModelConfig) -> Iterator[tuple[int, int]]:
    for layer_idx in range(config.num_layers):
        if config.is_moe_layer(layer_idx):
            for expert_idx in range(config.num_experts):
                yield layer_idx, expert_idx


def expert_sources(ckpt: Checkpoint, spec: FamilySpec, config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape of every routed expert's (gate, up, down), checked against config.json
    before anything is written (errors name the file and tensor)."""
    I, D = config.expert_intermediate_size, config.hidden_size
    shapes = {}
    for layer_idx, expert_idx in moe_experts(config):
        shapes.update(zip(spec.expert_names(layer_idx, expert_idx), ((I, D), (I, D), (D, I))))
    check_tensors(ckpt, {name: torch.empty(shape, device="meta") for name, shape in shapes.items()})
    return shapes


def dense_tensor(ckpt: Checkpoint, name: str, dtype: torch.dtype | None) -> torch.Tensor:
    """One non-expert tensor as the input stores it (float ones converted to `dtype` when given)."""
    entry = ckpt.entry(name)
    assert entry is not None
    to = dtype if dtype is not None and entry.dtype in FLOATS else entry.dtype
    out = torch.empty(entry.shape, dtype=to)
    ckpt.read_into(name, out)
    return out


def quantized_expert(ckpt: Checkpoint, names: tuple[str, str, str], fmt: ExpertFormat, config: ModelConfig,
                     scratch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """One routed expert read as the loader reads it (into float buffers of the model's dtype), then
    quantized by `ExpertFormat.from_float`, so the result is bitwise what quantizing at load stores
    (int4 bytes in the folder's block layout, `int4_layout.to_disk`)."""
    I, D = config.expert_intermediate_size, config.hidden_size
    if not scratch:
        scratch.update(gate_up=torch.empty(2 * I, D, dtype=fmt.dtype), down=torch.empty(D, I, dtype=fmt.dtype))
    gate, up = scratch["gate_up"].chunk(2, dim=0)
    for name, dest in zip(names, (gate, up, scratch["down"])):
        ckpt.read_into(name, dest)
    stored = fmt.from_float(scratch["gate_up"], scratch["down"])
    return tuple(int4_layout.to_disk(t) if t.dtype == torch.uint8 else t for t in stored)


def write_weights(ckpt: Checkpoint, spec: FamilySpec, config: ModelConfig, fmt: ExpertFormat, dtype: torch.dtype | None,
                  writer: ShardWriter, progress: bool) -> list[Path]:
    """Every dense tensor as it is, then every routed expert quantized, through the shard writer."""
    experts = expert_sources(ckpt, spec, config)
    dense = sorted((n for n in ckpt.where if n not in experts), key=lambda n: (str(ckpt.file_of(n)), ckpt.entry(n).start))  # type: ignore[union-attr]
    total = sum(ckpt.entry(n).nbytes for n in ckpt.where)  # type: ignore[union-attr]
    scratch: dict[str, torch.Tensor] = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="quantizing", disable=not progress, file=sys.stderr, leave=False) as bar:
        for name in dense:
            writer.add({name: dense_tensor(ckpt, name, dtype)})
            bar.update(ckpt.entry(name).nbytes)  # type: ignore[union-attr]
        for layer_idx, expert_idx in moe_experts(config):
            names = spec.expert_names(layer_idx, expert_idx)
            stored = quantized_expert(ckpt, names, fmt, config, scratch)
            writer.add(dict(zip(stored_names(spec, layer_idx, expert_idx), stored)))
            bar.update(sum(ckpt.entry(n).nbytes for n in names))  # type: ignore[union-attr]
    return writer.finish()


def output_config(raw: dict, fmt: ExpertFormat) -> dict:
    """config.json of the output: the input's, with the stored format and the dtype of the scales
    (the dtype the folder loads in by default)."""
    out = dict(raw)
    out["torch_dtype"] = dtype_name(fmt.dtype)
    if "dtype" in out:
        out["dtype"] = dtype_name(fmt.dtype)
    out[SECTION] = section(fmt, __version__)
    return out


def copy_small_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config and other small non-weight files of the input's top level."""
    for path in sorted(src.iterdir()):
        if not path.is_file() or path.name in ("config.json", INDEX) or path.suffix in WEIGHT_SUFFIXES:
            continue
        if path.stat().st_size <= SMALL_FILE_BYTES:
            shutil.copy2(path, dst / path.name)


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def building(output: Path) -> Path:
    """The temporary sibling folder the output is built in."""
    return output.with_name(f"{output.name}.partial-{os.getpid()}")


def atomically(output: Path, build: Callable[[Path], None]) -> None:
    """Run `build` on a fresh temporary folder next to `output`, then rename it to `output`; on any
    failure or interruption the temporary folder is removed, so no half-written output exists."""
    tmp = building(output)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        if output.exists():
            raise DaopError(f"{output} appeared while quantizing; nothing was written")
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def quantize_checkpoint(model: Path, output: Path, expert_dtype: str, group_size: int | None = None,
                        dtype: str | None = None, progress: bool = True, shard_bytes: int = SHARD_BYTES) -> QuantizeResult:
    """Write `output`, a copy of the checkpoint `model` with its routed experts in `expert_dtype`."""
    model, output = Path(model).expanduser(), Path(output).expanduser()
    if output.exists():
        raise DaopError(f"{output} already exists; choose another --output or remove it first")
    if not model.is_dir():
        raise DaopError(f"model folder not found: {model}")
    raw = read_json(model / "config.json", "config.json")
    if SECTION in raw:
        raise DaopError(f"{model}: its experts are already quantized ({SECTION} in config.json); quantize the float checkpoint")
    if expert_dtype not in ("int8", "int4"):
        raise DaopError(f"--expert-dtype must be int8 or int4, got {expert_dtype!r}")
    config, spec = load_config(model), spec_for(raw)
    if spec.stacked_experts:
        raise DaopError(f"{model}: daop quantize does not write {spec.name} folders (experts stored stacked); "
                        "quantize at load with --expert-dtype int8 or int4 instead")
    wanted = None if dtype is None or dtype.lower() == "auto" else parse_dtype(dtype, config.torch_dtype)
    fmt = ExpertFormat(expert_dtype, parse_dtype(dtype, config.torch_dtype), group_size or DEFAULT_GROUP_SIZE)
    fmt.check(config.hidden_size, config.expert_intermediate_size)
    ckpt = Checkpoint(model)
    shards: list[Path] = []

    def build(tmp: Path) -> None:
        try:
            shards.extend(write_weights(ckpt, spec, config, fmt, wanted, ShardWriter(tmp, shard_bytes), progress))
        finally:
            ckpt.close()
        (tmp / "config.json").write_text(json.dumps(output_config(raw, fmt), indent=2) + "\n")
        copy_small_files(model, tmp)

    atomically(output, build)
    return QuantizeResult(output, fmt, weight_bytes(model), weight_bytes(output), len(shards))
