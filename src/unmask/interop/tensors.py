"""Tensor files of published checkpoints, read and written one tensor at a time.

A 7-8B checkpoint is 15-16 GB in bf16: converting it must never hold two copies. The reader
memory-maps the (possibly sharded) ``*.safetensors`` files and hands out one tensor on request;
the writer lays out the whole file header first (names, dtypes, shapes are known in advance) and
then appends each tensor's bytes as it is produced, so at most one layer's tensors are in memory.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from unmask.errors import UnmaskError

INDEX = "model.safetensors.index.json"

# safetensors' dtype names
DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
NAME_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


class TensorReader:
    """Lazily read tensors of a folder's ``*.safetensors`` (one file, or shards named by the index)."""

    def __init__(self, folder: str | Path, files: list[str] | None = None) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX
        weight_map = None
        if files is not None:
            pass
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise UnmaskError(f"cannot read {index} ({exc}); it must be a JSON object with a 'weight_map'") from None
            files = sorted(set(weight_map.values()))
        else:
            # one unsharded file; some folders also hold other formats' files (Mistral's consolidated.safetensors)
            single = self.folder / "model.safetensors"
            files = [single.name] if single.is_file() else sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise UnmaskError(f"{self.folder} holds no *.safetensors weights (and no {INDEX}); pass a folder saved with save_pretrained(safe_serialization=True)")
        self._handles = {}
        self._where: dict[str, str] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise UnmaskError(f"{index} names shard {name}, which is missing from {self.folder}")
            try:
                handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise UnmaskError(f"cannot read {path}: not a valid safetensors file ({exc})") from None
            self._handles[name] = handle
            for key in handle.keys():
                self._where[key] = name
        if weight_map is not None:
            missing = sorted(k for k, f in weight_map.items() if self._where.get(k) != f)
            if missing:
                raise UnmaskError(f"{index} lists tensors its shards do not hold, e.g. {missing[:3]}")

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def _slice(self, key: str):
        if key not in self._where:
            raise UnmaskError(f"{self.folder}: tensor {key!r} is missing from the checkpoint")
        return self._handles[self._where[key]].get_slice(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        name = self._slice(key).get_dtype()
        if name not in NAME_DTYPES:
            raise UnmaskError(f"{self.folder}: tensor {key!r} has dtype {name}; only floating point weights (F32, F16, BF16) are read")
        return NAME_DTYPES[name]

    def get(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise UnmaskError(f"{self.folder}: tensor {key!r} is missing from the checkpoint")
        return self._handles[self._where[key]].get_tensor(key)


def write_streaming(
    path: str | Path,
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file whose tensors (``specs``: name, dtype, shape, in file order) arrive one by one.

    ``tensors`` must yield exactly the names of ``specs`` in the same order, each with that dtype
    and shape; a mismatch raises before the file is complete. The file is flushed to disk.
    """
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in specs:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        produced: Iterator[tuple[str, torch.Tensor]] = iter(tensors)
        for name, dtype, shape in specs:
            got, tensor = next(produced, (None, None))
            if got != name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                have = None if tensor is None else (tuple(tensor.shape), tensor.dtype)
                raise UnmaskError(f"internal: tensor {got!r} {have} arrived where {name!r} {tuple(shape)} {dtype} was laid out")
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            f.write(memoryview(data.numpy()))
        if next(produced, None) is not None:
            raise UnmaskError(f"internal: more tensors than laid out in {path}")
        f.flush()
        os.fsync(f.fileno())
