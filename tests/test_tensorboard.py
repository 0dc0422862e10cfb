"""Our TensorBoard event files, read back with TensorBoard's own loaders (MON-02)."""

import math
import os
import re
import socket

import pytest
from tensorboard.backend.event_processing import event_accumulator, event_file_loader
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
from tensorboard.util import tensor_util

from internevo_jax.monitoring import tensorboard as tb


def test_crc32c_known_answers():
    assert tb.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert tb.crc32c(b"") == 0
    assert tb.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
    assert tb.crc32c(b"\xff" * 32) == 0x62A8AB43
    crc = tb.crc32c(b"abc")
    assert tb.masked_crc32c(b"abc") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    data = bytes(range(256)) * 3
    assert tb.masked_crc32c(data) == pywrap_tensorflow.masked_crc32c(data)  # TensorBoard's own reader check


def _events(path):
    """The raw Event protos (the legacy loader does not migrate simple_value into tensors); CRCs are checked."""
    return list(event_file_loader.LegacyEventFileLoader(str(path)).Load())


def test_scalars_round_trip(tmp_path):
    with tb.TensorBoardWriter(tmp_path) as w:
        for step in range(3):
            w.scalars(step, {"loss": 5.0 - step, "lr": 1e-4 * (step + 1)}, wall_time=1000.0 + step)
        w.scalars(3, {"loss": math.nan, "grad_norm": math.inf, "big": 1e40, "neg": -2.5})
        w.scalars(2**40, {"loss": 0.25})
    assert re.fullmatch(
        rf"events\.out\.tfevents\.\d+\.{re.escape(socket.gethostname())}\.{os.getpid()}\.\d+", w.path.name
    )
    events = _events(w.path)
    assert events[0].file_version == "brain.Event:2"
    assert [e.step for e in events[1:]] == [0, 1, 2, 3, 2**40]
    assert [e.wall_time for e in events[1:4]] == [1000.0, 1001.0, 1002.0]
    first = {v.tag: v.simple_value for v in events[1].summary.value}
    assert first == {"loss": 5.0, "lr": pytest.approx(1e-4)}
    odd = {v.tag: v.simple_value for v in events[4].summary.value}
    assert math.isnan(odd["loss"]) and odd["grad_norm"] == math.inf and odd["big"] == math.inf and odd["neg"] == -2.5

    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["big", "grad_norm", "loss", "lr", "neg"]
    loss = acc.Scalars("loss")
    assert [s.step for s in loss] == [0, 1, 2, 3, 2**40]
    assert [s.value for s in loss[:3]] == [5.0, 4.0, 3.0]


def test_text(tmp_path):
    config_text = "model = dict(\n    num_layers=2,\n)\nünïcode ✓"
    with tb.TensorBoardWriter(tmp_path) as w:
        w.text("job_name", "tiny")
        w.text("config", config_text, step=7)
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert sorted(acc.Tags()["tensors"]) == ["config/text_summary", "job_name/text_summary"]
    (event,) = acc.Tensors("config/text_summary")
    assert event.step == 7
    assert tensor_util.make_ndarray(event.tensor_proto).tolist() == [config_text.encode()]
    assert acc.SummaryMetadata("config/text_summary").plugin_data.plugin_name == "text"
    (event,) = acc.Tensors("job_name/text_summary")
    assert event.tensor_proto.string_val == [b"tiny"]


def test_purge_on_resume_drops_stale_steps(tmp_path, monkeypatch):
    with tb.TensorBoardWriter(tmp_path) as w:  # the first run reached step 9 but its last checkpoint was step 5
        for step in range(10):
            w.scalars(step, {"loss": float(step)})
    real_time = tb.time.time
    # A resumed run starts later; TensorBoard reads the files of a folder in name (= start time) order.
    monkeypatch.setattr(tb.time, "time", lambda: real_time() + 10)
    with tb.TensorBoardWriter(tmp_path, purge_step=5) as resumed:
        for step in range(5, 8):
            resumed.scalars(step, {"loss": 100.0 + step})
    assert sorted(p.name for p in tmp_path.iterdir()) == [w.path.name, resumed.path.name]
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    got = [(s.step, s.value) for s in acc.Scalars("loss")]
    assert got == [(s, float(s)) for s in range(5)] + [(s, 100.0 + s) for s in range(5, 8)]


def test_flushes_every_few_seconds(tmp_path, monkeypatch):
    w = tb.TensorBoardWriter(tmp_path)
    header = os.path.getsize(w.path)
    assert header > 0  # the file_version record is on disk as soon as the writer exists
    w.scalars(0, {"loss": 1.0})
    assert os.path.getsize(w.path) == header  # buffered
    monkeypatch.setattr(tb, "FLUSH_SECS", 0.0)
    w.scalars(1, {"loss": 1.0})
    assert os.path.getsize(w.path) > header  # both records, flushed by the write past FLUSH_SECS
    monkeypatch.setattr(tb, "FLUSH_SECS", 3.0)
    w.scalars(2, {"loss": 1.0})
    size = os.path.getsize(w.path)
    w.flush()
    assert os.path.getsize(w.path) > size
    w.close()
    w.close()  # idempotent
    assert [e.step for e in _events(w.path)[1:]] == [0, 1, 2]
