"""Reading safetensors files whose header is hostile or damaged: a clear CheckpointError, nothing huge allocated."""

import json
import struct

import numpy as np
import pytest

from internevo_jax.convert.safetensors_io import SafetensorsFile, header
from internevo_jax.errors import CheckpointError


def write(path, table, data=b"", length=None):
    text = json.dumps(table).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def test_round_trip(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = tmp_path / "ok.safetensors"
    path.write_bytes(header([("a", a.shape, a.dtype)]) + a.tobytes())
    np.testing.assert_array_equal(SafetensorsFile(path).read("a"), a)


def test_header_length_beyond_the_file(tmp_path):
    path = write(tmp_path / "x.safetensors", {}, length=2**62)
    with pytest.raises(CheckpointError, match=rf"{path}: not a safetensors file \(its header claims {2**62} bytes"):
        SafetensorsFile(path)


@pytest.mark.parametrize(
    "entry, why",
    [
        (dict(dtype="F32", shape=[2**40, 2**40], data_offsets=[0, 8]), "spans 8 bytes, its shape"),
        (dict(dtype="F32", shape=[2], data_offsets=[0, 2**60]), "outside the 8 data bytes"),
        (dict(dtype="F32", shape=[-1, 2], data_offsets=[0, 8]), "not a list of non-negative ints"),
        (dict(dtype="F32", shape=[2], data_offsets=[8, 0]), "has data_offsets"),
        ("nonsense", "has no {dtype, shape, data_offsets} entry"),
    ],
)
def test_hostile_entries_fail_at_open_before_any_allocation(tmp_path, entry, why):
    path = write(tmp_path / "x.safetensors", {"w": entry}, data=bytes(8))
    with pytest.raises(CheckpointError, match=rf"{path}: tensor 'w' .*{why.replace('{', '.').replace('}', '.')}"):
        SafetensorsFile(path).read("w")
