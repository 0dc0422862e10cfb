"""A run folder that cannot be written (disk full, read-only) while metrics.jsonl / TensorBoard are written: one
clear error naming the file and the fix, exit code 7 (README), no traceback; the checkpoint is handled as for any
error. /dev/full stands in for a full disk (every write fails with ENOSPC, also for root, whom permissions don't stop).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from internevo_jax.errors import RunFolderError, exit_code_of
from internevo_jax.monitoring.metrics import JsonlWriter
from internevo_jax.monitoring.tensorboard import TensorBoardWriter

from .conftest import ROOT

FULL = Path("/dev/full")
pytestmark = pytest.mark.skipif(not FULL.exists(), reason="needs /dev/full")


def test_metrics_jsonl_on_a_full_disk_names_the_file(tmp_path):
    (tmp_path / "metrics.jsonl").symlink_to(FULL)
    writer = JsonlWriter(tmp_path / "metrics.jsonl")
    with pytest.raises(RunFolderError, match=rf"{tmp_path}/metrics.jsonl: cannot be written \(No space left") as e:
        writer.write({"step": 1, "loss": 2.0})
    assert "--config.run_folder" in str(e.value) and exit_code_of(e.value)[0] == 7


def test_tensorboard_on_a_full_disk_names_the_file(tmp_path):
    writer = TensorBoardWriter(tmp_path / "tb")
    writer._f.close()
    writer._f = open(FULL, "wb")  # the event file's disk fills up
    writer.scalars(1, {"loss": 2.0})
    with pytest.raises(RunFolderError, match=rf"{writer.path}: cannot be written") as e:
        writer.flush()
    assert "tensorboard_folder" in str(e.value)


# Loaded by the launched process before anything else: the disk fills up when metrics.jsonl is opened for appending
# (a /dev/full symlink would not do: a restart reads metrics.jsonl first, and /dev/full reads as endless zeros).
FULL_DISK = """
import builtins

_open = builtins.open


def _full(file, mode="r", *args, **kwargs):
    if str(file).endswith("metrics.jsonl") and "a" in mode:
        return _open("/dev/full", "w", *args, **kwargs)
    return _open(file, mode, *args, **kwargs)


builtins.open = _full
"""


def test_launch_exits_7_with_one_line_after_the_checkpoint_in_flight(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FULL_DISK)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    run, ckpt = tmp_path / "run", tmp_path / "ckpt"
    args = ["--config.data.total_steps=3", f"--config.run_folder={run}", "--config.ckpt.enable_save_ckpt=True"]
    args += [f"--config.ckpt.save_ckpt_folder={ckpt}", "--config.ckpt.checkpoint_every=1", "--launcher=local"]
    out = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), f"--config={ROOT / 'configs' / 'tiny.py'}", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 7, out.stderr[-3000:] + out.stdout[-3000:]
    assert f"run folder error: {run}/metrics.jsonl: cannot be written (No space left on device)" in out.stdout
    assert "Traceback" not in out.stderr
    # The step saved while the line failed is complete (sealed), so a restart resumes from it.
    assert (ckpt / "1" / "manifest.json").is_file()
