"""The safetensors format, written and read by streaming: one tensor at a time, nothing memory-mapped.

``safetensors.numpy.save_file`` takes a whole shard in memory and ``safe_open`` maps the file (every tensor read
stays resident until it is closed), which makes a converter hold the model twice. The format is simple: an 8-byte
little-endian length, a JSON table of ``name -> {dtype, shape, data_offsets}``, then the tensors' bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from internevo_jax.errors import CheckpointError

# safetensors' dtype names (the ones model weights use)
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32"}
CODES = {name: code for code, name in DTYPES.items()}
MAX_HEADER = 100_000_000  # bytes: the limit of safetensors' own reader


def header(entries: list[tuple[str, tuple[int, ...], np.dtype]]) -> bytes:
    """The head of a safetensors file holding ``entries`` in this order: the JSON table's length (u64, little
    endian), then the table (each tensor's dtype, shape and byte range after the head), padded to 8 bytes."""
    table: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        end = offset + math.prod(shape) * dtype.itemsize
        table[name] = dict(dtype=CODES[dtype.name], shape=list(shape), data_offsets=[offset, end])
        offset = end
    text = json.dumps(table, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keeps the tensors 8-byte aligned, as safetensors' own writer does
    return struct.pack("<Q", len(text)) + text


def write_shards(
    folder: Path,
    files: list[str],
    shards: list[list[tuple[str, tuple[int, ...], np.dtype]]],
    tensors: Iterator[tuple[str, np.ndarray]],
    progress: Any,
) -> None:
    """Writes each shard's header, then its tensors as ``tensors`` yields them (in the planned order)."""
    for file, shard in zip(files, shards, strict=True):
        with open(folder / file, "wb") as out:
            out.write(header(shard))
            for name, shape, dt in shard:
                got, a = next(tensors)
                if (got, a.shape, a.dtype) != (name, shape, dt):  # the header promised another tensor: a bug
                    raise AssertionError(
                        f"export table: {got} {a.shape} {a.dtype} where {name} {shape} {dt} was planned"
                    )
                out.write(a.reshape(-1).view(np.uint8).data)
                nbytes = a.nbytes
                del a  # a may be a whole leaf: not kept while the next one is read
                if progress is not None:
                    progress.advance(nbytes)


class SafetensorsFile:
    """One ``.safetensors`` file: its header table, and tensors read with plain reads into fresh arrays (no
    mapping stays resident: the caller holds what it keeps, nothing more)."""

    def __init__(self, path: Path):
        import ml_dtypes  # noqa: F401 (registers bfloat16 with numpy)

        self.path = path
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            try:
                (length,) = struct.unpack("<Q", f.read(8))
                # Checked before reading: a hostile length (2**62) would otherwise be allocated.
                if length > min(size - 8, MAX_HEADER):
                    raise ValueError(
                        f"its header claims {length} bytes; the file has {size}, the format allows at most {MAX_HEADER}"
                    )
                table = json.loads(f.read(length))
                if not isinstance(table, dict):
                    raise ValueError("its header is not a JSON table")
            except (struct.error, ValueError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
        table.pop("__metadata__", None)
        self.start = 8 + length
        self.table: dict[str, dict[str, Any]] = table
        for name in table:
            problem = self._entry_problem(name, size - self.start)
            if problem is not None:
                raise CheckpointError(
                    f"{path}: tensor {name!r} {problem}: the file is damaged or not a safetensors file"
                )

    def _entry_problem(self, name: str, data_size: int) -> str | None:
        """What is wrong with a header entry (checked at open, so nothing is allocated from a bad one), or None."""
        entry = self.table[name]
        if not isinstance(entry, dict):
            return "has no {dtype, shape, data_offsets} entry"
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            return f"has shape {shape!r}, not a list of non-negative ints"
        if not isinstance(entry.get("dtype"), str):
            return f"has dtype {entry.get('dtype')!r}"
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            return f"has data_offsets {offsets!r}, outside the {data_size} data bytes of the file"
        if entry["dtype"] in DTYPES and offsets[1] - offsets[0] != self.nbytes(name):
            return (
                f"spans {offsets[1] - offsets[0]} bytes, its shape {shape} {entry['dtype']} needs {self.nbytes(name)}"
            )
        return None

    def keys(self) -> list[str]:
        return list(self.table)

    def _dtype(self, name: str) -> np.dtype:
        code = self.table[name]["dtype"]
        if code not in DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {code}, which is not read here")
        return np.dtype(DTYPES[code])

    def nbytes(self, name: str) -> int:
        return math.prod(self.table[name]["shape"]) * self._dtype(name).itemsize

    def read(self, name: str) -> np.ndarray:
        entry, dtype = self.table[name], self._dtype(name)
        begin, end = entry["data_offsets"]
        if end - begin != self.nbytes(name):  # before allocating: the header's shape is not trusted
            raise CheckpointError(
                f"{self.path}: tensor {name!r} spans {end - begin} bytes, its shape needs {self.nbytes(name)}"
            )
        out = np.empty(entry["shape"], dtype)
        with open(self.path, "rb") as f:
            f.seek(self.start + begin)
            if f.readinto(out.reshape(-1).view(np.uint8).data) != out.nbytes:  # .data: the array's memoryview
                raise CheckpointError(f"{self.path}: truncated in tensor {name!r}")
        return out
