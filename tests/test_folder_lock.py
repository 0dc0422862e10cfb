"""The checkpoint folder's writer lock: pid reuse, foreign hosts, empty locks and read-only folders."""

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path

import pytest

from internevo_jax.checkpoint import folder_lock
from internevo_jax.checkpoint.folder_lock import LOCK, FolderLock, boot_id, process_start
from internevo_jax.checkpoint.manager import Checkpointer
from internevo_jax.config import default_config
from internevo_jax.errors import CheckpointError, FolderInUse


def ckpt_config(folder):
    ckpt = default_config().ckpt
    ckpt.update(dict(save_ckpt_folder=f"local:{folder}", checkpoint_every=1))
    return ckpt


def write_lock(folder, age_s=0.0, **holder):
    path = folder / LOCK
    path.write_text(
        json.dumps(dict(dict(host=socket.gethostname(), job="old", since="yesterday", token="x"), **holder))
    )
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def warnings_of(records):
    return "\n".join(r.getMessage() for r in records if r.levelno == logging.WARNING)


def test_own_pid_reused_after_a_container_restart_is_stale(tmp_path, logs):
    # The old holder had this very pid, but its process started at another time: a restarted container.
    write_lock(tmp_path, pid=os.getpid(), boot_id=boot_id(), started="1")
    lock = FolderLock(tmp_path / LOCK, "new")
    lock.acquire()
    assert json.loads((tmp_path / LOCK).read_text())["token"] == lock.info["token"]
    assert f"pid {os.getpid()} is now another process" in warnings_of(logs)
    lock.release()
    assert not (tmp_path / LOCK).exists()


def test_live_holder_on_this_host_is_refused_and_the_error_says_when_it_goes_stale(tmp_path):
    write_lock(tmp_path, age_s=3600, pid=os.getpid(), boot_id=boot_id(), started=process_start(os.getpid()))
    with pytest.raises(FolderInUse, match=rf"goes stale as soon as pid {os.getpid()} on .* exits"):
        FolderLock(tmp_path / LOCK, "new").acquire()


def test_foreign_host_goes_stale_when_not_refreshed(tmp_path, logs):
    write_lock(tmp_path, age_s=60, host="elsewhere", pid=1, boot_id="other")
    with pytest.raises(CheckpointError, match=r"host=elsewhere.*goes stale once not refreshed for 600 s"):
        Checkpointer(ckpt_config(tmp_path))
    write_lock(tmp_path, age_s=folder_lock.STALE_AFTER_S + 5, host="elsewhere", pid=1, boot_id="other")
    Checkpointer(ckpt_config(tmp_path)).close()
    assert "not refreshed for 60" in warnings_of(logs)


@pytest.mark.parametrize("content", ["", "{garb"])
def test_empty_or_garbled_lock_is_stale_with_a_warning(tmp_path, logs, content):
    (tmp_path / LOCK).write_text(content)
    Checkpointer(ckpt_config(tmp_path)).close()
    assert "empty or unreadable" in warnings_of(logs)


def test_the_holder_refreshes_its_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(folder_lock, "HEARTBEAT_S", 0.05)
    lock = FolderLock(tmp_path / LOCK, "live")
    lock.acquire()
    t = time.time() - 3600
    os.utime(tmp_path / LOCK, (t, t))
    time.sleep(0.5)
    assert time.time() - (tmp_path / LOCK).stat().st_mtime < 60
    lock.release()


def test_read_only_folder_is_a_checkpoint_error(tmp_path, monkeypatch):
    def read_only(path, *args, **kw):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    # Simulated: the tests may run as root, who writes into folders without write permission.
    monkeypatch.setattr(folder_lock, "open", read_only, raising=False)
    with pytest.raises(CheckpointError, match=r"cannot take the checkpoint lock .*Read-only file system.*writable"):
        Checkpointer(ckpt_config(tmp_path))
    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(CheckpointError, match=r"cannot create the checkpoint folder .*sub.*writable"):
        Checkpointer(ckpt_config(tmp_path / "sub"))
