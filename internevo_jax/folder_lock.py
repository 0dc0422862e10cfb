"""The checkpoint folder's writer lock: two runs writing one folder corrupt each other's checkpoints.

Orbax has no writer lock (``../shared/reference/reliability.md``): a second run on the same folder deletes the
first one's tmp folders and interleaves steps. The lock is a file created with O_EXCL (atomic on local and NFSv3+
file systems) holding who wrote it; unlike flock it also works where locks are not supported (Lustre without
``-o flock``) and says who holds it. A holder that is gone (same host and dead pid, or an earlier incarnation of a
requeued SLURM job) is taken over with a warning.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
import uuid
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from internevo_jax.metrics import get_logger

LOCK = ".lock"


class FolderInUse(RuntimeError):
    """Another live run holds the folder's lock (the message names it and the fix)."""


class FolderLock:
    """``<folder>/.lock`` naming its holder; ``acquire`` raises ``FolderInUse`` while a live run holds it."""

    def __init__(self, path: Path, job_name: str | None):
        self.path = path
        self.held = False
        self.info = dict(
            host=socket.gethostname(),
            pid=os.getpid(),
            job=job_name or os.environ.get("SLURM_JOB_NAME"),
            slurm_job_id=os.environ.get("SLURM_JOB_ID"),
            slurm_restart_count=int(os.environ.get("SLURM_RESTART_COUNT", "0")),
            since=time.strftime("%Y-%m-%d %H:%M:%S %z"),
            token=uuid.uuid4().hex,  # so release() never deletes a lock that someone else took over
        )

    def acquire(self) -> None:
        for _ in range(3):  # a stale lock taken over, or a holder that released it as we looked
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_json(self.path)
                if holder is None and self.path.exists():
                    raise FolderInUse(self._held_message({})) from None
                if holder is not None:
                    if not self._stale(holder):
                        raise FolderInUse(self._held_message(holder)) from None
                    self._take_over(holder)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.info, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            atexit.register(self.release)  # a run that dies of an exception without close() still frees the folder
            return
        raise FolderInUse(f"could not take the checkpoint lock {self.path}: it keeps changing hands")

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") == self.info["host"]:
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, KeyError, TypeError, ValueError):
                pass  # alive under another user, or a lock we cannot read: not ours to take
            return False
        # A requeued SLURM job keeps its id and bumps its restart count; its earlier incarnation is gone.
        same_job = holder.get("slurm_job_id") and holder.get("slurm_job_id") == self.info["slurm_job_id"]
        return bool(same_job) and int(holder.get("slurm_restart_count", 0)) < self.info["slurm_restart_count"]

    def _take_over(self, holder: dict) -> None:
        who = ", ".join(f"{k}={holder.get(k)}" for k in ("host", "pid", "job", "since"))
        get_logger().warning(f"taking over the stale checkpoint lock {self.path}: its holder ({who}) is gone")
        # Rename, not unlink: if another starter replaced the stale lock in the meantime, we can put theirs back.
        aside = self.path.with_name(f"{LOCK}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if _read_json(aside) != holder:
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink()

    def _held_message(self, holder: dict) -> str:
        who = ", ".join(f"{k}={holder.get(k)}" for k in ("host", "pid", "job", "since")) if holder else "unreadable"
        return (
            f"checkpoint folder {self.path.parent} is in use by another run ({who}). Two runs writing one folder "
            f"corrupt each other's checkpoints. Stop the other run, point this one at another ckpt.save_ckpt_folder, "
            f"or, if that run is dead, delete {self.path}"
        )

    def release(self) -> None:
        if self.held:
            self.held = False
            atexit.unregister(self.release)
            if (_read_json(self.path) or {}).get("token") == self.info["token"]:
                self.path.unlink(missing_ok=True)


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def lock_on_process_0(lock: FolderLock, directory: Path) -> None:
    """Process 0 takes the lock for the whole job; every process raises if it could not (no one is left waiting)."""
    error = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except FolderInUse as e:
            error = e
    if jax.process_count() > 1:
        ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not ok and error is None:
            error = FolderInUse(f"process 0 could not lock the checkpoint folder {directory}; see its log")
    if error is not None:
        raise error
