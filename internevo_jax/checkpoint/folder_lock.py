"""The checkpoint folder's writer lock: two runs writing one folder corrupt each other's checkpoints.

Orbax has no writer lock (``../shared/reference/reliability.md``): a second run on the same folder deletes the
first one's tmp folders and interleaves steps. The lock is a file naming its holder, created atomically with its
content (written to a private temp file, then hard-linked to ``.lock``: the link fails if the lock exists, on local
and NFSv3+ file systems alike), so a reader never sees a half-written lock; unlike flock it also works where locks
are not supported (Lustre without ``-o flock``) and says who holds it.

Whether a holder is gone, so that its lock is stale and taken over with a warning:

- same host and same boot (``/proc/sys/kernel/random/boot_id``): its pid no longer runs, or runs a process that
  started at another time (``/proc/<pid>/stat`` field 22). A pid alone is not enough: a restarted container gets
  the old pids back (often the very same one), and ``kill(pid, 0)`` would call a dead holder alive forever;
- an earlier incarnation of a requeued SLURM job (same job id, lower restart count);
- otherwise (another host, a rescheduled pod, a rebooted node): the live holder refreshes the lock's mtime every
  ``HEARTBEAT_S`` seconds, so a lock not refreshed for ``STALE_AFTER_S`` seconds is stale. Its age is measured
  against the mtime of a file this process just wrote on the same file system, not the local clock, so clock skew
  between hosts does not matter;
- an empty or unreadable lock: it cannot be a live writer's half-written lock (locks are written atomically).
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from internevo_jax.errors import FolderInUse, LockError
from internevo_jax.monitoring.logger import get_logger

LOCK = ".lock"
HEARTBEAT_S = 60.0  # how often a live holder refreshes its lock's mtime
STALE_AFTER_S = 600.0  # a lock no live-process check applies to, not refreshed for this long, is stale


def boot_id() -> str | None:
    """This kernel's boot id (shared by every container on the node), or None where there is no /proc."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_start(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot, ``/proc/<pid>/stat`` field 22); None when no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # Field 2 (the command) is in parentheses and may hold spaces: count from the last ")" (field 3 follows it).
    return text.rpartition(")")[2].split()[19]


def this_process() -> dict:
    """Who this process is, in a form that survives pid reuse: host, boot id, pid and start time."""
    return dict(host=socket.gethostname(), boot_id=boot_id(), pid=os.getpid(), started=process_start(os.getpid()))


def process_gone(info: dict) -> bool | None:
    """Whether the process ``this_process()`` described (in another process) has ended: True or False on its host
    and boot, None when that cannot be told here (another host or boot, or a record without a start time)."""
    here = boot_id()
    same = here is not None and info.get("host") == socket.gethostname() and info.get("boot_id") == here
    if not same or info.get("started") is None or not isinstance(info.get("pid"), int):
        return None
    return process_start(info["pid"]) != info["started"]


