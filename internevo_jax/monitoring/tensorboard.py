"""A TensorBoard event-file writer with no TensorFlow, tensorboardX or torch dependency (MON-02).

An event file is a sequence of TFRecords (length, masked crc32c of the length, data, masked crc32c of the data),
each holding one ``Event`` protobuf. The few messages we need are encoded by hand below; field numbers are those of
``tensorboard/compat/proto/{event,summary,tensor,tensor_shape}.proto``. ``tests/test_tensorboard.py`` reads our files
back with TensorBoard's own loader.
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import struct
import time
from pathlib import Path

from internevo_jax.errors import run_folder_write

FLUSH_SECS = 3.0  # InternEvo's SummaryWriter(flush_secs=3)
_FILE_VERSION = b"brain.Event:2"  # version 2 tells TensorBoard to honour SessionLog.START purges
_SESSION_START = 1  # SessionLog.SessionStatus.START
_DT_STRING = 7  # tensorflow DataType.DT_STRING
_files = itertools.count()  # the last part of the file name: unique within this process


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # the Castagnoli polynomial, reflected
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``, table-driven in pure Python.

    About 0.1 us per byte: a step's scalar record (~100-300 bytes) costs tens of microseconds, once per step.
    """
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15 bits and add a constant (so CRCs of CRCs are not trivial)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: uint64 length, masked crc of the length, the data, masked crc of the data (little endian)."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


# ---- protobuf wire format: just the field kinds the messages below use -------------------------------------------


def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # negative int64s are ten-byte two's complement varints
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _int_field(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(value)


def _double_field(field: int, value: float) -> bytes:
    return _key(field, 1) + struct.pack("<d", value)


def _float_field(field: int, value: float) -> bytes:
    try:
        packed = struct.pack("<f", value)
    except OverflowError:  # finite but beyond float32: what a float32 cast gives
        packed = struct.pack("<f", math.copysign(math.inf, value))
    return _key(field, 5) + packed


def _bytes_field(field: int, value: bytes) -> bytes:
    return _key(field, 2) + _varint(len(value)) + value


def _event(wall_time: float, step: int, field: int, payload: bytes) -> bytes:
    """``Event{wall_time=1, step=2, <one of file_version=3 | summary=5 | session_log=7>}``."""
    return _double_field(1, wall_time) + _int_field(2, step) + _bytes_field(field, payload)


def _scalar_value(tag: str, value: float) -> bytes:
    """``Summary.Value{tag=1, simple_value=2}``."""
    return _bytes_field(1, tag.encode()) + _float_field(2, value)


def _text_value(tag: str, text: str) -> bytes:
    """``Summary.Value{tag=1, metadata=9, tensor=8}`` as TensorBoard's text plugin writes and reads it.

    metadata = ``SummaryMetadata{plugin_data=1: PluginData{plugin_name=1: "text"}}`` (empty content = version 0);
    tensor = ``TensorProto{dtype=1: DT_STRING, tensor_shape=2: {dim=2: {size=1: 1}}, string_val=8: text}``.
    """
    metadata = _bytes_field(1, _bytes_field(1, b"text"))
    shape = _bytes_field(2, _int_field(1, 1))
    tensor = _int_field(1, _DT_STRING) + _bytes_field(2, shape) + _bytes_field(8, text.encode())
    return _bytes_field(1, tag.encode()) + _bytes_field(9, metadata) + _bytes_field(8, tensor)


class TensorBoardWriter:
    """Appends scalar and text events to a new ``events.out.tfevents.*`` file in ``log_dir``.

    Writes are synchronous (a few hundred bytes per step); the file is flushed on ``flush()``/``close()`` and by
    the first write at least ``FLUSH_SECS`` after the previous flush. ``purge_step`` (a resumed run's first step)
    writes a ``SessionLog.START`` at that step, so TensorBoard drops the old run's events at steps >= it, as
    InternEvo's ``SummaryWriter(purge_step=step_count)`` does.
    """

    def __init__(self, log_dir: Path, purge_step: int | None = None):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.{next(_files)}"
        self.path = self.log_dir / name
        with run_folder_write(self.path, "tensorboard_folder"):
            self._f = open(self.path, "wb")
        self._last_flush = time.monotonic()
        self._write(_event(time.time(), 0, 3, _FILE_VERSION))
        if purge_step is not None:
            self._write(_event(time.time(), purge_step, 7, _int_field(1, _SESSION_START)))
        self.flush()  # TensorBoard finds the run as soon as the file exists with its header

    def scalars(self, step: int, values: dict[str, float], wall_time: float | None = None) -> None:
        """One event at ``step`` with a scalar per tag; non-finite values are written as they are (TB shows nan)."""
        summary = b"".join(_bytes_field(1, _scalar_value(tag, float(v))) for tag, v in values.items())
        self._write(_event(time.time() if wall_time is None else wall_time, step, 5, summary))

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """A text summary under ``{tag}/text_summary`` (the tag torch's ``SummaryWriter.add_text`` gives)."""
        summary = _bytes_field(1, _text_value(f"{tag}/text_summary", text))
        self._write(_event(time.time(), step, 5, summary))

    def flush(self) -> None:
        if not self._f.closed:
            with run_folder_write(self.path, "tensorboard_folder"):
                self._f.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if not self._f.closed:
            try:
                self._f.close()
            except OSError:  # buffered events that cannot be written: the flush before said so, or the next run will
                pass

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, event: bytes) -> None:
        with run_folder_write(self.path, "tensorboard_folder"):
            self._f.write(tfrecord(event))
        if time.monotonic() - self._last_flush >= FLUSH_SECS:
            self.flush()
