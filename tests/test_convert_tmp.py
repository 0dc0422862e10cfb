"""tools/convert_checkpoint.py: the hidden tmp folders of killed conversions are removed on the next start."""

import json
import logging
import subprocess
import sys

from internevo_jax.checkpoint import folder_lock
from tools import convert_checkpoint


def test_a_killed_conversions_tmp_folder_is_removed_and_a_live_ones_kept(tmp_path, logs):
    dst = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = tmp_path / f".{dst.name}.tmp-killed"
    (killed / "final").mkdir(parents=True)
    (killed / convert_checkpoint.WRITER).write_text(json.dumps(dict(folder_lock.this_process(), pid=dead.pid)))
    live = tmp_path / f".{dst.name}.tmp-live"
    live.mkdir()
    (live / convert_checkpoint.WRITER).write_text(json.dumps(folder_lock.this_process()))
    elsewhere = tmp_path / f".{dst.name}.tmp-elsewhere"
    elsewhere.mkdir()
    (elsewhere / convert_checkpoint.WRITER).write_text(json.dumps(dict(folder_lock.this_process(), host="other")))
    other_output = tmp_path / ".other.tmp-x"
    other_output.mkdir()

    def write(tmp):
        assert json.loads((tmp / convert_checkpoint.WRITER).read_text())["pid"] == folder_lock.this_process()["pid"]
        (tmp / "final").mkdir()
        (tmp / "final" / "x").write_text("done")

    convert_checkpoint.atomic_folder(dst, write)
    assert (dst / "x").read_text() == "done" and not (dst / convert_checkpoint.WRITER).exists()
    assert not killed.exists() and live.is_dir() and elsewhere.is_dir() and other_output.is_dir()
    text = "\n".join(r.getMessage() for r in logs)
    assert f"removing {killed}: left by a conversion to {dst} that was killed" in text
    warnings = "\n".join(r.getMessage() for r in logs if r.levelno == logging.WARNING)
    assert f"{elsewhere} was left by a conversion" in warnings and str(live) not in text