class FolderLock:
    """``<folder>/.lock`` naming its holder; ``acquire`` raises ``FolderInUse`` while a live run holds it."""

    def __init__(self, path: Path, job_name: str | None):
        self.path = path
        self.held = False
        have_proc = Path("/proc/self/stat").exists()
        self.info: dict[str, Any] = dict(  # the lock file's JSON
            host=socket.gethostname(),
            pid=os.getpid(),
            boot_id=boot_id() if have_proc else None,
            started=process_start(os.getpid()) if have_proc else None,
            job=job_name or os.environ.get("SLURM_JOB_NAME"),
            slurm_job_id=os.environ.get("SLURM_JOB_ID"),
            slurm_restart_count=int(os.environ.get("SLURM_RESTART_COUNT", "0")),
            since=time.strftime("%Y-%m-%d %H:%M:%S %z"),
            heartbeat_s=HEARTBEAT_S,
            token=uuid.uuid4().hex,  # so release() never deletes a lock that someone else took over
        )
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> None:
        """Takes the lock (taking over a stale one), or raises ``FolderInUse`` / ``LockError`` saying why not."""
        tmp = self.path.with_name(f"{LOCK}.{self.info['token']}.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(self.info, f)
                f.flush()
                os.fsync(f.fileno())
            for _ in range(3):  # a stale lock taken over, or a holder that released it as we looked
                try:
                    os.link(tmp, self.path)  # atomic, content included: fails if the lock exists
                except FileExistsError:
                    os.utime(tmp)
                    now = tmp.stat().st_mtime  # "now" by the file system's clock, which set the holder's mtime too
                    raw, age = _read(self.path, now)
                    if raw is None:
                        continue  # released as we looked
                    stale, why = self._stale(raw, age)
                    if not stale:
                        raise FolderInUse(self._held_message(raw, why)) from None
                    self._take_over(raw, why)
                    continue
                self.held = True
                atexit.register(self.release)  # a run dying of an exception without close() still frees the folder
                self._heartbeat = threading.Thread(target=self._beat, name="checkpoint-lock-heartbeat", daemon=True)
                self._heartbeat.start()
                return
        except OSError as e:  # read-only folder, no permission, full disk, ...
            raise LockError(
                f"cannot take the checkpoint lock {self.path}: {type(e).__name__}: {e}. The checkpoint folder must be "
                "writable: fix its permissions or free space, or point ckpt.save_ckpt_folder at a writable folder"
            ) from None
        finally:
            tmp.unlink(missing_ok=True)
        raise FolderInUse(f"could not take the checkpoint lock {self.path}: it keeps changing hands")

    def _stale(self, raw: bytes, age: float) -> tuple[bool, str]:
        """``(stale, why)``: why the holder is gone, or what will make its lock stale."""
        holder = _parse(raw)
        if holder is None:
            return True, "the lock file is empty or unreadable, which a live holder's lock never is (written whole)"
        pid, started = holder.get("pid"), holder.get("started")
        same_kernel = holder.get("host") == self.info["host"] and holder.get("boot_id") == self.info["boot_id"]
        if same_kernel and self.info["boot_id"] is not None and started is not None and isinstance(pid, int):
            now = process_start(pid)
            if now is None:
                return True, f"pid {pid} is gone"
            if now != started:
                return True, f"pid {pid} is now another process (started at tick {now}, the holder at {started})"
            return False, f"it goes stale as soon as pid {pid} on {holder.get('host')} exits"
        if holder.get("host") == self.info["host"] and isinstance(pid, int):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True, f"pid {pid} is gone"
            except PermissionError:
                pass  # alive under another user (or another process got its pid): the refresh rule decides
        # A requeued SLURM job keeps its id and bumps its restart count; its earlier incarnation is gone.
        job = holder.get("slurm_job_id")
        if job and job == self.info["slurm_job_id"]:
            try:
                if int(holder.get("slurm_restart_count", 0)) < self.info["slurm_restart_count"]:
                    return True, f"it is an earlier incarnation of the requeued SLURM job {job}"
            except (TypeError, ValueError):
                pass
        if age > STALE_AFTER_S:
            return True, f"it was not refreshed for {age:.0f} s (a live holder refreshes it every {HEARTBEAT_S:.0f} s)"
        return False, (
            f"a live holder refreshes it every {HEARTBEAT_S:.0f} s; it goes stale once not refreshed for "
            f"{STALE_AFTER_S:.0f} s (last refreshed {age:.0f} s ago), and a later start then takes it over"
        )

    def _take_over(self, raw: bytes, why: str) -> None:
        get_logger().warning(f"taking over the stale checkpoint lock {self.path} ({_who(raw)}): {why}")
        # Rename, not unlink: if another starter replaced the stale lock in the meantime, we can put theirs back.
        aside = self.path.with_name(f"{LOCK}.stale-{self.info['token']}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            if aside.read_bytes() != raw:
                os.link(aside, self.path)
        except FileExistsError:
            pass
        finally:
            aside.unlink(missing_ok=True)

    def _held_message(self, raw: bytes, why: str) -> str:
        return (
            f"checkpoint folder {self.path.parent} is in use by another run ({_who(raw)}); {why}. Two runs writing "
            f"one folder corrupt each other's checkpoints. Stop the other run, point this one at another "
            f"ckpt.save_ckpt_folder, or, if that run is dead, delete {self.path}"
        )

    def _beat(self) -> None:
        """Refreshes the lock's mtime while it is ours, so other hosts can tell a live holder from a dead one."""
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if (_parse(self.path.read_bytes()) or {}).get("token") != self.info["token"]:
                    get_logger().warning(f"checkpoint lock {self.path} is no longer this run's; stopped refreshing it")
                    return
                os.utime(self.path)
            except OSError as e:  # a passing file system hiccup: the next beat tries again, well before it is stale
                get_logger().warning(f"could not refresh the checkpoint lock {self.path}: {e}")

    def release(self) -> None:
        if self.held:
            self.held = False
            self._stop.set()
            atexit.unregister(self.release)
            try:
                if (_parse(self.path.read_bytes()) or {}).get("token") == self.info["token"]:
                    self.path.unlink(missing_ok=True)
            except OSError:
                pass  # gone already, or the folder became unreadable: nothing of ours to remove


def _read(path: Path, now: float) -> tuple[bytes | None, float]:
    """The lock's bytes and its age in seconds by the file system's clock; None when it is gone."""
    try:
        with open(path, "rb") as f:
            return f.read(1 << 16), now - os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return None, 0.0


def _parse(raw: bytes) -> dict | None:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _who(raw: bytes) -> str:
    holder = _parse(raw)
    if holder is None:
        return "unreadable lock"
    return ", ".join(f"{k}={holder.get(k)}" for k in ("host", "pid", "job", "since"))


def lock_on_process_0(lock: FolderLock, directory: Path) -> None:
    """Process 0 takes the lock for the whole job; every process raises if it could not (no one is left waiting)."""
    error = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except LockError as e:
            error = e
    if jax.process_count() > 1:
        ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not ok and error is None:
            error = FolderInUse(f"process 0 could not lock the checkpoint folder {directory}; see its log")
    if error is not None:
        raise error
