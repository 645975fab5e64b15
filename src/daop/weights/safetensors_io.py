"""Lazy, validated reading of safetensors checkpoints (single file or sharded).

Each file is memory-mapped; a tensor is copied straight from the mapping into its destination
(any device, any dtype) and the mapped pages are released right after, so peak host memory while
loading stays close to the model's own size. Every structural problem (truncated file, offsets
past the end, unknown dtype, missing shard) is a DaopError naming the file and tensor.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from daop.errors import DaopError

DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


def _ints(value: object, field: str) -> list[int]:
    """A header field that must be a JSON list of non-negative integers (not floats, strings or booleans)."""
    if not isinstance(value, list) or not all(type(x) is int and x >= 0 for x in value):
        raise ValueError(f"{field} must be a list of non-negative integers, got {json.dumps(value)[:80]}")
    return value


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsFile:
    """One .safetensors file: header parsed and checked at open, tensors read on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries = self._read_header()
        self._map: mmap.mmap | None = None
        self._fd: int | None = None

    def _read_header(self) -> dict[str, TensorEntry]:
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise DaopError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER_BYTES or 8 + n > size:
                    raise DaopError(f"{self.path}: corrupt safetensors header (length {n} for a {size}-byte file)")
                header = json.loads(f.read(n))
        except OSError as exc:
            raise DaopError(f"{self.path}: cannot read ({exc.strerror})") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DaopError(f"{self.path}: corrupt safetensors header ({exc})") from exc
        if not isinstance(header, dict):
            raise DaopError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        base = 8 + n
        entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            entries[name] = self._entry(name, info, base, size)
        return entries

    def _entry(self, name: str, info: object, base: int, size: int) -> TensorEntry:
        try:
            dtype = DTYPES[info["dtype"]]  # type: ignore[index]
            shape = tuple(_ints(info["shape"], "shape"))  # type: ignore[index]
            begin, end = _ints(info["data_offsets"], "data_offsets")  # type: ignore[index]
        except (KeyError, TypeError, ValueError) as exc:
            raise DaopError(f"{self.path}: tensor {name!r} has a malformed or unsupported header entry ({exc})") from exc
        numel = 1
        for d in shape:
            numel *= d
        expected = numel * torch.empty((), dtype=dtype).element_size()
        if end - begin != expected or begin < 0:
            raise DaopError(
                f"{self.path}: tensor {name!r} spans {end - begin} bytes but shape {list(shape)} "
                f"of {info['dtype']} needs {expected}"  # type: ignore[index]
            )
        if base + end > size:
            raise DaopError(
                f"{self.path}: tensor {name!r} ends at byte {base + end} but the file has {size} bytes "
                "(truncated or corrupt file)"
            )
        return TensorEntry(name, dtype, shape, base + begin, base + end)

    def _mapping(self) -> mmap.mmap:
        if self._map is None:
            self._fd = os.open(self.path, os.O_RDONLY)
            self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY)
        return self._map

    def read_into(self, name: str, dest: torch.Tensor, index: int | None = None) -> None:
        """Copy tensor `name` into `dest` (same shape; dtype and device converted), then release pages.
        With `index`, only its slice [index] along the first dimension (one expert of a stacked tensor)."""
        entry = self.entries[name]
        mapping = self._mapping()
        shape, start, end = entry.shape, entry.start, entry.end
        if index is not None:
            row = entry.nbytes // entry.shape[0]
            shape, start = entry.shape[1:], entry.start + index * row
            end = start + row
        if end > start:
            src = torch.frombuffer(mapping, dtype=entry.dtype, count=dest.numel(), offset=start)
            dest.copy_(src.view(shape))
        page = mmap.PAGESIZE
        lo = start // page * page
        hi = min(len(mapping), (end + page - 1) // page * page)
        if hasattr(mapping, "madvise") and hi > lo:
            mapping.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Checkpoint:
    """All safetensors files of a checkpoint folder, indexed by tensor name."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.files = [SafetensorsFile(p) for p in self._weight_files()]
        self.where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for name in f.entries:
                self.where[name] = f

    def _weight_files(self) -> list[Path]:
        index = self.model_dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                names = sorted(set(weight_map.values()))
                if not all(isinstance(n, str) and n for n in names):
                    raise TypeError("weight_map values must be shard file names")
            except (OSError, KeyError, TypeError, AttributeError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise DaopError(f"{index}: corrupt index ({exc})") from exc
            for shard in names:
                if not (self.model_dir / shard).is_file():
                    raise DaopError(f"{index}: names shard {shard!r}, which is missing from {self.model_dir}")
            return [self.model_dir / s for s in names]
        files = sorted(self.model_dir.glob("*.safetensors"))
        if not files:
            found = sorted(p.name for p in self.model_dir.glob("*.bin")) + sorted(p.name for p in self.model_dir.glob("*.pt"))
            hint = f" (found {', '.join(found[:3])}: convert them to safetensors)" if found else ""
            raise DaopError(f"{self.model_dir}: no *.safetensors weight files{hint}")
        return files

    def entry(self, name: str) -> TensorEntry | None:
        f = self.where.get(name)
        return None if f is None else f.entries[name]

    def file_of(self, name: str) -> Path:
        return self.where[name].path

    def read_into(self, name: str, dest: torch.Tensor, index: int | None = None) -> None:
        self.where[name].read_into(name, dest, index)

    def close(self) -> None:
        for f in self.files:
            f.close()
